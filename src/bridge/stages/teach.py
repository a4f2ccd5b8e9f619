"""Apprenticeship, part one: buy teacher rationales for the selected subset, label-checked.

Outputs in ``teach/``: ``rows.jsonl`` (kept rationales with provenance: ledger key and cost),
``outcomes.jsonl`` (every request, kept or not, with the raw text of failures). The ledger is
``ledger.sqlite`` in the run directory, or the one the run context holds (``bridge compare``
shares one between its runs); a rerun reuses every response already bought.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bridge.rundir import atomic_write_text
from bridge.stages.common import by_id, subset_ids

log = logging.getLogger(__name__)


def run(ctx: Any) -> dict[str, Any]:
    from bridge.stages.select import subset_size
    from bridge.teacher.buy import buy_rationales

    cfg = ctx.config
    data = ctx.data
    out = ctx.stage_dir("teach")
    examples = by_id(data.train)
    chosen = [examples[i] for i in subset_ids(ctx.run.root)]
    # The call cap counts re-asks too, so a re-ask can use the call of a later pick.
    call_cap = subset_size(cfg, data).call_cap

    local = {}
    if cfg.teacher.backend == "local":
        from bridge.models.inference import generate
        from bridge.models.loading import load_model

        if cfg.teacher.local_model is None:
            from bridge.errors import ConfigError

            raise ConfigError("teacher.backend = local needs teacher.local_model", hint="set teacher.local_model.path")
        from bridge.errors import naming_setting

        with naming_setting("teacher.local_model.path", cfg.teacher.local_model.path):
            local = {"local_model": load_model(cfg.teacher.local_model), "local_generate": generate}

    tokenizer = ctx.ta_model().tokenizer if cfg.prompts.max_context_tokens else None
    result = buy_rationales(
        chosen,
        data.task,
        cfg.teacher,
        cfg.budget,
        ctx.ledger if ctx.ledger is not None else ctx.run.root,
        call_cap,
        system=cfg.prompts.system,
        tokenizer=tokenizer,
        max_context_tokens=cfg.prompts.max_context_tokens,
        confirm_remote=ctx.yes,
        **local,
    )
    atomic_write_text(out / "rows.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in result.rows))
    atomic_write_text(out / "outcomes.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in result.outcomes))
    summary = dict(result.summary)
    summary["subset"] = len(chosen)
    summary["call_cap"] = call_cap
    return summary
