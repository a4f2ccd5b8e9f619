"""``bridge compare``: BRIDGE and its baselines side by side, over several seeds.

Every method is a transformation of the configuration plus a list of pipeline stages, so the
baselines run the same stage code as BRIDGE, with the same teacher, data and student:

==================  ============================================  ================================================
method              stages                                        configuration change
==================  ============================================  ================================================
bridge              select, teach, train_ta, tutor,               none
                    train_student, eval
direct_same_budget  select, teach, train_student, eval            student: one stage on teacher_rationales
direct_full         select, teach, train_student, eval            as direct_same_budget, with budget.fraction 1
                                                                  and random selection without filters
label_only          train_student, eval                           student: the first labels stage alone
bridge_no_stage_a   as bridge                                     student: the curriculum without labels stages
bridge_random       as bridge                                     selection.selector: random
==================  ============================================  ================================================

Each method evaluates its final student only (``evaluation.models: final_student``). Seed
``i`` adds ``i`` to ``seed``, ``ta_training.seed`` and ``student.training.seed``; the data
splits stay fixed.

Layout of ``<output.runs_dir>/<name>-compare/``: one run directory per method and seed
(``<method>-seed<seed>``), the shared teacher ledger ``ledger.sqlite``, ``shared_work.json``
(the index of work the runs share), ``comparison.json`` and ``report/``.

Nothing is computed twice:

* a stage whose fingerprint equals that of a stage finished in another run of the comparison is
  copied from that run instead of run (bridge_no_stage_a and direct_same_budget take
  selection, teacher, TA and tutoring from bridge with the same seed);
* inside a stage, work with a key is copied from the run that finished it (:class:`SharedWork`).
  Such work is the pool's scores and TA embeddings, the untuned TA's dev predictions, and
  finished curriculum stages, so label_only and bridge_random take the labels stage from
  bridge with the same seed;
* teacher purchases go through one ledger, so a response is bought once. Each run has its own
  :class:`~bridge.teacher.account.LedgerAccount`: it spends within its own budget and is
  charged for the responses it reuses, and the comparison's own caps bound the whole ledger.

A rerun of the same command resumes: finished stages are current, a stage killed midway resumes
as in ``bridge run``, and ``comparison.json`` is rewritten after every run.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, dump_config
from bridge.errors import ConfigError
from bridge.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    read_json,
    storage_errors,
)

log = logging.getLogger(__name__)

FULL_STAGES = ("select", "teach", "train_ta", "tutor", "train_student", "eval")
DIRECT_STAGES = ("select", "teach", "train_student", "eval")
LABEL_STAGES = ("train_student", "eval")

COMPARISON_FILE = "comparison.json"
SHARED_WORK_FILE = "shared_work.json"
REPORT_DIR = "report"
#: Name of the curriculum stage that the direct baselines train on the teacher's rationales.
DIRECT_STAGE_NAME = "direct"


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    """A compared method: the stages it runs and how it changes the configuration."""

    name: str
    stages: tuple[str, ...]
    transform: Callable[[dict[str, Any]], None]
    description: str


def _unchanged(raw: dict[str, Any]) -> None:
    return None


def _direct_stage(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the curriculum stage that trains the student on the bought rationales only.

    It takes epochs, learning rate, loss and order from the first stage that trains on
    rationales (a gkd stage becomes sft, because it has no teacher logits to match).
    """
    stages = raw["student"]["stages"]
    source = next((s for s in stages if s["data"] in ("rationales", "teacher_rationales")), None)
    source = source or next((s for s in stages if s["data"] == "distill"), None)
    if source is None:
        raise ConfigError(
            "the direct baselines take their training settings from a rationales stage, but student.stages has none",
            hint="add a stage with data: rationales to student.stages, or leave direct_same_budget and direct_full "
            "out of compare.methods",
        )
    stage = dict(source)
    stage.update(name=DIRECT_STAGE_NAME, data="teacher_rationales", mix_file=None, mix_rows=None)
    if stage["loss"] == "gkd":
        stage["loss"] = "sft"
    return stage


