"""Content keys for teacher responses and the rule for reusing a stored one.

A response is stored in the ledger's ``responses`` table in the same transaction that records
its attempt as paid, so every response the teacher was paid for can be reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def cache_key(
    *,
    example_id: str,
    messages: Sequence[Mapping[str, str]],
    backend: str,
    model: str,
    sampling: Mapping[str, Any],
) -> str:
    """Return the content key of a request.

    The key covers the example id, the rendered messages, the backend kind, the model and the
    sampling parameters. ``max_tokens`` is left out on purpose: whether a stored response fits a
    new ``max_tokens`` is decided by :func:`is_reusable`.
    """
    if "max_tokens" in sampling:
        raise ValueError("max_tokens must not be part of the cache key")
    payload = {
        "example_id": example_id,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "backend": backend,
        "model": model,
        "sampling": dict(sampling),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    """A response the ledger holds for a cache key."""

    cache_key: str
    attempt_id: int
    text: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    #: The max_tokens of the request that produced the response.
    max_tokens: int
    cost_picousd: int


def is_reusable(stored: StoredResponse, max_tokens: int) -> bool:
    """Return True when a new request with ``max_tokens`` would get nothing better than ``stored``.

    A response that ended by stop is reused when the new ``max_tokens`` is at least its
    completion length, because the new limit would not have cut it; when the endpoint reported
    no length, the limit it was produced under is used instead. A stop-ended response longer
    than its own limit (the reference backend ignores the limit) is reused under any limit at
    least that one. A response cut by length is reused (as the same failure) only when the new
    limit is no larger than the one that cut it.
    """
    if stored.finish_reason == "stop":
        length = stored.completion_tokens if stored.completion_tokens is not None else stored.max_tokens
        return max_tokens >= min(length, stored.max_tokens)
    if stored.finish_reason == "length":
        return max_tokens <= stored.max_tokens
    return False
