"""Sampling as pure functions over logits (B, V): each takes per-row settings as (B,) tensors.

Order follows the common convention (and transformers'): repetition penalty, temperature, top-k,
top-p, min-p, then draw. A row with temperature 0 is greedy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingSettings:
    """Per-row sampling settings as tensors, built once per batch."""

    temperature: torch.Tensor  # (B,) 0 = greedy
    top_k: torch.Tensor  # (B,) 0 = off
    top_p: torch.Tensor  # (B,) 1 = off
    min_p: torch.Tensor  # (B,) 0 = off
    repetition_penalty: torch.Tensor  # (B,) 1 = off

    @classmethod
    def from_rows(cls, rows: list, device=None) -> SamplingSettings:
        """rows: objects with temperature/top_k/top_p/min_p/repetition_penalty attributes."""
        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)
        return cls(col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"), col("repetition_penalty"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: seen tokens' positive logits are divided by the penalty, negative ones multiplied.

    seen: (B, V) bool, True where the token already occurs in the row's prompt or output.
    """
    p = penalty.view(-1, 1).to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    t = temperature.view(-1, 1).to(logits.dtype)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    k = torch.where(k > 0, k.clamp(max=V), torch.full_like(k, V))
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).view(-1, 1))  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p.view(-1, 1).to(probs.dtype)
    drop_sorted[:, 0] = False  # always keep the best token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p × the top token's probability."""
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p.view(-1, 1).to(probs.dtype)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, s: SamplingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All filters in order; rows whose setting is 'off' are left untouched by that filter."""
    logits = logits.float()
    if seen is not None and bool((s.repetition_penalty != 1).any()):
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    logits = apply_temperature(logits, s.temperature)
    if bool((s.top_k > 0).any()):
        logits = top_k_filter(logits, s.top_k)
    if bool((s.top_p < 1).any()):
        logits = top_p_filter(logits, s.top_p)
    if bool((s.min_p > 0).any()):
        logits = min_p_filter(logits, s.min_p)
    return logits


def sample(logits: torch.Tensor, s: SamplingSettings, generators: list[torch.Generator | None],
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row (B,). Each row draws from its own generator, so a seeded request gives
    the same tokens whether it runs alone or batched with others."""
    if seen is not None and bool((s.repetition_penalty != 1).any()):
        logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)  # greedy rows too
        seen = None
    greedy = logits.argmax(-1)
    if not bool((s.temperature > 0).any()):
        return greedy
    probs = process_logits(logits, s, seen).softmax(-1)
    out = greedy.clone()
    for row in torch.nonzero(s.temperature > 0).flatten().tolist():
        out[row] = torch.multinomial(probs[row], 1, generator=generators[row])[0]
    return out


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
