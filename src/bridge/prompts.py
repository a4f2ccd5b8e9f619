"""Prompt rendering shared by the teacher, the TA, the student and evaluation.

Every stage builds its prompts here, so all of them see the same text for the same example:

* :func:`render_messages` builds OpenAI-style chat messages: a system message, optional
  few-shot demonstrations as earlier user/assistant turns, and one user message with the
  context, the question, the options and the instruction to end with ``Answer: <answer>``.
* :func:`render_text` applies the model's chat template (or a plain role-labelled format when the
  tokenizer has none) and ends with the start of the assistant turn.
* :func:`scoring_prompt` is that text followed by ``Answer:``, so each option is scored as the
  continuation ``" B"`` or ``" yes"`` (:func:`option_continuations`). The same text plus
  :func:`format_target` is a training row, so training, generation and scoring agree token for
  token.

Gold fields of an example (``gold``, ``explanation``, ``scale``, ``answer_type``,
``answer_format``, ``gold_meta``) are never read for its own prompt. The gold answer enters only
through the explicit ``hint`` argument, which marks the prompt label-conditioned, and
:func:`scoring_prompt` and :func:`require_unconditioned` reject such prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bridge.answers import (
    ANSWER_LINE_PATTERN,
    ANSWER_PREFIX,
    YES_NO_MAYBE,
    parse_number,
    split_spans,
)
from bridge.data.types import MULTI_SPAN_SEPARATOR, Example, TaskSpec
from bridge.errors import DataError

log = logging.getLogger(__name__)

Style = Literal["rationale", "answer_only"]
TruncationSide = Literal["right", "left"]

#: Marks the place where context text was cut.
TRUNCATION_MARKER = "[...]"

#: Setting named in messages about the token budget.
BUDGET_SETTING = "prompts.max_context_tokens"

# Chat control tokens of the form <|name|>, such as ChatML's <|im_start|>, written as text in data.
# Such text in a question must not become a real control token when the prompt is tokenised.
_CONTROL_TOKEN_TEXT = re.compile(r"<\|[^<>|\s]{1,64}\|>")


@dataclass(frozen=True)
class RenderedPrompt:
    """Chat messages for one example, with what went into them.

    ``context_tokens_cut`` counts the tokens removed from this example's context (not from the
    demonstrations). ``label_conditioned`` is True when the gold answer was given as a hint.
    """

    messages: list[dict[str, str]]
    label_conditioned: bool
    context_tokens_cut: int
    example_id: str
    style: Style = "rationale"

    @property
    def messages_hash(self) -> str:
        """Hash of the messages, for prompts sent to an API without a local chat template."""
        return prompt_hash(json.dumps(self.messages, ensure_ascii=False, sort_keys=True))


class PromptTooLongError(DataError):
    """An example's question and options alone exceed the prompt token budget."""

    def __init__(self, example_id: str, tokens: int, budget: int, source: str | None = None) -> None:
        self.example_id = example_id
        self.tokens = tokens
        self.budget = budget
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}example {example_id}: the question and options alone take {tokens} tokens, "
            f"more than {BUDGET_SETTING} = {budget}",
            hint=f"raise {BUDGET_SETTING}, or set data.skip_invalid: true to skip and count such examples",
        )


