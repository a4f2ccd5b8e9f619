"""An OpenAI-compatible HTTP server for one local model (``bridge serve``).

Endpoints, under ``/v1``:

* ``GET /models`` and ``GET /models/{id}``: the one served model.
* ``POST /chat/completions``: messages are rendered exactly as bridge renders its own prompts
  (:func:`bridge.prompts.render_text`: the model's chat template, control-token text in
  messages broken up), then completed by :func:`bridge.models.inference.generate`, greedily
  at temperature 0 or by seeded sampling. ``stream=true`` returns server-sent events that end
  with ``data: [DONE]``.
* ``POST /completions``: a prompt string or list of strings, continued as given. With
  ``echo=true`` and ``logprobs=k`` the choice carries the prompt tokens' log-probabilities in
  the format vLLM uses (``tokens``, ``token_logprobs`` whose first entry is null,
  ``top_logprobs``, ``text_offset``), so options can be scored over HTTP; ``max_tokens=0`` is
  allowed with ``echo``.

One lock serialises model access, so concurrent requests are safe and queue; requests past
``max_waiting_requests`` get 503. Request bodies, ``max_tokens``, prompts per request and
``logprobs`` are bounded, and every invalid request gets an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.errors import BridgeError

if TYPE_CHECKING:
    from bridge.models.inference import Generation, TokenLogprobs
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: ``max_tokens`` of a completions request that sets none (the OpenAI default for that endpoint).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: Stop sequences per request (the OpenAI limit).
MAX_STOP_SEQUENCES = 4


class ServeError(BridgeError):
    """The server cannot start: the address is invalid or already in use, or a limit is invalid."""


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask of the server."""

    #: Largest ``max_tokens`` a request may set, and the default of chat completions.
    max_tokens_limit: int = 1024
    #: Largest request body in bytes. Larger bodies get 413.
    max_request_bytes: int = 1_048_576
    #: Largest number of prompts in one completions request.
    max_prompts: int = 64
    #: Largest ``logprobs`` (top alternatives per token) of a completions request.
    max_logprobs: int = 20
    #: Requests that may wait for the model at once. Further requests get 503.
    max_waiting_requests: int = 32
    #: Prompts per forward pass when a completions request sends several.
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_request_bytes", "max_prompts", "max_waiting_requests", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ServeError(f"server limit {name} must be a positive integer, not {value!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ServeError(f"server limit max_logprobs must be 0 or more, not {self.max_logprobs!r}")


# --------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """A request failure, returned as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _param_path(loc: Sequence[Any]) -> str:
    """Return a pydantic error location as a parameter path such as ``messages[0].content``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _validation_error(exc: ValidationError) -> OpenAIError:
    """Turn the first problem of a pydantic validation error into an OpenAI-style 400."""
    error = exc.errors(include_url=False)[0]
    kind, loc = error["type"], error.get("loc", ())
    param = _param_path(loc) or None
    if kind == "json_invalid":
        return _invalid(None, f"The request body is not valid JSON: {error['msg']}.", "invalid_json")
    if not loc:
        return _invalid(None, "The request body must be a JSON object.", "invalid_type")
    if kind == "missing":
        return _invalid(param, f"Missing required parameter: '{param}'.", "missing_required_parameter")
    if kind == "extra_forbidden":
        return _invalid(param, f"Unrecognized request argument supplied: '{param}'.", "unknown_parameter")
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return _invalid(param, f"Invalid type for '{param}': {message}.", "invalid_type")
    return _invalid(param, f"Invalid value for '{param}': {message}.")


# --------------------------------------------------------------------------------------------
# Requests


class _Body(BaseModel):
    # Unknown arguments are errors, as on the OpenAI API, because ignoring one would silently
    # change what a client asked for.
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Body):
    """One chat message; ``developer`` is treated as ``system``.

    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts, which are joined.
    """

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _join_text_parts(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in value
        ):
            return "".join(part["text"] for part in value)
        raise ValueError('expected a string or a list of {"type": "text", "text": "..."} parts')


class StreamOptions(_Body):
    """Options of a streamed response."""

    include_usage: bool = False


class _SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: Any = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("expected a string or a list of strings")
        stops = list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def check_unsupported(self) -> None:
        """Raise for options this server does not implement when a request sets them."""
        if self.n != 1:
            raise _invalid("n", f"Invalid value for 'n': this server returns one choice per prompt, so n must be 1, not {self.n}.")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise _invalid(name, f"'{name}' is not supported by this server; leave it at 0.")
        if self.logit_bias:
            raise _invalid("logit_bias", "'logit_bias' is not supported by this server; leave it unset.")
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")


class ChatRequest(_SamplingBody):
    """A ``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise _invalid(
                "logprobs",
                "Chat log-probabilities are not supported by this server; use /v1/completions with echo=true and logprobs.",
            )
        if self.tools or self.tool_choice not in (None, "none") or self.parallel_tool_calls:
            raise _invalid("tools", "Tool calls are not supported by this server; send no tools.")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise _invalid("response_format", "Only response_format {\"type\": \"text\"} is supported by this server.")

    def completion_limit(self, limits: ServeLimits) -> int:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _invalid("max_tokens", "Set only one of 'max_tokens' and 'max_completion_tokens'.")
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if value is None:
            return limits.max_tokens_limit
        if value < 1:
            raise _invalid(param, f"Invalid value for '{param}': expected at least 1, got {value}.")
        return _check_max_tokens(param, value, limits)


class CompletionRequest(_SamplingBody):
    """A ``POST /v1/completions`` body."""

    prompt: Any
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of not in (None, 1):
            raise _invalid("best_of", f"'best_of' must be 1 on this server, not {self.best_of}.")
        if self.suffix:
            raise _invalid("suffix", "'suffix' is not supported by this server; leave it unset.")
        if self.stream:
            raise _invalid("stream", "Streaming is supported on /v1/chat/completions only; send stream=false here.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            return list(value)
        raise ValueError("expected a string or a list of strings (token id arrays are not supported)")

    def prompts(self, limits: ServeLimits) -> list[str]:
        prompts = list(self.prompt)
        if not prompts:
            raise _invalid("prompt", "Invalid value for 'prompt': the list of prompts is empty.")
        if len(prompts) > limits.max_prompts:
            raise _invalid("prompt", f"Invalid value for 'prompt': at most {limits.max_prompts} prompts per request, got {len(prompts)}.")
        return prompts


def _check_max_tokens(param: str, value: int, limits: ServeLimits) -> int:
    if value > limits.max_tokens_limit:
        raise _invalid(
            param,
            f"Invalid value for '{param}': {value} is more than this server's limit of {limits.max_tokens_limit} tokens.",
        )
    return value


# --------------------------------------------------------------------------------------------
# Model access


class _ModelRunner:
    """Runs model calls one at a time and rejects requests past the waiting limit."""

    def __init__(self, lm: LocalModel, max_waiting: int) -> None:
        self.lm = lm
        self.max_waiting = max_waiting
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._waiting = 0

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._count_lock:
            if self._waiting >= self.max_waiting:
                raise OpenAIError(
                    503,
                    f"The server is busy: {self._waiting} requests are already waiting for the model. Retry later.",
                    type="server_error",
                    code="server_busy",
                )
            self._waiting += 1
        try:
            with self._model_lock:
                return fn(*args, **kwargs)
        finally:
            with self._count_lock:
                self._waiting -= 1


def _context_length(lm: LocalModel) -> int | None:
    value = getattr(lm.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _check_context(lm: LocalModel, prompt_tokens: int, max_tokens: int, param: str) -> None:
    limit = _context_length(lm)
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise _invalid(
            param,
            f"This model's maximum context length is {limit} tokens, but the request needs {prompt_tokens} prompt "
            f"tokens plus {max_tokens} completion tokens. Shorten the prompt or lower max_tokens.",
            "context_length_exceeded",
        )


def _sampling_seed(body: _SamplingBody) -> int:
    """Return the request's seed, or a fresh random seed when a sampling request sets none."""
    if body.seed is not None:
        return body.seed
    return secrets.randbits(31) if body.temperature > 0 else 0


def _generate(lm: LocalModel, prompts: list[str], body: _SamplingBody, max_tokens: int, batch_size: int) -> list[Generation]:
    from bridge.models.inference import GenerationRequest, generate

    requests = [GenerationRequest(id=str(i), prompt=p) for i, p in enumerate(prompts)]
    return generate(
        lm,
        requests,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=_sampling_seed(body),
        stop=body.stop or (),
        batch_size=batch_size,
        progress=False,
    )


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Return the text each token adds when ``ids`` are decoded in order.

    Each token's text is the difference between decoding a short window ending with it and the
    same window without it, so pieces of a multi-byte character join up. Where that difference
    is not a clean suffix (a character split over tokens), the token is decoded alone.
    """
    window = 8
    texts = []
    for k in range(len(ids)):
        start = max(0, k - window)
        before = tokenizer.decode(ids[start:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        after = tokenizer.decode(ids[start : k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if after.startswith(before):
            texts.append(after[len(before) :])
        else:
            texts.append(tokenizer.decode([ids[k]], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return texts


# --------------------------------------------------------------------------------------------
# Responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs_block(tokenizer: Any, scored: TokenLogprobs, start: int) -> dict[str, Any]:
    """Return the completions ``logprobs`` object for the tokens of ``scored`` from ``start`` on.

    ``text_offset`` counts characters from the start of the choice's text. The chosen token is
    always in its ``top_logprobs`` entry, as vLLM returns it.
    """
    texts = token_texts(tokenizer, scored.token_ids)[start:]
    offsets, position = [], 0
    for text in texts:
        offsets.append(position)
        position += len(text)
    top: list[dict[str, float] | None] = []
    for k in range(start, len(scored.token_ids)):
        chosen = scored.logprobs[k]
        if chosen is None:
            top.append(None)
            continue
        alternatives = scored.top[k] or {}
        entry = {
            tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False): value
            for token_id, value in alternatives.items()
        }
        entry[texts[k - start]] = chosen
        top.append(dict(sorted(entry.items(), key=lambda item: -item[1])))
    return {
        "tokens": texts,
        "token_logprobs": scored.logprobs[start:],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _chat_stream(
    lm: LocalModel, request_id: str, created: int, model: str, generation: Generation, usage: dict[str, int], include_usage: bool
) -> list[str]:
    """Return the server-sent events of a finished chat completion, in order.

    NOTE: the completion is generated in full before the first event is sent, so the time to
    the first token equals the whole generation time. The events split the text at token
    boundaries, so clients read them as they read any streaming server's events.
    """
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    ids = lm.tokenizer(generation.text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(lm.tokenizer, ids)
    if "".join(pieces) != generation.text:
        pieces = [generation.text]
    events += [chunk({"content": piece}, None) for piece in pieces if piece]
    events.append(chunk({}, generation.finish_reason))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(_sse("[DONE]"))
    return events


# --------------------------------------------------------------------------------------------
# The application


class _Service:
    """The endpoints' logic, independent of the web framework."""

    def __init__(self, lm: LocalModel, model_name: str, limits: ServeLimits) -> None:
        self.lm = lm
        self.model_name = model_name
        self.limits = limits
        self.runner = _ModelRunner(lm, limits.max_waiting_requests)
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "bridge"}
        context = _context_length(self.lm)
        if context is not None:
            card["max_model_len"] = context
        return card

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(
                404,
                f"The model '{name}' does not exist. This server serves '{self.model_name}' (GET /v1/models lists it).",
                param="model",
                code="model_not_found",
            )

    def chat(self, body: ChatRequest) -> tuple[dict[str, Any], list[str] | None]:
        """Return the chat completion, and its events when the request streams."""
        import jinja2

        from bridge.prompts import RenderedPrompt, render_text

        body.check_unsupported()
        self.check_model(body.model)
        max_tokens = body.completion_limit(self.limits)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
        rendered = RenderedPrompt(messages=messages, label_conditioned=False, context_tokens_cut=0, example_id=request_id)
        try:
            prompt = render_text(rendered, self.lm.tokenizer)
        except jinja2.TemplateError as exc:
            raise _invalid("messages", f"The model's chat template rejected the messages: {exc}") from None
        prompt_tokens = len(self.lm.encode(prompt))
        _check_context(self.lm, prompt_tokens, max_tokens, "messages")

        started = time.perf_counter()
        [generation] = _generate(self.lm, [prompt], body, max_tokens, 1)
        usage = _usage(prompt_tokens, generation.completion_tokens)
        log.info(
            "%s: %d prompt + %d completion tokens, finish_reason %s, %.2f s",
            request_id, prompt_tokens, generation.completion_tokens, generation.finish_reason, time.perf_counter() - started,
        )
        created = int(time.time())
        response = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": usage,
        }
        if not body.stream:
            return response, None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return response, _chat_stream(self.lm, request_id, created, self.model_name, generation, usage, include_usage)

    def completions(self, body: CompletionRequest) -> dict[str, Any]:
        body.check_unsupported()
        self.check_model(body.model)
        prompts = body.prompts(self.limits)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        _check_max_tokens("max_tokens", max_tokens, self.limits)
        if max_tokens == 0 and not body.echo:
            raise _invalid("max_tokens", "Invalid value for 'max_tokens': 0 is allowed only with echo=true.")
        if body.logprobs is not None and body.logprobs > self.limits.max_logprobs:
            raise _invalid(
                "logprobs", f"Invalid value for 'logprobs': at most {self.limits.max_logprobs}, got {body.logprobs}."
            )
        encoded = [self.lm.encode(p) for p in prompts]
        for index, ids in enumerate(encoded):
            if not ids:
                raise _invalid("prompt", f"Invalid value for 'prompt': prompt {index} is empty.")
            _check_context(self.lm, len(ids), max_tokens, "prompt")

        request_id = f"cmpl-{uuid.uuid4().hex}"
        started = time.perf_counter()
        choices, completion_tokens = self._complete(prompts, encoded, body, max_tokens)
        prompt_tokens = sum(len(ids) for ids in encoded)
        log.info(
            "%s: %d prompt(s), %d prompt + %d completion tokens, %.2f s",
            request_id, len(prompts), prompt_tokens, completion_tokens, time.perf_counter() - started,
        )
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    def _complete(
        self, prompts: list[str], encoded: list[list[int]], body: CompletionRequest, max_tokens: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Generate and score the prompts, and return the choices and the number of completion tokens."""
        from bridge.models.inference import token_logprobs

        lm = self.lm
        generations = _generate(lm, prompts, body, max_tokens, self.limits.batch_size) if max_tokens > 0 else []
        texts = [g.text for g in generations] or [""] * len(prompts)
        scored: list[TokenLogprobs | None] = [None] * len(prompts)
        if body.logprobs is not None:
            # The completion's tokens are those of its text re-tokenised after the prompt.
            # NOTE: in rare cases these differ from the sampled tokens (a non-canonical BPE split).
            rows = [ids + lm.tokenizer(text, add_special_tokens=False)["input_ids"] for ids, text in zip(encoded, texts, strict=True)]
            scored = list(token_logprobs(lm, rows, top_k=body.logprobs, batch_size=self.limits.batch_size))

        choices = []
        for index, prompt in enumerate(prompts):
            text = texts[index]
            logprobs = None
            if scored[index] is not None:
                start = 0 if body.echo else len(encoded[index])
                logprobs = _logprobs_block(lm.tokenizer, scored[index], start)
            choices.append(
                {
                    "index": index,
                    "text": prompt + text if body.echo else text,
                    "logprobs": logprobs,
                    "finish_reason": generations[index].finish_reason if generations else "length",
                }
            )
        return choices, sum(g.completion_tokens for g in generations)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the request body, raising 413 as soon as it exceeds ``limit`` bytes."""

    def too_large(size: str) -> OpenAIError:
        return OpenAIError(
            413,
            f"The request body ({size}) exceeds this server's limit of {limit} bytes.",
            code="request_too_large",
        )

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _invalid(None, f"Invalid Content-Length header {declared!r}.", "invalid_header")
        if int(declared) > limit:
            raise too_large(f"{int(declared)} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(f"more than {limit} bytes")
    return bytes(body)


def create_app(lm: LocalModel, model_name: str, limits: ServeLimits | None = None) -> FastAPI:
    """Build the FastAPI application that serves ``lm`` under ``model_name``."""
    service = _Service(lm, model_name, limits or ServeLimits())
    app = FastAPI(title="bridge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(request: Request, error: OpenAIError) -> JSONResponse:
        level = logging.ERROR if error.status >= 500 else logging.WARNING
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, error.status, error.code, error.message)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = OpenAIError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif exc.status_code == 405:
            error = OpenAIError(405, f"Method {request.method} is not allowed for {request.url.path}.", code="method_not_allowed")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail))
        return error_response(request, error)

    async def run(request: Request, model: type[_Body], handler: Callable[[Any], Any]) -> Any:
        raw = await _read_body(request, service.limits.max_request_bytes)
        try:
            body = model.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise _validation_error(exc) from None
        try:
            # The whole handler runs under the model lock, because tokenizers are not safe to
            # share between threads either.
            return await run_in_threadpool(service.runner.call, handler, body)
        except OpenAIError:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            raise OpenAIError(500, "The server failed to process the request; its log has the details.", type="server_error", code="internal_error") from None

    @app.get("/health", response_model=None)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=None)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        response, events = await run(request, ChatRequest, service.chat)
        if events is None:
            return JSONResponse(response)
        return StreamingResponse(iter(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return JSONResponse(await run(request, CompletionRequest, service.completions))

    return app


# --------------------------------------------------------------------------------------------
# Running


def is_loopback(host: str) -> bool:
    """True when ``host`` is localhost or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Return a listening socket on ``host:port`` (port 0 picks a free port)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"port {port} is out of range", hint="pass --port between 1 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve host {host!r}: {exc}", hint="pass --host 127.0.0.1 or another local address") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pass another --port, or stop the program that uses this one",
        ) from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    display_host = f"[{host}]" if ":" in host else host
    return f"http://{display_host}:{port}/v1"


def _uvicorn_server(app: FastAPI) -> Any:
    import uvicorn

    # log_config=None keeps the process's logging setup, and uvicorn's own loggers propagate to it.
    # The app has no startup or shutdown hooks. With lifespan on, a second Ctrl-C logs a
    # CancelledError traceback from the lifespan task (uvicorn 0.55).
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def _warn_if_public(host: str) -> None:
    if not is_loopback(host):
        log.warning(
            "listening on %s, which is not a loopback address: anyone who can reach it can use the model, "
            "and the server has no authentication",
            host,
        )


def serve(
    model: str | LocalModel,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    limits: ServeLimits | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``model`` (a reference, a run directory or a loaded model) until interrupted.

    ``model_name`` defaults to the reference as given (the loaded model's name for a
    :class:`LocalModel`). ``on_ready`` is called with the base URL (ending in ``/v1``) once
    the server accepts connections.
    """
    from bridge.models.run_models import load_model_or_run

    if isinstance(model, str):
        name = model_name or model.rstrip("/") or model
        lm = load_model_or_run(model)
    else:
        name = model_name or model.name
        lm = model
    _warn_if_public(host)
    sock = _bind(host, port)
    server = _uvicorn_server(create_app(lm, name, limits))
    url = _url(sock)
    log.info("serving %s as %r at %s", lm.name, name, url)
    if on_ready is not None:
        threading.Thread(target=_notify_when_started, args=(server, url, on_ready), daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        log.info("server for %r at %s stopped", name, url)


def _notify_when_started(server: Any, url: str, on_ready: Callable[[str], None]) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready(url)


def start_background_server(
    lm: LocalModel,
    *,
    model_name: str = "local",
    limits: ServeLimits | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    timeout_s: float = 30.0,
) -> tuple[str, Callable[[], None]]:
    """Start a server for ``lm`` in a daemon thread and return its base URL (ending in ``/v1``) and a stop function.

    ``port`` 0 picks a free port. ``stop()`` shuts the server down and waits for its thread.
    """
    _warn_if_public(host)
    sock = _bind(host, port)
    server = _uvicorn_server(create_app(lm, model_name, limits))
    url = _url(sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"bridge-serve-{url}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ServeError(f"the background server at {url} did not start within {timeout_s:g} s")
        time.sleep(0.02)
    log.info("serving %s as %r at %s (background thread)", lm.name, model_name, url)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
        log.info("background server at %s stopped", url)

    return url, stop

