"""Errors that bridge reports to users without a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class BridgeError(Exception):
    """An error caused by input, configuration or environment that the user can fix.

    The command line prints ``str(error)`` without a traceback unless ``--debug`` is given,
    so the message names what failed, on which value, and what to do next.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ConfigError(BridgeError):
    """The configuration is invalid; the message lists every problem found."""


class DataError(BridgeError):
    """A data file is missing or contains invalid rows."""


class ModelLoadError(BridgeError):
    """A model reference could not be resolved or loaded."""


class BudgetError(BridgeError):
    """The teacher budget is invalid or has run out."""


class TeacherError(BridgeError):
    """The teacher endpoint failed in a way that retrying cannot fix."""


class StorageError(BridgeError):
    """Reading or writing the run directory failed."""


@contextlib.contextmanager
def naming_setting(key: str, value: object) -> Iterator[None]:
    """Prefix a :class:`BridgeError` raised inside the block with the setting that caused it.

    Loaders such as ``load_model`` see only a value, so the caller that read it from the
    configuration names the key here, and the message shows where to fix it.
    """
    try:
        yield
    except BridgeError as exc:
        prefix = f"{key} = {value!r}: "
        if not exc.message.startswith(prefix):
            exc.message = prefix + exc.message
            exc.args = (prefix + str(exc.args[0]) if exc.args else exc.message, *exc.args[1:])
        raise
