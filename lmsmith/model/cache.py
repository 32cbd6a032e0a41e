"""A preallocated KV cache for single-process decoding (the server uses the paged one)."""
from __future__ import annotations

import torch

from .config import ModelConfig


class StaticKVCache:
    """Per-layer (B, Hkv, max_len, D) buffers filled left to right; every row shares one length.

    Allocating once avoids a torch.cat per layer per token, which dominates decode time for small
    models on CPU.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.kv_heads, max_len, config.dim_per_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in `keep` (used when finished sequences leave the batch)."""
        self.k = [t.index_select(0, keep) for t in self.k]
        self.v = [t.index_select(0, keep) for t in self.v]
