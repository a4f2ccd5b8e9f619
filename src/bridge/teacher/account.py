"""One run's account in a ledger that several runs share, with its own usage and caps.

``bridge compare`` buys every method's rationales through one ledger, so a response that one
method bought is served to the others from the cache and is never bought twice. A method must
still spend only its own budget, and a cache hit must not make it look free, so each run gets a
:class:`LedgerAccount`:

* the account's usage is what the run's own attempts were charged plus, once per cache key,
  what the reused responses cost when another run bought them;
* the run's caps (``budget.*`` and the call cap from the subset size) apply to that usage;
* the comparison's caps apply to the whole ledger, so all runs together stay under them.

The account tags its ledger rows by setting the ledger's ``session`` to ``<name>/<random id>``
while it is open, so its usage survives a kill and is read back when the comparison resumes.
It has the methods of :class:`~bridge.teacher.ledger.Ledger` that the teacher client calls.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from typing import Any

from bridge.errors import StorageError
from bridge.teacher.budget import Caps, Usage, WorstCase
from bridge.teacher.cache import StoredResponse
from bridge.teacher.ledger import CACHED, OK, AttemptInfo, Ledger, Settlement


class LedgerAccount:
    """A view of a shared :class:`Ledger` that counts one run's usage against the run's caps.

    Use it as a context manager around the run's teacher stage. ``total_caps`` bounds the whole
    ledger. NOTE: a response reused from the cache is always served and counted, so an account
    can pass its own cap by the cache hits of a batch that starts when the cap is already reached.
    """

    def __init__(self, ledger: Ledger, name: str, total_caps: Caps) -> None:
        if "/" in name:
            raise ValueError(f"account name {name!r} must not contain '/'")
        self.ledger = ledger
        self.name = name
        self.total_caps = total_caps
        #: True once the comparison's caps rejected an attempt of this account.
        self.total_exhausted = False
        self._cond = threading.Condition()
        self._in_flight: dict[int, Usage] = {}
        self._reserving = 0
        self._used, self._keys = _load_account(ledger, name)
        self._saved_session: str | None = None

    # ---------------------------------------------------------------------------------------
    # Opening and closing

    def __enter__(self) -> LedgerAccount:
        self._saved_session = self.ledger.session
        self.ledger.session = f"{self.name}/{uuid.uuid4().hex[:12]}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_session is not None:
            self.ledger.session = self._saved_session
            self._saved_session = None

    # ---------------------------------------------------------------------------------------
    # Totals

    @property
    def used(self) -> Usage:
        """This account's usage: its own charges and, once per key, the cost of reused responses."""
        with self._cond:
            return self._used

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._in_flight)

    # ---------------------------------------------------------------------------------------
    # The ledger interface the teacher client calls

    def lookup(self, cache_key: str) -> StoredResponse | None:
        return self.ledger.lookup(cache_key)

    def record_cached(self, info: AttemptInfo, stored: StoredResponse) -> int:
        """Record a cache hit and charge this account what the response cost its buyer (once per key)."""
        attempt_id = self.ledger.record_cached(info, stored)
        with self._cond:
            if stored.cache_key not in self._keys:
                self._keys.add(stored.cache_key)
                self._used = self._used + _attempt_charge(self.ledger, stored.attempt_id)
        return attempt_id

    def reserve(self, info: AttemptInfo, worst: WorstCase, caps: Caps, *, wait: bool = True) -> int | None:
        """Reserve an attempt when it fits under this account's ``caps`` and the comparison's caps.

        Returns the attempt id, or None when it does not fit and nothing of this account is in
        flight that could free room (or ``wait`` is false).
        """
        charge = worst.usage
        with self._cond:
            while not caps.fits(self._used + charge):
                if not (self._in_flight or self._reserving) or not wait:
                    return None
                self._cond.wait()
            self._used = self._used + charge
            self._reserving += 1
        attempt_id: int | None = None
        try:
            attempt_id = self.ledger.reserve(info, worst, self.total_caps, wait=wait)
        finally:
            with self._cond:
                self._reserving -= 1
                if attempt_id is None:
                    self._used = self._used - charge
                    self._cond.notify_all()
                else:
                    self._in_flight[attempt_id] = charge
        if attempt_id is None:
            self.total_exhausted = True
        return attempt_id

    def settle_response(self, attempt_id: int, info: AttemptInfo, **kwargs: Any) -> Settlement:
        settlement = self.ledger.settle_response(attempt_id, info, **kwargs)
        self._finish(attempt_id, settlement.charged, info.cache_key)
        return settlement

    def settle_failure(self, attempt_id: int, **kwargs: Any) -> Usage:
        charged = self.ledger.settle_failure(attempt_id, **kwargs)
        self._finish(attempt_id, charged, None)
        return charged

    def cancel(self, attempt_id: int, reason: str) -> None:
        self.ledger.cancel(attempt_id, reason)
        self._finish(attempt_id, Usage(), None)

    def set_label(self, attempt_id: int, label: str) -> None:
        self.ledger.set_label(attempt_id, label)

    def _finish(self, attempt_id: int, charged: Usage, bought_key: str | None) -> None:
        with self._cond:
            reserved = self._in_flight.pop(attempt_id)
            self._used = self._used - reserved + charged
            if bought_key is not None:
                self._keys.add(bought_key)
            self._cond.notify_all()


