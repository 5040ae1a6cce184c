"""Every Ray internal the launcher patches, in one place, with the Ray they were written for.

    check_ray_version()                         # at the launcher's import: a one-line refusal on another Ray
    with loopback_only(): ray.init(...)         # the embedded Ray's servers on 127.0.0.1
    with few_join_retries(JOIN_RETRIES): ray.init(address=...)   # a refused cluster token: seconds, not minutes
    with trial_actors_on_started_workers(env): tuner.fit()       # trial actors on the workers Ray started
    with grid_without_copying_the_grid(): tuner.fit()            # a grid's trials made in O(N), not O(N^2)
    with result_grid_without_histories(): tuner.fit()           # fit's ResultGrid reads no trial's history
    with auth_mode("token"): ray.init(address=...)               # attach in a running head's authentication mode
    stop_autoscaler_monitor()                   # before ray.shutdown(): a second less at the end of every launch

Each one reaches into Ray 2.60's private parts (`ray._private.ray_constants`, the node's process table, Tune's
`_ActorClassCache`, the grid's variant generator) and restores what it changed. Elsewhere, internals are only read, never patched:
`ray_cluster.probe_cluster` (`services.canonicalize_bootstrap_address`), `callbacks.SignState` and
`trainable.KeepHistoryOnRetry` (`trial.storage`, `LoggerCallback._restore_from_remote`'s behaviour),
`strategy.PointSearcher` (`OptunaSearch._ot_study`). Tests pin each of them, but a user who upgrades Ray would
get no word of it: `check_ray_version` says so, in one line, before any of it runs.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestrator.env_switches import env_switch
from orchestrator.errors import UserError

__all__ = ["ALLOW_ENV", "TESTED_RAY", "auth_mode", "check_ray_version", "few_join_retries", "grid_without_copying_the_grid",
           "loopback_only", "result_grid_without_histories", "stop_autoscaler_monitor", "trial_actors_on_started_workers"]

TESTED_RAY = "2.60"  # major.minor: the patches were written for and tested on 2.60.x (pyproject pins 2.60.0)
ALLOW_ENV = "BVIT_SWEEP_UNTESTED_RAY"  # =1: run on another Ray anyway, at the user's risk


def check_ray_version(installed: str | None = None) -> None:
    """A one-line `UserError` (exit 2) when the installed Ray is not the one the patches were written for,
    unless BVIT_SWEEP_UNTESTED_RAY=1."""
    if installed is None:
        installed = ray.__version__
    if installed.split(".")[:2] == TESTED_RAY.split(".") or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UserError([f"ray {installed} is installed, but bvit-sweep's launcher patches Ray internals written for "
                     f"ray {TESTED_RAY}.x (loopback-only servers, worker reuse, retry history); install the pinned "
                     f"version (pip install 'ray[tune]=={TESTED_RAY}.0'), or set {ALLOW_ENV}=1 to try this one "
                     "at your own risk"])


@contextmanager
def loopback_only() -> Iterator[None]:
    """Make `ray.init(address="local")` put every server it starts on 127.0.0.1 (Ray 2.60:
    `ray_constants.ENABLE_RAY_CLUSTER`).

    Why: Ray 2.60 binds the GCS, the raylet, the workers' gRPC servers and the runtime-env agent to the node's
    IP address, and it turns a loopback `_node_ip_address` into the machine's routable address
    (`services.resolve_ip_for_localhost`) unless Ray "clusters are disabled" (`ENABLE_RAY_CLUSTER`, the
    setting behind RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read only by `get_node_ip_address`): then the
    node's address is the loopback one and every server it starts listens there. The dashboard is not
    started (include_dashboard=False) and the dashboard agent opens no TCP listener without it.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextmanager
def few_join_retries(retries: int) -> Iterator[None]:
    """Let `ray.init(address=...)` ask a cluster's GCS for its id `retries` times (~1 s apart) instead of Ray
    2.60's 20 (`ray_constants.NUM_REDIS_GET_RETRIES`).

    Why: a cluster that refuses the connection (a wrong token) fails every attempt; with Ray's count the user
    waits ~20 s for the one-line refusal, with ours ~5 s.
    """
    from ray._private import ray_constants

    before = ray_constants.NUM_REDIS_GET_RETRIES
    ray_constants.NUM_REDIS_GET_RETRIES = retries
    try:
        yield
    finally:
        ray_constants.NUM_REDIS_GET_RETRIES = before


def stop_autoscaler_monitor() -> None:
    """Kill the embedded Ray's autoscaler monitor before `ray.shutdown()` (Ray 2.60: the node's
    `all_processes[PROCESS_TYPE_MONITOR]`).

    Why: Ray stops its processes one after another, giving each a second after SIGTERM, and the monitor (of no
    use to a one-node Ray with nothing to scale) takes all of it -- a second at the end of every launch. It holds
    nothing of the sweep's.
    """
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)


