"""Perturbation suites: how much accuracy a classifier loses on typos, dropped words, tweet markup ….

    report = perturbation_suite(model, tokenizer, texts, labels, perturbations=["typos"], severities=(0.1, 0.3))
    print(suite_markdown(report)); save_suite_plot(report, "robustness.png")

Every text is perturbed with its own seeded generator (seed, perturbation, severity, index), so a
report is reproducible and a row does not depend on which other rows were asked for. Identical
texts are scored once (severity 0, or a perturbation with nothing to edit, costs no model call).
"""
from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..evaluate.metrics import classification_metrics
from .classify import Victim, label_ids
from .perturbations import check_severity, get_perturbation, resolve_perturbations, text_rng

DEFAULT_SEVERITIES = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class SuiteRow:
    perturbation: str
    severity: float
    accuracy: float
    macro_f1: float
    accuracy_drop: float  # clean − perturbed (positive = worse)
    macro_f1_drop: float
    flip_rate: float  # fraction of texts whose predicted class changed
    changed: float  # fraction of texts the perturbation actually changed


@dataclass(frozen=True)
class SuiteReport:
    count: int
    labels: tuple[str, ...]
    clean_accuracy: float
    clean_macro_f1: float
    seed: int
    severities: tuple[float, ...]
    rows: tuple[SuiteRow, ...]

    def row(self, perturbation: str, severity: float) -> SuiteRow:
        for r in self.rows:
            if r.perturbation == perturbation and r.severity == severity:
                return r
        raise KeyError((perturbation, severity))

    def to_dict(self) -> dict:
        return asdict(self)


def perturbation_suite(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[Hashable],
                       perturbations: Iterable[str] | str = ("typos",),
                       severities: Sequence[float] = DEFAULT_SEVERITIES, seed: int = 0, batch_size: int = 32,
                       max_length: int = 128, progress: bool = True) -> SuiteReport:
    """Clean accuracy/macro-F1, then each perturbation × severity: accuracy, macro-F1, their drop
    against clean, the prediction flip rate and the fraction of texts changed. `labels` are class
    names of the model (or indices); `perturbations` may name suites ("typos", "all")."""
    victim = Victim(model, tokenizer, batch_size, max_length)
    names = resolve_perturbations(perturbations)
    severities = tuple(check_severity(s) for s in severities)
    truth = _checked_inputs(texts, labels, victim.labels, severities)
    cache: dict[str, int] = {}
    clean = _predict(victim, texts, cache)
    clean_m = classification_metrics(truth, clean, labels=list(range(len(victim.labels))))
    rows = []
    for name, severity in _progress([(n, s) for n in names for s in severities], progress):
        perturbed = perturb_all(texts, name, severity, seed)
        predicted = _predict(victim, perturbed, cache)
        m = classification_metrics(truth, predicted, labels=list(range(len(victim.labels))))
        rows.append(SuiteRow(name, severity, m.accuracy, m.macro_f1, clean_m.accuracy - m.accuracy,
                             clean_m.macro_f1 - m.macro_f1, _share(a != b for a, b in zip(clean, predicted)),
                             _share(a != b for a, b in zip(texts, perturbed))))
    return SuiteReport(len(texts), victim.labels, clean_m.accuracy, clean_m.macro_f1, seed, severities, tuple(rows))


def perturb_all(texts: Sequence[str], name: str, severity: float, seed: int = 0) -> list[str]:
    """Each text perturbed with its own generator, keyed by (seed, name, severity, position)."""
    fn = get_perturbation(name)
    return [fn(text, text_rng(seed, name, severity, i), severity) for i, text in enumerate(texts)]


def _checked_inputs(texts, labels, names, severities) -> list[int]:
    if len(texts) == 0:
        raise ValueError("no texts to test: the data is empty (check --split / --limit)")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must match")
    if not severities:
        raise ValueError("no severities given; use values in [0, 1], e.g. 0.1 0.25 0.5")
    return label_ids(labels, names)


def _predict(victim: Victim, texts: Sequence[str], cache: dict[str, int]) -> list[int]:
    """Predicted classes; texts scored before (by any row) come from the cache."""
    new = list(dict.fromkeys(t for t in texts if t not in cache))
    if new:
        for text, p in zip(new, victim.probs(new).argmax(-1).tolist()):
            cache[text] = p
    return [cache[t] for t in texts]


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _progress(items: list, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc="perturbation suite", unit="row", disable=not enabled)


# --- rendering ------------------------------------------------------------------------------------------

def suite_markdown(report: SuiteReport) -> str:
    """A markdown table: one row per perturbation × severity, against the clean scores."""
    lines = [(f"Clean: accuracy {report.clean_accuracy:.3f}, macro-F1 {report.clean_macro_f1:.3f} "
             f"on {report.count} texts (seed {report.seed})."), "",
             "| perturbation | severity | accuracy | Δ acc | macro-F1 | Δ F1 | flip rate | texts changed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r.perturbation} | {r.severity:g} | {r.accuracy:.3f} | {-r.accuracy_drop:+.3f} | "
                     f"{r.macro_f1:.3f} | {-r.macro_f1_drop:+.3f} | {r.flip_rate:.3f} | {r.changed:.2f} |")
    return "\n".join(lines) + "\n"


def suite_json(report: SuiteReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def save_suite_plot(report: SuiteReport, path: str | Path) -> Path:
    """PNG: accuracy against severity, one line per perturbation, starting from the clean accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.perturbation for r in report.rows):
        points = sorted((r.severity, r.accuracy) for r in report.rows if r.perturbation == name)
        if points[0][0] > 0:
            points.insert(0, (0.0, report.clean_accuracy))
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(report.clean_accuracy, color="grey", linestyle=":", label="clean")
    ax.set(xlabel="severity (fraction of words edited)", ylabel="accuracy",
           title=f"Accuracy under perturbation ({report.count} texts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

