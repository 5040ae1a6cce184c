"""Where the live progress callback lived: sweeps launched before it moved to orchestrator.callbacks pickled it (in
Tune's tuner.pkl) as `orchestrator.progress.ProgressTable`; their `--resume` finds it here, Ray imported only then.
The trial tables themselves are in orchestrator.tables."""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ProgressTable":
        from orchestrator.callbacks import ProgressTable
        return ProgressTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
