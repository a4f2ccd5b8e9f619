"""Teacher backends behind one interface: an OpenAI-compatible endpoint, reference rationales, a local model.

A backend makes exactly one attempt per :meth:`send` and reports failures as :class:`CallError`,
which records whether the endpoint may have billed the attempt and whether retrying can help.
Retries, reservations and the cache live in :class:`bridge.teacher.client.Teacher`, so every
attempt gets a ledger row.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from bridge.config import TeacherConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError, TeacherError

log = logging.getLogger(__name__)

Messages = tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class TeacherRequest:
    """One chat request for one example.

    ``purpose`` is "ask" for the first question and "reask" for the question repeated with the
    gold answer as a hint, which makes the response label-conditioned.
    """

    example_id: str
    messages: Messages
    purpose: str = "ask"
    label_conditioned: bool = False


@dataclass(frozen=True)
class Reply:
    """A response the endpoint produced; token counts are None when it reported none."""

    text: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None


ErrorKind = Literal["rate_limit", "server", "connection", "timeout", "invalid_response", "client"]


class CallError(Exception):
    """One attempt failed.

    ``billed`` is False when the endpoint certainly did not bill the attempt and None when the
    outcome is unknown (the request may have been processed). ``retryable`` is True for 429, 5xx,
    connection errors and time-outs. ``fatal`` errors (400, 401, 403, 404 and other client
    errors) stop the whole stage, because every further request would fail the same way.
    The message never contains the API key.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        billed: bool | None,
        http_status: int | None = None,
        retry_after_s: float | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.billed = billed
        self.http_status = http_status
        self.retry_after_s = retry_after_s
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limit", "server", "connection", "timeout")

    @property
    def fatal(self) -> bool:
        return self.kind == "client"


class Backend(Protocol):
    """Interface through which the client calls a teacher."""

    #: "openai", "reference" or "local".
    kind: str
    #: Destination of the requests, without credentials: a URL, "reference" or "local:<model>".
    endpoint: str
    model: str
    #: True when requests leave this machine.
    remote: bool
    #: Requests per :meth:`send_batch` call for batching backends; None for one request per call.
    batch_size: int | None

    def send(self, request: TeacherRequest, max_tokens: int) -> Reply: ...

    def send_batch(self, requests: Sequence[TeacherRequest], max_tokens: int) -> list[Reply]: ...

    def completion_bound(self, request: TeacherRequest, max_tokens: int) -> int: ...

    def sampling(self) -> dict[str, Any]: ...


# -------------------------------------------------------------------------------------------
# Secrets and endpoints


class Redactor:
    """Remove an API key (and anything shaped like an OpenAI key) from text before it is stored or logged."""

    _KEY_SHAPE = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")

    def __init__(self, secret: str | None) -> None:
        self.secret = secret or None

    def __call__(self, text: str) -> str:
        if self.secret and len(self.secret) >= 4:
            text = text.replace(self.secret, "[redacted]")
        return self._KEY_SHAPE.sub("sk-[redacted]", text)


def public_endpoint(url: str) -> str:
    """Return ``url`` without user info, query or fragment, which may carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def is_loopback_url(url: str) -> bool:
    """Return True when ``url`` points at this machine (localhost or a loopback address)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_confirmed(teacher: TeacherConfig, confirmed: bool) -> None:
    """Raise TeacherError when data would go to another machine without confirmation."""
    if teacher.backend != "openai" or confirmed:
        return
    url = teacher.base_url or "https://api.openai.com/v1"
    if is_loopback_url(url):
        return
    raise TeacherError(
        f"the teacher endpoint {public_endpoint(url)} is not on this machine: prompts, which contain "
        "the examples' text, would be sent there",
        hint="confirm with --yes (or confirm_remote=True in Python) if the data may leave this machine, "
        "or point teacher.base_url at a local server",
    )


def read_api_key(teacher: TeacherConfig) -> str:
    """Return the API key from the environment variable ``teacher.api_key_env`` names."""
    key = os.environ.get(teacher.api_key_env, "")
    if not key.strip():
        raise ConfigError(
            f"the environment variable {teacher.api_key_env} (named by teacher.api_key_env) is not set",
            hint=f"export {teacher.api_key_env}=<your key>; for a local server without authentication any "
            "non-empty value works",
        )
    return key.strip()


def sampling_params(teacher: TeacherConfig) -> dict[str, Any]:
    """Return the sampling parameters that go into the cache key (``max_tokens`` excluded)."""
    return {"temperature": teacher.temperature, "top_p": teacher.top_p}


# -------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Return the wait that a Retry-After or retry-after-ms header requests, in seconds."""
    if not headers:
        return None
    import email.utils
    import time

    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


