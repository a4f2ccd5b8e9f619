"""Local causal language models: loading, option scoring, embeddings and generation.

Importing this package does not import torch or transformers; the functions do when called.
"""

from bridge.models.inference import (
    Generation,
    GenerationRequest,
    OptionScores,
    OptionScoringError,
    embed,
    encode_sentences,
    generate,
    iter_generate,
    plan_generation_batches,
    prompt_hash,
    score_options,
)
from bridge.models.loading import (
    LocalModel,
    cache_dir,
    derive_layers,
    load_model,
    repair_tokenizer,
    resolve_model,
    save_model,
)

__all__ = [
    "Generation",
    "GenerationRequest",
    "LocalModel",
    "OptionScores",
    "OptionScoringError",
    "cache_dir",
    "derive_layers",
    "embed",
    "encode_sentences",
    "generate",
    "iter_generate",
    "load_model",
    "plan_generation_batches",
    "prompt_hash",
    "repair_tokenizer",
    "resolve_model",
    "save_model",
    "score_options",
]
