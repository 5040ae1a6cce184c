"""The Ray the launcher's patches of Ray internals were written for, checked when the launcher is imported.

`orchestrator.launch` reaches into Ray 2.60's private parts: `ray._private.ray_constants.ENABLE_RAY_CLUSTER`
(loopback only), `NUM_REDIS_GET_RETRIES` (a quick refusal), the autoscaler monitor's process entry, Tune's
`_ActorClassCache.get` (trial actors on started workers); `orchestrator.trainable.KeepHistoryOnRetry` uses
`trial.storage` and `LoggerCallback._restore_from_remote`'s behaviour. Tests pin each of them, but a user
who upgrades Ray would get no word of it: this says so, in one line, before any of it runs.
"""
from __future__ import annotations

import os

from orchestrator.errors import UserError

__all__ = ["ALLOW_ENV", "TESTED_RAY", "check_ray_version"]

TESTED_RAY = "2.60"  # major.minor: the patches were written for and tested on 2.60.x (pyproject pins 2.60.0)
ALLOW_ENV = "BVIT_SWEEP_UNTESTED_RAY"  # =1: run on another Ray anyway, at the user's risk


def check_ray_version(installed: str | None = None) -> None:
    """A one-line `UserError` (exit 2) when the installed Ray is not the one the patches were written for,
    unless BVIT_SWEEP_UNTESTED_RAY=1."""
    if installed is None:
        import ray

        installed = ray.__version__
    if installed.split(".")[:2] == TESTED_RAY.split(".") or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UserError([f"ray {installed} is installed, but bvit-sweep's launcher patches Ray internals written for "
                     f"ray {TESTED_RAY}.x (loopback-only servers, worker reuse, retry history); install the pinned "
                     f"version (pip install 'ray[tune]=={TESTED_RAY}.0'), or set {ALLOW_ENV}=1 to try this one "
                     "at your own risk"])
