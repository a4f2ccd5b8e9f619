"""Splitting: determinism, seeds, stratified and grouped slices, duplicates and the rounding rules."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from bridge.config import DataConfig
from bridge.data import Example, duplicate_key, load_dataset
from bridge.data.splitting import Unit, allocate, apportion, build_units, seeded_rng


def _ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def test_same_seed_same_splits(data_dir: Path):
    cfg = DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir))
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert _ids(first.train) == _ids(second.train)
    assert _ids(first.dev) == _ids(second.dev)


def test_fingerprints_track_membership(data_dir: Path):
    base = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir)))
    again = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir)))
    other = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), split_seed=1))
    assert base.report["fingerprints"] == again.report["fingerprints"]
    assert base.report["fingerprints"]["dev"] != other.report["fingerprints"]["dev"]
    assert base.report["fingerprints"]["test"] == other.report["fingerprints"]["test"]
    assert base.split_ids()["dev"] == [e.id for e in base.dev]


def test_other_seed_other_dev(data_dir: Path):
    base = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir)))
    other = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), split_seed=1))
    assert set(_ids(base.dev)) != set(_ids(other.dev))
    assert _ids(base.test) == _ids(other.test)
    assert Counter(e.gold for e in other.dev) == Counter(e.gold for e in base.dev)


def test_split_fingerprint_stable(data_dir: Path):
    # The splits must be identical on every machine and Python build. This digest changes only
    # when the splitting algorithm changes, which changes every run's data and must be deliberate.
    splits = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir)))
    assert _digest(_ids(splits.dev)) == PUBMEDQA_DEV_DIGEST


PUBMEDQA_DEV_DIGEST = "074ab307c59fad61"


def test_train_slice_stratified(data_dir: Path):
    splits = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), train_size=200))
    assert len(splits.train) == 200
    # 200 of 450 (yes 248, no 152, maybe 50) by largest remainder.
    assert Counter(e.gold for e in splits.train) == {"yes": 110, "no": 68, "maybe": 22}
    assert splits.report["slices"]["train"] == {"requested": 200, "available": 450, "kept": 200}


def test_slices_use_each_split(data_dir: Path):
    cfg = DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), train_size=100, dev_size=20, test_size=60)
    splits = load_dataset(cfg)
    full = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir)))
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (100, 20, 60)
    assert set(_ids(splits.train)) <= set(_ids(full.train))
    assert set(_ids(splits.dev)) <= set(_ids(full.dev))
    assert set(_ids(splits.test)) <= set(_ids(full.test))


def test_oversized_slice_keeps_all(data_dir: Path):
    splits = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), dev_size=80))
    assert len(splits.dev) == 50
    assert any("dev_size 80 exceeds the 50 dev examples" in note for note in splits.report["notes"])


def test_tatqa_slice_keeps_documents(data_dir: Path):
    full = load_dataset(DataConfig(dataset="tatqa", data_dir=str(data_dir)))
    sliced = load_dataset(DataConfig(dataset="tatqa", data_dir=str(data_dir), test_size=100))
    assert 94 <= len(sliced.test) <= 100
    docs = {e.group for e in sliced.test}
    assert set(_ids(sliced.test)) == {e.id for e in full.test if e.group in docs}


def test_splits_keep_source_order(data_dir: Path):
    splits = load_dataset(DataConfig(dataset="twitter_fin_sentiment", data_dir=str(data_dir)))
    rows = [int(e.id.rsplit("/", 1)[1]) for e in splits.train]
    assert rows == sorted(rows)


def test_seeded_rng_is_fixed():
    # Python guarantees random() for a given seed across versions; randrange() and shuffle() have
    # been stable since Python 3.2 without that guarantee, so this pins one value.
    assert seeded_rng(0, "x").random() == seeded_rng(0, "x").random()
    assert seeded_rng(0, "x").random() != seeded_rng(0, "y").random()
    assert seeded_rng(0, "carve").randrange(10**6) == SEEDED_RNG_FIRST


SEEDED_RNG_FIRST = 716492


def test_apportion_largest_remainder():
    assert apportion(50, {"yes": 276, "no": 169, "maybe": 55}, {"yes": 276, "no": 169, "maybe": 55}) == {
        "yes": 28,
        "no": 17,
        "maybe": 5,
    }


def test_apportion_respects_capacity():
    shares = apportion(10, {"a": 5, "b": 5}, {"a": 1, "b": 5})
    assert shares == {"a": 1, "b": 5}


def _example(i: int, gold: str = "yes", group: str | None = None, question: str | None = None) -> Example:
    return Example(id=f"e{i:03d}", question=question or f"Question number {i}?", gold=gold, group=group)


def test_build_units_joins_copies_and_groups():
    examples = [
        _example(1, question="Same question?"),
        _example(2, question="same   QUESTION"),
        _example(3, group="g"),
        _example(4, group="g"),
        _example(5),
    ]
    units = build_units(examples, lambda e: e.gold, grouped=True)
    assert sorted(sorted(e.id for e in u.members) for u in units) == [["e001", "e002"], ["e003", "e004"], ["e005"]]
    ungrouped = build_units(examples, lambda e: e.gold, grouped=False)
    assert len(ungrouped) == 4


def test_allocate_never_splits_a_unit():
    units = [Unit([_example(i * 10 + j) for j in range(1 + i % 4)], "s") for i in range(40)]
    total = sum(u.size for u in units)
    result = allocate(units, {"dev": 20}, seed=3, purpose="t")
    sizes = sum(u.size for u in result["dev"])
    assert 15 <= sizes <= 20
    assert sum(u.size for u in result["rest"]) == total - sizes


def test_allocate_independent_of_input_order():
    units = [Unit([_example(i)], "yes" if i % 3 else "no") for i in range(60)]
    forward = allocate(units, {"dev": 12}, seed=0, purpose="p")
    backward = allocate(list(reversed(units)), {"dev": 12}, seed=0, purpose="p")
    assert [u.key for u in forward["dev"]] == [u.key for u in backward["dev"]]


@pytest.mark.parametrize("name", ["pubmedqa_pqal", "medqa_usmle4_test", "twitter_fin_sentiment"])
def test_carved_dev_stratified(data_dir: Path, name: str):
    splits = load_dataset(DataConfig(dataset=name, data_dir=str(data_dir)))
    train = Counter(e.gold for e in splits.train)
    dev = Counter(e.gold for e in splits.dev)
    for label in splits.task.labels:
        expected = len(splits.dev) * train[label] / len(splits.train)
        assert abs(dev[label] - expected) <= 2, label


def test_mmlu_copies_share_a_split(data_dir: Path):
    splits = load_dataset(DataConfig(dataset="mmlu_law_med_fin", data_dir=str(data_dir)))
    where: dict[str, set[str]] = {}
    for split in ("train", "dev", "test"):
        for e in splits.split(split):
            where.setdefault(duplicate_key(e), set()).add(split)
    assert all(len(places) == 1 for places in where.values())
    # 99 copies in all: 5 pair a few-shot item with a val/test item, 94 lie within val/test.
    fewshot_twins = splits.report["duplicates"]["dropped"]["fewshot"] + sum(
        1 for e in splits.fewshot if duplicate_key(e) in where
    )
    assert fewshot_twins == 5
    within = splits.report["duplicates"]["within_split"]
    assert within["train"] + within["dev"] + within["test"] == 94


def test_fractions_must_leave_training():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be below 1"):
        DataConfig(dev_fraction=0.4, test_fraction=0.6)


def test_fractions_change_carving(data_dir: Path):
    splits = load_dataset(DataConfig(dataset="medqa_usmle4_test", data_dir=str(data_dir), test_fraction=0.5, dev_fraction=0.2))
    assert (len(splits.test), len(splits.dev)) == (637, 255)
    assert len(splits.train) == 1273 - 637 - 255
