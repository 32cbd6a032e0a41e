"""LoRA, rsLoRA and DoRA on a linear layer, numerically as peft computes them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdaptedLinear
from .config import LoraConfig


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (keeps update size steady as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of W + ΔW: (out, in) → (out,)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)


class LoRALinear(AdaptedLinear):
    """y = W x + b + s · B A dropout(x); with DoRA the direction W + sBA is renormalised to magnitude m.

    State keys: `weight`, `bias` (unchanged), `lora_A.weight` (r, in), `lora_B.weight` (out, r) and, with
    DoRA, `lora_magnitude_vector` (out,) — the same names peft writes in adapter_model.safetensors.
    """

    def __init__(self, base: nn.Module, config: LoraConfig, r: int | None = None, alpha: float | None = None):
        super().__init__(base)
        self.config = config
        self.r = config.r if r is None else r
        self.lora_alpha = config.lora_alpha if alpha is None else alpha
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")
        if config.use_dora and self.quantized:
            raise ValueError("DoRA needs the float base weight for its norm; over a quantized base use plain "
                             "LoRA (QLoRA), or quantize after merging")
        self.scaling = lora_scaling(self.lora_alpha, self.r, config.use_rslora)
        factory = self.adapter_factory()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.use_dora = config.use_dora
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """A like nn.Linear's default (Kaiming-uniform, a=√5), B = 0: the layer starts as the base layer."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:  # m = ‖W‖ per row, so m/‖W + sBA‖ = 1 at the start
            with torch.no_grad():
                norm = dora_weight_norm(self.weight, self.delta_weight())
            self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """s · B A: (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        dropped = self.training and not isinstance(self.lora_dropout, nn.Identity)
        h = self.lora_dropout(x) if dropped else x
        lora = self.lora_B(self.lora_A(h.to(self.lora_A.weight.dtype))) * self.scaling
        if not self.use_dora:
            return result + lora.to(result.dtype)
        return result + self._dora_correction(h, dropped, result, lora).to(result.dtype)

    def _dora_correction(self, h, dropped: bool, result, lora) -> torch.Tensor:
        """(m/‖W+ΔW‖ − 1)·W h + (m/‖W+ΔW‖)·s B A h, added to W x + b (peft's DoRA forward).

        The norm is detached, as the DoRA paper (section 4.3) recommends: it follows ΔW, gets no gradient.
        """
        weight = self.weight.to(lora.dtype)
        norm = dora_weight_norm(weight, self.delta_weight().detach()).detach()
        scale = self.lora_magnitude_vector / norm  # (out,)
        if dropped:
            base = F.linear(h, self.weight)
        else:  # W x is the base result minus its bias: no second matmul
            base = result - self.bias if self.bias is not None else result
        return (scale - 1) * base.to(lora.dtype) + scale * lora

    def _merge(self) -> None:
        delta = self.delta_weight().to(self.weight.dtype)
        if not self.use_dora:
            self.weight += delta
            return
        norm = dora_weight_norm(self.weight, delta)
        self._merged_norm = norm  # unmerge needs the norm of the *original* weight
        factor = (self.lora_magnitude_vector / norm).to(self.weight.dtype).view(-1, 1)
        self.weight.copy_(factor * (self.weight + delta))

    def _unmerge(self) -> None:
        delta = self.delta_weight().to(self.weight.dtype)
        if self.use_dora:
            factor = (self.lora_magnitude_vector / self._merged_norm).to(self.weight.dtype).view(-1, 1)
            self.weight.copy_(self.weight / factor)
            del self._merged_norm
        self.weight -= delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.lora_alpha}, dora={self.use_dora}"
