"""The teacher ledger: one SQLite row per attempt, reservations, and the response cache.

The ledger lives in the run directory (``ledger.sqlite``, WAL journal, ``synchronous=FULL``, so
every commit is on disk before the call that made it returns). Each attempt is inserted as
``reserved`` with its worst-case cost charged *before* the request is sent. When the outcome is
known, the row is settled to what the endpoint reported (``ok``) or to nothing (``rejected``,
``cancelled``). Otherwise it keeps the worst case (``in_doubt``: time-out, dropped connection,
invalid response). A row left ``reserved`` by a killed process becomes ``in_doubt`` when the ledger is
opened again. A response is written in the same transaction that settles its attempt, so a
response counts as bought only once it is stored, and a resumed run finds it.

One process at a time may write a ledger: opening takes an exclusive ``flock`` on
``ledger.sqlite.lock``, which the kernel releases when the process dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import StorageError
from bridge.rundir import ensure_dir
from bridge.teacher.budget import Caps, Usage, WorstCase
from bridge.teacher.cache import StoredResponse
from bridge.teacher.prices import picousd_to_usd

log = logging.getLogger(__name__)

LEDGER_FILENAME = "ledger.sqlite"
SCHEMA_VERSION = "1"

#: Sent or about to be sent; charged at the worst case until settled.
RESERVED = "reserved"
#: A response arrived; charged what the endpoint reported.
OK = "ok"
#: The outcome is unknown (time-out, dropped connection, invalid response, killed process);
#: charged at the worst case for good.
IN_DOUBT = "in_doubt"
#: The endpoint rejected the request without billing it (429, most 4xx and 5xx).
REJECTED = "rejected"
#: Reserved but never sent; charged nothing.
CANCELLED = "cancelled"
#: Served from a stored response; no call, charged nothing.
CACHED = "cached"

STATUSES = (RESERVED, OK, IN_DOUBT, REJECTED, CANCELLED, CACHED)
#: Statuses whose request reached the endpoint (or may have).
SENT_STATUSES = (RESERVED, OK, IN_DOUBT, REJECTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    example_id TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    purpose TEXT NOT NULL,
    backend TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    http_status INTEGER,
    max_tokens INTEGER NOT NULL,
    reserved_tokens INTEGER NOT NULL,
    reserved_picousd INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    charged_calls INTEGER NOT NULL,
    charged_tokens INTEGER NOT NULL,
    charged_picousd INTEGER NOT NULL,
    latency_s REAL,
    finish_reason TEXT,
    label TEXT,
    reused_attempt_id INTEGER,
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS attempts_by_key ON attempts (cache_key);
CREATE INDEX IF NOT EXISTS attempts_by_status ON attempts (status);
CREATE TABLE IF NOT EXISTS responses (
    cache_key TEXT PRIMARY KEY,
    attempt_id INTEGER NOT NULL REFERENCES attempts (id),
    example_id TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    max_tokens INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
"""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AttemptInfo:
    """Identity of one attempt in the ledger."""

    example_id: str
    cache_key: str
    purpose: str
    backend: str
    endpoint: str
    model: str
    attempt: int
    max_tokens: int


@dataclass(frozen=True)
class Settlement:
    """Charge and stored response of an attempt that received a response."""

    attempt_id: int
    charged: Usage
    stored: StoredResponse


