"""The Ray a sweep runs on: the running one, a cluster joined by address, a persistent local one, or an embedded one.

    with ray_session(address, spec) as where:     # "existing", the cluster's address, "persistent" or "local"
        tuner.fit()

`cluster_address` decides which (--address, else RAY_ADDRESS, else the spec's `ray_address`; none of them: the
persistent local Ray of `bvit-sweep ray up` when it runs (`orchestrator.local_ray`), else embedded; "local":
embedded). A cluster is probed first (`probe_cluster`: a TCP connection to its GCS within PROBE_S), so an
address where nothing listens is one line in a moment, not Ray's minutes of retries. The embedded Ray listens on
127.0.0.1 only and is watched by a `Reaper`: a SIGKILLed launcher leaves no Ray process behind.
"""
from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestrator.env_switches import env_switch
from orchestrator.errors import InputWarning, UserError
from orchestrator.local_ray import attachable_head
from orchestrator.patches import (
    auth_mode,
    few_join_retries,
    loopback_only,
    stop_autoscaler_monitor,
    trial_actors_on_started_workers,
)
from orchestrator.reaper import Reaper
from orchestrator.spec import SweepSpec
from orchestrator.trainable import PRELOAD

__all__ = ["JOIN_RETRIES", "PROBE_S", "cluster_address", "connect_cluster", "probe_cluster", "ray_session"]

PROBE_S = 5.0  # how long the cluster's GCS port has to accept a TCP connection
JOIN_RETRIES = 5  # attempts (~1 s apart) to get the cluster's id from its GCS: a refused token fails them all

_HINT = ("check --address, RAY_ADDRESS or the spec's ray_address (`ray status` on the head node prints it), "
         "or leave them all unset to run on a local Ray")


def cluster_address(address: str | None, spec: SweepSpec) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS, else the spec's; None for an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or spec.ray_address
    return None if address == "local" else address


@contextmanager
def ray_session(address: str | None, spec: SweepSpec) -> Iterator[str]:
    """Ray for the sweep: the running one, a cluster by address (RAY_ADDRESS, the spec's), the persistent local
    Ray (`bvit-sweep ray up`) unless the address is "local", else an embedded local Ray on loopback, watched by a
    `Reaper` so that nothing it starts outlives a killed launcher.

    Yields "existing", the address, "persistent" or "local"; disconnects from (or shuts down) what it joined (or
    started) on the way out: the persistent Ray keeps running.
    """
    explicit_local = (address or os.environ.get("RAY_ADDRESS") or spec.ray_address) == "local"
    address = cluster_address(address, spec)
    if ray.is_initialized():
        yield "existing"
        return
    if address:
        connect_cluster(address)
        try:
            yield address
        finally:
            ray.shutdown()
        return
    head, why = (None, None) if explicit_local else attachable_head()
    if why:
        warnings.warn(why, InputWarning, stacklevel=2)
    if head is not None:
        with auth_mode(head.get("auth_mode", "disabled")), env_switch("PL_DISABLE_FORK", "1"):
            with loopback_only():  # this driver's node address is the head's: 127.0.0.1
                ray.init(address=head["address"], log_to_driver=False)
            try:
                with trial_actors_on_started_workers(head["inherited"]):
                    yield "persistent"
            finally:
                ray.shutdown()
        return
    reaper = Reaper.start()  # before ray.init: a SIGKILL while Ray starts is covered too
    try:
        os.environ.setdefault("PL_DISABLE_FORK", "1")  # what Tune gives each trial actor, inherited instead
        inherited = dict(os.environ)  # the embedded Ray's workers start with the environment of this moment
        with loopback_only():
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _system_config={"preload_python_modules": [PRELOAD]})
        try:
            with trial_actors_on_started_workers(inherited):
                yield "local"
        finally:
            try:
                stop_autoscaler_monitor()
            finally:
                ray.shutdown()
    finally:
        reaper.stop()


def probe_cluster(address: str) -> None:
    """A `UserError` unless something accepts a TCP connection at the cluster's GCS address within PROBE_S.

    `ray.init` retries an address where nothing listens for minutes (20 attempts of ~35 s each in Ray
    2.60) before it gives up; this says so in a moment, before data is prepared.
    """
    from ray._private.services import canonicalize_bootstrap_address

    where, hint = f"{address}: cannot join the Ray cluster there", _HINT
    target = address.removeprefix("ray://")
    try:
        gcs = canonicalize_bootstrap_address(target) if not address.startswith("ray://") else target
    except (ConnectionError, ValueError) as e:
        raise UserError([f"{where} ({_first_line(e)}); {hint}"]) from None
    host, _, port = (gcs or "").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except (OSError, ValueError) as e:
        reason = "nothing answers at that port" if isinstance(e, ConnectionRefusedError) else _first_line(e)
        raise UserError([f"{where} ({gcs}: {reason}); {hint}"]) from None


def connect_cluster(address: str) -> None:
    """Join the Ray cluster at `address` (host:port, `auto`, or ray://host:port); a `UserError` when it
    cannot be joined (nothing answers there, a malformed address, the connection is refused)."""
    probe_cluster(address)
    with few_join_retries(JOIN_RETRIES):  # a refused token: 5 s, not Ray's 20
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            ray.shutdown()
            raise UserError([f"{address}: cannot join the Ray cluster there ({type(e).__name__}: {_first_line(e)}); "
                             "if the cluster uses token authentication, set RAY_AUTH_TOKEN to its token; "
                             f"{_HINT}"]) from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
