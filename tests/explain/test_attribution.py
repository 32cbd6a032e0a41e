"""The attribution math on functions whose answers are known in closed form."""
from __future__ import annotations

import pytest
import torch

from lmsmith.explain.attribution import (
    completeness_gap,
    gradient_x_input,
    integrated_gradients,
    integration_points,
    occlusion,
)

torch.manual_seed(0)
X = torch.randn(5, 3, dtype=torch.float64)
W = torch.randn(5, 3, dtype=torch.float64)


def linear(e: torch.Tensor) -> torch.Tensor:  # (N, T, H) → (N,)
    return (e * W).sum((1, 2))


def quadratic(e: torch.Tensor) -> torch.Tensor:
    return (e ** 2).sum((1, 2))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann-trapezoid"])
def test_integration_points_are_a_quadrature_on_the_unit_interval(method):
    alphas, weights = integration_points(8, method)
    assert alphas.min() >= 0 and alphas.max() <= 1
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights * alphas ** 2).sum().item() == pytest.approx(1 / 3, abs=5e-3)  # ∫ α² dα


def test_integration_points_reject_bad_arguments():
    with pytest.raises(ValueError, match="n_steps"):
        integration_points(0)
    with pytest.raises(ValueError, match="gausslegendre"):
        integration_points(4, "simpson")
    with pytest.raises(ValueError, match="n_steps >= 2"):
        integration_points(1, "riemann-trapezoid")


def test_gradient_x_input_of_a_linear_function_is_weight_times_input():
    expected = (W * X).sum(-1)
    assert torch.allclose(gradient_x_input(linear, X).double(), expected, atol=1e-6)


def test_integrated_gradients_of_a_quadratic_is_exact():
    # f = Σ x², baseline b: IG_t = Σ_h (x − b)·∫ 2(b + α(x − b)) dα = Σ_h (x² − b²)
    baseline = torch.full_like(X, 0.5)
    attrs = integrated_gradients(quadratic, X, baseline, n_steps=4, batch_size=3)
    assert torch.allclose(attrs.double(), (X ** 2 - baseline ** 2).sum(-1), atol=1e-5)
    gap = completeness_gap(attrs, quadratic(X[None]).item(), quadratic(baseline[None]).item())
    assert gap < 1e-5


def test_integrated_gradients_gap_shrinks_with_more_steps():
    def cubic(e):
        return (e ** 3).sum((1, 2)) + torch.sin(3 * e).sum((1, 2))
    baseline = torch.zeros_like(X)
    f_x, f_b = cubic(X[None]).item(), cubic(baseline[None]).item()
    gaps = [completeness_gap(integrated_gradients(cubic, X, baseline, n, 8, "riemann-trapezoid"), f_x, f_b)
            for n in (3, 30)]
    assert gaps[1] < gaps[0] / 10


def test_occlusion_is_the_score_drop_when_one_position_takes_the_baseline():
    baseline = torch.randn_like(X)
    scores = occlusion(linear, X, baseline, positions=[0, 2, 3], batch_size=2)
    expected = (W * (X - baseline)).sum(-1)
    assert torch.allclose(scores.double()[[0, 2, 3]], expected[[0, 2, 3]], atol=1e-5)
    assert scores[1] == 0 and scores[4] == 0  # not occluded


def test_completeness_gap_is_the_absolute_mismatch():
    assert completeness_gap(torch.tensor([1.0, 2.0]), 5.0, 1.0) == pytest.approx(1.0)
    assert completeness_gap(torch.tensor([3.0, 2.0]), 5.0, 1.0) == pytest.approx(1.0)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        integrated_gradients(linear, X, torch.zeros_like(X), n_steps=4, batch_size=0)