@dataclass
class _Write:
    """One queued write: a function run inside the next group transaction."""

    run: Callable[[sqlite3.Connection], Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Ledger:
    """The writable ledger of a run; thread-safe, one writing process at a time.

    Totals are kept in memory (loaded at open, updated under a lock on every change), so a
    reservation check costs no query. A change counts against the caps as soon as it is
    requested, and its method returns only after its row is committed. :meth:`reserve` waits
    while other reservations of this process are in flight and the next one does not fit,
    because they may settle for less than their worst case.

    Writes from concurrent threads are committed together (group commit): a thread that finds
    no commit running commits every write queued so far in one transaction, so 32 threads
    settling at once pay for one or two fsyncs instead of 32.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        ensure_dir(self.path.parent)
        self._lock_file = _acquire_process_lock(self.path)
        self.session = uuid.uuid4().hex[:12]

        self._cond = threading.Condition()
        self._in_flight: dict[int, Usage] = {}
        #: Reservations counted in the totals but not yet committed.
        self._reserving = 0
        self._queue: list[_Write] = []
        self._queue_lock = threading.Lock()
        self._db_lock = threading.Lock()

        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"cannot switch {self.path} to WAL mode (got '{mode}')")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
        except sqlite3.Error as exc:
            self._release()
            raise StorageError(
                f"cannot open the teacher ledger {self.path}: {exc}",
                hint="check that the run directory is writable and the file is a bridge ledger",
            ) from None
        self._recover_unsettled()
        self._used = self._load_usage()

    # ---------------------------------------------------------------------------------------
    # Opening and closing

    def _recover_unsettled(self) -> None:
        """Mark rows left ``reserved`` by an earlier process as in doubt: they count as spent."""
        count = self._write(
            lambda conn: conn.execute(
                "UPDATE attempts SET status = ?, error = ?, finished_at = ? WHERE status = ?",
                (IN_DOUBT, "the process ended before the outcome was recorded", _now(), RESERVED),
            ).rowcount
        )
        if count:
            log.warning(
                "%d teacher call(s) in %s were in flight when an earlier run stopped; "
                "they count as spent at their worst-case cost",
                count,
                self.path,
            )

    def _load_usage(self) -> Usage:
        with self._db_lock:
            row = self._conn.execute(
                "SELECT COALESCE(SUM(charged_calls), 0), COALESCE(SUM(charged_tokens), 0), "
                "COALESCE(SUM(charged_picousd), 0) FROM attempts"
            ).fetchone()
        return Usage(int(row[0]), int(row[1]), int(row[2]))

    def close(self) -> None:
        """Close the database and release the process lock."""
        with self._cond:
            if self._in_flight:
                log.warning("closing ledger %s with %d unsettled reservation(s)", self.path, len(self._in_flight))
        with self._db_lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._release()

    def _release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
                self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    # Group commit

    def _write(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``run`` in a committed transaction, shared with concurrent writes; return its result."""
        write = _Write(run)
        with self._queue_lock:
            self._queue.append(write)
        with self._db_lock:
            if not write.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if write.error is not None:
            raise write.error
        return write.result

    def _commit(self, batch: list[_Write]) -> None:
        """Commit a batch of writes in one transaction; every write fails if the commit fails."""
        error: BaseException | None = None
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for write in batch:
                    write.result = write.run(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            error = StorageError(
                f"cannot write the teacher ledger {self.path}: {exc}",
                hint="free disk space or fix the run directory's permissions, then rerun: bought responses are kept",
            )
        except BaseException as exc:
            error = exc
        for write in batch:
            write.error = error
            write.done = True

    # ---------------------------------------------------------------------------------------
    # Totals

    @property
    def used(self) -> Usage:
        """Everything charged so far, in-flight reservations and in-doubt attempts included."""
        with self._cond:
            return self._used

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._in_flight)

    # ---------------------------------------------------------------------------------------
    # Attempts

    def reserve(self, info: AttemptInfo, worst: WorstCase, caps: Caps, *, wait: bool = True) -> int | None:
        """Record an attempt as reserved at its worst case and return its id.

        Return None when the worst case does not fit under ``caps`` and nothing of this process
        is in flight that could free room (or ``wait`` is false). The row is committed before
        this returns, so a kill after the request is sent leaves an in-doubt row behind.
        """
        charge = worst.usage
        with self._cond:
            while not caps.fits(self._used + charge):
                if not (self._in_flight or self._reserving) or not wait:
                    return None
                self._cond.wait()
            self._used = self._used + charge
            self._reserving += 1
        started = _now()
        try:
            attempt_id = self._write(
                lambda conn: conn.execute(
                    "INSERT INTO attempts (session, example_id, cache_key, purpose, backend, endpoint, model, "
                    "attempt, status, max_tokens, reserved_tokens, reserved_picousd, charged_calls, "
                    "charged_tokens, charged_picousd, started_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.session, info.example_id, info.cache_key, info.purpose, info.backend,
                        info.endpoint, info.model, info.attempt, RESERVED, info.max_tokens,
                        charge.tokens, charge.picousd, charge.calls, charge.tokens, charge.picousd, started,
                    ),
                ).lastrowid
            )
        except BaseException:
            with self._cond:
                self._used = self._used - charge
                self._reserving -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._reserving -= 1
            self._in_flight[int(attempt_id)] = charge
        return int(attempt_id)

    def settle_response(
        self,
        attempt_id: int,
        info: AttemptInfo,
        *,
        text: str,
        finish_reason: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cost_picousd: int | None,
        latency_s: float,
        note: str | None = None,
    ) -> Settlement:
        """Store a received response and charge its attempt what the endpoint reported.

        When the endpoint reported no usage (``cost_picousd`` None), the attempt keeps its
        worst-case charge. Both writes happen in one transaction.
        """
        with self._cond:
            reserved = self._in_flight[attempt_id]
        if cost_picousd is None or prompt_tokens is None or completion_tokens is None:
            charged = reserved
            note = note or "the endpoint reported no token usage, so the worst case is charged"
        else:
            charged = Usage(1, prompt_tokens + completion_tokens, cost_picousd)
            if charged.tokens > reserved.tokens or charged.picousd > reserved.picousd:
                # NOTE: the caps hold only while endpoints bill no more than the bound; a larger
                # bill is recorded as reported and later reservations see it.
                log.warning(
                    "teacher call %d for example %s was billed %d tokens / %.6g USD, above its "
                    "reserved worst case of %d tokens / %.6g USD",
                    attempt_id, info.example_id, charged.tokens, picousd_to_usd(charged.picousd),
                    reserved.tokens, picousd_to_usd(reserved.picousd),
                )
        stored = StoredResponse(
            cache_key=info.cache_key,
            attempt_id=attempt_id,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            max_tokens=info.max_tokens,
            cost_picousd=charged.picousd,
        )
        now = _now()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE attempts SET status = ?, prompt_tokens = ?, completion_tokens = ?, charged_calls = ?, "
                "charged_tokens = ?, charged_picousd = ?, latency_s = ?, finish_reason = ?, error = ?, "
                "finished_at = ? WHERE id = ?",
                (
                    OK, prompt_tokens, completion_tokens, charged.calls, charged.tokens, charged.picousd,
                    latency_s, finish_reason, note, now, attempt_id,
                ),
            )
            self._store_response(conn, stored, info, now)

        self._write(write)
        self._finish(attempt_id, charged)
        return Settlement(attempt_id, charged, stored)

    def settle_failure(
        self,
        attempt_id: int,
        *,
        billed: bool | None,
        error: str,
        latency_s: float | None,
        http_status: int | None = None,
    ) -> Usage:
        """Settle an attempt that got no usable response and return what it is charged.

        ``billed`` False means the endpoint certainly did not bill it, so it is charged nothing.
        None means the outcome is unknown, so it keeps its worst-case charge for good. ``error``
        must contain no secret.
        """
        if billed:
            raise ValueError("a billed attempt needs a response; use settle_response")
        with self._cond:
            reserved = self._in_flight[attempt_id]
        charged = reserved if billed is None else Usage()
        status = IN_DOUBT if billed is None else REJECTED
        self._write(
            lambda conn: conn.execute(
                "UPDATE attempts SET status = ?, http_status = ?, charged_calls = ?, charged_tokens = ?, "
                "charged_picousd = ?, latency_s = ?, error = ?, finished_at = ? WHERE id = ?",
                (
                    status, http_status, charged.calls, charged.tokens, charged.picousd, latency_s,
                    error, _now(), attempt_id,
                ),
            )
        )
        self._finish(attempt_id, charged)
        return charged

    def cancel(self, attempt_id: int, reason: str) -> None:
        """Release a reservation whose request was never sent."""
        self._write(
            lambda conn: conn.execute(
                "UPDATE attempts SET status = ?, charged_calls = 0, charged_tokens = 0, charged_picousd = 0, "
                "error = ?, finished_at = ? WHERE id = ?",
                (CANCELLED, reason, _now(), attempt_id),
            )
        )
        self._finish(attempt_id, Usage())

    def _finish(self, attempt_id: int, charged: Usage) -> None:
        """Replace a settled reservation's worst case by its charge in the totals."""
        with self._cond:
            reserved = self._in_flight.pop(attempt_id)
            self._used = self._used - reserved + charged
            self._cond.notify_all()

    def record_cached(self, info: AttemptInfo, stored: StoredResponse) -> int:
        """Record that a stored response served a request; returns the new row's id."""
        now = _now()
        return int(
            self._write(
                lambda conn: conn.execute(
                    "INSERT INTO attempts (session, example_id, cache_key, purpose, backend, endpoint, model, "
                    "attempt, status, max_tokens, reserved_tokens, reserved_picousd, prompt_tokens, "
                    "completion_tokens, charged_calls, charged_tokens, charged_picousd, latency_s, finish_reason, "
                    "reused_attempt_id, started_at, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, 0, 0, ?, ?, 0, 0, 0, 0, ?, ?, ?, ?)",
                    (
                        self.session, info.example_id, info.cache_key, info.purpose, info.backend, info.endpoint,
                        info.model, CACHED, info.max_tokens, stored.prompt_tokens, stored.completion_tokens,
                        stored.finish_reason, stored.attempt_id, now, now,
                    ),
                ).lastrowid
            )
        )

    def set_label(self, attempt_id: int, label: str) -> None:
        """Record the label check of the response an attempt produced or reused."""
        self._write(lambda conn: conn.execute("UPDATE attempts SET label = ? WHERE id = ?", (label, attempt_id)))

    # ---------------------------------------------------------------------------------------
    # Responses

    def _store_response(self, conn: sqlite3.Connection, stored: StoredResponse, info: AttemptInfo, now: str) -> None:
        """Insert a response, replacing a stored one only when the new one is more useful.

        A stop-ended response beats a truncated one, and a truncated one produced under a larger
        ``max_tokens`` beats one produced under a smaller limit.
        """
        row = conn.execute(
            "SELECT finish_reason, max_tokens FROM responses WHERE cache_key = ?", (stored.cache_key,)
        ).fetchone()
        if row is not None:
            old_finish, old_max = row
            better = (stored.finish_reason == "stop" and old_finish != "stop") or (
                stored.finish_reason == old_finish and stored.max_tokens > old_max
            )
            if not better:
                return
        conn.execute(
            "INSERT OR REPLACE INTO responses (cache_key, attempt_id, example_id, model, text, finish_reason, "
            "prompt_tokens, completion_tokens, max_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                stored.cache_key, stored.attempt_id, info.example_id, info.model, stored.text,
                stored.finish_reason, stored.prompt_tokens, stored.completion_tokens, stored.max_tokens, now,
            ),
        )

    def lookup(self, cache_key: str) -> StoredResponse | None:
        """Return the stored response for a cache key, if any."""
        with self._db_lock:
            row = self._conn.execute(
                "SELECT r.cache_key, r.attempt_id, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, "
                "r.max_tokens, a.charged_picousd FROM responses r JOIN attempts a ON a.id = r.attempt_id "
                "WHERE r.cache_key = ?",
                (cache_key,),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(
            cache_key=row[0],
            attempt_id=int(row[1]),
            text=row[2],
            finish_reason=row[3],
            prompt_tokens=row[4],
            completion_tokens=row[5],
            max_tokens=int(row[6]),
            cost_picousd=int(row[7]),
        )


def _acquire_process_lock(path: Path) -> Any:
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed in Ledger.close()
    except OSError as exc:
        raise StorageError(f"cannot create the ledger lock file {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StorageError(
            f"the teacher ledger {path} is in use by another bridge process",
            hint="wait for that run to finish or stop it: two processes spending one budget could pass its cap",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


# -------------------------------------------------------------------------------------------
# Read-only summary


@dataclass
class LedgerSummary:
    """Summary of a ledger for ``bridge ledger`` and reports (money in USD)."""

    path: Path
    spent_usd: float = 0.0
    in_doubt_usd: float = 0.0
    calls: int = 0
    tokens: int = 0
    responses: int = 0
    cached: int = 0
    rejected: int = 0
    in_doubt: int = 0
    retried: int = 0
    by_status: dict[str, dict[str, float]] = field(default_factory=dict)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    #: Endpoint to the number of requests it received (or may have received).
    endpoints: dict[str, int] = field(default_factory=dict)

    @property
    def total_usd(self) -> float:
        """Money counted against the budget: paid plus in doubt."""
        return self.spent_usd + self.in_doubt_usd


def summarize_ledger(path: Path) -> LedgerSummary:
    """Read a ledger without locking it (safe while a run writes to it) and summarize it."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILENAME
    if not path.exists():
        raise StorageError(
            f"no teacher ledger at {path}",
            hint="pass a run directory whose teacher stage has started (it holds ledger.sqlite)",
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the teacher ledger {path}: {exc}") from None
    try:
        return _summarize(conn, path)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the teacher ledger {path}: {exc}") from None
    finally:
        conn.close()


def _summarize(conn: sqlite3.Connection, path: Path) -> LedgerSummary:
    summary = LedgerSummary(path=path)
    rows = conn.execute(
        "SELECT status, model, endpoint, attempt, charged_calls, charged_tokens, charged_picousd, label "
        "FROM attempts"
    ).fetchall()
    for status, model, endpoint, attempt, calls, tokens, picousd, label in rows:
        usd = picousd_to_usd(int(picousd))
        entry = summary.by_status.setdefault(status, {"attempts": 0, "usd": 0.0, "tokens": 0})
        entry["attempts"] += 1
        entry["usd"] += usd
        entry["tokens"] += tokens
        per_model = summary.by_model.setdefault(model, {"calls": 0, "usd": 0.0, "tokens": 0})
        per_model["calls"] += calls
        per_model["usd"] += usd
        per_model["tokens"] += tokens
        summary.calls += calls
        summary.tokens += tokens
        if status == OK:
            summary.spent_usd += usd
            summary.responses += 1
        elif status in (IN_DOUBT, RESERVED):
            summary.in_doubt_usd += usd
            summary.in_doubt += 1
        elif status == REJECTED:
            summary.rejected += 1
        elif status == CACHED:
            summary.cached += 1
        if attempt > 1:
            summary.retried += 1
        if status in SENT_STATUSES:
            summary.endpoints[endpoint] = summary.endpoints.get(endpoint, 0) + 1
        if label:
            summary.labels[label] = summary.labels.get(label, 0) + 1
    return summary


def format_ledger_summary(summary: LedgerSummary) -> str:
    """Render a ledger summary as the text ``bridge ledger`` prints."""
    lines = [
        f"ledger: {summary.path}",
        f"spent: {summary.spent_usd:.6f} USD for {summary.responses} response(s)",
        f"reserved (in flight or in doubt, counted as spent): {summary.in_doubt_usd:.6f} USD "
        f"in {summary.in_doubt} attempt(s)",
        f"counted against the budget: {summary.total_usd:.6f} USD, {summary.calls} call(s), {summary.tokens} token(s)",
        f"cached: {summary.cached} request(s) served from stored responses at no cost",
        f"failed: {summary.rejected} rejected without charge, {summary.in_doubt} in doubt",
        f"retried: {summary.retried} attempt(s) were retries",
        "by status:",
    ]
    for status, entry in sorted(summary.by_status.items()):
        lines.append(
            f"  {status:<10} {int(entry['attempts']):>6} attempt(s) {entry['usd']:>12.6f} USD {int(entry['tokens']):>10} tokens"
        )
    lines.append("by model:")
    for model, entry in sorted(summary.by_model.items()):
        lines.append(
            f"  {model:<24} {int(entry['calls']):>6} call(s) {entry['usd']:>12.6f} USD {int(entry['tokens']):>10} tokens"
        )
    if summary.labels:
        lines.append("label checks: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.labels.items())))
    lines.append("endpoints that received data:")
    if not summary.endpoints:
        lines.append("  none")
    for endpoint, count in sorted(summary.endpoints.items()):
        lines.append(f"  {endpoint} ({count} request(s))")
    return "\n".join(lines)
