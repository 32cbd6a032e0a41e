"""Data augmentation with perturbations: train on typos so the model stops minding them.

    more = augment(records, ["typos", "repeat_letters"], copies=1, seed=0)   # originals + perturbed copies

In a recipe, `data.augment: {perturbations: [typos], copies: 1, probability: 0.5, severity: 0.1}`
augments the TRAIN split only (validation and test stay as the data set gives them, so scores stay
comparable); the training log reports how many copies were added, per perturbation.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from ..data.records import TextRecord
from ..data.splits import Splits
from .perturbations import check_severity, get_perturbation, resolve_perturbations, text_rng


@dataclass(frozen=True)
class AugmentSettings:
    """The recipe's `data.augment` section."""

    perturbations: tuple[str, ...] = ("typos",)  # perturbation or suite names
    copies: int = 1  # perturbed copies tried per training record
    probability: float = 1.0  # chance that each copy is made
    severity: float = 0.1  # fraction of words each copy edits
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            resolve_perturbations(self.perturbations)
        except ValueError as e:
            raise ValueError(f"data.augment.perturbations: {e}") from None
        if self.copies < 1:
            raise ValueError(f"data.augment.copies must be >= 1, got {self.copies}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"data.augment.probability must be in (0, 1], got {self.probability}")
        if check_severity(self.severity) == 0:
            raise ValueError("data.augment.severity must be > 0 (0 would add exact duplicates)")


@dataclass(frozen=True)
class AugmentCounts:
    original: int
    added: int
    per_perturbation: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {n}" for name, n in sorted(self.per_perturbation.items()))
        return f"{self.original} train records + {self.added} augmented copies ({parts or 'none'})"


def augment(records: Sequence[TextRecord], perturbations: Iterable[str] | str = ("typos",), copies: int = 1,
            seed: int = 0, probability: float = 1.0, severity: float = 0.1) -> list[TextRecord]:
    """The records followed by their perturbed copies (same label). Each copy draws its perturbation
    from `perturbations` with a generator keyed by (seed, record index, copy), so the result does not
    depend on the order in which records are processed. Copies identical to the original are dropped."""
    settings = AugmentSettings(tuple(resolve_perturbations(perturbations)), copies, probability, severity, seed)
    return augment_with(records, settings)[0]


def augment_with(records: Sequence[TextRecord], settings: AugmentSettings) -> tuple[list[TextRecord], AugmentCounts]:
    names = resolve_perturbations(settings.perturbations)
    added, counts = [], Counter()
    for index, record in enumerate(records):
        if not isinstance(record, TextRecord):
            raise TypeError(f"augmentation perturbs text records (TextRecord), got {type(record).__name__}")
        for copy in range(settings.copies):
            rng = text_rng(settings.seed, "augment", index, copy)
            if rng.random() >= settings.probability:
                continue
            name = rng.choice(names)
            text = get_perturbation(name)(record.text, rng, settings.severity)
            if text != record.text:
                added.append(replace(record, text=text, origin=f"{record.origin} [{name}]".strip()))
                counts[name] += 1
    return [*records, *added], AugmentCounts(len(records), len(added), dict(counts))


def augment_train_split(splits: Splits, settings: AugmentSettings) -> tuple[Splits, AugmentCounts]:
    """Splits whose train part gained perturbed copies; validation and test are the same lists."""
    train, counts = augment_with(splits.train, settings)
    return Splits(train, splits.validation, splits.test), counts
