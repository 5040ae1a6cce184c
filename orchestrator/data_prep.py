"""The data every trial reads, made ready once on the launching machine before any trial starts.

    data_paths = prepare_data(configs, cwd=Path.cwd())     # {spec's data.path -> absolute path}
    check_data_on_nodes(data_paths)                          # once Ray is up: every node sees those same files

A data dir that is missing or does not verify is prepared when it is one this project builds from local files
(Fashion-MNIST, the fmnist-a/b split, digits: `bvit.data.registry.preparable`), else refused in one line.
Relative paths are resolved against the launching directory and handed to trials as absolute paths; on a
multi-node cluster that path must be on storage every node mounts (e.g. NFS), or prepared on each node first.
`check_data_on_nodes` checks that before the first trial: a task of no CPUs pinned to each other alive node that
can run trials compares each file's size and the digest of its first 64 KiB with the driver's; the node the
launcher runs on is not asked (it prepared the files), so a one-node local run costs only Ray's node list.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from bvit.config import TrialConfig
from orchestrator.errors import UserError

__all__ = ["PROBE_S", "check_data_on_nodes", "data_files", "data_fingerprints", "fingerprint", "node_data_problems",
           "nodes_line", "on_each_node", "prepare_data", "trial_nodes"]

PROBE_S = 60.0  # how long the nodes have to answer (a worker process starts on each)
_HEAD = 1 << 16  # bytes of each file hashed: enough to tell another preparation from this one, cheap on NFS


def prepare_data(trials: list[TrialConfig], *, cwd: Path) -> dict[str, str]:
    """Make sure every data dir the trials read exists and verifies; prepare it if it is one this project
    builds from local files (Fashion-MNIST, the fmnist-a/b split, digits: `bvit.data.registry.preparable`).

    Returns {spec path -> absolute path}. Runs once on the launching machine, before any trial.
    """
    from bvit.data.format import DataError, load_metadata
    from bvit.data.registry import preparable, prepare_known

    resolved: dict[str, str] = {}
    for path in sorted({t.data.path for t in trials}):
        absolute = Path(path) if Path(path).is_absolute() else (cwd / path)
        try:
            load_metadata(absolute)
        except DataError as missing:
            if (name := preparable(absolute)) is None:
                raise UserError([str(missing)]) from missing
            print(f"preparing {name} into {absolute} (once, before the trials start)")
            try:
                prepare_known(absolute)
            except DataError as e:
                raise UserError([str(e)]) from e
        resolved[path] = str(absolute.resolve())
    return resolved


def data_files() -> tuple[str, ...]:
    """The files of a prepared data dir that trials read."""
    from bvit.data.format import META_NAME, SPLITS

    return (META_NAME, *(f"{s}.beton" for s in SPLITS))


def data_fingerprints(paths: list[str]) -> dict[str, dict[str, list]]:
    """{data dir: {file: [size, sha256 of its first 64 KiB]}} of every file the trials read, as this machine sees it."""
    return {d: {name: fingerprint(os.path.join(d, name)) for name in data_files()} for d in sorted(set(paths))}


def fingerprint(path: str) -> list:
    """[size, sha256 of the first 64 KiB] of a file: enough to tell another preparation from this one, cheap."""
    with open(path, "rb") as f:
        return [os.fstat(f.fileno()).st_size, hashlib.sha256(f.read(_HEAD)).hexdigest()]


def _probe(expected: dict[str, dict[str, list]]) -> list[str]:
    """On one node: what differs from the driver's files (stdlib only: runs in a bare Ray worker)."""
    problems = []
    for d, files in expected.items():
        for name, (size, digest) in files.items():
            path = os.path.join(d, name)
            try:
                seen = fingerprint(path)
            except OSError as e:
                problems.append(f"{path} {'missing' if isinstance(e, FileNotFoundError) else f'unreadable ({e})'}")
                continue
            if seen[0] != size:
                problems.append(f"{path} has {seen[0]:,} bytes, the launcher's {size:,}")
            elif seen[1] != digest:
                problems.append(f"{path} differs from the launcher's")
    return problems


def node_data_problems(expected: dict[str, dict[str, list]], nodes: list[dict], *,
                       timeout_s: float = PROBE_S) -> dict[str, list[str]]:
    """{"node <ip> (<id>)": its problems} for each of Ray's `nodes` (entries of `ray.nodes()`) that does not see
    `expected` (data_fingerprints) as the launcher does: a task of no CPUs pinned to each node."""
    return on_each_node(_probe, expected, nodes, timeout_s=timeout_s)


def nodes_line(bad: dict[str, list[str]]) -> str:
    """`on_each_node`'s problems as one line: each node, its first three problems."""
    return "; ".join(f"{node}: {', '.join(problems[:3])}" for node, problems in sorted(bad.items()))


def on_each_node(fn, arg, nodes: list[dict], *, timeout_s: float) -> dict[str, list[str]]:
    """{"node <ip> (<id>)": problems} of `fn(arg)` (a list of problems) run as a task of no CPUs pinned to each of
    Ray's `nodes`, for the nodes with any; a node that does not answer in time, or dies, is one of them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    pending = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        arg): f"node {n.get('NodeManagerAddress', '?')} ({n['NodeID'][:12]})" for n in nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    out = {pending[ref]: [f"did not answer within {timeout_s:g} s"] for ref in late}
    for ref in ready:
        try:
            if problems := ray.get(ref):
                out[pending[ref]] = problems
        except Exception as e:  # the node died, or its worker could not start
            out[pending[ref]] = [f"could not run the check ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    return out


def trial_nodes(*, skip_driver_node: bool = True) -> list[dict]:
    """Ray's alive nodes that can run a trial (CPUs or GPUs), less the launcher's own (it prepared the data) unless
    the launcher is a Ray Client (its files are on no node)."""
    import ray
    from ray.util.client import ray as client

    here = None
    if skip_driver_node and not client.is_connected():
        here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
            and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def check_data_on_nodes(data_paths: dict[str, str], *, skip_driver_node: bool = True,
                        timeout_s: float = PROBE_S) -> None:
    """One-line `UserError` naming every node that does not see the trials' data files as the launcher does
    (missing, another size, other bytes), before any trial starts. Needs Ray initialised."""
    nodes = trial_nodes(skip_driver_node=skip_driver_node)
    if not nodes or not data_paths:
        return
    expected = data_fingerprints(list(data_paths.values()))
    if bad := node_data_problems(expected, nodes, timeout_s=timeout_s):
        raise UserError([f"data.path: {len(bad)} node(s) cannot read the data as "
                         f"prepared on the launcher ({socket.gethostname()}) -- {nodes_line(bad)}; put data.path on storage "
                         "every node mounts at the same path (NFS, the cluster's shared volume), or run "
                         "`bvit-sweep data prepare` on each of those nodes to the same path, then launch again"])