def prompt_hash(text: str) -> str:
    """Return the first 16 hex digits of the SHA-256 of ``text``, stored to join results by prompt."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Instructions


def default_system(task: TaskSpec) -> str:
    """Return the system message used when the configuration sets none."""
    domain = task.domain.strip() if task.domain else ""
    expert = f"an expert in {domain}" if domain else "a careful expert"
    return f"You are {expert}. Answer the question accurately, using only the information given."


def _join_words(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " or ".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def answer_description(task: TaskSpec, example: Example | _PromptInputs) -> str:
    """Describe what follows ``Answer:`` for ``example``, without reading its gold fields.

    The open formats share one description, because an example's own answer format is derived
    from its gold answer (TAT-QA mixes numbers and spans in one task).
    """
    if task.format == "multiple_choice":
        letters = list(example.options) if example.options else list(task.labels)
        return f"the letter of the correct option ({_join_words(letters)})"
    if task.format == "yes_no_maybe":
        return _join_words(list(task.labels or YES_NO_MAYBE))
    if task.format == "classification":
        return f"one label: {_join_words(list(task.labels))}"
    return (
        "the answer: a number without units, optionally followed by thousand, million, billion or "
        f"percent, or a short text from the context; separate several answers with \"{MULTI_SPAN_SEPARATOR.strip()}\""
    )


def _instruction(task: TaskSpec, example: _PromptInputs, style: Style) -> str:
    description = answer_description(task, example)
    if style == "rationale":
        return (
            "Think step by step and explain your reasoning in a few concise sentences. Then write the "
            f'final answer on its own last line as "{ANSWER_PREFIX} " followed by {description}.'
        )
    return f'Reply with the final answer only, on one line: "{ANSWER_PREFIX} " followed by {description}.'


def _hint_block(hint: str) -> str:
    return (
        f"Hint (the verified correct answer): {hint}\n"
        "Write reasoning that reaches this answer on its own merits, without mentioning the hint."
    )


# --------------------------------------------------------------------------------------------
# Token budget


def control_tokens(tokenizer: Any) -> list[str]:
    """Return the special and added control tokens of ``tokenizer`` that look like markup."""
    if tokenizer is None:
        return []
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content))
    # Plain words registered as special tokens would be mangled everywhere they occur.
    return sorted((t for t in tokens if len(t) > 1 and not t.isalnum()), key=len, reverse=True)


def defuse_control_tokens(text: str, tokens: Sequence[str] = ()) -> str:
    """Break up control-token text (``<|im_end|>`` becomes ``< |im_end|>``) so it tokenises as text.

    Text from data sets and users goes through this before it enters a prompt, so a question
    cannot close its user message or open a new turn.
    """
    text = _CONTROL_TOKEN_TEXT.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
    for token in tokens:
        if token in text:
            text = text.replace(token, token[0] + " " + token[1:])
    return text


def count_tokens(text: str, tokenizer: Any) -> int:
    """Return the number of tokens of ``text`` without special tokens."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(text: str, keep: int, tokenizer: Any, side: TruncationSide) -> str:
    """Return the first (side right) or last (side left) ``keep`` tokens of ``text`` as text."""
    if keep <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if side == "right":
            return text[: offsets[keep - 1][1]]
        return text[offsets[-keep][0] :]
    # NOTE: this decode path for slow (Python) tokenizers is not covered by tests.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    kept_ids = ids[:keep] if side == "right" else ids[-keep:]
    return tokenizer.decode(kept_ids, skip_special_tokens=False)


def trim_to_tokens(text: str, budget: int, tokenizer: Any, side: TruncationSide = "right") -> tuple[str, int]:
    """Trim ``text`` to at most ``budget`` tokens, marking the cut with :data:`TRUNCATION_MARKER`.

    Returns the trimmed text and the number of the original tokens removed. The marker's tokens
    count against the budget; when not even the marker fits, the text is dropped entirely.
    """
    total = count_tokens(text, tokenizer)
    if total <= budget:
        return text, 0
    keep = budget - count_tokens(" " + TRUNCATION_MARKER, tokenizer)
    while keep > 0:
        kept_text = _cut(text, keep, tokenizer, side).strip()
        trimmed = f"{kept_text} {TRUNCATION_MARKER}" if side == "right" else f"{TRUNCATION_MARKER} {kept_text}"
        # Tokens can merge across the new boundary, so the joined text is counted again.
        excess = count_tokens(trimmed, tokenizer) - budget
        if excess <= 0:
            return trimmed, total - count_tokens(kept_text, tokenizer)
        keep -= excess
    return "", total


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class _PromptInputs:
    """The only fields of an example that its prompt is built from; gold fields are left out."""

    id: str
    question: str
    context: str | None
    options: dict[str, str] | None

    @classmethod
    def of(cls, example: Example) -> _PromptInputs:
        return cls(example.id, example.question, example.context, dict(example.options) if example.options else None)


