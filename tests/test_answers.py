"""The answer extractor and answer comparison, case by case."""

from __future__ import annotations

from decimal import Decimal

import pytest

from bridge.answers import (
    UNPARSABLE,
    AnswerCounts,
    extract_answer,
    extract_for,
    grade,
    is_correct,
    is_correct_for,
    normalise_label,
    parse_number,
    token_f1,
)
from bridge.data.types import Example, TaskSpec

MC = TaskSpec("medqa", "multiple_choice", ("A", "B", "C", "D"))
YNM = TaskSpec("pubmedqa", "yes_no_maybe", ("yes", "no", "maybe"))
SENTIMENT = TaskSpec("twitter", "classification", ("bearish", "bullish", "neutral"))
NUMERIC = TaskSpec("tatqa", "numeric")
SPAN = TaskSpec("tatqa", "span")

OPTIONS = {
    "A": "Disclose the error to the patient and put it in the operative report",
    "B": "Tell the attending that he cannot fail to disclose this mistake",
    "C": "Report the physician to the ethics committee",
    "D": "Refuse to dictate the operative report",
}

# (id, task, output text, options, gold scale, expected answer)
EXTRACTION_CASES = [
    # Answer lines
    ("answer-line", MC, "Answer: C", None, "", "C"),
    ("explicit-phrase-parenthesised", MC, "The correct answer is (B).", None, "", "B"),
    ("upper-case-bold", MC, "ANSWER: **A**", None, "", "A"),
    ("bold-label", MC, "**Answer:** D", None, "", "D"),
    ("bold-whole-line", MC, "**Answer: D**", None, "", "D"),
    ("final-answer", MC, "Final answer: B", None, "", "B"),
    ("markdown-heading", MC, "### Answer: C", None, "", "C"),
    ("bullet", MC, "- Answer: (C)", None, "", "C"),
    ("value-on-next-line", MC, "Reasoning here.\n**Answer:**\n\nC", None, "", "C"),
    ("repeated-after-restatement", MC, "Answer: B\nTo restate: option B fits best.\nAnswer: B", None, "", "B"),
    ("phrase-then-line-agree", MC, "The correct answer is (A).\nAnswer: A", None, "", "A"),
    ("text-after-answer-line", MC, "Answer: C\nExplanation: option A is wrong because the dose is too high.", None, "", "C"),
    ("empty-think-prefix", MC, "<think></think>\nAnswer: D", None, "", "D"),
    ("think-with-other-answer", MC, "<think>Maybe Answer: A</think>\nAnswer: B", None, "", "B"),
    ("think-closed-only", MC, "I believe A is tempting.</think>\nAnswer: C", None, "", "C"),
    ("letter-with-option-text", MC, "Answer: B) Tell the attending that he cannot fail to disclose this mistake", OPTIONS, "", "B"),
    ("letter-with-paraphrase", MC, "Answer: B, tell the attending", OPTIONS, "", "B"),
    ("option-text-only", MC, "Answer: Tell the attending that he cannot fail to disclose this mistake.", OPTIONS, "", "B"),
    ("option-text-any-case", MC, "answer: refuse to dictate the operative report", OPTIONS, "", "D"),
    ("option-word", MC, "Answer: Option C", None, "", "C"),
    ("latex-boxed", MC, "So we get $\\boxed{C}$", None, "", "C"),
    ("latex-text-in-line", MC, "Answer: $\\text{B}$", None, "", "B"),
    ("backticks", MC, "Answer: `A`", None, "", "A"),
    ("lower-case-letter", MC, "Answer: c", None, "", "C"),
    ("phrase-inside-line", MC, "Answer: The correct answer is (B).", None, "", "B"),
    ("bare-letter", MC, "B", None, "", "B"),
    ("bare-letter-period", MC, " (D). ", None, "", "D"),
    ("answer-is-not-other", MC, "The answer is (A), not D.", None, "", "A"),
    ("therefore-phrase", MC, "Therefore, the answer is B because the dose matters.", None, "", "B"),
    # Closed-format failures
    ("answer-seems-a-or-b", MC, "Answer seems to be A or B", None, "", UNPARSABLE),
    ("two-different-lines", MC, "Answer: A\nOn reflection:\nAnswer: B", None, "", UNPARSABLE),
    ("line-a-or-b", MC, "Answer: A or B", None, "", UNPARSABLE),
    ("line-a-and-c", MC, "Answer: A and C", None, "", UNPARSABLE),
    ("line-slash", MC, "Answer: B/C", None, "", UNPARSABLE),
    ("letter-outside-options", MC, "Answer: E", OPTIONS, "", UNPARSABLE),
    ("letter-contradicts-text", MC, "Answer: B) Refuse to dictate the operative report", OPTIONS, "", UNPARSABLE),
    ("unknown-option-text", MC, "Answer: Call the police", OPTIONS, "", UNPARSABLE),
    ("one-line-unparsable-one-valid", MC, "Answer: let me think\nAnswer: B", None, "", UNPARSABLE),
    ("unclosed-think", MC, "<think>The answer is B, I think", None, "", UNPARSABLE),
    ("no-answer-at-all", MC, "The dose is too high and the patient is at risk.", None, "", UNPARSABLE),
    ("article-is-not-letter", MC, "a disclosure to the patient", None, "", UNPARSABLE),
    ("empty", MC, "", None, "", UNPARSABLE),
    ("phrases-disagree", MC, "The correct answer is A. Wait, the correct answer is C.", None, "", UNPARSABLE),
    # Labels
    ("yes-line", YNM, "Answer: yes", None, "", "yes"),
    ("yes-capital-period", YNM, "Yes.", None, "", "yes"),
    ("yes-with-reason", YNM, "Answer: Yes, because the trial met its end point.", None, "", "yes"),
    ("maybe-bold", YNM, "Answer: **Maybe**", None, "", "maybe"),
    ("no-phrase", YNM, "Therefore, the answer is no.", None, "", "no"),
    ("yes-or-no", YNM, "Answer: yes or no", None, "", UNPARSABLE),
    ("yes-slash-no", YNM, "Answer: Yes/No", None, "", UNPARSABLE),
    ("sentence-starting-with-no", YNM, "No evidence supports the treatment.\nThe effect is small.", None, "", UNPARSABLE),
    ("probably-yes", YNM, "Answer: probably yes", None, "", UNPARSABLE),
    ("bullish-line", SENTIMENT, "Answer: Bullish", None, "", "bullish"),
    ("bullish-bare", SENTIMENT, "bullish", None, "", "bullish"),
    ("neutral-quoted", SENTIMENT, 'Answer: "neutral"', None, "", "neutral"),
    ("label-not-in-task", SENTIMENT, "Answer: positive", None, "", UNPARSABLE),
    # Numbers
    ("thousands-separator", NUMERIC, "Answer: 1,452.4", None, "million", "1452.4"),
    ("currency-and-scale-word", NUMERIC, "Answer: $12.5 million", None, "million", "12.5"),
    ("absolute-amount-kept", NUMERIC, "Answer: 12,500,000", None, "million", "12500000"),
    ("thousand-to-million", NUMERIC, "Answer: 12,500 thousand", None, "million", "12.5"),
    ("billion-abbreviation", NUMERIC, "Answer: €3bn", None, "million", "3000"),
    ("million-abbreviation", NUMERIC, "Answer: approximately 12.5m", None, "million", "12.5"),
    ("scale-to-plain", NUMERIC, "Answer: 1.2 million", None, "", "1200000"),
    ("parentheses-negative", NUMERIC, "Answer: (1,234)", None, "", "-1234"),
    ("parentheses-currency", NUMERIC, "Answer: ($3.5)", None, "million", "-3.5"),
    ("percent-sign", NUMERIC, "Answer: -3.0%", None, "percent", "-3"),
    ("percent-word", NUMERIC, "Answer: 12.5 percent", None, "percent", "12.5"),
    ("unicode-minus", NUMERIC, "Answer: \u22122.5", None, "", "-2.5"),
    ("equation", NUMERIC, "Answer: 1,496.5 - 1,202.9 = 293.6", None, "million", "293.6"),
    ("number-then-words", NUMERIC, "Answer: 293.6 million, up from 2018", None, "million", "293.6"),
    ("bare-number", NUMERIC, "12.5", None, "", "12.5"),
    ("latex-number", NUMERIC, "Answer: $\\boxed{42}$", None, "", "42"),
    ("numeric-phrase", NUMERIC, "So the change is large; the answer is 3.2%. That is high.", None, "percent", "3.2"),
    ("range", NUMERIC, "Answer: 10 to 12", None, "", UNPARSABLE),
    ("choice-of-numbers", NUMERIC, "Answer: 5 or 6", None, "", UNPARSABLE),
    ("no-number", NUMERIC, "Answer: not stated", None, "", UNPARSABLE),
    ("two-numeric-lines", NUMERIC, "Answer: 12\nAnswer: 13", None, "", UNPARSABLE),
    # Spans
    ("span", SPAN, "Answer: Fixed Price", None, "", "Fixed Price"),
    ("multi-span", SPAN, "Answer: Fixed Price | Other", None, "", "Fixed Price | Other"),
    ("span-number", SPAN, "Answer: $1,496.5", None, "million", "1496.5"),
    ("span-phrase-sentence", SPAN, "I checked the table, so the answer is fixed price contracts. Then more.", None, "", "fixed price contracts"),
    ("span-phrase-inside-line", SPAN, "Answer: The answer is Fixed Price.", None, "", "Fixed Price"),
    ("numeric-phrase-inside-line", NUMERIC, "Answer: the final answer is $3.2 million", None, "million", "3.2"),
    ("span-without-answer-line", SPAN, "Fixed Price", None, "", UNPARSABLE),
    ("span-two-lines-differ", SPAN, "Answer: Fixed Price\nAnswer: Other", None, "", UNPARSABLE),
]


