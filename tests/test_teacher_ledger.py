"""Prices, cache keys, budget checks and the SQLite ledger of the teacher stage."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bridge.config import BudgetConfig, TeacherConfig
from bridge.errors import ConfigError, StorageError
from bridge.teacher.budget import (
    Caps,
    PromptTokenBound,
    Usage,
    call_cap_for,
    caps_from_config,
    check_budget,
    worst_case,
)
from bridge.teacher.cache import StoredResponse, cache_key, is_reusable
from bridge.teacher.ledger import (
    CACHED,
    IN_DOUBT,
    OK,
    REJECTED,
    AttemptInfo,
    Ledger,
    format_ledger_summary,
    summarize_ledger,
)
from bridge.teacher.prices import (
    PICOUSD_PER_USD,
    Price,
    load_price_table,
    picousd_to_usd,
    resolve_price,
    usd_to_picousd,
)
from fakes.openai_server import prompt_tokens_of

# --------------------------------------------------------------------------------------------
# Prices


def test_price_table_is_dated_and_lists_models():
    table = load_price_table()
    assert table.date.year >= 2025
    assert table.models["gpt-4o-mini"] == (0.15, 0.60)


def test_price_from_table_costs_exactly():
    price = resolve_price(TeacherConfig(backend="openai", model="gpt-4o-mini"))
    assert price.prompt_picousd_per_token == 150_000
    assert price.completion_picousd_per_token == 600_000
    # 1000 prompt + 500 completion tokens = 0.00015 + 0.0003 USD
    assert price.cost(1000, 500) == usd_to_picousd(0.00045)
    assert "price table of" in price.source


def test_price_missing_is_config_error():
    with pytest.raises(ConfigError) as info:
        resolve_price(TeacherConfig(backend="openai", model="my-vllm-model"))
    message = str(info.value)
    assert "my-vllm-model" in message
    assert "teacher.prompt_price_per_mtok" in message


def test_price_override_and_partial_override():
    full = resolve_price(
        TeacherConfig(backend="openai", model="x", prompt_price_per_mtok=0.0375, completion_price_per_mtok=0)
    )
    assert full.prompt_picousd_per_token == 37_500
    assert full.completion_picousd_per_token == 0
    partial = resolve_price(TeacherConfig(backend="openai", model="gpt-4o", completion_price_per_mtok=5.0))
    assert partial.prompt_picousd_per_token == 2_500_000
    assert partial.completion_picousd_per_token == 5_000_000
    with pytest.raises(ConfigError):
        resolve_price(TeacherConfig(backend="openai", model="unknown", prompt_price_per_mtok=1.0))


def test_price_reference_needs_price_per_call():
    with pytest.raises(ConfigError) as info:
        resolve_price(TeacherConfig(backend="reference"))
    assert "teacher.price_per_call" in str(info.value)
    price = resolve_price(TeacherConfig(backend="reference", price_per_call=0.01))
    assert price.cost(10_000, 10_000) == usd_to_picousd(0.01)


def test_price_local_is_free_unless_set():
    assert resolve_price(TeacherConfig(backend="local", model="m")).cost(1000, 1000) == 0


def test_usd_conversion_rounds_safely():
    assert usd_to_picousd(0.1) == PICOUSD_PER_USD // 10
    assert usd_to_picousd(1e-13) == 1
    assert usd_to_picousd(1e-13, round_up=False) == 0
    assert picousd_to_usd(usd_to_picousd(2.5)) == 2.5


# --------------------------------------------------------------------------------------------
# Cache keys


def _key(**changes):
    base = dict(
        example_id="e1",
        messages=[{"role": "user", "content": "q"}],
        backend="openai",
        model="m",
        sampling={"temperature": 0.0, "top_p": 1.0},
    )
    base.update(changes)
    return cache_key(**base)


def test_cache_key_covers_content():
    reference = _key()
    assert _key() == reference
    assert _key(example_id="e2") != reference
    assert _key(messages=[{"role": "user", "content": "q2"}]) != reference
    assert _key(model="m2") != reference
    assert _key(sampling={"temperature": 0.7, "top_p": 1.0}) != reference


def test_cache_key_rejects_max_tokens():
    with pytest.raises(ValueError):
        _key(sampling={"temperature": 0.0, "max_tokens": 10})


def _stored(finish: str, completion: int | None, max_tokens: int) -> StoredResponse:
    return StoredResponse("k", 1, "text", finish, 10, completion, max_tokens, 0)


def test_reuse_stop_response_when_limit_fits():
    assert is_reusable(_stored("stop", 40, 256), 40)
    assert is_reusable(_stored("stop", 40, 256), 1000)
    assert not is_reusable(_stored("stop", 40, 256), 39)
    # Without a reported length, the limit it was produced under is used instead.
    assert is_reusable(_stored("stop", None, 256), 256)
    assert not is_reusable(_stored("stop", None, 256), 255)


def test_reuse_length_response_only_as_same_failure():
    assert is_reusable(_stored("length", 64, 64), 64)
    assert is_reusable(_stored("length", 64, 64), 32)
    assert not is_reusable(_stored("length", 64, 64), 65)
    assert not is_reusable(_stored("content_filter", 3, 64), 64)


# --------------------------------------------------------------------------------------------
# Budget


def test_call_cap_from_fraction_or_count():
    assert call_cap_for(BudgetConfig(fraction=0.05), 201) == 11
    assert call_cap_for(BudgetConfig(fraction=None, count=7), 201) == 7
    assert call_cap_for(BudgetConfig(fraction=None, max_cost_usd=1.0), 201) is None


def test_caps_take_smaller_call_limit():
    caps = caps_from_config(BudgetConfig(fraction=None, max_calls=5, max_cost_usd=0.5, max_tokens=100), 9)
    assert caps == Caps(calls=5, tokens=100, picousd=usd_to_picousd(0.5))
    assert caps_from_config(BudgetConfig(fraction=None, max_calls=50, max_cost_usd=10.0), 9).calls == 9


def test_prompt_bound_covers_server_count():
    messages = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Context: ünïcødé text, numbers 1,234.5 and more words here."},
    ]
    bound = PromptTokenBound()(messages)
    assert bound >= prompt_tokens_of(messages)
    assert bound == sum(len(m["content"].encode()) for m in messages) + 8 + 8 * 2


def test_prompt_bound_with_tokenizer(tiny_tokenizer):
    messages = [{"role": "user", "content": "Is the treatment effective? Answer: yes"}]
    bound = PromptTokenBound(tiny_tokenizer)(messages)
    templated = tiny_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert bound >= len(templated)
    assert bound < PromptTokenBound()(messages) + 10


def _price(per_token: int = 1_000_000) -> Price:
    return Price("m", per_token, per_token, 0, "test")


def test_budget_zero_with_teacher_on_is_error():
    teacher = TeacherConfig()
    budget = BudgetConfig(fraction=None, max_calls=0, max_cost_usd=10.0)
    with pytest.raises(ConfigError) as info:
        check_budget(teacher, budget, caps_from_config(budget), None)
    assert "budget.max_calls" in str(info.value)
    check_budget(TeacherConfig(enabled=False), budget, caps_from_config(budget), None)


def test_budget_smaller_than_one_call_is_error():
    teacher = TeacherConfig()
    cheapest = worst_case(_price(), 100, 256)
    money = BudgetConfig(fraction=None, max_cost_usd=0.0001)
    with pytest.raises(ConfigError) as info:
        check_budget(teacher, money, caps_from_config(money), cheapest)
    assert "budget.max_cost_usd" in str(info.value)
    tokens = BudgetConfig(fraction=None, max_tokens=300, max_cost_usd=10.0)
    with pytest.raises(ConfigError) as info:
        check_budget(teacher, tokens, caps_from_config(tokens), cheapest)
    assert "budget.max_tokens" in str(info.value)
    enough = BudgetConfig(fraction=None, max_cost_usd=0.000356, max_tokens=356)
    check_budget(teacher, enough, caps_from_config(enough), cheapest)


# --------------------------------------------------------------------------------------------
# Ledger


def _info(example: str = "e1", key: str = "k1", attempt: int = 1) -> AttemptInfo:
    return AttemptInfo(example, key, "ask", "openai", "http://127.0.0.1:1/v1", "m", attempt, 100)


def test_ledger_reservation_respects_every_cap(tmp_path: Path):
    worst = worst_case(_price(), 50, 100)  # 150 tokens, 150 micro-USD
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        calls = Caps(calls=2)
        assert ledger.reserve(_info(key="a"), worst, calls) is not None
        assert ledger.reserve(_info(key="b"), worst, calls) is not None
        assert ledger.reserve(_info(key="c"), worst, calls, wait=False) is None
        assert ledger.reserve(_info(key="d"), worst, Caps(tokens=449), wait=False) is None
        assert ledger.reserve(_info(key="e"), worst, Caps(picousd=worst.picousd * 2), wait=False) is None
        assert ledger.used == Usage(2, 300, worst.picousd * 2)


def test_ledger_settles_to_reported_cost(tmp_path: Path):
    price = _price()
    worst = worst_case(price, 50, 100)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        attempt = ledger.reserve(_info(), worst, Caps())
        settlement = ledger.settle_response(
            attempt, _info(), text="hi\nAnswer: yes", finish_reason="stop", prompt_tokens=20,
            completion_tokens=5, cost_picousd=price.cost(20, 5), latency_s=0.1,
        )
        assert settlement.charged == Usage(1, 25, price.cost(20, 5))
        assert ledger.used == Usage(1, 25, price.cost(20, 5))
        stored = ledger.lookup("k1")
        assert stored is not None
        assert stored.text == "hi\nAnswer: yes"
        assert stored.completion_tokens == 5
        assert stored.cost_picousd == price.cost(20, 5)


def test_ledger_failure_charges(tmp_path: Path):
    worst = worst_case(_price(), 50, 100)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rejected = ledger.reserve(_info(key="a"), worst, Caps())
        assert ledger.settle_failure(rejected, billed=False, error="HTTP 429", latency_s=0.01, http_status=429) == Usage()
        doubtful = ledger.reserve(_info(key="b"), worst, Caps())
        assert ledger.settle_failure(doubtful, billed=None, error="timed out", latency_s=1.0) == worst.usage
        assert ledger.used == worst.usage
        with pytest.raises(ValueError):
            ledger.settle_failure(doubtful, billed=True, error="x", latency_s=0.0)
    rows = dict(sqlite3.connect(tmp_path / "ledger.sqlite").execute("SELECT cache_key, status FROM attempts"))
    assert rows == {"a": REJECTED, "b": IN_DOUBT}


def test_ledger_waits_for_in_flight_reservation(tmp_path: Path):
    price = _price()
    worst = worst_case(price, 50, 100)
    caps = Caps(picousd=worst.picousd + worst.picousd // 2)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        first = ledger.reserve(_info(key="a"), worst, caps)
        got: list[int | None] = []
        waiter = threading.Thread(target=lambda: got.append(ledger.reserve(_info(key="b"), worst, caps)))
        waiter.start()
        time.sleep(0.2)
        assert got == []  # blocked: the first reservation may still settle for less
        ledger.settle_response(
            first, _info(key="a"), text="t", finish_reason="stop", prompt_tokens=10, completion_tokens=10,
            cost_picousd=price.cost(10, 10), latency_s=0.0,
        )
        waiter.join(5)
        assert got and got[0] is not None
        assert ledger.used.picousd == price.cost(10, 10) + worst.picousd


def test_ledger_waiting_reservation_fails_when_nothing_frees(tmp_path: Path):
    worst = worst_case(_price(), 50, 100)
    caps = Caps(calls=1)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        first = ledger.reserve(_info(key="a"), worst, caps)
        got: list[int | None] = []
        waiter = threading.Thread(target=lambda: got.append(ledger.reserve(_info(key="b"), worst, caps)))
        waiter.start()
        time.sleep(0.1)
        ledger.settle_failure(first, billed=None, error="connection dropped", latency_s=0.1)
        waiter.join(5)
        assert got == [None]


def test_ledger_unsettled_rows_become_in_doubt(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    worst = worst_case(_price(), 50, 100)
    ledger = Ledger(path)
    ledger.reserve(_info(), worst, Caps())
    ledger.close()  # as if the process died with the request in flight
    with Ledger(path) as reopened:
        assert reopened.used == worst.usage
        assert reopened.in_flight == 0
    status = sqlite3.connect(path).execute("SELECT status FROM attempts").fetchone()[0]
    assert status == IN_DOUBT


def test_ledger_is_locked_to_one_process(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path):
        with pytest.raises(StorageError) as info:
            Ledger(path)
        assert "in use by another bridge process" in str(info.value)
    Ledger(path).close()


def test_ledger_keeps_the_more_useful_response(tmp_path: Path):
    price = _price()
    worst = worst_case(price, 10, 10)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        def settle(text: str, finish: str, max_tokens: int) -> None:
            info = AttemptInfo("e1", "k", "ask", "openai", "u", "m", 1, max_tokens)
            attempt = ledger.reserve(info, worst, Caps())
            ledger.settle_response(
                attempt, info, text=text, finish_reason=finish, prompt_tokens=1, completion_tokens=1,
                cost_picousd=1, latency_s=0.0,
            )

        settle("cut short", "length", 64)
        settle("cut shorter", "length", 32)
        assert ledger.lookup("k").text == "cut short"
        settle("complete", "stop", 128)
        settle("cut again", "length", 256)
        assert ledger.lookup("k").text == "complete"


def test_ledger_summary_counts(tmp_path: Path):
    price = _price()
    worst = worst_case(price, 50, 100)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ok = ledger.reserve(_info(key="a"), worst, Caps())
        settlement = ledger.settle_response(
            ok, _info(key="a"), text="t", finish_reason="stop", prompt_tokens=10, completion_tokens=10,
            cost_picousd=price.cost(10, 10), latency_s=0.0,
        )
        ledger.set_label(ok, "correct")
        retry = ledger.reserve(_info(key="b", attempt=2), worst, Caps())
        ledger.settle_failure(retry, billed=None, error="timed out", latency_s=1.0)
        ledger.record_cached(_info(key="a", attempt=0), settlement.stored)
        summary = summarize_ledger(tmp_path)
    assert summary.spent_usd == picousd_to_usd(price.cost(10, 10))
    assert summary.in_doubt_usd == picousd_to_usd(worst.picousd)
    assert summary.responses == 1
    assert summary.cached == 1
    assert summary.retried == 1
    assert summary.by_status[OK]["attempts"] == 1
    assert summary.by_status[CACHED]["usd"] == 0
    assert summary.labels == {"correct": 1}
    assert summary.endpoints == {"http://127.0.0.1:1/v1": 2}
    text = format_ledger_summary(summary)
    assert "http://127.0.0.1:1/v1 (2 request(s))" in text
    assert "in_doubt" in text


def test_ledger_summary_missing_file(tmp_path: Path):
    with pytest.raises(StorageError):
        summarize_ledger(tmp_path)
