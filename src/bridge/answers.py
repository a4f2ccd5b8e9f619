"""The one answer extractor and answer comparison used by every stage.

A model's output is read in three tiers, and the first tier that finds anything decides:

1. ``Answer:`` lines (``Final answer:``, markdown bullets and bold allowed). If every such line
   parses to the same answer, that is the answer. If any line differs or does not parse, the
   output is :data:`UNPARSABLE`.
2. Only when there is no such line: explicit phrases ("the correct answer is (B)", "answer: B"
   inside a line, ``\\boxed{B}``), by the same rule.
3. Only when neither exists: an output that is, as a whole, one valid answer (``B``, ``Yes.``,
   ``$12.5 million``). Span answers skip this tier, because any text would pass.

Matches are restricted to the task's options or labels. The extractor never guesses: anything
ambiguous ("A or B", two different answer lines, an unfinished ``<think>`` block) is
:data:`UNPARSABLE`, and callers count parse failures apart from wrong answers (see
:class:`AnswerCounts`).

Numeric answers are returned as plain decimal strings in the gold's scale. A number with a scale
word ("12.5 million", "12,500 thousand") is converted to the gold scale, and a bare number is
taken to be in the gold scale already. :func:`is_correct` also accepts a bare number that is the
absolute amount ("12,500,000" for 12.5 with scale million).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Literal

from bridge.data.types import MULTI_SPAN_SEPARATOR, Example, TaskFormat, TaskSpec

#: The value returned when an output contains no answer, or more than one.
UNPARSABLE = "unparsable"

#: The text that starts the final answer line of every completion and every scoring prompt.
ANSWER_PREFIX = "Answer:"

#: Labels of a yes/no/maybe task whose TaskSpec leaves ``labels`` empty.
YES_NO_MAYBE = ("yes", "no", "maybe")

#: Multipliers of the scales a gold answer can have ("" is the number as written).
SCALE_MULTIPLIERS: dict[str, Decimal] = {
    "": Decimal(1),
    "thousand": Decimal(10) ** 3,
    "million": Decimal(10) ** 6,
    "billion": Decimal(10) ** 9,
}

Grade = Literal["correct", "wrong", "unparsable"]

# --------------------------------------------------------------------------------------------
# Text clean-up

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LATEX_COMMANDS = re.compile(r"\\(?:boxed|text|textbf|textit|mathrm|mathbf|mbox|fbox)\s*\{([^{}]*)\}")
_SPACES = re.compile(r"\s+")
_TRAILING_PUNCTUATION = ".;!?,:"
_QUOTE_PAIRS = ('""', "''", "“”", "‘’")


def _strip_reasoning_blocks(text: str) -> str | None:
    """Remove ``<think>`` blocks; return None when a block is left open (no final answer yet)."""
    text = _THINK_BLOCK.sub("\n", text)
    lowered = text.lower()
    if "</think>" in lowered:
        # The chat template opened the block inside the prompt, so the output starts inside it.
        text = text[lowered.rindex("</think>") + len("</think>") :]
        lowered = text.lower()
    if "<think>" in lowered:
        return None
    return text


def _normalise_unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")


def _strip_wrappers(value: str) -> str:
    """Remove markdown emphasis, LaTeX wrappers and surrounding quotes from an answer value."""
    value = value.strip()
    for _ in range(3):
        value = _LATEX_COMMANDS.sub(r"\1", value)
    value = value.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    value = value.replace("\\%", "%").replace("\\$", "$").replace("\\,", "").replace("{,}", ",")
    value = value.replace("**", "").replace("__", "").replace("`", "")
    value = value.strip()
    # Math mode: $B$ or $$12.5$$, but not the currency sign in "$12.5".
    math_mode = re.fullmatch(r"\$\$?(.+?)\$\$?", value)
    if math_mode:
        value = math_mode.group(1)
    previous = None
    while previous != value:
        previous = value
        value = value.strip().strip("*_~").strip()
        if len(value) >= 2 and value[0] + value[-1] in _QUOTE_PAIRS:
            value = value[1:-1]
        value = value.rstrip(_TRAILING_PUNCTUATION)
    return _SPACES.sub(" ", value).strip()


def _normalise_option_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w]+", " ", text)
    return _SPACES.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------
# Closed formats: option letters and labels

_LETTER_FIRST = re.compile(
    r"^(?:(?:option|choice)\s*)?(?P<open>[(\[])?\s*(?P<letter>[A-Za-z])\s*(?P<close>[)\]])?"
    r"(?P<rest>(?:[\s.:,;\-].*)?)$",
    re.IGNORECASE | re.DOTALL,
)
_CONNECTOR = r"(?:or|and|/|,|&|vs\.?|versus)"


def _valid_letters(task: TaskSpec, options: dict[str, str] | None) -> tuple[str, ...]:
    if options:
        return tuple(letter.upper() for letter in options)
    if task.labels:
        return tuple(label.upper() for label in task.labels)
    return tuple(string.ascii_uppercase)


def _labels_of(task: TaskSpec) -> tuple[str, ...]:
    if task.labels:
        return task.labels
    if task.format == "yes_no_maybe":
        return YES_NO_MAYBE
    return ()


def _match_option_text(value: str, options: dict[str, str] | None) -> str | None:
    """Return the letter of the one option whose text equals ``value`` after normalisation."""
    if not options:
        return None
    normalised = _normalise_option_text(value)
    if not normalised:
        return None
    hits = [letter for letter, text in options.items() if _normalise_option_text(text) == normalised]
    return hits[0].upper() if len(hits) == 1 else None


def _parse_letter(value: str, task: TaskSpec, options: dict[str, str] | None, strict: bool) -> str | None:
    letters = _valid_letters(task, options)
    match = _LETTER_FIRST.match(value)
    if match:
        letter = match.group("letter")
        rest = match.group("rest")
        bracketed = bool(match.group("open") or match.group("close"))
        rest_text = rest.lstrip(" \t.:;)-]").strip()
        # A lower-case letter followed by words is an article or a word ("a drug"), not an option.
        lower_ok = letter.isupper() or bracketed or not rest_text or (rest[:1] != "" and rest[:1] in ".):")
        if letter.upper() in letters and lower_ok and (not match.group("open") or match.group("close")):
            letter = letter.upper()
            if not rest_text:
                return letter
            other = re.match(rf"^{_CONNECTOR}\s*(?:option\s*)?[(\[]?\s*([A-Za-z])\s*[)\]]?(?:$|[\s.,;:)])", rest_text, re.IGNORECASE)
            if other and other.group(1).upper() in letters and other.group(1).upper() != letter:
                return None
            named = _match_option_text(rest_text, options)
            if named is not None:
                return letter if named == letter else None
            if strict:
                return None
            return letter
    return _match_option_text(value, options)


def _parse_label(value: str, labels: Sequence[str], strict: bool) -> str | None:
    folded = value.casefold()
    for label in sorted(labels, key=len, reverse=True):
        pattern = re.escape(label.casefold()).replace(r"\ ", r"\s+")
        match = re.match(rf"^{pattern}(?![\w])(?P<rest>.*)$", folded, re.DOTALL)
        if not match:
            continue
        rest = match.group("rest").lstrip(" \t.,;:!)-").strip()
        if not rest:
            return label
        if strict:
            return None
        others = "|".join(re.escape(o.casefold()) for o in labels if o.casefold() != label.casefold())
        if others and re.match(rf"^{_CONNECTOR}\s*(?:{others})(?![\w])", rest):
            return None
        return label
    return None


def normalise_label(
    value: str,
    task: TaskSpec,
    options: dict[str, str] | None = None,
    *,
    strict: bool = False,
) -> str | None:
    """Map an answer value of a closed-format task to its canonical label, or None.

    Multiple choice returns the option letter: a letter in any usual wrapping (``B``, ``(B)``,
    ``B.``, ``Option B``, ``B) text``) or the exact text of exactly one option. Label tasks
    return the label as spelt in ``task.labels`` for a value that starts with it (``Yes.``,
    ``yes, because``). A second, different letter or label after "or", "and" or "/" makes the
    value ambiguous (None). With ``strict`` the value must be the answer and nothing more.
    """
    value = _strip_wrappers(_normalise_unicode(value))
    if not value:
        return None
    if task.format == "multiple_choice":
        return _parse_letter(value, task, options, strict)
    labels = _labels_of(task)
    if not labels:
        return None
    return _parse_label(value, labels, strict)


# --------------------------------------------------------------------------------------------
# Open formats: numbers and spans

_CURRENCY = r"(?:(?:US|USD|A|C|HK|NZ|S)?\$|[€£¥₹]|(?:USD|EUR|GBP|RMB|CNY|JPY|INR)\s?)"
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"


def _scale_word(suffix: str) -> str:
    """Return the pattern of a scale word, with group names ending in ``suffix``."""
    return (
        rf"(?:(?:\s*(?P<scale{suffix}>%|percent(?:age)?(?:\s+points?)?|per\s?cent|pct|thousands?|millions?"
        rf"|billions?|trillions?)|(?P<abbreviation{suffix}>k|mn|mm|m|bn|b|tn|pp))(?![A-Za-z]))"
    )


# Abbreviations ("12.5m", "3bn") count only when written directly after the digits, so that
# "12 m" (metres) and "5 B" (an option letter) are not read as scales. The scale word may also
# follow a closing parenthesis, as in "(114) million".
_NUMBER_AT_START = re.compile(
    rf"^(?P<open>\()?\s*(?P<sign>[-+])?\s*{_CURRENCY}?\s*(?P<sign2>[-+])?\s*(?P<number>{_NUMBER})"
    rf"{_scale_word('')}?(?:\s*(?P<close>\)){_scale_word('_after')}?)?(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_HEDGE = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|nearly|almost|~|≈|=)\s*", re.IGNORECASE)
_UNIT_WORDS = re.compile(
    r"^(?:dollars?|usd|euros?|eur|pounds?|gbp|yuan|rmb|yen|shares?|units?|people|employees|years?|days?|times)\b",
    re.IGNORECASE,
)
_RANGE_OR_CHOICE = re.compile(rf"^(?:{_CONNECTOR}|to|-)\s*{_CURRENCY}?\s*[-+]?\d", re.IGNORECASE)

_ANSWER_SCALES = {
    "%": "percent", "percent": "percent", "percentage": "percent", "per cent": "percent",
    "pct": "percent", "pp": "percent",
    "thousand": "thousand", "thousands": "thousand", "k": "thousand",
    "million": "million", "millions": "million", "mn": "million", "mm": "million", "m": "million",
    "billion": "billion", "billions": "billion", "bn": "billion", "b": "billion",
    "trillion": "trillion", "trillions": "trillion", "tn": "trillion",
}
_TRILLION = Decimal(10) ** 12


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from an answer, with the scale word written after it (None when bare)."""

    value: Decimal
    scale: str | None


