"""Launch a sweep on Ray Tune: an embedded local Ray by default, an existing cluster by address.

    launch(spec_path="sweeps/width.yaml")                 # local Ray, storage runs/<name>
    launch(spec_path=..., address="ray://head:10001")     # or RAY_ADDRESS, or inside `ray job submit`
    launch(spec_path=..., resume=True)                    # Tuner.restore: finished trials are not rerun

One launcher per sweep: a second launcher of the same sweep (new or --resume) is refused at once with the
holder's pid and host (`orchestrator.lock`; it does not wait). The embedded local Ray listens on 127.0.0.1
only and is watched by `orchestrator.reaper`: a SIGKILLed launcher leaves no Ray process behind.

Data is prepared once, before any trial starts, at the path in the trial configs (relative paths are
resolved against the launching directory and handed to trials as absolute paths; on a multi-node
cluster that path must be on storage every node mounts, e.g. NFS, or prepared on each node first).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from bvit.config import ModelConfig, TrialConfig
from orchestrator.callbacks import ProgressTable, SignState, TrialRecords
from orchestrator.envelope import Pretrained, TrialEnvelope, build_envelopes
from orchestrator.errors import UserError
from orchestrator.lock import sweep_lock
from orchestrator.pareto import write_search_results
from orchestrator.planning import run_order
from orchestrator.preflight import data_problems, memory_problems, resource_problems
from orchestrator.provenance import code_version
from orchestrator.ray_compat import check_ray_version
from orchestrator.reaper import Reaper
from orchestrator.records import record_trial
from orchestrator.results import best_checkpoint, collect_trials, finalize, write_results
from orchestrator.signing import sign_state, verify_state
from orchestrator.spec import SweepSpec, Trial, load_spec
from orchestrator.strategy import GridStrategy, OptunaStrategy, design_for, strategy_for
from orchestrator.sweep_dir import SNAPSHOT, check_tune_state, read_snapshot, sweep_dir_for
from orchestrator.timing import record_launch
from orchestrator.tracking import MlflowProgressCallback, resolve_tracking
from orchestrator.trainable import PRELOAD, KeepHistoryOnRetry, tune_trainable

check_ray_version()  # the Ray internals patched below were written for one Ray: say so before using them

__all__ = ["launch", "LaunchResult", "sweep_dir_for"]


@dataclass
class LaunchResult:
    sweep_dir: Path
    results_dir: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(t["status"] == "TERMINATED" for t in self.trials)


def _trial_name(trial) -> str:
    """Ray's trial name and directory: the spec's trial id."""
    return TrialEnvelope.of(trial.config).trial_id


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


def _best_of_sweep(sweep_dir: Path) -> Path:
    """The last checkpoint of a sweep's best finished trial (highest final test top-1)."""
    best = best_checkpoint(sweep_dir, collect_trials(sweep_dir))
    if best is None:
        raise FileNotFoundError(f"{sweep_dir}: the sweep has no finished trial with a checkpoint yet")
    print(f"finetune.checkpoint {sweep_dir}: the sweep's best trial {best[0]} ({best[1]})")
    return best[1]


