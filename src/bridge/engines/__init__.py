"""TA inference engines: the same scoring, embedding and generation in this process, on servers, or on Ray.

``models.ta_engine`` chooses the engine:

* ``transformers`` (default): :class:`~bridge.models.loading.LocalModel` and the functions of
  :mod:`bridge.models.inference`, in this process.
* ``openai_server``: :class:`~bridge.engines.server.ServerEngine`, over OpenAI-compatible servers.
* ``ray``: :class:`~bridge.engines.ray_engine.RayEngine`, over Ray Data workers.

The functions here take either a ``LocalModel`` or an engine, so callers such as the selection
stage run unchanged on all three. Importing this package does not import torch, openai or ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from bridge.engines.base import (
    ChatGenerationRequest,
    EngineCapabilityError,
    InferenceEngine,
    load_tokenizer,
)

if TYPE_CHECKING:
    import numpy as np

    from bridge.config import ModelsConfig
    from bridge.models.inference import Generation, GenerationRequest, LengthNorm, OptionScores

log = logging.getLogger(__name__)

__all__ = [
    "ChatGenerationRequest",
    "EngineCapabilityError",
    "InferenceEngine",
    "describe",
    "embed",
    "generate",
    "load_engine",
    "load_tokenizer",
    "require",
    "score_options",
    "supports",
]

#: Per feature: the setting that needs it and the settings that avoid it, for capability errors.
_FEATURE_FIXES = {
    "token_entropy": (
        "selection.difficulty=token_entropy needs the full next-token distribution at every generated token",
        "use selection.difficulty=answer_entropy (sampled answers), or models.ta_engine=transformers or ray",
    ),
    "hidden_states": (
        "selection.embedding=ta_hidden needs the TA's last hidden states",
        "set selection.embedding=encoder (the sentence encoder runs in this process), or models.ta_engine=transformers or ray",
    ),
}


def load_engine(models: ModelsConfig) -> Any:
    """Return the untuned TA for ``models.ta_engine``: a loaded ``LocalModel``, or an engine object.

    The choice and its settings are logged, so a run's log states where the TA ran.
    """
    kind = models.ta_engine
    if kind == "transformers":
        from bridge.models.loading import load_model

        log.info("TA engine: transformers in this process (%s)", models.ta.path)
        return load_model(models.ta)
    if kind == "openai_server":
        from bridge.engines.server import ServerEngine

        engine: InferenceEngine = ServerEngine(models.ta, models.ta_server)
    elif kind == "ray":
        from bridge.engines.ray_engine import RayEngine

        engine = RayEngine(models.ta, models.ta_ray)
    else:
        raise ValueError(f"unknown TA engine {kind!r}")
    log.info("TA engine: %s", engine.describe())
    return engine


def describe(target: Any) -> dict[str, Any]:
    """Return the engine's kind and settings; a ``LocalModel`` is the transformers engine."""
    if isinstance(target, InferenceEngine):
        return target.describe()
    return {"engine": "transformers", "model": str(getattr(target, "name", ""))}


def supports(target: Any, feature: str) -> bool:
    """Return whether ``target`` computes ``feature`` (``token_entropy`` or ``hidden_states``)."""
    return not isinstance(target, InferenceEngine) or target.supports(feature)


def require(target: Any, feature: str) -> None:
    """Raise :class:`EngineCapabilityError` when ``target`` cannot compute ``feature``.

    ``feature`` is ``token_entropy`` or ``hidden_states``; a ``LocalModel`` computes both.
    """
    if not supports(target, feature):
        need, fix = _FEATURE_FIXES[feature]
        raise EngineCapabilityError(f"the {target.kind} TA engine cannot run this configuration: {need}", hint=fix)


def score_options(
    target: Any,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    length_norm: LengthNorm = "mean",
    batch_size: int = 8,
    progress: bool = True,
    with_embeddings: bool = False,
) -> list[OptionScores]:
    """Run :func:`bridge.models.inference.score_options` on a ``LocalModel`` or the engine's equivalent."""
    options: dict[str, Any] = {
        "length_norm": length_norm,
        "batch_size": batch_size,
        "progress": progress,
        "with_embeddings": with_embeddings,
    }
    if isinstance(target, InferenceEngine):
        return target.score_options(prompts, continuations, **options)
    from bridge.models import inference

    return inference.score_options(target, prompts, continuations, **options)


def embed(target: Any, prompts: Sequence[str], *, batch_size: int = 8, progress: bool = True) -> np.ndarray:
    """Run :func:`bridge.models.inference.embed` on a ``LocalModel`` or the engine's equivalent."""
    if isinstance(target, InferenceEngine):
        return target.embed(prompts, batch_size=batch_size, progress=progress)
    from bridge.models import inference

    return inference.embed(target, prompts, batch_size=batch_size, progress=progress)


def generate(
    target: Any,
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
    """Run :func:`bridge.models.inference.generate` on a ``LocalModel`` or the engine's equivalent."""
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop,
        "batch_size": batch_size,
        "skip_ids": skip_ids,
        "on_batch": on_batch,
        "progress": progress,
    }
    if isinstance(target, InferenceEngine):
        return target.generate(requests, **options)
    from bridge.models import inference

    return inference.generate(target, requests, **options)
