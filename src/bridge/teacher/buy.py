"""Buying rationales: prompt the teacher, check each answer against the gold label, apply the policy.

The teacher is asked for a concise step-by-step rationale ending in ``Answer: <answer>``. The
answer is read with the shared extractor (:func:`bridge.answers.extract_for`) and compared with
the gold label. The policy decides what happens to a wrong or unparsable answer:

* ``keep_correct``: drop it;
* ``reask_with_hint``: ask once more with the gold answer as a hint (a second paid call), and
  keep the new rationale, marked label-conditioned, if its answer is right;
* ``keep_all``: keep wrong answers too (unparsable ones and truncated ones are never kept).

A response cut by ``max_tokens`` (``finish_reason=length``) is a failure, never a label. Every
outcome goes into the result's ``outcomes`` (with the raw response when it is not kept) and its
label into the ledger row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config import BudgetConfig, TeacherConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import BudgetError, TeacherError, naming_setting
from bridge.teacher.backends import Backend, Redactor, TeacherRequest, make_backend
from bridge.teacher.budget import (
    PromptTokenBound,
    Usage,
    caps_from_config,
    check_budget,
    load_bound_tokenizer,
)
from bridge.teacher.client import Outcome, Teacher
from bridge.teacher.ledger import LEDGER_FILENAME, Ledger
from bridge.teacher.prices import picousd_to_usd, resolve_price

if TYPE_CHECKING:
    from bridge.teacher.account import LedgerAccount

log = logging.getLogger(__name__)

#: Labels written to the ledger and the outcomes.
CORRECT = "correct"
WRONG = "wrong"
UNPARSABLE_LABEL = "unparsable"
TRUNCATED = "truncated"
FAILED = "failed"
NOT_ASKED_BUDGET = "budget"
NOT_ASKED_STOPPED = "stopped"


@dataclass
class TeachResult:
    """What a teacher stage bought.

    ``rows`` contains the kept rationales with their provenance, ready for a JSONL file.
    ``outcomes`` contains one record per request (first asks and re-asks), kept or not, with the
    raw response text of every response that was not kept. ``summary`` counts them and states
    the spending.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    budget_exhausted: bool = False


@dataclass(frozen=True)
class _Judgement:
    label: str
    answer: str | None


def _judge(outcome: Outcome, example: Example, task: TaskSpec, backend_kind: str) -> _Judgement:
    """Label one outcome: correct, wrong, unparsable, truncated, failed, budget or stopped."""
    from bridge.answers import UNPARSABLE, extract_for, is_correct_for
    from bridge.prompts import target_answer

    if outcome.status == "budget":
        return _Judgement(NOT_ASKED_BUDGET, None)
    if outcome.status == "stopped":
        return _Judgement(NOT_ASKED_STOPPED, None)
    if outcome.status != "ok" or outcome.text is None:
        return _Judgement(FAILED, None)
    if outcome.finish_reason == "length":
        return _Judgement(TRUNCATED, None)
    if outcome.finish_reason != "stop":
        return _Judgement(FAILED, None)
    if backend_kind == "reference":
        # The response is the example's own explanation and gold answer.
        return _Judgement(CORRECT, target_answer(example, task))
    predicted = extract_for(outcome.text, task, example)
    if predicted == UNPARSABLE:
        return _Judgement(UNPARSABLE_LABEL, None)
    if is_correct_for(predicted, task, example):
        return _Judgement(CORRECT, target_answer(example, task))
    return _Judgement(WRONG, predicted)


def open_ledger(location: Path | str) -> Ledger:
    """Open the ledger of a run directory, or the ``.sqlite`` file ``location`` names."""
    path = Path(location)
    if path.suffix != ".sqlite":
        path = path / LEDGER_FILENAME
    return Ledger(path)


