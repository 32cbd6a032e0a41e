"""Measure a compressed model against the model it started from: quality, size, memory, speed.

    evalset = lm_eval_set(tokenizer)                      # or classifier_eval_set(tokenizer, records, labels)
    start = measure(model, evalset, "fp32")
    small = measure(quantized, evalset, "int8", path="runs/int8")
    print(markdown_table([start, small]))                 # ratios against the first row, Pareto marks
    plot_tradeoffs([start, small], "runs/report")         # quality-vs-size and quality-vs-speed PNGs

Quality: accuracy and macro-F1 on the test split (classifiers); perplexity on a fixed held-out
text (causal LMs). Size: bytes of the saved weights (`path` given) or of the in-memory tensors.
Parameters: logical weights (a quantized Linear counts in × out) and how many are nonzero. Speed:
examples/s (classifiers) or decode tokens/s (LMs, after the prompt) at each batch size, with the
latency per batch / per decode step. Peak memory: the model's tensors plus the largest growth of
resident memory during the speed runs (CUDA: peak allocated bytes).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..generation import GenerationConfig, iter_tokens
from ..train.objectives import Objective, causal_lm, sequence_classification
from .batches import classification_batches, classification_features, lm_batches, lm_blocks, pad_id_of
from .heldout import heldout_text
from .quantize import QuantizedLinear, model_size_bytes, release_freed_heap

KINDS = ("classifier", "lm")
# Main quality metric per kind and whether higher is better.
MAIN_METRIC = {"classifier": ("macro_f1", True), "lm": ("perplexity", False)}
SPEED_PROMPTS = (
    "The history of the printing press begins", "Write a short note about the sea.",
    "Explain how a bicycle works:", "A list of healthy breakfast ideas:",
    "The three most important ideas in economics are", "Once upon a time, in a village by a forest,",
    "Translate to French: the weather is nice today.", "def fibonacci(n):",
)


# --------------------------------------------------------------------------------------------------
# What to measure on
# --------------------------------------------------------------------------------------------------
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
    features = classification_features(records, tokenizer, labels, max_length)
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


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
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
    device = _device_of(model)
    batches = ({k: v.to(device) for k, v in b.items()} for b in evalset.batches)
    metrics = evalset.objective.evaluate(model, batches)
    keep = ("accuracy", "macro_f1", "loss") if evalset.kind == "classifier" else ("perplexity", "loss", "tokens")
    return {k: float(metrics[k]) for k in keep}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(logical weights, nonzero weights); a quantized Linear counts in × out (+ bias) weights."""
    seen: set[int] = set()
    total = nonzero = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            weight = module.dequantize_weight()
            total += weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            nonzero += int((weight != 0).sum()) + (int((module.bias != 0).sum()) if module.bias is not None else 0)
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                nonzero += int((p != 0).sum())
    return total, nonzero


def size_on_disk(model: nn.Module, path: str | Path | None = None) -> int:
    """Bytes of the saved weight files in `path` (a folder or file), else of the model's tensors."""
    if path is None:
        return model_size_bytes(model)
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    return sum(f.stat().st_size for f in files)


# --------------------------------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _speed_with_memory(model, evalset: EvalSet, settings: MeasureSettings) -> tuple[dict[str, float], int]:
    device = _device_of(model)
    tracker = MemoryTracker(device)
    run = _classifier_speed if evalset.kind == "classifier" else _lm_speed
    speed: dict[str, float] = {}
    with tracker:
        for batch in settings.batch_sizes:
            speed.update(run(model, evalset, batch, settings))
    return speed, tracker.growth_bytes


