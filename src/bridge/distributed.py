"""Data-parallel fine-tuning under ``accelerate launch``: rank helpers, the worker entry and a launcher.

``accelerate launch`` (through torchrun) starts one process per device and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in each. Every process runs :func:`bridge.models.training.train_sft`
on the same rows; transformers' ``Trainer`` wraps the model in DistributedDataParallel, gives each
process a different slice of every global batch and averages the gradients over processes, so
``training.batch_size`` is the batch of one process and the global batch is that times the
process count. The process with rank 0 alone writes the output folder.

Run a worker from a shell with::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m bridge.distributed \\
        --rows rows.jsonl --base packaged:smollm2-135m-instruct --training training.yaml --out runs/sft

or from Python with :func:`launch_training`, which writes the inputs, runs that command and
returns the metrics of the finished run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bridge.errors import BridgeError, ConfigError

log = logging.getLogger(__name__)

#: Folder inside the output folder where :func:`launch_training` writes the workers' inputs.
LAUNCH_DIR = "launch"


class LaunchError(BridgeError):
    """A multi-process training run started with ``accelerate launch`` failed."""


# --------------------------------------------------------------------------------------------
# Rank helpers: usable before and after the process group exists


def world_size() -> int:
    """Return the number of training processes: ``WORLD_SIZE``, or 1 outside a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Return this process's global rank: ``RANK``, or 0 outside a launcher."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Return whether this process writes shared files (rank 0, or the only process)."""
    return rank() == 0


def _group_ready() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process reaches this call; a no-op without a process group.

    transformers' ``TrainingArguments`` creates the process group, so before a trainer exists
    this does nothing.
    """
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Return every process's ``value`` in rank order; ``[value]`` without a process group."""
    if not _group_ready():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# --------------------------------------------------------------------------------------------
# Worker entry: one process of ``accelerate launch -m bridge.distributed``


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from bridge.rundir import read_rows

    if not path.is_file():
        raise BridgeError(f"rows file {path} not found", hint="pass a JSONL file of {'id', 'messages'} rows")
    return list(read_rows(path))


def _read_training_config(path: Path) -> Any:
    from pydantic import ValidationError

    from bridge.config import TrainingConfig, format_validation_error

    if not path.is_file():
        raise ConfigError(f"training configuration {path} not found", hint="pass a YAML file of training.* keys")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return TrainingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.distributed",
        description="Fine-tune with train_sft in every process of an accelerate launch.",
    )
    parser.add_argument("--rows", type=Path, required=True, help="JSONL file of {'id', 'messages'} training rows")
    parser.add_argument("--dev-rows", type=Path, help="JSONL file of dev rows for dev loss and best-weights choice")
    parser.add_argument("--base", required=True, help="model reference, or a JSON object of models.* keys")
    parser.add_argument("--training", type=Path, required=True, help="YAML or JSON file of training.* keys")
    parser.add_argument("--out", type=Path, required=True, help="output folder of train_sft")
    parser.add_argument("--max-steps", type=int, help="cap on optimizer steps")
    return parser.parse_args(argv)


def _base_ref(raw: str) -> Any:
    from bridge.config import ModelRef

    if raw.lstrip().startswith("{"):
        return ModelRef.model_validate(json.loads(raw))
    return ModelRef(path=raw)


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`train_sft` in this process of a launch; every process gets the same arguments."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format=f"%(asctime)s rank{rank()} %(levelname)s %(name)s: %(message)s",
    )
    import torch

    from bridge.models.training import train_sft

    # With a GPU per process, "cuda" must mean this process's GPU before the model loads.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and world_size() > 1:
        torch.cuda.set_device(local_rank)
    try:
        result = train_sft(
            _read_jsonl(args.rows),
            base=_base_ref(args.base),
            config=_read_training_config(args.training),
            out_dir=args.out,
            dev_rows=_read_jsonl(args.dev_rows) if args.dev_rows else None,
            max_steps=args.max_steps,
        )
    except BridgeError as exc:
        log.error("%s", exc)
        return 2
    if is_main_process():
        log.info("rank 0 wrote %s (%d optimizer steps)", result.output_dir, result.global_step)
    return 0


