"""What a model is evaluated on: records from a registered dataset split, a CSV/JSONL/CoNLL file, a
text file or folder, or the built-in held-out text; and the checks that the data's labels are ones
the model knows.

A registered dataset is split exactly as training split it: the split options come from the model's
manifest (the fine-tuning recipe's data section, when it names the same dataset), else from the
recipe defaults (ratios 0.8/0.1/0.1, seed 0, stratified) — so `split="test"` holds no tweet the
model was trained on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import data as D
from ..data.splits import SPLIT_NAMES
from .heldout import HELDOUT_PARAGRAPHS

CLASSIFICATION_TASKS = ("sequence-classification", "token-classification")
LM_TASKS = ("causal-lm", "masked-lm")
# Split options of lmsmith.train.recipes.DataSection's defaults.
DEFAULT_SPLIT = {"ratios": (0.8, 0.1, 0.1), "sizes": None, "seed": 0, "stratify": True}
TABLE_SUFFIXES = (".csv", ".jsonl")
HELDOUT = "held-out text (lmsmith.evaluate.heldout)"


@dataclass(frozen=True)
class EvalRecords:
    """Records to score and a description of where they came from (for the report)."""

    records: tuple  # TextRecord (classification, text) or TaggedRecord (token classification)
    source: str
    split: str | None  # the dataset split, None for files and the held-out text
    split_options: Mapping[str, Any] | None = None


def eval_records(data: str | Path | None, task: str, *, split: str = "test", limit: int | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 manifest: Mapping[str, Any] | None = None) -> EvalRecords:
    """The records to evaluate a `task` model on (see the module docstring), the first `limit` kept."""
    check_limit(limit)
    if task in CLASSIFICATION_TASKS:
        found = _labelled_records(data, task, split, text_column, label_column, manifest)
    elif task in LM_TASKS:
        found = _text_records(data, task, split, text_column)
    else:
        raise ValueError(f"no quality metric for task {task!r}; evaluable tasks: {CLASSIFICATION_TASKS + LM_TASKS}")
    if not found.records:
        raise ValueError(f"no examples to evaluate in {found.source}")
    return replace(found, records=found.records[:limit]) if limit is not None else found


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples, got {limit!r}")


def _labelled_records(data, task, split, text_column, label_column, manifest) -> EvalRecords:
    if data is None:
        data = trained_dataset(manifest)
        if data is None:
            raise ValueError(f"a {task} model needs data: a registered dataset ({D.dataset_names()}) "
                             f"or a CSV/JSONL{'/CoNLL' if task == 'token-classification' else ''} file")
    if str(data) in D.dataset_names():
        return _dataset_split(str(data), split, manifest)
    path = _existing(data)
    if task == "token-classification":
        return EvalRecords(tuple(D.read_conll(path)), str(path), None)
    columns = {"text": text_column or "text", "label": label_column or "label"}
    return EvalRecords(tuple(_read_table(path, columns)), str(path), None)


def _text_records(data, task, split, text_column) -> EvalRecords:
    if data is None:
        return EvalRecords(tuple(D.TextRecord(p) for p in HELDOUT_PARAGRAPHS), HELDOUT, None)
    if str(data) in D.dataset_names():
        return _dataset_split(str(data), split, None)
    path = _existing(data)
    if path.suffix in TABLE_SUFFIXES:
        return EvalRecords(tuple(_read_table(path, {"text": text_column or "text"})), str(path), None)
    unit = "paragraph" if task == "masked-lm" else "file"  # MLM scores sequences of at most max_length
    return EvalRecords(tuple(D.read_text(path, unit=unit, errors="replace")), str(path), None)


def _existing(data: str | Path) -> Path:
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data {str(data)!r} is neither a registered dataset ({D.dataset_names()}) "
                                "nor an existing file or folder")
    return path


def _read_table(path: Path, columns: dict[str, str]) -> list:
    if path.suffix == ".csv":
        return D.read_csv(path, columns, errors="replace")
    if path.suffix == ".jsonl":
        return D.read_jsonl(path, columns, errors="replace")
    raise ValueError(f"{path}: cannot read {path.suffix or 'a file without suffix'} as labelled data; "
                     f"use a CSV or JSONL file ({', '.join(TABLE_SUFFIXES)}) or a registered dataset")


def _dataset_split(name: str, split: str, manifest) -> EvalRecords:
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    options = split_options(name, manifest)
    records = D.load_dataset(name, **options).splits[split]
    if records and not isinstance(records[0], D.TextRecord):
        raise ValueError(f"dataset {name!r} holds {type(records[0]).__name__} examples, not text records")
    return EvalRecords(tuple(records), name, split, options)


def split_options(name: str, manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """The split options the model's fine-tuning used for dataset `name`, else the recipe defaults."""
    return trained_split_options(name, manifest) or dict(DEFAULT_SPLIT)


def trained_split_options(name: str, manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The split options of the latest fine-tuning recipe in `manifest` that used dataset `name`; None
    if none did."""
    for data in reversed(recipe_data_sections(manifest)):
        if data.get("source") == name:
            sizes = data.get("sizes")
            return {"ratios": tuple(data.get("ratios") or DEFAULT_SPLIT["ratios"]),
                    "sizes": dict(sizes) if sizes else None, "seed": int(data.get("seed", 0)),
                    "stratify": bool(data.get("stratify", True))}
    return None


def trained_dataset(manifest: Mapping[str, Any] | None) -> str | None:
    """The registered dataset the model was last fine-tuned on, per its manifest; None if unknown."""
    for data in reversed(recipe_data_sections(manifest)):
        if data.get("source") in D.dataset_names():
            return data["source"]
    return None


def recipe_data_sections(manifest: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The `data` sections of the recipes in a manifest's history, oldest first."""
    history = (manifest or {}).get("history") or []
    sections = [(step.get("recipe") or {}).get("data") for step in history if isinstance(step, Mapping)]
    return [s for s in sections if isinstance(s, Mapping)]


def check_labels(records: Sequence, model_labels: Sequence[str]) -> tuple:
    """Records whose labels (tags) are all among the model's; labels become strings, as in training.
    A label the model does not know is a ValueError naming it and the model's labels."""
    if not model_labels:
        raise ValueError("the model has no labels (config.labels is empty); it is not a trained classifier")
    tagged = bool(records) and isinstance(records[0], D.TaggedRecord)
    missing = [r.origin or str(i) for i, r in enumerate(records) if not tagged and r.label is None]
    if missing:
        raise ValueError(f"{len(missing)} examples have no label (first: {missing[0]}); check the label column")
    seen = {tag for r in records for tag in r.tags} if tagged else {str(r.label) for r in records}
    unknown = sorted(seen - set(model_labels))
    if unknown:
        raise ValueError(f"label(s) {unknown} in the data are not among the model's labels {list(model_labels)}")
    return tuple(records) if tagged else tuple(replace(r, label=str(r.label)) for r in records)
