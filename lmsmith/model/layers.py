"""Norms, MLPs and embeddings: the small modules every block is built from."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .ops import ACTIVATION_FNS, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated (SwiGLU), else down(act(up(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATION_FNS[config.activation]
        # None rather than Dropout(0): decoding calls the MLP ~30 times per token
        self.dropout = nn.Dropout(config.mlp_dropout) if config.mlp_dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h if self.dropout is None else self.dropout(h))


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: `Transformer` initialises every embedding itself, and on the
    meta device (checkpoint loading) nn.Embedding's own normal_ init imports torch._dynamo (~1.4 s)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class Embeddings(nn.Module):
    """Token (+ learned position) (+ token type) embeddings, optionally normalised (BERT)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = embedding(config.vocab_size, config.hidden_size)
        learned = config.position == "learned"
        self.positions = embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        types = config.type_vocab_size
        self.token_types = embedding(types, config.hidden_size) if types else None
        self.norm = make_norm(config) if config.embed_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, position_ids, token_type_ids=None) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(position_ids)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
