"""The teacher client: cache lookups, reservations, concurrency, rate limits and retries.

:meth:`Teacher.complete` takes a batch of requests and returns one :class:`Outcome` per request.
For each request it first looks for a stored response. Otherwise it makes up to
``1 + max_retries`` attempts. Each attempt is reserved in the ledger at its worst-case cost
before it is sent, and settled when its outcome is known. Only 429, 5xx, connection errors and time-outs are
retried, with exponential backoff, jitter and at least the wait a ``Retry-After`` header asks
for. A client error (400, 401, 403, 404, ...) stops the batch at once: requests not yet sent are
not sent, and :meth:`Teacher.complete` raises :class:`~bridge.errors.TeacherError` once the
requests in flight have been recorded.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from bridge.errors import TeacherError
from bridge.teacher.backends import Backend, CallError, Redactor, Reply, TeacherRequest
from bridge.teacher.budget import Caps, Usage, WorstCase, worst_case
from bridge.teacher.cache import StoredResponse, cache_key, is_reusable
from bridge.teacher.ledger import AttemptInfo, Ledger
from bridge.teacher.prices import Price, picousd_to_usd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of one request.

    ``status`` is one of:

    * "ok": a response arrived or was reused (see ``finish_reason``);
    * "failed": no usable response after the allowed attempts;
    * "budget": not sent, because the next attempt did not fit under the caps;
    * "stopped": not sent, because the batch stopped on a client error.
    """

    request: TeacherRequest
    cache_key: str
    status: str
    text: str | None = None
    finish_reason: str | None = None
    #: Ledger row of the attempt that produced the response, or of the cache hit that reused it.
    attempt_id: int | None = None
    #: Ledger row of the paid attempt that produced the response.
    source_attempt_id: int | None = None
    cached: bool = False
    #: Attempts made in this batch (0 for a cache hit).
    attempts: int = 0
    #: What this batch's attempts for the request were charged.
    charged: Usage = field(default_factory=Usage)
    #: What the response cost when it was bought (also for a cache hit).
    response_picousd: int = 0
    error: str | None = None

    @property
    def stopped_by_stop(self) -> bool:
        """True when a response arrived and ended by stop, as a usable rationale must."""
        return self.status == "ok" and self.finish_reason == "stop"


