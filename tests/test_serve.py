"""The OpenAI-compatible server on a tiny in-process model, called with the official openai client."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

from bridge import cli
from bridge.config import BridgeConfig, ModelRef, dump_config
from bridge.errors import ModelLoadError
from bridge.models.inference import GenerationRequest, generate
from bridge.models.loading import load_model
from bridge.models.run_models import load_model_or_run
from bridge.prompts import RenderedPrompt, render_text
from bridge.serve import (
    DEFAULT_HOST,
    OpenAIError,
    ServeError,
    ServeLimits,
    _ModelRunner,
    _warn_if_public,
    is_loopback,
    serve,
    start_background_server,
)

MODEL = "tiny"
LIMITS = ServeLimits(max_tokens_limit=32, max_request_bytes=4096, max_prompts=4, max_logprobs=5)
MESSAGES = [
    {"role": "system", "content": "You answer medical questions."},
    {"role": "user", "content": "Question: Is the treatment effective? Answer yes, no or maybe."},
]
PROMPTS = ["Question: Is the treatment effective? Answer:", "Revenue increased from 1,452.4 million"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(ModelRef(path=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def server(lm):
    url, stop = start_background_server(lm, model_name=MODEL, limits=LIMITS)
    yield url
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def _rendered(lm, messages) -> str:
    rendered = RenderedPrompt(messages=messages, label_conditioned=False, context_tokens_cut=0, example_id="x")
    return render_text(rendered, lm.tokenizer)


def _direct(lm, prompt: str, **options):
    [generation] = generate(lm, [GenerationRequest(id="x", prompt=prompt)], batch_size=1, progress=False, **options)
    return generation


def _forward_logprobs(lm, ids: list[int]) -> list[float]:
    """Log-probability of each token after the first, from one unpadded forward pass."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[k - 1, ids[k]]) for k in range(1, len(ids))]


# --------------------------------------------------------------------------------------------
# Listening address and models


def test_default_host_is_loopback(server):
    assert DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(start_background_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"
    assert server.startswith("http://127.0.0.1:")
    assert server.endswith("/v1")


def test_loopback_check_and_warning(caplog):
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.20")
    with caplog.at_level(logging.WARNING, logger="bridge.serve"):
        _warn_if_public("0.0.0.0")
        _warn_if_public("127.0.0.1")
    warnings = [r for r in caplog.records if "not a loopback address" in r.getMessage()]
    assert len(warnings) == 1
    assert "0.0.0.0" in warnings[0].getMessage()


def test_invalid_limits_raise():
    with pytest.raises(ServeError, match="max_tokens_limit"):
        ServeLimits(max_tokens_limit=0)
    with pytest.raises(ServeError, match="max_logprobs"):
        ServeLimits(max_logprobs=-1)


def test_models_endpoint_lists_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


# --------------------------------------------------------------------------------------------
# Chat completions


def test_greedy_chat_equals_generate(client, lm):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    prompt = _rendered(lm, MESSAGES)
    expected = _direct(lm, prompt, max_new_tokens=12)
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert response.usage.prompt_tokens == len(lm.encode(prompt))
    assert response.usage.completion_tokens == expected.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert response.model == MODEL


def test_seeded_sampling_matches_generate(client, lm):
    options = {"model": MODEL, "messages": MESSAGES, "temperature": 1.0, "top_p": 0.9, "seed": 11, "max_tokens": 10}
    first = client.chat.completions.create(**options).choices[0].message.content
    again = client.chat.completions.create(**options).choices[0].message.content
    other = client.chat.completions.create(**{**options, "seed": 12}).choices[0].message.content
    expected = _direct(lm, _rendered(lm, MESSAGES), max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    assert first == again == expected.text
    assert other != first


def test_stop_sequence_ends_with_stop(client, lm):
    prompt = _rendered(lm, MESSAGES)
    free = _direct(lm, prompt, max_new_tokens=12, temperature=1.0, seed=5).text
    stop = free.strip()[3:5]
    assert stop and stop in free
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=1.0, seed=5, max_tokens=12, stop=[stop]
    )
    [choice] = response.choices
    assert choice.finish_reason == "stop"
    assert choice.message.content == free[: free.index(stop)]
    assert response.usage.completion_tokens < 12


def test_end_of_sequence_ends_with_stop(lm):
    prompt = _rendered(lm, MESSAGES)
    free = _direct(lm, prompt, max_new_tokens=4)
    first_token = lm.encode(prompt + free.text)[len(lm.encode(prompt))]
    stopping = dataclasses.replace(lm, eos_token_ids=[*lm.eos_token_ids, first_token])
    url, stop = start_background_server(stopping, model_name=MODEL, limits=LIMITS)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4)
    finally:
        stop()
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == ""
    assert response.usage.completion_tokens == 1


