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

from ...compress.quantize import QuantizedLinear, requantize_


class AdapterModule(nn.Module):
    """Marker base for every module this package adds; `disabled` turns its effect off."""

    disabled: bool = False

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this module, parameter) of the trained adapter tensors."""
        return self.named_parameters()


class AdaptedLinear(AdapterModule):
    """An `nn.Linear` (or a frozen quantized linear: QLoRA) plus an adapter; subclasses add the
    adapter and its merge arithmetic.

    A quantized base is kept whole as the child `base_layer`, and state-dict hooks drop that name, so
    its keys (`<name>.qweight`, `<name>.scales`, ...) stay those of the unwrapped model too. Merging
    into it dequantizes, runs the subclass's float merge arithmetic and requantizes (round to nearest,
    the base's own method and group size); unmerge restores the saved quantized tensors exactly.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False
        self.disabled = False
        if isinstance(base, QuantizedLinear):
            self.base_layer = base
            self.weight = self.bias = None  # set only while merge arithmetic runs on a float copy
            self._register_state_dict_hook(_drop_base_layer_prefix)
            self.register_load_state_dict_pre_hook(_add_base_layer_prefix)
            return
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or a quantized linear, got {type(base).__name__}")
        self.weight = base.weight  # the same Parameter: tied weights and optimizer state survive
        self.bias = base.bias

    @property
    def quantized(self) -> bool:
        return "base_layer" in self._modules

    def adapter_factory(self) -> dict:
        """Device and dtype for new adapter tensors: the base weight's (float32 over a quantized base)."""
        if self.quantized:
            return {"device": self.base_layer.scales.device, "dtype": torch.float32}
        return adapter_factory_kwargs(self.weight)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if n not in ("weight", "bias"))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return self.base_layer(x)
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
                self._merge_quantized() if self.quantized else self._merge()
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` arithmetically: the original weights come back to float rounding (a quantized
        base gets its saved tensors back exactly)."""
        if self.merged:
            with torch.no_grad():
                if self.quantized:
                    self.base_layer.load_state_dict(self._unmerged_base)
                    del self._unmerged_base
                else:
                    self._unmerge()
            self.merged = False

    def _merge_quantized(self) -> None:
        """Dequantize → the subclass's float merge → requantize."""
        base = self.base_layer
        self._unmerged_base = {k: v.clone() for k, v in base.state_dict().items()}
        self.weight = base.dequantize_weight().float()
        self.bias = None if base.bias is None else base.bias.float().clone()
        try:
            self._merge()
            requantize_(base, self.weight, self.bias)
        finally:
            self.weight = self.bias = None

    def _merge(self) -> None:
        raise NotImplementedError

    def _unmerge(self) -> None:
        raise NotImplementedError

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear sharing this module's weight and bias (built on meta: nothing allocated);
        the quantized base itself when there is one."""
        if self.quantized:
            return self.base_layer
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def _drop_base_layer_prefix(module, state_dict, prefix, local_metadata) -> None:
    """`<name>.base_layer.qweight` → `<name>.qweight`: a wrapped quantized base keeps its keys."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_base_layer_prefix(module, state_dict, prefix, *args) -> None:
    """The inverse, before loading: the base's keys go to the `base_layer` child."""
    base_keys = {prefix + k: prefix + "base_layer." + k for k in module.base_layer.state_dict()}
    for key, inner in base_keys.items():
        if key in state_dict:
            state_dict[inner] = state_dict.pop(key)


def adapter_factory_kwargs(weight: torch.Tensor) -> dict:
    """New adapter tensors live where the base weight lives, in its dtype if that is a float type."""
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}
