"""Cleaning text records: strip whitespace, drop empty ones, drop exact duplicates — and count each."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from lmsmith.data.records import TextRecord


@dataclass(frozen=True)
class CleaningReport:
    """What `clean` did. `kept == total - empty - duplicates`."""

    total: int
    kept: int
    stripped: int  # records whose text or pair had surrounding whitespace removed
    empty: int  # dropped: nothing left after stripping
    duplicates: int  # dropped: same (text, text_pair, target) as an earlier record; the first one is kept
    conflicting_labels: int  # of the dropped duplicates, those whose label differs from the kept one
    repaired: int  # kept records whose undecodable bytes were replaced while reading

    def __str__(self) -> str:
        return (f"{self.total} records: kept {self.kept}, dropped {self.empty} empty and "
                f"{self.duplicates} duplicates ({self.conflicting_labels} with another label); "
                f"stripped {self.stripped}, repaired {self.repaired}")


def clean(records: Iterable[TextRecord]) -> tuple[list[TextRecord], CleaningReport]:
    """Strip `text`/`text_pair`, drop records left empty, keep the first of each duplicate.

    Duplicates are judged on (text, text_pair, target) after stripping, so a tweet labelled twice with
    different labels keeps its first label; `conflicting_labels` says how often that happened.
    """
    kept: list[TextRecord] = []
    first_label: dict[tuple, object] = {}
    total = stripped = empty = duplicates = conflicts = 0
    for record in records:
        total += 1
        cleaned = _strip(record)
        stripped += cleaned != record
        if not cleaned.text or cleaned.text_pair == "" or cleaned.target == "":
            empty += 1
            continue
        key = (cleaned.text, cleaned.text_pair, cleaned.target)  # one source may have several targets
        if key in first_label:
            duplicates += 1
            conflicts += first_label[key] != cleaned.label
            continue
        first_label[key] = cleaned.label
        kept.append(cleaned)
    repaired = sum(record.repaired for record in kept)
    return kept, CleaningReport(total, len(kept), stripped, empty, duplicates, conflicts, repaired)


def _strip(record: TextRecord) -> TextRecord:
    text = record.text.strip()
    pair = record.text_pair.strip() if record.text_pair is not None else None
    target = record.target.strip() if record.target is not None else None
    if text == record.text and pair == record.text_pair and target == record.target:
        return record  # most records are already clean; skip the (slow) frozen-dataclass copy
    return dataclasses.replace(record, text=text, text_pair=pair, target=target)
