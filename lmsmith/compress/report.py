"""Compare a compressed model with the model it started from: ratios, the Pareto front, a markdown
table and trade-off plots.

    evalset = lm_eval_set(tokenizer)                      # or classifier_eval_set(tokenizer, records, labels)
    start = measure(model, evalset, "fp32")
    small = measure(quantized, evalset, "int8", path="runs/int8")
    print(markdown_table([start, small]))                 # ratios against the first row, Pareto marks
    plot_tradeoffs([start, small], "runs/report")         # quality-vs-size and quality-vs-speed PNGs

Measuring itself (eval sets, quality, parameters, size, speed, peak memory) lives in
`lmsmith.evaluate`; its names are re-exported here so compression code and recipes import one module.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..evaluate.measure import (
    KINDS,
    MAIN_METRIC,
    SPEED_PROMPTS,
    EvalSet,
    Measurement,
    MeasureSettings,
    classifier_eval_set,
    lm_eval_set,
    measure,
    quality_metrics,
)
from ..evaluate.memory import MemoryTracker, count_parameters, size_on_disk

__all__ = [
    "KINDS", "MAIN_METRIC", "SPEED_PROMPTS", "EvalSet", "MeasureSettings", "Measurement", "MemoryTracker",
    "classifier_eval_set", "compare", "count_parameters", "lm_eval_set", "markdown_table", "measure",
    "pareto_front", "plot_tradeoffs", "quality_metrics", "size_on_disk",
]


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