def parse_number(text: str, *, whole: bool = True) -> ParsedNumber | None:
    """Read a number with optional sign, currency, thousands separators, scale word and parentheses.

    ``(1,234)`` is -1234, as in financial tables. With ``whole`` the text must be the number and
    nothing more (a trailing currency or unit word is allowed). Otherwise the number only has to
    start the text, and a range or choice of numbers ("10 to 12", "5 or 6") is rejected.
    """
    text = _strip_wrappers(_normalise_unicode(text))
    text = _HEDGE.sub("", text).strip()
    match = _NUMBER_AT_START.match(text)
    if not match:
        return None
    opened, closed = bool(match.group("open")), bool(match.group("close"))
    rest = match.group("rest").strip()
    if opened and not closed:
        return None
    if match.group("sign") and match.group("sign2"):
        return None
    rest = _UNIT_WORDS.sub("", rest).strip().rstrip(_TRAILING_PUNCTUATION).strip()
    if whole and rest:
        return None
    if rest and _RANGE_OR_CHOICE.match(rest):
        return None
    try:
        value = Decimal(match.group("number").replace(",", ""))
    except InvalidOperation:
        return None
    negative = (match.group("sign") or match.group("sign2")) == "-"
    if opened and closed:
        negative = not negative
    if negative:
        value = -value
    inner = match.group("scale") or match.group("abbreviation")
    outer = match.group("scale_after") or match.group("abbreviation_after")
    if inner and outer:
        return None
    raw_scale = inner or outer
    scale = None
    if raw_scale is not None:
        key = _SPACES.sub(" ", raw_scale.lower())
        key = re.sub(r"\s+points?$", "", key)
        scale = _ANSWER_SCALES[key]
    return ParsedNumber(value, scale)


