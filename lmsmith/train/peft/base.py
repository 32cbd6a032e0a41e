"""What every adapter module shares.

Linear adapters replace an `nn.Linear` by a module that owns the *same* `weight` and `bias` Parameters
(as torchtune's LoRALinear does), so the state-dict keys `<name>.weight` / `<name>.bias` stay as they
were and adapter tensors are extra keys next to them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class AdapterModule(nn.Module):
    """Marker base for every module this package adds; `disabled` turns its effect off."""

    disabled: bool = False

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this module, parameter) of the trained adapter tensors."""
        return self.named_parameters()


class AdaptedLinear(AdapterModule):
    """An `nn.Linear` plus an adapter; subclasses add the adapter and its merge arithmetic."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: tied weights and optimizer state survive
        self.bias = base.bias
        self.merged = False
        self.disabled = False

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if n not in ("weight", "bias"))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_forward(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the adapter into `weight`/`bias` (idempotent)."""
        if not self.merged:
            with torch.no_grad():
                self._merge()
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` arithmetically: the original weights come back to float rounding."""
        if self.merged:
            with torch.no_grad():
                self._unmerge()
            self.merged = False

    def _merge(self) -> None:
        raise NotImplementedError

    def _unmerge(self) -> None:
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's weight and bias (built on meta: nothing allocated)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def adapter_factory_kwargs(weight: torch.Tensor) -> dict:
    """New adapter tensors live where the base weight lives, in its dtype if that is a float type."""
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}
