"""The teacher budget: caps in calls, tokens and money, and worst-case bounds for one call.

Before each attempt the client reserves the attempt's worst case: an upper bound on the prompt
tokens plus ``max_tokens`` completion tokens, priced with :class:`~bridge.teacher.prices.Price`.
A reservation that fits under every cap is the only way an attempt can start, so the sum of
what the ledger counts never passes a cap as long as endpoints bill no more than they report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config import BudgetConfig, TeacherConfig
from bridge.errors import ConfigError
from bridge.teacher.prices import Price, picousd_to_usd, usd_to_picousd

log = logging.getLogger(__name__)

#: Tokens added per chat message on top of its content when no tokenizer is configured. Chat
#: templates wrap each message in a few role and separator tokens (ChatML uses about 5).
MESSAGE_OVERHEAD_TOKENS = 8
#: Tokens added once per request for the assistant's reply header and any template preamble.
REQUEST_OVERHEAD_TOKENS = 8


@dataclass(frozen=True)
class Usage:
    """Calls, tokens and money, as counted against the caps."""

    calls: int = 0
    tokens: int = 0
    picousd: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.calls + other.calls, self.tokens + other.tokens, self.picousd + other.picousd)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.calls - other.calls, self.tokens - other.tokens, self.picousd - other.picousd)

    @property
    def usd(self) -> float:
        return picousd_to_usd(self.picousd)


@dataclass(frozen=True)
class Caps:
    """Hard limits on teacher spending; None means unlimited in that unit."""

    calls: int | None = None
    tokens: int | None = None
    picousd: int | None = None

    def fits(self, used: Usage) -> bool:
        """Return True when ``used`` stays within every cap."""
        return (
            (self.calls is None or used.calls <= self.calls)
            and (self.tokens is None or used.tokens <= self.tokens)
            and (self.picousd is None or used.picousd <= self.picousd)
        )

    def describe(self) -> str:
        parts = []
        if self.calls is not None:
            parts.append(f"{self.calls} calls")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        if self.picousd is not None:
            parts.append(f"{picousd_to_usd(self.picousd):.6g} USD")
        return ", ".join(parts) or "no cap"


def call_cap_for(budget: BudgetConfig, pool_size: int) -> int | None:
    """Return the call cap that ``budget.fraction`` or ``budget.count`` sets for a pool of this size."""
    if budget.count is not None:
        return budget.count
    if budget.fraction is not None:
        return math.ceil(budget.fraction * pool_size)
    return None


def caps_from_config(budget: BudgetConfig, call_cap: int | None = None) -> Caps:
    """Combine the budget's hard caps with the call cap from the subset size (the smaller wins)."""
    calls = budget.max_calls
    if call_cap is not None:
        calls = call_cap if calls is None else min(calls, call_cap)
    picousd = usd_to_picousd(budget.max_cost_usd, round_up=False) if budget.max_cost_usd is not None else None
    return Caps(calls=calls, tokens=budget.max_tokens, picousd=picousd)


class PromptTokenBound:
    """An upper bound on the prompt tokens an endpoint counts for a chat request.

    With a tokenizer the bound is the larger of the chat-templated length and the sum of the
    message lengths plus a per-message overhead. Without one it is the UTF-8 byte count plus the
    overhead, which bounds any byte-level BPE tokenizer because each of its tokens covers at
    least one byte.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, messages: Sequence[Mapping[str, str]]) -> int:
        overhead = REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages)
        if self.tokenizer is None:
            size = sum(len(str(m.get("content", "")).encode("utf-8")) for m in messages)
            return size + overhead
        return max(self._templated(messages), self._content_tokens(messages) + overhead)

    def _content_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        return sum(
            len(self.tokenizer.encode(str(m.get("content", "")), add_special_tokens=False)) for m in messages
        )

    def _templated(self, messages: Sequence[Mapping[str, str]]) -> int:
        if not getattr(self.tokenizer, "chat_template", None):
            return 0
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return len(ids)


def load_bound_tokenizer(teacher: TeacherConfig) -> Any:
    """Load ``teacher.tokenizer`` for the prompt-token bound, or return None when unset."""
    if not teacher.tokenizer:
        return None
    from transformers import AutoTokenizer

    from bridge.models.loading import resolve_model

    try:
        folder = resolve_model(teacher.tokenizer)
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"teacher.tokenizer '{teacher.tokenizer}' could not be loaded: {exc}",
            hint="point teacher.tokenizer at a local folder with tokenizer files, or unset it to bound prompts by UTF-8 bytes",
        ) from None


@dataclass(frozen=True)
class WorstCase:
    """The most one attempt can cost."""

    prompt_tokens: int
    completion_tokens: int
    picousd: int

    @property
    def usage(self) -> Usage:
        return Usage(calls=1, tokens=self.prompt_tokens + self.completion_tokens, picousd=self.picousd)


def worst_case(price: Price, prompt_bound: int, completion_bound: int) -> WorstCase:
    """Return the worst case of one attempt from its token bounds."""
    return WorstCase(prompt_bound, completion_bound, price.cost(prompt_bound, completion_bound))


def check_budget(teacher: TeacherConfig, budget: BudgetConfig, caps: Caps, cheapest: WorstCase | None) -> None:
    """Raise ConfigError when the budget is zero with the teacher on, or cannot pay for one call.

    ``cheapest`` is the smallest worst case among the calls the stage would make (None when there
    is nothing to ask).
    """
    if not teacher.enabled:
        return
    zero = [
        name
        for name, value in (
            ("budget.max_calls", budget.max_calls),
            ("budget.max_tokens", budget.max_tokens),
            ("budget.max_cost_usd", budget.max_cost_usd),
        )
        if value == 0
    ]
    if caps.calls == 0 and not zero:
        zero.append("the call cap from budget.fraction or budget.count")
    if zero:
        raise ConfigError(
            f"{', '.join(zero)} is 0 but the teacher stage is on",
            hint="raise the budget, or set teacher.enabled: false to run without the teacher",
        )
    if cheapest is None:
        return
    if caps.tokens is not None and cheapest.usage.tokens > caps.tokens:
        raise ConfigError(
            f"budget.max_tokens = {caps.tokens} is smaller than one call: the smallest request needs up to "
            f"{cheapest.prompt_tokens} prompt tokens plus teacher.max_tokens = {cheapest.completion_tokens}",
            hint=f"raise budget.max_tokens to at least {cheapest.usage.tokens}, or lower teacher.max_tokens",
        )
    if caps.picousd is not None and cheapest.picousd > caps.picousd:
        raise ConfigError(
            f"budget.max_cost_usd = {budget.max_cost_usd} is smaller than one call: the smallest request can cost "
            f"{picousd_to_usd(cheapest.picousd):.6g} USD ({cheapest.prompt_tokens} prompt tokens at most plus "
            f"{cheapest.completion_tokens} completion tokens)",
            hint=f"raise budget.max_cost_usd to at least {picousd_to_usd(cheapest.picousd):.6g}, or lower teacher.max_tokens",
        )