def _options_block(inputs: _PromptInputs, task: TaskSpec) -> str:
    if task.format != "multiple_choice" or not inputs.options:
        return ""
    lines = [f"{letter}. {text}" for letter, text in inputs.options.items()]
    return "Options:\n" + "\n".join(lines)


def _question_block(inputs: _PromptInputs, task: TaskSpec) -> str:
    label = "Text" if task.format == "classification" else "Question"
    return f"{label}: {inputs.question}"


def _user_message(
    example: _PromptInputs,
    task: TaskSpec,
    style: Style,
    *,
    hint: str | None,
    tokenizer: Any,
    max_context_tokens: int | None,
    truncation_side: TruncationSide,
    specials: Sequence[str],
) -> tuple[str, int]:
    """Build the user message for ``example`` and return it with the context tokens cut."""
    question = defuse_control_tokens(_question_block(example, task), specials)
    options = defuse_control_tokens(_options_block(example, task), specials)
    context = defuse_control_tokens((example.context or "").strip(), specials)
    cut = 0
    if max_context_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_context_tokens needs a tokenizer to count tokens; pass tokenizer=")
        fixed = count_tokens(question, tokenizer) + count_tokens(options, tokenizer)
        if fixed > max_context_tokens:
            raise PromptTooLongError(example.id, fixed, max_context_tokens)
        if context:
            context, cut = trim_to_tokens(context, max_context_tokens - fixed, tokenizer, truncation_side)
    sections = []
    if context:
        sections.append(f"Context:\n{context}")
    sections.append(question)
    if options:
        sections.append(options)
    if hint is not None:
        sections.append(_hint_block(defuse_control_tokens(hint.strip(), specials)))
    sections.append(_instruction(task, example, style))
    return "\n\n".join(sections), cut


def target_answer(example: Example, task: TaskSpec) -> str:
    """Return the text that follows ``Answer:`` in a training target or demonstration.

    This is the gold answer, with the scale word appended to numeric parts ("12.5 million") so
    that the extractor reads it back as the gold in any scale.
    """
    gold = example.gold.strip()
    if task.is_closed or not example.scale:
        return gold
    parts = []
    for part in split_spans(gold):
        number = parse_number(part, whole=True)
        if number is not None and number.scale is None:
            suffix = "%" if example.scale == "percent" else f" {example.scale}"
            part = f"{part}{suffix}"
        parts.append(part)
    return MULTI_SPAN_SEPARATOR.join(parts)


def _demo_turns(
    demos: Sequence[Example],
    example: Example,
    task: TaskSpec,
    style: Style,
    *,
    tokenizer: Any,
    max_context_tokens: int | None,
    truncation_side: TruncationSide,
    specials: Sequence[str],
) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for demo in demos:
        if demo.id == example.id:
            raise DataError(
                f"example {example.id} is among its own demonstrations, which would show its gold answer",
                hint="draw demonstrations from the training split and leave out the example being prompted",
            )
        rationale = None
        if style == "rationale":
            if not (demo.explanation and demo.explanation.strip()):
                raise DataError(
                    f"demonstration {demo.id} has no explanation, which a rationale-style demonstration needs",
                    hint="set prompts.few_shot: 0, or use answer-only prompts for this data set",
                )
            rationale = defuse_control_tokens(demo.explanation, specials)
        user, _ = _user_message(
            _PromptInputs.of(demo),
            task,
            style,
            hint=None,
            tokenizer=tokenizer,
            max_context_tokens=max_context_tokens,
            truncation_side=truncation_side,
            specials=specials,
        )
        turns.append({"role": "user", "content": user})
        turns.append({"role": "assistant", "content": format_target(rationale, target_answer(demo, task))})
    return turns