def buy_rationales(
    examples: Sequence[Example],
    task: TaskSpec,
    teacher_cfg: TeacherConfig,
    budget_cfg: BudgetConfig,
    ledger: Ledger | LedgerAccount | Path | str,
    call_cap: int | None = None,
    *,
    system: str | None = None,
    demos: Sequence[Example] = (),
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
    confirm_remote: bool = False,
    backend: Backend | None = None,
    local_model: Any = None,
    local_generate: Callable[..., Sequence[Any]] | None = None,
    progress: bool = True,
) -> TeachResult:
    """Buy rationales for ``examples`` (in priority order) within the budget and apply the policy.

    ``ledger`` is an open :class:`Ledger` (or an object with its interface, such as a
    :class:`~bridge.teacher.account.LedgerAccount`), a run directory or a ``.sqlite`` path. ``call_cap``
    is the call cap from the subset size (``ceil(budget.fraction * pool)`` or ``budget.count``),
    re-asks included; ``budget.max_calls``, ``max_tokens`` and ``max_cost_usd`` apply as well.
    ``tokenizer`` and ``max_context_tokens`` trim the context as in every other stage's prompts.
    Configuration errors (no price, a budget below one call, a zero budget, a missing key, an
    unconfirmed remote endpoint) are raised before any call. Raises :class:`TeacherError` on a
    client error from the endpoint or when not a single call succeeded.
    """
    if not teacher_cfg.enabled:
        log.info("teacher stage is off (teacher.enabled is false); no call is made")
        return TeachResult(summary={"enabled": False, "examples": len(examples)})

    from bridge.prompts import render_messages, target_answer

    price = resolve_price(teacher_cfg)
    with naming_setting("teacher.tokenizer", teacher_cfg.tokenizer):
        bound_tokenizer = load_bound_tokenizer(teacher_cfg)
    prompt_bound = PromptTokenBound(bound_tokenizer)

    def count_text(text: str) -> int:
        return prompt_bound([{"role": "assistant", "content": text}])

    if backend is None:
        backend = make_backend(
            teacher_cfg,
            examples,
            task=task,
            count_tokens=count_text,
            count_prompt=prompt_bound,
            confirm_remote=confirm_remote,
            local_model=local_model,
            local_generate=local_generate,
        )
    by_id = {e.id: e for e in examples}
    if len(by_id) != len(examples):
        raise ValueError("example ids passed to buy_rationales must be unique")

    def render(example: Example, hint: str | None) -> TeacherRequest:
        rendered = render_messages(
            example,
            task,
            style="rationale",
            hint=hint,
            demos=[d for d in demos if d.id != example.id],
            system=system,
            tokenizer=tokenizer,
            max_context_tokens=max_context_tokens if tokenizer is not None else None,
        )
        return TeacherRequest(
            example_id=example.id,
            messages=tuple(rendered.messages),
            purpose="reask" if hint is not None else "ask",
            label_conditioned=rendered.label_conditioned,
        )

    asks = [render(e, None) for e in examples]
    caps = caps_from_config(budget_cfg, call_cap)
    owns_ledger = isinstance(ledger, str | Path)
    opened = open_ledger(ledger) if isinstance(ledger, str | Path) else ledger
    try:
        teacher = Teacher(
            backend,
            opened,
            price,
            caps,
            max_tokens=teacher_cfg.max_tokens,
            prompt_bound=prompt_bound,
            concurrency=teacher_cfg.concurrency,
            max_retries=teacher_cfg.max_retries,
            backoff_s=teacher_cfg.backoff_s,
            backoff_max_s=teacher_cfg.backoff_max_s,
            requests_per_minute=teacher_cfg.requests_per_minute,
            tokens_per_minute=teacher_cfg.tokens_per_minute,
            redactor=getattr(backend, "redact", None) or Redactor(None),
            progress=progress,
        )
        cheapest = min((teacher.worst_case_for(r) for r in asks), key=lambda w: w.picousd, default=None)
        check_budget(teacher_cfg, budget_cfg, caps, cheapest)
        used_before = opened.used
        log.info(
            "teacher: %d example(s) for %s at %s; caps %s; already counted %.6g USD in %d call(s)",
            len(asks), backend.model, backend.endpoint, caps.describe(), used_before.usd, used_before.calls,
        )
        return _run_policy(teacher, opened, asks, by_id, task, teacher_cfg, render, target_answer, used_before)
    finally:
        if owns_ledger:
            opened.close()


def _run_policy(
    teacher: Teacher,
    ledger: Ledger,
    asks: list[TeacherRequest],
    by_id: dict[str, Example],
    task: TaskSpec,
    teacher_cfg: TeacherConfig,
    render: Callable[[Example, str | None], TeacherRequest],
    target_answer: Callable[[Example, TaskSpec], str],
    used_before: Usage,
) -> TeachResult:
    result = TeachResult()
    kind = teacher.backend.kind
    first = teacher.complete(asks)
    judged_first = [(o, _judge(o, by_id[o.request.example_id], task, kind)) for o in first]

    reasks: list[TeacherRequest] = []
    if teacher_cfg.policy == "reask_with_hint":
        for outcome, judgement in judged_first:
            if judgement.label in (WRONG, UNPARSABLE_LABEL):
                example = by_id[outcome.request.example_id]
                reasks.append(render(example, target_answer(example, task)))
    second = teacher.complete(reasks) if reasks else []
    judged_second = [(o, _judge(o, by_id[o.request.example_id], task, kind)) for o in second]

    for outcome, judgement in judged_first + judged_second:
        example = by_id[outcome.request.example_id]
        if outcome.attempt_id is not None and judgement.label not in (FAILED, NOT_ASKED_BUDGET, NOT_ASKED_STOPPED):
            ledger.set_label(outcome.attempt_id, judgement.label)
        keep = judgement.label == CORRECT or (judgement.label == WRONG and teacher_cfg.policy == "keep_all")
        result.outcomes.append(_outcome_record(outcome, judgement, keep))
        if keep:
            result.rows.append(_row(outcome, judgement, example, teacher))

    result.budget_exhausted = teacher.budget_exhausted
    result.summary = _summary(teacher, ledger, judged_first, judged_second, result, used_before)
    _log_summary(result.summary)
    _fail_without_success(judged_first + judged_second, result.summary)
    return result


