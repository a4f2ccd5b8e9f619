"""Storage faults: a path through a regular file (ENOTDIR) and a full disk (ENOSPC), then resume.

Tests run as root, so permissions cannot simulate a failing disk. A full disk is a real tmpfs
of a few kilobytes, mounted in a private mount namespace (``unshare --mount``) that disappears
with the test's shell, and enlarged with ``mount -o remount`` to play the user freeing space.
Where mounting is not allowed, those tests are skipped and the in-process injections below
(``os.fsync`` failing with ENOSPC) still run.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from bridge.errors import StorageError
from bridge.rundir import RowWriter, atomic_write_json, read_rows, storage_errors
from test_bad_inputs import run_cli

DATA = Path(__file__).parent / "bad_inputs" / "data"
PYTHON = sys.executable
PREDICT_SETTINGS = (
    "--set", "data.dataset=generic", "--set", "data.format=yes_no_maybe", "--set", "data.fields.id=id",
    "--set", "data.fields.context=context", "--set", "evaluation.max_new_tokens=8", "--set", "evaluation.batch_size=4",
)


@cache
def can_mount_tmpfs() -> bool:
    """True when this process may mount a tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    target = Path(os.environ.get("TMPDIR", "/tmp")) / f"bridge-mount-probe-{os.getpid()}"
    target.mkdir(exist_ok=True)
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(target)],
            capture_output=True, timeout=30,
        )
        return result.returncode == 0
    finally:
        target.rmdir()


needs_mount = pytest.mark.skipif(
    not can_mount_tmpfs(), reason="needs root with CAP_SYS_ADMIN to mount a size-limited tmpfs in a private namespace"
)