@pytest.mark.parametrize(
    ("task", "text", "options", "scale", "expected"),
    [case[1:] for case in EXTRACTION_CASES],
    ids=[case[0] for case in EXTRACTION_CASES],
)
def test_extract_answer(task, text, options, scale, expected):
    assert extract_answer(text, task, options, scale) == expected


def test_extraction_case_ids_unique():
    ids = [case[0] for case in EXTRACTION_CASES]
    assert len(ids) == len(set(ids))


def test_quoted_answer_mid_line_ignored():
    # "Answer:" inside a sentence is no answer line, so the real line decides. A second answer
    # line at the start of a line counts, and two different lines make the output unparsable.
    text = 'The question said "Answer: A" to trick me.\nAnswer: C'
    assert extract_answer(text, MC) == "C"
    text = "Answer: A\n(the question told me to write A)\nAnswer: C"
    assert extract_answer(text, MC) == UNPARSABLE


def test_extract_for_uses_example_fields():
    example = Example(
        id="t1", question="What was revenue?", gold="12.5", scale="million", answer_format="numeric"
    )
    assert extract_for("Answer: 12,500 thousand", SPAN, example) == "12.5"
    # As a span task the same output text is kept as text unless it is a whole number.
    assert extract_for("Answer: about twelve million", SPAN, example) == UNPARSABLE
    mc_example = Example(id="m1", question="Q?", gold="B", options=OPTIONS)
    assert extract_for("Answer: Refuse to dictate the operative report", MC, mc_example) == "D"