def to_gold_scale(number: ParsedNumber, gold_scale: str) -> Decimal:
    """Express ``number`` in ``gold_scale``.

    A bare number is taken to be in the gold scale already. Percent and the magnitude scales do
    not convert into each other, so a percentage against a magnitude gold (or the reverse) keeps
    its value as written.
    """
    if number.scale is None:
        return number.value
    if number.scale == "percent" or gold_scale == "percent":
        return number.value
    multiplier = _TRILLION if number.scale == "trillion" else SCALE_MULTIPLIERS[number.scale]
    return number.value * multiplier / SCALE_MULTIPLIERS.get(gold_scale, Decimal(1))


def format_decimal(value: Decimal) -> str:
    """Write a decimal as a plain string without exponent or trailing zeros ("12.5", "-3", "0")."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def split_spans(text: str) -> list[str]:
    """Split a multi-span answer at ``|`` (the separator is ``MULTI_SPAN_SEPARATOR``)."""
    separator = MULTI_SPAN_SEPARATOR.strip()
    return [part.strip() for part in text.split(separator) if part.strip()]


def _parse_open_part(part: str, answer_format: TaskFormat, scale: str) -> str | None:
    """Normalise one part of an open answer: a number in the gold scale, else cleaned text."""
    part = _strip_wrappers(_normalise_unicode(part))
    if not part:
        return None
    candidates = [part]
    if "=" in part:
        # An equation "1,452.4 - 1,146.2 = 306.2" answers with its right-hand side.
        candidates.insert(0, part.rsplit("=", 1)[1])
    for candidate in candidates:
        number = parse_number(candidate, whole=True)
        if number is None and answer_format == "numeric":
            number = parse_number(candidate, whole=False)
        if number is not None:
            return format_decimal(to_gold_scale(number, scale))
    if answer_format == "numeric":
        return None
    return part


def _parse_open(value: str, answer_format: TaskFormat, scale: str) -> str | None:
    parts = split_spans(_normalise_unicode(value))
    if not parts:
        return None
    parsed = [_parse_open_part(part, answer_format, scale) for part in parts]
    if any(p is None for p in parsed):
        return None
    return MULTI_SPAN_SEPARATOR.join(p for p in parsed if p is not None)


# --------------------------------------------------------------------------------------------
# Finding answer values in an output

#: A final answer line: ``Answer: B``, ``Final answer: B``, ``**Answer:** B``, ``- Answer: B``.
ANSWER_LINE_PATTERN = re.compile(
    r"^[\s>#*_\-•]*(?:\d+[.)]\s*)?(?:the\s+)?(?:final|correct)?\s*answer[\s*_]*[:：][\s*_]*(?P<value>.*)$",
    re.IGNORECASE,
)
# A phrase's value runs to the end of its sentence: a period after a non-digit, "!", "?" or ";"
# followed by a space, or the end of the line. Periods inside numbers ("12.5") do not end it.
_PHRASE_VALUE = r"(?P<value>[^\n]*?)(?=(?<=[^\d\s])\.(?:\s|$)|[!?;](?:\s|$)|\n|$)"
_ANSWER_PHRASES = (
    re.compile(
        r"\b(?:(?:correct|final|right|best|most\s+likely|most\s+appropriate|true)\s+)?answer\s+"
        r"(?:is|would\s+be|will\s+be|should\s+be)\b\s*[:：]?\s*" + _PHRASE_VALUE,
        re.IGNORECASE | re.MULTILINE,
    ),
    re.compile(
        r"\b(?:correct|right|best|most\s+appropriate)\s+(?:option|choice|label)\s+(?:is|would\s+be)\b\s*[:：]?"
        r"\s*" + _PHRASE_VALUE,
        re.IGNORECASE | re.MULTILINE,
    ),
    re.compile(r"\banswer[\s*_]*[:：][\s*_]*" + _PHRASE_VALUE, re.IGNORECASE | re.MULTILINE),
    re.compile(r"\\boxed\s*\{(?P<value>[^{}\n]*)\}"),
)


def _answer_line_values(body: str) -> list[str]:
    lines = body.splitlines()
    values = []
    index = 0
    while index < len(lines):
        match = ANSWER_LINE_PATTERN.match(lines[index])
        index += 1
        if not match:
            continue
        value = match.group("value").strip()
        if not _strip_wrappers(value):
            # "Answer:" alone on a line: the answer is on the next non-empty line.
            while index < len(lines) and not lines[index].strip():
                index += 1
            if index < len(lines):
                value = lines[index].strip()
                index += 1
        values.append(value)
    return values


def _phrase_values(body: str) -> list[str]:
    found: list[tuple[int, str]] = []
    claimed: list[tuple[int, int]] = []
    for pattern in _ANSWER_PHRASES:
        for match in pattern.finditer(body):
            start, end = match.span("value")
            # Two patterns can match the same phrase; its value counts once.
            if any(s <= start < e for s, e in claimed):
                continue
            claimed.append((start, end))
            value = match.group("value")
            if _strip_wrappers(value):
                found.append((match.start(), value))
    return [value for _, value in sorted(found)]


def _parse_value(
    value: str, task: TaskSpec, options: dict[str, str] | None, scale: str, answer_format: TaskFormat, strict: bool
) -> str | None:
    if answer_format in ("numeric", "span"):
        return _parse_open(value, answer_format, scale)
    return normalise_label(value, task, options, strict=strict)


def _parse_line_value(
    value: str, task: TaskSpec, options: dict[str, str] | None, scale: str, answer_format: TaskFormat
) -> str | None:
    """Parse an answer line's value, or an explicit phrase inside it ("Answer: The answer is B").

    Any text is a valid span, so for open formats a phrase inside the value is read first.
    """
    open_format = answer_format in ("numeric", "span")
    parsed = None if open_format else _parse_value(value, task, options, scale, answer_format, False)
    if parsed is not None:
        return parsed
    inner = _phrase_values(value)
    if not inner:
        return _parse_value(value, task, options, scale, answer_format, False) if open_format else None
    result = _agreed([_parse_value(v, task, options, scale, answer_format, False) for v in inner])
    return None if result == UNPARSABLE else result


def _agreed(values: list[str | None]) -> str:
    if not values or any(v is None for v in values):
        return UNPARSABLE
    distinct = set(values)
    return values[0] if len(distinct) == 1 and values[0] is not None else UNPARSABLE


def extract_answer(
    text: str,
    task: TaskSpec,
    options: dict[str, str] | None = None,
    scale: str = "",
    *,
    answer_format: TaskFormat | None = None,
) -> str:
    """Return the normalised answer in ``text``, or :data:`UNPARSABLE`.

    ``options`` maps option letters to their texts (multiple choice), ``scale`` is the gold's
    scale (numeric), and ``answer_format`` overrides ``task.format`` for tasks that mix formats
    (use :func:`extract_for` to take all three from an example). A completion generated after a
    prompt that ends in ``Answer:`` must be passed with that prefix put back.
    """
    answer_format = answer_format or task.format
    body = _strip_reasoning_blocks(text)
    if body is None:
        return UNPARSABLE
    body = _normalise_unicode(body)

    lines = _answer_line_values(body)
    if lines:
        return _agreed([_parse_line_value(v, task, options, scale, answer_format) for v in lines])

    phrases = _phrase_values(body)
    if phrases:
        return _agreed([_parse_value(v, task, options, scale, answer_format, False) for v in phrases])

    whole = body.strip()
    if not whole or "\n" in whole or answer_format == "span":
        return UNPARSABLE
    if answer_format == "numeric":
        number = parse_number(whole, whole=True)
        return format_decimal(to_gold_scale(number, scale)) if number is not None else UNPARSABLE
    label = normalise_label(whole, task, options, strict=True)
    return label if label is not None else UNPARSABLE


def extract_for(text: str, task: TaskSpec, example: Example) -> str:
    """Extract the answer to ``example`` with its options, gold scale and answer format."""
    return extract_answer(
        text, task, example.options, example.scale, answer_format=task.format_for(example)
    )


# --------------------------------------------------------------------------------------------
# Comparison


def normalise_span(text: str) -> str:
    """Normalise a span: case folded, punctuation and the articles a/an/the removed, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(?:a|an|the)\b", " ", text)
    return _SPACES.sub(" ", text).strip()