def run_on_small_disk(work: Path, size: str, script: str, *args: str) -> dict:
    """Mount a tmpfs of ``size`` at ``work/disk`` in a private namespace, run a Python ``script`` there.

    The script gets the disk's path and ``args`` on its command line, may call ``grow(disk, size)``
    from :data:`DRIVER_HELPERS`, and prints one JSON object as its last line, which is returned.
    """
    disk = work / "disk"
    disk.mkdir(exist_ok=True)
    path = work / "driver.py"
    path.write_text(DRIVER_HELPERS + script)
    command = (
        f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} && "
        + " ".join(shlex.quote(a) for a in (PYTHON, str(path), str(disk), *args))
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", command],
        capture_output=True, text=True, timeout=600, env={**os.environ, "BRIDGE_DATA_DIR": str(DATA)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


DRIVER_HELPERS = """
import contextlib, io, json, subprocess, sys, traceback


def grow(disk, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", disk], check=True)


def cli(*args):
    import bridge.cli

    err, saved, code = io.StringIO(), sys.argv, 0
    sys.argv = ["bridge", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            bridge.cli.main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        code = None
        err.write(traceback.format_exc())
    finally:
        sys.argv = saved
    return {"rc": code, "err": err.getvalue()}
"""


def run_bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRIDGE_DATA_DIR": str(DATA)}
    return subprocess.run([PYTHON, "-m", "bridge.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


# --------------------------------------------------------------------------------------------
# A path through a regular file (ENOTDIR)


def test_runs_dir_through_file(tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a folder is expected\n")
    result = run_bridge("run", "--set", f"output.runs_dir={blocker}/runs", "--set", "name=trial", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{blocker}/runs/trial" in result.stderr
    assert "Not a directory" in result.stderr
    assert "a part of this path is a regular file" in result.stderr


def test_prediction_out_through_file_resumes(tmp_path: Path, tiny_model_dir: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a folder is expected\n")
    out = blocker / "predictions.jsonl"
    args = ("predict", str(tiny_model_dir), str(DATA / "small_test.jsonl"), *PREDICT_SETTINGS, "--out", str(out))
    failed = run_cli(*args)
    assert failed.code == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    assert f"cannot create folder {blocker}: Not a directory" in failed.stderr
    assert "a part of this path is a regular file" in failed.stderr

    blocker.unlink()
    blocker.mkdir()
    fixed = run_cli(*args)
    assert fixed.code == 0, fixed.stderr
    assert sorted(row["id"] for row in read_rows(out)) == ["t0", "t1", "t2"]


# --------------------------------------------------------------------------------------------
# A full disk (ENOSPC) on a real small file system


PREDICT_DRIVER = """
disk, model, data = sys.argv[1:4]
out = f"{disk}/predictions.jsonl"
settings = sys.argv[4:]
full = cli("predict", model, data, *settings, "--out", out)
lines = open(out + ".partial", encoding="utf-8").read().split("\\n")
complete = sum(1 for line in lines if line.endswith("}"))
grow(disk, "1m")
# The marker replaces a stored row's text: only a row reused from disk can carry it to the output.
first = json.loads(lines[0])
first["text"] = "reused-marker"
lines[0] = json.dumps(first, sort_keys=True)
open(out + ".partial", "w", encoding="utf-8").write("\\n".join(lines))
resumed = cli("predict", model, data, *settings, "--out", out)
rows = [json.loads(line) for line in open(out, encoding="utf-8")]
print(json.dumps({"full": full, "complete": complete, "marked": first["id"], "resumed": resumed, "rows": rows}))
"""


@needs_mount
def test_full_disk_prediction_resumes(tmp_path: Path, tiny_model_dir: Path):
    """Prediction rows fill a 4 KiB disk; after it grows, the rerun reuses every complete row."""
    result = run_on_small_disk(
        tmp_path, "4k", PREDICT_DRIVER, str(tiny_model_dir), str(DATA / "good.jsonl"), *PREDICT_SETTINGS
    )
    full = result["full"]
    assert full["rc"] == 2, full["err"]
    assert "Traceback" not in full["err"]
    assert "No space left on device" in full["err"]
    assert str(tmp_path / "disk" / "predictions.jsonl") in full["err"]
    assert "fix: free disk space" in full["err"]
    assert 0 < result["complete"] < 30

    assert result["resumed"]["rc"] == 0, result["resumed"]["err"]
    rows = result["rows"]
    assert sorted(row["id"] for row in rows) == sorted(f"g{i}" for i in range(30))
    assert next(row for row in rows if row["id"] == result["marked"])["text"] == "reused-marker"


TRAIN_DRIVER = """
from bridge.config import TrainingConfig
from bridge.errors import BridgeError
from bridge.models.training import train_sft
from safetensors.torch import load_file

disk, model, reference_dir = sys.argv[1:4]
rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Is item {i} good?"},
        {"role": "assistant", "content": f"Item {i} passed.\\nAnswer: yes"}]} for i in range(16)]
config = TrainingConfig(method="full", epochs=2, batch_size=4, save_every=2, learning_rate=1e-3)


def train(out_dir):
    try:
        result = train_sft(rows, base=model, config=config, out_dir=out_dir)
    except BridgeError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    weights = load_file(f"{result.output_dir}/model.safetensors")
    return {"steps": result.global_step, "sums": {k: float(v.double().sum()) for k, v in sorted(weights.items())}}


full = train(f"{disk}/train")
grow(disk, "64m")
resumed = train(f"{disk}/train")
reference = train(reference_dir)
print(json.dumps({"full": full, "resumed": resumed, "reference": reference}))
"""


@pytest.mark.slow
@needs_mount
def test_full_disk_checkpoint_resumes(tmp_path: Path, tiny_model_dir: Path):
    """A checkpoint cut short by a full disk is a StorageError; after it grows, training ends as if uninterrupted."""
    result = run_on_small_disk(tmp_path, "1200k", TRAIN_DRIVER, str(tiny_model_dir), str(tmp_path / "reference"))
    full = result["full"]
    assert full.get("error") == "StorageError", full
    assert str(tmp_path / "disk" / "train" / "checkpoints") in full["message"]
    assert "No space left on device" in full["message"]

    resumed, reference = result["resumed"], result["reference"]
    assert resumed["steps"] == reference["steps"] == 8
    assert resumed["sums"].keys() == reference["sums"].keys()
    for name, value in reference["sums"].items():
        assert abs(resumed["sums"][name] - value) <= 1e-6 * max(1.0, abs(value)), name


# --------------------------------------------------------------------------------------------
# Injected faults in this process


def _no_space(_fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_row_append_enospc_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "rows.jsonl"
    with RowWriter(path) as writer:
        writer.append({"id": "a"})
        monkeypatch.setattr(os, "fsync", _no_space)
        with pytest.raises(StorageError) as caught:
            writer.append({"id": "b"})
    message = str(caught.value)
    assert str(path) in message
    assert "No space left on device" in message
    assert "fix: free disk space" in message

    monkeypatch.undo()
    with RowWriter(path) as writer:
        writer.append({"id": "c"})
    # Row b reached the page cache before fsync failed, so it may or may not be kept; a and c are.
    ids = [row["id"] for row in read_rows(path)]
    assert ids[0] == "a"
    assert ids[-1] == "c"
    assert set(ids) <= {"a", "b", "c"}


def test_torn_row_dropped_on_reopen(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "text": "cut sho', encoding="utf-8")
    assert [row["id"] for row in read_rows(path)] == ["a"]
    with RowWriter(path) as writer:
        writer.append({"id": "b"})
    assert path.read_text(encoding="utf-8") == '{"id": "a"}\n{"id": "b"}\n'


def test_atomic_write_enospc_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"version": 1})
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write_json(path, {"version": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text(encoding="utf-8")) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "No space left on device"),
    ],
)
def test_library_write_failures_named(tmp_path: Path, raised: Exception, expected: str):
    """torch.save and safetensors report a full disk without an errno; the message still names the path."""
    with pytest.raises(StorageError) as caught, storage_errors(tmp_path / "checkpoints", "write a checkpoint in"):
        raise raised
    assert f"cannot write a checkpoint in {tmp_path / 'checkpoints'}" in str(caught.value)
    assert expected in str(caught.value)


def test_unrelated_errors_pass_through(tmp_path: Path):
    with pytest.raises(ValueError, match="bad shape"), storage_errors(tmp_path, "write"):
        raise ValueError("bad shape")
    with pytest.raises(FileNotFoundError), storage_errors(tmp_path, "write"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")


def test_final_save_full_disk(tmp_path: Path):
    """A full disk while saving the final student names the folder and removes the half-written copy."""
    from bridge.curriculum import save_final_model

    class FullDiskModel:
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    class Tokenizer:
        def save_pretrained(self, folder):
            raise AssertionError("not reached")

    folder = tmp_path / "train_student" / "model"
    with pytest.raises(StorageError) as caught:
        save_final_model(FullDiskModel(), Tokenizer(), folder)
    assert str(folder) in str(caught.value)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []
