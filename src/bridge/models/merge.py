"""Merge a LoRA adapter into its base model and verify the merged Hugging Face folder.

The merge runs in float32 on the CPU. It is accepted only when the merged weights differ from
the base (an untrained adapter, whose B matrices are zero, changes nothing) and the saved,
reloaded merged model's logits match the adapter model's within :data:`LOGIT_TOLERANCE`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError
from bridge.models.loading import require_safetensors
from bridge.rundir import atomic_write_json, ensure_dir

if TYPE_CHECKING:
    from bridge.config import ModelRef
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

#: Maximum absolute logit difference between the merged model and the adapter model (float32).
LOGIT_TOLERANCE = 1e-4
#: Written into the merged folder: the adapter, the base and the verification results.
MERGE_FILE = "bridge_merge.json"

_VERIFY_MESSAGES = [
    {"role": "system", "content": "Answer the question with yes, no or maybe."},
    {"role": "user", "content": "Question: Does regular aspirin use reduce the risk of a second heart attack?"},
]


class MergeError(BridgeError):
    """The adapter could not be merged, or the merged model failed verification."""


def merge_adapter(
    adapter_dir: Path,
    out_dir: Path,
    *,
    base: LocalModel | ModelRef | str | Path | None = None,
) -> Path:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and write ``out_dir``.

    The base is ``base`` when given, else the one recorded by :func:`bridge.models.training.train_sft`
    in ``bridge_base.json``, else the adapter's ``base_model_name_or_path``. ``out_dir`` gets
    safetensors weights, the tokenizer and ``bridge_merge.json``; it is written through a staging
    folder, so it appears only when verification has passed. Raises :class:`MergeError`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir)
    _check_adapter_folder(adapter_dir)
    _check_output_folder(out_dir)

    lm = _load_base(adapter_dir, base)
    model = lm.model
    tokenizer = _adapter_tokenizer(adapter_dir) or lm.tokenizer
    base_weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    input_ids = _verification_ids(tokenizer)

    require_safetensors(adapter_dir, "adapter")
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5.25 deprecates.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            adapted = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise MergeError(
            f"cannot apply the adapter in {adapter_dir} to base {lm.name!r}: {type(exc).__name__}: {exc}",
            hint="pass the base the adapter was trained on (--base), such as the derived student's reference",
        ) from None
    adapted.eval()
    with torch.no_grad():
        adapter_logits = adapted(input_ids=input_ids).logits.float()

    merged = adapted.merge_and_unload()
    merged.eval()
    merged_weights = merged.state_dict()
    changed = [
        name
        for name, weight in merged_weights.items()
        if name in base_weights and not torch.equal(weight, base_weights[name])
    ]
    if not changed:
        raise MergeError(
            f"merging {adapter_dir} left every weight of base {lm.name!r} unchanged",
            hint="the adapter has no effect (its LoRA B matrices are zero): train it before merging",
        )

    ensure_dir(out_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, use_safetensors=True)
        reloaded.eval()
        with torch.no_grad():
            merged_logits = reloaded(input_ids=input_ids).logits.float()
        max_diff = float((merged_logits - adapter_logits).abs().max())
        if not max_diff <= LOGIT_TOLERANCE:
            raise MergeError(
                f"the merged model's logits differ from the adapter model's by up to {max_diff:.3g} "
                f"(tolerance {LOGIT_TOLERANCE}) for adapter {adapter_dir}",
                hint="check that the base is the model the adapter was trained on (--base); nothing was written",
            )
        report = {
            "adapter": str(adapter_dir.resolve()),
            "base": lm.name,
            "changed_tensors": len(changed),
            "max_logit_diff": max_diff,
            "tolerance": LOGIT_TOLERANCE,
            "verification_tokens": int(input_ids.shape[1]),
        }
        atomic_write_json(staging / MERGE_FILE, report)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "merged %s into %s: %d tensors changed, maximum logit difference %.2g; written to %s",
        adapter_dir,
        lm.name,
        len(changed),
        max_diff,
        out_dir,
    )
    return out_dir


def _check_adapter_folder(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(
            f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)",
            hint="pass the 'adapter' folder that fine-tuning with method lora wrote",
        )
    if not any(adapter_dir.glob("adapter_model*.safetensors")):
        raise MergeError(
            f"{adapter_dir} has no adapter_model.safetensors",
            hint="pass the 'adapter' folder that fine-tuning with method lora wrote",
        )


def _check_output_folder(out_dir: Path) -> None:
    """Raise when ``out_dir`` is a file, or a non-empty folder that an earlier merge did not write."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MERGE_FILE).is_file())):
        raise MergeError(
            f"output folder {out_dir} already exists and was not written by bridge merge",
            hint="choose a new output folder, or delete it first",
        )


def _load_base(adapter_dir: Path, base: Any) -> Any:
    """Load the base model in float32 on the CPU, where the logit check is exact enough."""
    from bridge.config import ModelRef
    from bridge.models.loading import load_model
    from bridge.models.training import BASE_FILE

    recorded: dict[str, Any] = {}
    if (adapter_dir / BASE_FILE).is_file():
        recorded = json.loads((adapter_dir / BASE_FILE).read_text(encoding="utf-8"))
    if base is not None and not isinstance(base, str | Path | ModelRef):
        return base
    if isinstance(base, ModelRef):
        ref = base.model_copy(update={"dtype": "float32", "device": "cpu"})
    elif base is not None:
        ref = ModelRef(path=str(base), dtype="float32", device="cpu")
    else:
        path = recorded.get("path") or _adapter_base_path(adapter_dir)
        ref = ModelRef(path=path, keep_layers=recorded.get("keep_layers"), dtype="float32", device="cpu")
    lm = load_model(ref, padding_side="right")
    layers = int(getattr(lm.model.config, "num_hidden_layers", 0) or 0)
    expected = recorded.get("num_hidden_layers")
    if base is None and expected and layers != expected:
        raise MergeError(
            f"the adapter in {adapter_dir} was trained on a {expected}-layer model, but its base {ref.path!r} "
            f"loads with {layers} layers",
            hint="pass the derived model the adapter was trained on with --base",
        )
    return lm


def _adapter_base_path(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    path = config.get("base_model_name_or_path")
    if not path:
        raise MergeError(
            f"the adapter in {adapter_dir} does not name its base model",
            hint="pass the base model with --base",
        )
    return str(path)


def _adapter_tokenizer(adapter_dir: Path) -> Any:
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from bridge.models.loading import repair_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    repair_tokenizer(tokenizer)
    return tokenizer


def _verification_ids(tokenizer: Any) -> Any:
    import torch

    from bridge.models.training import encode_text

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(_VERIFY_MESSAGES, add_generation_prompt=True, tokenize=False)
        text += "Answer: yes. The trial found fewer second heart attacks with aspirin."
    else:
        text = " ".join(message["content"] for message in _VERIFY_MESSAGES)
    return torch.tensor([encode_text(tokenizer, text)])
