"""Multi-head / grouped-query self-attention over a KV-cache interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from .config import ModelConfig
from .ops import apply_rope, attention, attention_weights


class KVCache(Protocol):
    """What attention needs from a cache: store this step's keys/values, hand back all of them."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, D) for the new tokens → all keys/values so far (B, Hkv, S, D)."""
        ...


@dataclass
class AttentionInputs:
    """Per-forward data shared by every layer (computed once in the Transformer)."""

    cos: torch.Tensor | None  # (B, T, rotary_dim) or None without RoPE
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = no masking / plain causal
    is_causal: bool  # with mask None: use SDPA's causal fast path
    cache: KVCache | None = None
    prefix: tuple[torch.Tensor, ...] | None = None  # per layer (k, v): (B, Hkv, P, D), prefix tuning
    need_weights: bool = False


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.dim_per_head
        h, qkv_bias = config.hidden_size, config.attn_qkv_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attn_out_bias)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, inp: AttentionInputs):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if inp.cos is not None:
            q, k = apply_rope(q, inp.cos, inp.sin), apply_rope(k, inp.cos, inp.sin)
        if inp.cache is not None:
            k, v = inp.cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D)
        if inp.prefix is not None:
            pk, pv = inp.prefix[self.layer_idx]
            k, v = torch.cat((pk.to(k.dtype), k), dim=2), torch.cat((pv.to(v.dtype), v), dim=2)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, inp.mask, inp.is_causal, dropout)  # (B, H, T, D)
        weights = attention_weights(q, k, inp.mask, inp.is_causal) if inp.need_weights else None
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y), weights
