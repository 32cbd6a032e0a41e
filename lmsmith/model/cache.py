"""Preallocated KV caches for single-process decoding (the server uses the paged one)."""
from __future__ import annotations

import torch

from .config import ModelConfig


class StaticKVCache:
    """Per-layer (B, Hkv, max_len, D) buffers filled left to right; every row shares one length.

    Allocating once avoids a torch.cat per layer per token, which dominates decode time for small
    models on CPU.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 num_layers: int | None = None):
        shape = (batch_size, config.kv_heads, max_len, config.dim_per_head)
        num_layers = num_layers or config.num_layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
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


class EncoderDecoderCache:
    """Decoding state of an encoder-decoder model: the decoder's self-attention cache, plus the
    encoder's per-layer cross-attention keys/values and padding mask, set once by the first forward
    (which encodes the input) and reused by every later step.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.self_attn = StaticKVCache(config, batch_size, max_len, device, dtype, num_layers=config.decoder_layers)
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.memory_mask: torch.Tensor | None = None  # (B, 1, 1, S_enc) bool, None = no encoder padding

    @property
    def length(self) -> int:
        return self.self_attn.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.self_attn.update(layer, k, v)

    def advance(self, num_tokens: int) -> None:
        self.self_attn.advance(num_tokens)

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in `keep` (decoder cache, encoder keys/values and mask alike)."""
        self.self_attn.reorder(keep)
        if self.memory_kv is not None:
            self.memory_kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, keep)
