"""TA batch inference spread over Ray workers with Ray Data.

Each call plans its batches here exactly as :mod:`bridge.models.inference` plans them (by
prompt length, longest first), and one Ray Data row carries one batch. A worker runs the same
in-process function on that batch alone, so every row is computed with the same padding and, for
sampled generation, the same batch seed as on one machine: outputs equal the plain path's up to
the floating-point differences between the machines' kernels.

Workers keep the loaded TA in a per-process cache, and Ray reuses worker processes between
tasks (``max_calls=0`` keeps that true for GPU tasks too), so the weights load once per worker
rather than once per call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bridge.engines.base import InferenceEngine, check_unique_ids
from bridge.errors import BridgeError
from bridge.models.inference import (
    Generation,
    GenerationRequest,
    OptionScores,
    plan_generation_batches,
)

if TYPE_CHECKING:
    import numpy as np

    from bridge.config import ModelRef, RayEngineConfig
    from bridge.models.inference import LengthNorm
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

# The TA loaded in this Ray worker process, keyed by its ModelRef as JSON; one model at a time.
_WORKER_MODELS: dict[str, LocalModel] = {}


class RayEngineError(BridgeError):
    """Ray is missing, cannot start, or a Ray Data task failed."""


def _worker_model(ref_json: str) -> LocalModel:
    if ref_json not in _WORKER_MODELS:
        from bridge.config import ModelRef
        from bridge.models.loading import load_model

        _WORKER_MODELS.clear()
        _WORKER_MODELS[ref_json] = load_model(ModelRef.model_validate_json(ref_json))
    return _WORKER_MODELS[ref_json]


def _run_units(batch: dict[str, Any], ref_json: str, operation: str, shared: Any) -> dict[str, Any]:
    """Ray Data task: run ``operation`` on each batch of the TA's work in ``batch`` and return JSON results."""
    import numpy as np

    from bridge.models import inference

    lm = _worker_model(ref_json)
    results = []
    for payload in batch["payload"]:
        unit = json.loads(payload)
        if operation == "score":
            scores = inference.score_options(
                lm,
                unit["prompts"],
                unit["continuations"],
                length_norm=unit["length_norm"],
                batch_size=len(unit["prompts"]),
                progress=False,
                with_embeddings=unit["with_embeddings"],
            )
            results.append(json.dumps([_scores_to_json(s) for s in scores]))
        elif operation == "embed":
            vectors = inference.embed(lm, unit["prompts"], batch_size=len(unit["prompts"]), progress=False)
            results.append(json.dumps(vectors.tolist()))
        elif operation == "generate":
            import ray

            pairs = ray.get(shared) if isinstance(shared, ray.ObjectRef) else shared
            requests = [GenerationRequest(id=i, prompt=p) for i, p in pairs]
            requested_ids = set(unit["ids"])
            outputs = inference.generate(
                lm,
                requests,
                skip_ids={r.id for r in requests if r.id not in requested_ids},
                progress=False,
                **unit["sampling"],
            )
            results.append(json.dumps([asdict(g) for g in outputs]))
        else:
            raise ValueError(f"unknown operation {operation!r}")
    return {"unit": np.asarray(batch["unit"]), "result": np.asarray(results, dtype=object)}


def _scores_to_json(scores: OptionScores) -> dict[str, Any]:
    raw = asdict(scores)
    if scores.embedding is not None:
        raw["embedding"] = scores.embedding.tolist()
    return raw


def _scores_from_json(raw: dict[str, Any]) -> OptionScores:
    import numpy as np

    if raw.get("embedding") is not None:
        raw = {**raw, "embedding": np.asarray(raw["embedding"], dtype=np.float32)}
    return OptionScores(**raw)


