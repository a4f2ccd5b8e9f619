"""Shared test setup: offline hub access, the data directory and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A hub lookup without these fails only after about a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
if "BRIDGE_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
    os.environ["BRIDGE_DATA_DIR"] = str(_SHARED_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder with the real data sets; tests that need it fail, not skip, without it."""
    raw = os.environ.get("BRIDGE_DATA_DIR")
    if not raw or not Path(raw).is_dir():
        pytest.fail("real data sets not found: export BRIDGE_DATA_DIR=/path/to/shared/data")
    return Path(raw)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with SmolLM2's special tokens and chat template."""
    from tiny_models import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny 2-layer Llama saved as a Hugging Face folder."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model", arch="llama")
