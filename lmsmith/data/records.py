"""Plain records every source returns, and the one error type for bad data.

Records are frozen dataclasses so they can be hashed, compared and passed between processes.
`origin` ("file:line") and `repaired` are kept for error messages and reports but take no part in
equality, so two identical texts from different lines compare equal (de-duplication relies on it).
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

RECORD_FIELDS = ("text", "label", "text_pair", "target")


class DataError(ValueError):
    """Bad input data, located by file, line (1-based) and column (a name, or a 1-based position)."""

    def __init__(self, problem: str, path: str | Path, line: int | None = None, column: int | str | None = None):
        self.problem = problem
        self.path = str(path)
        self.line = line
        self.column = column
        super().__init__(f"{locate(path, line, column)}: {problem}")

    def __reduce__(self):  # keeps the exception picklable (DataLoader workers send it back)
        return (type(self), (self.problem, self.path, self.line, self.column))


def locate(path: str | Path, line: int | None = None, column: int | str | None = None) -> str:
    """'data.csv, line 3, column 'text'' — the prefix every DataError message starts with."""
    parts = [str(path)]
    if line is not None:
        parts.append(f"line {line}")
    if column is not None:
        parts.append(f"column {column!r}" if isinstance(column, str) else f"column {column}")
    return ", ".join(parts)


@dataclass(frozen=True)
class TextRecord:
    """One example for language modelling, (pair) classification or sequence-to-sequence (`target`:
    the text the decoder must produce from `text`)."""

    text: str
    label: Hashable | None = None
    text_pair: str | None = None
    target: str | None = None
    origin: str = field(default="", compare=False)
    repaired: bool = field(default=False, compare=False)  # undecodable bytes were replaced by U+FFFD


@dataclass(frozen=True)
class TaggedRecord:
    """One sentence for token classification: words and their word-level tags, same length."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    origin: str = field(default="", compare=False)

    def __post_init__(self):
        if len(self.tokens) != len(self.tags):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.tags)} tags in {self.origin or 'record'}")
