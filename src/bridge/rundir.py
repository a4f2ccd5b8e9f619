"""Run directory layout, atomic writes, append-only row files and stage fingerprints.

A run directory contains one subfolder per stage. A stage's outputs are valid only while its
fingerprint (a hash of its configuration and of its inputs' fingerprints) matches the one stored
in ``<stage>/fingerprint.json``; a stage that finds a different fingerprint reruns.

Files are written to a temporary name and renamed, so a kill never leaves a partial file that
reads as complete. Row files (JSONL) are appended one fsynced line at a time; a torn last line
left by a kill is dropped when the file is read back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from bridge.errors import StorageError

log = logging.getLogger(__name__)

STAGES = ("select", "teach", "train_ta", "tutor", "train_student", "eval", "report")

_VERSIONED_PACKAGES = (
    "bridge-distill", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
    "sentence-transformers", "scikit-learn", "openai", "pydantic", "numpy",
)


def _storage_error(path: Path, exc: OSError, action: str) -> StorageError:
    hints = {
        errno.ENOSPC: "free disk space, or write to a larger disk (output.runs_dir for a run), then rerun: "
        "finished work is kept",
        errno.ENOTDIR: "a part of this path is a regular file: move it away, or choose another folder "
        "(output.runs_dir for a run)",
        errno.EACCES: "make the folder writable, or choose another folder (output.runs_dir for a run)",
        errno.EROFS: "the file system is read-only: choose another folder (output.runs_dir for a run)",
    }
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StorageError(f"cannot {action} {path}: {reason}", hint=hints.get(exc.errno or 0, "check the path and rerun"))


#: errno values that mean the storage, not the program, is at fault.
_STORAGE_ERRNOS = frozenset(
    code
    for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.ENOTDIR, errno.EFBIG, errno.EIO)
    if code is not None
)
#: Texts of failed writes from torch.save (a RuntimeError from its C++ stream writer) and from
#: safetensors (SafetensorError); neither exception carries an errno.
_WRITE_FAILURE_MARKERS = ("inline_container.cc", "PytorchStreamWriter", "os error 28", "No space left on device")
#: Free space below which a write that failed without an errno is reported as a full disk.
_NEARLY_FULL_BYTES = 16 * 2**20


def _free_bytes(path: Path) -> int | None:
    """Return the free bytes of the file system holding ``path`` (or its nearest existing parent)."""
    import shutil

    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


@contextlib.contextmanager
def storage_errors(path: Path, action: str) -> Iterator[None]:
    """Raise :class:`StorageError` naming ``path`` when a write in the block fails for lack of space or access.

    Libraries that save weights and checkpoints (torch.save, safetensors) raise their own
    exceptions on a full disk, which would otherwise reach the user as a traceback. Other
    errors pass through unchanged.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        raise _storage_error(path, exc, action) from exc
    except Exception as exc:
        text = str(exc)
        if not any(marker in text for marker in _WRITE_FAILURE_MARKERS):
            raise
        free = _free_bytes(path)
        full = "os error 28" in text or "No space left" in text or (free is not None and free < _NEARLY_FULL_BYTES)
        if full:
            raise _storage_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), action) from exc
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise StorageError(
            f"cannot {action} {path}: the write failed ({first_line}); {free} bytes are free there",
            hint="check the disk and the path, then rerun: finished work is kept",
        ) from exc


def ensure_dir(path: Path) -> Path:
    """Create ``path`` and its parents, raising :class:`StorageError` that names the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise _storage_error(path, OSError(errno.ENOTDIR, str(exc)), "create folder") from None
    except OSError as exc:
        raise _storage_error(path, exc, "create folder") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    ensure_dir(path.parent)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise _storage_error(path, exc, "write") from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, keys sorted so equal objects give equal files."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def keyed_rows(path: Path, key: str) -> Path:
    """Return ``path``, a resumable rows file, deleted first when its rows were written for another key.

    The key names what produced the rows (the model and the settings). It is stored beside the
    file as ``<name>.key``, and a file with no key beside it counts as another key's. Call this
    before writing or restoring the rows, so rows of a changed model are never reused.
    """
    marker = path.with_name(path.name + ".key")
    stored = marker.read_text(encoding="utf-8").strip() if marker.exists() else None
    if stored != key:
        if path.exists():
            log.info("deleting %s: its rows were written for another model or other settings", path)
            path.unlink()
        atomic_write_text(marker, key + "\n")
    return path


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _storage_error(path, exc, "read") from None


class RowWriter:
    """Append-only JSONL file: each row is one line, flushed and fsynced before ``append`` returns.

    A row that ``append`` returned for is on disk, so a resumed run can trust every complete line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failed = False
        ensure_dir(path.parent)
        _truncate_torn_tail(path)
        try:
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise _storage_error(path, exc, "open") from None

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
        try:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            self._failed = True
            raise _storage_error(self.path, exc, "append to") from None

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.append(row)

    def close(self) -> None:
        """Close the file; after a failed append, the row still buffered is dropped, not retried."""
        try:
            self._handle.close()  # closes the file descriptor even when the final flush fails
        except OSError as exc:
            # The append that failed has already raised; a second error here would hide it.
            # The torn last line it may leave is cut when the file is next opened.
            if not self._failed:
                raise _storage_error(self.path, exc, "close") from None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line without a newline, which a kill during ``append`` can leave."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        log.warning("dropping a partly written last row of %s (%d bytes)", path, size - keep)
        handle.truncate(keep)


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete rows of a JSONL file; a torn last line (no newline) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                log.warning("skipping a partly written last row at %s:%d", path, number)
                return
            if line.strip():
                yield json.loads(line)


def fingerprint(*parts: Any) -> str:
    """Hash JSON-serialisable parts into a short stable hex digest."""
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Return installed versions of the packages that shape results."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunDir:
    """A run directory: ``<runs_dir>/<name>/`` with one subfolder per stage."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stage(self, name: str) -> Path:
        """Return (and create) a stage's folder."""
        return ensure_dir(self.root / name)

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    def write_metadata(self, config_yaml: str, seeds: dict[str, int]) -> None:
        """Store the resolved configuration, package versions and seeds."""
        ensure_dir(self.root)
        atomic_write_text(self.root / "config.yaml", config_yaml)
        atomic_write_json(self.root / "versions.json", package_versions())
        atomic_write_json(self.root / "seeds.json", seeds)

    def stored_fingerprint(self, stage: str) -> str | None:
        path = self.root / stage / "fingerprint.json"
        if not path.exists():
            return None
        return read_json(path).get("fingerprint")

    def is_done(self, stage: str, expected: str) -> bool:
        """True when ``stage`` finished with the expected fingerprint."""
        path = self.root / stage / "fingerprint.json"
        if not path.exists():
            return False
        stored = read_json(path)
        return stored.get("fingerprint") == expected and stored.get("complete") is True

    def mark_done(self, stage: str, value: str, inputs: dict[str, Any] | None = None) -> None:
        """Record that ``stage`` finished with fingerprint ``value``; written last, atomically."""
        atomic_write_json(
            self.stage(stage) / "fingerprint.json",
            {"fingerprint": value, "complete": True, "inputs": inputs or {}},
        )
