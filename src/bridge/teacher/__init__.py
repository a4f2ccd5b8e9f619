"""The teacher stage's machinery: backends, the spending ledger, prices, budget, cache and the buyer.

Importing this package imports neither ``openai`` nor torch; the backends do when they are built.
"""

from bridge.teacher.backends import (
    Backend,
    CallError,
    LocalBackend,
    OpenAIBackend,
    Redactor,
    ReferenceBackend,
    Reply,
    TeacherRequest,
    is_loopback_url,
    make_backend,
)
from bridge.teacher.budget import Caps, PromptTokenBound, Usage, call_cap_for, caps_from_config
from bridge.teacher.buy import TeachResult, buy_rationales, open_ledger
from bridge.teacher.cache import StoredResponse, cache_key, is_reusable
from bridge.teacher.client import Outcome, Teacher
from bridge.teacher.estimate import Estimate, estimate_teacher_cost, format_estimate
from bridge.teacher.ledger import LEDGER_FILENAME, Ledger, LedgerSummary, summarize_ledger
from bridge.teacher.prices import Price, load_price_table, resolve_price

__all__ = [
    "LEDGER_FILENAME",
    "Backend",
    "CallError",
    "Caps",
    "Estimate",
    "Ledger",
    "LedgerSummary",
    "LocalBackend",
    "OpenAIBackend",
    "Outcome",
    "Price",
    "PromptTokenBound",
    "Redactor",
    "ReferenceBackend",
    "Reply",
    "StoredResponse",
    "TeachResult",
    "Teacher",
    "TeacherRequest",
    "Usage",
    "buy_rationales",
    "cache_key",
    "call_cap_for",
    "caps_from_config",
    "estimate_teacher_cost",
    "format_estimate",
    "is_loopback_url",
    "is_reusable",
    "load_price_table",
    "make_backend",
    "open_ledger",
    "resolve_price",
    "summarize_ledger",
]
