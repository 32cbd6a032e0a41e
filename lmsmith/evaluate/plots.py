"""PNG figures for an evaluation: the confusion-matrix heatmap and latency against batch size."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .metrics import ClassificationMetrics
from .speed import LatencyStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: ClassificationMetrics, path: str | Path, title: str = "") -> Path:
    """Heatmap of the confusion matrix, colored by the share of each true class (row), with counts."""
    plt = _pyplot()
    labels = [str(label) for label in metrics.labels]
    rows = [[count / max(sum(row), 1) for count in row] for row in metrics.confusion]
    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(metrics.confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
                    color="white" if rows[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title + chr(10) if title else ''}accuracy {metrics.accuracy:.3f}, macro-F1 {metrics.macro_f1:.3f}",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the true class")
    return _save(fig, plt, path)


def plot_latency(stats: Sequence[LatencyStats], path: str | Path, title: str = "") -> Path:
    """p50 latency per forward against batch size (p90–p99 as error bars), throughput on a second axis."""
    plt = _pyplot()
    batches = [s.batch_size for s in stats]
    p50 = [s.p50_ms for s in stats]
    spread = [[0.0 for _ in stats], [s.p99_ms - s.p50_ms for s in stats]]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar(batches, p50, yerr=spread, marker="o", capsize=4, color="C0", label="p50 (bar to p99)")
    ax.plot(batches, [s.p90_ms for s in stats], "x", color="C0", alpha=0.6, label="p90")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per forward (ms)")
    ax.grid(alpha=0.3)
    second = ax.twinx()
    second.plot(batches, [s.throughput for s in stats], "s--", color="C1", label=f"throughput ({stats[0].unit})")
    second.set_ylabel(stats[0].unit)
    handles = ax.get_legend_handles_labels()[0] + second.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_title(title or "latency vs batch size", fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
