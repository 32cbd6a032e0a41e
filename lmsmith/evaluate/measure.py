"""One row of numbers for a model on an evaluation set: quality, parameters, size, peak memory and
speed at a few batch sizes. The compression pipeline compares such rows (`lmsmith.compress.report`).

    evalset = lm_eval_set(tokenizer)                      # or classifier_eval_set(tokenizer, records, labels)
    row = measure(model, evalset, "fp32")

Quality: accuracy and macro-F1 (classifiers); perplexity on a fixed held-out text (causal LMs).
Size: bytes of the saved weights (`path` given) or of the in-memory tensors. Parameters: logical
weights (a quantized Linear counts in × out) and how many are nonzero. Speed: examples/s
(classifiers) or decode tokens/s (LMs, after the prompt) at each batch size, with the latency per
batch / per decode step. Peak memory: the model's tensors plus the largest growth of memory use
during the speed runs (CUDA: peak allocated bytes).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import collate_padded, encode_classification
from ..train.objectives import Objective, causal_lm, sequence_classification
from .batches import classification_batches, lm_batches, lm_blocks, pad_id_of
from .heldout import heldout_text
from .memory import MemoryTracker, count_parameters, model_size_bytes, size_on_disk
from .speed import cycled_rows, device_of, time_decode, time_forwards

KINDS = ("classifier", "lm")
# Main quality metric per kind and whether higher is better.
MAIN_METRIC = {"classifier": ("macro_f1", True), "lm": ("perplexity", False)}
SPEED_PROMPTS = (
    "The history of the printing press begins", "Write a short note about the sea.",
    "Explain how a bicycle works:", "A list of healthy breakfast ideas:",
    "The three most important ideas in economics are", "Once upon a time, in a village by a forest,",
    "Translate to French: the weather is nice today.", "def fibonacci(n):",
)


@dataclass(frozen=True)
class EvalSet:
    """Quality batches, the objective that scores them, and inputs for the speed runs."""

    kind: str  # "classifier" or "lm"
    batches: tuple[dict, ...]
    objective: Objective
    speed_inputs: tuple[tuple[int, ...], ...]  # classifier examples or LM prompts (token ids)
    pad_id: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"EvalSet kind {self.kind!r} is not one of {KINDS}")
        if not self.batches or not self.speed_inputs:
            raise ValueError("an EvalSet needs quality batches and speed inputs")


def classifier_eval_set(tokenizer, records, labels: Sequence[str], max_length: int = 128,
                        batch_size: int = 32) -> EvalSet:
    """Accuracy / macro-F1 over `records` (the test split); speed on the first 8 of them."""
    features = encode_classification(records, tokenizer, labels, max_length=max_length)
    pad = pad_id_of(tokenizer)
    speed = tuple(tuple(f["input_ids"]) for f in features[:8])
    batches = tuple(classification_batches(features, pad, batch_size))
    return EvalSet("classifier", batches, sequence_classification(labels), speed, pad)


def lm_eval_set(tokenizer, text: str | None = None, seq_len: int = 256, batch_size: int = 4,
                prompts: Sequence[str] = SPEED_PROMPTS) -> EvalSet:
    """Perplexity over `text` (default: the package's held-out paragraphs) in windows of `seq_len`."""
    blocks = lm_blocks(tokenizer, [text if text is not None else heldout_text()], seq_len)
    speed = tuple(tuple(tokenizer.encode(p)) for p in prompts)
    return EvalSet("lm", tuple(lm_batches(blocks, batch_size)), causal_lm(), speed, pad_id_of(tokenizer))


@dataclass(frozen=True)
class Measurement:
    name: str
    kind: str
    quality: dict[str, float]
    parameters: int
    nonzero_parameters: int
    size_bytes: int
    peak_memory_mb: float
    speed: dict[str, float] = field(default_factory=dict)  # "b{n}_per_s", "b{n}_latency_ms"

    @property
    def main_quality(self) -> float:
        return self.quality[MAIN_METRIC[self.kind][0]]

    def per_s(self, batch: int) -> float:
        return self.speed.get(f"b{batch}_per_s", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(**data)


@dataclass(frozen=True)
class MeasureSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 32  # decode steps per LM speed run
    repeats: int = 3  # timed classifier batches per batch size
    quality: bool = True
    speed: bool = True

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError(f"measure settings need batch sizes >= 1, new_tokens >= 2, repeats >= 1; got {self}")


def measure(model: nn.Module, evalset: EvalSet, name: str, *, path: str | Path | None = None,
            settings: MeasureSettings = MeasureSettings()) -> Measurement:
    """Quality, parameters, size, peak memory and speed of `model` (in eval mode, on its device)."""
    was_training = model.training
    model.eval()
    try:
        quality = quality_metrics(model, evalset) if settings.quality else {}
        total, nonzero = count_parameters(model)
        speed, extra_bytes = _speed_with_memory(model, evalset, settings) if settings.speed else ({}, 0)
    finally:
        model.train(was_training)
    return Measurement(name, evalset.kind, quality, total, nonzero, size_on_disk(model, path),
                       (model_size_bytes(model) + extra_bytes) / 2**20, speed)


@torch.no_grad()
def quality_metrics(model: nn.Module, evalset: EvalSet) -> dict[str, float]:
    device = device_of(model)
    batches = ({k: v.to(device) for k, v in b.items()} for b in evalset.batches)
    metrics = evalset.objective.evaluate(model, batches)
    keep = ("accuracy", "macro_f1", "loss") if evalset.kind == "classifier" else ("perplexity", "loss", "tokens")
    return {k: float(metrics[k]) for k in keep}


def _speed_with_memory(model, evalset: EvalSet, settings: MeasureSettings) -> tuple[dict[str, float], int]:
    tracker = MemoryTracker(device_of(model))
    run = _classifier_speed if evalset.kind == "classifier" else _lm_speed
    speed: dict[str, float] = {}
    with tracker:
        for batch in settings.batch_sizes:
            speed.update(run(model, evalset, batch, settings))
    return speed, tracker.growth_bytes


def _classifier_speed(model, evalset: EvalSet, batch: int, settings: MeasureSettings) -> dict[str, float]:
    rows = cycled_rows(evalset.speed_inputs, batch)
    inputs = collate_padded([{"input_ids": r} for r in rows], evalset.pad_id)
    inputs = {k: v.to(device_of(model)) for k, v in inputs.items()}
    seconds = sum(time_forwards(model, inputs, settings.repeats)) / settings.repeats
    return {f"b{batch}_latency_ms": seconds * 1e3, f"b{batch}_per_s": batch / seconds}


def _lm_speed(model, evalset: EvalSet, batch: int, settings: MeasureSettings) -> dict[str, float]:
    """Decode tokens/s after the prompt (prefill excluded) and milliseconds per decode step."""
    timing = time_decode(model, cycled_rows(evalset.speed_inputs, batch), settings.new_tokens, evalset.pad_id)
    return {f"b{batch}_latency_ms": timing.decode_ms_per_step, f"b{batch}_per_s": timing.decode_tokens_per_s}
