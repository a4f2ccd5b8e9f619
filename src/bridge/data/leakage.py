"""The leakage guard: no gold field of an example, nor text derived from it, reaches its prompt.

Two rules work together:

- Structural: a prompt builder receives only :func:`prompt_view` (question, context, options),
  never the :class:`~bridge.data.types.Example`. Short gold values ("yes", "B", "12.5") can
  only be guarded this way, because such strings occur in any text.
- Textual: :func:`check_leakage` searches a rendered prompt (or a prompt view) for the long gold
  texts of the example: the explanation (PubMedQA's LONG_ANSWER, TAT-QA's derivation), long
  span answers, and the gold-derived source fields kept in ``gold_meta``. A gold text that
  the example's own question, context or options already contain (an extractive span answer,
  the text of the correct option) is not evidence of leakage and is skipped.

:func:`check_disjoint` checks that no example, copy or group sits on both the training side
(train, few-shot pool) and the evaluation side (dev, test), or in both dev and test.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from bridge.data.text import duplicate_key, normalize_spaces
from bridge.data.types import Example, TaskSpec
from bridge.errors import DataError

#: The only example fields a prompt may be built from.
PROMPT_FIELDS = ("question", "context", "options")

#: gold_meta keys whose values are short labels or indices ("yes", "table-text", "2"); the
#: structural rule guards them, because a text search would flag harmless words.
STRUCTURAL_ONLY_GOLD_META = frozenset(
    {"final_decision", "reasoning_required_pred", "reasoning_free_pred", "answer_from", "rel_paragraphs", "req_comparison"}
)

TRAINING_SIDE = ("train", "fewshot")
EVALUATION_SIDE = ("dev", "test")

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+|##")


class LeakageError(DataError):
    """Gold text of an example reached its prompt, or an example sits in two incompatible splits."""


def prompt_view(example: Example) -> dict[str, Any]:
    """Return the fields a prompt for ``example`` may use: question, context and options.

    Gold, explanation, scale, answer type, gold_meta and meta are left out.
    """
    return {
        "question": example.question,
        "context": example.context,
        "options": dict(example.options) if example.options else None,
    }


def gold_texts(example: Example) -> dict[str, str]:
    """Return every gold field of ``example`` by name: gold, explanation and gold_meta.<key>."""
    texts = {"gold": example.gold}
    if example.explanation:
        texts["explanation"] = example.explanation
    for key, value in example.gold_meta.items():
        texts[f"gold_meta.{key}"] = value
    return texts


def _view_text(view: Mapping[str, Any]) -> str:
    parts = [str(view.get("question") or ""), str(view.get("context") or "")]
    options = view.get("options") or {}
    parts += [f"{letter} {text}" for letter, text in dict(options).items()]
    return "\n".join(parts)


def _fragments(text: str, fragment_chars: int) -> list[str]:
    """Return the sentences (and ##-separated items) of ``text`` that are long enough to search for."""
    pieces = (normalize_spaces(p).rstrip(".!?;: ") for p in _SENTENCE_END.split(text))
    return [p for p in pieces if len(p) >= fragment_chars]


def _occurs(needle: str, haystack: str) -> bool:
    """True when ``needle`` occurs in ``haystack`` and is not glued to a longer word or number."""
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        before = haystack[start - 1] if start > 0 else " "
        after = haystack[end] if end < len(haystack) else " "
        glued_before = needle[0].isalnum() and before.isalnum()
        glued_after = needle[-1].isalnum() and after.isalnum()
        if not glued_before and not glued_after:
            return True
        start = haystack.find(needle, start + 1)
    return False


def check_leakage(
    prompt: str | Mapping[str, Any],
    example: Example,
    *,
    task: TaskSpec | None = None,
    allow: Collection[str] = (),
    min_chars: int = 8,
    fragment_chars: int = 40,
    min_gold_chars: int = 20,
) -> None:
    """Raise :class:`LeakageError` when gold text of ``example`` appears in ``prompt``.

    ``prompt`` is a rendered prompt string or a prompt view (a mapping, which may hold only the
    keys in :data:`PROMPT_FIELDS`). Searched, after Unicode, case and whitespace normalisation:

    - the explanation and each gold_meta value of at least ``min_chars`` characters, whole, and
      each of their sentences of at least ``fragment_chars`` characters (a partly copied
      explanation is caught too);
    - the gold answer itself only when it has at least ``min_gold_chars`` characters and is not
      one of ``task.labels`` (labels and short answers are listed in prompts as choices).

    ``allow`` names gold fields a prompt may carry on purpose, such as {"gold"} for a prompt that
    gives the answer as a hint. Texts the example's own question, context or options contain are
    skipped. A rendered prompt also contains demonstrations and instructions, where a short gold
    value can occur by chance. Such values are guarded only by the structural rule.
    """
    if isinstance(prompt, Mapping):
        extra = sorted(set(prompt) - set(PROMPT_FIELDS))
        if extra:
            raise LeakageError(
                f"prompt input for example '{example.id}' carries field(s) {', '.join(extra)}",
                hint=f"build prompts from bridge.data.prompt_view(example), which holds only {', '.join(PROMPT_FIELDS)}",
            )
        text = _view_text(prompt)
    else:
        text = prompt
    haystack = normalize_spaces(text)
    own_inputs = normalize_spaces(_view_text(prompt_view(example)))
    labels = set(task.labels) if task is not None else set()
    for name, value in gold_texts(example).items():
        if name in allow or name.removeprefix("gold_meta.") in STRUCTURAL_ONLY_GOLD_META:
            continue
        whole = normalize_spaces(value)
        if name == "gold":
            if len(whole) < min_gold_chars or value in labels:
                continue
            candidates = [whole]
        else:
            if len(whole) < min_chars:
                continue
            candidates = [whole, *_fragments(value, fragment_chars)]
        for candidate in candidates:
            if _occurs(candidate, own_inputs):
                continue
            if _occurs(candidate, haystack):
                shown = candidate if len(candidate) <= 80 else candidate[:77] + "..."
                raise LeakageError(
                    f"prompt for example '{example.id}' contains its {name}: '{shown}'",
                    hint="render prompts from prompt_view(example) and take demonstrations from the training split only",
                )


def check_disjoint(splits: Mapping[str, Sequence[Example]], *, grouped: bool = False) -> None:
    """Raise :class:`LeakageError` when an id, a duplicate key or (when ``grouped``) a group crosses splits.

    Checked pairs: training side (train, fewshot) against evaluation side (dev, test), and dev
    against test. Copies within one side are allowed.
    """
    pairs = [(TRAINING_SIDE, EVALUATION_SIDE), (("dev",), ("test",))]
    for left, right in pairs:
        left_examples = [e for name in left for e in splits.get(name, ())]
        right_examples = [e for name in right for e in splits.get(name, ())]
        checks = [("id", lambda e: e.id), ("normalised question + context + options", duplicate_key)]
        if grouped:
            checks.append(("group", lambda e: e.group or f"\x00{e.id}"))
        for what, key in checks:
            seen = {key(e): e.id for e in left_examples}
            right_keys = [(key(e), e.id) for e in right_examples]
            shared = sorted({(seen[k], example_id) for k, example_id in right_keys if k in seen})
            if shared:
                sample = "; ".join(f"{a} ~ {b}" for a, b in shared[:3])
                raise LeakageError(
                    f"{len(shared)} example(s) share their {what} between {'+'.join(left)} and "
                    f"{'+'.join(right)} (first: {sample})",
                    hint="group or drop exact duplicates before splitting; load the data with bridge.data.load_dataset",
                )


def check_demonstrations(
    demonstrations: Sequence[Example], example: Example, splits: Mapping[str, Sequence[Example]]
) -> None:
    """Raise :class:`LeakageError` unless every demonstration comes from the training side and is not ``example``."""
    allowed = {e.id for name in TRAINING_SIDE for e in splits.get(name, ())}
    key = duplicate_key(example)
    for demo in demonstrations:
        if demo.id not in allowed:
            raise LeakageError(
                f"demonstration '{demo.id}' for example '{example.id}' is not in the train split or the few-shot pool",
                hint="take demonstrations from DatasetSplits.fewshot or DatasetSplits.train",
            )
        if demo.id == example.id or duplicate_key(demo) == key:
            raise LeakageError(
                f"demonstration '{demo.id}' is example '{example.id}' itself or a copy of it",
                hint="leave the example out of its own demonstrations",
            )
