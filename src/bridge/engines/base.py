"""Parts shared by the TA inference engines: the tokenizer, prompt encoding and a lazily loaded local copy.

An engine runs the three inference operations of :mod:`bridge.models.inference` (option
scoring, embedding, generation) somewhere other than this process, with the same arguments and
result types. Prompts are still rendered here, with the TA's tokenizer, so prompt hashes and
token counts match the in-process path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bridge.errors import ConfigError
from bridge.models.inference import GenerationRequest

if TYPE_CHECKING:
    import numpy as np

    from bridge.config import ModelRef
    from bridge.models.inference import Generation, LengthNorm, OptionScores
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

# LocalModel attributes that only the weights can provide; reading one loads them in this process.
_LOCAL_ATTRIBUTES = frozenset({"model", "device", "dtype", "eos_token_ids", "end_of_turn_token", "path"})


@dataclass(frozen=True)
class ChatGenerationRequest(GenerationRequest):
    """A generation request that also carries the chat messages its ``prompt`` text was rendered from.

    Engines that talk to a chat endpoint send ``messages``; local engines continue ``prompt``.
    """

    messages: list[dict[str, str]] = field(default_factory=list)


class EngineCapabilityError(ConfigError):
    """The configured engine cannot compute a value that the configuration requires."""


def load_tokenizer(ref: ModelRef) -> Any:
    """Load only the tokenizer of ``ref``: from its folder, its packaged model, or the hub's tokenizer files."""
    from transformers import AutoTokenizer

    from bridge.models.loading import PACKAGED_PREFIX, resolve_model

    source: str | Path = ref.path
    if ref.path.startswith(PACKAGED_PREFIX) or Path(ref.path).expanduser().exists():
        source = resolve_model(ref.path)
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=ref.trust_remote_code)


class InferenceEngine:
    """Base of the engines that run the TA outside this process.

    Subclasses implement :meth:`score_options`, :meth:`embed` and :meth:`generate`. Reading a
    weights attribute (``model``, ``device``, ...) loads the TA in this process once and logs it,
    because fine-tuning and the later stages need the weights here.
    """

    kind: ClassVar[str] = ""

    def __init__(self, ref: ModelRef, *, tokenizer: Any = None) -> None:
        self.ref = ref
        self.name = ref.path
        self._tokenizer = tokenizer
        self._local: LocalModel | None = None

    # Prompt encoding ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The TA's tokenizer: the loaded model's once the weights are here, else one loaded alone."""
        if self._local is not None:
            return self._local.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ref)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Tokenise ``text`` as :meth:`LocalModel.encode` does (no second BOS)."""
        tokenizer = self.tokenizer
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    # Weights in this process ---------------------------------------------------------------

    def local_model(self) -> LocalModel:
        """Load the TA's weights in this process (once) and return them."""
        if self._local is None:
            from bridge.models.loading import load_model

            log.info(
                "loading the TA's weights in this process (%s): the %s engine runs scoring and generation "
                "of the untuned TA only",
                self.ref.path,
                self.kind,
            )
            self._local = load_model(self.ref)
        return self._local

    def __getattr__(self, name: str) -> Any:
        if name in _LOCAL_ATTRIBUTES:
            return getattr(self.local_model(), name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # Operations ----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Return the engine's kind and settings, for logs and stage summaries."""
        return {"engine": self.kind, "model": self.ref.path}

    def supports(self, feature: str) -> bool:
        """Return whether the engine computes ``feature`` (``token_entropy`` or ``hidden_states``)."""
        return True

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
        raise NotImplementedError

    def embed(self, prompts: Sequence[str], *, batch_size: int = 8, progress: bool = True) -> np.ndarray:
        raise NotImplementedError

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
        raise NotImplementedError


def check_unique_ids(requests: Sequence[GenerationRequest]) -> None:
    """Raise ValueError when two requests share an id, as :func:`bridge.models.inference.iter_generate` does."""
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"generation request ids must be unique; repeated: {duplicates}")
