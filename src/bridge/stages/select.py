"""Phase 1: the untuned TA reads the training pool once; a selector picks the subset to buy.

Outputs in ``select/``: ``scores.jsonl`` (difficulty and prediction per example, keyed by id),
``embeddings/chunk-*.npy`` (one file per scoring chunk), ``subset.jsonl`` (chosen ids in pick
order with difficulty, cluster and reason) and ``plots/``. Scoring resumes chunk by chunk.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from bridge.answers import extract_for, is_correct
from bridge.data.types import Example, TaskSpec
from bridge.prompts import (
    option_continuations,
    option_labels,
    render_all,
    render_text,
    scoring_prompt,
)
from bridge.rundir import RowWriter, atomic_write_bytes, ensure_dir, fingerprint, read_rows
from bridge.selection import difficulty as difficulty_scores
from bridge.selection.subset import select_subset

log = logging.getLogger(__name__)

#: Examples per persisted scoring chunk, as a multiple of the batch size.
_CHUNK_BATCHES = 8
#: Kind under which the scores and embeddings are shared between the runs of a comparison.
SCORES_KIND = "select_scores"


def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.data
    task: TaskSpec = data.task
    pool: list[Example] = data.train
    out = ctx.stage_dir("select")

    kind = resolve_difficulty(cfg.selection.difficulty, task)
    lm = ctx.ta_model()
    rendered, skipped = render_all(
        pool,
        task,
        style="answer_only" if kind in ("option_entropy", "gold_prob") else "rationale",
        system=cfg.prompts.system,
        tokenizer=lm.tokenizer,
        max_context_tokens=cfg.prompts.max_context_tokens,
        truncation_side=cfg.prompts.truncation_side,
        skip_invalid=cfg.data.skip_invalid,
    )
    examples = {e.id: e for e in pool}
    key = scoring_key(cfg, kind)
    reused_seconds = ctx.reuse(SCORES_KIND, key)
    started = time.monotonic()
    scored = score_pool(ctx, lm, task, [(examples[r.example_id], r) for r in rendered], kind)
    scoring_seconds = reused_seconds if reused_seconds is not None else time.monotonic() - started
    ctx.publish(SCORES_KIND, key, [out / "scores.jsonl", out / "embeddings"], scoring_seconds)
    ids = [row["id"] for row in scored]
    raw = np.array([row["difficulty"] for row in scored], dtype=np.float64)
    vectors = load_embeddings(out, scored)
    if cfg.selection.embedding == "encoder":
        vectors = encoder_embeddings(ctx, [examples[i] for i in ids])

    size = subset_size(cfg, data)
    log.info("subset size: %s", size.explanation)
    result = select_subset(vectors, raw, size.examples, cfg.selection, seed=cfg.seed)
    rows = []
    for rank, chosen in enumerate(result.picks):
        rows.append(
            {
                "id": ids[chosen.index],
                "rank": rank,
                "difficulty": float(raw[chosen.index]),
                "cluster": chosen.cluster,
                "gain": chosen.gain,
                "reason": chosen.reason,
                "parts": chosen.parts,
            }
        )
    _write_rows(out / "subset.jsonl", rows)
    _write_rows(out / "dropped.jsonl", [{"id": ids[i], "reason": why} for i, why in sorted(result.dropped.items())])

    from bridge.selection.plots import plot_selection

    plots = plot_selection(vectors, raw, result.indices, out / "plots")
    summary = {
        "pool": len(pool),
        "scored": len(scored),
        "skipped_too_long": len(skipped),
        "filtered_out": len(result.dropped),
        "subset_size": len(rows),
        "target_size": size.examples,
        "call_cap": size.call_cap,
        "size_rule": size.explanation,
        "difficulty": kind,
        "embedding": cfg.selection.embedding,
        "selector": cfg.selection.selector,
        "lam": cfg.selection.lam,
        "ta_accuracy_untuned": _accuracy(scored),
        "plots": [str(p.relative_to(out)) for p in plots],
    }
    if reused_seconds is not None:
        summary["reused_seconds"] = round(reused_seconds, 1)
    log.info("selected %d of %d examples (%s, lambda %.2f)", len(rows), len(pool), cfg.selection.selector, cfg.selection.lam)
    return summary


def scoring_key(cfg: Any, kind: str) -> str:
    """Return the key of the pool's scores and TA embeddings: everything they depend on.

    The selector, lambda, embedding choice, filters and budget are left out, so runs that select
    differently from the same scores share them (the TA embeddings are always written). The seed counts only for the sampled answer entropy.
    """
    sampling = {"seed": cfg.seed, "samples": cfg.selection.samples} if kind == "answer_entropy" else {}
    generation = (
        {"max_new_tokens": cfg.tutoring.max_new_tokens, "temperature": cfg.tutoring.temperature}
        if kind in ("answer_entropy", "token_entropy")
        else {}
    )
    return fingerprint(
        SCORES_KIND,
        kind,
        cfg.data.model_dump(mode="json"),
        cfg.prompts.model_dump(mode="json"),
        cfg.models.ta.model_dump(mode="json"),
        cfg.models.ta_engine,
        cfg.selection.batch_size,
        sampling,
        generation,
    )


def resolve_difficulty(name: str, task: TaskSpec) -> str:
    """Return the difficulty score to use; ``auto`` is option entropy for closed formats."""
    if name == "auto":
        return "option_entropy" if task.is_closed else "answer_entropy"
    if name in ("option_entropy", "gold_prob") and not task.is_closed:
        from bridge.errors import ConfigError

        raise ConfigError(
            f"selection.difficulty = {name} needs answer options, but {task.name} has {task.format} answers",
            hint="use answer_entropy or token_entropy for numeric and span answers",
        )
    return name


def subset_size(cfg: Any, data: Any) -> Any:
    """Return the subset size and call cap the budget sets for the training pool.

    A money-only budget buys as many calls as its worst-case reservations fit, estimated from
    the rendered prompts without calling the teacher.
    """
    from bridge.selection import subset_size as size_for_budget

    cost = None
    if cfg.budget.fraction is None and cfg.budget.count is None:
        from bridge.teacher.estimate import estimate_teacher_cost

        estimate = estimate_teacher_cost(data.train, data.task, cfg.teacher, cfg.budget, cfg.prompts)
        cost = estimate.cost_worst_usd / estimate.planned_calls if estimate.planned_calls else None
    return size_for_budget(cfg.budget, len(data.train), cost_per_call=cost)


def score_pool(ctx: Any, lm: Any, task: TaskSpec, items: list[tuple[Example, Any]], kind: str) -> list[dict[str, Any]]:
    """Score every example once, persisting each chunk; return rows in pool order."""
    from bridge import engines

    cfg = ctx.config
    out = ctx.stage_dir("select")
    emb_dir = ensure_dir(out / "embeddings")
    scores_path = out / "scores.jsonl"
    ta_hidden = cfg.selection.embedding == "ta_hidden"
    if ta_hidden:
        engines.require(lm, "hidden_states")
    if kind == "token_entropy":
        engines.require(lm, "token_entropy")
    size = cfg.selection.batch_size * _CHUNK_BATCHES
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    on_disk = list(read_rows(scores_path))
    stored = _complete_chunks(on_disk, chunks, emb_dir)
    if len(stored) < len(on_disk):
        # A kill inside a chunk leaves some of its rows; the chunk is scored again and appends
        # all of them, so the partial rows are dropped first and each example keeps one row.
        log.info("dropping %d scored rows of chunks that were not finished", len(on_disk) - len(stored))
        _write_rows(scores_path, list(stored.values()))
    if ta_hidden:
        # Chunks scored for the sentence encoder hold width-1 placeholders, not TA embeddings.
        widths = {n: _chunk_width(emb_dir / _chunk_name(n)) for n in {row["chunk"] for row in stored.values()}}
        stored = {i: row for i, row in stored.items() if widths[row["chunk"]] > 1}

    with RowWriter(scores_path) as writer:
        for number, chunk in enumerate(chunks):
            if all(example.id in stored for example, _ in chunk):
                continue
            log.info("scoring chunk %d of %d (%d examples)", number + 1, len(chunks), len(chunk))
            if kind in ("option_entropy", "gold_prob"):
                texts = [scoring_prompt(r, lm.tokenizer) for _, r in chunk]
                # The TA embedding comes from the same forward pass as the option scores.
                results = engines.score_options(
                    lm,
                    texts,
                    [option_continuations(task, e) for e, _ in chunk],
                    batch_size=cfg.selection.batch_size,
                    with_embeddings=ta_hidden,
                )
                rows = [_closed_row(task, e, t, s, kind) for (e, _), t, s in zip(chunk, texts, results, strict=True)]
                if ta_hidden:
                    vectors = np.stack([r.embedding for r in results])
                else:
                    # The sentence encoder embeds the examples later; the file marks the chunk done.
                    vectors = np.zeros((len(chunk), 1), dtype=np.float32)
            else:
                texts = [render_text(r, lm.tokenizer) for _, r in chunk]
                rows = _open_rows(cfg, lm, task, chunk, texts, kind, engines.generate, _chat_requests(chunk))
                if ta_hidden:
                    vectors = engines.embed(lm, texts, batch_size=cfg.selection.batch_size)
                else:
                    # The sentence encoder embeds the examples later; the file marks the chunk done.
                    vectors = np.zeros((len(chunk), 1), dtype=np.float32)
            _save_npy(emb_dir / _chunk_name(number), vectors.astype(np.float32))
            for j, row in enumerate(rows):
                row.update(chunk=number, row=j)
                writer.append(row)
                stored[row["id"]] = row
    return [stored[example.id] for example, _ in items]


def _complete_chunks(rows: list[dict[str, Any]], chunks: list[list[Any]], emb_dir: Any) -> dict[str, dict[str, Any]]:
    """Return the stored rows by id of the chunks with every row and a saved embeddings file."""
    ids_by_chunk: dict[int, set[str]] = {}
    for row in rows:
        ids_by_chunk.setdefault(row["chunk"], set()).add(row["id"])
    complete = {
        number
        for number, chunk in enumerate(chunks)
        if (emb_dir / _chunk_name(number)).exists() and {e.id for e, _ in chunk} <= ids_by_chunk.get(number, set())
    }
    return {row["id"]: row for row in rows if row["chunk"] in complete}


def _chunk_width(path: Any) -> int:
    """Return the embedding width stored in a chunk file, reading only its header."""
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[1])


def _chat_requests(chunk: list[tuple[Example, Any]]) -> Any:
    """Return a request factory for :func:`_open_rows` whose requests carry each example's chat messages.

    A server engine sends the messages to a chat endpoint; local engines continue the prompt text.
    """
    from bridge.engines import ChatGenerationRequest

    messages = {example.id: rendered.messages for example, rendered in chunk}

    def request(id: str, prompt: str) -> ChatGenerationRequest:
        return ChatGenerationRequest(id=id, prompt=prompt, messages=messages[id])

    return request


def _closed_row(task: TaskSpec, example: Example, text: str, score: Any, kind: str) -> dict[str, Any]:
    from bridge.prompts import prompt_hash

    labels = option_labels(task, example)
    probs = dict(zip(labels, score.probs, strict=True))
    difficulty = (
        score.entropy if kind == "option_entropy" else difficulty_scores.gold_difficulty(probs.get(example.gold, 0.0))
    )
    return {
        "id": example.id,
        "prompt_hash": prompt_hash(text),
        "difficulty": float(difficulty),
        "entropy": float(score.entropy),
        "probs": probs,
        "pred": labels[score.predicted],
        "correct": labels[score.predicted] == example.gold,
    }


def _open_rows(cfg: Any, lm: Any, task: TaskSpec, chunk: list, texts: list[str], kind: str, generate: Any, request: Any) -> list[dict[str, Any]]:
    from bridge.prompts import prompt_hash

    samples = cfg.selection.samples if kind == "answer_entropy" else 1
    answers: dict[str, list[str]] = {e.id: [] for e, _ in chunk}
    entropies: dict[str, float] = {}
    for s in range(samples):
        outputs = generate(
            lm,
            [request(id=e.id, prompt=t) for (e, _), t in zip(chunk, texts, strict=True)],
            max_new_tokens=cfg.tutoring.max_new_tokens,
            temperature=0.0 if s == 0 else cfg.tutoring.temperature,
            seed=cfg.seed + s,
            batch_size=cfg.selection.batch_size,
            progress=False,
        )
        for output in outputs:
            example = next(e for e, _ in chunk if e.id == output.id)
            answers[output.id].append(extract_for(output.text, task, example))
            if s == 0:
                entropies[output.id] = output.mean_entropy
    rows = []
    for (example, _), text in zip(chunk, texts, strict=True):
        found = answers[example.id]
        if kind == "answer_entropy":

            def same(a: str, b: str, example: Example = example) -> bool:
                return is_correct(a, b, task, example.scale, answer_format=example.answer_format)

            difficulty = difficulty_scores.answer_entropy(found, same)
        else:
            difficulty = difficulty_scores.mean_token_entropy(entropies[example.id])
        rows.append(
            {
                "id": example.id,
                "prompt_hash": prompt_hash(text),
                "difficulty": float(difficulty),
                "answers": found,
                "pred": found[0],
                "correct": is_correct(found[0], example.gold, task, example.scale, answer_format=example.answer_format),
            }
        )
    return rows


def load_embeddings(out: Any, scored: list[dict[str, Any]]) -> np.ndarray:
    """Stack the stored TA embeddings in the order of ``scored``."""
    cache: dict[int, np.ndarray] = {}
    vectors = []
    for row in scored:
        chunk = row["chunk"]
        if chunk not in cache:
            cache[chunk] = np.load(out / "embeddings" / _chunk_name(chunk), allow_pickle=False)
        vectors.append(cache[chunk][row["row"]])
    return np.stack(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)


def encoder_embeddings(ctx: Any, examples: list[Example]) -> np.ndarray:
    """Embed the prompt view (question, options, context) with the sentence encoder."""
    from bridge.data import prompt_view
    from bridge.models.inference import encode_sentences

    texts = []
    for example in examples:
        view = prompt_view(example)
        parts = [view.get("question") or "", *(f"{k}. {v}" for k, v in (view.get("options") or {}).items())]
        if view.get("context"):
            parts.append(view["context"])
        texts.append("\n".join(parts))
    return encode_sentences(texts, ctx.config.models.encoder)


def _accuracy(rows: list[dict[str, Any]]) -> float | None:
    return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None


def _chunk_name(number: int) -> str:
    return f"chunk-{number:05d}.npy"


def _save_npy(path: Any, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _write_rows(path: Any, rows: list[dict[str, Any]]) -> None:
    import json

    from bridge.rundir import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