def _direct_same_budget(raw: dict[str, Any]) -> None:
    raw["student"]["stages"] = [_direct_stage(raw)]
    raw["student"]["curriculum"] = True


def _direct_full(raw: dict[str, Any]) -> None:
    _direct_same_budget(raw)
    raw["budget"] = {"fraction": 1.0, "count": None, "max_cost_usd": None, "max_calls": None, "max_tokens": None}
    raw["selection"].update(selector="random", drop_hardest_pct=0.0, drop_near_duplicates=None)


def _label_only(raw: dict[str, Any]) -> None:
    labels = [s for s in raw["student"]["stages"] if s["data"] == "labels"]
    if not labels:
        raise ConfigError(
            "label_only trains the student's labels stage alone, but student.stages has no stage with data: labels",
            hint="add a labels stage to student.stages, or leave label_only out of compare.methods",
        )
    raw["student"]["stages"] = labels[:1]
    raw["student"]["curriculum"] = True


def _no_stage_a(raw: dict[str, Any]) -> None:
    remaining = [s for s in raw["student"]["stages"] if s["data"] != "labels"]
    if not remaining:
        raise ConfigError(
            "bridge_no_stage_a drops the labels stages, but student.stages has no other stage",
            hint="add a rationales stage to student.stages, or leave bridge_no_stage_a out of compare.methods",
        )
    raw["student"]["stages"] = remaining


def _random_selection(raw: dict[str, Any]) -> None:
    raw["selection"]["selector"] = "random"


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("bridge", FULL_STAGES, _unchanged, "the full pipeline"),
        Method(
            "direct_same_budget", DIRECT_STAGES, _direct_same_budget,
            "the student trained on the teacher's rationales for the same selected subset",
        ),
        Method(
            "direct_full", DIRECT_STAGES, _direct_full,
            "the student trained on teacher rationales for the whole training pool (100 % budget)",
        ),
        Method("label_only", LABEL_STAGES, _label_only, "the student trained on answer-only labels (the labels stage alone)"),
        Method("bridge_no_stage_a", FULL_STAGES, _no_stage_a, "the full pipeline without the labels stage"),
        Method("bridge_random", FULL_STAGES, _random_selection, "the full pipeline with random selection"),
    )
}


def compare_root(config: BridgeConfig) -> Path:
    """Return the comparison folder of a configuration: ``<output.runs_dir>/<name>-compare``."""
    return Path(config.output.runs_dir) / f"{config.name}-compare"


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def method_config(config: BridgeConfig, method: str, seed_index: int) -> BridgeConfig:
    """Return the configuration of one method and seed, writing into the comparison folder."""
    raw = config.model_dump(mode="json")
    METHODS[method].transform(raw)
    raw["evaluation"]["models"] = "final_student"
    raw["seed"] = config.seed + seed_index
    raw["ta_training"]["seed"] = config.ta_training.seed + seed_index
    raw["student"]["training"]["seed"] = config.student.training.seed + seed_index
    raw["name"] = run_name(method, raw["seed"])
    raw["output"]["runs_dir"] = str(compare_root(config))
    return BridgeConfig.model_validate(raw)


def method_stages(config: BridgeConfig, method: str) -> tuple[str, ...]:
    """Return the stages one method runs for its (transformed) configuration.

    Selection is added where a curriculum stage orders its rows by the Phase 1 difficulty.
    """
    stages = METHODS[method].stages
    if "select" not in stages and any(s.order == "easy_to_hard" for s in config.student.stages):
        stages = ("select", *stages)
    return stages


def resolve_methods(names: Sequence[str] | None, config: BridgeConfig) -> list[str]:
    """Return the requested methods in the canonical order (bridge first, so the others can reuse its stages)."""
    requested = list(names) if names else list(config.compare.methods)
    unknown = [name for name in requested if name not in METHODS]
    if unknown:
        raise ConfigError(
            f"unknown comparison method(s): {', '.join(unknown)}",
            hint=f"choose from {', '.join(METHODS)}",
        )
    return [name for name in METHODS if name in requested]


# --------------------------------------------------------------------------------------------
# Sharing work between runs


