"""The Ray Tune trainable: one sweep trial = one call of `bvit.trial.run_trial` on the trial's envelope.

`run_trial(config)` is a module-level function trainable; `config` holds the trial's `TrialEnvelope`. It
trains `envelope.resolved` under `envelope.trial_id` (stored in every checkpoint). Each epoch `train`
writes `checkpoint.pt` into a local directory and calls `report`, which hands metrics plus a
`tune.Checkpoint` of that directory to Tune; Tune persists it under the sweep's storage. On a retry
(`max_failures`) or a resumed sweep Tune passes the last checkpoint back, and `train` continues from it.

With `workers > 1` the trial runs as a Ray Train `TorchTrainer` (data-parallel, gloo on CPU / NCCL on
GPU) inside the Tune trial; worker metrics flow back to Tune through `TuneReportCallback`, and Ray
Train's own storage (named by trial id) keeps the checkpoints that a restarted trial resumes from.

A failure that a retry would only repeat (bvit's TrainingError: the loss diverged; CheckpointError; DataError)
does not go to Tune's retries (`max_failures`): the trial reports `{"failed": "<error>", "epoch": N}` and ends;
`results.collect_trials` shows it as ERROR with that message. Anything else (a crash, a killed worker) raises
and is retried from the last checkpoint.

The trainable decides each trial's device from its reservation, never from what the process can see
(Ray 2.60 leaves `CUDA_VISIBLE_DEVICES` alone in zero-GPU workers): a Ray Train worker trains on
`ray.train.torch.get_device()`, a single-process trial on `cuda` only when it reserved `gpus` > 0, else on
the CPU, with CUDA hidden from it so that nothing (FFCV's streams included) opens a context on a GPU it
did not reserve.

Tests crash a trial on purpose by setting `BVIT_SWEEP_TEST_FAULT` (JSON `{"crash_at_epoch": N,
"marker_dir": DIR}`) in the launching process: `tune_trainable` reads it there and hands it to the trials.
The trial crashes once after epoch N, at the end of epoch N+1 before reporting it: epoch N's result and
checkpoint were handed to Tune a whole epoch earlier, and epoch N+1's work is lost, as in a real crash.
(Epoch N once went missing from result.json after such a crash: not a race with `tune.report` but
Tune's restore of the trial's history on restart, which `KeepHistoryOnRetry` below now keeps whole.)

`KeepHistoryOnRetry` (a driver-side callback) keeps a retried trial's per-epoch history whole: Tune's loggers
write result.json / progress.csv in a driver staging directory that is synced to the sweep's storage only
now and then, and a restarted trial copies the storage's copy back over them, dropping every epoch
reported since the last sync (seen on loaded machines: epochs [1, 3] for a crash after epoch 2).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from bvit.config import CHECKPOINT_NAME
from orchestrator.envelope import FAILED_KEY, TRIAL_KEY, TrialEnvelope
from orchestrator.preflight import DRIVER_CPU
from orchestrator.provenance import PROVENANCE_KEY, machine_provenance
from orchestrator.spec import Resources
from orchestrator.system_metrics import TrialSystemMetrics, TrialTracking

# bvit.trial (torch, timm, FFCV) is imported inside the trial processes only: the launching process
# starts Ray seconds sooner.

__all__ = ["FAULT_ENV", "FaultInjected", "KeepHistoryOnRetry", "run_trial", "trial_device", "tune_trainable"]

RETRIES_FILE = "retries.json"
FAULT_ENV = "BVIT_SWEEP_TEST_FAULT"

HISTORY_FILES = ("result.json", "progress.csv")  # ray.tune.result.EXPR_RESULT_FILE, EXPR_PROGRESS_FILE


class KeepHistoryOnRetry(tune.Callback):
    """Before a failed trial restarts, push its driver-side history files to the sweep's storage, which is
    what Tune restores them from on the restart (`LoggerCallback._restore_from_remote`)."""

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        import pyarrow.fs

        storage = trial.storage  # Ray's StorageContext: where the trial's files live for good
        for name in HISTORY_FILES:
            local = Path(trial.local_path, name)
            if local.is_file():
                pyarrow.fs.copy_files(str(local), Path(storage.trial_fs_path, name).as_posix(),
                                      destination_filesystem=storage.storage_filesystem)


def _deterministic() -> tuple[type[BaseException], ...]:
    """bvit's errors that a retry would only repeat: divergence (TrainingError), a damaged or refused
    checkpoint (CheckpointError), data that is missing or does not fit the model (DataError)."""
    from bvit.data.format import DataError
    from bvit.engine import TrainingError
    from bvit.serialization import CheckpointError

    return TrainingError, CheckpointError, DataError


class FaultInjected(RuntimeError):
    """Raised by the test-only fault switch (`BVIT_SWEEP_TEST_FAULT`)."""


def tune_trainable(resources: Resources, tracking: TrialTracking | None = None):
    """`run_trial` with its per-trial resources, where its system metrics go (`tracking`: this launch's MLflow
    store, so a resumed sweep's trials log where the resume does) and the test fault switch when its variable
    is set."""
    fault = json.loads(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None
    given = {k: v for k, v in (("fault", fault), ("tracking", tracking)) if v is not None}
    fn = tune.with_parameters(run_trial, **given) if given else run_trial
    if resources.workers > 1:  # the Tune trial only drives a TorchTrainer; its workers hold the resources
        return tune.with_resources(fn, {"cpu": DRIVER_CPU})  # Ray refuses an empty bundle
    return tune.with_resources(fn, {"cpu": resources.cpus, "gpu": resources.gpus})


def trial_device(resources: Resources) -> str:
    """The device of a single-process trial: "cuda" (the GPU Ray assigned, device 0 of those it made
    visible) when the trial reserved GPUs, else "cpu" -- even where a GPU is visible."""
    return "cuda" if resources.gpus > 0 else "cpu"


def _hide_unreserved_gpus(resources: Resources) -> None:
    """A process that reserved no GPU sees none (before torch first looks; Ray resets the variable for a
    later task that reserves one)."""
    torch = sys.modules.get("torch")
    if resources.gpus == 0 and (torch is None or not torch.cuda.is_initialized()):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _maybe_crash(fault: dict[str, Any] | None, trial_id: str, epoch: int) -> None:
    """Test-only: crash once when `epoch` (the last one reported) is `fault["crash_at_epoch"]` (a marker
    file makes it once)."""
    if not fault or epoch != fault["crash_at_epoch"]:
        return
    marker = Path(fault["marker_dir"]) / f"{trial_id}.crashed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise FaultInjected(f"injected crash of trial {trial_id} after epoch {epoch}")


def _restore_into(local_dir: Path, checkpoint) -> int:
    """Copy a Tune/Train checkpoint into `local_dir`; returns how many times this trial was restarted."""
    retries = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            for name in (CHECKPOINT_NAME, RETRIES_FILE):
                if (Path(d) / name).exists():
                    shutil.copy2(Path(d) / name, local_dir / name)
        if (local_dir / RETRIES_FILE).exists():
            retries = json.loads((local_dir / RETRIES_FILE).read_text())["retries"] + 1
        else:
            retries = 1
    (local_dir / RETRIES_FILE).write_text(json.dumps({"retries": retries}))
    return retries


PRELOAD = "orchestrator.preload"  # what the embedded Ray's worker processes import as they start
_PROCESS: dict[str, Any] = {"trials": 0, "last_end": None}  # this trial process: trials started, when the last ended


def _start_phases() -> dict[str, Any]:
    """How this trial started: `phase_start_s` (a fresh process: since it was created; a reused one: since
    its previous trial ended), `process_trials` (1 = a fresh process), `trial_started_at` (Unix time) and
    `process_preloaded` (the process had imported `PRELOAD` as it started, before taking this trial) and
    `process_runtime_env` (whether Ray gave this actor a runtime env of its own: then it cannot run on the
    workers Ray starts with the node, and a new process is started for it)."""
    import psutil  # a Ray dependency

    now = time.time()
    _PROCESS["trials"] += 1
    since = _PROCESS["last_end"] if _PROCESS["last_end"] is not None else psutil.Process().create_time()
    return {"phase_start_s": max(0.0, now - since), "process_trials": _PROCESS["trials"], "trial_started_at": now,
            "process_preloaded": PRELOAD in sys.modules,
            "process_runtime_env": bool(ray.is_initialized() and ray.get_runtime_context().runtime_env)}


def run_trial(config: dict[str, Any], fault: dict[str, Any] | None = None,
              tracking: TrialTracking | None = None) -> None:
    """Tune function trainable for one trial (single process, or data-parallel when workers > 1). With
    `tracking`, the trial's system metrics go into its MLflow run while it trains (each rank's, data-parallel)."""
    started = _start_phases()
    try:
        env = TrialEnvelope.of(config)
        if env.resources.workers > 1:
            _run_data_parallel(env, fault, tracking)  # each rank finds its node's data itself
        else:
            _run_single(env.on_this_node(), fault, started, tracking)
    finally:
        _PROCESS["last_end"] = time.time()


def _run_single(env: TrialEnvelope, fault: dict[str, Any] | None, started: dict[str, Any],
                tracking: TrialTracking | None) -> None:
    _hide_unreserved_gpus(env.resources)
    t_import = time.perf_counter()
    import torch

    from bvit.trial import run_trial as train

    DETERMINISTIC = _deterministic()  # noqa: N806  (imports bvit's error types: after CUDA is hidden)
    first = {**started, "phase_import_s": time.perf_counter() - t_import}  # 0 in a reused process
    torch.set_num_threads(env.resources.torch_threads)
    provenance = machine_provenance(with_torch=True)  # in every report: a retry may run on another machine
    with (tempfile.TemporaryDirectory(prefix=f"bvit-{env.trial_id}-") as tmp,
          TrialSystemMetrics(tracking, trial_id=env.trial_id) as system):
        local = Path(tmp)
        retries = _restore_into(local, tune.get_checkpoint())

        reached = {"epoch": 0}

        def report(metrics: dict[str, Any]) -> None:
            _maybe_crash(fault, env.trial_id, metrics["epoch"] - 1)
            metrics = {**metrics, **first, "retries": retries, "node_id": ray.get_runtime_context().get_node_id(),
                       "reported_at": time.time(), PROVENANCE_KEY: provenance}
            first.clear()  # the start-up phases go with the first report only
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(local)))
            system.reported()
            reached["epoch"] = metrics["epoch"]

        try:
            train(env.resolved, report=report, checkpoint_dir=local, trial_id=env.trial_id,
                  device=torch.device(trial_device(env.resources)))
        except DETERMINISTIC as e:  # the same input fails the same way again: end the trial, no retry
            tune.report({FAILED_KEY: f"{type(e).__name__}: {e}", "epoch": reached["epoch"], "retries": retries})


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: one rank of a data-parallel trial (torch.distributed is set up by TorchTrainer)."""
    env, fault = TrialEnvelope.of(loop_config).on_this_node(), loop_config.get("fault")
    tracking = TrialTracking(**loop_config["tracking"]) if loop_config.get("tracking") else None
    _hide_unreserved_gpus(env.resources)
    import ray.train
    import ray.train.torch

    from bvit.trial import run_trial as train

    DETERMINISTIC = _deterministic()  # noqa: N806
    rank = ray.train.get_context().get_world_rank()
    provenance = machine_provenance(with_torch=True)
    with (tempfile.TemporaryDirectory(prefix=f"bvit-rank{rank}-") as tmp,
          TrialSystemMetrics(tracking, trial_id=env.trial_id, node_id=f"rank{rank}") as system):
        local = Path(tmp)
        retries = _restore_into(local, ray.train.get_checkpoint())
        reached = {"epoch": 0}

        def report(metrics: dict[str, Any]) -> None:
            if rank == 0:
                _maybe_crash(fault, env.trial_id, metrics["epoch"] - 1)
            metrics = {**metrics, "retries": retries, PROVENANCE_KEY: provenance}
            ckpt = ray.train.Checkpoint.from_directory(str(local)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
            system.reported()
            reached["epoch"] = metrics["epoch"]

        try:
            train(env.resolved, report=report, checkpoint_dir=local, trial_id=env.trial_id,
                  device=ray.train.torch.get_device())  # this worker's GPU, or the CPU when it reserved none
        except DETERMINISTIC as e:  # every rank fails alike: the run ends once, retried neither by Train nor Tune
            ray.train.report({FAILED_KEY: f"{type(e).__name__}: {e}", "epoch": reached["epoch"], "retries": retries})


def _run_data_parallel(env: TrialEnvelope, fault: dict[str, Any] | None, tracking: TrialTracking | None) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = env.resources
    per_worker = {"CPU": r.cpus / r.workers, **({"GPU": r.gpus / r.workers} if r.gpus else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={TRIAL_KEY: env.to_tune(), "fault": fault,
                           "tracking": dataclasses.asdict(tracking) if tracking else None},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"train-{env.trial_id}",
            storage_path=env.train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=env.max_failures),
        ),
    )
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    trainer.fit()