def _rows(inputs: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """`batch` inputs, cycling through the available ones."""
    return [list(inputs[i % len(inputs)]) for i in range(batch)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _classifier_speed(model, evalset: EvalSet, batch: int, settings: MeasureSettings) -> dict[str, float]:
    from ..data import collate_padded

    device = _device_of(model)
    inputs = collate_padded([{"input_ids": r} for r in _rows(evalset.speed_inputs, batch)], evalset.pad_id)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model(**inputs)  # warm-up: kernel packing, allocator
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(settings.repeats):
        model(**inputs)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / settings.repeats
    return {f"b{batch}_latency_ms": seconds * 1e3, f"b{batch}_per_s": batch / seconds}


def _lm_speed(model, evalset: EvalSet, batch: int, settings: MeasureSettings) -> dict[str, float]:
    """Decode tokens/s after the prompt (prefill excluded) and milliseconds per decode step."""
    prompts = _rows(evalset.speed_inputs, batch)
    device = _device_of(model)
    for _ in iter_tokens(model, prompts, GenerationConfig(max_new_tokens=2), evalset.pad_id):
        pass  # warm-up
    config = GenerationConfig(max_new_tokens=settings.new_tokens)
    stamps = []
    for _ in iter_tokens(model, prompts, config, evalset.pad_id):
        _synchronize(device)
        stamps.append(time.perf_counter())
    steps = len(stamps) - 1
    seconds = stamps[-1] - stamps[0]
    return {f"b{batch}_latency_ms": seconds / steps * 1e3, f"b{batch}_per_s": batch * steps / seconds}


class MemoryTracker:
    """Largest growth of memory use inside the `with` block: peak allocated bytes on CUDA; on Linux
    CPUs the resident-set high-water mark, reset on entry through /proc/self/clear_refs."""

    def __init__(self, device: torch.device):
        self.device, self.growth_bytes, self._before = device, 0, 0

    def __enter__(self) -> MemoryTracker:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            self._before = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_bytes("VmHWM")
        self.growth_bytes = max(0, peak - self._before)


def _reset_peak_rss() -> bool:
    release_freed_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _rss_bytes(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------------
# Comparison, Pareto front, table, plots
# --------------------------------------------------------------------------------------------------
def compare(m: Measurement, start: Measurement) -> dict[str, float]:
    """Ratios and deltas against the start model (quality deltas in metric units)."""
    out = {f"{k}_delta": m.quality[k] - start.quality[k] for k in m.quality if k in start.quality}
    if "perplexity" in m.quality and "perplexity" in start.quality:
        out["perplexity_ratio"] = _ratio(m.quality["perplexity"], start.quality["perplexity"])
    out.update(parameters_ratio=_ratio(m.parameters, start.parameters), size_ratio=_ratio(m.size_bytes, start.size_bytes),
               peak_memory_ratio=_ratio(m.peak_memory_mb, start.peak_memory_mb))
    for key, value in m.speed.items():
        if key.endswith("_per_s") and key in start.speed:
            out[f"{key.removesuffix('_per_s')}_speedup"] = _ratio(value, start.speed[key])
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _costs(m: Measurement) -> tuple[float, ...]:
    """Lower is better for each: (-quality or perplexity, size, -speed at the largest batch)."""
    metric, higher = MAIN_METRIC[m.kind]
    quality = -m.quality[metric] if higher else m.quality[metric]
    batches = sorted(int(k[1:].split("_")[0]) for k in m.speed if k.endswith("_per_s"))
    speed = -m.per_s(batches[-1]) if batches else 0.0
    return quality, float(m.size_bytes), speed


def pareto_front(measurements: Sequence[Measurement]) -> list[bool]:
    """True for each measurement no other one beats on quality, size and speed at once."""
    costs = [_costs(m) for m in measurements]

    def dominated(i: int) -> bool:
        return any(all(o <= c for o, c in zip(other, costs[i])) and other != costs[i]
                   for j, other in enumerate(costs) if j != i)

    return [not dominated(i) for i in range(len(costs))]


def markdown_table(measurements: Sequence[Measurement], start: Measurement | None = None) -> str:
    """One row per model, ratios against `start` (default: the first row), Pareto-optimal rows marked."""
    if not measurements:
        raise ValueError("markdown_table needs at least one measurement")
    start = start or measurements[0]
    batches = sorted({int(k[1:].split("_")[0]) for m in measurements for k in m.speed if k.endswith("_per_s")})
    columns = _columns(start.kind, batches)
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for m, optimal in zip(measurements, pareto_front(measurements)):
        cells = [render(m, start) for _, render in columns]
        cells[-1] = "✓" if optimal else ""
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


Column = tuple[str, Callable[[Measurement, Measurement], str]]


def _columns(kind: str, batches: list[int]) -> list[Column]:
    unit = "ex/s" if kind == "classifier" else "tok/s"
    quality: list[Column] = (
        [("accuracy", lambda m, s: _num(m.quality.get("accuracy"), 4)),
         ("macro-F1", lambda m, s: _num(m.quality.get("macro_f1"), 4)),
         ("Δ F1 (pts)", lambda m, s: _num(100 * (m.quality["macro_f1"] - s.quality["macro_f1"]), 2, sign=True)
          if "macro_f1" in m.quality and "macro_f1" in s.quality else "")]
        if kind == "classifier" else
        [("perplexity", lambda m, s: _num(m.quality.get("perplexity"), 2)),
         ("ppl ×", lambda m, s: _num(_ratio(m.quality["perplexity"], s.quality["perplexity"]), 3)
          if "perplexity" in m.quality and "perplexity" in s.quality else "")])
    sizes: list[Column] = [
        ("params (M)", lambda m, s: f"{m.parameters / 1e6:.1f}"),
        ("nonzero", lambda m, s: f"{m.nonzero_parameters / max(m.parameters, 1):.0%}"),
        ("size MB", lambda m, s: f"{m.size_bytes / 2**20:.1f}"),
        ("size ×", lambda m, s: _num(_ratio(m.size_bytes, s.size_bytes), 2)),
        ("peak MB", lambda m, s: _num(m.peak_memory_mb, 0)),
    ]
    speed: list[Column] = []
    for b in batches:
        speed += [(f"b{b} {unit}", lambda m, s, b=b: _num(m.per_s(b), 1)),
                  (f"b{b} ×", lambda m, s, b=b: _num(_ratio(m.per_s(b), s.per_s(b)), 2))]
    return [("model", lambda m, s: m.name), *quality, *sizes, *speed, ("Pareto", lambda m, s: "")]


def _num(value: float | None, digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def plot_tradeoffs(measurements: Sequence[Measurement], out_dir: str | Path, title: str = "") -> list[Path]:
    """quality_vs_size.png and quality_vs_speed.png (largest batch size) in `out_dir`; Pareto points
    are filled, the others hollow."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, _ = MAIN_METRIC[measurements[0].kind]
    optimal = pareto_front(measurements)
    batch = max((int(k[1:].split("_")[0]) for m in measurements for k in m.speed if k.endswith("_per_s")),
                default=None)
    axes = [("size", "size on disk (MB)", lambda m: m.size_bytes / 2**20)]
    if batch is not None:
        unit = "examples/s" if measurements[0].kind == "classifier" else "decode tokens/s"
        axes.append(("speed", f"{unit} at batch {batch}", lambda m: m.per_s(batch)))
    paths = []
    for name, label, x_of in axes:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m, best in zip(measurements, optimal):
            x, y = x_of(m), m.quality.get(metric, float("nan"))
            if math.isnan(x) or math.isnan(y):  # e.g. a quality-only row has no speed
                continue
            ax.scatter([x], [y], s=50, color="C0", facecolors="C0" if best else "none")
            ax.annotate(m.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(metric + (" (log scale, lower is better)" if metric == "perplexity" else ""))
        if metric == "perplexity":
            ax.set_yscale("log")  # pruning can multiply perplexity; a linear axis hides the small gaps
        ax.set_title(title or f"{metric} vs {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"quality_vs_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