def copy_path(source: Path, target: Path) -> None:
    """Copy a file or folder over ``target`` through a temporary name, so a kill leaves no partial copy."""
    ensure_dir(target.parent)
    temporary = target.parent / f".{target.name}.copy-{uuid.uuid4().hex[:8]}"
    with storage_errors(target, "copy to"):
        try:
            if source.is_dir():
                shutil.copytree(source, temporary)
            else:
                shutil.copy2(source, temporary)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(temporary, target)
        finally:
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            elif temporary.exists():
                temporary.unlink()


class SharedWork:
    """Finished work inside stages that the runs of one comparison share, by kind and key.

    The index ``shared_work.json`` maps a kind and key to the run that finished the work, the
    paths it wrote (relative to that run directory) and the seconds it took. A run that needs
    the same work copies those paths into the same places of its own run directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / SHARED_WORK_FILE
        self._index: dict[str, dict[str, dict[str, Any]]] = read_json(self.path) if self.path.exists() else {}
        #: (kind, key, source run, target run) of every copy made by this object.
        self.restored: list[tuple[str, str, str, str]] = []

    def record(self, kind: str, key: str, run_root: Path, paths: Sequence[Path], seconds: float) -> None:
        """Record finished work; the first run to finish a key stays its source."""
        entries = self._index.setdefault(kind, {})
        if key in entries and (self.root / entries[key]["run"]).is_dir():
            return
        entries[key] = {
            "run": run_root.name,
            "paths": [str(Path(p).relative_to(run_root)) for p in paths],
            "seconds": round(float(seconds), 3),
        }
        atomic_write_json(self.path, self._index)

    def restore(self, kind: str, key: str, run_root: Path) -> float | None:
        """Copy the work recorded for ``kind`` and ``key`` into ``run_root``; return its seconds, or None."""
        entry = self._index.get(kind, {}).get(key)
        if entry is None or entry["run"] == run_root.name:
            return None
        source = self.root / entry["run"]
        missing = [rel for rel in entry["paths"] if not (source / rel).exists()]
        if missing:
            log.warning("shared %s work %s is missing from %s (%s); computing it again", kind, key, source, missing)
            return None
        for rel in entry["paths"]:
            copy_path(source / rel, run_root / rel)
        log.info("%s: copied %s work %s from %s", run_root.name, kind, key, entry["run"])
        self.restored.append((kind, key, entry["run"], run_root.name))
        return float(entry["seconds"])


def link_finished_stages(root: Path, run: RunDir, fingerprints: dict[str, str]) -> dict[str, str]:
    """Copy into ``run`` each unfinished stage that another run of the comparison finished with the same fingerprint.

    Returns the source run's name for every stage copied.
    """
    linked: dict[str, str] = {}
    others = sorted(p for p in root.iterdir() if p.is_dir() and p != run.root and (p / "config.yaml").is_file())
    for stage, expected in fingerprints.items():
        if run.is_done(stage, expected):
            continue
        source = next((other for other in others if RunDir(other).is_done(stage, expected)), None)
        if source is None:
            continue
        copy_path(source / stage, run.root / stage)
        linked[stage] = source.name
        log.info("%s: stage %s copied from %s (same fingerprint %s)", run.root.name, stage, source.name, expected)
    return linked


# --------------------------------------------------------------------------------------------
# The comparison's own caps


def comparison_caps(config: BridgeConfig, data: Any) -> Any:
    """Return the caps on the whole comparison's ledger, by default one 100 % purchase with re-asks."""
    from bridge.config import BudgetConfig
    from bridge.teacher.budget import Caps
    from bridge.teacher.prices import usd_to_picousd

    pool = len(data.train)
    calls = config.compare.max_calls or pool * (2 if config.teacher.policy == "reask_with_hint" else 1)
    usd = config.compare.max_cost_usd
    if usd is None and config.teacher.enabled and calls:
        from bridge.teacher.estimate import estimate_teacher_cost

        budget = BudgetConfig(fraction=None, count=calls)
        usd = estimate_teacher_cost(data.train, data.task, config.teacher, budget, config.prompts).cost_worst_usd
    picousd = usd_to_picousd(usd, round_up=True) if usd is not None else None
    return Caps(calls=calls, picousd=picousd)


