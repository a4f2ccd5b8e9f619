"""TA inference through OpenAI-compatible servers: three ``bridge serve`` replicas against the in-process path."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridge import engines
from bridge.config import ModelRef, ModelsConfig, ServerEngineConfig, load_config
from bridge.data.types import Example, TaskSpec
from bridge.engines import ChatGenerationRequest, EngineCapabilityError
from bridge.engines.server import ServerEngine, ServerEngineError
from bridge.errors import ConfigError
from bridge.models import inference
from bridge.models.loading import LocalModel, load_model
from bridge.prompts import option_continuations, render_all, render_text, scoring_prompt
from bridge.serve import start_background_server
from bridge.stages.select import score_pool

TASK = TaskSpec("toy", "yes_no_maybe", ("yes", "no", "maybe"), domain="medicine")
REPLICAS = 3


def make_examples(count: int) -> list[Example]:
    topics = ["aspirin", "statins", "exercise", "vitamin D", "sleep", "fasting", "coffee"]
    return [
        Example(
            id=f"e{i}",
            question=f"Does {topics[i % len(topics)]} reduce the risk of heart attack in trial {i}?",
            context="Patients were randomised to two groups." * (1 + i % 3),
            gold=("yes", "no", "maybe")[i % 3],
        )
        for i in range(count)
    ]


def tiny_ref(folder: Path) -> ModelRef:
    return ModelRef(path=str(folder), device="cpu", dtype="float32")


def save_varied_model(folder: Path) -> Path:
    """Write a tiny Llama whose outputs depend on the prompt, and return its folder.

    With transformers' default initializer_range (0.02), a 2-layer model writes the same text and
    picks the same option for every prompt, so a comparison could pass by accident. At 0.2 both
    vary from prompt to prompt.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        initializer_range=0.2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory) -> Path:
    return save_varied_model(tmp_path_factory.mktemp("varied") / "model")


@pytest.fixture(scope="module")
def local_lm(varied_model_dir) -> LocalModel:
    return load_model(tiny_ref(varied_model_dir))


@pytest.fixture(scope="module")
def replicas(varied_model_dir):
    """Three bridge serve replicas on loopback, each with its own copy of the tiny model."""
    urls, stops = [], []
    try:
        for _ in range(REPLICAS):
            url, stop = start_background_server(load_model(tiny_ref(varied_model_dir)), model_name="tiny", host="127.0.0.1")
            urls.append(url)
            stops.append(stop)
        yield urls
    finally:
        for stop in stops:
            stop()


@pytest.fixture
def engine(replicas, varied_model_dir) -> ServerEngine:
    return ServerEngine(tiny_ref(varied_model_dir), ServerEngineConfig(endpoints=replicas, concurrency=2, max_retries=0))


class StageContext:
    """The part of the pipeline's RunContext that ``select.score_pool`` reads."""

    def __init__(self, config: Any, root: Path) -> None:
        self.config = config
        self.root = root

    def stage_dir(self, stage: str) -> Path:
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def rendered(lm: LocalModel, style: str, count: int = 9):
    prompts, skipped = render_all(make_examples(count), TASK, style=style, tokenizer=lm.tokenizer)
    assert not skipped
    return prompts


# --------------------------------------------------------------------------------------------
# Same results as the in-process path


def test_server_generation_matches_local(engine, local_lm):
    prompts = rendered(local_lm, "rationale")
    requests = [
        ChatGenerationRequest(id=p.example_id, prompt=render_text(p, local_lm.tokenizer), messages=p.messages)
        for p in prompts
    ]

    expected = inference.generate(local_lm, requests, max_new_tokens=12, batch_size=1, progress=False)
    found = engines.generate(engine, requests, max_new_tokens=12, progress=False)

    assert len({g.text for g in expected}) > 1, "the model writes the same text for every prompt"

    assert [g.id for g in found] == [g.id for g in expected]
    assert [g.text for g in found] == [g.text for g in expected]
    assert [g.completion_tokens for g in found] == [g.completion_tokens for g in expected]
    assert [g.finish_reason for g in found] == [g.finish_reason for g in expected]
    assert [g.prompt_hash for g in found] == [g.prompt_hash for g in expected]