class RateLimiter:
    """Spaces request starts to stay under requests-per-minute and tokens-per-minute limits.

    Each start books the next free slot, so concurrent callers queue in order; tokens are the
    attempt's worst case (prompt bound plus ``max_tokens``).
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._lock = threading.Lock()
        self._next_request = 0.0
        self._next_tokens = 0.0

    def acquire(self, tokens: int, stop: threading.Event) -> None:
        if self.rpm is None and self.tpm is None:
            return
        with self._lock:
            now = time.monotonic()
            start = now
            if self.rpm is not None:
                start = max(start, self._next_request)
                self._next_request = start + 60.0 / self.rpm
            if self.tpm is not None:
                start = max(start, self._next_tokens)
                self._next_tokens = start + 60.0 * tokens / self.tpm
        if start > now:
            stop.wait(start - now)


class _Progress:
    """A progress bar over calls, showing money spent and the projected total."""

    def __init__(self, total: int, enabled: bool, prior_picousd: int) -> None:
        self._bar = tqdm(total=total, unit="call", desc="teacher", disable=not enabled, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._spent = 0
        self._prior = prior_picousd

    def advance(self, charged: Usage) -> None:
        with self._lock:
            self._done += 1
            self._spent += charged.picousd
            projected = self._prior + self._spent * self._total / max(self._done, 1)
            self._bar.set_postfix(
                spent=f"${picousd_to_usd(self._prior + self._spent):.4f}",
                projected=f"${picousd_to_usd(int(projected)):.4f}",
                refresh=False,
            )
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class Teacher:
    """A backend wrapped with the ledger, the cache, the caps, concurrency, rate limits and retries."""

    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        price: Price,
        caps: Caps,
        *,
        max_tokens: int,
        prompt_bound: Callable[[Sequence[Mapping[str, str]]], int],
        concurrency: int = 8,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        redactor: Redactor | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.ledger = ledger
        self.price = price
        self.caps = caps
        self.max_tokens = max_tokens
        self.prompt_bound = prompt_bound
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.redact = redactor or getattr(backend, "redact", None) or Redactor(None)
        self.progress = progress
        self._limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._stop = threading.Event()
        self._fatal: CallError | None = None
        self.budget_exhausted = False
        self.retries = 0

    # ---------------------------------------------------------------------------------------
    # Keys and bounds

    def key_for(self, request: TeacherRequest) -> str:
        return cache_key(
            example_id=request.example_id,
            messages=request.messages,
            backend=self.backend.kind,
            model=self.backend.model,
            sampling=self.backend.sampling(),
        )

    def worst_case_for(self, request: TeacherRequest) -> WorstCase:
        """Return the most one attempt of ``request`` can cost."""
        completion = self.backend.completion_bound(request, self.max_tokens)
        return worst_case(self.price, self.prompt_bound(request.messages), completion)

    def _info(self, request: TeacherRequest, key: str, attempt: int) -> AttemptInfo:
        return AttemptInfo(
            example_id=request.example_id,
            cache_key=key,
            purpose=request.purpose,
            backend=self.backend.kind,
            endpoint=self.backend.endpoint,
            model=self.backend.model,
            attempt=attempt,
            max_tokens=self.max_tokens,
        )

    # ---------------------------------------------------------------------------------------
    # Batches

    def complete(self, requests: Sequence[TeacherRequest]) -> list[Outcome]:
        """Return one outcome per request, in order; raise TeacherError after a client error.

        Requests with equal cache keys are sent once. When the caps leave no room for a
        request's next attempt, it ends with status "budget" and :attr:`budget_exhausted` is set.
        """
        self._stop.clear()
        self._fatal = None
        keys = [self.key_for(r) for r in requests]
        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_index.setdefault(key, index)

        results: dict[str, Outcome] = {}
        pending: list[int] = []
        for key, index in first_index.items():
            hit = self._cached(requests[index], key)
            if hit is not None:
                results[key] = hit
            else:
                pending.append(index)
        if len(results):
            log.info("teacher: %d of %d request(s) served from the ledger's cache", len(results), len(first_index))

        bar = _Progress(len(pending), self.progress and bool(pending), self.ledger.used.picousd)
        try:
            if self.backend.batch_size:
                outcomes = self._run_batched([requests[i] for i in pending], [keys[i] for i in pending], bar)
            else:
                outcomes = self._run_concurrent([requests[i] for i in pending], [keys[i] for i in pending], bar)
        finally:
            bar.close()
        for index, outcome in zip(pending, outcomes, strict=True):
            results[keys[index]] = outcome

        if self._fatal is not None:
            error = self._fatal
            raise TeacherError(
                f"the teacher endpoint {self.backend.endpoint} rejected a request with {error.message}; "
                "the stage stopped because every further request would fail the same way",
                hint=_client_error_hint(error.http_status),
            )
        return [
            results[key] if first_index[key] == index else _duplicate(results[key], requests[index])
            for index, key in enumerate(keys)
        ]

    def _cached(self, request: TeacherRequest, key: str) -> Outcome | None:
        stored = self.ledger.lookup(key)
        if stored is None or not is_reusable(stored, self.max_tokens):
            return None
        attempt_id = self.ledger.record_cached(self._info(request, key, 0), stored)
        return _from_stored(request, stored, attempt_id, cached=True, attempts=0, charged=Usage())

    def _run_concurrent(self, requests: list[TeacherRequest], keys: list[str], bar: _Progress) -> list[Outcome]:
        if not requests:
            return []
        workers = min(self.concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher") as pool:
            futures = [pool.submit(self._run_one, r, k, bar) for r, k in zip(requests, keys, strict=True)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                # An unexpected error or Ctrl-C: send nothing more, let calls in flight settle.
                self._stop.set()
                raise

    def _run_one(self, request: TeacherRequest, key: str, bar: _Progress) -> Outcome:
        outcome = self._attempts(request, key)
        bar.advance(outcome.charged)
        return outcome

    def _attempts(self, request: TeacherRequest, key: str) -> Outcome:
        """Make up to ``1 + max_retries`` attempts for one request."""
        charged = Usage()
        last_error = ""
        worst = self.worst_case_for(request)
        for attempt in range(1, self.max_retries + 2):
            if self._stop.is_set():
                return Outcome(request, key, "stopped", attempts=attempt - 1, charged=charged, error=last_error or None)
            self._limiter.acquire(worst.usage.tokens, self._stop)
            info = self._info(request, key, attempt)
            attempt_id = self.ledger.reserve(info, worst, self.caps)
            if attempt_id is None:
                self.budget_exhausted = True
                return Outcome(request, key, "budget", attempts=attempt - 1, charged=charged, error=last_error or None)
            if self._stop.is_set():
                self.ledger.cancel(attempt_id, "the batch stopped before this request was sent")
                return Outcome(request, key, "stopped", attempts=attempt - 1, charged=charged, error=last_error or None)

            started = time.monotonic()
            try:
                reply = self.backend.send(request, self.max_tokens)
            except CallError as error:
                latency = time.monotonic() - started
                text = self.redact(error.message)
                charged = charged + self.ledger.settle_failure(
                    attempt_id, billed=error.billed, error=text, latency_s=latency, http_status=error.http_status
                )
                last_error = text
                if error.fatal:
                    self._fatal = error
                    self._stop.set()
                    log.error("teacher: example %s: %s; stopping the batch", request.example_id, text)
                    return Outcome(request, key, "failed", attempt_id=attempt_id, attempts=attempt, charged=charged, error=text)
                delay = self._retry_delay(attempt, error) if error.retryable else None
                if delay is None:
                    log.warning("teacher: example %s failed on attempt %d: %s", request.example_id, attempt, text)
                    return Outcome(request, key, "failed", attempt_id=attempt_id, attempts=attempt, charged=charged, error=text)
                self.retries += 1
                log.info(
                    "teacher: example %s attempt %d failed (%s); retrying in %.2f s",
                    request.example_id, attempt, text, delay,
                )
                self._stop.wait(delay)
                continue
            except BaseException:
                self.ledger.settle_failure(
                    attempt_id, billed=None, error="the client failed while the request was in flight",
                    latency_s=time.monotonic() - started,
                )
                raise
            return self._settle(request, key, attempt_id, attempt, reply, time.monotonic() - started, charged)
        return Outcome(request, key, "failed", attempts=self.max_retries + 1, charged=charged, error=last_error or None)

    def _settle(
        self, request: TeacherRequest, key: str, attempt_id: int, attempt: int, reply: Reply, latency: float, charged: Usage
    ) -> Outcome:
        cost = None
        if reply.prompt_tokens is not None and reply.completion_tokens is not None:
            cost = self.price.cost(reply.prompt_tokens, reply.completion_tokens)
        settlement = self.ledger.settle_response(
            attempt_id,
            self._info(request, key, attempt),
            # A reply can quote the key (a proxy echoing headers), and stored text reaches the
            # run directory, training data and logs, so it is redacted like error messages.
            text=self.redact(reply.text),
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cost_picousd=cost,
            latency_s=latency,
        )
        return _from_stored(
            request, settlement.stored, attempt_id, cached=False, attempts=attempt, charged=charged + settlement.charged
        )

    def _retry_delay(self, attempt: int, error: CallError) -> float | None:
        """Return the wait before the next attempt, or None when no attempt is left or the wait is too long."""
        if attempt > self.max_retries:
            return None
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        with self._random_lock:
            delay = base / 2 + self._random.uniform(0, base / 2)
        if error.retry_after_s is not None:
            if error.retry_after_s > self.backoff_max_s:
                log.warning(
                    "teacher: the endpoint asked to wait %.0f s, longer than teacher.backoff_max_s = %g s; not retrying",
                    error.retry_after_s, self.backoff_max_s,
                )
                return None
            delay = max(delay, error.retry_after_s)
        return delay

    def _run_batched(self, requests: list[TeacherRequest], keys: list[str], bar: _Progress) -> list[Outcome]:
        """Run a batching backend (a local model): reserve a chunk, generate it, settle it."""
        outcomes: list[Outcome] = []
        size = self.backend.batch_size or 1
        for start in range(0, len(requests), size):
            chunk = list(zip(requests[start : start + size], keys[start : start + size], strict=True))
            reserved: list[tuple[TeacherRequest, str, int]] = []
            for request, key in chunk:
                attempt_id = self.ledger.reserve(self._info(request, key, 1), self.worst_case_for(request), self.caps)
                if attempt_id is None:
                    self.budget_exhausted = True
                    outcomes.append(Outcome(request, key, "budget"))
                    bar.advance(Usage())
                    continue
                reserved.append((request, key, attempt_id))
            if not reserved:
                continue
            started = time.monotonic()
            try:
                replies = self.backend.send_batch([r for r, _, _ in reserved], self.max_tokens)
            except BaseException:
                for _, _, attempt_id in reserved:
                    self.ledger.settle_failure(
                        attempt_id, billed=None, error="the local model failed on this batch",
                        latency_s=time.monotonic() - started,
                    )
                raise
            latency = (time.monotonic() - started) / len(reserved)
            for (request, key, attempt_id), reply in zip(reserved, replies, strict=True):
                outcome = self._settle(request, key, attempt_id, 1, reply, latency, Usage())
                outcomes.append(outcome)
                bar.advance(outcome.charged)
        order = {id(r): i for i, r in enumerate(requests)}
        return sorted(outcomes, key=lambda o: order[id(o.request)])


def _from_stored(
    request: TeacherRequest, stored: StoredResponse, attempt_id: int, *, cached: bool, attempts: int, charged: Usage
) -> Outcome:
    return Outcome(
        request=request,
        cache_key=stored.cache_key,
        status="ok",
        text=stored.text,
        finish_reason=stored.finish_reason,
        attempt_id=attempt_id,
        source_attempt_id=stored.attempt_id,
        cached=cached,
        attempts=attempts,
        charged=charged,
        response_picousd=stored.cost_picousd,
    )


def _duplicate(outcome: Outcome, request: TeacherRequest) -> Outcome:
    """Return the outcome of an equal request for a repeated one, charged nothing."""
    return Outcome(
        request=request,
        cache_key=outcome.cache_key,
        status=outcome.status,
        text=outcome.text,
        finish_reason=outcome.finish_reason,
        attempt_id=outcome.attempt_id,
        source_attempt_id=outcome.source_attempt_id,
        cached=True,
        response_picousd=outcome.response_picousd,
        error=outcome.error,
    )


def _client_error_hint(status: int | None) -> str:
    if status == 401:
        return "check the API key in the environment variable teacher.api_key_env names; it may be wrong or revoked"
    if status == 403:
        return "the key is not allowed to use this model or endpoint: check its permissions"
    if status == 404:
        return "check teacher.base_url (it usually ends in /v1) and teacher.model"
    return "check teacher.model, teacher.max_tokens and the sampling settings against what the endpoint accepts"
