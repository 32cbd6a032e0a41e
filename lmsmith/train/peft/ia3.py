"""(IA)^3: a learned vector rescales a linear layer's activations (Liu et al., 2022)."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdaptedLinear
from .config import IA3Config


class IA3Linear(AdaptedLinear):
    """Non-feed-forward targets: y = (W x + b) ⊙ l, l of shape (out, 1).
    Feed-forward targets: y = W (x ⊙ l) + b, l of shape (1, in).

    The vector is stored as `ia3_l` with peft's shapes, starting at ones (the layer starts unchanged).
    """

    def __init__(self, base: nn.Linear, config: IA3Config, is_feedforward: bool):
        super().__init__(base)
        self.config = config
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **self.adapter_factory()))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_forward((x * scale).to(x.dtype))
        result = self.base_forward(x)
        return (result * scale).to(result.dtype)

    def _merge(self) -> None:
        self.weight.mul_(self.ia3_l.to(self.weight.dtype))  # (out,1) scales rows, (1,in) columns
        if not self.is_feedforward and self.bias is not None:
            self.bias.mul_(self.ia3_l.flatten().to(self.bias.dtype))

    def _unmerge(self) -> None:
        if bool((self.ia3_l == 0).any()):
            raise ValueError(
                "cannot unmerge (IA)^3: its scaling vector contains zeros, the merge lost the weights"
            )
        self.weight.div_(self.ia3_l.to(self.weight.dtype))
        if not self.is_feedforward and self.bias is not None:
            self.bias.div_(self.ia3_l.flatten().to(self.bias.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"
