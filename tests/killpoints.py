"""Kill points for the kill-and-resume suite, and a tiny pipeline to aim them at.

Run as a script, this module runs ``bridge`` in the current process with
``torch.use_deterministic_algorithms(True)`` and one thread, and sends itself SIGKILL at a chosen
point::

    python tests/killpoints.py --kill tutor:generate:3 --trace trace.jsonl -- run --set ...

A kill point ``TARGET:POINT:N`` fires at the N-th call of POINT while TARGET runs, counted in
this process only. TARGET is a pipeline stage (``tutor``) or a stage and the fine-tuning inside it
(``train_student/stage-b``, named by its output folder). The points:

* ``score``: after option scoring returns for a chunk, before its rows are written;
* ``generate``: after a generation batch is computed, before its outputs are stored;
* ``send``: after the teacher endpoint replied (and billed), before the ledger records it;
* ``settle``: after the ledger committed a bought response, before the next request;
* ``step``: after a training micro-batch's backward pass, before the optimizer step completes;
* ``save``: inside a Trainer checkpoint, after the weights and before the optimizer state;
* ``append``: halfway through writing a JSONL row (the torn line is on disk);
* ``replace``: after an atomic write's temporary file is complete, before it is renamed.

Before dying the child appends the kill point, stage and training folder to ``--log``. With
``--trace`` it appends one line per generation batch (the hashes of its prompts) and, when it
exits normally, the number of calls of each point per stage.

The parent side, :class:`TinyPipeline`, starts the fake teacher server, builds a run's settings
from tiny in-process models and the corpus in ``tests/bad_inputs/data``, runs children, and
:func:`compare_runs` compares a resumed run directory with an uninterrupted one.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POINTS = ("score", "generate", "send", "settle", "step", "save", "append", "replace")
#: Stages of ``bridge run`` in order (folder names).
STAGES = ("select", "teach", "train_ta", "tutor", "train_student", "eval", "report")

# --------------------------------------------------------------------------------------------
# Child side


class _Child:
    """The hooks installed in the child: call counting, the kill, and the trace."""

    def __init__(self, kill: tuple[str, str, int] | None, trace: Path | None, log: Path | None) -> None:
        self.kill = kill
        self.trace = trace
        self.log = log
        self.stage = "-"
        self.training = "-"
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def hit(self, point: str) -> bool:
        """Count one call of ``point``; return True when this call is the kill point."""
        targets = [self.stage] if self.training == "-" else [self.stage, f"{self.stage}/{self.training}"]
        for target in targets:
            self.counts[(target, point)] += 1
        if self.kill is None:
            return False
        target, wanted, number = self.kill
        return wanted == point and target in targets and self.counts[(target, point)] == number

    def die(self, point: str) -> None:
        record = {"stage": self.stage, "point": point, "number": self.counts[(self.stage, point)], "training": self.training}
        if self.log is not None:
            _append_line(self.log, record)
        os.kill(os.getpid(), signal.SIGKILL)

    def write_trace(self, record: dict[str, Any]) -> None:
        if self.trace is not None:
            _append_line(self.trace, record)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _install(child: _Child) -> None:
    """Wrap the functions behind each kill point; every wrapper calls the original."""
    import transformers

    import bridge.models.inference as inference
    import bridge.models.training as training
    import bridge.pipeline as pipeline
    import bridge.rundir as rundir
    from bridge.teacher.backends import OpenAIBackend
    from bridge.teacher.ledger import Ledger

    stage_function = pipeline._stage_function

    def staged(stage: str):
        run = stage_function(stage)

        def run_stage(ctx):
            child.stage = stage
            child.training = "-"
            return run(ctx)

        return run_stage

    pipeline._stage_function = staged

    train_sft = training.train_sft

    def tracked_train_sft(rows, **kwargs):
        child.training = Path(kwargs["out_dir"]).name
        return train_sft(rows, **kwargs)

    training.train_sft = tracked_train_sft

    score_options = inference.score_options

    def scored(*args, **kwargs):
        result = score_options(*args, **kwargs)
        if child.hit("score"):
            child.die("score")
        return result

    inference.score_options = scored

    generate_batch = inference._generate_batch

    def generated(lm, encoded, **kwargs):
        rows = generate_batch(lm, encoded, **kwargs)
        prompts = [hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:12] for ids in encoded]
        child.write_trace({"kind": "batch", "stage": child.stage, "training": child.training, "prompts": prompts})
        if child.hit("generate"):
            child.die("generate")
        return rows

    inference._generate_batch = generated

    send = OpenAIBackend.send

    def sent(self, request, max_tokens):
        reply = send(self, request, max_tokens)
        if child.hit("send"):
            child.die("send")
        return reply

    OpenAIBackend.send = sent

    settle_response = Ledger.settle_response

    def settled(self, *args, **kwargs):
        settlement = settle_response(self, *args, **kwargs)
        if child.hit("settle"):
            child.die("settle")
        return settlement

    Ledger.settle_response = settled

    training_step = transformers.Trainer.training_step

    def stepped(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if child.hit("step"):
            child.die("step")
        return loss

    transformers.Trainer.training_step = stepped

    save_state = transformers.Trainer._save_optimizer_and_scheduler

    def saving(self, *args, **kwargs):
        if child.hit("save"):
            child.die("save")
        return save_state(self, *args, **kwargs)

    transformers.Trainer._save_optimizer_and_scheduler = saving

    append = rundir.RowWriter.append

    def appended(self, row):
        if child.hit("append"):
            line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            self._handle.flush()
            with open(self.path, "ab") as raw:
                raw.write(line[: max(1, len(line) // 2)])
                raw.flush()
                os.fsync(raw.fileno())
            child.die("append")
        return append(self, row)

    rundir.RowWriter.append = appended

    replace = os.replace

    def replaced(src, dst, *args, **kwargs):
        if child.hit("replace"):
            child.die("replace")
        return replace(src, dst, *args, **kwargs)

    os.replace = replaced


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Run bridge with a kill point.")
    parser.add_argument("--kill", help="TARGET:POINT:N")
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("bridge_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    bridge_args = args.bridge_args[1:] if args.bridge_args[:1] == ["--"] else args.bridge_args
    kill = None
    if args.kill:
        target, point, number = args.kill.split(":")
        if point not in POINTS:
            raise SystemExit(f"unknown kill point {point!r}; expected one of {', '.join(POINTS)}")
        kill = (target, point, int(number))

    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    child = _Child(kill, args.trace, args.log)
    _install(child)

    import bridge.cli

    sys.argv = ["bridge", *bridge_args]
    try:
        bridge.cli.main()
    finally:
        census = [{"stage": stage, "point": point, "calls": n} for (stage, point), n in sorted(child.counts.items())]
        child.write_trace({"kind": "census", "counts": census})


# --------------------------------------------------------------------------------------------
# Parent side

TEACHER_KEY = "sk-bridge-killpoints-0123456789abcdef"
TEACHER_KEY_ENV = "BRIDGE_KILLPOINTS_TEACHER_KEY"


def teacher_reply(messages: list[dict[str, str]]) -> str:
    """A deterministic teacher for ``good.jsonl``: right, except on its first ask about every fifth example.

    Example ``g<i>`` asks "Does intervention <i> ..." and its gold answer is yes, no, maybe in turn.
    A re-ask carries the gold as a hint, which this teacher follows. Every reply quotes the API
    key, as a leaky proxy might, so a run shows whether the key reaches any file or log.
    """
    user = messages[-1]["content"]
    number = int(re.search(r"Does intervention (\d+)", user).group(1))
    gold = ("yes", "no", "maybe")[number % 3]
    hinted = "Hint" in user
    wrong = "no" if gold == "yes" else "yes"
    answer = gold if hinted or number % 5 else wrong
    return f"Intervention {number} was weighed against the trial's primary outcome ({TEACHER_KEY}).\nAnswer: {answer}"


@dataclass
class ChildResult:
    """One child run: exit code, whether it was killed, where, and the end of its stderr."""

    returncode: int
    killed: bool
    kill: dict[str, Any] | None
    stderr_tail: str
    seconds: float


@dataclass
class TinyPipeline:
    """A whole ``bridge run`` on tiny models, the generic corpus and the fake teacher server."""

    root: Path
    model_dir: Path
    server: Any
    extra: list[str] = field(default_factory=list)

    def settings(self, name: str) -> list[str]:
        server = self.server
        values = [
            f"name={name}", f"output.runs_dir={self.root / 'runs'}", "seed=0", "threads=1",
            "data.dataset=generic", f"data.data_dir={HERE / 'bad_inputs' / 'data'}", "data.train_file=good.jsonl",
            "data.format=yes_no_maybe", "data.fields.id=id", "data.fields.context=context",
            "data.train_size=null", "data.dev_size=null", "data.test_size=null",
            f"models.ta.path={self.model_dir}", f"models.student.path={self.model_dir}", "models.student.keep_layers=null",
            "teacher.backend=openai", f"teacher.base_url={server.base_url}", "teacher.model=fake-teacher",
            f"teacher.api_key_env={TEACHER_KEY_ENV}", f"teacher.prompt_price_per_mtok={server.prompt_price_per_mtok}",
            f"teacher.completion_price_per_mtok={server.completion_price_per_mtok}", "teacher.concurrency=1",
            "budget.fraction=0.4", "budget.max_cost_usd=1.0",
            "selection.batch_size=2", "ta_training.epochs=2", "ta_training.batch_size=2", "ta_training.save_every=1",
            "tutoring.max_new_tokens=12", "tutoring.free_samples=1", "tutoring.batch_size=4",
            "student.training.batch_size=4", "student.training.save_every=1",
            "student.stages.0.epochs=1", "student.stages.1.epochs=1",
            "evaluation.max_new_tokens=6", "evaluation.batch_size=4", "evaluation.mode=generation",
            *self.extra,
        ]
        return [part for value in values for part in ("--set", value)]

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def run(
        self, name: str, *, kill: str | None = None, trace: Path | None = None, until: str | None = None,
        timeout_s: float = 600,
    ) -> ChildResult:
        log = self.root / f"{name}.kills.jsonl"
        command = [sys.executable, str(Path(__file__).resolve()), "--log", str(log)]
        if kill is not None:
            command += ["--kill", kill]
        if trace is not None:
            command += ["--trace", str(trace)]
        command += ["--", "run", *(["--until", until] if until else []), *self.settings(name)]
        env = {
            **os.environ,
            TEACHER_KEY_ENV: TEACHER_KEY,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0",
        }
        before = len(log.read_text().splitlines()) if log.exists() else 0

        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=self.root)
        seconds = time.monotonic() - started
        with open(self.root / f"{name}.output.log", "a", encoding="utf-8") as output:
            output.write(f"$ {' '.join(command[2:])}\n{result.stdout}{result.stderr}\n")
        self.server.wait_idle()

        killed = result.returncode == -signal.SIGKILL
        records = log.read_text().splitlines()[before:] if log.exists() else []
        return ChildResult(
            returncode=result.returncode,
            killed=killed,
            kill=json.loads(records[-1]) if killed and records else None,
            stderr_tail=result.stderr[-3000:],
            seconds=seconds,
        )


def read_trace(path: Path) -> tuple[list[dict[str, Any]], dict[tuple[str, str], int]]:
    """Return the generation batches and the census (calls per stage and point) of a trace file."""
    batches, census = [], {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["kind"] == "batch":
                batches.append(record)
            else:
                census = {(c["stage"], c["point"]): c["calls"] for c in record["counts"]}
    return batches, census


# --------------------------------------------------------------------------------------------
# Comparing a resumed run with the reference


#: Row fields that record how a row was obtained in this process rather than what it holds. A
#: response read back from the ledger is ``cached`` in the run that resumed, and the ledger's
#: attempt ids count every invocation's cache reads too.
VOLATILE_KEYS = frozenset({"cached", "ledger_attempt_id"})
#: teach/outcomes.jsonl logs the last invocation's requests, so its charges and ledger attempts
#: are those of that invocation (nothing charged when every response came from the ledger).
VOLATILE_BY_FILE = {"teach/outcomes.jsonl": frozenset({"cached", "charged_usd", "attempts", "attempt_id"})}


def _jsonl(path: Path, volatile: frozenset[str] = VOLATILE_KEYS) -> list[Any]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in volatile} if isinstance(row, dict) else row for row in rows]


def torn_files(root: Path) -> list[str]:
    """Return JSONL files under ``root`` with a line that is not complete JSON."""
    torn = []
    for path in sorted(root.rglob("*.jsonl")):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            torn.append(f"{path} (no final newline)")
            continue
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                json.loads(line)
            except ValueError:
                torn.append(f"{path}:{number}")
                break
    return torn


def weight_difference(reference: Path, resumed: Path) -> float:
    """Return the largest absolute difference between the safetensors tensors of two folders."""
    from safetensors.torch import load_file

    ref_files = sorted(p.name for p in reference.glob("*.safetensors"))
    new_files = sorted(p.name for p in resumed.glob("*.safetensors"))
    if not ref_files or ref_files != new_files:
        return float("inf")
    worst = 0.0
    for name in ref_files:
        a, b = load_file(reference / name), load_file(resumed / name)
        if a.keys() != b.keys():
            return float("inf")
        for key in a:
            if a[key].shape != b[key].shape:
                return float("inf")
            worst = max(worst, float((a[key].double() - b[key].double()).abs().max()) if a[key].numel() else 0.0)
    return worst


def training_folders(run_dir: Path) -> list[Path]:
    """Return the folders that ``train_sft`` wrote (those with ``metrics.json`` and ``sample_order.jsonl``)."""
    return sorted(p.parent for p in run_dir.rglob("sample_order.jsonl"))


@dataclass
class Comparison:
    """Differences between a resumed run and the reference; ``problems`` is empty when they match."""

    problems: list[str] = field(default_factory=list)
    weight_diffs: dict[str, float] = field(default_factory=dict)
    optimizer_steps: dict[str, int] = field(default_factory=dict)


def compare_runs(reference: Path, resumed: Path, *, tolerance: float = 1e-6) -> Comparison:
    """Compare every stage's outputs: ids and order, optimizer steps, weights and predictions."""
    result = Comparison()
    problems = result.problems
    # Every row file: the stages' outputs, predictions, training data order, generations.
    for path in sorted(reference.rglob("*.jsonl")):
        relative = path.relative_to(reference)
        other = resumed / relative
        if not other.exists():
            if not any(part in ("checkpoints", "best") for part in relative.parts):
                problems.append(f"{relative} is missing from the resumed run")
        else:
            volatile = VOLATILE_BY_FILE.get(relative.as_posix(), VOLATILE_KEYS)
            if _jsonl(path, volatile) != _jsonl(other, volatile):
                problems.append(f"{relative} differs")
    scores_a, scores_b = _jsonl(reference / "select/scores.jsonl"), _jsonl(resumed / "select/scores.jsonl")
    if [r["id"] for r in scores_a] != [r["id"] for r in scores_b]:
        problems.append("select/scores.jsonl has other ids or another order")
    elif any(abs(x["difficulty"] - y["difficulty"]) > tolerance for x, y in zip(scores_a, scores_b, strict=True)):
        problems.append("select/scores.jsonl difficulties differ")

    for folder in training_folders(reference):
        relative = folder.relative_to(reference)
        other = resumed / relative
        if _jsonl(folder / "sample_order.jsonl") != _jsonl(other / "sample_order.jsonl"):
            problems.append(f"{relative}: the training data order differs")
        steps = json.loads((folder / "metrics.json").read_text())["global_step"]
        other_steps = json.loads((other / "metrics.json").read_text())["global_step"]
        result.optimizer_steps[str(relative)] = other_steps
        if steps != other_steps:
            problems.append(f"{relative}: {other_steps} optimizer steps, the reference took {steps}")
        for weights in ("model", "adapter"):
            if (folder / weights).is_dir():
                diff = weight_difference(folder / weights, other / weights)
                result.weight_diffs[f"{relative}/{weights}"] = diff
                if diff > tolerance:
                    problems.append(f"{relative}/{weights}: weights differ by up to {diff:.3g}")
    final = reference / "train_student" / "model"
    if final.is_dir():
        diff = weight_difference(final, resumed / "train_student" / "model")
        result.weight_diffs["train_student/model"] = diff
        if diff > tolerance:
            problems.append(f"train_student/model: weights differ by up to {diff:.3g}")

    if (reference / "eval" / "metrics.json").exists():
        ref_metrics = json.loads((reference / "eval" / "metrics.json").read_text())
        new_metrics = json.loads((resumed / "eval" / "metrics.json").read_text())
        if ref_metrics.get("models") != new_metrics.get("models"):
            problems.append("eval/metrics.json scores differ")
        for path in sorted((reference / "eval" / "predictions").glob("*.jsonl")):
            other = resumed / "eval" / "predictions" / path.name
            if not other.exists() or _jsonl(path) != _jsonl(other):
                problems.append(f"eval/predictions/{path.name} differs")
    problems.extend(f"partly written row file: {t}" for t in torn_files(resumed))
    return result


def ledger_statuses(run_dir: Path) -> dict[tuple[str, str], collections.Counter]:
    """Return the attempt statuses per (example id, purpose) in a run's ledger."""
    conn = sqlite3.connect(run_dir / "ledger.sqlite")
    try:
        counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        for example, purpose, status in conn.execute("SELECT example_id, purpose, status FROM attempts"):
            counts[(example, purpose)][status] += 1
        return counts
    finally:
        conn.close()


def stored_responses(run_dir: Path) -> set[tuple[str, str]]:
    """Return the (example id, purpose) pairs whose response the ledger stores."""
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return set()
    conn = sqlite3.connect(path)
    try:
        return set(
            conn.execute("SELECT a.example_id, a.purpose FROM responses r JOIN attempts a ON a.id = r.attempt_id")
        )
    except sqlite3.OperationalError:
        return set()
    finally:
        conn.close()


if __name__ == "__main__":
    child_main(sys.argv[1:])
