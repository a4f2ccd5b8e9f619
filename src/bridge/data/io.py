"""Reading data files with errors that name the file, the row and the fix.

Every reader reports a bad row through a :class:`RowChecker`: it raises
:class:`~bridge.errors.DataError` at once, or, with ``skip_invalid``, records the row as a
reject so that the caller can count it and write it to a rejects file.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AnyStr

from bridge.config import DATA_DIR_ENV
from bridge.errors import DataError

log = logging.getLogger(__name__)

_LINE_ENDS = re.compile(r"(?<=\n)")
_BYTE_LINE_ENDS = re.compile(rb"(?<=\n)")


def _split_lines(data: AnyStr) -> list[AnyStr]:
    """Split after each "\n", keeping line endings; no trailing empty line."""
    if not data:
        return []
    pattern = _BYTE_LINE_ENDS if isinstance(data, bytes) else _LINE_ENDS
    parts = pattern.split(data)  # type: ignore[arg-type]
    return parts[:-1] if not parts[-1] else parts


@dataclass(frozen=True)
class Reject:
    """A row that failed validation and was skipped."""

    file: str
    #: Where the row is: "line 12", "record 7 (id 123)".
    location: str
    field: str
    problem: str
    fix: str
    #: The raw row, shortened, so the rejects file shows what was read.
    raw: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class RowChecker:
    """Raise :class:`DataError` for a bad row, or collect it as a :class:`Reject` when skipping."""

    def __init__(self, skip_invalid: bool) -> None:
        self.skip_invalid = skip_invalid
        self.rejects: list[Reject] = []

    def reject(self, file: Path | str, location: str, field: str, problem: str, fix: str, raw: Any = None) -> None:
        """Report one bad row: raise unless ``skip_invalid`` is set."""
        if not self.skip_invalid:
            raise DataError(
                f"{file}: {location}: field '{field}': {problem}",
                hint=f"{fix}, or set data.skip_invalid=true to skip such rows into a rejects file",
            )
        shown = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        if len(shown) > 500:
            shown = shown[:497] + "..."
        self.rejects.append(Reject(str(file), location, field, problem, fix, shown if raw is not None else ""))

    def counts(self) -> dict[str, int]:
        """Return the number of rejects per field, in sorted order."""
        return dict(sorted(Counter(r.field for r in self.rejects).items()))


def missing_file_error(dataset: str, path: Path, what: str = "data file") -> DataError:
    """Build the error for a data file that does not exist."""
    return DataError(
        f"data set '{dataset}': {what} not found: {path}",
        hint=(
            f"set data.data_dir or export {DATA_DIR_ENV} to the folder that holds the '{dataset}' folder "
            "(the project ships no copy of the data)"
        ),
    )


def read_bytes(path: Path, dataset: str) -> bytes:
    """Read a whole file, naming the data set and the path when it is missing."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise missing_file_error(dataset, path) from None
    except IsADirectoryError:
        raise DataError(f"data set '{dataset}': expected a file but found a folder: {path}") from None
    except OSError as exc:
        raise DataError(f"data set '{dataset}': cannot read {path}: {exc.strerror}") from None


def _decode_error(path: Path, data: bytes, exc: UnicodeDecodeError, encoding: str) -> DataError:
    line = data.count(b"\n", 0, exc.start) + 1
    bad = data[exc.start : exc.end]
    return DataError(
        f"{path}: line {line}: undecodable bytes {bad!r} at byte offset {exc.start} for encoding {encoding}",
        hint="convert the file to UTF-8, or set data.encoding to the file's encoding (generic adapter)",
    )


def read_json(path: Path, dataset: str) -> Any:
    """Parse a whole JSON file; undecodable bytes and syntax errors name the line."""
    data = read_bytes(path, dataset)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, data, exc, "utf-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}",
            hint="repair the file or restore the original copy of the data set",
        ) from None


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(
            f"unknown text encoding '{encoding}'",
            hint="set data.encoding to a Python codec name such as utf-8, utf-8-sig, latin-1 or cp1252",
        ) from None