def _outcome_record(outcome: Outcome, judgement: _Judgement, kept: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": outcome.request.example_id,
        "purpose": outcome.request.purpose,
        "label": judgement.label,
        "kept": kept,
        "status": outcome.status,
        "finish_reason": outcome.finish_reason,
        "cached": outcome.cached,
        "attempts": outcome.attempts,
        "charged_usd": outcome.charged.usd,
        "ledger_key": outcome.cache_key,
        "attempt_id": outcome.attempt_id,
        "error": outcome.error,
    }
    if not kept and outcome.text is not None:
        record["raw_response"] = outcome.text
    if judgement.label == WRONG:
        record["answer"] = judgement.answer
    return record


def _row(outcome: Outcome, judgement: _Judgement, example: Example, teacher: Teacher) -> dict[str, Any]:
    from bridge.prompts import format_target

    assert outcome.text is not None and judgement.answer is not None
    target = format_target(outcome.text, judgement.answer)
    rationale = target.rsplit("\n", 1)[0] if "\n" in target else ""
    return {
        "id": example.id,
        "rationale": rationale,
        "answer": judgement.answer,
        "target": target,
        "correct": judgement.label == CORRECT,
        "label_conditioned": outcome.request.label_conditioned,
        "attempt": 2 if outcome.request.purpose == "reask" else 1,
        "source": teacher.backend.kind,
        "model": teacher.backend.model,
        "endpoint": teacher.backend.endpoint,
        "ledger_key": outcome.cache_key,
        "ledger_attempt_id": outcome.source_attempt_id,
        "cost_usd": picousd_to_usd(outcome.response_picousd),
        "cached": outcome.cached,
    }


def _count(judged: list[tuple[Outcome, _Judgement]], label: str) -> int:
    return sum(1 for _, j in judged if j.label == label)


def _summary(
    teacher: Teacher,
    ledger: Ledger,
    first: list[tuple[Outcome, _Judgement]],
    second: list[tuple[Outcome, _Judgement]],
    result: TeachResult,
    used_before: Usage,
) -> dict[str, Any]:
    everything = first + second
    used_after = ledger.used
    this_run = used_after - used_before
    return {
        "enabled": True,
        "backend": teacher.backend.kind,
        "model": teacher.backend.model,
        "endpoint": teacher.backend.endpoint,
        "price": teacher.price.describe(),
        "examples": len(first),
        "requests": len(everything),
        "cache_hits": sum(1 for o, _ in everything if o.cached),
        "attempts": sum(o.attempts for o, _ in everything),
        "retries": teacher.retries,
        "correct_first": _count(first, CORRECT),
        "wrong_first": _count(first, WRONG),
        "reasked": len(second),
        "reask_correct": _count(second, CORRECT),
        "unparsable": _count(everything, UNPARSABLE_LABEL),
        "truncated": _count(everything, TRUNCATED),
        "failed": _count(everything, FAILED),
        "not_asked_budget": _count(everything, NOT_ASKED_BUDGET),
        "rows": len(result.rows),
        "label_conditioned_rows": sum(1 for r in result.rows if r["label_conditioned"]),
        "budget_exhausted": teacher.budget_exhausted,
        "caps": teacher.caps.describe(),
        "this_run_usd": this_run.usd,
        "this_run_calls": this_run.calls,
        "this_run_tokens": this_run.tokens,
        "total_usd": used_after.usd,
        "total_calls": used_after.calls,
        "total_tokens": used_after.tokens,
    }


def _log_summary(summary: dict[str, Any]) -> None:
    text = (
        f"teacher: kept {summary['rows']} rationale(s) for {summary['examples']} example(s) "
        f"({summary['correct_first']} right at once, {summary['reask_correct']} of {summary['reasked']} after a hint, "
        f"{summary['wrong_first']} wrong, {summary['unparsable']} unparsable, {summary['truncated']} truncated, "
        f"{summary['failed']} failed, {summary['cache_hits']} from the cache); this run counted "
        f"{summary['this_run_usd']:.6g} USD in {summary['this_run_calls']} call(s), "
        f"{summary['total_usd']:.6g} USD in total"
    )
    if summary["budget_exhausted"]:
        log.warning(
            "%s; the budget (%s) is reached, so %d request(s) were not sent",
            text, summary["caps"], summary["not_asked_budget"],
        )
    else:
        log.info("%s", text)


def _fail_without_success(judged: list[tuple[Outcome, _Judgement]], summary: dict[str, Any]) -> None:
    """Raise when not one request got a complete response: such a run must not yield labels."""
    if not judged or any(o.stopped_by_stop for o, _ in judged):
        return
    if all(j.label == NOT_ASKED_BUDGET for _, j in judged):
        raise BudgetError(
            f"the teacher budget ({summary['caps']}) is used up before the first request: "
            f"{summary['total_usd']:.6g} USD in {summary['total_calls']} call(s) are already counted",
            hint="raise the budget in the configuration; responses already bought are reused at no cost",
        )
    raise TeacherError(
        f"no teacher request succeeded: {summary['failed']} failed, {summary['truncated']} truncated, "
        f"{summary['not_asked_budget']} not sent for lack of budget",
        hint="run 'bridge ledger RUN_DIR' to see each attempt's error, fix the endpoint or raise "
        "teacher.max_tokens, then rerun",
    )
