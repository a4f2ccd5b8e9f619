"""Tutoring: the refined TA writes a rationale for every training example, checked by filters.

The modes, filters and files are described in :mod:`bridge.tutoring`. Outputs in ``tutor/``:
``rows.jsonl`` (kept rows in OpenAI messages form, teacher rows included, with provenance),
``rejected.jsonl``, ``yield.json``, and ``generations.jsonl`` (raw generations, appended batch
by batch so that a killed run resumes).
"""

from __future__ import annotations

import logging
from typing import Any

from bridge.data.types import Example
from bridge.rundir import read_rows
from bridge.stages.common import by_id, require_file, teacher_rows
from bridge.tutoring import nearest_demonstrations, tutor_pool, with_explanation

log = logging.getLogger(__name__)


def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.data
    out = ctx.stage_dir("tutor")
    teacher = teacher_rows(ctx.run.root)
    demonstrations = None
    if cfg.tutoring.demonstrations:
        demonstrations = teacher_demonstrations(ctx, teacher, cfg.tutoring.demonstrations)

    lm = ctx.refined_ta()
    result = tutor_pool(
        lm,
        data.train,
        data.task,
        cfg.tutoring,
        cfg.prompts,
        teacher_rows=teacher,
        out_dir=out,
        seed=cfg.seed,
        run_key=ctx.fingerprints["tutor"],
        demonstrations=demonstrations,
        skip_invalid=cfg.data.skip_invalid,
    )
    report = result.report
    for mode, counts in report["modes"].items():
        log.info("tutoring %s mode: kept %d of %d examples (yield %.2f)", mode, counts["kept"], counts["examples"], counts["yield"])
    agreement = report["ta_unguided_agreement"]
    if agreement is not None:
        log.info("TA unguided agreement with gold: %.3f on %d examples", agreement["rate"], agreement["examples"])
    return {
        "rows": report["kept_rows"],
        "teacher_rows": report["teacher_rows"],
        "rejected": report["rejected_candidates"],
        "modes": report["modes"],
        "dropped_by": report["dropped_by"],
        "ta_unguided_agreement": agreement,
        "examples_without_row": report["examples_without_row"],
    }


def teacher_demonstrations(ctx: Any, teacher: list[dict[str, Any]], k: int) -> dict[str, list[Example]]:
    """Return, for every training example, its ``k`` most similar teacher examples as demonstrations.

    Similarity is the cosine of the Phase 1 embeddings stored by the select stage; a
    demonstration shows the teacher's rationale and the gold answer.
    """
    from bridge.stages.select import load_embeddings

    root = ctx.run.root
    scored = list(read_rows(require_file(root / "select" / "scores.jsonl", "select")))
    vectors = load_embeddings(root / "select", scored)
    ids = [row["id"] for row in scored]
    usable = {row["id"]: row["rationale"] for row in teacher if row["rationale"].strip()}
    examples = by_id(ctx.data.train)
    nearest = nearest_demonstrations(ids, vectors, sorted(i for i in usable if i in set(ids)), k)
    return {
        example_id: [with_explanation(examples[d], usable[d]) for d in demo_ids]
        for example_id, demo_ids in nearest.items()
    }