# (id, task, pred, gold, scale, expected)
CORRECTNESS_CASES = [
    ("letter-equal", MC, "B", "B", "", True),
    ("letter-differs", MC, "A", "B", "", False),
    ("label-case", YNM, "Yes", "yes", "", True),
    ("unparsable-never-correct", YNM, UNPARSABLE, "yes", "", False),
    ("unparsable-gold-text", SPAN, UNPARSABLE, "unparsable", "", False),
    ("empty-pred", SPAN, "", "", "", False),
    ("within-tolerance", NUMERIC, "1452.5", "1452.4", "million", True),
    ("outside-tolerance", NUMERIC, "1460", "1452.4", "million", False),
    ("absolute-amount", NUMERIC, "12500000", "12.5", "million", True),
    ("scale-word-in-pred", NUMERIC, "12.5 million", "12.5", "million", True),
    ("absolute-with-separators", NUMERIC, "12,500,000", "12.5", "million", True),
    ("wrong-magnitude", NUMERIC, "12500", "12.5", "million", False),
    ("percent-fraction", NUMERIC, "0.125", "12.5", "percent", True),
    ("percent-sign-pred", NUMERIC, "12.5%", "12.5", "percent", True),
    ("rounded-to-gold-places", NUMERIC, "2.96", "3.0", "percent", True),
    ("rounded-off-by-more", NUMERIC, "2.94", "3.0", "percent", False),
    ("integer-gold-no-rounding", NUMERIC, "12.4", "12", "", False),
    ("negative-parentheses", NUMERIC, "(1,234)", "-1234", "", True),
    ("sign-matters", NUMERIC, "1234", "-1234", "", False),
    ("zero-gold-exact", NUMERIC, "0", "0", "", True),
    ("zero-gold-near", NUMERIC, "0.0001", "0", "", False),
    ("span-normalised", SPAN, "the Fixed-Price contracts.", "fixed price contracts", "", True),
    ("span-differs", SPAN, "fixed price", "fixed price contracts", "", False),
    ("multi-span-any-order", SPAN, "Other | Fixed Price", "Fixed Price | Other", "", True),
    ("multi-span-missing-part", SPAN, "Fixed Price", "Fixed Price | Other", "", False),
    ("multi-span-duplicate-part", SPAN, "Other | Other", "Fixed Price | Other", "", False),
    ("span-numbers-compare-numerically", SPAN, "$1,496.5", "1496.5", "million", True),
    ("span-year", SPAN, "2019", "2019", "", True),
    ("span-years-multi", SPAN, "2018 | 2019", "2019 | 2018", "", True),
    ("numeric-gold-text-pred", NUMERIC, "twelve", "12", "", False),
]


