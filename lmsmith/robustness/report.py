"""One call from a model folder to a robustness report: data, suite, optional attack, files.

    result = robustness_report("runs/tune-full-1/model", data="tweets-sentiment", split="test", limit=500,
                               perturbations=["typos"], attack="greedy", out="runs/robustness")

For a registered data set, the splits are rebuilt with the options the model was fine-tuned with
(its manifest keeps the recipe), so "test" means the tweets the model never trained on. A CSV or
JSONL file (columns text, label) is used whole.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate.data import recipe_data_sections, trained_split_options
from .attacks import ATTACKS, AttackReport, attack, attack_markdown
from .classify import check_classifier
from .perturbations import resolve_perturbations
from .suite import DEFAULT_SEVERITIES, SuiteReport, perturbation_suite, save_suite_plot, suite_markdown

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class EvalData:
    texts: list[str]
    labels: list
    description: str


@dataclass(frozen=True)
class RobustnessResult:
    suite: SuiteReport
    attack: AttackReport | None
    markdown: str
    files: dict[str, str] = field(default_factory=dict)  # report.md, report.json, plot → path


def training_data_options(model, source: str) -> dict:
    """The split options of the recipe the model was fine-tuned with, when it used `source`; {} if none."""
    return trained_split_options(source, getattr(model, "manifest", None)) or {}


def load_eval_data(source: str, split: str = "test", limit: int | None = None, model=None) -> EvalData:
    """(texts, labels) from a registered data set's split or from a CSV/JSONL file (text, label columns)."""
    from ..data import dataset_names, load_dataset, read_csv, read_jsonl

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source in dataset_names():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        options = training_data_options(model, source)
        records = load_dataset(source, **options).splits[split]
        where = f"{source} {split} split" + (" (the model's training splits)" if options else "")
    else:
        path = Path(source)
        if not path.is_file() or path.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"--data {source!r} is neither a registered data set {dataset_names()} "
                             "nor a .csv/.jsonl file with text and label columns")
        reader = read_csv if path.suffix == ".csv" else read_jsonl
        records, where = reader(path, {"text": "text", "label": "label"}), str(path)
    records = [r for r in records if r.label is not None][:limit]
    if not records:
        raise ValueError(f"no labelled texts in {where}")
    return EvalData([r.text for r in records], [r.label for r in records], f"{len(records)} texts from {where}")


def robustness_report(model_path: str, *, data: str = "tweets-sentiment", split: str = "test",
                      limit: int | None = 500, perturbations: Sequence[str] | str = ("typos",),
                      severities: Sequence[float] = DEFAULT_SEVERITIES, attack_method: str = "greedy",
                      attack_limit: int = 100, out: str | Path | None = None, seed: int = 0, batch_size: int = 32,
                      max_length: int | None = None, progress: bool = True) -> RobustnessResult:
    """Load a classifier, run the perturbation suite (and an attack on the first `attack_limit` texts),
    write report.md, report.json and robustness.png under `out` (when given)."""
    from ..api import load

    names = resolve_perturbations(perturbations)
    if attack_method not in (*ATTACKS, "none"):
        raise ValueError(f"unknown attack {attack_method!r}; choose one of {[*ATTACKS, 'none']}")
    model, tokenizer = load(model_path)
    check_classifier(model)
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer.json; a robustness report needs the model's tokenizer")
    length = max_length or _trained_max_length(model) or 128
    evaluation = load_eval_data(data, split, limit, model)
    options = {"seed": seed, "batch_size": batch_size, "max_length": length, "progress": progress}
    suite = perturbation_suite(model, tokenizer, evaluation.texts, evaluation.labels, names, severities, **options)
    attacked = None
    if attack_method != "none":
        n = min(attack_limit, len(evaluation.texts))
        attacked = attack(attack_method, model, tokenizer, evaluation.texts[:n], evaluation.labels[:n], **options)
    markdown = render(model_path, evaluation.description, suite, attacked)
    files = write_files(out, markdown, suite, attacked) if out is not None else {}
    return RobustnessResult(suite, attacked, markdown, files)


def _trained_max_length(model) -> int | None:
    for data in reversed(recipe_data_sections(getattr(model, "manifest", None))):
        if data.get("max_length"):
            return int(data["max_length"])
    return None


def render(model_path: str, description: str, suite: SuiteReport, attacked: AttackReport | None) -> str:
    parts = [f"# Robustness of {model_path}", "", f"Data: {description}.", "", "## Perturbations", "",
             suite_markdown(suite)]
    if attacked is not None:
        parts += ["## Attack", "", attack_markdown(attacked)]
    return "\n".join(parts)


def write_files(out: str | Path, markdown: str, suite: SuiteReport, attacked: AttackReport | None) -> dict[str, str]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    record = {"suite": suite.to_dict(), "attack": attacked.to_dict() if attacked else None}
    (folder / "report.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    plot = save_suite_plot(suite, folder / "robustness.png")
    return {"report.md": str(folder / "report.md"), "report.json": str(folder / "report.json"), "plot": str(plot)}