class RayEngine(InferenceEngine):
    """Run the TA's option scoring, embedding and generation as Ray Data tasks, one batch per row."""

    kind = "ray"

    def __init__(self, ref: ModelRef, config: RayEngineConfig, *, tokenizer: Any = None) -> None:
        super().__init__(ref, tokenizer=tokenizer)
        self.config = config
        self._ref_json = ref.model_dump_json()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.kind,
            "model": self.ref.path,
            "address": self.config.address,
            "workers": self.config.workers,
            "cpus_per_worker": self.config.cpus_per_worker,
            "gpus_per_worker": self.config.gpus_per_worker,
        }

    def _ray(self) -> Any:
        """Return the ray module, connecting to the configured cluster or starting a local one on loopback."""
        try:
            import ray
            import ray.data
        except ImportError:
            raise RayEngineError(
                "models.ta_engine is ray, but Ray Data is not installed",
                hint="pip install 'bridge-distill[ray]' (or pip install 'ray[data]'), or set models.ta_engine=transformers",
            ) from None
        if not ray.is_initialized():
            if self.config.address:
                log.info("joining the Ray cluster at %s", self.config.address)
                ray.init(address=self.config.address, include_dashboard=False)
            else:
                log.info("starting a local Ray on 127.0.0.1")
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
        return ray

    def _run(self, operation: str, units: list[dict[str, Any]], *, shared: Any = None, progress: bool) -> list[Any]:
        """Run one Ray Data task per unit and return the decoded results in unit order."""
        ray = self._ray()
        if not units:
            return []
        ray.data.DataContext.get_current().enable_progress_bars = progress
        items = [{"unit": number, "payload": json.dumps(unit)} for number, unit in enumerate(units)]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _run_units,
            batch_size=1,
            fn_kwargs={"ref_json": self._ref_json, "operation": operation, "shared": shared},
            compute=ray.data.TaskPoolStrategy(size=self.config.workers),
            num_cpus=self.config.cpus_per_worker,
            num_gpus=self.config.gpus_per_worker or None,
            max_calls=0,
        )
        try:
            rows = dataset.take_all()
        except Exception as exc:  # Ray wraps worker failures in its own exception types
            raise RayEngineError(
                f"a Ray Data {operation} task failed: {type(exc).__name__}: {exc}",
                hint="the worker's traceback is above and in the Ray session logs (/tmp/ray/session_latest/logs)",
            ) from exc
        rows.sort(key=lambda row: int(row["unit"]))
        return [json.loads(row["result"]) for row in rows]

    def _plan(self, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
        """Return prompt indices in the batches the in-process functions form (longest prompt first)."""
        requests = [GenerationRequest(id=str(i), prompt=p) for i, p in enumerate(prompts)]
        return plan_generation_batches(self, requests, batch_size)  # type: ignore[arg-type]

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
        """Score options as :func:`bridge.models.inference.score_options` does, one Ray task per batch."""
        if len(prompts) != len(continuations):
            raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} option lists")
        batches = self._plan(prompts, batch_size)
        units = [
            {
                "prompts": [prompts[i] for i in batch],
                "continuations": [list(continuations[i]) for i in batch],
                "length_norm": length_norm,
                "with_embeddings": with_embeddings,
            }
            for batch in batches
        ]
        results: list[OptionScores | None] = [None] * len(prompts)
        for batch, scores in zip(batches, self._run("score", units, progress=progress), strict=True):
            for i, raw in zip(batch, scores, strict=True):
                results[i] = _scores_from_json(raw)
        return [r for r in results if r is not None]

    def embed(self, prompts: Sequence[str], *, batch_size: int = 8, progress: bool = True) -> np.ndarray:
        """Embed prompts as :func:`bridge.models.inference.embed` does, one Ray task per batch."""
        import numpy as np

        if not prompts:
            from transformers import AutoConfig

            from bridge.models.loading import resolve_model

            config = AutoConfig.from_pretrained(resolve_model(self.ref.path), trust_remote_code=self.ref.trust_remote_code)
            return np.zeros((0, config.hidden_size), dtype=np.float32)
        batches = self._plan(prompts, batch_size)
        units = [{"prompts": [prompts[i] for i in batch]} for batch in batches]
        rows: list[Any] = [None] * len(prompts)
        for batch, vectors in zip(batches, self._run("embed", units, progress=progress), strict=True):
            for i, vector in zip(batch, vectors, strict=True):
                rows[i] = vector
        return np.asarray(rows, dtype=np.float32)

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
        """Generate as :func:`bridge.models.inference.generate` does, one Ray task per batch.

        Every task reads the whole request list from the Ray object store and skips the other
        batches, so batch numbers, and with them the sampling seeds, match the plain path.
        ``on_batch`` is called with each finished batch after all of them are done.
        """
        check_unique_ids(requests)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature}")
        skipped = set(skip_ids)
        batches = plan_generation_batches(self, requests, batch_size)  # type: ignore[arg-type]
        units = []
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": list(stop),
            "batch_size": batch_size,
        }
        for batch in batches:
            ids = [requests[i].id for i in batch if requests[i].id not in skipped]
            if ids:
                units.append({"ids": ids, "sampling": sampling})
        ray = self._ray()
        shared = ray.put([(r.id, r.prompt) for r in requests])
        by_id: dict[str, Generation] = {}
        for outputs in self._run("generate", units, shared=shared, progress=progress):
            generations = [Generation(**raw) for raw in outputs]
            if on_batch is not None:
                on_batch(generations)
            by_id.update((g.id, g) for g in generations)
        return [by_id[r.id] for r in requests if r.id in by_id]
