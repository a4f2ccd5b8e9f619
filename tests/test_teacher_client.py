"""The teacher client and buyer against a local OpenAI-compatible server, through the real openai client."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.config import BudgetConfig, PromptConfig, TeacherConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import BudgetError, ConfigError, DataError, TeacherError
from bridge.teacher import buy_rationales, summarize_ledger
from bridge.teacher.backends import LocalBackend, Redactor, is_loopback_url, public_endpoint
from bridge.teacher.estimate import estimate_teacher_cost, format_estimate
from bridge.teacher.ledger import IN_DOUBT, OK, REJECTED
from fakes.openai_server import FakeOpenAIServer, Fault

# Not shaped like an OpenAI key, so only the exact-secret redaction can hide it.
KEY = "bridge-test-secret-0123456789abcdef"
KEY_ENV = "BRIDGE_TEST_TEACHER_KEY"
TASK = TaskSpec(name="toy", format="yes_no_maybe", labels=("yes", "no", "maybe"), domain="toy checks")
HINT_MARK = "Hint (the verified correct answer): "
CASE = re.compile(r"\(case (\S+?)\)")


def make_examples(count: int, *, explanation: bool = False) -> list[Example]:
    return [
        Example(
            id=f"ex{i:03d}",
            question=f"Is item {i} in good order? (case ex{i:03d})",
            gold="yes" if i % 2 == 0 else "no",
            context=f"Item {i} was inspected on day {i}.",
            explanation=f"The inspection of item {i} found what it found." if explanation else None,
        )
        for i in range(count)
    ]


class ScriptedTeacher:
    """A responder that replies to each case as scripted: right, wrong, unparsable or long."""

    def __init__(self, examples: list[Example], behaviour: dict[str, str] | None = None) -> None:
        self.gold = {e.id: e.gold for e in examples}
        self.behaviour = behaviour or {}

    def __call__(self, messages: list[dict[str, str]]) -> str:
        user = messages[-1]["content"]
        case = CASE.search(user).group(1)
        if HINT_MARK in user:
            hinted = user.split(HINT_MARK, 1)[1].split("\n", 1)[0].strip()
            return f"Looking again at the inspection, the record supports it.\nAnswer: {hinted}"
        mode = self.behaviour.get(case, "right")
        gold = self.gold[case]
        if mode == "wrong":
            return f"The inspection suggests otherwise.\nAnswer: {'no' if gold == 'yes' else 'yes'}"
        if mode == "unparsable":
            return "I cannot decide from this record."
        if mode == "long":
            return "Step. " * 400 + f"\nAnswer: {gold}"
        return f"The inspection record settles it.\nAnswer: {gold}"


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def teacher_config(server: FakeOpenAIServer, **changes) -> TeacherConfig:
    settings = dict(
        backend="openai",
        base_url=server.base_url,
        model="fake-teacher",
        api_key_env=KEY_ENV,
        prompt_price_per_mtok=server.prompt_price_per_mtok,
        completion_price_per_mtok=server.completion_price_per_mtok,
        max_tokens=128,
        timeout_s=2.0,
        concurrency=4,
        max_retries=3,
        backoff_s=0.01,
        backoff_max_s=1.0,
    )
    settings.update(changes)
    return TeacherConfig(**settings)


def no_cap() -> BudgetConfig:
    return BudgetConfig(fraction=None, max_cost_usd=10.0)


def ledger_rows(run_dir: Path) -> list[dict]:
    conn = sqlite3.connect(run_dir / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM attempts ORDER BY id")]


# --------------------------------------------------------------------------------------------
# Policy


def test_policy_reask_with_hint(tmp_path: Path, api_key: str):
    examples = make_examples(6)
    responder = ScriptedTeacher(examples, {"ex001": "wrong", "ex002": "unparsable"})
    with FakeOpenAIServer(api_key=api_key, responder=responder) as server:
        result = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        assert len(server.bill) == 8  # 6 asks and 2 re-asks
    rows = {r["id"]: r for r in result.rows}
    assert set(rows) == {e.id for e in examples}
    assert rows["ex001"]["label_conditioned"] is True
    assert rows["ex001"]["attempt"] == 2
    assert rows["ex001"]["answer"] == "no"
    assert rows["ex000"]["label_conditioned"] is False
    assert rows["ex000"]["target"] == "The inspection record settles it.\nAnswer: yes"
    assert rows["ex000"]["cost_usd"] > 0
    assert rows["ex000"]["ledger_key"]
    assert result.summary["reasked"] == 2
    assert result.summary["reask_correct"] == 2
    unparsable = [o for o in result.outcomes if o["label"] == "unparsable"]
    assert unparsable[0]["raw_response"] == "I cannot decide from this record."
    labels = {(r["example_id"], r["purpose"]): r["label"] for r in ledger_rows(tmp_path)}
    assert labels[("ex001", "ask")] == "wrong"
    assert labels[("ex001", "reask")] == "correct"


def test_policy_keep_correct_and_keep_all(tmp_path: Path, api_key: str):
    examples = make_examples(4)
    responder = ScriptedTeacher(examples, {"ex001": "wrong", "ex003": "unparsable"})
    with FakeOpenAIServer(api_key=api_key, responder=responder) as server:
        strict = buy_rationales(
            examples, TASK, teacher_config(server, policy="keep_correct"), no_cap(), tmp_path / "a", progress=False
        )
        loose = buy_rationales(
            examples, TASK, teacher_config(server, policy="keep_all"), no_cap(), tmp_path / "b", progress=False
        )
        assert len(server.bill) == 8  # no re-asks under either policy
    assert [r["id"] for r in strict.rows] == ["ex000", "ex002"]
    kept = {r["id"]: r for r in loose.rows}
    assert set(kept) == {"ex000", "ex001", "ex002"}
    assert kept["ex001"]["correct"] is False
    assert kept["ex001"]["answer"] == "yes"


def test_truncated_response_is_never_a_label(tmp_path: Path, api_key: str):
    examples = make_examples(3)
    responder = ScriptedTeacher(examples, {"ex000": "long"})
    with FakeOpenAIServer(api_key=api_key, responder=responder) as server:
        server.fault_when("(case ex001)", "truncated")
        result = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
    assert [r["id"] for r in result.rows] == ["ex002"]
    truncated = {o["id"]: o for o in result.outcomes if o["label"] == "truncated"}
    assert set(truncated) == {"ex000", "ex001"}
    assert truncated["ex000"]["finish_reason"] == "length"
    assert truncated["ex000"]["raw_response"].startswith("Step.")
    assert result.summary["reasked"] == 0


# --------------------------------------------------------------------------------------------
# Cache and resume


def test_rerun_reuses_every_response(tmp_path: Path, api_key: str):
    examples = make_examples(5)
    responder = ScriptedTeacher(examples, {"ex001": "wrong"})
    with FakeOpenAIServer(api_key=api_key, responder=responder) as server:
        first = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        billed = len(server.bill)
        second = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        assert len(server.bill) == billed
        # A larger max_tokens still fits every stored stop-ended response.
        third = buy_rationales(
            examples, TASK, teacher_config(server, max_tokens=512), no_cap(), tmp_path, progress=False
        )
        assert len(server.bill) == billed
    assert [r["target"] for r in second.rows] == [r["target"] for r in first.rows]
    assert all(r["cached"] for r in second.rows)
    assert [r["cost_usd"] for r in third.rows] == [r["cost_usd"] for r in first.rows]
    assert second.summary["this_run_usd"] == 0
    assert summarize_ledger(tmp_path).cached == 2 * 6


def test_smaller_max_tokens_than_stored_completion_asks_again(tmp_path: Path, api_key: str):
    examples = make_examples(1)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        completion = server.bill[0].completion_tokens
        buy_rationales(
            examples, TASK, teacher_config(server, max_tokens=completion), no_cap(), tmp_path, progress=False
        )
        assert len(server.bill) == 1
        with pytest.raises(TeacherError):  # the only response is now cut: no success
            buy_rationales(
                examples, TASK, teacher_config(server, max_tokens=completion - 1), no_cap(), tmp_path, progress=False
            )
        assert len(server.bill) == 2


def test_raising_budget_buys_only_the_rest(tmp_path: Path, api_key: str):
    examples = make_examples(6)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        config = teacher_config(server, concurrency=1)
        small = buy_rationales(examples, TASK, config, BudgetConfig(fraction=None, max_calls=2, max_cost_usd=10.0), tmp_path, progress=False)
        assert small.budget_exhausted
        assert len(small.rows) == 2
        assert small.summary["not_asked_budget"] == 4
        assert len(server.bill) == 2
        full = buy_rationales(examples, TASK, config, BudgetConfig(fraction=None, max_calls=6, max_cost_usd=10.0), tmp_path, progress=False)
        assert len(server.bill) == 6
    assert len(full.rows) == 6
    assert sum(r["cached"] for r in full.rows) == 2


def test_exhausted_budget_before_first_call_is_budget_error(tmp_path: Path, api_key: str):
    examples = make_examples(2)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        config = teacher_config(server, concurrency=1)
        buy_rationales(examples[:1], TASK, config, BudgetConfig(fraction=None, max_calls=1, max_cost_usd=10.0), tmp_path, progress=False)
        with pytest.raises(BudgetError):
            buy_rationales(examples[1:], TASK, config, BudgetConfig(fraction=None, max_calls=1, max_cost_usd=10.0), tmp_path, progress=False)


def test_money_cap_stops_cleanly(tmp_path: Path, api_key: str):
    examples = make_examples(20)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        config = teacher_config(server, concurrency=4, max_tokens=64)
        cap = 0.0025
        result = buy_rationales(examples, TASK, config, BudgetConfig(fraction=None, max_cost_usd=cap), tmp_path, progress=False)
        assert server.billed_usd <= cap
    assert result.budget_exhausted
    assert 0 < len(result.rows) < 20
    summary = summarize_ledger(tmp_path)
    assert summary.total_usd <= cap
    assert summary.total_usd >= server.billed_usd


# --------------------------------------------------------------------------------------------
# Retries and faults


def test_rate_limit_waits_for_retry_after(tmp_path: Path, api_key: str):
    examples = make_examples(1)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.push(Fault("rate_limit", retry_after_s=0.4), "server_error")
        started = time.monotonic()
        result = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        elapsed = time.monotonic() - started
        assert [r.status for r in server.requests] == [429, 500, 200]
    assert elapsed >= 0.4
    assert len(result.rows) == 1
    rows = ledger_rows(tmp_path)
    assert [(r["attempt"], r["status"], r["http_status"]) for r in rows] == [
        (1, REJECTED, 429),
        (2, REJECTED, 500),
        (3, OK, None),
    ]
    assert rows[0]["charged_picousd"] == 0


def test_retries_are_bounded(tmp_path: Path, api_key: str):
    examples = make_examples(2)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.fault_when("(case ex000)", "server_error", times=10)
        result = buy_rationales(examples, TASK, teacher_config(server, max_retries=2), no_cap(), tmp_path, progress=False)
        assert sum(1 for r in server.requests if "(case ex000)" in r.last_user_message) == 3
    assert [r["id"] for r in result.rows] == ["ex001"]
    failed = [o for o in result.outcomes if o["label"] == "failed"]
    assert failed[0]["attempts"] == 3
    assert "HTTP 500" in failed[0]["error"]


def test_unknown_outcomes_count_as_spent(tmp_path: Path, api_key: str):
    examples = make_examples(3)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.fault_when("(case ex000)", Fault("slow", delay_s=1.5))
        server.fault_when("(case ex001)", "drop_after_bill")
        server.fault_when("(case ex002)", "invalid_json")
        result = buy_rationales(examples, TASK, teacher_config(server, timeout_s=0.5), no_cap(), tmp_path, progress=False)
        server.wait_idle()
        billed = server.billed_usd
        # Billed: the slow and the dropped response and their retries, and the invalid body.
        assert len(server.bill) == 5
    statuses = [(r["example_id"], r["status"]) for r in ledger_rows(tmp_path)]
    assert ("ex000", IN_DOUBT) in statuses
    assert ("ex001", IN_DOUBT) in statuses
    assert ("ex002", IN_DOUBT) in statuses
    # Time-outs and dropped connections are retried; an invalid body is not.
    assert {r["id"] for r in result.rows} == {"ex000", "ex001"}
    invalid = next(o for o in result.outcomes if o["id"] == "ex002")
    assert "chatcmpl-broken" in invalid["error"]
    summary = summarize_ledger(tmp_path)
    assert summary.total_usd >= billed
    assert summary.in_doubt == 3


def test_bad_gateway_is_in_doubt_and_retried(tmp_path: Path, api_key: str):
    examples = make_examples(1)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.push("bad_gateway")
        result = buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        assert summarize_ledger(tmp_path).total_usd >= server.billed_usd
    assert [r["status"] for r in ledger_rows(tmp_path)] == [IN_DOUBT, OK]
    assert len(result.rows) == 1


def test_unauthorized_fails_fast_and_hides_key(tmp_path: Path, api_key: str, caplog: pytest.LogCaptureFixture):
    examples = make_examples(40)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.fault_when("(case ex003)", "unauthorized")
        with pytest.raises(TeacherError) as info:
            buy_rationales(examples, TASK, teacher_config(server, concurrency=2), no_cap(), tmp_path, progress=False)
        sent = len(server.requests)
        assert server.requests[-1].authorization == f"Bearer {api_key}"  # the key did reach the server
    assert sent < 10
    message = str(info.value)
    assert "HTTP 401" in message
    assert api_key not in message
    assert api_key not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert api_key.encode() not in path.read_bytes(), path
    rows = ledger_rows(tmp_path)
    assert any(r["http_status"] == 401 for r in rows)
    assert all(api_key not in (r["error"] or "") for r in rows)


def test_revoked_key_stops_the_stage(tmp_path: Path, api_key: str):
    examples = make_examples(30)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples), latency_s=0.02) as server:
        config = teacher_config(server, concurrency=2)
        buy_rationales(examples[:4], TASK, config, no_cap(), tmp_path, progress=False)
        server.revoke_key()
        with pytest.raises(TeacherError) as info:
            buy_rationales(examples, TASK, config, no_cap(), tmp_path, progress=False)
        # Four are cached; at most the calls in flight when the first 401 came back were sent.
        assert sum(1 for r in server.requests if r.status == 401) <= 2
    assert "revoked" in info.value.hint


@pytest.mark.parametrize(("kind", "status"), [("bad_request", 400), ("not_found", 404)])
def test_client_errors_stop_the_stage(tmp_path: Path, api_key: str, kind: str, status: int):
    examples = make_examples(10)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.push(kind)
        with pytest.raises(TeacherError) as info:
            buy_rationales(examples, TASK, teacher_config(server, concurrency=1), no_cap(), tmp_path, progress=False)
        assert len(server.requests) == 1
    assert f"HTTP {status}" in str(info.value)


def test_zero_successful_calls_fail_the_run(tmp_path: Path, api_key: str):
    examples = make_examples(3)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        server.burst("invalid_json", 3)
        with pytest.raises(TeacherError) as info:
            buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
    assert "no teacher request succeeded" in str(info.value)


def test_connection_refused_is_not_charged(tmp_path: Path, api_key: str):
    examples = make_examples(1)
    server = FakeOpenAIServer(api_key=api_key).start()
    config = teacher_config(server, max_retries=1)
    server.stop()  # nothing listens on the port any more
    with pytest.raises(TeacherError):
        buy_rationales(examples, TASK, config, no_cap(), tmp_path, progress=False)
    rows = ledger_rows(tmp_path)
    assert [r["status"] for r in rows] == [REJECTED, REJECTED]
    assert summarize_ledger(tmp_path).total_usd == 0


def test_rate_limits_space_requests(tmp_path: Path, api_key: str):
    examples = make_examples(5)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        config = teacher_config(server, concurrency=5, requests_per_minute=600)  # one per 0.1 s
        started = time.monotonic()
        buy_rationales(examples, TASK, config, no_cap(), tmp_path / "rpm", progress=False)
        assert time.monotonic() - started >= 0.4
        # Each request reserves over 400 tokens (prompt bound plus max_tokens); 60,000 tokens per
        # minute is 1,000 per second, so the third request starts after 0.8 s or more.
        config = teacher_config(server, concurrency=5, tokens_per_minute=60_000)
        started = time.monotonic()
        buy_rationales(examples[:3], TASK, config, no_cap(), tmp_path / "tpm", progress=False)
        assert time.monotonic() - started >= 0.8


def test_progress_bar_shows_money(tmp_path: Path, api_key: str, capsys: pytest.CaptureFixture):
    examples = make_examples(3)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "teacher" in err
    assert "spent=$" in err
    assert "projected=$" in err


# --------------------------------------------------------------------------------------------
# Configuration checks before any call


def test_config_errors_come_before_any_call(tmp_path: Path, api_key: str, monkeypatch: pytest.MonkeyPatch):
    examples = make_examples(2)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        no_price = teacher_config(server, prompt_price_per_mtok=None, completion_price_per_mtok=None)
        with pytest.raises(ConfigError, match="has no price"):
            buy_rationales(examples, TASK, no_price, no_cap(), tmp_path, progress=False)
        with pytest.raises(ConfigError, match="smaller than one call"):
            buy_rationales(
                examples, TASK, teacher_config(server), BudgetConfig(fraction=None, max_cost_usd=1e-6), tmp_path,
                progress=False,
            )
        with pytest.raises(ConfigError, match="is 0 but the teacher stage is on"):
            buy_rationales(
                examples, TASK, teacher_config(server), BudgetConfig(fraction=None, max_calls=0, max_cost_usd=10.0), tmp_path,
                progress=False,
            )
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(ConfigError, match=KEY_ENV):
            buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        assert server.requests == []


def test_teacher_off_makes_no_call(tmp_path: Path):
    result = buy_rationales(
        make_examples(2), TASK, TeacherConfig(enabled=False), BudgetConfig(fraction=None, max_calls=0, max_cost_usd=0.0), tmp_path
    )
    assert result.rows == []
    assert result.summary["enabled"] is False


def test_remote_endpoint_needs_confirmation(tmp_path: Path, api_key: str):
    config = TeacherConfig(
        backend="openai", base_url="https://api.example.com/v1", model="gpt-4o-mini", api_key_env=KEY_ENV
    )
    with pytest.raises(TeacherError) as info:
        buy_rationales(make_examples(1), TASK, config, no_cap(), tmp_path, progress=False)
    assert "--yes" in info.value.hint
    assert not (tmp_path / "ledger.sqlite").exists()


def test_redactor_hides_secret_and_key_shapes():
    redact = Redactor("my-secret-value")
    assert redact("bad key my-secret-value given") == "bad key [redacted] given"
    assert redact("Incorrect API key provided: sk-proj-abcdefgh1234") == "Incorrect API key provided: sk-[redacted]"
    assert Redactor(None)("nothing to hide") == "nothing to hide"


def test_endpoint_helpers():
    assert is_loopback_url("http://127.0.0.1:8000/v1")
    assert is_loopback_url("http://localhost:11434/v1")
    assert is_loopback_url("http://[::1]:8000/v1")
    assert not is_loopback_url("https://api.openai.com/v1")
    assert not is_loopback_url("http://10.0.0.5:8000/v1")
    assert public_endpoint("https://user:pw@host.example:8443/v1/?key=abc") == "https://host.example:8443/v1"


# --------------------------------------------------------------------------------------------
# Reference and local backends


def test_reference_backend_serves_explanations(tmp_path: Path):
    examples = make_examples(3, explanation=True)
    config = TeacherConfig(backend="reference", price_per_call=0.01)
    result = buy_rationales(examples, TASK, config, BudgetConfig(fraction=None, max_calls=10, max_cost_usd=10.0), tmp_path, progress=False)
    assert [r["target"] for r in result.rows] == [
        f"{e.explanation}\nAnswer: {e.gold}" for e in examples
    ]
    assert all(r["correct"] and r["source"] == "reference" for r in result.rows)
    summary = summarize_ledger(tmp_path)
    assert summary.spent_usd == pytest.approx(0.03)
    assert summary.endpoints == {"reference": 3}


def test_reference_backend_bills_within_reservation(tmp_path: Path, caplog):
    # Several messages per request: the prompt count must use the same bound as the reservation.
    examples = make_examples(3, explanation=True)
    config = TeacherConfig(backend="reference", price_per_call=0.01)
    budget = BudgetConfig(fraction=None, max_calls=10, max_tokens=100000, max_cost_usd=10.0)
    with caplog.at_level("WARNING", logger="bridge.teacher.ledger"):
        buy_rationales(examples, TASK, config, budget, tmp_path, system="Be brief.", progress=False)
    assert not [r for r in caplog.records if "above its reserved worst case" in r.getMessage()]
    summary = summarize_ledger(tmp_path)
    assert summary.calls == 3


def test_reference_backend_names_missing_explanations(tmp_path: Path):
    examples = make_examples(3, explanation=True)
    examples[1] = Example(id="ex001", question="Q (case ex001)", gold="no")
    config = TeacherConfig(backend="reference", price_per_call=0.01)
    with pytest.raises(DataError, match="ex001"):
        buy_rationales(examples, TASK, config, no_cap(), tmp_path, progress=False)


class _FakeTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class _FakeLocalModel:
    tokenizer = _FakeTokenizer()

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_local_backend_batches_through_generate(tmp_path: Path):
    from bridge.models.inference import Generation

    examples = make_examples(5)
    calls: list[int] = []

    def generate(lm, requests, *, max_new_tokens, temperature, top_p, batch_size, progress):
        calls.append(len(requests))
        outputs = []
        for request in requests:
            case = CASE.search(request.prompt).group(1)
            gold = "yes" if int(case[2:]) % 2 == 0 else "no"
            finish = "length" if case == "ex004" else "stop"
            outputs.append(Generation(request.id, "h", f"Reasoned.\nAnswer: {gold}", 4, finish, 0.1))
        return outputs

    config = TeacherConfig(backend="local", model="tiny-local", max_tokens=32)
    backend = LocalBackend(config, model_obj=_FakeLocalModel(), generate=generate, batch_size=2)
    result = buy_rationales(
        examples, TASK, config, BudgetConfig(fraction=None, max_calls=10, max_cost_usd=10.0), tmp_path, backend=backend, progress=False
    )
    assert calls == [2, 2, 1]
    assert sorted(r["id"] for r in result.rows) == ["ex000", "ex001", "ex002", "ex003"]
    assert summarize_ledger(tmp_path).endpoints == {"local:tiny-local": 5}


# --------------------------------------------------------------------------------------------
# Estimate and command line


def test_estimate_makes_no_call_and_judges_budget(api_key: str):
    examples = make_examples(100)
    prompts = PromptConfig(max_context_tokens=None)
    with FakeOpenAIServer(api_key=api_key) as server:
        config = teacher_config(server)
        generous = estimate_teacher_cost(examples, TASK, config, BudgetConfig(fraction=0.1, max_cost_usd=1.0), prompts)
        tight = estimate_teacher_cost(examples, TASK, config, BudgetConfig(fraction=0.1, max_cost_usd=0.0015), prompts)
        money_only = estimate_teacher_cost(examples, TASK, config, BudgetConfig(fraction=None, max_cost_usd=0.003), prompts)
        assert server.requests == []
    assert money_only.planned_calls == money_only.affordable_calls_worst
    assert 0 < money_only.planned_calls < 100
    assert money_only.cost_worst_usd <= 0.003
    assert generous.planned_calls == 10
    assert generous.verdict.startswith("yes")
    assert generous.cost_estimate_usd <= generous.cost_worst_usd
    assert tight.verdict.startswith(("no", "probably"))
    text = format_estimate(generous)
    assert "planned calls: 10" in text
    assert "(case ex000)" in text


def test_cli_estimate_and_ledger(tmp_path: Path, data_dir: Path, api_key: str):
    from bridge.cli import app

    runner = CliRunner()
    estimate = runner.invoke(app, ["estimate", "--set", "data.train_size=40"])
    assert estimate.exit_code == 0, estimate.output
    assert "planned calls: 2" in estimate.output
    assert "budget suffices: yes" in estimate.output

    examples = make_examples(2)
    with FakeOpenAIServer(api_key=api_key, responder=ScriptedTeacher(examples)) as server:
        buy_rationales(examples, TASK, teacher_config(server), no_cap(), tmp_path, progress=False)
        endpoint = server.base_url
    shown = runner.invoke(app, ["ledger", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert f"{endpoint} (2 request(s))" in shown.output
    assert "by model:" in shown.output
    assert api_key not in shown.output