class OpenAIBackend:
    """Any OpenAI-compatible chat completions endpoint, through the official ``openai`` client.

    The client's own retries are off (``max_retries=0``) so that each attempt is reserved and
    recorded. ``max_tokens`` is sent as ``max_tokens``, which OpenAI-compatible servers (vLLM,
    llama.cpp, Ollama) accept.
    """

    kind = "openai"
    batch_size = None

    def __init__(self, teacher: TeacherConfig, api_key: str, *, redactor: Redactor | None = None) -> None:
        import openai

        self.teacher = teacher
        self.model = teacher.model
        url = teacher.base_url or "https://api.openai.com/v1"
        self.endpoint = public_endpoint(url)
        self.remote = not is_loopback_url(url)
        self.redact = redactor or Redactor(api_key)
        self._openai = openai
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=url,
            max_retries=0,
            timeout=openai.Timeout(teacher.timeout_s, connect=min(teacher.timeout_s, 10.0)),
        )

    def sampling(self) -> dict[str, Any]:
        return sampling_params(self.teacher)

    def completion_bound(self, request: TeacherRequest, max_tokens: int) -> int:
        return max_tokens

    def send_batch(self, requests: Sequence[TeacherRequest], max_tokens: int) -> list[Reply]:
        return [self.send(r, max_tokens) for r in requests]

    def send(self, request: TeacherRequest, max_tokens: int) -> Reply:
        openai = self._openai
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": m["role"], "content": m["content"]} for m in request.messages],
                temperature=self.teacher.temperature,
                top_p=self.teacher.top_p,
                max_tokens=max_tokens,
            )
        except openai.APITimeoutError:
            raise CallError(
                f"timed out after {self.teacher.timeout_s:g} s", kind="timeout", billed=None
            ) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            # A refused connection never delivered the request, so nothing can have been billed.
            refused = type(cause).__name__ == "ConnectError"
            raise CallError(
                f"connection failed: {self.redact(str(cause or exc))}",
                kind="connection",
                billed=False if refused else None,
            ) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APIError as exc:
            raise CallError(
                f"invalid response: {self.redact(str(exc))}", kind="invalid_response", billed=None
            ) from None
        return self._parse(raw)

    def _status_error(self, exc: Any) -> CallError:
        status = int(exc.status_code)
        body = self.redact(_body_text(exc))
        message = f"HTTP {status}: {body[:500]}"
        headers = getattr(exc.response, "headers", None)
        if status == 429:
            return CallError(message, kind="rate_limit", billed=False, http_status=status, retry_after_s=_retry_after(headers), body=body)
        if status == 408:
            return CallError(message, kind="timeout", billed=False, http_status=status, retry_after_s=_retry_after(headers), body=body)
        if status >= 500:
            # A gateway error (502, 504) can hide an upstream that finished and billed the call.
            billed = None if status in (502, 504) else False
            return CallError(message, kind="server", billed=billed, http_status=status, retry_after_s=_retry_after(headers), body=body)
        return CallError(message, kind="client", billed=False, http_status=status, body=body)

    def _parse(self, raw: Any) -> Reply:
        body_text = ""
        try:
            body_text = raw.http_response.text
            completion = raw.parse()
            if isinstance(completion, str | bytes) or not getattr(completion, "choices", None):
                raise ValueError("the body is not a chat completion with choices")
            choice = completion.choices[0]
            text = choice.message.content
            if text is None:
                raise ValueError("the first choice has no message content")
            finish_reason = str(choice.finish_reason or "unknown")
        except (ValueError, TypeError, AttributeError, IndexError, self._openai.APIError) as exc:
            raise CallError(
                f"invalid response ({self.redact(str(exc))[:200]}): {self.redact(body_text)[:500]!r}",
                kind="invalid_response",
                billed=None,
                http_status=getattr(raw, "status_code", None),
                body=self.redact(body_text),
            ) from None
        usage = getattr(completion, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None) if usage is not None else None
        completion_tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
        return Reply(
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=int(prompt_tokens) if isinstance(prompt_tokens, int) else None,
            completion_tokens=int(completion_tokens) if isinstance(completion_tokens, int) else None,
        )

    def close(self) -> None:
        self._client.close()


