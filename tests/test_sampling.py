import pytest
import torch

from lmsmith.sampling import (SamplingSettings, apply_repetition_penalty, make_generator, min_p_filter, sample,
                              top_k_filter, top_p_filter)


def settings(B=1, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0):
    full = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    return SamplingSettings(full(temperature), full(top_k, torch.long), full(top_p), full(min_p), full(rep))


def test_top_k_keeps_exactly_k_best():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, torch.tensor([2]))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [1, 3]


def test_top_k_zero_is_off_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0], [1.0, 5.0, 3.0]])
    out = top_k_filter(logits, torch.tensor([0, 1]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).sum() == 1


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs.log(), torch.tensor([0.8]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = top_p_filter(probs.log(), torch.tensor([0.81]))
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_top_p_always_keeps_best_token():
    out = top_p_filter(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([1e-6]))
    assert torch.isfinite(out).tolist() == [[True, False, False]]


def test_min_p_is_relative_to_best_probability():
    probs = torch.tensor([[0.6, 0.3, 0.08, 0.02]])
    out = min_p_filter(probs.log(), torch.tensor([0.1]))  # threshold 0.06
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_repetition_penalty_pushes_seen_tokens_down_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_when_temperature_zero():
    logits = torch.randn(3, 50)
    out = sample(logits, settings(3, temperature=0.0), [None] * 3)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_row_independent():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    a = sample(logits, settings(2), [make_generator(7), make_generator(8)])
    b = sample(logits, settings(2), [make_generator(7), make_generator(8)])
    alone = sample(logits[1:], settings(1), [make_generator(8)])
    assert a.tolist() == b.tolist()
    assert a[1] == alone[0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0]]).log_softmax(-1)  # p = (0.27, 0.73)
    g = make_generator(0)
    draws = [int(sample(logits, settings(1), [g])[0]) for _ in range(2000)]
    assert abs(sum(draws) / 2000 - 0.731) < 0.04


def test_top_k_one_with_temperature_equals_greedy():
    logits = torch.randn(4, 30)
    out = sample(logits, settings(4, temperature=1.5, top_k=1), [make_generator(i) for i in range(4)])
    assert out.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", [None, 3])
def test_make_generator_returns_usable_generator(seed):
    assert torch.rand(1, generator=make_generator(seed)).item() < 1.0
