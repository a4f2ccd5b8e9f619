"""bridge compare: the methods, the shared ledger accounts, shared work, and a comparison end to end.

The end-to-end test runs all six methods for two seeds on tiny in-process models and a
16-example slice of real PubMedQA read through the data loader, with the reference teacher.
The first invocation is interrupted at the start of one run's student stage; the second one
resumes and finishes.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.compare import (
    DIRECT_STAGES,
    FULL_STAGES,
    LABEL_STAGES,
    METHODS,
    SharedWork,
    method_config,
    method_stages,
    resolve_methods,
    summarise_methods,
)
from bridge.config import COMPARE_METHODS, BridgeConfig
from bridge.errors import ConfigError
from bridge.pipeline import _STAGE_INPUTS, _STAGE_SECTIONS, _section, compute_fingerprints
from bridge.rundir import STAGES, fingerprint, read_json
from bridge.teacher.account import LedgerAccount
from bridge.teacher.budget import Caps, Usage, WorstCase
from bridge.teacher.cache import StoredResponse, is_reusable
from bridge.teacher.ledger import AttemptInfo, Ledger

POOL = 16
SEEDS = 2


def base_config(**changes) -> BridgeConfig:
    raw = {
        "name": "cmp",
        "seed": 5,
        "data": {"dataset": "pubmedqa_pqal", "train_size": POOL, "dev_size": 4, "test_size": 8},
        "teacher": {"backend": "reference", "model": "reference", "price_per_call": 0.01},
        "budget": {"fraction": 0.25, "max_cost_usd": 5.0},
        "ta_training": {"seed": 10},
        "student": {
            "training": {"method": "full", "seed": 20},
            "stages": [
                {"name": "stage-a", "data": "labels", "epochs": 1.0, "learning_rate": 1e-3},
                {"name": "stage-b", "data": "rationales", "epochs": 3.0, "learning_rate": 2e-4, "order": "shuffled"},
            ],
        },
        "selection": {"drop_hardest_pct": 5.0},
    }
    raw.update(changes)
    return BridgeConfig.model_validate(raw)


# --------------------------------------------------------------------------------------------
# Methods


def test_methods_match_config_choices():
    assert tuple(METHODS) == COMPARE_METHODS


def test_method_configs_transform_only_their_part():
    config = base_config()
    bridge = method_config(config, "bridge", 1)
    assert bridge.seed == 6
    assert bridge.ta_training.seed == 11
    assert bridge.student.training.seed == 21
    assert bridge.data.split_seed == config.data.split_seed
    assert bridge.name == "bridge-seed6"
    assert bridge.output.runs_dir == str(Path("runs") / "cmp-compare")
    assert bridge.evaluation.models == "final_student"
    assert bridge.student.stages == config.student.stages

    direct = method_config(config, "direct_same_budget", 0)
    [stage] = direct.student.stages
    assert (stage.name, stage.data, stage.epochs, stage.learning_rate) == ("direct", "teacher_rationales", 3.0, 2e-4)
    assert direct.budget == config.budget
    assert direct.selection == config.selection

    full = method_config(config, "direct_full", 0)
    assert full.student.stages == direct.student.stages
    assert full.budget.fraction == 1.0
    assert full.budget.max_cost_usd is None
    assert full.selection.selector == "random"
    assert full.selection.drop_hardest_pct == 0.0

    label = method_config(config, "label_only", 0)
    assert label.student.stages == config.student.stages[:1]

    no_stage_a = method_config(config, "bridge_no_stage_a", 0)
    assert [s.name for s in no_stage_a.student.stages] == ["stage-b"]

    random = method_config(config, "bridge_random", 0)
    assert random.selection.selector == "random"
    assert random.selection.drop_hardest_pct == config.selection.drop_hardest_pct


def test_method_stages_add_selection_for_ordered_rows():
    config = base_config()
    assert method_stages(method_config(config, "label_only", 0), "label_only") == LABEL_STAGES
    assert method_stages(method_config(config, "direct_full", 0), "direct_full") == DIRECT_STAGES
    assert method_stages(method_config(config, "bridge", 0), "bridge") == FULL_STAGES

    raw = config.model_dump(mode="json")
    raw["student"]["stages"][0]["order"] = "easy_to_hard"
    ordered = BridgeConfig.model_validate(raw)
    assert method_stages(method_config(ordered, "label_only", 0), "label_only") == ("select", *LABEL_STAGES)


def test_methods_without_their_stage_are_rejected():
    raw = base_config().model_dump(mode="json")
    raw["student"]["stages"] = raw["student"]["stages"][1:]
    only_rationales = BridgeConfig.model_validate(raw)
    with pytest.raises(ConfigError, match="no stage with data: labels"):
        method_config(only_rationales, "label_only", 0)
    with pytest.raises(ConfigError, match="no other stage"):
        method_config(base_config(student={"stages": [{"name": "a", "data": "labels"}]}), "bridge_no_stage_a", 0)
    with pytest.raises(ConfigError, match="unknown comparison method"):
        resolve_methods(["bridge", "distil"], base_config())


def test_methods_run_in_canonical_order():
    assert resolve_methods(["bridge_random", "label_only", "bridge"], base_config()) == ["bridge", "label_only", "bridge_random"]
    assert resolve_methods(None, base_config(compare={"methods": ["label_only"]})) == ["label_only"]


# --------------------------------------------------------------------------------------------
# Fingerprints of partial stage lists


def test_full_fingerprints_unchanged():
    config = base_config()
    expected: dict[str, str] = {}
    for stage in STAGES:
        sections = {name: _section(config, name) for name in _STAGE_SECTIONS[stage]}
        expected[stage] = fingerprint(stage, sections, {name: expected[name] for name in _STAGE_INPUTS[stage]})
    assert compute_fingerprints(config) == expected


def test_left_out_stages_pass_their_inputs_on():
    config = base_config()
    direct = compute_fingerprints(config, DIRECT_STAGES)
    assert set(direct) == set(DIRECT_STAGES)
    # The student depends on the teacher stage through the left-out tutoring stage...
    other_teacher = base_config(teacher={"backend": "reference", "model": "reference", "price_per_call": 0.02})
    assert compute_fingerprints(other_teacher, DIRECT_STAGES)["train_student"] != direct["train_student"]
    # ...and no longer on the TA's fine-tuning settings.
    other_ta = base_config(ta_training={"seed": 10, "epochs": 7.0})
    assert compute_fingerprints(other_ta, DIRECT_STAGES)["train_student"] == direct["train_student"]
    assert compute_fingerprints(other_ta)["train_student"] != compute_fingerprints(config)["train_student"]


# --------------------------------------------------------------------------------------------
# Ledger accounts


def _info(key: str) -> AttemptInfo:
    return AttemptInfo(f"example-{key}", key, "ask", "reference", "reference", "reference", 1, 256)


def _buy(account: LedgerAccount, key: str, picousd: int, caps: Caps | None = None) -> int | None:
    caps = caps or Caps()
    worst = WorstCase(prompt_tokens=10, completion_tokens=10, picousd=picousd)
    attempt = account.reserve(_info(key), worst, caps)
    if attempt is not None:
        account.settle_response(
            attempt, _info(key), text=f"reply {key}\nAnswer: yes", finish_reason="stop", prompt_tokens=10,
            completion_tokens=5, cost_picousd=picousd, latency_s=0.0,
        )
    return attempt


def test_account_charges_reused_responses_once(tmp_path: Path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        total = Caps(calls=4)
        with LedgerAccount(ledger, "buyer", total) as buyer:
            assert _buy(buyer, "k1", 300) is not None
            assert _buy(buyer, "k2", 500) is not None
            assert buyer.used == Usage(2, 30, 800)
        with LedgerAccount(ledger, "reuser", total) as reuser:
            stored = reuser.lookup("k1")
            assert stored is not None
            reuser.record_cached(_info("k1"), stored)
            reuser.record_cached(_info("k1"), stored)
            assert reuser.used == Usage(1, 15, 300)
            # The account's own cap counts the reused response.
            assert _buy(reuser, "k3", 100, Caps(calls=2)) is not None
            assert _buy(reuser, "k4", 100, Caps(calls=2)) is None
            assert not reuser.total_exhausted
        assert ledger.used == Usage(3, 45, 900)
        assert "/" not in ledger.session  # the session of the ledger itself is back

        # A resumed comparison reads each account's usage back from the ledger rows.
        assert LedgerAccount(ledger, "reuser", total).used == Usage(2, 30, 400)
        assert LedgerAccount(ledger, "buyer", total).used == Usage(2, 30, 800)

        # The comparison's caps bound the whole ledger, whatever the account's own caps allow.
        with LedgerAccount(ledger, "third", total) as third:
            assert _buy(third, "k5", 100, Caps(calls=10)) is not None
            assert _buy(third, "k6", 100, Caps(calls=10)) is None
            assert third.total_exhausted
            assert third.used == Usage(1, 15, 100)
        sessions = [row[0] for row in sqlite3.connect(ledger.path).execute("SELECT session FROM attempts")]
    assert {s.split("/")[0] for s in sessions} == {"buyer", "reuser", "third"}


def test_reference_response_longer_than_limit_is_reused():
    # The reference backend ignores max_tokens, so its reply can be longer than the limit it was asked with.
    stored = StoredResponse("k", 1, "text", "stop", 10, 300, 256, 0)
    assert is_reusable(stored, 256)
    assert not is_reusable(stored, 255)


# --------------------------------------------------------------------------------------------
# Shared work and the summary


def test_shared_work_copies_into_other_runs(tmp_path: Path):
    source = tmp_path / "bridge-seed0"
    (source / "select" / "embeddings").mkdir(parents=True)
    (source / "select" / "scores.jsonl").write_text('{"id": "a"}\n')
    (source / "select" / "embeddings" / "chunk-00000.npy").write_bytes(b"\x93NUMPY")
    shared = SharedWork(tmp_path)
    shared.record("select_scores", "key1", source, [source / "select" / "scores.jsonl", source / "select" / "embeddings"], 12.5)

    target = tmp_path / "bridge_random-seed0"
    (target / "select" / "embeddings").mkdir(parents=True)
    (target / "select" / "embeddings" / "stale.npy").write_bytes(b"old")
    reopened = SharedWork(tmp_path)
    assert reopened.restore("select_scores", "key1", target) == 12.5
    assert (target / "select" / "scores.jsonl").read_text() == '{"id": "a"}\n'
    assert sorted(p.name for p in (target / "select" / "embeddings").iterdir()) == ["chunk-00000.npy"]
    assert reopened.restore("select_scores", "key1", source) is None
    assert reopened.restore("select_scores", "other", target) is None
    assert reopened.restored == [("select_scores", "key1", "bridge-seed0", "bridge_random-seed0")]


def test_summary_gives_spread_and_gain():
    runs = {
        "bridge-seed0": {"method": "bridge", "seed": 0, "accuracy": 0.6, "teacher_calls": 10, "teacher_usd": 0.1, "compute_seconds": 60},
        "bridge-seed1": {"method": "bridge", "seed": 1, "accuracy": 0.7, "teacher_calls": 10, "teacher_usd": 0.1, "compute_seconds": 80},
        "label_only-seed0": {"method": "label_only", "seed": 0, "accuracy": 0.5, "teacher_calls": 0, "teacher_usd": 0.0, "compute_seconds": 20},
    }
    summary = summarise_methods(runs, ["bridge", "label_only", "bridge_random"])
    assert set(summary) == {"bridge", "label_only"}
    assert summary["bridge"]["accuracy"]["mean"] == pytest.approx(0.65)
    assert summary["bridge"]["accuracy"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary["label_only"]["accuracy"]["std"] is None
    assert summary["bridge"]["gain_over_label_only"] == pytest.approx(0.15)
    assert summary["bridge"]["compute_seconds"]["mean"] == 70


def _run(method: str, seed: int, accuracy: float, calls: int, notes: list[str]) -> dict:
    scores = {"n": 10, "correct": round(10 * accuracy), "accuracy": accuracy, "ci_low": 0.0, "ci_high": 1.0,
              "macro_f1": 0.5, "unparsable_rate": 0.0, "truncated_rate": 0.0}
    return {
        "method": method, "seed": seed, "model": "student/x", "headline_mode": "generation",
        "scores": {"generation": scores}, "accuracy": accuracy, "teacher_calls": calls, "teacher_usd": calls / 100,
        "teacher_rows": calls, "compute_seconds": 120.0, "test_examples": 10,
        "task": {"name": "medqa_usmle4_test", "format": "multiple_choice"},
        "baselines": {"majority": {"generation": scores, "note": "always 'A'"}},
        "data_notes": notes, "stages": {"select": "copied from bridge-seed0", "eval": "ran"},
    }


def test_report_notes_official_test_data(tmp_path: Path):
    from bridge.report.compare_report import build_comparison_report

    note = "train, dev and test are all carved from it. Training therefore uses part of an official test set."
    runs = {
        "bridge-seed0": _run("bridge", 0, 0.6, 10, [note]),
        "bridge-seed1": _run("bridge", 1, 0.7, 10, [note]),
        "label_only-seed0": _run("label_only", 0, 0.5, 0, [note]),
    }
    state = {"name": "medqa", "seeds": [0, 1], "complete": True, "runs": runs,
             "summary": summarise_methods(runs, ["bridge", "label_only"]), "caps": {"calls": 40, "usd": None},
             "ledger": {"calls": 10, "usd": 0.1}}
    markdown = build_comparison_report(state, tmp_path).to_markdown(tmp_path)
    assert markdown.count("Note: training used part of an official test set.") == 1
    assert "| bridge | 10 rationales | 2 | 65.0 ± 7.1 | +15.0 | 10.0 ± 0.0 | 0.1000 ± 0.0000 | 2.0 ± 0.0 |" in markdown
    assert "| label_only | none | 1 | 50.0 | +0.0 |" in markdown
    assert "| bridge-seed0 | student/x |" in markdown
    assert (tmp_path / "frontier_calls.png").is_file()
    assert "incomplete" not in markdown


# --------------------------------------------------------------------------------------------
# End to end on tiny models


def tiny_config(model_dir: Path, runs_dir: Path, data_dir: Path) -> BridgeConfig:
    model = {"path": str(model_dir), "device": "cpu", "dtype": "float32"}
    return BridgeConfig.model_validate(
        {
            "name": "tiny",
            "seed": 0,
            "output": {"runs_dir": str(runs_dir)},
            "data": {"dataset": "pubmedqa_pqal", "data_dir": str(data_dir), "train_size": POOL, "dev_size": 4, "test_size": 8},
            "models": {"ta": model, "student": {**model, "keep_layers": [0]}},
            # The tiny tokenizer has few merges, so PubMedQA questions alone take up to about 130 tokens.
            "prompts": {"max_context_tokens": 256},
            "teacher": {"backend": "reference", "model": "reference", "price_per_call": 0.01},
            "budget": {"fraction": 0.25},
            "selection": {"batch_size": 8},
            "ta_training": {"epochs": 1.0, "batch_size": 8, "save_every": 100, "max_seq_len": 1024},
            "tutoring": {"batch_size": 16, "max_new_tokens": 8, "free_samples": 1},
            "student": {
                "training": {"method": "full", "batch_size": 8, "save_every": 100, "max_seq_len": 1024},
                "stages": [
                    {"name": "stage-a", "data": "labels", "epochs": 1.0},
                    {"name": "stage-b", "data": "rationales", "epochs": 1.0},
                ],
            },
            "evaluation": {"max_new_tokens": 8, "batch_size": 8},
        }
    )


INTERRUPTED_RUN = "direct_full-seed0"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_model_dir, data_dir):
    """A comparison interrupted once and resumed, with every stage execution and training run counted."""
    import bridge.models.training as training
    import bridge.pipeline as pipeline
    from bridge.compare import run_comparison

    root = tmp_path_factory.mktemp("compare")
    config = tiny_config(tiny_model_dir, root / "runs", data_dir)
    executions: list[tuple[str, str, str]] = []
    trainings: list[Path] = []
    interrupt = {"armed": True}
    original_stage_function = pipeline._stage_function
    original_build_trainer = training._build_trainer

    def counted_stage_function(stage):
        function = original_stage_function(stage)

        def run(ctx):
            executions.append((ctx.run.root.name, stage, ctx.fingerprints[stage]))
            if interrupt["armed"] and ctx.run.root.name == INTERRUPTED_RUN and stage == "train_student":
                raise KeyboardInterrupt
            return function(ctx)

        return run

    def counted_build_trainer(prepared, *, args, **kwargs):
        trainings.append(Path(args.output_dir).parent)
        return original_build_trainer(prepared, args=args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline, "_stage_function", counted_stage_function)
    patch.setattr(training, "_build_trainer", counted_build_trainer)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_comparison(config, seeds=SEEDS)
        folder = root / "runs" / "tiny-compare"
        interrupted_state = read_json(folder / "comparison.json")
        first_pass = list(executions)
        interrupt["armed"] = False
        state = run_comparison(config, seeds=SEEDS)
    finally:
        patch.undo()
    return {
        "config": config, "folder": folder, "state": state, "interrupted_state": interrupted_state,
        "executions": executions, "first_pass": first_pass, "trainings": trainings,
    }


@pytest.mark.slow
def test_every_method_produces_metrics(comparison):
    state = comparison["state"]
    assert state["complete"] is True
    assert set(state["runs"]) == {f"{m}-seed{s}" for m in METHODS for s in range(SEEDS)}
    for name, run in state["runs"].items():
        scores = run["scores"]["generation"]
        assert scores["n"] == 8, name
        assert 0.0 <= run["accuracy"] <= 1.0, name
        assert scores["ci_low"] <= run["accuracy"] <= scores["ci_high"], name
        metrics = read_json(comparison["folder"] / name / "eval" / "metrics.json")
        assert [m for m in metrics["models"] if m.startswith(("student/", "ta/"))] == [run["model"]], name
    assert {state["runs"][f"{m}-seed0"]["model"] for m in ("direct_same_budget", "direct_full")} == {"student/direct"}
    assert state["runs"]["label_only-seed0"]["model"] == "student/stage-a"
    for method, stats in state["summary"].items():
        assert stats["seeds"] == list(range(SEEDS)), method
        assert stats["accuracy"]["std"] is not None, method


@pytest.mark.slow
def test_shared_stages_run_once(comparison):
    executions = comparison["executions"]
    counts: dict[tuple[str, str], int] = {}
    for _, stage, key in executions:
        counts[(stage, key)] = counts.get((stage, key), 0) + 1
    interrupted = next(key for run, stage, key in executions if run == INTERRUPTED_RUN and stage == "train_student")
    assert counts.pop(("train_student", interrupted)) == 2
    assert set(counts.values()) == {1}

    ran = {(run, stage) for run, stage, _ in executions}
    for seed in range(SEEDS):
        for method in ("direct_same_budget", "bridge_no_stage_a"):
            assert (f"{method}-seed{seed}", "select") not in ran
            assert (f"{method}-seed{seed}", "teach") not in ran
        assert (f"bridge_no_stage_a-seed{seed}", "tutor") not in ran
        stages = comparison["state"]["runs"][f"bridge_no_stage_a-seed{seed}"]["stages"]
        assert stages["tutor"] == f"copied from bridge-seed{seed}"

    # The labels stage is trained once per seed; label_only and bridge_random copy it.
    trained = [folder for folder in comparison["trainings"] if folder.name == "stage-a"]
    assert sorted(folder.parent.parent.name for folder in trained) == [f"bridge-seed{s}" for s in range(SEEDS)]
    folder = comparison["folder"]
    for run in ("label_only-seed1", "bridge_random-seed1"):
        copied = folder / run / "train_student" / "stage-a" / "metrics.json"
        assert copied.read_bytes() == (folder / "bridge-seed1" / "train_student" / "stage-a" / "metrics.json").read_bytes()
        assert read_json(folder / run / "train_student" / "summary.json")["reused_seconds"] > 0

    # The pool is scored once; every later selection copies the scores.
    shared = read_json(folder / "shared_work.json")
    [scores] = shared["select_scores"].values()
    assert scores["run"] == "bridge-seed0"
    selecting = sorted({run for run, stage, _ in executions if stage == "select"} - {"bridge-seed0"})
    assert selecting
    for run in selecting:
        assert "reused_seconds" in read_json(folder / run / "select" / "summary.json"), run


@pytest.mark.slow
def test_no_purchase_made_twice(comparison):
    folder = comparison["folder"]
    with sqlite3.connect(folder / "ledger.sqlite") as conn:
        bought, keys = conn.execute("SELECT COUNT(*), COUNT(DISTINCT cache_key) FROM attempts WHERE status = 'ok'").fetchone()
        statuses = {row[0] for row in conn.execute("SELECT DISTINCT status FROM attempts")}
    assert bought == keys == POOL
    assert statuses == {"ok", "cached"}
    runs = comparison["state"]["runs"]
    for seed in range(SEEDS):
        # Each method is charged for the responses it used, also those another method bought first.
        assert runs[f"direct_full-seed{seed}"]["teacher_calls"] == POOL
        for method in ("bridge", "bridge_random", "direct_same_budget", "bridge_no_stage_a"):
            assert runs[f"{method}-seed{seed}"]["teacher_calls"] == POOL // 4, method
            assert runs[f"{method}-seed{seed}"]["teacher_usd"] == pytest.approx(0.01 * (POOL // 4)), method
        assert runs[f"label_only-seed{seed}"]["teacher_calls"] == 0
    assert comparison["state"]["ledger"]["calls"] == POOL
    assert comparison["state"]["caps"]["calls"] == 2 * POOL


@pytest.mark.slow
def test_comparison_resumes_after_interruption(comparison):
    interrupted = comparison["interrupted_state"]
    assert interrupted["complete"] is False
    assert "bridge-seed0" in interrupted["runs"]
    assert INTERRUPTED_RUN not in interrupted["runs"]
    first = comparison["first_pass"]
    resumed = comparison["executions"][len(first):]
    assert (INTERRUPTED_RUN, "train_student") in {(run, stage) for run, stage, _ in resumed}
    # Nothing the first invocation finished runs again.
    finished = {(run, stage) for run, stage, _ in first if (run, stage) != (INTERRUPTED_RUN, "train_student")}
    assert finished.isdisjoint({(run, stage) for run, stage, _ in resumed})
    stages = comparison["state"]["runs"]["bridge-seed0"]["stages"]
    assert set(stages.values()) == {"current"}


@pytest.mark.slow
def test_table_and_plots_exist(comparison):
    report = comparison["folder"] / "report"
    markdown = (report / "comparison.md").read_text()
    assert "## Methods side by side" in markdown
    for method in METHODS:
        assert f"| {method} |" in markdown, method
    for name in ("frontier_calls.png", "frontier_usd.png", "frontier_compute.png", "accuracy.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in markdown, name
    html = (report / "comparison.html").read_text()
    assert html.count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_cli_compare_prints_table(comparison, tmp_path):
    from bridge.cli import app

    # A copy, so that the report the other tests read stays as it is; the runs are current there too.
    shutil.copytree(comparison["folder"], tmp_path / "runs" / comparison["folder"].name)
    raw = comparison["config"].model_dump(mode="json")
    raw["output"]["runs_dir"] = str(tmp_path / "runs")
    config_path = tmp_path / "compare.yaml"
    config_path.write_text(json.dumps(raw))
    result = CliRunner().invoke(app, ["compare", str(config_path), "--seeds", "2", "--methods", "label_only,bridge"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["method", "seeds", "accuracy"]
    assert [line.split()[0] for line in lines[1:3]] == ["bridge", "label_only"]
    assert "comparison.html" in lines[-1]
