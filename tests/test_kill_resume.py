"""SIGKILL at random points in every stage, then resume: nothing is lost, repeated or bought twice.

One uninterrupted reference run and one chained run share the fake teacher server. The chained
run is killed again and again. Each child stops after the stage it targets, and a child that
finishes its stage before the kill fires moves the chain on to the next stage. Then the run
ends without a kill and must match the reference: every row file (ids, order, text), the
training data order, the optimizer-step counts, weights within 1e-6 and the predictions; no row
file with a torn line; generation batches that are batches of the reference run (formed from the
full sorted list, not from what remained); no response that the ledger stored bought again.

A kill after the endpoint billed a response but before the ledger recorded it loses that call:
the call counts against the budget, which caps billed calls, so such a run buys fewer rows than
the reference and cannot match it. Those kills run in a second chain, checked against the money
rules: nothing stored is bought again, the bill stays under the caps, and every kept row equals
the reference's row for that example.

Set BRIDGE_KILL_SEED to replay another random plan; the default plan is fixed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from bridge.teacher.ledger import OK
from fakes.openai_server import FakeOpenAIServer
from killpoints import (
    STAGES,
    TEACHER_KEY,
    TinyPipeline,
    compare_runs,
    ledger_statuses,
    read_trace,
    stored_responses,
    teacher_reply,
    torn_files,
)

#: Most kills aimed at each stage, and at each curriculum stage inside train_student; the chain
#: moves on early once a child finishes its target.
MAX_KILLS = {
    "select": 6, "teach": 6, "train_ta": 8, "tutor": 6, "train_student/stage-a": 6, "train_student/stage-b": 6,
    "eval": 6, "report": 4,
}
#: Points left out of the main chain because they lose a billed call (see the module docstring).
LOSSY_POINTS = {"send"}
#: Stages whose weights may differ from the reference by more than 1e-6, with the measured bound.
EXEMPT: dict[str, float] = {}
MINIMUM_FIRED = 30
LOSSY_KILLS = 3


def bill_key(message: str) -> tuple[str, str]:
    number = re.search(r"Does intervention (\d+)", message).group(1)
    return f"g{number}", "reask" if "Hint" in message else "ask"


def plan_kill(target: str, census: dict[tuple[str, str], int], rng: random.Random) -> str:
    """Pick a point the reference run called in ``target`` (weighted by its calls) and an early call number."""
    points = sorted(
        (point, calls) for (name, point), calls in census.items()
        if name == target and calls > 0 and point not in LOSSY_POINTS
    )
    point = rng.choices([p for p, _ in points], weights=[c for _, c in points])[0]
    number = rng.randint(1, max(1, min(2, census[(target, point)] // 2)))
    return f"{target}:{point}:{number}"


def rebought(server: FakeOpenAIServer, billed_before: int, stored: set[tuple[str, str]], spec: str) -> list[str]:
    return [
        f"{spec}: {key}" for entry in server.bill[billed_before:]
        if (key := bill_key(entry.last_user_message)) in stored
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_resume_identically(tmp_path: Path, tiny_model_dir: Path):
    rng = random.Random(int(os.environ.get("BRIDGE_KILL_SEED", "20261204")))
    started = time.monotonic()
    with FakeOpenAIServer(api_key=TEACHER_KEY, responder=teacher_reply) as server:
        pipeline = TinyPipeline(tmp_path, tiny_model_dir, server)
        reference = pipeline.run("reference", trace=tmp_path / "reference.trace.jsonl")
        assert reference.returncode == 0, reference.stderr_tail
        reference_batches, census = read_trace(tmp_path / "reference.trace.jsonl")
        reference_bill = len(server.bill)

        fired: list[dict] = []
        finished: list[str] = []
        bought_again: list[str] = []
        chained = pipeline.run_dir("chained")
        for target, most in MAX_KILLS.items():
            stage = target.split("/")[0]
            for _ in range(most):
                # After a curriculum stage's fine-tuning has finished, a kill planned inside it may not
                # fire again because its dev rows are stored. A child that outlives it would train the
                # next curriculum stage unkilled, so the chain moves on.
                if "/" in target and (chained / target / "metrics.json").exists():
                    break
                spec = plan_kill(target, census, rng)
                stored, billed = stored_responses(chained), len(server.bill)
                result = pipeline.run(
                    "chained", kill=spec, until=stage.replace("_", "-"), trace=tmp_path / "chained.trace.jsonl"
                )
                assert result.returncode in (0, -9), f"{spec}: exit code {result.returncode}\n{result.stderr_tail}"
                bought_again += rebought(server, billed, stored, spec)
                if not result.killed:
                    finished.append(spec)  # the stage finished before the planned call
                    break
                assert result.kill is not None, spec
                fired.append({**result.kill, "target": target})
        final = pipeline.run("chained", trace=tmp_path / "chained.trace.jsonl")
        assert final.returncode == 0, final.stderr_tail
        chained_bill = len(server.bill) - reference_bill

    by_target = collections.Counter(k["target"] for k in fired)
    by_point = collections.Counter(k["point"] for k in fired)
    comparison = compare_runs(pipeline.run_dir("reference"), chained)
    print(
        f"\nkill points fired: {len(fired)} ({len(finished)} more planned after a stage had finished); "
        f"by stage {dict(by_target)}; by point {dict(sorted(by_point.items()))}; "
        f"teacher calls billed to the chained run {chained_bill}; "
        f"minutes {(time.monotonic() - started) / 60:.1f}"
    )
    print(f"largest weight differences: {comparison.weight_diffs}; optimizer steps: {comparison.optimizer_steps}")

    assert len(fired) >= MINIMUM_FIRED, finished
    assert set(by_target) == set(MAX_KILLS), by_target
    assert {target.split("/")[0] for target in MAX_KILLS} == set(STAGES)
    assert bought_again == []
    for key, statuses in ledger_statuses(chained).items():
        assert statuses[OK] <= 1, (key, statuses)

    problems = [p for p in comparison.problems if not any(p.startswith(s) for s in EXEMPT)]
    assert problems == []
    for name, bound in EXEMPT.items():
        assert all(d <= bound for k, d in comparison.weight_diffs.items() if k.startswith(name)), name

    # The teacher quoted the key in every reply; no file of either run and no output may hold it.
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and TEACHER_KEY.encode() in p.read_bytes()]
    assert leaks == []

    chained_batches, _ = read_trace(tmp_path / "chained.trace.jsonl")
    formed = collections.defaultdict(set)
    for batch in reference_batches:
        formed[(batch["stage"], batch["training"])].add(tuple(batch["prompts"]))
    strays = [b for b in chained_batches if tuple(b["prompts"]) not in formed[(b["stage"], b["training"])]]
    assert strays == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kills_after_billing_never_rebuy(tmp_path: Path, tiny_model_dir: Path):
    """Kills between the bill and the ledger lose calls but never buy a stored response again."""
    with FakeOpenAIServer(api_key=TEACHER_KEY, responder=teacher_reply, latency_s=0.2) as server:
        pipeline = TinyPipeline(tmp_path, tiny_model_dir, server)
        reference = pipeline.run("reference", until="teach")
        assert reference.returncode == 0, reference.stderr_tail
        reference_bill = len(server.bill)

        pipeline.extra = ["teacher.concurrency=2"]
        lossy = pipeline.run_dir("lossy")
        kills, bought_again = 0, []
        for number in range(1, LOSSY_KILLS + 1):
            spec = f"teach:send:{number}"
            stored, billed = stored_responses(lossy), len(server.bill)
            result = pipeline.run("lossy", kill=spec, until="teach")
            assert result.returncode in (0, -9), result.stderr_tail
            kills += result.killed
            bought_again += rebought(server, billed, stored, spec)
        final = pipeline.run("lossy", until="teach")
        assert final.returncode == 0, final.stderr_tail
        lossy_bill = server.bill[reference_bill:]

    summary = json.loads((lossy / "teach" / "summary.json").read_text())
    print(f"\nbilled-but-unrecorded kills: {kills}; calls billed {len(lossy_bill)} of cap {summary['call_cap']}")
    # With two requests in flight, a kill can also lose the other billed call, so the cap may be
    # spent before the last planned kill point. The first two kills fire because the cap has room.
    assert 2 <= kills <= LOSSY_KILLS
    assert bought_again == []
    assert len(lossy_bill) <= summary["call_cap"]
    assert sum(entry.cost_usd for entry in lossy_bill) <= 1.0
    for key, statuses in ledger_statuses(lossy).items():
        assert statuses[OK] <= 1, (key, statuses)
    reference_rows = {row["id"]: row for row in _rows(pipeline.run_dir("reference") / "teach" / "rows.jsonl")}
    kept = _rows(lossy / "teach" / "rows.jsonl")
    assert kept
    for row in kept:
        assert row["target"] == reference_rows[row["id"]]["target"], row["id"]
    assert torn_files(lossy) == []


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