def _gold_decimals(gold: str) -> int:
    text = gold.strip().lstrip("-+")
    return len(text.split(".", 1)[1]) if "." in text else 0


def numbers_match(pred: Decimal, gold: Decimal, gold_text: str, scale: str, rel_tolerance: float) -> bool:
    """Compare a predicted number with the gold number in the gold's scale.

    A match is within ``rel_tolerance`` of the gold value, or equal to it after rounding half up to
    the gold's decimal places when the gold has any (2.96 matches a gold of 3.0). A prediction
    written as the absolute amount (12500000 for 12.5 million) or as a fraction for a percentage
    (0.125 for 12.5 percent) also matches.
    """
    candidates = [pred]
    if scale in SCALE_MULTIPLIERS and scale:
        candidates.append(pred / SCALE_MULTIPLIERS[scale])
    if scale == "percent":
        candidates.append(pred * 100)
    places = _gold_decimals(gold_text)
    for candidate in candidates:
        if math.isclose(float(candidate), float(gold), rel_tol=0.0, abs_tol=rel_tolerance * abs(float(gold))):
            return True
        if places > 0 and _rounds_to(candidate, gold, places):
            return True
    return False


def _rounds_to(pred: Decimal, gold: Decimal, places: int) -> bool:
    quantum = Decimal(1).scaleb(-places)
    try:
        return pred.quantize(quantum, rounding=ROUND_HALF_UP) == gold.quantize(quantum, rounding=ROUND_HALF_UP)
    except InvalidOperation:
        # The rounded value needs more digits than the decimal context holds: far from any gold.
        return False


