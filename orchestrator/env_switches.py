"""The environment variables the launch sets for Ray Tune, each as it was again once the launch ends.

    with tune_switches(), ray_session(...):    # the whole launch: TUNE_DISABLE_STRICT_METRIC_CHECKING, PL_DISABLE_FORK
        with only_our_loggers(not resume):     # while a new sweep runs: TUNE_DISABLE_AUTO_CALLBACK_LOGGERS
            tuner.fit()

`ray_cluster.ray_session` sets PL_DISABLE_FORK for the embedded Ray's workers too; opened inside
`tune_switches`, it is restored with them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

__all__ = ["env_switch", "only_our_loggers", "tune_switches"]


@contextmanager
def env_switch(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the launch only; restore what it was (or unset it) afterwards."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def tune_switches() -> Iterator[None]:
    """For the whole launch. A trial that fails for good reports {"failed": ...} without the scheduler's metric
    (ASHA skips it), so Tune must not insist on it; PL_DISABLE_FORK as it is, or 1 (what Tune gives each trial
    actor), so that the `ray_session` that sets it inside is undone too."""
    with env_switch("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1"), \
            env_switch("PL_DISABLE_FORK", os.environ.get("PL_DISABLE_FORK", "1")):
        yield


def only_our_loggers(on: bool):
    """While a new sweep runs, Tune adds no default loggers (ours are in its callbacks). A resumed sweep keeps
    Tune's defaults: one started before the launcher passed its own loggers has none in its saved callbacks."""
    return env_switch("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1") if on else nullcontext()