def render_messages(
    example: Example,
    task: TaskSpec,
    *,
    style: Style,
    hint: str | None = None,
    demos: Sequence[Example] = (),
    system: str | None = None,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
    truncation_side: TruncationSide = "right",
) -> RenderedPrompt:
    """Render the chat messages for ``example``.

    ``max_context_tokens`` bounds the tokens of the example's own text: the context, the question
    and the options with their labels, counted with ``tokenizer``, and not the instructions. Only
    the context is trimmed, from the end (``truncation_side="right"``) or the start. Raises
    :class:`PromptTooLongError` (a :class:`DataError`) when the question and options alone
    exceed the budget. Demonstrations are trimmed to the same budget each.
    """
    if style not in ("rationale", "answer_only"):
        raise ValueError(f"invalid prompt style {style!r}: expected 'rationale' or 'answer_only'")
    if hint is not None and not hint.strip():
        raise ValueError(f"example {example.id}: the hint is empty; pass None for an unconditioned prompt")
    specials = control_tokens(tokenizer)
    settings = dict(
        tokenizer=tokenizer,
        max_context_tokens=max_context_tokens,
        truncation_side=truncation_side,
        specials=specials,
    )
    messages = [{"role": "system", "content": system if system is not None else default_system(task)}]
    messages.extend(_demo_turns(demos, example, task, style, **settings))
    try:
        user, cut = _user_message(_PromptInputs.of(example), task, style, hint=hint, **settings)
    except PromptTooLongError as exc:
        # The message names the source file and row, so the user can find the example.
        raise PromptTooLongError(exc.example_id, exc.tokens, exc.budget, source=_source_of(example)) from None
    messages.append({"role": "user", "content": user})
    return RenderedPrompt(
        messages=messages,
        label_conditioned=hint is not None,
        context_tokens_cut=cut,
        example_id=example.id,
        style=style,
    )


def _source_of(example: Example) -> str | None:
    """Return "file, row" of an example from its adapter's metadata, or None when unknown."""
    file = example.meta.get("source_file")
    row = example.meta.get("source_row")
    if not file:
        return None
    return f"{file}: {row}" if row else file


def render_all(
    examples: Sequence[Example],
    task: TaskSpec,
    *,
    style: Style,
    hints: Mapping[str, str] | None = None,
    demos: Sequence[Example] = (),
    system: str | None = None,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
    truncation_side: TruncationSide = "right",
    skip_invalid: bool = False,
) -> tuple[list[RenderedPrompt], list[str]]:
    """Render every example and return the prompts with the ids of skipped examples.

    With ``skip_invalid`` an example whose question and options exceed the budget is skipped and
    its id returned; otherwise its :class:`PromptTooLongError` propagates. ``hints`` maps example
    ids to the hint for that example. A demonstration that is the example itself is left out of
    that example's prompt.
    """
    rendered: list[RenderedPrompt] = []
    skipped: list[str] = []
    for example in examples:
        own_demos = [d for d in demos if d.id != example.id]
        try:
            prompt = render_messages(
                example,
                task,
                style=style,
                hint=(hints or {}).get(example.id),
                demos=own_demos,
                system=system,
                tokenizer=tokenizer,
                max_context_tokens=max_context_tokens,
                truncation_side=truncation_side,
            )
        except PromptTooLongError as exc:
            if not skip_invalid or exc.example_id != example.id:
                raise
            skipped.append(example.id)
            continue
        rendered.append(prompt)
    if skipped:
        log.warning(
            "skipped %d of %d examples whose question and options exceed %s = %s (first: %s)",
            len(skipped), len(examples), BUDGET_SETTING, max_context_tokens, ", ".join(skipped[:5]),
        )
    cut = sum(1 for p in rendered if p.context_tokens_cut)
    if cut:
        log.debug("trimmed the context of %d of %d prompts to %s tokens", cut, len(rendered), max_context_tokens)
    return rendered, skipped