def _parts_equal(pred: str, gold: str, scale: str, rel_tolerance: float, answer_format: TaskFormat) -> bool:
    gold_number = parse_number(gold, whole=True)
    pred_number = parse_number(pred, whole=answer_format != "numeric")
    if gold_number is not None and pred_number is not None:
        gold_value = to_gold_scale(gold_number, scale) if gold_number.scale else gold_number.value
        return numbers_match(to_gold_scale(pred_number, scale), gold_value, gold, scale, rel_tolerance)
    if gold_number is not None and answer_format == "numeric":
        return False
    return normalise_span(pred) == normalise_span(gold) and bool(normalise_span(gold))


def is_correct(
    pred: str,
    gold: str,
    task: TaskSpec,
    scale: str = "",
    *,
    answer_format: TaskFormat | None = None,
    options: dict[str, str] | None = None,
) -> bool:
    """Return True when an extracted answer equals the gold answer; :data:`UNPARSABLE` never does.

    Closed formats compare canonical labels. Open formats split both sides at ``|`` and match the
    parts in any order: parts that are both numbers compare numerically in the gold's ``scale``
    with ``task.rel_tolerance`` (see :func:`numbers_match`), other parts compare after
    :func:`normalise_span`.
    """
    if pred.strip() == UNPARSABLE or not pred.strip():
        return False
    answer_format = answer_format or task.format
    if answer_format not in ("numeric", "span"):
        pred_label = normalise_label(pred, task, options, strict=True)
        gold_label = normalise_label(gold, task, options, strict=True)
        return pred_label is not None and pred_label == gold_label
    pred_parts = split_spans(pred)
    gold_parts = split_spans(gold)
    if len(pred_parts) != len(gold_parts):
        return False
    unmatched = list(gold_parts)
    for part in pred_parts:
        hit = next(
            (g for g in unmatched if _parts_equal(part, g, scale, task.rel_tolerance, answer_format)), None
        )
        if hit is None:
            return False
        unmatched.remove(hit)
    return True