def _read_connection(ledger: Ledger) -> sqlite3.Connection:
    """Open a read-only connection to the ledger file; WAL lets it read while the ledger writes."""
    try:
        return sqlite3.connect(f"{ledger.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the teacher ledger {ledger.path}: {exc}") from None


def _attempt_charge(ledger: Ledger, attempt_id: int) -> Usage:
    """Return what one attempt was charged."""
    with contextlib.closing(_read_connection(ledger)) as conn:
        row = conn.execute(
            "SELECT charged_calls, charged_tokens, charged_picousd FROM attempts WHERE id = ?", (attempt_id,)
        ).fetchone()
    if row is None:
        raise StorageError(f"the teacher ledger {ledger.path} has no attempt {attempt_id}, which a stored response names")
    return Usage(int(row[0]), int(row[1]), int(row[2]))


def _load_account(ledger: Ledger, name: str) -> tuple[Usage, set[str]]:
    """Return an account's usage and the cache keys it has paid for, from the rows of earlier sessions."""
    prefix = f"{name}/"
    mine = "substr(a.session, 1, ?) = ?"
    with contextlib.closing(_read_connection(ledger)) as conn:
        own = conn.execute(
            f"SELECT COALESCE(SUM(a.charged_calls), 0), COALESCE(SUM(a.charged_tokens), 0), "
            f"COALESCE(SUM(a.charged_picousd), 0) FROM attempts a WHERE {mine} AND a.status != ?",
            (len(prefix), prefix, CACHED),
        ).fetchone()
        bought = {
            row[0]
            for row in conn.execute(
                f"SELECT DISTINCT a.cache_key FROM attempts a WHERE {mine} AND a.status = ?", (len(prefix), prefix, OK)
            )
        }
        reused = conn.execute(
            f"SELECT a.cache_key, source.charged_calls, source.charged_tokens, source.charged_picousd "
            f"FROM attempts a JOIN attempts source ON source.id = a.reused_attempt_id "
            f"WHERE {mine} AND a.status = ? ORDER BY a.id",
            (len(prefix), prefix, CACHED),
        ).fetchall()
    used = Usage(int(own[0]), int(own[1]), int(own[2]))
    keys = set(bought)
    for key, calls, tokens, picousd in reused:
        if key not in keys:
            keys.add(key)
            used = used + Usage(int(calls), int(tokens), int(picousd))
    return used, keys
