"""The Ray Tune trainable: one sweep trial = one call of `bvit.trial.run_trial`.

`run_trial(config)` is a module-level function trainable. `config` holds the resolved trial config
(`config["trial"]`, validated again here) and its id. Each epoch `train` writes `checkpoint.pt` into a
local directory and calls `report`, which hands metrics plus a `tune.Checkpoint` of that directory to
Tune; Tune persists it under the sweep's storage. On a retry (`max_failures`) or a resumed sweep Tune
passes the last checkpoint back, and `train` continues from it rather than from epoch 0.

With `workers > 1` the trial runs as a Ray Train `TorchTrainer` (data-parallel, gloo on CPU / NCCL on
GPU) inside the Tune trial; worker metrics flow back to Tune through `TuneReportCallback`, and Ray
Train's own storage (named by trial id) keeps the checkpoints that a restarted trial resumes from.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from bvit.config import CHECKPOINT_NAME, TrialConfig

# bvit.trial (torch, timm, FFCV) is imported inside the trial processes only: the launching process
# starts Ray seconds sooner.

__all__ = ["run_trial", "FaultInjected"]

RETRIES_FILE = "retries.json"


class FaultInjected(RuntimeError):
    """Raised by the test-only fault switch (`config["_fault"]`)."""


def _maybe_crash(config: dict[str, Any], trial_id: str, epoch: int) -> None:
    """Test-only: crash once when `epoch` reaches `_fault.crash_at_epoch` (a marker file makes it once)."""
    fault = config.get("_fault")
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


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable for one trial (single process, or data-parallel when workers > 1)."""
    from bvit.trial import run_trial as run

    config = config["run"]  # the launcher's grid: one entry per trial
    cfg = TrialConfig.model_validate(config["trial"])
    if int(config.get("workers", 1)) > 1:
        _run_data_parallel(config, cfg)
        return
    trial_id = config["trial_id"]
    torch_threads = config.get("torch_threads")
    if torch_threads:
        import torch
        torch.set_num_threads(int(torch_threads))
    with tempfile.TemporaryDirectory(prefix=f"bvit-{trial_id}-") as tmp:
        local = Path(tmp)
        retries = _restore_into(local, tune.get_checkpoint())

        def report(metrics: dict[str, Any]) -> None:
            metrics = {**metrics, "retries": retries, "node_id": ray.get_runtime_context().get_node_id()}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(local)))
            _maybe_crash(config, trial_id, metrics["epoch"])

        run(cfg, trial_id=trial_id, report=report, checkpoint_dir=local)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: one rank of a data-parallel trial (torch.distributed is set up by TorchTrainer)."""
    import ray.train

    from bvit.trial import run_trial as run

    cfg = TrialConfig.model_validate(loop_config["trial"])
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix=f"bvit-rank{rank}-") as tmp:
        local = Path(tmp)
        retries = _restore_into(local, ray.train.get_checkpoint())

        def report(metrics: dict[str, Any]) -> None:
            metrics = {**metrics, "retries": retries}
            ckpt = ray.train.Checkpoint.from_directory(str(local)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
            if rank == 0:
                _maybe_crash(loop_config, loop_config["trial_id"], metrics["epoch"])

        run(cfg, trial_id=loop_config["trial_id"], report=report, checkpoint_dir=local)


def _run_data_parallel(config: dict[str, Any], cfg: TrialConfig) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers = int(config["workers"])
    gpus, cpus = float(config.get("gpus", 0)), float(config.get("cpus", 1))
    per_worker = {"CPU": cpus / workers, **({"GPU": gpus / workers} if gpus else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"train-{config['trial_id']}",
            storage_path=config["train_storage"],
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=int(config.get("max_failures", 0))),
        ),
    )
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    trainer.fit()