def is_correct_for(pred: str, task: TaskSpec, example: Example) -> bool:
    """Compare an extracted answer with ``example.gold`` using its scale, options and format."""
    return is_correct(
        pred, example.gold, task, example.scale, answer_format=task.format_for(example), options=example.options
    )


def _bag_f1(pred: str, gold: str, scale: str, rel_tolerance: float) -> float:
    pred_number = parse_number(pred, whole=True)
    gold_number = parse_number(gold, whole=True)
    if pred_number is not None and gold_number is not None:
        return 1.0 if _parts_equal(pred, gold, scale, rel_tolerance, "span") else 0.0
    pred_tokens = normalise_span(pred).split()
    gold_tokens = normalise_span(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = 0
    remaining = list(gold_tokens)
    for token in pred_tokens:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, gold: str, *, scale: str = "", rel_tolerance: float = 1e-3) -> float:
    """Return the bag-of-tokens F1 of a span answer after :func:`normalise_span`.

    Multi-span answers are split at ``|`` and their parts paired one to one to maximise the total
    F1 (Hungarian assignment), then the sum is divided by the larger part count, so a missing or
    extra part costs. Parts that are both numbers score 1 when they match, else 0.
    :data:`UNPARSABLE` scores 0.
    """
    if pred.strip() == UNPARSABLE:
        return 0.0
    pred_parts = split_spans(pred) or [""]
    gold_parts = split_spans(gold) or [""]
    scores = [[_bag_f1(p, g, scale, rel_tolerance) for g in gold_parts] for p in pred_parts]
    if len(pred_parts) == 1 and len(gold_parts) == 1:
        return scores[0][0]
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(scores, maximize=True)
    total = sum(scores[r][c] for r, c in zip(rows, columns, strict=True))
    return total / max(len(pred_parts), len(gold_parts))


