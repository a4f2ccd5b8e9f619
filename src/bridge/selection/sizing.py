"""The subset size and teacher call cap that a budget sets for a pool."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from bridge.config import BudgetConfig
from bridge.errors import BudgetError


@dataclass(frozen=True)
class SubsetSize:
    """How many examples to select and how many teacher calls they may use.

    ``call_cap`` counts every call, re-asks included, so when re-asks happen the teacher stage
    reaches the cap before the end of the ordered subset. ``examples`` is the number of picks
    to request: the call cap, but never more than the pool holds.
    """

    examples: int
    call_cap: int
    rule: Literal["fraction", "count", "money"]
    explanation: str


def subset_size(budget: BudgetConfig, pool_size: int, *, cost_per_call: float | None = None) -> SubsetSize:
    """Return the subset size from exactly one of budget.fraction, budget.count or budget.max_cost_usd.

    fraction: a call cap of ceil(fraction * pool_size). count: a call cap of count. Money (both
    null): the calls that max_cost_usd buys at ``cost_per_call`` USD each, rounded down. A set
    budget.max_calls lowers the cap further in every case.
    """
    if pool_size < 0:
        raise ValueError(f"pool size must be non-negative, got {pool_size}")
    rule: Literal["fraction", "count", "money"]
    if budget.fraction is not None:
        rule = "fraction"
        cap = math.ceil(budget.fraction * pool_size)
        explanation = f"ceil({budget.fraction:g} x {pool_size} examples) = {cap} calls"
    elif budget.count is not None:
        rule = "count"
        cap = budget.count
        explanation = f"budget.count = {cap} calls"
    elif budget.max_cost_usd is not None:
        rule = "money"
        if cost_per_call is None or not math.isfinite(cost_per_call) or cost_per_call <= 0:
            raise BudgetError(
                f"cannot size the subset from budget.max_cost_usd = {budget.max_cost_usd:g}: "
                f"the estimated cost per call is {cost_per_call!r}, expected a positive number of USD",
                hint="set teacher.price_per_call or the model's prices, or set budget.fraction or budget.count",
            )
        # The epsilon keeps an exact multiple, such as 1.00 / 0.01, from rounding down to 99.
        cap = math.floor(budget.max_cost_usd / cost_per_call + 1e-9)
        explanation = f"floor({budget.max_cost_usd:g} USD / {cost_per_call:.6g} USD per call) = {cap} calls"
    else:
        raise BudgetError(
            "the subset size is undefined: budget.fraction, budget.count and budget.max_cost_usd are all null",
            hint="set one of them, for example budget.fraction=0.05 to send 5 % of the pool to the teacher",
        )

    if budget.max_calls is not None and budget.max_calls < cap:
        explanation += f", lowered to budget.max_calls = {budget.max_calls}"
        cap = budget.max_calls
    return SubsetSize(examples=min(cap, pool_size), call_cap=cap, rule=rule, explanation=explanation)
