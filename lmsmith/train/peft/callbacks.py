"""The small interface through which a PEFT method takes part in the training loop."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainingCallback(Protocol):
    """What the training loop calls; AdaLoRA needs both hooks, most methods neither.

    Per optimizer step the loop does::

        loss = objective(model, batch) + sum(l for cb in callbacks if (l := cb.extra_loss(model)) is not None)
        loss.backward(); optimizer.step()
        for cb in callbacks: cb.on_step_end(step, model)   # gradients must still be there
        optimizer.zero_grad()
    """

    def on_step_end(self, step: int, model: nn.Module) -> None:
        """After `optimizer.step()`, before `zero_grad()`; `step` is the 0-based optimizer step index."""
        ...

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A regularisation term to add to this step's loss, or None."""
        ...
