"""Tutoring: the refined TA writes a rationale for every training example, checked by filters.

Modes (``tutoring.mode``):

* ``free``: up to ``free_samples`` attempts per example without the gold answer. The first
  attempt is greedy and later ones are sampled at ``temperature``. The first attempt that passes
  every per-candidate filter is kept.
* ``guided``: one greedy attempt with the gold answer as a hint. Such rows are marked
  ``label_conditioned``.
* ``free_then_guided``: free attempts first, then a guided attempt for every example that none
  of its free attempts settled.

Examples with a teacher rationale (from the teach stage) get no TA rationale: the teacher's row
is kept as it is, with its ledger key and cost. So the TA's unguided agreement with gold is
measured on examples it was not fine-tuned on.

Filters, in the order a rejected row names the first one it failed (:data:`FILTERS`):

``truncation``
    the generation hit ``max_new_tokens`` (``finish_reason == "length"``).
``answer``
    the extracted answer does not match gold (the shared extractor and comparison).
``empty``
    no text is left before the answer line.
``length``
    the rationale is longer than ``max_rationale_tokens`` TA tokens.
``restatement``
    guided rows only: the rationale refers to being given the answer or merely restates it.
    See :func:`restatement_reason` for the rule.
``duplicate``
    the rationale repeats a kept one exactly (after case and whitespace folding) or nearly
    (word-set Jaccard similarity at least ``near_duplicate_threshold``). Teacher rows are
    compared first, then TA rows in example id order, and the earlier row is kept. An example
    whose rationale is dropped as a duplicate gets no further attempt.

Every verdict is ``pass``, ``fail``, ``n/a`` (the filter does not apply) or ``not_run`` (only
``duplicate``, for candidates that already failed).

Resume: each generation batch is appended to ``generations.jsonl`` before the next batch starts.
A rerun forms the same batches from the full, id-sorted request list of each attempt, so batch
seeds and completions match an uninterrupted run. It skips the requests already stored with the
same prompt hash. Stored generations from another configuration (``run_key``) are discarded.

Outputs: ``rows.jsonl`` (kept rows in OpenAI messages form with provenance), ``rejected.jsonl``
(every rejected candidate, with the same keys), ``yield.json`` (yield per mode, counts per
filter, the TA's unguided agreement with gold).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bridge.answers import extract_for, is_correct_for
from bridge.config import PromptConfig, TutoringConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import BridgeError
from bridge.prompts import (
    RenderedPrompt,
    format_target,
    prompt_hash,
    render_all,
    render_messages,
    render_text,
    target_answer,
)
from bridge.rundir import RowWriter, atomic_write_json, atomic_write_text, read_json, read_rows

log = logging.getLogger(__name__)

Mode = Literal["free", "guided"]

FILTERS = ("truncation", "answer", "empty", "length", "restatement", "duplicate")
PASS, FAIL, NOT_APPLICABLE, NOT_RUN = "pass", "fail", "n/a", "not_run"

GENERATIONS_FILE = "generations.jsonl"
GENERATIONS_KEY_FILE = "generations_key.json"
ROWS_FILE = "rows.jsonl"
REJECTED_FILE = "rejected.jsonl"
YIELD_FILE = "yield.json"


# --------------------------------------------------------------------------------------------
# The restatement rule

_LABEL = r"(?:correct |final |right |true |verified |expected )?answer"

#: Phrases that refer to the hint or to having been given the answer.
_HINT_REFERENCES = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(?:the|a|this|given|provided) hint\b",
        r"\bhint\s*(?::|says|states|indicates|tells|shows)",
        r"\bhinted\b",
        rf"\b(?:verified|provided|given|supplied|stated|known) {_LABEL}",
        r"\banswer (?:is|was|has been) (?:given|provided|supplied|stated|verified|known)\b",
        r"\b(?:we|i|you) (?:are|were|am|was|have been) (?:told|given|informed)\b",
        r"\bas (?:stated|given|provided|indicated|told)\s*(?:[,.;:]|$)",
    )
]

#: Phrases that reason from the answer instead of towards it.
_ANSWER_AS_PREMISE = [
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"\b(?:since|because|given(?: that)?|as|knowing(?: that)?|we know(?: that)?) (?:the )?{_LABEL} (?:is|was|=)",
        rf"\b(?:the )?{_LABEL} (?:is|was) [^.;\n]{{1,40}}?[,;]? (?:so|therefore|thus|hence|which means)\b",
        rf"\b(?:justify|explain|show|confirm|prove) (?:why |that )?(?:the )?{_LABEL}",
    )
]

#: A sentence that states the answer ("The answer is yes.", "Answer: B").
_ANSWER_STATEMENT = re.compile(
    rf"^\W*(?:(?:so|thus|therefore|hence|overall|in conclusion)\W+)?(?:the\s+)?{_LABEL}\s*"
    r"(?::|is\b|was\b|would be\b|must be\b|should be\b)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")


def restatement_reason(rationale: str, gold: str, *, min_words: int) -> str | None:
    """Return why a guided rationale is rejected as a restatement of its hint, or None to keep it.

    The rule, applied case-insensitively to the text before the answer line:

    1. It refers to the hint or to being given the answer: "the hint", "hint:", "hinted",
       "the given/provided/verified answer", "the answer is given", "we are told", "as stated,".
    2. It reasons from the answer as a premise: "since/because/given that the answer is",
       "the answer is X, so", "explain why the answer".
    3. It merely restates the answer: once the sentences that state the answer ("The answer is
       B.", "Answer: yes") or consist of the gold answer alone are removed, fewer than
       ``min_words`` words remain.
    """
    for pattern in _HINT_REFERENCES:
        match = pattern.search(rationale)
        if match:
            return f"refers to the hint: {match.group(0).strip()!r}"
    for pattern in _ANSWER_AS_PREMISE:
        match = pattern.search(rationale)
        if match:
            return f"reasons from the answer: {match.group(0).strip()!r}"
    gold_words = _WORD.findall(gold.casefold())
    remaining = 0
    for sentence in _SENTENCE_END.split(rationale):
        words = _WORD.findall(sentence.casefold())
        if not words or _ANSWER_STATEMENT.search(sentence.strip()) or words == gold_words:
            continue
        remaining += len(words)
    if remaining < min_words:
        return f"restates the answer: {remaining} word(s) of reasoning, fewer than {min_words}"
    return None


# --------------------------------------------------------------------------------------------
# Duplicates


def normalise_rationale(text: str) -> str:
    """Fold case and whitespace: the form two rationales must share to be exact duplicates."""
    return " ".join(text.casefold().split())


def rationale_words(text: str) -> frozenset[str]:
    """Return the set of lower-case word tokens compared for near duplicates."""
    return frozenset(_WORD.findall(text.casefold()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def find_duplicates(texts: Sequence[str], threshold: float, *, keep: Iterable[int] = ()) -> dict[int, tuple[str, int]]:
    """Return ``{index: (kind, earlier_index)}`` for each text that repeats an earlier kept text.

    Texts are taken in order. A text is an ``exact`` duplicate when its :func:`normalise_rationale`
    form equals a kept one, and a ``near`` duplicate when its word-set Jaccard similarity to a kept
    one reaches ``threshold``. A dropped text is not compared with later ones. Indices in
    ``keep`` are always kept (teacher rows) but still count as earlier texts.

    Candidates are found by prefix filtering (Bayardo et al., "Scaling up all pairs similarity
    search", WWW 2007): with words ordered from rare to common, two sets with Jaccard similarity
    of at least t share a word among the first ``|s| - ceil(t * |s|) + 1`` words of each.
    """
    forced = set(keep)
    word_sets = [rationale_words(t) for t in texts]
    frequency = Counter(word for words in word_sets for word in words)

    def prefix(words: frozenset[str]) -> list[str]:
        ordered = sorted(words, key=lambda w: (frequency[w], w))
        length = len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1
        return ordered[: max(length, 1)]

    exact: dict[str, int] = {}
    index: dict[str, list[int]] = {}
    dropped: dict[int, tuple[str, int]] = {}
    for i, text in enumerate(texts):
        key = normalise_rationale(text)
        if i not in forced:
            if key in exact:
                dropped[i] = ("exact", exact[key])
                continue
            words = word_sets[i]
            candidates = sorted({j for word in prefix(words) for j in index.get(word, ())})
            match = next((j for j in candidates if jaccard(words, word_sets[j]) >= threshold), None)
            if match is not None:
                dropped[i] = ("near", match)
                continue
        exact.setdefault(key, i)
        for word in prefix(word_sets[i]):
            index.setdefault(word, []).append(i)
    return dropped


# --------------------------------------------------------------------------------------------
# Demonstrations


def nearest_demonstrations(
    ids: Sequence[str], vectors: np.ndarray, demo_ids: Sequence[str], k: int
) -> dict[str, list[str]]:
    """Return, for every id, the ``k`` ids of ``demo_ids`` whose vectors are most similar (cosine).

    ``vectors`` has one row per id in ``ids``. An example is never its own demonstration. Ties
    are broken by id, so the result does not depend on input order.
    """
    if k <= 0 or not demo_ids:
        return {i: [] for i in ids}
    position = {example_id: row for row, example_id in enumerate(ids)}
    missing = [d for d in demo_ids if d not in position]
    if missing:
        raise ValueError(f"demonstration ids without a vector: {missing[:5]}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1.0, norms)
    demo_order = sorted(demo_ids)
    similarity = unit @ unit[[position[d] for d in demo_order]].T
    result = {}
    for row, example_id in enumerate(ids):
        ranked = sorted(
            (d for d in range(len(demo_order)) if demo_order[d] != example_id),
            key=lambda d: (-float(similarity[row, d]), demo_order[d]),
        )
        result[example_id] = [demo_order[d] for d in ranked[:k]]
    return result


# --------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    """One generation for one example, with its filter verdicts once judged."""

    id: str
    mode: Mode
    attempt: int
    text: str
    finish_reason: str
    completion_tokens: int
    prompt_hash: str
    temperature: float
    seed: int
    demonstrations: list[str]
    pred: str = ""
    rationale: str = ""
    target: str = ""
    rationale_tokens: int = 0
    filters: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def first_failure(self) -> str | None:
        return next((name for name in FILTERS if self.filters.get(name) == FAIL), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None


def judge(
    candidate: Candidate, example: Example, task: TaskSpec, config: TutoringConfig, tokenizer: Any
) -> Candidate:
    """Fill in the verdicts of every filter but ``duplicate``, which needs the whole pool."""
    verdicts = {name: NOT_APPLICABLE for name in FILTERS}
    reasons: dict[str, str] = {}
    verdicts["truncation"] = FAIL if candidate.finish_reason == "length" else PASS
    candidate.pred = extract_for(candidate.text, task, example)
    verdicts["answer"] = PASS if is_correct_for(candidate.pred, task, example) else FAIL
    if verdicts["answer"] == FAIL:
        reasons["answer"] = f"extracted {candidate.pred!r}, gold {example.gold!r}"

    candidate.target = format_target(candidate.text, target_answer(example, task))
    body = "\n".join(line for line in candidate.target.splitlines()[:-1]).strip()
    candidate.rationale = body
    candidate.rationale_tokens = len(tokenizer(body, add_special_tokens=False)["input_ids"]) if body else 0
    verdicts["empty"] = PASS if body else FAIL
    if config.max_rationale_tokens is not None:
        too_long = candidate.rationale_tokens > config.max_rationale_tokens
        verdicts["length"] = FAIL if too_long else PASS
        if too_long:
            reasons["length"] = f"{candidate.rationale_tokens} tokens, more than {config.max_rationale_tokens}"
    if candidate.mode == "guided":
        reason = restatement_reason(body, target_answer(example, task), min_words=config.min_reasoning_words)
        verdicts["restatement"] = FAIL if reason else PASS
        if reason:
            reasons["restatement"] = reason
    verdicts["duplicate"] = NOT_RUN
    candidate.filters = verdicts
    candidate.reasons = reasons
    return candidate


# --------------------------------------------------------------------------------------------
# The generation loop


@dataclass
class TutoringResult:
    """Kept rows, rejected candidates and the yield report of one tutoring run."""

    rows: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    report: dict[str, Any]


@dataclass(frozen=True)
class _Pass:
    mode: Mode
    attempt: int
    temperature: float
    seed: int


def plan_passes(config: TutoringConfig, seed: int) -> list[_Pass]:
    """Return the generation passes of the configured mode, in order."""
    passes = []
    if config.mode in ("free", "free_then_guided"):
        for attempt in range(1, config.free_samples + 1):
            temperature = 0.0 if attempt == 1 else config.temperature
            passes.append(_Pass("free", attempt, temperature, seed + attempt))
    if config.mode in ("guided", "free_then_guided"):
        passes.append(_Pass("guided", 1, 0.0, seed))
    return passes


class _GenerationStore:
    """The append-only file of raw generations, keyed by (mode, attempt, id)."""

    def __init__(self, out_dir: Path, run_key: str) -> None:
        self.path = out_dir / GENERATIONS_FILE
        key_path = out_dir / GENERATIONS_KEY_FILE
        stored_key = read_json(key_path).get("run_key") if key_path.exists() else None
        if stored_key != run_key and self.path.exists():
            log.info("discarding stored generations in %s: they belong to another configuration", self.path)
            self.path.unlink()
        atomic_write_json(key_path, {"run_key": run_key})
        self.records: dict[tuple[str, int, str], dict[str, Any]] = {}
        for record in read_rows(self.path):
            self.records[(record["mode"], record["attempt"], record["id"])] = record
        self.writer = RowWriter(self.path)

    def get(self, mode: str, attempt: int, example_id: str, digest: str) -> dict[str, Any] | None:
        record = self.records.get((mode, attempt, example_id))
        return record if record is not None and record["prompt_hash"] == digest else None

    def add(self, record: dict[str, Any]) -> None:
        self.writer.append(record)
        self.records[(record["mode"], record["attempt"], record["id"])] = record

    def close(self) -> None:
        self.writer.close()


def tutor_pool(
    lm: Any,
    examples: Sequence[Example],
    task: TaskSpec,
    config: TutoringConfig,
    prompts: PromptConfig,
    *,
    teacher_rows: Sequence[dict[str, Any]],
    out_dir: Path,
    seed: int,
    run_key: str,
    demonstrations: Mapping[str, Sequence[Example]] | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
) -> TutoringResult:
    """Have ``lm`` write rationales for ``examples``, filter them and write the tutoring files.

    ``teacher_rows`` are the teach stage's kept rows, which are kept as they are.
    ``demonstrations`` maps an example id to the demonstration examples of its prompts, whose
    ``explanation`` is shown as the rationale. ``run_key`` identifies everything that shapes the
    generations; stored generations with another key are discarded.
    """
    by_id = {e.id: e for e in examples}
    teacher_by_id = {row["id"]: row for row in teacher_rows}
    unknown = sorted(set(teacher_by_id) - set(by_id))
    if unknown:
        raise BridgeError(
            f"{len(unknown)} teacher row(s) name examples that are not in the training split: {unknown[:5]}",
            hint="the teach stage ran with other data settings; rerun it with 'bridge run --from teach'",
        )
    pool = sorted((e for e in examples if e.id not in teacher_by_id), key=lambda e: e.id)
    demos = demonstrations or {}
    store = _GenerationStore(out_dir, run_key)
    candidates: dict[str, list[Candidate]] = {e.id: [] for e in pool}
    skipped: set[str] = set()
    try:
        for step in plan_passes(config, seed):
            pending = [e for e in pool if e.id not in skipped and not any(c.passed for c in candidates[e.id])]
            if step.mode == "free" and step.attempt > 1:
                pending = [e for e in pending if candidates[e.id]]
            if not pending:
                continue
            results, too_long = _run_pass(lm, pending, task, config, prompts, step, store, demos, skip_invalid, progress)
            skipped.update(too_long)
            for candidate in results:
                candidates[candidate.id].append(judge(candidate, by_id[candidate.id], task, config, lm.tokenizer))
    finally:
        store.close()

    generated_for = [e for e in pool if e.id not in skipped]
    rows, rejected = _assemble(lm, pool, by_id, task, prompts, teacher_rows, candidates, config)
    report = _report(pool, teacher_rows, candidates, rows, rejected, skipped, generated_for, config)
    _write_outputs(out_dir, rows, rejected, report)
    return TutoringResult(rows, rejected, report)


def _render(
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    tokenizer: Any,
    *,
    guided: bool,
    demos: Mapping[str, Sequence[Example]],
    skip_invalid: bool,
) -> tuple[list[RenderedPrompt], list[str]]:
    rendered: list[RenderedPrompt] = []
    skipped: list[str] = []
    for example in examples:
        found, lost = render_all(
            [example],
            task,
            style="rationale",
            hints={example.id: target_answer(example, task)} if guided else None,
            demos=list(demos.get(example.id, ())),
            system=prompts.system,
            tokenizer=tokenizer,
            max_context_tokens=prompts.max_context_tokens,
            truncation_side=prompts.truncation_side,
            skip_invalid=skip_invalid,
        )
        rendered.extend(found)
        skipped.extend(lost)
    return rendered, skipped


def _run_pass(
    lm: Any,
    examples: Sequence[Example],
    task: TaskSpec,
    config: TutoringConfig,
    prompts: PromptConfig,
    step: _Pass,
    store: _GenerationStore,
    demos: Mapping[str, Sequence[Example]],
    skip_invalid: bool,
    progress: bool,
) -> tuple[list[Candidate], list[str]]:
    """Generate one pass for ``examples``, storing each batch, and return its candidates."""
    from bridge.models.inference import GenerationRequest, iter_generate

    rendered, too_long = _render(
        examples, task, prompts, lm.tokenizer, guided=step.mode == "guided", demos=demos, skip_invalid=skip_invalid
    )
    texts = {r.example_id: render_text(r, lm.tokenizer) for r in rendered}
    demo_ids = {e.id: [d.id for d in demos.get(e.id, ())] for e in examples}
    done = {i for i, t in texts.items() if store.get(step.mode, step.attempt, i, prompt_hash(t)) is not None}
    log.info(
        "tutoring pass %s attempt %d: %d prompts, %d already stored",
        step.mode, step.attempt, len(texts), len(done),
    )
    requests = [GenerationRequest(id=i, prompt=t) for i, t in texts.items()]
    for batch in iter_generate(
        lm,
        requests,
        max_new_tokens=config.max_new_tokens,
        temperature=step.temperature,
        seed=step.seed,
        batch_size=config.batch_size,
        skip_ids=done,
        progress=progress,
    ):
        for generation in batch:
            store.add(
                {
                    "id": generation.id,
                    "mode": step.mode,
                    "attempt": step.attempt,
                    "prompt_hash": generation.prompt_hash,
                    "text": generation.text,
                    "finish_reason": generation.finish_reason,
                    "completion_tokens": generation.completion_tokens,
                    "temperature": step.temperature,
                    "seed": step.seed,
                    "demonstrations": demo_ids[generation.id],
                }
            )
    results = []
    for example_id, text in texts.items():
        record = store.get(step.mode, step.attempt, example_id, prompt_hash(text))
        if record is None:
            raise BridgeError(f"tutoring produced no generation for example {example_id} ({step.mode}, attempt {step.attempt})")
        results.append(
            Candidate(
                id=record["id"],
                mode=record["mode"],
                attempt=record["attempt"],
                text=record["text"],
                finish_reason=record["finish_reason"],
                completion_tokens=record["completion_tokens"],
                prompt_hash=record["prompt_hash"],
                temperature=record["temperature"],
                seed=record["seed"],
                demonstrations=list(record["demonstrations"]),
            )
        )
    return results, too_long


# --------------------------------------------------------------------------------------------
# Rows and report


def _student_messages(
    example: Example, task: TaskSpec, prompts: PromptConfig, tokenizer: Any, completion: str
) -> list[dict[str, str]]:
    """Return the training conversation: the unguided prompt without demonstrations, then ``completion``."""
    rendered = render_messages(
        example,
        task,
        style="rationale",
        system=prompts.system,
        tokenizer=tokenizer,
        max_context_tokens=prompts.max_context_tokens,
        truncation_side=prompts.truncation_side,
    )
    return [*rendered.messages, {"role": "assistant", "content": completion}]


def _ta_row(candidate: Candidate, example: Example, task: TaskSpec, prompts: PromptConfig, lm: Any) -> dict[str, Any]:
    kept = candidate.passed
    return {
        "id": candidate.id,
        "messages": _student_messages(example, task, prompts, lm.tokenizer, candidate.target if kept else candidate.text),
        "rationale": candidate.rationale,
        "answer": target_answer(example, task),
        "pred": candidate.pred,
        "correct": candidate.filters.get("answer") == PASS,
        "target": candidate.target,
        "text": candidate.text,
        "writer": "ta",
        "model": lm.name,
        "mode": candidate.mode,
        "attempt": candidate.attempt,
        "label_conditioned": candidate.mode == "guided",
        "filters": dict(candidate.filters),
        "rejected_by": candidate.first_failure,
        "reasons": dict(candidate.reasons),
        "prompt_hash": candidate.prompt_hash,
        "finish_reason": candidate.finish_reason,
        "completion_tokens": candidate.completion_tokens,
        "rationale_tokens": candidate.rationale_tokens,
        "temperature": candidate.temperature,
        "seed": candidate.seed,
        "demonstrations": list(candidate.demonstrations),
        "source": "tutoring",
        "endpoint": None,
        "ledger_key": None,
        "ledger_attempt_id": None,
        "cost_usd": 0.0,
        "cached": False,
    }


def _teacher_row(row: dict[str, Any], example: Example, task: TaskSpec, prompts: PromptConfig, tokenizer: Any) -> dict[str, Any]:
    target = row["target"]
    return {
        "id": row["id"],
        "messages": _student_messages(example, task, prompts, tokenizer, target),
        "rationale": row["rationale"],
        "answer": row["answer"],
        "pred": row["answer"],
        "correct": bool(row["correct"]),
        "target": target,
        "text": target,
        "writer": "teacher",
        "model": row["model"],
        "mode": "teacher",
        "attempt": row["attempt"],
        "label_conditioned": bool(row["label_conditioned"]),
        "filters": {name: NOT_APPLICABLE for name in FILTERS},
        "rejected_by": None,
        "reasons": {},
        "prompt_hash": None,
        "finish_reason": None,
        "completion_tokens": None,
        "rationale_tokens": len(tokenizer(row["rationale"], add_special_tokens=False)["input_ids"]),
        "temperature": None,
        "seed": None,
        "demonstrations": [],
        "source": row["source"],
        "endpoint": row["endpoint"],
        "ledger_key": row["ledger_key"],
        "ledger_attempt_id": row["ledger_attempt_id"],
        "cost_usd": row["cost_usd"],
        "cached": bool(row["cached"]),
    }


def _assemble(
    lm: Any,
    pool: Sequence[Example],
    by_id: Mapping[str, Example],
    task: TaskSpec,
    prompts: PromptConfig,
    teacher_rows: Sequence[dict[str, Any]],
    candidates: Mapping[str, list[Candidate]],
    config: TutoringConfig,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Apply the duplicate filter and build the kept and rejected rows."""
    teacher = sorted(teacher_rows, key=lambda r: r["id"])
    accepted = [next(c for c in candidates[e.id] if c.passed) for e in pool if any(c.passed for c in candidates[e.id])]
    texts = [r["rationale"] for r in teacher] + [c.rationale for c in accepted]
    dropped = find_duplicates(texts, config.near_duplicate_threshold, keep=range(len(teacher)))
    names = [r["id"] for r in teacher] + [c.id for c in accepted]
    for offset, candidate in enumerate(accepted):
        hit = dropped.get(len(teacher) + offset)
        candidate.filters["duplicate"] = FAIL if hit else PASS
        if hit:
            kind, earlier = hit
            candidate.reasons["duplicate"] = f"{kind} duplicate of the rationale for {names[earlier]}"

    rows = [_teacher_row(r, by_id[r["id"]], task, prompts, lm.tokenizer) for r in teacher]
    rejected = []
    for example in pool:
        for candidate in candidates[example.id]:
            row = _ta_row(candidate, example, task, prompts, lm)
            (rows if candidate.passed else rejected).append(row)
    return rows, rejected


def _report(
    pool: Sequence[Example],
    teacher_rows: Sequence[dict[str, Any]],
    candidates: Mapping[str, list[Candidate]],
    rows: Sequence[dict[str, Any]],
    rejected: Sequence[dict[str, Any]],
    skipped: set[str],
    generated_for: Sequence[Example],
    config: TutoringConfig,
) -> dict[str, Any]:
    modes: dict[str, dict[str, Any]] = {}
    for mode in ("free", "guided"):
        tried = {c.id for cs in candidates.values() for c in cs if c.mode == mode}
        if not tried:
            continue
        kept = sum(1 for r in rows if r["mode"] == mode)
        modes[mode] = {
            "examples": len(tried),
            "generations": sum(1 for cs in candidates.values() for c in cs if c.mode == mode),
            "kept": kept,
            "yield": kept / len(tried),
        }
    dropped_by = Counter(r["rejected_by"] for r in rejected)
    failed = Counter(name for r in rejected for name, verdict in r["filters"].items() if verdict == FAIL)
    first_free = [cs[0] for e in generated_for if (cs := candidates[e.id]) and cs[0].mode == "free" and cs[0].attempt == 1]
    agreement = None
    if first_free:
        correct = sum(1 for c in first_free if c.filters["answer"] == PASS)
        agreement = {"correct": correct, "examples": len(first_free), "rate": correct / len(first_free)}
    with_row = {r["id"] for r in rows}
    return {
        "mode": config.mode,
        "pool": len(pool) + len(teacher_rows),
        "teacher_rows": len(teacher_rows),
        "ta_examples": len(pool),
        "skipped_too_long": len(skipped),
        "modes": modes,
        "kept_rows": len(rows),
        "rejected_candidates": len(rejected),
        "examples_without_row": sum(1 for e in pool if e.id not in with_row),
        "label_conditioned_rows": sum(1 for r in rows if r["label_conditioned"]),
        "dropped_by": {name: dropped_by.get(name, 0) for name in FILTERS},
        "failed": {name: failed.get(name, 0) for name in FILTERS},
        "ta_unguided_agreement": agreement,
    }


def _write_outputs(out_dir: Path, rows: Sequence[dict], rejected: Sequence[dict], report: dict[str, Any]) -> None:
    atomic_write_text(out_dir / ROWS_FILE, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(
        out_dir / REJECTED_FILE, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejected)
    )
    atomic_write_json(out_dir / YIELD_FILE, report)


def with_explanation(example: Example, rationale: str) -> Example:
    """Return ``example`` carrying ``rationale`` as its explanation, for use as a demonstration."""
    return replace(example, explanation=rationale)
