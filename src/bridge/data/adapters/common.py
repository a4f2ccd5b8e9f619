"""Checks shared by the adapters: options, answers in each task format, numbers and spans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.data.io import RowChecker
from bridge.data.text import OPTION_LETTERS, SCALES, canonical_number, join_spans
from bridge.data.types import MULTI_SPAN_SEPARATOR

_LETTER_HINT = f"use option letters {', '.join(OPTION_LETTERS)} in order, two to five options"


def parse_options(
    value: Any, path: Path | str, location: str, field: str, checker: RowChecker, raw: Any
) -> dict[str, str] | None:
    """Return options as letter -> text from a list, a letter mapping or a JSON string of either."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            checker.reject(path, location, field, "options are a string that is not a JSON list or object", _LETTER_HINT, raw)
            return None
    if isinstance(value, list):
        if not 2 <= len(value) <= len(OPTION_LETTERS):
            checker.reject(path, location, field, f"{len(value)} options; expected 2 to {len(OPTION_LETTERS)}", _LETTER_HINT, raw)
            return None
        value = dict(zip(OPTION_LETTERS, value, strict=False))
    if not isinstance(value, dict):
        problem = "missing" if value is None else f"expected a list or a letter mapping, found {type(value).__name__}"
        checker.reject(path, location, field, problem, _LETTER_HINT, raw)
        return None
    options: dict[str, str] = {}
    for key, text in value.items():
        letter = str(key).strip().upper()
        if letter not in OPTION_LETTERS:
            checker.reject(path, location, field, f"unknown option letter {key!r}", _LETTER_HINT, raw)
            return None
        if not isinstance(text, str | int | float) or isinstance(text, bool):
            checker.reject(path, location, field, f"option {letter} is not text: {text!r}", "write each option as text", raw)
            return None
        options[letter] = str(text).strip()
    expected = OPTION_LETTERS[: len(options)]
    if tuple(sorted(options)) != expected or len(options) < 2:
        checker.reject(
            path, location, field, f"option letters {', '.join(sorted(options))} are not {', '.join(expected)}", _LETTER_HINT, raw
        )
        return None
    return {letter: options[letter] for letter in expected}


def parse_letter(
    value: Any, options: dict[str, str], path: Path | str, location: str, field: str, checker: RowChecker, raw: Any
) -> str | None:
    """Return the option letter of a multiple-choice answer.

    Accepts a letter ("B", "b", "(B)", "B.") or the exact text of one option.
    """
    text = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else None
    if text is not None:
        letter = text.strip("().: ").upper()
        if letter in options:
            return letter
        matches = [key for key, option in options.items() if option == text]
        if len(matches) == 1:
            return matches[0]
    checker.reject(
        path,
        location,
        field,
        f"unknown option letter {value!r}; the options are {', '.join(options)}",
        "give the answer as the letter of an option, or map raw values to letters with data.label_map",
        raw,
    )
    return None


def parse_scale(value: Any, path: Path | str, location: str, field: str, checker: RowChecker, raw: Any) -> str | None:
    """Return a valid scale name ("" for none)."""
    scale = "" if value is None else str(value).strip().lower()
    if scale in SCALES:
        return scale
    checker.reject(
        path,
        location,
        field,
        f"unknown scale {value!r}",
        f"use one of: {', '.join(repr(s) for s in SCALES)}",
        raw,
    )
    return None


def parse_number(
    value: Any, path: Path | str, location: str, field: str, checker: RowChecker, raw: Any
) -> tuple[str, bool] | None:
    """Return the canonical number string and whether the text ended in "%"."""
    percent = False
    if isinstance(value, str) and value.strip().endswith("%"):
        percent = True
        value = value.strip()[:-1]
    number = canonical_number(value)
    if number is None:
        checker.reject(
            path,
            location,
            field,
            f"numeric answer {value!r} is not a number",
            "write the number without units, such as 12.5 or -1,496.5, and give the scale separately",
            raw,
        )
        return None
    return number, percent


def parse_spans(
    value: Any, path: Path | str, location: str, field: str, checker: RowChecker, raw: Any
) -> tuple[str, int, int] | None:
    """Return the span answer (parts joined), the number of parts and the empty parts removed."""
    parts = value if isinstance(value, list) else [value]
    if not parts or not all(isinstance(p, str | int | float) and not isinstance(p, bool) for p in parts):
        checker.reject(path, location, field, f"span answer {value!r} is not text or a list of texts", "write the answer as text or a list of texts", raw)
        return None
    texts = [str(p).strip() for p in parts]
    kept = [t for t in texts if t]
    if not kept:
        checker.reject(path, location, field, "empty answer", "give the answer text", raw)
        return None
    if any(MULTI_SPAN_SEPARATOR.strip() in t for t in kept) and len(kept) > 1:
        checker.reject(
            path,
            location,
            field,
            f"a span contains '{MULTI_SPAN_SEPARATOR.strip()}', which separates the parts of a multi-span answer",
            "remove the character from the span",
            raw,
        )
        return None
    return join_spans(kept), len(kept), len(texts) - len(kept)