def _body_text(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        return json.dumps(body)[:500]
    if body is not None:
        return str(body)
    return str(getattr(exc, "message", exc))


# -------------------------------------------------------------------------------------------
# Reference rationales


class ReferenceBackend:
    """The rationales a data set already carries, served as if a teacher had written them.

    For offline and reproducible experiments only: each response is the example's explanation
    (PubMedQA's long answer, TAT-QA's derivation, a user's gold explanation) followed by
    ``Answer: <gold>``, so it is label-checked by construction and shows nothing of what a real
    teacher would write. Calls are charged through the ledger at the configured price.
    """

    kind = "reference"
    endpoint = "reference"
    remote = False
    batch_size = None

    def __init__(
        self,
        teacher: TeacherConfig,
        examples: Sequence[Example],
        task: TaskSpec,
        count_tokens: Callable[[str], int],
        count_prompt: Callable[[Sequence[Mapping[str, str]]], int] | None = None,
    ) -> None:
        from bridge.prompts import format_target, target_answer

        missing = [e.id for e in examples if not (e.explanation or "").strip()]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise DataError(
                f"the reference teacher needs an explanation for every example, but {len(missing)} have none: {shown}",
                hint="use a data set that carries explanations (or the generic adapter's fields.explanation), "
                "filter those examples out, or choose another teacher.backend",
            )
        self.teacher = teacher
        self.model = teacher.model
        self._count = count_tokens
        # The prompt is counted with the same bound the reservation used, so the charge never
        # exceeds the reservation.
        self._count_prompt = count_prompt or (lambda messages: sum(count_tokens(str(m["content"])) for m in messages))
        self._texts = {e.id: format_target((e.explanation or "").strip(), target_answer(e, task)) for e in examples}

    def sampling(self) -> dict[str, Any]:
        return {}

    def completion_bound(self, request: TeacherRequest, max_tokens: int) -> int:
        return self._count(self._text(request))

    def _text(self, request: TeacherRequest) -> str:
        try:
            return self._texts[request.example_id]
        except KeyError:
            raise DataError(f"the reference teacher has no explanation for example '{request.example_id}'") from None

    def send(self, request: TeacherRequest, max_tokens: int) -> Reply:
        text = self._text(request)
        prompt = self._count_prompt(request.messages)
        return Reply(text=text, finish_reason="stop", prompt_tokens=prompt, completion_tokens=self._count(text))

    def send_batch(self, requests: Sequence[TeacherRequest], max_tokens: int) -> list[Reply]:
        return [self.send(r, max_tokens) for r in requests]


# -------------------------------------------------------------------------------------------
# Local model


@dataclass
class LocalBackend:
    """A local causal language model used as a text-only teacher.

    ``model`` is a loaded :class:`bridge.models.loading.LocalModel`, or None to load
    ``teacher.local_model`` on the first call. ``generate`` defaults to
    :func:`bridge.models.inference.generate`; tests pass a stand-in with the same signature.
    """

    teacher: TeacherConfig
    model_obj: Any = None
    generate: Callable[..., Sequence[Any]] | None = None
    batch_size: int | None = 8
    kind: str = field(default="local", init=False)
    remote: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.model_obj is None and self.teacher.local_model is None:
            raise ConfigError(
                "teacher.backend is local but teacher.local_model is not set",
                hint="set teacher.local_model.path to a local model folder or packaged model",
            )
        self.model = self.teacher.model
        ref = self.teacher.local_model.path if self.teacher.local_model is not None else self.teacher.model
        self.endpoint = f"local:{ref}"

    def sampling(self) -> dict[str, Any]:
        return sampling_params(self.teacher)

    def completion_bound(self, request: TeacherRequest, max_tokens: int) -> int:
        return max_tokens

    def _loaded(self) -> Any:
        if self.model_obj is None:
            from bridge.models.loading import load_model

            assert self.teacher.local_model is not None
            self.model_obj = load_model(self.teacher.local_model, padding_side="left")
        if self.generate is None:
            from bridge.models.inference import generate

            self.generate = generate
        return self.model_obj

    def send(self, request: TeacherRequest, max_tokens: int) -> Reply:
        return self.send_batch([request], max_tokens)[0]

    def send_batch(self, requests: Sequence[TeacherRequest], max_tokens: int) -> list[Reply]:
        from bridge.models.inference import GenerationRequest

        lm = self._loaded()
        prompts = [
            lm.tokenizer.apply_chat_template(
                [dict(m) for m in r.messages], tokenize=False, add_generation_prompt=True
            )
            for r in requests
        ]
        batch = [GenerationRequest(id=str(i), prompt=p) for i, p in enumerate(prompts)]
        assert self.generate is not None
        outputs = {
            g.id: g
            for g in self.generate(
                lm,
                batch,
                max_new_tokens=max_tokens,
                temperature=self.teacher.temperature,
                top_p=self.teacher.top_p,
                batch_size=self.batch_size or 8,
                progress=False,
            )
        }
        replies = []
        for item, prompt in zip(batch, prompts, strict=True):
            output = outputs[item.id]
            replies.append(
                Reply(
                    text=output.text,
                    finish_reason=str(output.finish_reason),
                    prompt_tokens=len(lm.encode(prompt)),
                    completion_tokens=int(output.completion_tokens),
                )
            )
        return replies


# -------------------------------------------------------------------------------------------
# Construction


def make_backend(
    teacher: TeacherConfig,
    examples: Sequence[Example],
    *,
    task: TaskSpec,
    count_tokens: Callable[[str], int],
    count_prompt: Callable[[Sequence[Mapping[str, str]]], int] | None = None,
    confirm_remote: bool = False,
    local_model: Any = None,
    local_generate: Callable[..., Sequence[Any]] | None = None,
) -> Backend:
    """Build the configured backend, checking the endpoint confirmation and the API key first."""
    if teacher.backend == "openai":
        check_endpoint_confirmed(teacher, confirm_remote)
        return OpenAIBackend(teacher, read_api_key(teacher))
    if teacher.backend == "reference":
        return ReferenceBackend(teacher, examples, task, count_tokens, count_prompt)
    return LocalBackend(teacher, model_obj=local_model, generate=local_generate)
