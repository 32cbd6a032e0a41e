"""Deterministic, seeded train/validation/test splits, optionally stratified by label.

The same records (in the same order), ratios or sizes and seed always give the same splits.
Stratification interleaves the shuffled classes so that every prefix of the ordering holds each
class in proportion (within one record); cutting that ordering gives proportional splits for
ratios and for absolute sizes alike.
"""
from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
SPLIT_NAMES = ("train", "validation", "test")
SplitSpec = Sequence[float] | Mapping[str, float]


@dataclass(frozen=True)
class Splits(Generic[T]):
    train: list[T] = field(default_factory=list)
    validation: list[T] = field(default_factory=list)
    test: list[T] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLIT_NAMES}

    def __getitem__(self, name: str) -> list[T]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"no split {name!r}; splits are {SPLIT_NAMES}")
        return getattr(self, name)


def split(
    records: Sequence[T],
    ratios: SplitSpec | None = (0.8, 0.1, 0.1),
    *,
    sizes: SplitSpec | None = None,
    seed: int = 0,
    stratify: bool = False,
) -> Splits[T]:
    """Split records into train/validation/test.

    `ratios` (summing to 1) or `sizes` (record counts whose sum may be below len(records); the rest
    is left out) are given as (train, validation, test) or as a mapping with those keys (missing
    keys are 0). `sizes` wins over `ratios`. With `stratify`, records need a `label`.
    """
    counts = _sizes_to_counts(sizes, len(records)) if sizes is not None else _ratios_to_counts(ratios, len(records))
    rng = random.Random(seed)
    order = _stratified_order(records, rng) if stratify else rng.sample(range(len(records)), len(records))
    parts, start = [], 0
    for count in counts:
        part = order[start:start + count]
        rng.shuffle(part)  # stratified order cycles through classes; shuffle it away
        parts.append([records[i] for i in part])
        start += count
    return Splits(*parts)


def _as_triple(spec: SplitSpec, what: str) -> list[float]:
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(SPLIT_NAMES)
        if unknown:
            raise ValueError(f"{what} keys must be among {SPLIT_NAMES}, got {sorted(unknown)}")
        return [spec.get(name, 0) for name in SPLIT_NAMES]
    values = list(spec)
    if len(values) != 3:
        raise ValueError(f"{what} must be (train, validation, test), got {values!r}")
    return values


def _ratios_to_counts(ratios: SplitSpec | None, n: int) -> list[int]:
    if ratios is None:
        raise ValueError("give ratios or sizes")
    values = _as_triple(ratios, "ratios")
    if any(value < 0 for value in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"ratios must be >= 0 and sum to 1, got {values!r}")
    exact = [value * n for value in values]
    counts = [math.floor(x) for x in exact]
    # Largest remainder: hand the few leftover records to the splits that lost the most by rounding.
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _sizes_to_counts(sizes: SplitSpec, n: int) -> list[int]:
    values = _as_triple(sizes, "sizes")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ValueError(f"sizes must be non-negative ints, got {values!r}")
    if sum(values) > n:
        raise ValueError(f"sizes {values} add up to {sum(values)}, more than the {n} records")
    return values


def _stratified_order(records: Sequence, rng: random.Random) -> list[int]:
    by_label: dict[Hashable, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(label_of(record, index), []).append(index)
    keyed = []
    for rank, members in enumerate(by_label.values()):
        rng.shuffle(members)
        # Spread each class evenly over [0, 1): member j of n sits at (j + 0.5) / n.
        keyed.extend(((j + 0.5) / len(members), rank, index) for j, index in enumerate(members))
    return [index for _, _, index in sorted(keyed)]


def label_of(record, index: int = 0) -> Hashable:
    """The label of a record dataclass or dict; ValueError if it has none."""
    label = record.get("label") if isinstance(record, Mapping) else getattr(record, "label", None)
    if label is None:
        raise ValueError(f"record {index} has no label to stratify by: {record!r}")
    return label