def select_demos(
    pool: Sequence[Example], k: int, task: TaskSpec, *, seed: int = 0, need_explanation: bool = False
) -> list[Example]:
    """Pick ``k`` demonstrations from the training ``pool``, the same ones for every prompt.

    The pick is a seeded shuffle of the pool sorted by id, so it does not depend on input order.
    For closed formats the demonstrations take turns over the gold labels, so no label
    dominates. ``need_explanation`` keeps only examples with an explanation (rationale style).
    """
    if k <= 0:
        return []
    candidates = sorted(
        (e for e in pool if not need_explanation or (e.explanation and e.explanation.strip())), key=lambda e: e.id
    )
    random.Random(seed).shuffle(candidates)
    if not task.is_closed:
        return candidates[:k]
    by_label: dict[str, list[Example]] = {}
    for example in candidates:
        by_label.setdefault(example.gold, []).append(example)
    order = [label for label in (task.labels or sorted(by_label)) if label in by_label]
    order += [label for label in sorted(by_label) if label not in order]
    picked: list[Example] = []
    while len(picked) < k and any(by_label[label] for label in order):
        for label in order:
            if by_label[label] and len(picked) < k:
                picked.append(by_label[label].pop(0))
    return picked


# --------------------------------------------------------------------------------------------
# Targets, text and scoring


def format_target(rationale: str | None, answer: str) -> str:
    """Return the assistant completion: the rationale, a newline and ``Answer: <answer>``.

    Without a rationale the completion is the answer line alone. Answer lines inside the
    rationale are removed, so the completion has exactly one.
    """
    answer = answer.strip()
    if not answer or "\n" in answer:
        raise ValueError(f"invalid answer {answer!r}: expected one non-empty line")
    line = f"{ANSWER_PREFIX} {answer}"
    if rationale is None:
        return line
    lines = [row for row in rationale.strip().splitlines() if not ANSWER_LINE_PATTERN.match(row)]
    body = "\n".join(lines).strip()
    return f"{body}\n{line}" if body else line