def test_server_scoring_matches_local(engine, local_lm):
    prompts = rendered(local_lm, "answer_only")
    texts = [scoring_prompt(p, local_lm.tokenizer) for p in prompts]
    examples = {e.id: e for e in make_examples(9)}
    options = [option_continuations(TASK, examples[p.example_id]) for p in prompts]

    expected = inference.score_options(local_lm, texts, options, batch_size=1, progress=False)
    found = engines.score_options(engine, texts, options, progress=False)

    assert len({s.predicted for s in expected}) > 1, "the model picks the same option for every prompt"

    assert [s.predicted for s in found] == [s.predicted for s in expected]
    assert [s.token_counts for s in found] == [s.token_counts for s in expected]
    assert [s.prompt_hash for s in found] == [s.prompt_hash for s in expected]
    for got, want in zip(found, expected, strict=True):
        assert got.probs == pytest.approx(want.probs, abs=1e-5)
        assert got.entropy == pytest.approx(want.entropy, abs=1e-5)


def test_server_spreads_requests_over_endpoints(engine, local_lm):
    prompts = rendered(local_lm, "answer_only", count=12)
    texts = [scoring_prompt(p, local_lm.tokenizer) for p in prompts]

    engine.score_options(texts, [[" yes", " no"]] * len(texts), progress=False)

    counts = engine.request_counts()
    assert sum(counts.values()) == len(texts)
    assert all(count > 0 for count in counts.values()), counts


def test_server_skips_stored_ids_and_reports_batches(engine, local_lm):
    prompts = rendered(local_lm, "rationale", count=5)
    requests = [
        ChatGenerationRequest(id=p.example_id, prompt=render_text(p, local_lm.tokenizer), messages=p.messages)
        for p in prompts
    ]
    seen: list[str] = []

    found = engine.generate(
        requests, max_new_tokens=4, skip_ids={"e0", "e3"}, on_batch=lambda batch: seen.extend(g.id for g in batch), progress=False
    )

    assert [g.id for g in found] == ["e1", "e2", "e4"]
    assert sorted(seen) == ["e1", "e2", "e4"]


def test_server_plain_requests_use_completions(engine, local_lm):
    prompts = rendered(local_lm, "rationale", count=3)
    requests = [inference.GenerationRequest(id=p.example_id, prompt=render_text(p, local_lm.tokenizer)) for p in prompts]

    expected = inference.generate(local_lm, requests, max_new_tokens=6, batch_size=1, progress=False)
    found = engine.generate(requests, max_new_tokens=6, progress=False)

    assert [g.text for g in found] == [g.text for g in expected]


def test_select_scoring_on_servers_matches_local(engine, local_lm, tmp_path):
    config = load_config(None, ["selection.batch_size=1", "selection.embedding=encoder"])
    examples = {e.id: e for e in make_examples(9)}
    items = [(examples[p.example_id], p) for p in rendered(local_lm, "answer_only")]

    expected = score_pool(StageContext(config, tmp_path / "local"), local_lm, TASK, items, "option_entropy")
    found = score_pool(StageContext(config, tmp_path / "server"), engine, TASK, items, "option_entropy")

    for key in ("id", "pred", "prompt_hash", "correct", "chunk", "row"):
        assert [row[key] for row in found] == [row[key] for row in expected], key
    for got, want in zip(found, expected, strict=True):
        assert got["difficulty"] == pytest.approx(want["difficulty"], abs=1e-5)


def test_select_rejects_hidden_states_on_servers(engine, local_lm, tmp_path):
    config = load_config(None, ["selection.embedding=ta_hidden"])
    examples = {e.id: e for e in make_examples(3)}
    items = [(examples[p.example_id], p) for p in rendered(local_lm, "answer_only", count=3)]

    with pytest.raises(EngineCapabilityError) as caught:
        score_pool(StageContext(config, tmp_path), engine, TASK, items, "option_entropy")

    assert "selection.embedding=encoder" in str(caught.value)
    assert sum(engine.request_counts().values()) == 0


# --------------------------------------------------------------------------------------------
# Capabilities and failures


class _FakeCompletions(BaseHTTPRequestHandler):
    """A server whose /completions returns no log-probabilities, or rejects echo with 400."""

    reject = False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).reject:
            self._send(400, {"error": {"message": "echo is not supported", "type": "invalid_request_error"}})
            return
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length"} for i, text in enumerate(body["prompt"])
        ]
        self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": "fake", "choices": choices})


