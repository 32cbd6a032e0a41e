"""Timing a model: per-forward latency percentiles and throughput, and generation timing (time to
first token, decode tokens/s). Every timed region ends with a device synchronize, so GPU times are
the kernels' and not just their launch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..generation import GenerationConfig, iter_tokens


@dataclass(frozen=True)
class LatencyStats:
    """Per-forward latency at one batch size, over `repeats` timed forwards after a warm-up."""

    batch_size: int
    tokens: int  # tokens per forward: batch size × padded length
    repeats: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # `unit` per second at the mean latency
    unit: str  # "examples/s" or "tokens/s"


@dataclass(frozen=True)
class DecodeTiming:
    """Greedy generation from a prompt: prefill + first token, then one token per decode step."""

    batch_size: int
    prompt_tokens: int  # longest prompt in the batch
    new_tokens: int
    ttft_ms: float  # time to first token: the prompt's forward pass plus sampling one token
    decode_ms_per_step: float  # mean time of each later step (one token for every row)
    decode_tokens_per_s: float  # tokens produced per second after the first, all rows together


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as numpy's
    default method; with few samples p99 lies close to the maximum."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def time_forwards(model: nn.Module, inputs: Mapping[str, torch.Tensor], repeats: int,
                  warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` forward passes `model(**inputs)`, after `warmup` untimed ones
    (kernel packing, allocator growth and lazy initialisation happen there)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = device_of(model)
    for _ in range(warmup):
        model(**inputs)
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def latency_stats(seconds: Sequence[float], batch_size: int, tokens: int, unit: str) -> LatencyStats:
    """Percentiles of per-forward times; throughput counts examples or tokens per second."""
    if unit not in ("examples/s", "tokens/s"):
        raise ValueError(f"unit must be 'examples/s' or 'tokens/s', got {unit!r}")
    ms = [s * 1e3 for s in seconds]
    mean = sum(seconds) / len(seconds)
    work = batch_size if unit == "examples/s" else tokens
    return LatencyStats(batch_size, tokens, len(seconds), percentile(ms, 50), percentile(ms, 90),
                        percentile(ms, 99), mean * 1e3, work / mean, unit)


def time_decode(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int,
                warmup: bool = True) -> DecodeTiming:
    """Greedy generation of `new_tokens` tokens per prompt (no early stop), timed per step."""
    if new_tokens < 2:
        raise ValueError(f"timing decode needs new_tokens >= 2, got {new_tokens}")
    prompts = [list(p) for p in prompts]
    device = device_of(model)
    if warmup:
        for _ in iter_tokens(model, prompts, GenerationConfig(max_new_tokens=2), pad_id):
            pass
    synchronize(device)
    start, stamps = time.perf_counter(), []
    for _ in iter_tokens(model, prompts, GenerationConfig(max_new_tokens=new_tokens), pad_id):
        synchronize(device)
        stamps.append(time.perf_counter())
    steps, seconds = len(stamps) - 1, stamps[-1] - stamps[0]
    return DecodeTiming(len(prompts), max(map(len, prompts)), len(stamps), (stamps[0] - start) * 1e3,
                        seconds / steps * 1e3, len(prompts) * steps / seconds)


def cycled_rows(inputs: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """`batch` inputs, cycling through the available ones."""
    if not inputs:
        raise ValueError("no inputs to build a batch from")
    return [list(inputs[i % len(inputs)]) for i in range(batch)]