def grade(
    pred: str,
    gold: str,
    task: TaskSpec,
    scale: str = "",
    *,
    answer_format: TaskFormat | None = None,
    options: dict[str, str] | None = None,
) -> Grade:
    """Classify an extracted answer as correct, wrong or unparsable."""
    if pred.strip() == UNPARSABLE:
        return "unparsable"
    if is_correct(pred, gold, task, scale, answer_format=answer_format, options=options):
        return "correct"
    return "wrong"


@dataclass
class AnswerCounts:
    """Correct, wrong and unparsable answers, kept apart so parse failures are never hidden."""

    correct: int = 0
    wrong: int = 0
    unparsable: int = 0

    def add(self, result: Grade) -> None:
        """Count one graded answer."""
        if result == "correct":
            self.correct += 1
        elif result == "wrong":
            self.wrong += 1
        elif result == "unparsable":
            self.unparsable += 1
        else:
            raise ValueError(f"invalid grade {result!r}: expected correct, wrong or unparsable")

    @property
    def total(self) -> int:
        return self.correct + self.wrong + self.unparsable

    @property
    def accuracy(self) -> float:
        """Correct answers over all answers; parse failures count as not correct."""
        return self.correct / self.total if self.total else 0.0

    @property
    def unparsable_rate(self) -> float:
        return self.unparsable / self.total if self.total else 0.0

    @property
    def parsed_accuracy(self) -> float:
        """Correct answers over parsed answers only."""
        parsed = self.correct + self.wrong
        return self.correct / parsed if parsed else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Return the counts and rates for a report row."""
        return {
            **asdict(self),
            "total": self.total,
            "accuracy": self.accuracy,
            "unparsable_rate": self.unparsable_rate,
            "parsed_accuracy": self.parsed_accuracy,
        }
