"""Launch a sweep on Ray Tune: an embedded local Ray by default, an existing cluster by address.

    launch(spec_path="sweeps/width.yaml")                 # local Ray, storage runs/<name>
    launch(spec_path=..., address="ray://head:10001")     # or RAY_ADDRESS, or inside `ray job submit`
    launch(spec_path=..., resume=True)                    # Tuner.restore: finished trials are not rerun
    launch(spec_path=..., storage="s3://bucket/sweeps")   # Tune's state and checkpoints in object storage

One launcher per sweep: a second launcher of the same sweep (new or --resume) is refused at once with the
holder's pid and host (`orchestrator.lock`; it does not wait). The embedded local Ray listens on 127.0.0.1
only and is watched by `orchestrator.reaper`: a SIGKILLed launcher leaves no Ray process behind.

Data is prepared once, before any trial starts, at the path in the trial configs (relative paths are
resolved against the launching directory and handed to trials as absolute paths; on a multi-node
cluster that path must be on storage every node mounts, e.g. NFS, or prepared on each node first).

The launch is a sequence of steps, each in a room of its own:

    strategy_for          which trials, and how Tune chooses them (orchestrator.strategy: grid or a sampler)
    preflight             the spec, this machine's resources and memory, the data: one line each, before Ray
    storage_problems      a storage URI that cannot be opened or reached: one line, before Ray (orchestrator.storage;
                          a sweep on a URI is read and resumed from a local copy, pulled first, and the
                          launcher's own files are pushed back as they change)
    check_sweep_state     may this launch start or resume the sweep (orchestrator.resume)
    prepare_data          the trials' data, made ready once (orchestrator.data_prep); then, once Ray is up,
                          every node must see the same files (`check_data_on_nodes`)
    resolve_pretrained    fine-tuning checkpoints, found and checked (orchestrator.pretrained)
    tune_switches         the environment variables set for Tune, restored at the end (orchestrator.env_switches)
    ray_session           the running Ray, a cluster, or an embedded one (orchestrator.ray_cluster; the Ray
                          internals it patches: orchestrator.patches)
    build_tuner           the Tuner, new or restored, as the strategy says (orchestrator.tuner)
    write_results, write_pareto, finalize     the trial table, a search's front, frontier and MLflow
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from orchestrator.callbacks import ProgressTable, PushOwnFiles
from orchestrator.data_prep import check_data_on_nodes, prepare_data
from orchestrator.data_share import publish_data, stage_data_on_nodes
from orchestrator.env_switches import only_our_loggers, tune_switches
from orchestrator.errors import UserError
from orchestrator.lock import sweep_lock
from orchestrator.patches import (
    check_ray_version,
    grid_without_copying_the_grid,
    result_grid_without_histories,
)
from orchestrator.preflight import (
    data_problems,
    memory_problems,
    resource_problems,
    schedule_problems,
    worker_problems,
)
from orchestrator.pretrained import resolve_pretrained
from orchestrator.provenance import code_version
from orchestrator.ray_cluster import cluster_address, probe_cluster, ray_session
from orchestrator.results import best_trial, collect_trials, finalize, write_results
from orchestrator.resume import check_sweep_state, record_final_state, snapshot, write_snapshot
from orchestrator.spec import SweepSpec, load_spec
from orchestrator.storage import SweepLocation, storage_problems, sweep_location
from orchestrator.strategy import Strategy, design_for, strategy_for
from orchestrator.sweep_dir import sweep_dir_for
from orchestrator.system_metrics import TrialTracking
from orchestrator.timing import record_launch
from orchestrator.tracking import resolve_tracking
from orchestrator.tuner import PrepareFinish, build_tuner, sweep_callbacks, trial_name

check_ray_version()  # the Ray internals orchestrator.patches patches were written for one Ray: say so before using them

__all__ = ["launch", "LaunchResult", "sweep_dir_for"]

# Tune pickles the Tuner's trial-name function and callbacks into a sweep's tuner.pkl by module and name: sweeps
# launched before they moved to orchestrator.tuner name them here, and `--resume` unpickles them from here.
_trial_name, _PrepareFinish = trial_name, PrepareFinish


@dataclass
class LaunchResult:
    sweep_dir: Path
    results_dir: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(t["status"] == "TERMINATED" for t in self.trials)


def launch_command(spec_path: Path | str, **flags: Any) -> str:
    """The `bvit-sweep launch` command line of these arguments: the flags that differ from their defaults."""
    out = f"bvit-sweep launch {spec_path}"
    for name, value in flags.items():
        if value is True:
            out += f" --{name.replace('_', '-')}"
        elif value not in (None, False):
            out += f" --{name.replace('_', '-')} {value}"
    return out


def launch(
        *,
        spec_path: Path | str,
        address: str | None = None,
        storage: str | None = None,
        smoke: bool = False,
        resume: bool = False,
        force: bool = False,
        trust_state: bool = False,
        results_root: Path | str = "results",
        tracking_uri: str | None = None,
        verbose: bool = True,
) -> LaunchResult:
    """Run (or resume) every trial of the sweep; write results/<name>/trials.csv; return the trial table.

    `resume` restores Tune's pickled state only when this user's key signed it (`orchestrator.signing`);
    `trust_state` resumes a sweep directory from elsewhere anyway (and signs it)."""
    started_at = time.time()
    spec, source = load_spec(spec_path), str(spec_path)
    strategy = strategy_for(spec, smoke=smoke)  # the grid's trials, or a sampler's (orchestrator.strategy)
    if problems := schedule_problems(spec, strategy.configs, source=source):
        raise UserError(problems)
    if problems := storage_problems(storage or spec.storage, source="--storage" if storage else source):
        raise UserError(problems)
    where = sweep_location(spec, storage, smoke=smoke)
    sweep_dir = where.dir  # the sweep's folder, or (URI storage) its local copy
    resolve_tracking(spec, Path(results_root) / sweep_dir.name, tracking_uri)  # a bad store: refused before Ray
    if problems := worker_problems(spec, strategy.configs, source=source):
        raise UserError(problems)
    local = cluster_address(address, spec) is None  # an embedded local Ray: the trials run on this machine
    if problems := (resource_problems(spec.resources, source=source) if local else []) + memory_problems(
            strategy.configs, source=source):
        raise UserError(problems)
    command = launch_command(spec_path, address=address, storage=storage, smoke=smoke, resume=resume, force=force,
                             tracking_uri=tracking_uri)
    # One launcher per sweep, from before its state is read until Ray is shut down (a second one is refused).
    with sweep_lock(sweep_dir):
        where.pull()  # URI storage: the sweep as it is there now (nothing when it does not exist yet)
        return _launch_locked(spec=spec, spec_path=Path(spec_path), strategy=strategy, where=where,
                              address=address, smoke=smoke, resume=resume, force=force, trust_state=trust_state,
                              command=command, results_root=Path(results_root), tracking_uri=tracking_uri,
                              verbose=verbose, started_at=started_at)


def _launch_locked(*, spec: SweepSpec, spec_path: Path, strategy: Strategy, where: SweepLocation,
                   address: str | None, smoke: bool, resume: bool, force: bool, trust_state: bool, command: str,
                   results_root: Path, tracking_uri: str | None, verbose: bool, started_at: float) -> LaunchResult:
    configs, source, sweep_dir = strategy.configs, str(spec_path), where.dir
    snap = snapshot(spec, smoke, strategy.trials)
    check_sweep_state(sweep_dir, snap, spec=spec, spec_path=spec_path, resume=resume, force=force,
                      trust_state=trust_state)
    if (cluster := cluster_address(address, spec)) and not ray.is_initialized():
        probe_cluster(cluster)  # in a moment, before data is prepared
    sha = code_version()  # the code the trials run (its checkout, wherever launched), recorded before anything changes
    data_paths = prepare_data(configs, cwd=Path.cwd())
    if problems := data_problems(configs, data_paths, source=source):
        raise UserError(problems)
    pretrained = resolve_pretrained(configs, data_paths, cwd=Path.cwd(), source=source)
    # Every variable set for Tune (here and by ray_session: PL_DISABLE_FORK) is as it was once the launch ends.
    # URI storage: the data goes there too (once per content), and each node reads it from there unless it sees the
    # launcher's files itself; a local storage: every node must see the files the launcher prepared.
    data_sources = publish_data(data_paths, where.storage_path) if where.uri is not None else {}
    with tune_switches(), ray_session(address, spec):
        if data_sources:
            stage_data_on_nodes(data_sources)  # each trial node fetches (or finds) them once, before any trial
        else:
            check_data_on_nodes(data_paths)  # every node sees the files the driver prepared (a moment per node)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record_launch(sweep_dir, started_at=started_at, ray_ready_at=time.time(), command=command)
        if not resume or force:
            write_snapshot(sweep_dir, snap)
        where.push()  # URI storage: the snapshot and launch log, before any trial starts
        results_dir = results_root / sweep_dir.name
        uri, experiment = resolve_tracking(spec, results_dir, tracking_uri)
        design = design_for(spec, smoke=smoke)  # design_of's cells, plus a search's ranged dimensions
        tracking = dict(uri=uri, experiment=experiment, sweep=sweep_dir.name,
                        artifact_root=str(results_dir / "mlflow" / "artifacts"), design=design)
        callbacks = sweep_callbacks(sweep_dir, tracking, source=(sha, command),
                                    progress=ProgressTable(total=strategy.total, design=design) if verbose else None)
        if where.uri is not None:
            callbacks.append(PushOwnFiles(where))
        tuner = build_tuner(spec, strategy, where=where, callbacks=callbacks, resume=resume,
                            data_paths=data_paths, pretrained=pretrained, data_sources=data_sources,
                            tracking=TrialTracking(uri=uri, experiment=experiment, sweep=sweep_dir.name,
                                                   interval_s=spec.tracking.system_metrics_s))
        interrupted = False
        try:
            with only_our_loggers(not resume), grid_without_copying_the_grid(), result_grid_without_histories():
                tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
        if where.uri is not None:  # Tune's final state, synced up by `fit`, read here from a fresh copy
            where.push()
            where.pull()
        record_final_state(sweep_dir, records_written=any(getattr(c, "ended", False) for c in callbacks))
        where.push()  # the signatures and trial records written just now
        table = collect_trials(sweep_dir, trials=strategy.finished_trials(sweep_dir))
        interrupted = interrupted or any(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in table)
        write_results(table, spec=spec, command=command, results_dir=results_dir, sweep_dir=sweep_dir, sha=sha,
                      storage_uri=where.uri)
        strategy.write_pareto(table, spec=spec, sweep_dir=sweep_dir, results_dir=results_dir, uri=uri,
                              experiment=experiment, verbose=verbose)
        if (best := best_trial(table)) is not None:
            where.pull_checkpoint(best)  # URI storage: the best model, for MLflow (`pull` leaves checkpoints there)
        finalize(sweep_dir=sweep_dir, results_dir=results_dir, table=table, verbose=verbose,
                 complete=not interrupted, **tracking)
    return LaunchResult(sweep_dir=sweep_dir, results_dir=results_dir, trials=table, interrupted=interrupted)