@pytest.fixture
def fake_server():
    """Start the fake completions server on loopback; yield (url, handler class)."""

    class Handler(_FakeCompletions):
        reject = False

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", Handler
    finally:
        server.shutdown()
        server.server_close()


def test_scoring_without_logprobs_names_alternatives(fake_server, tiny_model_dir):
    url, _ = fake_server
    engine = ServerEngine(tiny_ref(tiny_model_dir), ServerEngineConfig(endpoints=[url], max_retries=0))

    with pytest.raises(EngineCapabilityError) as caught:
        engine.score_options(["Question: Is it? Answer:"], [[" yes", " no"]], progress=False)

    message = str(caught.value)
    assert "returned no prompt log-probabilities" in message
    assert "selection.difficulty=answer_entropy" in message
    assert "models.ta_engine=transformers" in message


def test_scoring_rejected_echo_names_alternatives(fake_server, tiny_model_dir):
    url, handler = fake_server
    handler.reject = True
    engine = ServerEngine(tiny_ref(tiny_model_dir), ServerEngineConfig(endpoints=[url], max_retries=0))

    with pytest.raises(EngineCapabilityError) as caught:
        engine.score_options(["Question: Is it? Answer:"], [[" yes", " no"]], progress=False)

    assert "echo is not supported" in str(caught.value)
    assert "selection.difficulty=answer_entropy" in str(caught.value)


def test_unreachable_endpoint_names_url(tiny_model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    engine = ServerEngine(
        tiny_ref(tiny_model_dir), ServerEngineConfig(endpoints=[url], model="tiny", max_retries=0, timeout_s=5)
    )

    with pytest.raises(ServerEngineError) as caught:
        engine.generate([inference.GenerationRequest(id="a", prompt="Hi")], max_new_tokens=2, progress=False)

    assert f"cannot connect to the TA server at {url}" in str(caught.value)


def test_server_engine_cannot_embed(engine):
    with pytest.raises(EngineCapabilityError) as caught:
        engine.embed(["text"])

    assert "selection.embedding=encoder" in str(caught.value)
    assert not engines.supports(engine, "hidden_states")
    assert not engines.supports(engine, "token_entropy")


def test_require_rejects_token_entropy(engine, local_lm):
    engines.require(local_lm, "token_entropy")

    with pytest.raises(EngineCapabilityError) as caught:
        engines.require(engine, "token_entropy")

    assert "selection.difficulty=answer_entropy" in str(caught.value)


def test_weights_load_on_first_use(engine, caplog):
    with caplog.at_level(logging.INFO, logger="bridge.engines.base"):
        model = engine.model

    assert model is engine.local_model().model
    assert "loading the TA's weights in this process" in caplog.text
    assert engine.tokenizer is engine.local_model().tokenizer


# --------------------------------------------------------------------------------------------
# Configuration


def test_engine_choice_is_logged(replicas, varied_model_dir, caplog):
    models = ModelsConfig(
        ta=tiny_ref(varied_model_dir), ta_engine="openai_server", ta_server=ServerEngineConfig(endpoints=replicas)
    )

    with caplog.at_level(logging.INFO, logger="bridge.engines"):
        engine = engines.load_engine(models)

    assert isinstance(engine, ServerEngine)
    assert "TA engine:" in caplog.text
    assert "openai_server" in caplog.text
    assert engines.describe(engine)["endpoints"] == replicas


def test_transformers_engine_is_local_model(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="bridge.engines"):
        lm = engines.load_engine(ModelsConfig(ta=tiny_ref(tiny_model_dir)))

    assert isinstance(lm, LocalModel)
    assert "TA engine: transformers" in caplog.text
    assert engines.describe(lm)["engine"] == "transformers"


def test_server_engine_needs_endpoints():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["models.ta_engine=openai_server"])

    assert "models.ta_server.endpoints is empty" in str(caught.value)


def test_endpoint_must_be_url():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["models.ta_engine=openai_server", "models.ta_server.endpoints=[localhost:8000]"])

    assert "http:// or https://" in str(caught.value)
