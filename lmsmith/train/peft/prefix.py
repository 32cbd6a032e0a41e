"""Prefix tuning (Li & Liang, 2021): trained key/value vectors that every attention layer attends to.

The encoder only produces tensors; the attention module consumes them. Layout contract:

* `PrefixEncoder()` → `(num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim)`;
  index 0 of dim 1 is the key, 1 the value (peft's ordering of its `past_key_values`).
* `PrefixEncoder.key_values(batch_size)` / `prefix_for(model, batch_size)` → a tuple with one
  `(key, value)` pair per layer, each `(batch, num_kv_heads, num_virtual_tokens, head_dim)`:
  the layout of `AttentionInputs.prefix`. Attention concatenates them *in front of* its keys and
  values (after RoPE: prefixes carry no position) and every query may attend to all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterModule
from .config import PrefixConfig

PREFIX_ATTRIBUTE = "prefix_encoder"  # apply_peft attaches the encoder to the model under this name


class PrefixEncoder(AdapterModule):
    """Virtual-token keys/values, trained directly or (with `encoder_hidden_size`) through an MLP."""

    def __init__(
        self,
        num_layers: int,
        num_virtual_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        encoder_hidden_size: int | None = None,
    ):
        super().__init__()
        self.num_layers, self.num_virtual_tokens = num_layers, num_virtual_tokens
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        kv_width = num_layers * 2 * num_kv_heads * head_dim
        if encoder_hidden_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_width)
            self.transform = nn.Identity()
        else:  # reparameterisation: a small embedding through an MLP, as in the paper
            token_dim = num_kv_heads * head_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(), nn.Linear(encoder_hidden_size, kv_width)
            )

    def forward(self) -> torch.Tensor:
        """→ (num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim)."""
        flat = self.transform(self.embedding.weight)  # (P, L·2·Hkv·D)
        P, L, H, D = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        return flat.view(P, L, 2, H, D).permute(1, 2, 0, 3, 4)

    def key_values(
        self, batch_size: int, dtype: torch.dtype | None = None
    ) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per layer (key, value), each (batch, num_kv_heads, num_virtual_tokens, head_dim)."""
        kv = self()  # (L, 2, P, Hkv, D)
        if dtype is not None:
            kv = kv.to(dtype)
        kv = kv.permute(0, 1, 3, 2, 4).unsqueeze(2)  # (L, 2, 1, Hkv, P, D)
        shape = (batch_size, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)
        return tuple((layer[0].expand(shape), layer[1].expand(shape)) for layer in kv)

    def extra_repr(self) -> str:
        return (
            f"layers={self.num_layers}, virtual_tokens={self.num_virtual_tokens}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )


def prefix_for(model: nn.Module, batch_size: int, dtype: torch.dtype | None = None):
    """The per-layer prefixes the model should pass to attention, or None without (or with a disabled)
    prefix encoder. The model's forward calls this once per batch."""
    encoder = getattr(model, PREFIX_ATTRIBUTE, None)
    if not isinstance(encoder, PrefixEncoder) or encoder.disabled:
        return None
    return encoder.key_values(batch_size, dtype)


def build_prefix_encoder(model: nn.Module, config: PrefixConfig) -> PrefixEncoder:
    """Sizes from the config, or else from `model.config` (num_layers, kv_heads, dim_per_head)."""
    model_config = getattr(model, "config", None)

    def size(field: str, *model_fields: str) -> int:
        value = getattr(config, field)
        for name in model_fields:
            value = value if value is not None else getattr(model_config, name, None)
        if not isinstance(value, int):
            raise ValueError(f"PrefixConfig.{field} is not set and the model's config does not provide it")
        return value

    return PrefixEncoder(
        num_layers=size("num_layers", "num_layers"),
        num_virtual_tokens=config.num_virtual_tokens,
        num_kv_heads=size("num_kv_heads", "kv_heads", "num_kv_heads"),
        head_dim=size("head_dim", "dim_per_head", "head_dim"),
        encoder_hidden_size=config.encoder_hidden_size,
    )
