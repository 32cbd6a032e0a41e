"""Adversarial training as an objective wrapper: FGM (one step) or PGD (k steps) on the token embeddings.

    objective = AdversarialObjective(sequence_classification(labels), AdversarialSettings("fgm", epsilon=1.0))
    loss, metrics = objective(model, batch)   # clean loss + weight · loss at the perturbed embeddings

The training loop stays the same: it calls the objective and back-propagates the loss it returns.
Inside, the clean pass runs with a zero offset on the token-embedding output; its gradient r gives
the perturbation ε·r/‖r‖ (per example, FGM; Miyato et al. 2017), or PGD's k ascent steps of size
`alpha` projected onto the ε-ball (Madry et al. 2018). The perturbed pass adds it through a forward
hook that is removed before returning, so no perturbation lingers in the model or its weights.
The perturbation itself is a constant for the weight update (it is computed without a graph).
Under DDP the clean pass runs through the wrapper and the extra passes through the wrapped module,
so the loop's single backward reduces each gradient once (2 gloo processes match 1 in the tests).

Recipe: `train.adversarial: {method: fgm, epsilon: 1.0}` (or `{method: pgd, epsilon: 1.0, steps: 3}`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .embedding import embedding_offset, per_example_unit, unwrapped, zero_offset

ADVERSARIAL_METHODS = ("fgm", "pgd")


@dataclass(frozen=True)
class AdversarialSettings:
    """The recipe's `train.adversarial` section."""

    method: str = "fgm"
    epsilon: float = 1.0  # L2 radius of the perturbation, per example, over (T, H)
    steps: int = 3  # PGD ascent steps
    alpha: float | None = None  # PGD step size; default 1.5 · epsilon / steps
    weight: float = 1.0  # loss = clean + weight · adversarial

    def __post_init__(self) -> None:
        if self.method not in ADVERSARIAL_METHODS:
            raise ValueError(f"train.adversarial.method={self.method!r} is not one of {ADVERSARIAL_METHODS}")
        if self.epsilon <= 0 or self.steps < 1 or self.weight < 0 or (self.alpha is not None and self.alpha <= 0):
            raise ValueError(f"train.adversarial needs epsilon > 0, steps >= 1, weight >= 0, alpha > 0; got "
                             f"epsilon={self.epsilon}, steps={self.steps}, weight={self.weight}, alpha={self.alpha}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 1.5 * self.epsilon / self.steps


class AdversarialObjective:
    """Wraps any objective whose model has `embed.tokens` (lmsmith's Transformer): same num_targets and
    evaluate (validation is clean), training loss = clean + weight · adversarial."""

    def __init__(self, inner, settings: AdversarialSettings = AdversarialSettings()):
        self.inner, self.settings = inner, settings
        self.name = f"{inner.name}+{settings.method}"

    def num_targets(self, batch) -> int:
        return self.inner.num_targets(batch)

    def evaluate(self, model: nn.Module, batches: Iterable) -> dict[str, float]:
        return self.inner.evaluate(model, batches)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        offset = zero_offset(model, batch["input_ids"])
        with embedding_offset(model, offset):
            clean, metrics = self.inner(model, batch)
        (grad,) = torch.autograd.grad(clean, offset, retain_graph=True)
        # Extra passes skip a DDP wrapper: its forward would expect a second backward. Parameters are
        # shared, so the loop's one backward still reduces every gradient exactly once.
        module = unwrapped(model)
        delta = self._perturbation(module, batch, grad)
        with embedding_offset(module, delta):
            adversarial, _ = self.inner(module, batch)
        loss = clean + self.settings.weight * adversarial
        return loss, {**metrics, "loss": float(loss.detach()), "clean_loss": float(clean.detach()),
                      "adversarial_loss": float(adversarial.detach())}

    def _perturbation(self, model: nn.Module, batch, grad: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.method == "fgm":
            return (s.epsilon * per_example_unit(grad)).detach()
        delta = s.step_size * per_example_unit(grad)  # PGD: first ascent step from the clean gradient
        for _ in range(s.steps - 1):
            delta = project(delta.detach(), s.epsilon).requires_grad_(True)
            with embedding_offset(model, delta):
                loss, _ = self.inner(model, batch)
            (step,) = torch.autograd.grad(loss, delta)
            delta = delta + s.step_size * per_example_unit(step)
        return project(delta.detach(), s.epsilon)


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale each example's perturbation back onto the L2 ball of radius epsilon (over (T, H))."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    factor = (epsilon / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))
