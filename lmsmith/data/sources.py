"""Read text, CSV, JSONL and CoNLL files into plain records.

Every reader decodes line by line so that a bad byte is reported with its file, line and column.
`errors="strict"` (the default) raises `DataError`; `errors="replace"` substitutes U+FFFD and marks
the affected records `repaired=True` (`clean()` counts them), for corpora such as the embedded tweets
that contain stray non-UTF-8 bytes.

Text files: `unit="file"` makes each file one document; `unit="paragraph"` makes each block of
lines separated by blank (whitespace-only) lines one document.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Collection, Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmsmith.data.records import RECORD_FIELDS, DataError, TaggedRecord, TextRecord

Errors = Literal["strict", "replace"]
DEFAULT_COLUMNS = {"text": "text"}


@dataclass(frozen=True)
class DecodedLines:
    """A file's lines (line endings kept) and the 1-based numbers of lines whose bytes were replaced."""

    path: Path
    lines: list[str]
    repaired: frozenset[int]

    def any_repaired(self, first: int, last: int) -> bool:
        if not self.repaired or first == last:
            return first in self.repaired
        return any(number in self.repaired for number in range(first, last + 1))


def decode_lines(path: str | Path, errors: Errors = "strict") -> DecodedLines:
    """Read a file as UTF-8 lines; raise DataError for an empty file or (strict) an invalid byte."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError("empty file", path)
    lines, repaired = [], set()
    for number, raw in enumerate(_split_keeping_newlines(data), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            if errors == "strict":
                raise _decode_error(path, number, raw, error) from None
            lines.append(raw.decode("utf-8", errors="replace"))
            repaired.add(number)
    lines[0] = lines[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
    return DecodedLines(path, lines, frozenset(repaired))


def _split_keeping_newlines(data: bytes) -> list[bytes]:
    # Split on b"\n" only: bytes.splitlines would also split on a lone "\r" inside a field.
    pieces = data.split(b"\n")
    lines = [piece + b"\n" for piece in pieces[:-1]]
    return lines + [pieces[-1]] if pieces[-1] else lines


def _decode_error(path: Path, number: int, raw: bytes, error: UnicodeDecodeError) -> DataError:
    column = len(raw[: error.start].decode("utf-8")) + 1  # valid up to error.start by definition
    return DataError(
        f"invalid UTF-8 byte 0x{raw[error.start]:02x}; pass errors='replace' to substitute U+FFFD",
        path, number, column,
    )


# ---- plain text -------------------------------------------------------------------------------

def read_text(
    path: str | Path,
    *,
    unit: Literal["file", "paragraph"] = "file",
    pattern: str = "*.txt",
    errors: Errors = "strict",
) -> list[TextRecord]:
    """Documents from a text file or from every file matching `pattern` under a folder (sorted)."""
    if unit not in ("file", "paragraph"):
        raise ValueError(f"unit must be 'file' or 'paragraph', got {unit!r}")
    records = []
    for file in _text_files(Path(path), pattern):
        decoded = decode_lines(file, errors)
        if unit == "file":
            text = "".join(decoded.lines)
            records.append(TextRecord(text, origin=str(file), repaired=bool(decoded.repaired)))
        else:
            records.extend(_paragraphs(decoded))
    return records


def _text_files(path: Path, pattern: str) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return [path]
    files = sorted(file for file in path.rglob(pattern) if file.is_file())
    if not files:
        raise DataError(f"folder has no files matching {pattern!r}", path)
    return files


def _paragraphs(decoded: DecodedLines) -> Iterator[TextRecord]:
    block: list[str] = []
    for number, line in enumerate(decoded.lines + ["\n"], start=1):  # the sentinel flushes the last block
        if line.strip():
            block.append(line)
            continue
        if block:
            first = number - len(block)
            text = "".join(block).rstrip("\r\n")
            yield TextRecord(text, origin=f"{decoded.path}:{first}",
                             repaired=decoded.any_repaired(first, number - 1))
        block = []


# ---- CSV and JSONL ----------------------------------------------------------------------------

def _check_column_map(columns: Mapping[str, str]) -> None:
    unknown = set(columns) - set(RECORD_FIELDS)
    if unknown or "text" not in columns:
        raise ValueError(
            f"columns maps record fields {RECORD_FIELDS} to source columns and must include 'text'; "
            f"got {dict(columns)!r}"
        )


def read_csv(
    path: str | Path,
    columns: Mapping[str, str] = DEFAULT_COLUMNS,
    *,
    labels: Collection[Hashable] | None = None,
    errors: Errors = "strict",
    delimiter: str = ",",
) -> list[TextRecord]:
    """Records from a CSV file with a header row. `columns` maps text/label/text_pair/target to header names.

    With `labels`, a label outside that set raises DataError; an empty target does too. Blank rows are skipped.
    """
    _check_column_map(columns)
    decoded = decode_lines(path, errors)
    reader = csv.reader(decoded.lines, delimiter=delimiter, strict=True)  # bad quoting is an error
    header = _next_row(reader, decoded.path)
    positions = _header_positions(header, columns, decoded.path)
    records, last_line = [], reader.line_num
    while (row := _next_row(reader, decoded.path)) is not None:
        first_line, last_line = last_line + 1, reader.line_num  # a quoted field may span lines
        if any(cell.strip() for cell in row):
            values = _row_values(row, positions, decoded.path, first_line, columns)
            _check_label(values, columns, labels, decoded.path, first_line)
            records.append(TextRecord(**values, origin=f"{decoded.path}:{first_line}",
                                      repaired=decoded.any_repaired(first_line, last_line)))
    return records


def _next_row(reader, path: Path) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as error:
        raise DataError(f"malformed CSV: {error}", path, reader.line_num) from None


def _header_positions(header: list[str], columns: Mapping[str, str], path: Path) -> dict[str, int]:
    names = [name.strip() for name in header]
    positions = {}
    for field_name, column in columns.items():
        if column not in names:
            raise DataError(f"missing column (header has {names})", path, 1, column)
        positions[field_name] = names.index(column)
    return positions


def _row_values(row: list[str], positions: dict[str, int], path: Path, line: int,
                columns: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for field_name, position in positions.items():
        if position >= len(row):
            raise DataError(f"row has {len(row)} fields, this column is field {position + 1}",
                            path, line, position + 1)
        values[field_name] = row[position].strip() if field_name == "label" else row[position]
        _check_target(field_name, values[field_name], path, line, columns[field_name])
    return values


def _check_target(field_name: str, value: str, path: Path, line: int, column: str | int) -> None:
    """A sequence-to-sequence target must say something: an empty one would teach the model to stop at once."""
    if field_name == "target" and not value.strip():
        raise DataError("empty target", path, line, column)


def _check_label(values: dict, columns: Mapping[str, str], labels, path: Path, line: int) -> None:
    if labels is not None and "label" in values and values["label"] not in labels:
        raise DataError(f"unknown label {values['label']!r} (allowed: {sorted(map(str, labels))})",
                        path, line, columns["label"])


def read_jsonl(
    path: str | Path,
    columns: Mapping[str, str] = DEFAULT_COLUMNS,
    *,
    labels: Collection[Hashable] | None = None,
    errors: Errors = "strict",
) -> list[TextRecord]:
    """Records from a JSON-lines file (one object per line, blank lines skipped)."""
    _check_column_map(columns)
    decoded = decode_lines(path, errors)
    records = []
    for number, line in enumerate(decoded.lines, start=1):
        if not line.strip():
            continue
        values = _json_values(_parse_json_object(line, decoded.path, number), columns, decoded.path, number)
        _check_label(values, columns, labels, decoded.path, number)
        records.append(TextRecord(**values, origin=f"{decoded.path}:{number}",
                                  repaired=number in decoded.repaired))
    return records


def _parse_json_object(line: str, path: Path, number: int) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error.msg}", path, number, error.colno) from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", path, number)
    return value


def _json_values(obj: dict, columns: Mapping[str, str], path: Path, number: int) -> dict:
    values = {}
    for field_name, key in columns.items():
        if key not in obj:
            raise DataError(f"missing key (object has {sorted(obj)})", path, number, key)
        value = obj[key]
        allowed = (str, int, bool) if field_name == "label" else (str,)
        if not isinstance(value, allowed):
            raise DataError(f"expected {' or '.join(t.__name__ for t in allowed)}, got {type(value).__name__}",
                            path, number, key)
        _check_target(field_name, value, path, number, key)
        values[field_name] = value
    return values


# ---- CoNLL token/tag files --------------------------------------------------------------------

def read_conll(
    path: str | Path,
    *,
    token_column: int = 0,
    tag_column: int = -1,
    tags: Collection[str] | None = None,
    delimiter: str | None = None,
    comment_prefix: str | None = None,
    errors: Errors = "strict",
) -> list[TaggedRecord]:
    """Sentences from a CoNLL-style file: one `token ... tag` line per word, blank lines between
    sentences, `-DOCSTART-` lines skipped. Fields split on whitespace unless `delimiter` is given.
    Columns in errors are 1-based field numbers."""
    decoded = decode_lines(path, errors)
    needed = _fields_needed(token_column, tag_column)
    sentences, words, first = [], [], 0
    for number, line in enumerate(decoded.lines + ["\n"], start=1):  # the sentinel ends the last sentence
        if _skip_conll_line(line, comment_prefix):
            continue
        if not line.strip():
            if words:
                sentences.append(TaggedRecord(*map(tuple, zip(*words)), origin=f"{decoded.path}:{first}"))
            words = []
            continue
        first = first if words else number
        fields = line.rstrip("\r\n").split(delimiter)
        if len(fields) < needed:
            raise DataError(f"expected at least {needed} fields, found {len(fields)}",
                            decoded.path, number, len(fields) + 1)
        token, tag = fields[token_column].strip(), fields[tag_column].strip()
        if tags is not None and tag not in tags:
            raise DataError(f"unknown tag {tag!r} (allowed: {sorted(tags)})",
                            decoded.path, number, tag_column % len(fields) + 1)
        words.append((token, tag))
    return sentences


def _fields_needed(token_column: int, tag_column: int) -> int:
    """Fewest fields for which the two columns exist and are different fields."""
    if token_column == tag_column:
        raise ValueError(f"token_column and tag_column are both {token_column}")
    if (token_column >= 0) == (tag_column >= 0):
        return max(abs(token_column), abs(tag_column)) + (token_column >= 0)
    # One counts from the start and one from the end: they must not meet.
    return max(token_column, tag_column) + 1 - min(token_column, tag_column)


def _skip_conll_line(line: str, comment_prefix: str | None) -> bool:
    stripped = line.strip()
    return stripped.startswith("-DOCSTART-") or bool(comment_prefix and stripped.startswith(comment_prefix))
