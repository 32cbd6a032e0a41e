"""The result of `lmsmith.evaluate.evaluate`: a frozen report with JSON, markdown and PNG outputs."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .metrics import ClassificationMetrics
from .speed import DecodeTiming, LatencyStats

MB = 2**20


@dataclass(frozen=True)
class MemoryStats:
    parameters: int  # logical weights (a quantized Linear counts in × out)
    nonzero_parameters: int
    parameter_bytes: int  # bytes of the model's tensors (state dict, tied tensors once)
    peak_rss_delta_bytes: int | None  # CPU: growth of the resident set's peak during the evaluation
    cuda_peak_allocated_bytes: int | None  # CUDA: peak bytes allocated by tensors (weights included)
    kv_cache_bytes_per_token: int | None  # causal LMs: cache bytes one more token adds (one sequence)


@dataclass(frozen=True)
class EvalReport:
    """Quality, latency and memory of one model on one evaluation set."""

    model: str
    task: str
    device: str
    dtype: str
    data: str  # what was scored (dataset, file, held-out text), "" when quality was not measured
    split: str | None
    examples: int  # examples (classifiers), sequences (masked LM) or windows (causal LM) scored
    quality: dict[str, float]  # accuracy, macro_f1, … (classifiers); perplexity, loss, tokens (LMs)
    classification: ClassificationMetrics | None  # per class and the confusion matrix (classifiers)
    latency: tuple[LatencyStats, ...]
    generation: DecodeTiming | None  # causal LMs, batch 1
    memory: MemoryStats
    notes: tuple[str, ...] = ()  # how numbers were measured where it is not obvious

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.classification is not None:  # label keys may be any hashable; JSON wants strings
            out["classification"]["per_class"] = {str(k): asdict(v) for k, v in self.classification.per_class.items()}
        return _finite(out)

    def to_json(self, indent: int = 2) -> str:
        """Strict JSON: non-finite numbers (an infinite perplexity) become null."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        sections = [_summary(self), _quality(self), _per_class(self.classification),
                    _confusion(self.classification), _latency(self.latency), _generation(self.generation),
                    _memory(self.memory), _notes(self.notes)]
        return "\n\n".join(s for s in sections if s) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """report.json, report.md, and the PNGs (confusion_matrix.png, latency.png) in `out_dir`."""
        from .plots import plot_confusion, plot_latency

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(self.to_json() + "\n")
        (out / "report.md").write_text(self.to_markdown())
        paths = [out / "report.json", out / "report.md"]
        if self.classification is not None:
            paths.append(plot_confusion(self.classification, out / "confusion_matrix.png", title=self.model))
        if self.latency:
            paths.append(plot_latency(self.latency, out / "latency.png", title=self.model))
        return paths


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats get 4 significant decimals unless already formatted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _summary(r: EvalReport) -> str:
    data = r.data + (f" ({r.split} split)" if r.split else "") if r.data else "– (quality not measured)"
    rows = [["task", r.task], ["data", data], ["examples", r.examples], ["device", f"{r.device} ({r.dtype})"]]
    return f"## Evaluation: {r.model}\n\n" + table(["", ""], rows)


def _quality(r: EvalReport) -> str:
    if not r.quality:
        return ""
    rows = [[k, int(v) if k == "tokens" else v] for k, v in r.quality.items()]
    return "### Quality\n\n" + table(["metric", "value"], rows)


def _per_class(m: ClassificationMetrics | None) -> str:
    if m is None:
        return ""
    rows = [[label, s.precision, s.recall, s.f1, s.support] for label, s in m.per_class.items()]
    return "### Per class\n\n" + table(["class", "precision", "recall", "F1", "support"], rows)


def _confusion(m: ClassificationMetrics | None) -> str:
    if m is None:
        return ""
    rows = [[label, *counts] for label, counts in zip(m.labels, m.confusion)]
    return ("### Confusion matrix (rows: true, columns: predicted)\n\n"
            + table(["true \\ predicted", *map(str, m.labels)], rows))


def _latency(stats: tuple[LatencyStats, ...]) -> str:
    if not stats:
        return ""
    rows = [[s.batch_size, s.tokens, f"{s.p50_ms:.2f}", f"{s.p90_ms:.2f}", f"{s.p99_ms:.2f}",
             f"{s.throughput:,.1f} {s.unit}"] for s in stats]
    return (f"### Latency per forward ({stats[0].repeats} timed runs after a warm-up)\n\n"
            + table(["batch", "tokens", "p50 ms", "p90 ms", "p99 ms", "throughput"], rows))


def _generation(g: DecodeTiming | None) -> str:
    if g is None:
        return ""
    rows = [[g.batch_size, g.prompt_tokens, g.new_tokens, f"{g.ttft_ms:.1f}", f"{g.decode_ms_per_step:.2f}",
             f"{g.decode_tokens_per_s:.1f}"]]
    return "### Generation (greedy)\n\n" + table(
        ["batch", "prompt tokens", "new tokens", "time to first token ms", "ms per decode step", "decode tokens/s"],
        rows)


def _memory(m: MemoryStats) -> str:
    rows = [["parameters", f"{m.parameters:,}"], ["nonzero parameters", f"{m.nonzero_parameters:,}"],
            ["parameter memory", f"{m.parameter_bytes / MB:.1f} MB"]]
    if m.peak_rss_delta_bytes is not None:
        rows.append(["peak RSS growth while evaluating", f"{m.peak_rss_delta_bytes / MB:.1f} MB"])
    if m.cuda_peak_allocated_bytes is not None:
        rows.append(["CUDA peak allocated", f"{m.cuda_peak_allocated_bytes / MB:.1f} MB"])
    if m.kv_cache_bytes_per_token is not None:
        rows.append(["KV cache per token", f"{m.kv_cache_bytes_per_token / 1024:.1f} KiB"])
    return "### Memory\n\n" + table(["", ""], rows)


def _notes(notes: tuple[str, ...]) -> str:
    return "\n".join(f"- {n}" for n in notes)