def resolve_pretrained(trials: list[TrialConfig], data_paths: dict[str, str], *, cwd: Path,
                       source: str) -> Pretrained:
    """For fine-tuning trials: {(spec checkpoint, spec data path) -> (absolute checkpoint.pt, the model the
    trial runs: the checkpoint's, with a head for the data's classes)}.

    `finetune.checkpoint` names a checkpoint.pt, a directory holding one (`bvit-sweep train --checkpoint-dir`),
    or a sweep directory (`<storage>/<name>`): then the last checkpoint of its best finished trial.

    Checks, before any trial starts, that each checkpoint exists and that the data it is fine-tuned on has
    the image size and channels it was pretrained at. Each checkpoint and data set is read once.
    """
    if all(t.finetune is None for t in trials):
        return {}  # without fine-tuning trials the launcher never imports torch (seconds on a small CPU)
    from bvit.checkpoint import checkpoint_config
    from bvit.data.format import load_metadata

    checkpoints: dict[str, tuple[Path, ModelConfig] | None] = {}
    out: dict[tuple[str, str], tuple[str, ModelConfig]] = {}
    problems: list[str] = []
    for ckpt, data in sorted({(t.finetune.checkpoint, t.data.path) for t in trials if t.finetune is not None}):
        if ckpt not in checkpoints:
            path = Path(ckpt) if Path(ckpt).is_absolute() else cwd / ckpt
            try:
                path = _best_of_sweep(path) if (path / SNAPSHOT).exists() else path
                file, pretrained = checkpoint_config(path)
                checkpoints[ckpt] = (file.resolve(), pretrained.model)
            except (FileNotFoundError, ValueError) as e:
                checkpoints[ckpt] = None
                problems.append(f"{source}: finetune.checkpoint: {e}; pretrain one first: "
                                "`bvit-sweep launch SPEC` (then finetune.checkpoint: <storage>/<name>, the sweep's "
                                "best trial) or `bvit-sweep train SPEC --checkpoint-dir DIR` (then DIR)")
        if checkpoints[ckpt] is None:
            continue
        file, model = checkpoints[ckpt]
        meta = load_metadata(data_paths[data])
        if tuple(meta["image_shape"]) != (model.in_chans, model.img_size, model.img_size):
            c, h, w = meta["image_shape"]
            problems.append(f"{source}: data.path {data} holds {c}x{h}x{w} images but {ckpt} was pretrained on "
                            f"{model.in_chans}x{model.img_size}x{model.img_size}; fine-tune on data prepared at "
                            "that size")
            continue
        out[(ckpt, data)] = (str(file), model.model_copy(update={"num_classes": meta["num_classes"]}))
    if problems:
        raise UserError(problems)
    return out


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Make `ray.init(address="local")` put every server it starts on 127.0.0.1.

    Ray 2.60 binds the GCS, the raylet, the workers' gRPC servers and the runtime-env agent to the node's
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
def ray_session(address: str | None, spec: SweepSpec) -> Iterator[str]:
    """Ray for the sweep: the running one, a cluster by address (RAY_ADDRESS, the spec's), else an embedded
    local Ray on loopback, watched by a `Reaper` so that nothing it starts outlives a killed launcher.

    Yields "existing", the address, or "local"; shuts down (disconnects) what it started on the way out.
    """
    address = _cluster_address(address, spec)
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
    reaper = Reaper.start()  # before ray.init: a SIGKILL while Ray starts is covered too
    try:
        os.environ.setdefault("PL_DISABLE_FORK", "1")  # what Tune gives each trial actor, inherited instead
        inherited = dict(os.environ)  # the embedded Ray's workers start with the environment of this moment
        with _loopback_only():
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _system_config={"preload_python_modules": [PRELOAD]})
        try:
            with _trial_actors_on_started_workers(inherited):
                yield "local"
        finally:
            try:
                _stop_autoscaler_monitor()
            finally:
                ray.shutdown()
    finally:
        reaper.stop()


def _stop_autoscaler_monitor() -> None:
    """Kill the embedded Ray's autoscaler monitor before `ray.shutdown()`: Ray stops its processes one after
    another, giving each a second after SIGTERM, and the monitor (of no use to a one-node Ray with nothing
    to scale) takes all of it -- a second at the end of every launch. It holds nothing of the sweep's."""
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)