# --------------------------------------------------------------------------------------------
# Running


def run_comparison(
    config: BridgeConfig,
    *,
    seeds: int | None = None,
    methods: Sequence[str] | None = None,
    yes: bool = False,
) -> dict[str, Any]:
    """Run every method for every seed into ``<runs_dir>/<name>-compare`` and write the comparison report.

    ``seeds`` and ``methods`` default to ``compare.seeds`` and ``compare.methods``. ``yes``
    confirms sending data to a teacher endpoint that is not on this machine. Returns the
    content of ``comparison.json``.
    """
    from bridge.data import load_dataset
    from bridge.pipeline import compute_fingerprints, run_dir_for
    from bridge.teacher.ledger import LEDGER_FILENAME, Ledger

    names = resolve_methods(methods, config)
    count = seeds if seeds is not None else config.compare.seeds
    if count < 1:
        raise ConfigError(f"--seeds {count} is invalid", hint="run at least one seed, such as --seeds 3")
    plans = [(name, index, method_config(config, name, index)) for index in range(count) for name in names]
    root = ensure_dir(compare_root(config))
    atomic_write_text(root / "config.yaml", dump_config(config))
    caps = comparison_caps(config, load_dataset(config.data))
    log.info("comparison in %s: %d run(s); teacher caps over the whole comparison: %s", root, len(plans), caps.describe())

    # Runs finished by an earlier invocation are current, so re-entering them only reads their results.
    state: dict[str, Any] = {"runs": {}}
    state.update(name=config.name, methods=names, seeds=[config.seed + i for i in range(count)], complete=False)
    state["caps"] = {"calls": caps.calls, "usd": _usd(caps.picousd)}
    shared = SharedWork(root)
    started = time.monotonic()
    with Ledger(root / LEDGER_FILENAME) as ledger:
        for name, _, cfg in plans:
            stages = method_stages(cfg, name)
            run = run_dir_for(cfg)
            linked = link_finished_stages(root, run, compute_fingerprints(cfg, stages))
            result = _run_one(cfg, name, stages, linked, ledger, shared, caps, yes)
            state["runs"][run.root.name] = result
            state["ledger"] = _usage_dict(ledger.used)
            _write_state(root, state)
    state["complete"] = True
    state["wall_seconds_last_invocation"] = round(time.monotonic() - started, 1)
    state["summary"] = summarise_methods(state["runs"], names)
    _write_state(root, state)
    write_comparison_report(root, state)
    return state


def _run_one(
    cfg: BridgeConfig,
    method: str,
    stages: tuple[str, ...],
    linked: dict[str, str],
    ledger: Any,
    shared: SharedWork,
    caps: Any,
    yes: bool,
) -> dict[str, Any]:
    from bridge.pipeline import run_dir_for, run_pipeline
    from bridge.teacher.account import LedgerAccount

    run = run_dir_for(cfg)
    log.info("comparison run %s: stages %s", run.root.name, ", ".join(stages))
    started = time.monotonic()
    with LedgerAccount(ledger, run.root.name, caps) as account:
        summaries = run_pipeline(cfg, stages=stages, yes=yes, ledger=account, shared=shared)
    status = {}
    for stage, summary in summaries.items():
        if stage in linked:
            status[stage] = f"copied from {linked[stage]}"
        else:
            status[stage] = "current" if summary.get("skipped") else "ran"
    result = run_result(run.root, method, cfg.seed, stages)
    result["stages"] = status
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["comparison_cap_reached"] = account.total_exhausted
    return result


