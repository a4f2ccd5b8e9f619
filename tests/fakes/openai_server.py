"""A local OpenAI-compatible chat completions server for tests, with its own bill and scripted faults.

The server listens on 127.0.0.1 only. It replies to ``POST /v1/chat/completions`` with a text from
a ``responder`` callable, counts tokens with a fixed rule (never more than bridge's UTF-8 byte
bound) and bills every response it produces, including those the client never receives.

Faults are chosen per request, in this order:

1. a rule added with :meth:`FakeOpenAIServer.fault_when` whose text matches the request body;
2. the queue filled by :meth:`FakeOpenAIServer.push` and :meth:`FakeOpenAIServer.burst`
   (one fault per request, in arrival order);
3. random faults set with :meth:`FakeOpenAIServer.random_faults`.

Fault kinds, and whether the server bills the request:

* ``rate_limit``: 429 with ``Retry-After``; not billed.
* ``server_error``: 500; not billed.
* ``bad_gateway``: 502 after the answer was produced; billed.
* ``slow``: waits ``delay_s`` (past the client's time-out), then bills and answers.
* ``truncated``: the answer cut in half with ``finish_reason=length``; billed.
* ``invalid_json``: a 200 whose body is not JSON; billed.
* ``drop_after_bill``: the answer is produced and billed, then the connection is closed
  without a response.
* ``unauthorized``: 401 whose message echoes the presented key (as a careless server might);
  not billed. :meth:`FakeOpenAIServer.revoke_key` makes every later request fail this way.
* ``bad_request``, ``not_found``: 400 and 404; not billed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = (
    "rate_limit",
    "server_error",
    "bad_gateway",
    "slow",
    "truncated",
    "invalid_json",
    "drop_after_bill",
    "unauthorized",
    "bad_request",
    "not_found",
)
#: Faults after which the server has billed the request.
BILLED_FAULTS = ("bad_gateway", "slow", "truncated", "invalid_json", "drop_after_bill")

Responder = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class Fault:
    """One injected fault; ``retry_after_s`` is sent with 429, ``delay_s`` is the wait of ``slow``."""

    kind: str
    retry_after_s: float = 0.05
    delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")


@dataclass(frozen=True)
class BillEntry:
    """One billed response."""

    seq: int
    digest: str
    last_user_message: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    fault: str | None


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received, billed or not."""

    seq: int
    digest: str
    last_user_message: str
    status: int
    fault: str | None
    billed: bool
    authorization: str