@pytest.mark.parametrize(
    ("task", "pred", "gold", "scale", "expected"),
    [case[1:] for case in CORRECTNESS_CASES],
    ids=[case[0] for case in CORRECTNESS_CASES],
)
def test_is_correct(task, pred, gold, scale, expected):
    assert is_correct(pred, gold, task, scale) is expected


def test_tolerance_is_configurable_per_task():
    loose = TaskSpec("tatqa", "numeric", rel_tolerance=0.01)
    assert is_correct("1460", "1452.4", loose, "million")
    assert not is_correct("1460", "1452.4", NUMERIC, "million")


def test_extracted_answers_match_gold_in_scale():
    # "12.5 million" and "12,500,000" both match a gold of 12.5 with scale million.
    for text in ("Answer: 12.5 million", "Answer: 12,500,000", "Answer: $12.5m", "Answer: 12.5"):
        pred = extract_answer(text, NUMERIC, scale="million")
        assert pred != UNPARSABLE, text
        assert is_correct(pred, "12.5", NUMERIC, "million"), text


def test_is_correct_for_uses_example_format():
    example = Example(id="t2", question="Q", gold="12.5", scale="million", answer_format="numeric")
    assert is_correct_for("12500000", SPAN, example)
    assert not is_correct_for("12.4", SPAN, example)


