"""TA inference through OpenAI-compatible servers (vLLM, SGLang, llama.cpp, ``bridge serve``).

* Generation: ``POST /chat/completions`` with the request's chat messages (or ``/completions``
  with the rendered text when a request carries no messages).
* Option scoring: ``POST /completions`` with ``echo=true`` and ``logprobs=1``, one prompt per
  option (``prompt + option``). The server returns the log-probability of every prompt token, and
  the option's tokens are the last ones, counted with the local tokenizer exactly as
  :func:`bridge.models.inference.option_token_ids` counts them. ``max_tokens`` is 1 because some
  servers reject 0; the generated token is ignored.
* Embedding: not offered, because chat servers do not return hidden states.

Requests go to several endpoints at once: each endpoint takes up to ``concurrency`` requests,
and a free slot on any endpoint takes the next request, so faster servers take more work.
Results come back in input order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm.auto import tqdm

from bridge.engines.base import (
    ChatGenerationRequest,
    EngineCapabilityError,
    InferenceEngine,
    check_unique_ids,
)
from bridge.errors import BridgeError, ConfigError
from bridge.models.inference import Generation, GenerationRequest, OptionScoringError, prompt_hash

if TYPE_CHECKING:
    import numpy as np

    from bridge.config import ModelRef, ServerEngineConfig
    from bridge.models.inference import LengthNorm, OptionScores

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Hint of every error about a server that returns no prompt log-probabilities.
NO_LOGPROBS_HINT = (
    "use a server whose /v1/completions returns prompt log-probabilities with echo=true (vLLM and bridge serve do), "
    "or score by generation with selection.difficulty=answer_entropy, or set models.ta_engine=transformers"
)


class ServerEngineError(BridgeError):
    """A TA server failed a request, could not be reached, or sent a response that cannot be used."""


@dataclass
class _Endpoint:
    url: str
    client: Any
    requests: int = 0  # requests sent, for logs and load-spread checks


def _request_seed(seed: int, request_id: str) -> int:
    """Return a per-request sampling seed, so a request samples the same text on any endpoint."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def public_url(url: str) -> str:
    """Return ``url`` without user name and password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ServerEngine(InferenceEngine):
    """Run the TA's option scoring and generation on OpenAI-compatible servers."""

    kind = "openai_server"

    def __init__(self, ref: ModelRef, config: ServerEngineConfig, *, tokenizer: Any = None) -> None:
        import openai

        super().__init__(ref, tokenizer=tokenizer)
        if not config.endpoints:
            raise ConfigError(
                "models.ta_server.endpoints is empty",
                hint="list the servers' base URLs, such as [http://127.0.0.1:8000/v1]",
            )
        self.config = config
        api_key = "none"
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env, "")
            if not api_key:
                raise ConfigError(
                    f"models.ta_server.api_key_env names {config.api_key_env}, which is unset or empty",
                    hint=f"export {config.api_key_env}=<key>, or unset api_key_env for servers without keys",
                )
        self._openai = openai
        self.endpoints = [
            _Endpoint(
                url=url.rstrip("/"),
                client=openai.OpenAI(
                    base_url=url.rstrip("/"),
                    api_key=api_key,
                    max_retries=config.max_retries,
                    timeout=openai.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
                ),
            )
            for url in config.endpoints
        ]
        self._served_model: str | None = config.model

    # Settings ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.kind,
            "model": self.ref.path,
            "served_model": self._served_model,
            "endpoints": [public_url(e.url) for e in self.endpoints],
            "concurrency": self.config.concurrency,
        }

    def supports(self, feature: str) -> bool:
        # Chat servers return top-k log-probabilities at most, never hidden states or the full
        # next-token distribution that token entropy needs.
        return feature not in ("token_entropy", "hidden_states")

    def served_model(self) -> str:
        """Return the model name to request: configured, or the first one the first endpoint lists."""
        if self._served_model is None:
            endpoint = self.endpoints[0]
            models = self._call(endpoint, lambda: endpoint.client.models.list())
            ids = [m.id for m in models.data]
            if not ids:
                raise ServerEngineError(
                    f"the server at {public_url(endpoint.url)} lists no model at GET /models",
                    hint="set models.ta_server.model to the name the server serves",
                )
            self._served_model = ids[0]
            log.info("TA servers: requesting model %r (listed first by %s)", ids[0], public_url(endpoint.url))
        return self._served_model

    # Transport -----------------------------------------------------------------------------

    def _call(self, endpoint: _Endpoint, send: Callable[[], T], *, scoring: bool = False) -> T:
        """Send one request, turning the client's exceptions into :class:`ServerEngineError`.

        With ``scoring``, a 400 status (a server that rejects ``echo`` or ``logprobs``) raises
        :class:`EngineCapabilityError` with the options to use instead.
        """
        openai = self._openai
        url = public_url(endpoint.url)
        try:
            return send()
        except openai.APITimeoutError:
            raise ServerEngineError(
                f"a request to the TA server at {url} timed out after {self.config.timeout_s:g} s "
                f"and {self.config.max_retries} retries",
                hint="raise models.ta_server.timeout_s, or lower models.ta_server.concurrency",
            ) from None
        except openai.APIConnectionError as exc:
            raise ServerEngineError(
                f"cannot connect to the TA server at {url}: {exc.__cause__ or exc}",
                hint="start the server, or remove it from models.ta_server.endpoints",
            ) from None
        except openai.APIStatusError as exc:
            if scoring and exc.status_code == 400:
                raise EngineCapabilityError(
                    f"the TA server at {url} rejected a prompt log-probability request (echo=true, logprobs=1): "
                    f"{_error_message(exc)}",
                    hint=NO_LOGPROBS_HINT,
                ) from None
            raise ServerEngineError(
                f"the TA server at {url} returned HTTP {exc.status_code}: {_error_message(exc)}",
                hint="check models.ta_server.model and the server's log",
            ) from None

    def _map(self, jobs: Sequence[Callable[[_Endpoint], T]], *, desc: str, progress: bool) -> Iterator[list[T]]:
        """Run ``jobs`` over the endpoints' slots and yield their results in input order, a window at a time."""
        slots: queue.Queue[_Endpoint] = queue.Queue()
        for endpoint in self.endpoints:
            for _ in range(self.config.concurrency):
                slots.put(endpoint)
        width = slots.qsize()
        counter_lock = threading.Lock()

        def run(job: Callable[[_Endpoint], T]) -> T:
            endpoint = slots.get()
            try:
                with counter_lock:
                    endpoint.requests += 1
                return job(endpoint)
            finally:
                slots.put(endpoint)

        bar = tqdm(total=len(jobs), desc=desc, unit="request", disable=not progress, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="ta-server") as pool:
            for start in range(0, len(jobs), 2 * width):
                window = [pool.submit(run, job) for job in jobs[start : start + 2 * width]]
                results = [future.result() for future in window]
                bar.update(len(results))
                yield results
        bar.close()
        log.debug("TA server requests so far: %s", self.request_counts())

    def request_counts(self) -> dict[str, int]:
        """Return the number of requests sent to each endpoint so far."""
        return {public_url(e.url): e.requests for e in self.endpoints}

    # Option scoring ------------------------------------------------------------------------

    def score_options(
        self,
        prompts: Sequence[str],
        continuations: Sequence[Sequence[str]],
        *,
        length_norm: LengthNorm = "mean",
        batch_size: int = 8,
        progress: bool = True,
        with_embeddings: bool = False,
    ) -> list[OptionScores]:
        """Score each prompt's options from the servers' prompt log-probabilities; see the module docstring.

        ``batch_size`` is unused: each prompt is one request, and the servers batch as they like.
        ``with_embeddings`` raises :class:`EngineCapabilityError`, because servers return no hidden states.
        """
        # _option_scores turns summed log-probabilities into OptionScores exactly as in-process scoring does.
        from bridge.models.inference import _option_scores, option_token_ids

        if with_embeddings:
            self.embed(prompts)

        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} option lists")
        if length_norm not in ("mean", "sum"):
            raise ValueError(f"length_norm must be 'mean' or 'sum', not {length_norm!r}")
        model = self.served_model()
        jobs = []
        for prompt, options in zip(prompts, continuations, strict=True):
            if not options:
                raise OptionScoringError(
                    f"no options given for the prompt ending {prompt[-40:]!r}", hint="pass at least one option per prompt"
                )
            prompt_ids, option_ids = option_token_ids(self, prompt, options)  # type: ignore[arg-type]
            jobs.append(self._scoring_job(model, prompt, list(options), len(prompt_ids), [len(ids) for ids in option_ids]))

        raw = [item for window in self._map(jobs, desc="scoring options (server)", progress=progress) for item in window]
        return [
            _option_scores(sums, counts, length_norm, prompt_hash(prompt))
            for prompt, (sums, counts) in zip(prompts, raw, strict=True)
        ]

    def _scoring_job(
        self, model: str, prompt: str, options: list[str], prompt_tokens: int, counts: list[int]
    ) -> Callable[[_Endpoint], tuple[list[float], list[int]]]:
        def job(endpoint: _Endpoint) -> tuple[list[float], list[int]]:
            texts = [prompt + option for option in options]
            response = self._call(
                endpoint,
                lambda: endpoint.client.completions.create(
                    model=model, prompt=texts, max_tokens=1, echo=True, logprobs=1, temperature=0.0
                ),
                scoring=True,
            )
            choices = sorted(response.choices, key=lambda c: c.index)
            if len(choices) != len(texts):
                raise ServerEngineError(
                    f"the TA server at {public_url(endpoint.url)} returned {len(choices)} choices for {len(texts)} prompts",
                    hint="use a server that returns one choice per prompt of a list (vLLM and bridge serve do)",
                )
            sums = [
                self._option_logprob(endpoint, choice, prompt, option, prompt_tokens + count, count)
                for choice, option, count in zip(choices, options, counts, strict=True)
            ]
            return sums, counts

        return job

    def _option_logprob(
        self, endpoint: _Endpoint, choice: Any, prompt: str, option: str, total: int, count: int
    ) -> float:
        """Sum the log-probabilities of the ``count`` option tokens that end the ``total`` prompt tokens."""
        url = public_url(endpoint.url)

        logprobs = getattr(choice, "logprobs", None)
        values = getattr(logprobs, "token_logprobs", None) if logprobs is not None else None
        if not values:
            raise EngineCapabilityError(
                f"the TA server at {url} returned no prompt log-probabilities for echo=true and logprobs=1, "
                "so it cannot score options",
                hint=NO_LOGPROBS_HINT,
            )

        offsets = getattr(logprobs, "text_offset", None)
        boundary_ok = len(values) >= total
        if boundary_ok and offsets and len(offsets) >= total:
            # The option's first token must start where the option's text starts, and the
            # prompt's tokens must end where the option's text ends.
            boundary_ok = offsets[total - count] == len(prompt) and (
                len(offsets) == total or offsets[total] >= len(prompt) + len(option)
            )
        if not boundary_ok:
            raise OptionScoringError(
                f"the TA server at {url} tokenises prompt + option {option!r} differently from the local "
                f"tokenizer of {self.ref.path} (expected {total} prompt tokens, got {len(values)})",
                hint="serve the same model as models.ta.path; a server that adds its own BOS token to text prompts "
                "cannot score options against this tokenizer",
            )

        picked = values[total - count : total]
        if any(value is None or not math.isfinite(value) for value in picked):
            raise EngineCapabilityError(
                f"the TA server at {url} returned a missing or non-finite log-probability for option {option!r}",
                hint=NO_LOGPROBS_HINT,
            )
        return float(sum(picked))

    # Embedding -----------------------------------------------------------------------------

    def embed(self, prompts: Sequence[str], *, batch_size: int = 8, progress: bool = True) -> np.ndarray:
        raise EngineCapabilityError(
            "the openai_server engine cannot embed prompts with the TA's hidden states: OpenAI-compatible chat "
            "servers do not return them",
            hint="set selection.embedding=encoder (the sentence encoder runs in this process), "
            "or models.ta_engine=transformers or ray",
        )

    # Generation ----------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int = 8,
        skip_ids: Collection[str] = (),
        on_batch: Callable[[list[Generation]], None] | None = None,
        progress: bool = True,
    ) -> list[Generation]:
        """Generate a completion per request on the servers and return them in input order.

        A :class:`ChatGenerationRequest` goes to ``/chat/completions`` with its messages, any
        other request to ``/completions`` with its prompt text. ``mean_entropy`` is NaN, because
        the servers do not return the full next-token distribution. Each request samples with
        its own seed derived from ``seed`` and its id. ``batch_size`` is unused.
        """
        check_unique_ids(requests)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")
        model = self.served_model()
        skipped = set(skip_ids)
        pending = [r for r in requests if r.id not in skipped]
        sampling = {
            "model": model,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": list(stop) or None,
        }
        jobs = [self._generation_job(request, sampling, _request_seed(seed, request.id)) for request in pending]
        by_id: dict[str, Generation] = {}
        for window in self._map(jobs, desc="generating (server)", progress=progress):
            if on_batch is not None:
                on_batch(window)
            by_id.update((g.id, g) for g in window)
        return [by_id[r.id] for r in requests if r.id in by_id]

    def _generation_job(
        self, request: GenerationRequest, sampling: dict[str, Any], seed: int
    ) -> Callable[[_Endpoint], Generation]:
        from bridge.prompts import control_tokens, defuse_control_tokens

        messages = getattr(request, "messages", None) if isinstance(request, ChatGenerationRequest) else None
        if messages:
            specials = control_tokens(self.tokenizer)
            messages = [{"role": m["role"], "content": defuse_control_tokens(m["content"], specials)} for m in messages]

        def job(endpoint: _Endpoint) -> Generation:
            client = endpoint.client
            if messages:
                response = self._call(
                    endpoint, lambda: client.chat.completions.create(messages=messages, seed=seed, **sampling)
                )
                choice = response.choices[0]
                text = choice.message.content or ""
            else:
                response = self._call(
                    endpoint, lambda: client.completions.create(prompt=request.prompt, seed=seed, **sampling)
                )
                choice = response.choices[0]
                text = choice.text or ""
            usage = getattr(response, "usage", None)
            tokens = usage.completion_tokens if usage is not None and usage.completion_tokens is not None else None
            if tokens is None:
                tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return Generation(
                id=request.id,
                prompt_hash=prompt_hash(request.prompt),
                text=text,
                completion_tokens=int(tokens),
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                mean_entropy=float("nan"),
            )

        return job


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    return str(exc)[:500]