def test_streamed_chat_joins_to_full_answer(client, server):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens

    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][len("data: ") :])["object"] == "chat.completion.chunk"


def test_concurrent_requests_match_serial_answer(client):
    options = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 8}
    expected = client.chat.completions.create(**options).choices[0].message.content
    answers: list[str] = []
    errors: list[Exception] = []

    def ask() -> None:
        try:
            answers.append(client.chat.completions.create(**options).choices[0].message.content)
        except Exception as exc:  # collected and asserted below, so a failure names its cause
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert answers == [expected] * 4


def test_waiting_limit_rejects_with_503(lm):
    runner = _ModelRunner(lm, max_waiting=1)
    inside, release = threading.Event(), threading.Event()

    def hold() -> str:
        inside.set()
        release.wait(10)
        return "held"

    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(runner.call(hold)))
    worker.start()
    assert inside.wait(10)
    with pytest.raises(OpenAIError) as caught:
        runner.call(lambda: "second")
    release.set()
    worker.join(10)
    assert caught.value.status == 503
    assert caught.value.code == "server_busy"
    assert results == ["held"]
    assert runner.call(lambda: "after") == "after"


# --------------------------------------------------------------------------------------------
# Completions and log-probabilities


def test_echo_logprobs_equal_forward_pass(client, lm):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=2)
    assert [c.index for c in response.choices] == [0, 1]
    for prompt, choice in zip(PROMPTS, response.choices, strict=True):
        ids = lm.encode(prompt)
        logprobs = choice.logprobs
        assert choice.text == prompt
        assert choice.finish_reason == "length"
        assert "".join(logprobs.tokens) == prompt
        assert len(logprobs.tokens) == len(ids)
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx(_forward_logprobs(lm, ids), abs=1e-4)
        assert logprobs.text_offset == [len("".join(logprobs.tokens[:k])) for k in range(len(ids))]
        for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
            assert top[token] == pytest.approx(value)
            assert 2 <= len(top) <= 3
            assert max(top.values()) >= value
    assert response.usage.prompt_tokens == sum(len(lm.encode(p)) for p in PROMPTS)
    assert response.usage.completion_tokens == 0


def test_completion_text_and_logprobs_match_generate(client, lm):
    prompt = PROMPTS[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=0)
    expected = _direct(lm, prompt, max_new_tokens=5)
    [choice] = response.choices
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 5
    prompt_ids = lm.encode(prompt)
    completion_ids = lm.tokenizer(expected.text, add_special_tokens=False)["input_ids"]
    forward = _forward_logprobs(lm, prompt_ids + completion_ids)
    assert "".join(choice.logprobs.tokens) == expected.text
    assert choice.logprobs.token_logprobs == pytest.approx(forward[len(prompt_ids) - 1 :], abs=1e-4)
    assert choice.logprobs.text_offset[0] == 0
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs)

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected.text
    assert echoed.choices[0].logprobs is None


def test_option_scores_over_http_match_in_process(client, lm):
    from bridge.models.inference import score_options

    prompt, options = PROMPTS[0], [" yes", " no", " maybe"]
    response = client.completions.create(
        model=MODEL, prompt=[prompt + option for option in options], max_tokens=0, echo=True, logprobs=0
    )
    prompt_length = len(lm.encode(prompt))
    over_http = [sum(choice.logprobs.token_logprobs[prompt_length:]) for choice in response.choices]
    [in_process] = score_options(lm, [prompt], [options], length_norm="sum", progress=False)
    assert over_http == pytest.approx(in_process.logprobs, abs=1e-4)


# --------------------------------------------------------------------------------------------
# Invalid requests

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

