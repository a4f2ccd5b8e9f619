"""Text normalisation for duplicate detection and canonical answer strings."""

from __future__ import annotations

import functools
import re
import unicodedata
from decimal import Decimal, InvalidOperation

from bridge.data.types import MULTI_SPAN_SEPARATOR, Example

#: Valid scales of a numeric answer; "" means the number is used as written.
SCALES = ("", "thousand", "million", "billion", "percent")

#: Option letters of multiple-choice questions, in order.
OPTION_LETTERS = ("A", "B", "C", "D", "E")

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_KEY_SEPARATOR = "\x1f"


@functools.lru_cache(maxsize=8192)
def normalize_spaces(text: str) -> str:
    """Apply Unicode NFKC, case folding and whitespace collapsing (punctuation is kept)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", text).strip()


@functools.lru_cache(maxsize=65536)
def normalize_for_duplicates(text: str) -> str:
    """Normalise text so that copies differing only in case, spacing or punctuation compare equal.

    Real copies differ in curly against straight quotes, no-break spaces and a dropped colon, so
    punctuation is removed as well.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCTUATION.sub("", text)
    return _SPACES.sub(" ", text).strip()


def duplicate_key(example: Example) -> str:
    """Return the normalised question + context + options that identifies exact duplicates."""
    options = ""
    if example.options:
        options = _KEY_SEPARATOR.join(
            f"{letter}={normalize_for_duplicates(text)}" for letter, text in sorted(example.options.items())
        )
    return _KEY_SEPARATOR.join(
        (
            normalize_for_duplicates(example.question),
            normalize_for_duplicates(example.context or ""),
            options,
        )
    )


def canonical_number(value: object) -> str | None:
    """Return a number as a plain decimal string ("12.5", "-94", "0.05"), or None if it is not one.

    Accepts ints, floats and strings with thousands separators, a currency sign or parentheses
    for negatives ("$1,496.5", "(3.2)"). A trailing "%" is not accepted here: the caller moves
    it into the scale.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    negative = False
    if text.startswith("(") and text.endswith(")"):
        negative = True
        text = text[1:-1].strip()
    text = text.replace(",", "").replace(" ", "")
    for sign in ("$", "€", "£", "¥"):
        text = text.replace(sign, "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    if negative:
        number = -number
    if number == 0:
        return "0"
    plain = format(number.normalize(), "f")
    return plain


def join_spans(spans: list[str]) -> str:
    """Join the parts of a multi-span answer with :data:`MULTI_SPAN_SEPARATOR`."""
    return MULTI_SPAN_SEPARATOR.join(spans)