@contextmanager
def _trial_actors_on_started_workers(inherited: dict[str, str]) -> Iterator[None]:
    """Let Tune's trial actors take the worker processes Ray starts with the node (one per CPU, started
    while `ray.init` returns) instead of each starting a new one (~0.6 s later, and the started ones idle).

    Tune 2.60 creates every trial actor with a runtime env of environment variables (`PL_DISABLE_FORK=1` and
    any of a few AWS/Train variables the driver has set), and a worker started with the node has no runtime
    env, so Ray never gives it such an actor. In the embedded Ray every worker already has those variables
    (it inherits the environment `ray.init` was called with): while set, an actor whose variables all have
    those values is created without a runtime env; any other keeps Tune's.
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


PROBE_S = 5.0  # how long the cluster's GCS port has to accept a TCP connection
JOIN_RETRIES = 5  # attempts (~1 s apart) to get the cluster's id from its GCS: a refused token fails them all


def _cluster_address(address: str | None, spec: SweepSpec) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS, else the spec's; None for an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or spec.ray_address
    return None if address == "local" else address


_HINT = ("check --address, RAY_ADDRESS or the spec's ray_address (`ray status` on the head node prints it), "
         "or leave them all unset to run on a local Ray")


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
    from ray._private import ray_constants

    probe_cluster(address)
    retries = ray_constants.NUM_REDIS_GET_RETRIES
    ray_constants.NUM_REDIS_GET_RETRIES = JOIN_RETRIES  # a refused token: 5 s, not Ray's 20
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        ray.shutdown()
        raise UserError([f"{address}: cannot join the Ray cluster there ({type(e).__name__}: {_first_line(e)}); "
                         "if the cluster uses token authentication, set RAY_AUTH_TOKEN to its token; "
                         f"{_HINT}"]) from None
    finally:
        ray_constants.NUM_REDIS_GET_RETRIES = retries


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _scheduler(spec: SweepSpec, trials: list[TrialConfig]):
    s = spec.scheduler
    if s.type == "asha":
        from ray.tune.schedulers import ASHAScheduler
        max_t = s.max_t or max(t.optim.epochs for t in trials)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    return None


def _snapshot(spec: SweepSpec, smoke: bool, trials: list[Trial]) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json", exclude_unset=True), "smoke": smoke, "trial_ids": [t.id for t in trials]}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys(), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {json.dumps(old)} -> {json.dumps(new)}"]


# Spec fields that decide how each trial runs (the trials themselves are compared by id, a hash of the config).
TRIAL_FIELDS = ("resources", "scheduler", "max_failures")


def _check_resume(old: dict[str, Any], new: dict[str, Any], *, force: bool, spec_path: Path) -> None:
    """Resume only the sweep that was started: any change is refused without --force; with --force only
    changes that leave every trial as it was (description, tracking, ray_address, ...)."""
    changes = _diff(old, new)
    if not changes:
        return
    if not force:
        raise UserError([f"{spec_path}: the spec changed since the sweep started; refusing to resume "
                         "(--force resumes edits that change no trial, e.g. description or tracking):",
                         *("  " + c for c in changes)])
    was, now = old.get("trial_ids", []), new["trial_ids"]
    what = []
    if added := [t for t in now if t not in was]:
        what.append(f"{len(added)} trials added (ids {', '.join(added[:3])}{', ...' if len(added) > 3 else ''})")
    if removed := [t for t in was if t not in now]:
        what.append(f"{len(removed)} trials removed or changed (ids {', '.join(removed[:3])}"
                    f"{', ...' if len(removed) > 3 else ''})")
    if old.get("smoke") != new["smoke"]:
        what.append(f"smoke: {json.dumps(old.get('smoke'))} -> {json.dumps(new['smoke'])}")
    before, after = SweepSpec.model_validate(old["spec"]), SweepSpec.model_validate(new["spec"])
    for name in TRIAL_FIELDS:
        what += _diff(_as_data(getattr(before, name)), _as_data(getattr(after, name)), name)
    if what:
        shown = "; ".join(what[:5]) + (f"; and {len(what) - 5} more" if len(what) > 5 else "")
        raise UserError([f"{spec_path}: the sweep's trials changed since it started ({shown}); --force resumes "
                         "only edits that change no trial: start these trials as a new sweep (a new name or --storage)"])


def _as_data(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


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
    spec = load_spec(spec_path)
    strategy = strategy_for(spec, smoke=smoke)  # the grid's trials, or a sampler's (orchestrator.strategy)
    configs = strategy.configs
    if spec.scheduler.type == "asha" and spec.scheduler.metric.startswith("test_"):
        late = sorted({c.eval_every for c in configs if c.eval_every != 1})
        if late:
            raise UserError([f"{spec_path}: scheduler.type: asha compares {spec.scheduler.metric} every epoch, "
                             f"but eval_every={late[0]} scores the test set less often; set eval_every: 1"])
    sweep_dir = sweep_dir_for(spec, storage, smoke=smoke)
    resolve_tracking(spec, Path(results_root) / sweep_dir.name, tracking_uri)  # a bad store: refused before Ray
    if spec.resources.workers > 1 and any(c.finetune is not None for c in configs):
        raise UserError([f"{spec_path}: resources.workers: fine-tuning trials run in one process; set workers: 1"])
    local = _cluster_address(address, spec) is None  # an embedded local Ray: the trials run on this machine
    if problems := (resource_problems(spec.resources, source=str(spec_path)) if local else []) + memory_problems(
            configs, source=str(spec_path)):
        raise UserError(problems)
    command = launch_command(spec_path, address=address, storage=storage, smoke=smoke, resume=resume, force=force,
                             tracking_uri=tracking_uri)
    # One launcher per sweep, from before its state is read until Ray is shut down (a second one is refused).
    with sweep_lock(sweep_dir):
        return _launch_locked(spec=spec, spec_path=Path(spec_path), strategy=strategy, sweep_dir=sweep_dir,
                              address=address, smoke=smoke, resume=resume, force=force, trust_state=trust_state,
                              command=command,
                              results_root=Path(results_root), tracking_uri=tracking_uri, verbose=verbose,
                              started_at=started_at)


def _launch_locked(*, spec: SweepSpec, spec_path: Path, strategy: GridStrategy | OptunaStrategy, sweep_dir: Path,
                   address: str | None, smoke: bool, resume: bool, force: bool, trust_state: bool, command: str,
                   results_root: Path,
                   tracking_uri: str | None, verbose: bool, started_at: float) -> LaunchResult:
    trials, configs = strategy.trials, strategy.configs
    name = sweep_dir.name
    snapshot = _snapshot(spec, smoke, trials)
    snap_file = sweep_dir / SNAPSHOT
    exists = tune.Tuner.can_restore(str(sweep_dir))
    if exists and not resume:
        raise UserError([f"{sweep_dir}: a sweep named {spec.name!r} already exists there; "
                         "pass --resume to continue it, or --storage DIR / a new name to start another"])
    if resume and not exists:
        raise UserError([f"{sweep_dir}: no sweep state to resume; run without --resume to start it"])
    if exists:
        check_tune_state(sweep_dir)
        if not trust_state:
            verify_state(sweep_dir)  # before anything unpickles it: only state this user's launcher signed
    if resume and snap_file.exists():
        _check_resume(read_snapshot(sweep_dir)[0], snapshot, force=force, spec_path=spec_path)

    if (cluster := _cluster_address(address, spec)) and not ray.is_initialized():
        probe_cluster(cluster)  # in a moment, before data is prepared
    sha = code_version()  # the code the trials run (its checkout, wherever launched), recorded before anything changes
    data_paths = prepare_data(configs, cwd=Path.cwd())
    if problems := data_problems(configs, data_paths, source=str(spec_path)):
        raise UserError(problems)
    pretrained = resolve_pretrained(configs, data_paths, cwd=Path.cwd(), source=str(spec_path))
    # A trial that fails for good reports {"failed": ...} without the scheduler's metric (ASHA skips it).
    # Every variable set for Tune (here and by ray_session: PL_DISABLE_FORK) is as it was once the launch ends.
    with _env_switch("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1"), \
            _env_switch("PL_DISABLE_FORK", os.environ.get("PL_DISABLE_FORK", "1")), ray_session(address, spec):
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record_launch(sweep_dir, started_at=started_at, ray_ready_at=time.time(), command=command)
        if not resume or force:
            snap_file.write_text(json.dumps(snapshot, indent=1))
        results_dir = results_root / name
        uri, experiment = resolve_tracking(spec, results_dir, tracking_uri)
        design = design_for(spec, smoke=smoke)  # design_of's cells, plus a search's ranged dimensions
        tracking = dict(uri=uri, experiment=experiment, sweep=name,
                        artifact_root=str(results_dir / "mlflow" / "artifacts"), design=design)
        callbacks = [ProgressTable(total=strategy.total, design=design)] if verbose else []
        callbacks += [MlflowProgressCallback(**tracking), KeepHistoryOnRetry(), *_history_loggers(), _PrepareFinish(),
                      TrialRecords(sweep_dir), SignState(sweep_dir)]
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=tune_trainable(spec.resources),
                                       resume_unfinished=True, resume_errored=True, restart_errored=False)
        else:
            envelopes = build_envelopes(spec, run_order(trials), data_paths=data_paths, pretrained=pretrained,
                                        sweep_dir=sweep_dir)
            tuner = _new_tuner(spec, configs, envelopes, sweep_dir=sweep_dir, callbacks=callbacks, strategy=strategy,
                               search_alg=strategy.search_alg(data_paths=data_paths, sweep_dir=sweep_dir))
        interrupted = False
        try:
            with _only_our_loggers(not resume):
                tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
        _record_final_state(sweep_dir)
        table = collect_trials(sweep_dir, trials=strategy.finished_trials(sweep_dir))
        interrupted = interrupted or any(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in table)
        write_results(table, spec=spec, command=command, results_dir=results_dir, sweep_dir=sweep_dir, sha=sha)
        if "search" in spec.model_fields_set:  # pareto.csv, hypervolume.csv and their plots; MLflow's hypervolume
            write_search_results(table, spec=spec, sweep_dir=sweep_dir, results_dir=results_dir, strategy=strategy,
                                 uri=uri, experiment=experiment, verbose=verbose)
        finalize(sweep_dir=sweep_dir, results_dir=results_dir, table=table, verbose=verbose,
                 complete=not interrupted, **tracking)
    return LaunchResult(sweep_dir=sweep_dir, results_dir=results_dir, trials=table, interrupted=interrupted)


def _record_final_state(sweep_dir: Path) -> None:
    """After `fit`: sign Tune's state as it was saved last, and write every trial's JSON record from it (this
    launcher's own state, verified or written here: a sweep launched before the records gets them now)."""
    if not tune.Tuner.can_restore(str(sweep_dir)):
        return
    sign_state(sweep_dir)
    for trial in tune.ExperimentAnalysis(str(sweep_dir)).trials:
        record_trial(sweep_dir, trial)


@contextmanager
def _env_switch(name: str, value: str) -> Iterator[None]:
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


class _PrepareFinish(tune.Callback):
    """When the first trial ends, import what the end of the sweep needs (the frontier's pandas, scipy and
    matplotlib: ~1.5 s on a small CPU) in a background thread, instead of after the last trial."""

    def __init__(self) -> None:
        self.started = False

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if not self.started:
            self.started = True
            threading.Thread(target=_import_finish, name="prepare-finish", daemon=True).start()


def _import_finish() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import orchestrator.frontier  # noqa: F401


def _history_loggers() -> list:
    """Tune's result.json and progress.csv writers (each trial's per-epoch history, which `collect_trials`,
    `sync` and `KeepHistoryOnRetry` read). Not Tune's TensorBoard logger: importing it imports tensorboardX and
    torch into the launcher, 1.5 s before the first trial could start; MLflow is this project's dashboard."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def _only_our_loggers(on: bool):
    """While a new sweep runs, Tune adds no default loggers (ours are in its callbacks). A resumed sweep keeps
    Tune's defaults: one started before the launcher passed its own loggers has none in its saved callbacks."""
    return _env_switch("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1") if on else nullcontext()


def _new_tuner(spec: SweepSpec, configs: list[TrialConfig], envelopes: list[TrialEnvelope], *, sweep_dir: Path,
               callbacks: list, strategy: GridStrategy | OptunaStrategy, search_alg=None) -> tune.Tuner:
    return tune.Tuner(
        tune_trainable(spec.resources),
        param_space=strategy.param_space(envelopes),  # the grid's envelopes, or nothing: the searcher's points
        tune_config=tune.TuneConfig(
            search_alg=search_alg, num_samples=strategy.num_samples,
            # A metric only for ASHA: FIFO trials may score the test set only at the end (eval_every).
            metric=spec.scheduler.metric if spec.scheduler.type == "asha" else None,
            mode=spec.scheduler.mode if spec.scheduler.type == "asha" else None,
            scheduler=_scheduler(spec, configs),
            max_concurrent_trials=spec.max_concurrent_trials,
            # One process per concurrent slot, reused by the next trial: no interpreter start and
            # torch import per trial (seconds each on a small CPU). Data-parallel trials own workers.
            reuse_actors=spec.resources.workers == 1,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
