"""Seeded, stratified and grouped splitting with duplicate handling.

Every random choice draws from a :class:`random.Random` seeded through SHA-256 from the split
seed and a purpose string. Every list is sorted by example id before it is shuffled. The splits
are therefore the same on every machine and do not depend on file order or Python's ``hash()``.

NOTE: the Python documentation guarantees only ``random()`` to repeat for a seed across Python
versions, not ``shuffle()``. Both have been stable since Python 3.2, and a test pins one split.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bridge.data.text import duplicate_key
from bridge.data.types import Example


def seeded_rng(seed: int, *purpose: str) -> random.Random:
    """Return a generator seeded from ``seed`` and a purpose, stable across machines and versions."""
    digest = hashlib.sha256("/".join([str(seed), *purpose]).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)


@dataclass
class Unit:
    """Examples that must land in the same split: one group, or copies of one item."""

    members: list[Example]
    stratum: str

    @property
    def key(self) -> str:
        return self.members[0].id

    @property
    def size(self) -> int:
        return len(self.members)


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller id becomes the root, so the result does not depend on call order.
            low, high = sorted((ra, rb))
            self.parent[high] = low


def build_units(
    examples: Sequence[Example],
    stratum: Callable[[Example], str],
    *,
    grouped: bool,
    keys: dict[str, str] | None = None,
) -> list[Unit]:
    """Join exact duplicates (and examples of one group, when ``grouped``) into units.

    A unit's members are sorted by id and its stratum is that of its first member; units are
    returned sorted by their first id.
    """
    keys = keys if keys is not None else {e.id: duplicate_key(e) for e in examples}
    by_id = {e.id: e for e in examples}
    union = _UnionFind(sorted(by_id))
    first_with: dict[str, str] = {}
    for example_id in sorted(by_id):
        example = by_id[example_id]
        links = [f"key:{keys[example_id]}"]
        if grouped and example.group:
            links.append(f"group:{example.group}")
        for link in links:
            if link in first_with:
                union.union(first_with[link], example_id)
            else:
                first_with[link] = example_id
    members: dict[str, list[Example]] = defaultdict(list)
    for example_id in sorted(by_id):
        members[union.find(example_id)].append(by_id[example_id])
    units = [Unit(group, stratum(group[0])) for group in members.values()]
    return sorted(units, key=lambda unit: unit.key)


def apportion(total: int, weights: dict[str, int], capacity: dict[str, int]) -> dict[str, int]:
    """Split ``total`` over strata in proportion to ``weights`` by largest remainder, within capacity.

    Ties in the remainder go to the stratum that sorts first. When capacity cuts a stratum's
    share, the rest goes to strata with room, in remainder order.
    """
    whole = sum(weights.values())
    if whole == 0 or total <= 0:
        return dict.fromkeys(weights, 0)
    total = min(total, sum(capacity.values()))
    exact = {s: total * w / whole for s, w in weights.items()}
    shares = {s: min(math.floor(v), capacity[s]) for s, v in exact.items()}
    order = sorted(weights, key=lambda s: (-(exact[s] - math.floor(exact[s])), s))
    left = total - sum(shares.values())
    while left > 0:
        progressed = False
        for s in order:
            if left == 0:
                break
            if shares[s] < capacity[s]:
                shares[s] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return shares


def allocate(units: Sequence[Unit], targets: dict[str, int], seed: int, purpose: str) -> dict[str, list[Unit]]:
    """Assign units to the splits in ``targets`` (sizes in examples, filled in order); the rest go to "rest".

    Each split's size is divided over the strata in proportion to their sizes. Within a stratum
    the units are shuffled, and each goes to the first split that still has room for all its
    members. Sizes are exact for single examples and as close as whole groups allow otherwise.
    """
    strata: dict[str, list[Unit]] = defaultdict(list)
    for unit in sorted(units, key=lambda u: u.key):
        strata[unit.stratum].append(unit)
    sizes = {s: sum(u.size for u in group) for s, group in strata.items()}
    capacity = dict(sizes)
    quotas: dict[str, dict[str, int]] = {}
    for split, target in targets.items():
        quotas[split] = apportion(target, sizes, capacity)
        for s, share in quotas[split].items():
            capacity[s] -= share
    result: dict[str, list[Unit]] = {split: [] for split in (*targets, "rest")}
    for s in sorted(strata):
        shuffled = list(strata[s])
        seeded_rng(seed, purpose, s).shuffle(shuffled)
        room = {split: quotas[split][s] for split in targets}
        for unit in shuffled:
            for split in targets:
                if room[split] >= unit.size:
                    room[split] -= unit.size
                    result[split].append(unit)
                    break
            else:
                result["rest"].append(unit)
    return result


def members(units: Iterable[Unit]) -> list[Example]:
    """Return the examples of ``units``."""
    return [example for unit in units for example in unit.members]