@contextmanager
def trial_actors_on_started_workers(inherited: dict[str, str]) -> Iterator[None]:
    """Let Tune's trial actors take the worker processes Ray starts with the node (one per CPU, started
    while `ray.init` returns) instead of each starting a new one (Tune 2.60: `_ActorClassCache.get`).

    Why: a new worker starts ~0.6 s later, and the started ones idle. Tune 2.60 creates every trial actor with a
    runtime env of environment variables (`PL_DISABLE_FORK=1` and any of a few AWS/Train variables the driver
    has set), and a worker started with the node has no runtime env, so Ray never gives it such an actor. In
    the embedded Ray every worker already has those variables (it inherits the environment `ray.init` was
    called with): while set, an actor whose variables all have those values is created without a runtime env;
    any other keeps Tune's.
    """
    from ray.tune.execution import class_cache

    original = class_cache._ActorClassCache.get

    def get(self, trainable_cls):
        wanted = {**class_cache.DEFAULT_ENV_VARS,
                  **{k: os.environ[k] for k in class_cache.ENV_VARS_TO_PROPAGATE if k in os.environ}}
        if any(inherited.get(k) != v for k, v in wanted.items()):
            return original(self, trainable_cls)
        if trainable_cls not in self._cache:
            self._cache[trainable_cls] = ray.remote(trainable_cls)
        return self._cache[trainable_cls]

    class_cache._ActorClassCache.get = get
    try:
        yield
    finally:
        class_cache._ActorClassCache.get = original


@contextmanager
def grid_without_copying_the_grid() -> Iterator[None]:
    """Let Tune's grid make each trial from a copy of the param space that shares the grid's lists instead of
    deep-copying them (Tune 2.60: `variant_generator._grid_search_generator`).

    Why: for every trial it makes, Tune deep-copies the whole unresolved param space, the grid's value lists
    included, and then overwrites each grid's place in the copy with the trial's value. A sweep's grid holds every
    trial's envelope, so making N trials copied N^2 envelopes: at 2,000 trials, minutes of the launcher's CPU
    before the first trial started. The lists are not copied here (each place is overwritten all the same); the
    trials, their order and their configs are what Tune makes (a test compares them).
    """
    import copy
    import itertools

    from ray.tune.search import variant_generator as vg

    original = vg._grid_search_generator

    def generator(unresolved_spec, grid_vars):
        if not grid_vars:
            yield from original(unresolved_spec, grid_vars)
            return
        grids = []
        for path, _ in grid_vars:
            node = unresolved_spec
            for key in path:
                node = node[key]
            grids.append(node)  # the {"grid_search": [...]} each trial's copy overwrites
        # Tune's order: the first grid variable varies fastest.
        for combo in itertools.product(*(range(len(values)) for _, values in reversed(grid_vars))):
            spec = copy.deepcopy(unresolved_spec, {id(g): g for g in grids})
            for (path, values), i in zip(grid_vars, reversed(combo), strict=True):
                vg.assign_value(spec, path, values[i])
            yield spec

    vg._grid_search_generator = generator
    try:
        yield
    finally:
        vg._grid_search_generator = original


@contextmanager
def result_grid_without_histories() -> Iterator[None]:
    """Let the ResultGrid that `Tuner.fit` returns skip reading every trial's history into a DataFrame (Tune 2.60:
    `ExperimentAnalysis._fetch_trial_dataframes`, called when fit builds its result).

    Why: fit's last act read each trial's progress file with pandas -- 13 s of the end of a 1,000-trial launch,
    for a result the launcher never reads (it reads the project's own records and result.json lines). Each trial
    gets an empty DataFrame, as Tune gives a trial whose files it cannot read.
    """
    from pandas import DataFrame
    from ray.tune.analysis import experiment_analysis as ea

    original = ea.ExperimentAnalysis._fetch_trial_dataframes
    ea.ExperimentAnalysis._fetch_trial_dataframes = lambda self: {t.trial_id: DataFrame() for t in self.trials}
    try:
        yield
    finally:
        ea.ExperimentAnalysis._fetch_trial_dataframes = original


@contextmanager
def auth_mode(mode: str) -> Iterator[None]:
    """This process in Ray's authentication `mode` ("token" or "disabled") while open (Ray 2.60: RAY_AUTH_MODE, read
    into the cached `RayConfig` when Ray is imported; `_raylet.Config.initialize` re-reads it, as Ray does itself when
    it turns token mode on for a new local Ray).

    Why: a launch attaching to the persistent local Ray must speak the head's mode whatever its own environment
    said when Ray was imported; afterwards the process is as it was (a later embedded Ray decides for itself).
    """
    from ray._raylet import Config

    try:
        with env_switch("RAY_AUTH_MODE", mode):
            Config.initialize("")
            yield
    finally:
        Config.initialize("")  # re-read once the variable is as it was again