def run_result(root: Path, method: str, seed: int, stages: Sequence[str]) -> dict[str, Any]:
    """Collect one finished run's final student accuracy, teacher spending and local compute time.

    Spending is the run's ledger account (reused responses at what they cost). Compute time
    adds every stage's seconds and the seconds of work it copied from other runs, so each
    method is charged what it would cost alone.
    """
    metrics = read_json(root / "eval" / "metrics.json")
    mode = metrics["headline_mode"]
    students = [name for name in metrics["models"] if name.startswith("student/")]
    final = students[-1]
    teach = _summary(root, "teach")
    seconds = {stage: _stage_seconds(root, stage) for stage in stages}
    return {
        "method": method,
        "seed": seed,
        "model": final,
        "headline_mode": mode,
        "scores": metrics["models"][final],
        "accuracy": metrics["models"][final][mode]["accuracy"],
        "teacher_calls": teach.get("total_calls", 0),
        "teacher_tokens": teach.get("total_tokens", 0),
        "teacher_usd": teach.get("total_usd", 0.0),
        "teacher_rows": teach.get("rows", 0),
        "compute_seconds": round(sum(seconds.values()), 1),
        "stage_seconds": seconds,
        "test_examples": metrics["n"],
        "task": metrics["task"],
        "baselines": {name: row for name, row in metrics["models"].items() if not name.startswith(("student/", "ta/"))},
        "data_notes": metrics.get("data_notes", []),
    }


def _summary(root: Path, stage: str) -> dict[str, Any]:
    path = root / stage / "summary.json"
    return read_json(path) if path.exists() else {}


def _stage_seconds(root: Path, stage: str) -> float:
    summary = _summary(root, stage)
    return float(summary.get("seconds", 0.0)) + float(summary.get("reused_seconds", 0.0))


def summarise_methods(runs: dict[str, dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return per method the mean and standard deviation over seeds of accuracy, spending and compute time."""
    result: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = sorted((r for r in runs.values() if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        result[method] = {
            "seeds": [r["seed"] for r in rows],
            "accuracy": _spread([r["accuracy"] for r in rows]),
            "teacher_calls": _spread([r["teacher_calls"] for r in rows]),
            "teacher_usd": _spread([r["teacher_usd"] for r in rows]),
            "compute_seconds": _spread([r["compute_seconds"] for r in rows]),
        }
    floor = result.get("label_only", {}).get("accuracy", {}).get("mean")
    for stats in result.values():
        stats["gain_over_label_only"] = None if floor is None else stats["accuracy"]["mean"] - floor
    return result


def _spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for one value)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": list(values),
    }


def _usd(picousd: int | None) -> float | None:
    from bridge.teacher.prices import picousd_to_usd

    return None if picousd is None else picousd_to_usd(picousd)


def _usage_dict(usage: Any) -> dict[str, Any]:
    return {"calls": usage.calls, "tokens": usage.tokens, "usd": usage.usd}


def _write_state(root: Path, state: dict[str, Any]) -> None:
    atomic_write_json(root / COMPARISON_FILE, state)


def write_comparison_report(root: Path, state: dict[str, Any]) -> dict[str, Path]:
    """Write ``report/comparison.md``, the self-contained ``report/comparison.html`` and the PNG plots."""
    from bridge.report.compare_report import build_comparison_report

    out = ensure_dir(root / REPORT_DIR)
    document = build_comparison_report(state, out)
    paths = {"markdown": out / "comparison.md", "html": out / "comparison.html"}
    atomic_write_text(paths["markdown"], document.to_markdown(out))
    atomic_write_text(paths["html"], document.to_html())
    log.info("comparison report written to %s", paths["html"])
    return paths


def format_table(state: dict[str, Any]) -> str:
    """Return the comparison table as plain text for the terminal."""
    lines = [f"{'method':<20} {'seeds':>5} {'accuracy %':>16} {'calls':>8} {'USD':>10} {'compute min':>12}"]
    for method, stats in state.get("summary", {}).items():
        accuracy = stats["accuracy"]
        spread = "" if accuracy["std"] is None else f" ± {100 * accuracy['std']:.1f}"
        lines.append(
            f"{method:<20} {len(stats['seeds']):>5} {100 * accuracy['mean']:>9.1f}{spread:<7} "
            f"{stats['teacher_calls']['mean']:>8.1f} {stats['teacher_usd']['mean']:>10.4f} "
            f"{stats['compute_seconds']['mean'] / 60:>12.1f}"
        )
    return "\n".join(lines)