INVALID = [
    # (endpoint, body, status, code, param)
    ("chat/completions", b"{not json", 400, "invalid_json", None),
    ("chat/completions", b"[1, 2]", 400, "invalid_type", None),
    ("chat/completions", b"", 400, "invalid_type", None),
    ("chat/completions", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("chat/completions", {**CHAT, "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 33}, 400, "invalid_value", "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model_not_found", "model"),
    ("chat/completions", {**CHAT, "temperature": 3}, 400, "invalid_value", "temperature"),
    ("chat/completions", {**CHAT, "n": 2}, 400, "invalid_value", "n"),
    ("chat/completions", {**CHAT, "stop": ["a", ""]}, 400, "invalid_value", "stop"),
    ("chat/completions", {**CHAT, "stop": 5}, 400, "invalid_value", "stop"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "invalid_value", "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 7}]}, 400, "invalid_value", "messages[0].content"),
    ("chat/completions", {**CHAT, "logprobs": True}, 400, "invalid_value", "logprobs"),
    ("chat/completions", {**CHAT, "tempreature": 0}, 400, "unknown_parameter", "tempreature"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, 413, "request_too_large", None),
    ("completions", {**COMPLETION, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("completions", {**COMPLETION, "logprobs": 6}, 400, "invalid_value", "logprobs"),
    ("completions", {**COMPLETION, "prompt": [1, 2, 3]}, 400, "invalid_value", "prompt"),
    ("completions", {**COMPLETION, "prompt": ["a"] * 5}, 400, "invalid_value", "prompt"),
    ("completions", {**COMPLETION, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("completions", {**COMPLETION, "stream": True}, 400, "invalid_value", "stream"),
    ("completions", {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "code", "param"), INVALID)
def test_invalid_request_gets_openai_error(server, endpoint, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server}/{endpoint}", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_unknown_url_and_method_get_openai_errors(server):
    missing = httpx.get(f"{server}/engines", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    wrong_method = httpx.get(f"{server}/chat/completions", timeout=10)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_context_length_exceeded(lm):
    small = ServeLimits(max_tokens_limit=32, max_request_bytes=1_000_000)
    url, stop = start_background_server(lm, model_name=MODEL, limits=small)
    try:
        tight = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            tight.completions.create(model=MODEL, prompt="yes " * 2100, max_tokens=1)
    finally:
        stop()
    assert caught.value.body["code"] == "context_length_exceeded"


def test_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1000)
    assert too_many.value.body["param"] == "max_tokens"


# --------------------------------------------------------------------------------------------
# Models from run directories


def _run_dir(root: Path, ta_path: Path) -> Path:
    run = root / "run"
    run.mkdir()
    config = BridgeConfig.model_validate({"models": {"ta": {"path": str(ta_path)}, "student": {"path": str(ta_path)}}})
    (run / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    return run


def test_run_dir_serves_ta_with_adapter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    run = _run_dir(tmp_path, tiny_model_dir)
    base = load_model(ModelRef(path=str(tiny_model_dir)))
    torch.manual_seed(0)
    adapted = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(run / "train_ta" / "adapter")
    ids = torch.tensor([base.encode(PROMPTS[0])])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        plain = load_model(ModelRef(path=str(tiny_model_dir))).model(input_ids=ids).logits

    served = load_model_or_run(str(run))
    with torch.no_grad():
        actual = served.model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert (actual - plain).abs().max() > 1e-3
    assert "adapter" in served.name


def test_run_dir_prefers_trained_student(tmp_path, tiny_model_dir):
    from tiny_models import save_tiny_model

    run = _run_dir(tmp_path, tiny_model_dir)
    student = save_tiny_model(run / "train_student" / "model", layers=1, seed=3)
    served = load_model_or_run(str(run))
    assert served.path == student
    assert served.model.config.num_hidden_layers == 1


def test_run_dir_without_model_raises(tmp_path, tiny_model_dir):
    run = _run_dir(tmp_path, tiny_model_dir)
    with pytest.raises(ModelLoadError, match="has no trained model"):
        load_model_or_run(str(run))


# --------------------------------------------------------------------------------------------
# The command


def test_serve_command_stops_on_interrupt(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", str(model), "--port", "0", "--model-name", MODEL, "--max-tokens-limit", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = ""
        for line in process.stdout:
            if line.startswith("serving "):
                break
        assert line.startswith(f"serving {MODEL} at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split()[0]
        models = httpx.get(f"{url}/models", timeout=10).json()
        assert models["data"][0]["id"] == MODEL
        over = httpx.post(f"{url}/chat/completions", json={**CHAT, "max_tokens": 9}, timeout=30)
        assert over.status_code == 400
        assert over.json()["error"]["param"] == "max_tokens"
    finally:
        # Twice, as an impatient user presses Ctrl-C.
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    assert "server stopped" in rest
    assert "Traceback" not in rest