# --------------------------------------------------------------------------------------------
# Launcher


def launch_command(
    accelerate_config: Path,
    worker_args: Sequence[str],
    *,
    num_processes: int | None = None,
) -> list[str]:
    """Return the ``accelerate launch`` command that runs the worker entry with ``worker_args``."""
    executable = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if executable is None:
        raise LaunchError(
            "the accelerate command was not found next to this Python or on PATH",
            hint="install accelerate into the environment that runs bridge (pip install accelerate)",
        )
    command = [executable, "launch", "--config_file", str(accelerate_config)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    return [*command, "-m", "bridge.distributed", *worker_args]


def launch_training(
    rows: Sequence[dict[str, Any]],
    *,
    base: Any,
    config: Any,
    out_dir: Path,
    accelerate_config: Path,
    num_processes: int | None = None,
    dev_rows: Sequence[dict[str, Any]] | None = None,
    max_steps: int | None = None,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Fine-tune with :func:`train_sft` in the processes of ``accelerate launch`` and return its metrics.

    ``base`` is a model reference or a ``ModelRef`` (each process loads its own copy), and
    ``config`` a ``TrainingConfig``. The rows and settings are written to ``out_dir/launch/``.
    ``command_prefix`` runs the launcher through another program, such as a network namespace
    wrapper. Raises :class:`LaunchError` with the end of the output when a process fails.
    """
    from bridge.config import ModelRef
    from bridge.rundir import atomic_write_json, atomic_write_text, ensure_dir, read_json

    if not rows:
        raise BridgeError("no training rows were given", hint="pass at least one {'id', 'messages'} row")
    if not Path(accelerate_config).is_file():
        raise ConfigError(
            f"accelerate configuration {accelerate_config} not found",
            hint="use configs/accelerate/ddp.yaml (GPUs) or configs/accelerate/ddp_cpu.yaml (CPU processes)",
        )
    out_dir = Path(out_dir)
    inputs = ensure_dir(out_dir / LAUNCH_DIR)
    ref = base if isinstance(base, ModelRef) else ModelRef(path=str(base))

    def write_rows(name: str, items: Sequence[dict[str, Any]]) -> Path:
        atomic_write_text(inputs / name, "".join(json.dumps(row, sort_keys=True) + "\n" for row in items))
        return inputs / name

    worker_args = [
        "--rows", str(write_rows("rows.jsonl", rows)),
        "--base", json.dumps(ref.model_dump(mode="json")),
        "--training", str(inputs / "training.json"),
        "--out", str(out_dir),
    ]
    atomic_write_json(inputs / "training.json", config.model_dump(mode="json"))
    if dev_rows:
        worker_args += ["--dev-rows", str(write_rows("dev_rows.jsonl", dev_rows))]
    if max_steps is not None:
        worker_args += ["--max-steps", str(max_steps)]

    command = [*command_prefix, *launch_command(Path(accelerate_config), worker_args, num_processes=num_processes)]
    log.info("launching: %s", " ".join(command))
    try:
        completed = subprocess.run(
            command,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LaunchError(
            f"accelerate launch did not finish within {timeout_s} s",
            hint=f"raise the timeout, or rerun: train_sft resumes from the last checkpoint in {out_dir}",
        ) from exc
    (inputs / "launch.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr)[-3000:]
        raise LaunchError(
            f"accelerate launch exited with status {completed.returncode}; the output ends:\n{tail}",
            hint=f"the full output is in {inputs / 'launch.log'}",
        )
    from bridge.models.training import METRICS_FILE

    return read_json(out_dir / METRICS_FILE)


if __name__ == "__main__":
    sys.exit(main())