def _plain_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """Format messages as role-labelled blocks for tokenizers without a chat template."""
    blocks = [f"{m['role'].capitalize()}:\n{m['content']}" for m in messages]
    return "\n\n".join(blocks) + "\n\nAssistant:\n"


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Apply the chat template, folding the system message into the first user turn if rejected.

    Some chat templates raise a template error (raise_exception) for a system role.
    """
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError as exc:
        if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
            raise
        log.debug("chat template rejected the system message (%s); folding it into the first user turn", exc)
        first_user = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        return tokenizer.apply_chat_template(
            [first_user, *messages[2:]], tokenize=False, add_generation_prompt=True
        )


def render_text(rendered: RenderedPrompt, tokenizer: Any) -> str:
    """Return the prompt text that a local model continues with its answer.

    Uses the tokenizer's chat template with ``add_generation_prompt=True`` when it has one, and a
    plain ``System:/User:/Assistant:`` format otherwise (or when ``tokenizer`` is None). The text
    starts with at most one BOS token. Tokenise it with ``LocalModel.encode``, which adds special
    tokens only when the text does not already start with BOS.
    """
    specials = control_tokens(tokenizer)
    messages = [{"role": m["role"], "content": defuse_control_tokens(m["content"], specials)} for m in rendered.messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = _apply_template(tokenizer, messages)
    else:
        text = _plain_chat(messages)
    bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
    if bos:
        while text.startswith(bos + bos):
            text = text[len(bos) :]
    return text


def require_unconditioned(rendered: RenderedPrompt) -> RenderedPrompt:
    """Return ``rendered``, or raise ValueError when it carries the gold answer as a hint.

    Call this on every prompt of selection scoring, prediction and evaluation, so that a hinted
    prompt cannot reach them; :func:`scoring_prompt` calls it itself.
    """
    if rendered.label_conditioned:
        raise ValueError(
            f"example {rendered.example_id}: the prompt contains the gold answer as a hint and must not be "
            "used for scoring, prediction or evaluation; render it without hint="
        )
    return rendered


def answer_prefix_for_scoring() -> str:
    """Return the text that prefills the assistant turn of a scoring prompt (``Answer:``)."""
    return ANSWER_PREFIX


def scoring_prompt(rendered: RenderedPrompt, tokenizer: Any) -> str:
    """Return the answer-only prompt with the assistant turn prefilled by ``Answer:``.

    Appending an item of :func:`option_continuations` gives exactly the text of a training row
    ``render_text(...) + format_target(None, label)``.
    """
    require_unconditioned(rendered)
    if rendered.style != "answer_only":
        raise ValueError(
            f"example {rendered.example_id}: scoring needs an answer-only prompt, not style {rendered.style!r}"
        )
    return render_text(rendered, tokenizer) + answer_prefix_for_scoring()


def option_labels(task: TaskSpec, example: Example) -> list[str]:
    """Return the answers that option scoring compares: option letters or the task's labels."""
    if task.format == "multiple_choice":
        labels = list(example.options) if example.options else list(task.labels)
    elif task.format == "yes_no_maybe":
        labels = list(task.labels or YES_NO_MAYBE)
    elif task.format == "classification":
        labels = list(task.labels)
    else:
        raise ValueError(f"task {task.name} has open answers ({task.format}); only closed formats can be scored")
    if not labels:
        raise ValueError(f"task {task.name} has no labels or options for example {example.id}")
    return labels


def answer_continuation(label: str) -> str:
    """Return the continuation scored for ``label`` after the scoring prompt: a space and the label."""
    return f" {label}"


def option_continuations(task: TaskSpec, example: Example) -> list[str]:
    """Return the scored continuation of each option, in :func:`option_labels` order (" A", " yes")."""
    return [answer_continuation(label) for label in option_labels(task, example)]


# --------------------------------------------------------------------------------------------
# Leakage guard


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def find_gold_leaks(rendered: RenderedPrompt, example: Example, *, min_chars: int = 30) -> list[str]:
    """Return the gold fields of ``example`` that appear in its own part of the prompt.

    Checks the system message and the final user message (demonstrations show other examples'
    gold answers on purpose): the explanation and ``gold_meta`` values of at least ``min_chars``
    characters, compared case- and whitespace-insensitively, and an answer line stating the gold
    answer. Values that the example's own question, context or options contain (the text of the
    correct option, an extractive span) are skipped. A label-conditioned prompt carries the gold
    answer on purpose and is still checked for the explanation and ``gold_meta``.
    """
    own = [m["content"] for m in rendered.messages if m["role"] == "system"]
    own.append(rendered.messages[-1]["content"])
    text = _squash("\n".join(own))
    inputs = _PromptInputs.of(example)
    own_inputs = _squash("\n".join([inputs.question, inputs.context or "", *(inputs.options or {}).values()]))
    leaks = []
    fields = {"explanation": example.explanation or ""}
    fields.update({f"gold_meta.{key}": value for key, value in example.gold_meta.items()})
    for name, value in fields.items():
        squashed = _squash(str(value))
        if len(squashed) >= min_chars and squashed in text and squashed not in own_inputs:
            leaks.append(name)
    if not rendered.label_conditioned:
        gold = _squash(example.gold)
        for content in own:
            for line in content.splitlines():
                match = ANSWER_LINE_PATTERN.match(line)
                if match and _squash(match.group("value")).rstrip(".") == gold:
                    leaks.append("gold")
    return leaks