def decode_lines(
    path: Path, dataset: str, encoding: str, checker: RowChecker
) -> tuple[list[str], set[int]]:
    """Decode a file line by line and return its lines (with line endings) and the bad line numbers.

    A line that cannot be decoded is reported to ``checker`` (which raises unless skipping) and
    kept with replacement characters, so a CSV record spanning it can be rejected as a whole.
    """
    _check_encoding(encoding)
    data = read_bytes(path, dataset)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        pass
    else:
        # Split on "\n" only: str.splitlines() would also split on form feeds and U+2028 inside
        # fields. Decoding the whole file first also serves encodings such as UTF-16, whose
        # bytes cannot be split into lines before decoding.
        if encoding.lower().replace("_", "-") == "utf-8":
            text = text.removeprefix("\ufeff")
        return _split_lines(text), set()

    # Some line is undecodable: decode line by line to find and report each bad line.
    lines: list[str] = []
    bad: set[int] = set()
    raw_lines = _split_lines(data)
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            bad.add(number)
            checker.reject(
                path,
                f"line {number}",
                "(bytes)",
                f"undecodable bytes {raw[exc.start : exc.end]!r} for encoding {encoding}",
                "convert the file to UTF-8, or set data.encoding to the file's encoding",
                raw.decode(encoding, errors="replace"),
            )
            text = raw.decode(encoding, errors="replace")
        if number == 1 and encoding.lower().replace("_", "-") == "utf-8":
            text = text.removeprefix("\ufeff")
        lines.append(text)
    return lines, bad


@dataclass(frozen=True)
class CsvRecord:
    """One CSV record with the physical lines it spans (1-based, inclusive)."""

    row: int
    first_line: int
    last_line: int
    values: list[str]

    @property
    def location(self) -> str:
        if self.first_line == self.last_line:
            return f"line {self.first_line} (row {self.row})"
        return f"lines {self.first_line}-{self.last_line} (row {self.row})"


def iter_csv(
    path: Path,
    dataset: str,
    checker: RowChecker,
    *,
    encoding: str = "utf-8",
    delimiter: str = ",",
    header: bool,
) -> tuple[list[str] | None, Iterator[CsvRecord]]:
    """Return the header (or None) and the data records of a CSV/TSV file.

    Quoted fields may span lines, so records are parsed with :mod:`csv` and carry the range of
    physical lines they came from. ``row`` counts data records from 0. A record that touches an
    undecodable line is rejected as a whole and not yielded.
    """
    lines, bad = decode_lines(path, dataset, encoding, checker)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    header_values: list[str] | None = None
    records: list[CsvRecord] = []
    previous_end = 0
    row = 0
    try:
        for values in reader:
            first, last = previous_end + 1, reader.line_num
            previous_end = last
            if header and header_values is None:
                header_values = [v.strip() for v in values]
                continue
            if not any(v.strip() for v in values):
                continue
            record = CsvRecord(row, first, last, values)
            row += 1
            if any(first <= n <= last for n in bad):
                continue
            records.append(record)
    except csv.Error as exc:
        raise DataError(
            f"{path}: line {reader.line_num}: invalid CSV: {exc}",
            hint="check the quoting of that line (a field with a comma, quote or newline must be quoted)",
        ) from None
    if header and header_values is None:
        raise DataError(f"{path}: the file is empty", hint="the first line must name the columns")
    return header_values, iter(records)


def iter_jsonl(
    path: Path, dataset: str, checker: RowChecker, *, encoding: str = "utf-8"
) -> Iterator[tuple[int, int, Any]]:
    """Yield (row, line number, parsed object) for each non-blank line of a JSONL file.

    ``row`` counts non-blank lines from 0. A line that is not valid JSON is reported to
    ``checker``.
    """
    lines, bad = decode_lines(path, dataset, encoding, checker)
    row = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        current = row
        row += 1
        if number in bad:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            shown = line.strip()
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            checker.reject(
                path,
                f"line {number}",
                "(json)",
                f"invalid JSON at column {exc.colno}: {exc.msg}: {shown}",
                "write one complete JSON object per line (a line cut short by an interrupted copy is invalid)",
                line.strip(),
            )
            continue
        yield current, number, obj
