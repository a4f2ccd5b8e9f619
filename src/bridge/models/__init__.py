"""Local causal language models: loading, option scoring, embeddings and generation.

Importing this package does not import torch or transformers; the functions do when called.
"""

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
    "LocalModel",
    "cache_dir",
    "derive_layers",
    "load_model",
    "repair_tokenizer",
    "resolve_model",
    "save_model",
]
