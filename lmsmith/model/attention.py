"""Multi-head / grouped-query attention over a KV-cache interface: self-attention, and cross-attention
over precomputed encoder keys/values (encoder-decoder models)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig
from .layers import embedding
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
    # (B, 1, T, S) bool, True = may attend; or an additive float bias (B|1, H|1, T, S) that already holds
    # the masking (relative positions); None = no masking / plain causal
    mask: torch.Tensor | None
    is_causal: bool  # with mask None: use SDPA's causal fast path
    cache: KVCache | None = None
    prefix: tuple[torch.Tensor, ...] | None = None  # per layer (k, v): (B, Hkv, P, D), prefix tuning
    need_weights: bool = False
    # cross-attention: per layer (k, v) of the encoder output, (B, Hkv, S_enc, D), projected once per sequence
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, relative_bias: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.dim_per_head
        h, qkv_bias = config.hidden_size, config.attn_qkv_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attn_out_bias)
        # T5: the (num_buckets, heads) relative-position table lives in layer 0; its stack turns it into
        # one score bias that every layer shares (see Transformer._stack_inputs).
        self.relative_bias = embedding(config.relative_num_buckets, self.num_heads) if relative_bias else None
        self.dropout = config.attention_dropout
        self.scale = config.attention_scale

    def forward(self, x: torch.Tensor, inp: AttentionInputs):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if inp.memory_kv is not None:  # cross-attention: the encoder's keys/values, already projected
            k, v = inp.memory_kv[self.layer_idx]
        else:
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
        y = attention(q, k, v, inp.mask, inp.is_causal, dropout, self.scale)  # (B, H, T, D)
        weights = attention_weights(q, k, inp.mask, inp.is_causal, self.scale) if inp.need_weights else None
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y), weights

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values (B, Hkv, S, D) of encoder states (B, S, hidden)."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v
