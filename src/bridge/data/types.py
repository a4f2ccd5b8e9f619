"""Task formats and the example record shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskFormat = Literal["multiple_choice", "yes_no_maybe", "classification", "numeric", "span"]

#: Separator between the parts of a multi-span answer. Numbers contain commas, so a comma
#: cannot separate answers.
MULTI_SPAN_SEPARATOR = " | "


@dataclass(frozen=True)
class TaskSpec:
    """What a data set asks for and how its answers are compared.

    ``labels`` holds the valid answers for the closed formats: option letters for multiple
    choice, ``yes``/``no``/``maybe``, or the class names for classification. Open formats
    (numeric, span) have no labels.
    """

    name: str
    format: TaskFormat
    labels: tuple[str, ...] = ()
    #: Relative tolerance for numeric answers (|pred - gold| <= tol * |gold|).
    rel_tolerance: float = 1e-3
    #: Short description of the domain, used in the system prompt.
    domain: str = ""

    @property
    def is_closed(self) -> bool:
        """True when answers come from a fixed set of labels, so options can be scored."""
        return self.format in ("multiple_choice", "yes_no_maybe", "classification")

    def format_for(self, example: Example) -> TaskFormat:
        """Return the answer format of ``example``: its own ``answer_format``, else the task's.

        TAT-QA mixes numeric answers (arithmetic, count) with span answers in one task.
        """
        return example.answer_format or self.format


@dataclass(frozen=True)
class Example:
    """One labelled example.

    ``id`` is stable across runs and machines: the source's own id where it has one, else
    ``<dataset>/<file>/<row>``. ``gold`` is the canonical answer text exactly as it follows
    ``Answer:`` (an option letter, a label, a number, or spans joined by
    ``MULTI_SPAN_SEPARATOR``). Gold fields (``gold``, ``explanation``, ``scale`` and anything
    in ``gold_meta``) must never reach a prompt for this example except through an explicit hint.
    """

    id: str
    question: str
    gold: str
    context: str | None = None
    #: Option letter to option text, for multiple choice.
    options: dict[str, str] | None = None
    explanation: str | None = None
    group: str | None = None
    #: Scale of a numeric gold answer: "", "thousand", "million", "billion" or "percent".
    scale: str = ""
    #: Answer type in the source, such as "arithmetic" or "multi-span" for TAT-QA.
    answer_type: str = ""
    #: Answer format of this example when it differs from the task's (TAT-QA: numeric or span).
    answer_format: TaskFormat | None = None
    #: Source fields derived from gold (kept for reports, never shown in prompts).
    gold_meta: dict[str, str] = field(default_factory=dict)
    #: Non-gold source fields (subject, year, source file) for reports and filtering.
    meta: dict[str, str] = field(default_factory=dict)