# (id, text, expected value or None, expected scale)
NUMBER_CASES = [
    ("plain", "12.5", "12.5", None),
    ("separators", "1,234,567.25", "1234567.25", None),
    ("dollar", "$1,496.5", "1496.5", None),
    ("us-dollar", "US$ 3", "3", None),
    ("euro-million", "€3.2 million", "3.2", "million"),
    ("parentheses", "(1,234)", "-1234", None),
    ("parentheses-then-scale", "(114) million", "-114", "million"),
    ("scale-inside-parentheses", "(1.6 million)", "-1.6", "million"),
    ("scale-twice", "(1.6 million) million", None, None),
    ("negative-percent", "-3.2%", "-3.2", "percent"),
    ("percentage-points", "2.5 percentage points", "2.5", "percent"),
    ("thousand-word", "12 thousand", "12", "thousand"),
    ("k-abbreviation", "12k", "12", "thousand"),
    ("spaced-m-is-not-scale", "12 m", None, None),
    ("trailing-unit", "25 dollars", "25", None),
    ("unbalanced-parenthesis", "(12", None, None),
    ("double-sign", "-$-5", None, None),
    ("text", "twelve", None, None),
    ("bad-grouping", "1,23", None, None),
]


@pytest.mark.parametrize(
    ("text", "value", "scale"), [case[1:] for case in NUMBER_CASES], ids=[case[0] for case in NUMBER_CASES]
)
def test_parse_number_whole(text, value, scale):
    parsed = parse_number(text, whole=True)
    if value is None:
        assert parsed is None
        return
    assert parsed is not None
    assert parsed.value == Decimal(value)
    assert parsed.scale == scale


def test_parse_number_leading_rejects_ranges():
    assert parse_number("12.5 million in 2019", whole=False).value == Decimal("12.5")
    assert parse_number("10 - 12", whole=False) is None
    assert parse_number("10 to 12", whole=False) is None


def test_normalise_label_strict():
    assert normalise_label("Yes.", YNM, strict=True) == "yes"
    assert normalise_label("Yes, because", YNM, strict=True) is None
    assert normalise_label("Yes, because", YNM) == "yes"
    assert normalise_label("(B)", MC, strict=True) == "B"
    assert normalise_label("B because", MC, strict=True) is None


def test_token_f1_values():
    assert token_f1("fixed price", "fixed price contracts") == pytest.approx(0.8)
    assert token_f1("The Fixed Price", "fixed price") == pytest.approx(1.0)
    assert token_f1("other", "fixed price") == 0.0
    assert token_f1(UNPARSABLE, "fixed price") == 0.0


def test_token_f1_multi_span_alignment():
    # One part matches exactly, the other is missing: (1 + 0) / 2.
    assert token_f1("Fixed Price", "Fixed Price | Other") == pytest.approx(0.5)
    # Order does not matter.
    assert token_f1("Other | Fixed Price", "Fixed Price | Other") == pytest.approx(1.0)
    # An extra part costs as much as a missing one: (1 + 1 + 0) / 3.
    assert token_f1("a x | b | c", "a x | b") == pytest.approx(2 / 3)


def test_token_f1_numbers_all_or_nothing():
    assert token_f1("1,496.5", "1496.5", scale="million") == 1.0
    assert token_f1("1,400", "1496.5", scale="million") == 0.0


def test_grade_and_counts_keep_parse_failures_apart():
    counts = AnswerCounts()
    for pred, gold in (("B", "B"), ("A", "B"), (UNPARSABLE, "B"), (UNPARSABLE, "C")):
        counts.add(grade(pred, gold, MC))
    assert counts.correct == 1
    assert counts.wrong == 1
    assert counts.unparsable == 2
    assert counts.total == 4
    assert counts.accuracy == pytest.approx(0.25)
    assert counts.parsed_accuracy == pytest.approx(0.5)
    assert counts.unparsable_rate == pytest.approx(0.5)
    assert counts.as_dict()["unparsable"] == 2


def test_counts_reject_unknown_grade():
    with pytest.raises(ValueError, match="invalid grade"):
        AnswerCounts().add("maybe")  # type: ignore[arg-type]
