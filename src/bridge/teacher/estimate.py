"""Offline cost estimate of the teacher stage: render the first prompts, price them, compare with the budget.

No network call is made and no API key is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import BudgetConfig, PromptConfig, TeacherConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import naming_setting
from bridge.teacher.backends import is_loopback_url, public_endpoint
from bridge.teacher.budget import (
    Caps,
    PromptTokenBound,
    call_cap_for,
    caps_from_config,
    check_budget,
    load_bound_tokenizer,
    worst_case,
)
from bridge.teacher.prices import Price, picousd_to_usd, resolve_price

#: Prompts rendered to measure the mean prompt length; the rest are extrapolated from them.
MAX_RENDERED = 200
#: English text averages about 4 UTF-8 bytes per token with GPT-style tokenizers, so the
#: typical prompt length is estimated as a quarter of the byte bound when no tokenizer is set.
BYTES_PER_TOKEN_ESTIMATE = 4


@dataclass
class Estimate:
    """The planned teacher spending and whether the budget covers it (money in USD)."""

    backend: str
    model: str
    endpoint: str
    leaves_machine: bool
    price: str
    pool_size: int
    planned_calls: int
    rendered: int
    prompt_tokens_estimate: float
    prompt_tokens_bound: float
    completion_tokens_max: float
    tokens_estimate: int
    tokens_worst: int
    cost_estimate_usd: float
    cost_worst_usd: float
    caps: str
    affordable_calls_worst: int | None
    verdict: str
    first_prompt: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _affordable(caps: Caps, per_call_tokens: float, per_call_picousd: float) -> int | None:
    """Return how many calls of this size fit under the caps (None when no cap limits them)."""
    limits = []
    if caps.tokens is not None:
        limits.append(math.floor(caps.tokens / per_call_tokens) if per_call_tokens else math.inf)
    if caps.picousd is not None:
        limits.append(math.floor(caps.picousd / per_call_picousd) if per_call_picousd else math.inf)
    if caps.calls is not None:
        limits.append(caps.calls)
    if not limits:
        return None
    best = min(limits)
    return None if best == math.inf else int(best)


def estimate_teacher_cost(
    pool: Sequence[Example],
    task: TaskSpec,
    teacher: TeacherConfig,
    budget: BudgetConfig,
    prompts: PromptConfig,
    *,
    demos: Sequence[Example] = (),
) -> Estimate:
    """Estimate the teacher stage for a training pool without calling the teacher.

    The planned calls are the call cap (``ceil(budget.fraction * pool)`` or ``budget.count``,
    limited by ``budget.max_calls``). The examples are the first ones of the pool, because the
    selection stage that picks the real subset needs the local model. Raises ConfigError for
    a model without a price or a budget that cannot pay for one call.
    """
    from bridge.prompts import format_target, render_messages, target_answer

    price: Price = resolve_price(teacher)
    with naming_setting("teacher.tokenizer", teacher.tokenizer):
        tokenizer = load_bound_tokenizer(teacher)
    bound = PromptTokenBound(tokenizer)
    call_cap = call_cap_for(budget, len(pool))
    caps = caps_from_config(budget, call_cap)
    most = len(pool) * (2 if teacher.policy == "reask_with_hint" else 1)
    planned = min(caps.calls, most) if caps.calls is not None else most
    notes: list[str] = []

    sample = list(pool[: max(1, min(planned, MAX_RENDERED))])
    max_context = prompts.max_context_tokens if tokenizer is not None else None
    if tokenizer is None and prompts.max_context_tokens is not None:
        notes.append(
            "contexts are not trimmed to prompts.max_context_tokens without teacher.tokenizer, "
            "so prompt sizes are overstated"
        )
    rendered = [
        render_messages(
            example,
            task,
            style="rationale",
            demos=[d for d in demos if d.id != example.id],
            system=prompts.system,
            tokenizer=tokenizer,
            max_context_tokens=max_context,
        ).messages
        for example in sample
    ]
    bounds = [bound(messages) for messages in rendered]
    if tokenizer is not None:
        estimates = [float(b) for b in bounds]
    else:
        estimates = [b / BYTES_PER_TOKEN_ESTIMATE for b in bounds]
        notes.append(
            f"prompt tokens are estimated as UTF-8 bytes / {BYTES_PER_TOKEN_ESTIMATE}; "
            "set teacher.tokenizer for exact counts"
        )
    if teacher.backend == "reference":
        completions = [
            float(bound([{"role": "assistant", "content": format_target(e.explanation or "", target_answer(e, task))}]))
            for e in sample
        ]
    else:
        completions = [float(teacher.max_tokens)] * len(sample)
        notes.append("completions are counted at teacher.max_tokens each, the most a call can return")

    count = max(len(sample), 1)
    prompt_mean = sum(estimates) / count
    bound_mean = sum(bounds) / count
    completion_mean = sum(completions) / count
    per_call_estimate = price.cost(math.ceil(prompt_mean), math.ceil(completion_mean))
    worst = [worst_case(price, b, math.ceil(c)) for b, c in zip(bounds, completions, strict=True)]
    check_budget(teacher, budget, caps, min(worst, key=lambda w: w.picousd, default=None))
    per_call_worst = sum(w.picousd for w in worst) / count
    tokens_worst_per_call = sum(w.usage.tokens for w in worst) / count

    affordable = _affordable(caps, tokens_worst_per_call, per_call_worst)
    if caps.calls is None and affordable is not None:
        # Without budget.fraction or budget.count the subset is what the money buys.
        planned = min(most, affordable)
        notes.append("budget.fraction and budget.count are unset, so the planned calls are those the budget buys at the worst case")
    cost_worst = picousd_to_usd(int(per_call_worst * planned))
    cost_estimate = picousd_to_usd(per_call_estimate * planned)
    affordable_estimate = _affordable(caps, prompt_mean + completion_mean, per_call_estimate)
    if affordable is None or affordable >= planned:
        verdict = "yes: the budget covers every planned call even at its worst case"
    elif affordable_estimate is None or affordable_estimate >= planned:
        verdict = (
            f"probably: the estimate fits, but at the worst case only {affordable} of {planned} calls fit "
            "and the stage stops at the cap"
        )
    else:
        verdict = f"no: the budget buys about {affordable} of {planned} planned calls; the stage will stop at the cap"

    url = teacher.base_url or "https://api.openai.com/v1"
    endpoint = public_endpoint(url) if teacher.backend == "openai" else teacher.backend
    return Estimate(
        backend=teacher.backend,
        model=teacher.model,
        endpoint=endpoint,
        leaves_machine=teacher.backend == "openai" and not is_loopback_url(url),
        price=price.describe(),
        pool_size=len(pool),
        planned_calls=planned,
        rendered=len(sample),
        prompt_tokens_estimate=prompt_mean,
        prompt_tokens_bound=bound_mean,
        completion_tokens_max=completion_mean,
        tokens_estimate=math.ceil((prompt_mean + completion_mean) * planned),
        tokens_worst=math.ceil(tokens_worst_per_call * planned),
        cost_estimate_usd=cost_estimate,
        cost_worst_usd=cost_worst,
        caps=caps.describe(),
        affordable_calls_worst=affordable,
        verdict=verdict,
        first_prompt=[dict(m) for m in rendered[0]] if rendered else [],
        notes=notes,
    )


def format_estimate(estimate: Estimate) -> str:
    """Render an estimate as the text ``bridge estimate`` prints."""
    lines = [
        f"teacher: {estimate.backend} / {estimate.model} at {estimate.endpoint}"
        + (" (data leaves this machine)" if estimate.leaves_machine else ""),
        f"price: {estimate.price}",
        f"training pool: {estimate.pool_size} examples; planned calls: {estimate.planned_calls} "
        f"(re-asks included); prompts rendered: {estimate.rendered}",
        f"prompt tokens per call: about {estimate.prompt_tokens_estimate:.0f} (at most {estimate.prompt_tokens_bound:.0f})",
        f"completion tokens per call: at most {estimate.completion_tokens_max:.0f}",
        f"tokens: about {estimate.tokens_estimate} (at most {estimate.tokens_worst})",
        f"cost: about {estimate.cost_estimate_usd:.4f} USD (at most {estimate.cost_worst_usd:.4f} USD)",
        f"budget: {estimate.caps}",
        f"budget suffices: {estimate.verdict}",
    ]
    lines.extend(f"note: {note}" for note in estimate.notes)
    if estimate.first_prompt:
        lines.append("first prompt:")
        for message in estimate.first_prompt:
            lines.append(f"  [{message['role']}]")
            lines.extend(f"    {line}" for line in str(message["content"]).splitlines())
    return "\n".join(lines)


def estimate_dict(estimate: Estimate) -> dict[str, Any]:
    """Return the estimate as a JSON-serialisable dict."""
    from dataclasses import asdict

    return asdict(estimate)
