"""Teacher prices: the dated table in ``prices.yaml``, overrides from the configuration, exact costs.

Money is counted in integer pico-dollars (1e-12 USD) so that sums and comparisons against the
cap are exact: a price of 0.15 USD per million tokens is 150,000 pico-dollars per token.
Converting a configured price rounds up and converting a cap rounds down, so rounding can only
make the ledger overstate what was spent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from functools import lru_cache
from pathlib import Path

import yaml

from bridge.config import TeacherConfig
from bridge.errors import ConfigError

PICOUSD_PER_USD = 10**12
#: Pico-dollars per token for a price of 1 USD per million tokens.
_PICOUSD_PER_TOKEN_PER_USD_PER_MTOK = 10**6

PRICE_TABLE_PATH = Path(__file__).with_name("prices.yaml")


def usd_to_picousd(usd: float, *, round_up: bool = True) -> int:
    """Convert a USD amount to integer pico-dollars, rounding up (prices) or down (caps)."""
    value = Decimal(str(usd)) * PICOUSD_PER_USD
    return int(value.to_integral_value(rounding=ROUND_CEILING if round_up else ROUND_FLOOR))


def picousd_to_usd(picousd: int) -> float:
    """Convert integer pico-dollars to USD for display."""
    return picousd / PICOUSD_PER_USD


def _per_token(usd_per_mtok: float) -> int:
    value = Decimal(str(usd_per_mtok)) * _PICOUSD_PER_TOKEN_PER_USD_PER_MTOK
    return int(value.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Price:
    """The price of one teacher model: per prompt token, per completion token and per call."""

    model: str
    prompt_picousd_per_token: int
    completion_picousd_per_token: int
    per_call_picousd: int
    #: Where the price comes from, such as "price table of 2025-08-15" or "configuration".
    source: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Return the cost of one call in pico-dollars."""
        return (
            self.per_call_picousd
            + prompt_tokens * self.prompt_picousd_per_token
            + completion_tokens * self.completion_picousd_per_token
        )

    def describe(self) -> str:
        """Return the price in USD per million tokens and per call, with its source."""
        prompt = self.prompt_picousd_per_token / _PICOUSD_PER_TOKEN_PER_USD_PER_MTOK
        completion = self.completion_picousd_per_token / _PICOUSD_PER_TOKEN_PER_USD_PER_MTOK
        text = f"{self.model}: {prompt:g} USD/M prompt tokens, {completion:g} USD/M completion tokens"
        if self.per_call_picousd:
            text += f", {picousd_to_usd(self.per_call_picousd):g} USD per call"
        return f"{text} ({self.source})"


@dataclass(frozen=True)
class PriceTable:
    """The shipped price table: USD per million prompt and completion tokens by model name."""

    date: dt.date
    models: dict[str, tuple[float, float]]


@lru_cache(maxsize=4)
def load_price_table(path: Path = PRICE_TABLE_PATH) -> PriceTable:
    """Read and validate the dated price table."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the teacher price table {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ConfigError(f"{path}: expected a mapping with 'date' and 'models'")
    date = raw.get("date")
    if not isinstance(date, dt.date):
        raise ConfigError(f"{path}: 'date' must be a date such as 2025-08-15, found {date!r}")
    models: dict[str, tuple[float, float]] = {}
    for name, entry in raw["models"].items():
        try:
            prompt, completion = float(entry["prompt"]), float(entry["completion"])
        except (TypeError, KeyError, ValueError):
            raise ConfigError(
                f"{path}: models.{name} must have numeric 'prompt' and 'completion' prices, found {entry!r}"
            ) from None
        if prompt < 0 or completion < 0:
            raise ConfigError(f"{path}: models.{name} has a negative price")
        models[str(name)] = (prompt, completion)
    return PriceTable(date=date, models=models)


def resolve_price(teacher: TeacherConfig, table: PriceTable | None = None) -> Price:
    """Return the price of the configured teacher, or raise ConfigError when it has none.

    Per-token prices come from ``teacher.prompt_price_per_mtok`` and
    ``teacher.completion_price_per_mtok`` where set, else from the table by exact model name
    (a dated snapshot such as gpt-4o-2024-05-13 can cost more than its alias, so it needs its
    own entry). ``teacher.price_per_call`` adds a fixed amount per call. The reference backend
    needs ``price_per_call``; the local backend costs nothing unless a price is set.
    """
    table = table or load_price_table()
    per_call = usd_to_picousd(teacher.price_per_call) if teacher.price_per_call is not None else 0
    listed = table.models.get(teacher.model)
    prompt = teacher.prompt_price_per_mtok
    completion = teacher.completion_price_per_mtok
    overridden = prompt is not None or completion is not None
    source = "configuration" if overridden else f"price table of {table.date.isoformat()}"
    if listed is not None:
        prompt = listed[0] if prompt is None else prompt
        completion = listed[1] if completion is None else completion
        if overridden and (teacher.prompt_price_per_mtok is None or teacher.completion_price_per_mtok is None):
            source = f"configuration and price table of {table.date.isoformat()}"

    if teacher.backend == "reference":
        if teacher.price_per_call is None and not overridden:
            raise ConfigError(
                "teacher.price_per_call is not set for the reference backend",
                hint="set teacher.price_per_call to what one call should count as, such as 0.01 (USD), or 0 to count calls only",
            )
        return Price(teacher.model, _per_token(prompt or 0.0), _per_token(completion or 0.0), per_call, "configuration")

    if teacher.backend == "local":
        return Price(
            teacher.model,
            _per_token(prompt or 0.0),
            _per_token(completion or 0.0),
            per_call,
            "configuration" if overridden or per_call else "local model: no charge",
        )

    missing = [
        name
        for name, value in (("prompt_price_per_mtok", prompt), ("completion_price_per_mtok", completion))
        if value is None
    ]
    if missing:
        known = ", ".join(sorted(table.models))
        raise ConfigError(
            f"teacher.model '{teacher.model}' has no price: it is not in the price table of "
            f"{table.date.isoformat()} and teacher.{' and teacher.'.join(missing)} is not set",
            hint=(
                f"set teacher.prompt_price_per_mtok and teacher.completion_price_per_mtok in USD per million "
                f"tokens (0 for a self-hosted server), or use a listed model: {known}"
            ),
        )
    assert prompt is not None and completion is not None
    return Price(teacher.model, _per_token(prompt), _per_token(completion), per_call, source)
