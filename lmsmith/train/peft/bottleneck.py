"""Houlsby bottleneck adapters (Houlsby et al., 2019): h + up(act(down(h))) after a module's output.

The adapter becomes a child named `adapter` of the target module and a forward hook applies it to the
target's output, so the target can be any module (a projection, a whole attention or MLP block; for a
tuple output the first element is adapted) and its own state-dict keys do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterModule
from .config import BottleneckConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ADAPTER_CHILD = "adapter"


class BottleneckAdapter(AdapterModule):
    """Residual bottleneck: features → bottleneck_size → features; `up` starts at zero (identity map)."""

    def __init__(self, features: int, config: BottleneckConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.down = nn.Linear(features, config.bottleneck_size, device=device, dtype=dtype)
        self.activation = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(config.bottleneck_size, features, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return h
        return h + self.up(self.dropout(self.activation(self.down(h))))


def _apply_adapter_hook(module: nn.Module, args, output):
    """Forward hook: pass the module's output (or its first element) through `module.adapter`."""
    adapter = getattr(module, ADAPTER_CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def attach_bottleneck(module: nn.Module, adapter: BottleneckAdapter) -> None:
    if isinstance(getattr(module, ADAPTER_CHILD, None), nn.Module):
        raise ValueError(f"{type(module).__name__} already has a child named {ADAPTER_CHILD!r}")
    module.add_module(ADAPTER_CHILD, adapter)
    module.register_forward_hook(_apply_adapter_hook)


def detach_bottleneck(module: nn.Module) -> None:
    """Remove the adapter child and its hook (the hook is found by identity; no handle is kept, so
    deep copies of the model stay self-contained)."""
    for key, hook in list(module._forward_hooks.items()):
        if hook is _apply_adapter_hook:
            del module._forward_hooks[key]
    delattr(module, ADAPTER_CHILD)


def bottleneck_features(module: nn.Module, model: nn.Module, config: BottleneckConfig) -> int:
    """Width of the target's output: explicit, a linear layer's out_features, or the model's hidden size."""
    if config.hidden_size is not None:
        return config.hidden_size
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(
            f"cannot tell the output width of {type(module).__name__}; set BottleneckConfig.hidden_size"
        )
    return hidden
