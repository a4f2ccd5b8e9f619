"""The Python API behind the command line: the functions a notebook user calls.

Each function takes a :class:`~bridge.config.BridgeConfig` (see :func:`load_config`) and returns
plain data or paths, so everything the ``bridge`` command does can be scripted.
"""

from __future__ import annotations

from bridge.config import BridgeConfig, dump_config, load_config
from bridge.errors import BridgeError

__all__ = ["BridgeConfig", "dump_config", "load_config", "run"]


def run(config: BridgeConfig, *, from_stage: str | None = None, until_stage: str | None = None) -> None:
    """Run the pipeline stages in order into the configuration's run directory."""
    raise BridgeError(
        "the pipeline is not assembled yet: the selection, teacher, training, tutoring, curriculum, "
        "evaluation and report stages are still being built",
        hint="use 'bridge config show' to check a configuration until 'bridge run' is available",
    )
