"""Heads that turn final hidden states into task outputs."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import make_norm
from .ops import ACTIVATION_FNS


class MaskedLMHead(nn.Module):
    """BERT's transform (dense → act → norm) then a vocabulary projection with its own bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATION_FNS[config.activation]
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.mlm_head_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class SequenceClassifier(nn.Module):
    """Pool the sequence to one vector, then project to the classes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pooling = config.classifier_pooler
        has_dense = self.pooling in ("cls_dense_tanh", "cls_dense_relu")
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if has_dense else None
        self.dropout = nn.Dropout(config.classifier_dropout)
        # Decoder-only classifiers (Llama/Qwen "score") have no bias.
        self.out = nn.Linear(config.hidden_size, config.num_labels, bias=self.pooling != "last")

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooled = pool(h, attention_mask, self.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
            pooled = torch.tanh(pooled) if self.pooling == "cls_dense_tanh" else torch.relu(pooled)
        return self.out(self.dropout(pooled))


class TokenClassifier(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.dropout(h))


def pool(h: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) → (B, H): first token, last real token, or mean over real tokens."""
    if how.startswith("cls"):
        return h[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
    m = attention_mask.to(h.dtype)
    if how == "mean":
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    # last real token: works for right padding; left padding puts it at T-1 anyway
    idx = (attention_mask.long().cumsum(-1).argmax(-1))
    return h[torch.arange(h.shape[0], device=h.device), idx]
