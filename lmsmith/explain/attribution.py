"""Attribution math over a score function of token embeddings, independent of any model.

A `ScoreFn` maps a batch of embedded inputs (N, T, H) to one score per input (N,); every method
here returns one attribution per position (T,), summed over the hidden dimension.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
INTEGRATION_METHODS = ("gausslegendre", "riemann-trapezoid")


def integration_points(n_steps: int, method: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights summing to 1 for ∫₀¹ g(alpha) dalpha ≈ Σ w·g(alpha).

    Gauss-Legendre converges much faster than the trapezoid rule for the smooth paths IG integrates
    over, so it needs fewer model calls for the same completeness gap.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    elif method == "riemann-trapezoid":
        if n_steps < 2:
            raise ValueError("the trapezoid rule needs n_steps >= 2")
        alphas = np.linspace(0.0, 1.0, n_steps)
        weights = np.full(n_steps, 1.0 / (n_steps - 1))
        weights[[0, -1]] /= 2
    else:
        raise ValueError(f"unknown integration method {method!r}; choose one of {INTEGRATION_METHODS}")
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


def gradients(fn: ScoreFn, points: torch.Tensor) -> torch.Tensor:
    """d fn(points)[n] / d points[n] for every n at once (the scores of different rows are independent)."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = fn(points)
        (grad,) = torch.autograd.grad(scores.sum(), points)
    return grad


def gradient_x_input(fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """Σ_h ∂f/∂x[t,h] · x[t,h] for x: (T, H) → (T,)."""
    grad = gradients(fn, x.unsqueeze(0))[0]
    return (grad.float() * x.float()).sum(-1)


def integrated_gradients(fn: ScoreFn, x: torch.Tensor, baseline: torch.Tensor, n_steps: int = 50,
                         batch_size: int = 16, method: str = "gausslegendre",
                         progress: bool = False) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) along the straight path baseline → x, both (T, H).

    Returns (T,): (x − baseline) · ∫ ∂f/∂x(baseline + α(x − baseline)) dα, summed over H. The sum over
    positions approximates f(x) − f(baseline) (completeness); see `completeness_gap`.
    """
    alphas, weights = integration_points(n_steps, method)
    delta = (x - baseline).unsqueeze(0)
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for chunk in tqdm(list(_chunks(n_steps, batch_size)), desc="integrated gradients", unit="batch",
                      disable=not progress, leave=False):
        a = alphas[chunk].to(x.device, x.dtype).view(-1, 1, 1)
        grad = gradients(fn, baseline.unsqueeze(0) + a * delta).float()
        total += (weights[chunk].to(x.device, torch.float32).view(-1, 1, 1) * grad).sum(0)
    return (delta[0].float() * total).sum(-1)


def occlusion(fn: ScoreFn, x: torch.Tensor, baseline: torch.Tensor, positions: Sequence[int],
              batch_size: int = 16) -> torch.Tensor:
    """f(x) − f(x with position p replaced by baseline[p]) for each p in `positions`; 0 elsewhere. (T,)"""
    scores = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    positions = list(positions)
    with torch.no_grad():
        full = fn(x.unsqueeze(0)).float()[0]
        for chunk in _chunks(len(positions), batch_size):
            occluded = x.unsqueeze(0).repeat(len(chunk), 1, 1)
            at = [positions[i] for i in chunk]
            occluded[torch.arange(len(chunk)), at] = baseline[at]
            scores[at] = full - fn(occluded).float()
    return scores


def completeness_gap(attributions: torch.Tensor, score_at_input: float, score_at_baseline: float) -> float:
    """|Σ attributions − (f(x) − f(baseline))|: zero for exact integrated gradients; grows with too few steps."""
    return abs(float(attributions.double().sum()) - (score_at_input - score_at_baseline))


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {size!r}")
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))