def count_tokens(text: str) -> int:
    """Return the server's token count of a text: one token per 4 UTF-8 bytes, rounded up."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def prompt_tokens_of(messages: Sequence[dict[str, str]]) -> int:
    """Return the prompt tokens the server bills: content tokens plus 3 per message and 3 per request."""
    return sum(count_tokens(str(m.get("content", ""))) + 3 for m in messages) + 3


def default_responder(messages: list[dict[str, str]]) -> str:
    return "The evidence points one way.\nAnswer: yes"


@dataclass
class _Rule:
    needle: str
    fault: Fault
    remaining: int


@dataclass
class FakeOpenAIServer:
    """The server; use as a context manager or call :meth:`start` and :meth:`stop`."""

    api_key: str = "test-key"
    model: str = "fake-teacher"
    responder: Responder = default_responder
    latency_s: float = 0.0
    prompt_price_per_mtok: float = 1.0
    completion_price_per_mtok: float = 2.0
    bill: list[BillEntry] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._rules: list[_Rule] = []
        self._random_weights: dict[str, float] = {}
        self._random = random.Random(0)
        self._revoked = False
        self._seq = 0
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(_Handler):
            fake = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        httpd.request_queue_size = 256
        httpd.daemon_threads = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until no request is being handled (slow faults bill only when they finish)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._active} request(s) still being handled")
                self._idle.wait(left)

    # ---------------------------------------------------------------------------------------
    # Fault scripting

    def push(self, *faults: Fault | str) -> None:
        """Give the next requests these faults, one each, in arrival order."""
        with self._lock:
            self._queue.extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    def burst(self, fault: Fault | str, count: int) -> None:
        """Give the next ``count`` requests the same fault."""
        self.push(*([fault] * count))

    def fault_when(self, needle: str, fault: Fault | str, times: int = 1) -> None:
        """Give the next ``times`` requests whose body contains ``needle`` this fault."""
        with self._lock:
            self._rules.append(_Rule(needle, fault if isinstance(fault, Fault) else Fault(fault), times))

    def random_faults(self, weights: dict[str, float], seed: int = 0) -> None:
        """Give each request a fault of kind k with probability ``weights[k]``."""
        if sum(weights.values()) > 1:
            raise ValueError("fault probabilities must sum to at most 1")
        for kind in weights:
            Fault(kind)
        with self._lock:
            self._random_weights = dict(weights)
            self._random = random.Random(seed)

    def revoke_key(self) -> None:
        """Reject every later request with 401, as when a key is revoked mid-run."""
        with self._lock:
            self._revoked = True

    def clear_faults(self) -> None:
        with self._lock:
            self._queue.clear()
            self._rules.clear()
            self._random_weights = {}
            self._revoked = False

    # ---------------------------------------------------------------------------------------
    # Bill

    @property
    def billed_usd(self) -> float:
        with self._lock:
            return sum(entry.cost_usd for entry in self.bill)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_price_per_mtok + completion_tokens * self.completion_price_per_mtok) / 1e6

    # ---------------------------------------------------------------------------------------
    # Request handling (called from handler threads)

    def _pick_fault(self, body_text: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining > 0 and rule.needle in body_text:
                    rule.remaining -= 1
                    return rule.fault
            if self._queue:
                return self._queue.popleft()
            if self._random_weights:
                draw = self._random.random()
                for kind, weight in self._random_weights.items():
                    if draw < weight:
                        return Fault(kind)
                    draw -= weight
        return None

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _bill(self, entry: BillEntry) -> None:
        with self._lock:
            self.bill.append(entry)

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            self._active += 1
            return self._seq

    def _done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK (about 40 ms on Linux).
    disable_nagle_algorithm = True
    fake: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.fake.model, "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        fake = self.fake
        seq = fake._next_seq()
        try:
            self._handle_completion(fake, seq)
        finally:
            fake._done()

    def _handle_completion(self, fake: FakeOpenAIServer, seq: int) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        body_text = raw.decode("utf-8", errors="replace")
        authorization = self.headers.get("Authorization", "")
        try:
            body = json.loads(body_text)
            messages = list(body["messages"])
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 1 << 30)
        except (ValueError, KeyError, TypeError):
            self._send_json(400, {"error": {"message": "invalid request body", "type": "invalid_request_error"}})
            return
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        last_user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")

        def record(status: int, fault: str | None, billed: bool) -> None:
            fake._record(RequestRecord(seq, digest, last_user, status, fault, billed, authorization))

        if self.path.rstrip("/") != "/v1/chat/completions":
            record(404, None, False)
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        presented = authorization.removeprefix("Bearer ").strip()
        fault = fake._pick_fault(body_text)
        if fake._revoked or presented != fake.api_key or (fault is not None and fault.kind == "unauthorized"):
            record(401, "unauthorized", False)
            self._send_json(
                401,
                {"error": {"message": f"Incorrect API key provided: {presented}.", "type": "invalid_request_error", "code": "invalid_api_key"}},
            )
            return
        kind = fault.kind if fault is not None else None
        if kind == "rate_limit":
            record(429, kind, False)
            assert fault is not None
            self._send_json(
                429,
                {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                headers={"Retry-After": f"{fault.retry_after_s:g}"},
            )
            return
        if kind in ("server_error", "bad_request", "not_found"):
            status = {"server_error": 500, "bad_request": 400, "not_found": 404}[kind]
            record(status, kind, False)
            self._send_json(status, {"error": {"message": f"injected {kind}", "type": kind}})
            return

        # From here on the server produces a completion and bills it.
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if kind == "slow":
            assert fault is not None
            time.sleep(fault.delay_s)
        text = fake.responder(messages)
        completion_tokens = count_tokens(text)
        finish_reason = "stop"
        if kind == "truncated":
            text = text[: max(1, len(text) // 2)]
            completion_tokens = count_tokens(text)
            finish_reason = "length"
        if completion_tokens > max_tokens:
            text = text.encode("utf-8")[: max_tokens * 4].decode("utf-8", errors="ignore")
            completion_tokens = min(max_tokens, count_tokens(text))
            finish_reason = "length"
        prompt_tokens = prompt_tokens_of(messages)
        fake._bill(
            BillEntry(
                seq, digest, last_user, prompt_tokens, completion_tokens,
                fake.cost(prompt_tokens, completion_tokens), kind,
            )
        )
        record(200 if kind not in ("bad_gateway",) else 502, kind, True)

        if kind == "drop_after_bill":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "bad_gateway":
            self._send_json(502, {"error": {"message": "upstream connection reset", "type": "bad_gateway"}})
            return
        if kind == "invalid_json":
            self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [{"message": ', "application/json")
            return
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{seq}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": fake.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a time-out), but the request stays billed.
            self.close_connection = True
