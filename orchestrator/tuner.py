"""The Ray Tune `Tuner` of a sweep: what it runs, how it chooses trials (the strategy's), how it schedules and
records them.

    callbacks = sweep_callbacks(sweep_dir, tracking, progress=ProgressTable(...))
    tuner = build_tuner(spec, strategy, where=where, callbacks=callbacks, resume=False,
                        data_paths=data_paths, pretrained=pretrained)

A new sweep's Tuner takes its `param_space`, `search_alg` and `num_samples` from the strategy
(`orchestrator.strategy`: one `grid_search` over the grid's envelopes, or a searcher's points); a resumed
sweep's is the strategy's `restore` of the saved experiment (its callbacks and searcher come back with it).
Trials are named and stored by their spec trial id, a hash of their config. Tune is given the sweep's storage as
the user wrote it (`SweepLocation.tune_path`: a folder, or a URI whose filesystem pyarrow opens on each node).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ray import tune

from bvit.config import TrialConfig
from orchestrator.callbacks import SignState, TrialRecords
from orchestrator.envelope import Pretrained, TrialEnvelope, build_envelopes
from orchestrator.planning import run_order
from orchestrator.spec import SweepSpec
from orchestrator.storage import SweepLocation
from orchestrator.strategy import Strategy
from orchestrator.system_metrics import TrialTracking
from orchestrator.tracking import MlflowProgressCallback
from orchestrator.trainable import KeepHistoryOnRetry, tune_trainable

__all__ = ["PrepareFinish", "build_tuner", "sweep_callbacks", "trial_name"]


def build_tuner(spec: SweepSpec, strategy: Strategy, *, where: SweepLocation, callbacks: list, resume: bool,
                data_paths: dict[str, str], pretrained: Pretrained, tracking: TrialTracking | None = None,
                data_sources: dict[str, str] | None = None) -> tune.Tuner:
    """The sweep's Tuner: the saved one with `resume`, else a new one over the strategy's trials. `tracking`: where
    the trials log their system metrics (this launch's store); `data_sources`: the data's published copies (URI
    storage, orchestrator.data_share)."""
    if resume:
        return strategy.restore(where.tune_path, trainable=tune_trainable(spec.resources, tracking))
    sweep_dir = where.dir
    envelopes = build_envelopes(spec, run_order(strategy.trials), data_paths=data_paths, pretrained=pretrained,
                                sweep_dir=where.tune_path, data_sources=data_sources)
    return tune.Tuner(
        tune_trainable(spec.resources, tracking),
        param_space=strategy.param_space(envelopes),  # the grid's envelopes, or nothing: the searcher's points
        tune_config=tune.TuneConfig(
            search_alg=strategy.search_alg(data_paths=data_paths, sweep_dir=sweep_dir, data_sources=data_sources),
            num_samples=strategy.num_samples,
            # A metric only for ASHA: FIFO trials may score the test set only at the end (eval_every).
            metric=spec.scheduler.metric if spec.scheduler.type == "asha" else None,
            mode=spec.scheduler.mode if spec.scheduler.type == "asha" else None,
            scheduler=_scheduler(spec, strategy.configs),
            max_concurrent_trials=spec.max_concurrent_trials,
            # One process per concurrent slot, reused by the next trial: no interpreter start and
            # torch import per trial (seconds each on a small CPU). Data-parallel trials own workers.
            reuse_actors=spec.resources.workers == 1,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=where.name, storage_path=where.storage_path, verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def sweep_callbacks(sweep_dir: Path, tracking: dict[str, Any], *, progress: tune.Callback | None,
                    source: tuple[str, str] | None = None) -> list:
    """The launcher's Tune callbacks: the progress table (when verbose), MLflow (`source`: the launch's git SHA
    and command, for each finished trial's run), each trial's history kept across retries and written as JSON and
    CSV, the finish's imports, the trial records and the state's signature."""
    callbacks = [progress] if progress is not None else []
    return callbacks + [MlflowProgressCallback(**tracking, source=source), KeepHistoryOnRetry(), *_history_loggers(),
                        PrepareFinish(), TrialRecords(sweep_dir), SignState(sweep_dir)]


def trial_name(trial) -> str:
    """Ray's trial name and directory: the spec's trial id."""
    return TrialEnvelope.of(trial.config).trial_id


def _scheduler(spec: SweepSpec, trials: list[TrialConfig]):
    s = spec.scheduler
    if s.type == "asha":
        from ray.tune.schedulers import ASHAScheduler
        max_t = s.max_t or max(t.optim.epochs for t in trials)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    return None


def _history_loggers() -> list:
    """Tune's result.json and progress.csv writers (each trial's per-epoch history, which `collect_trials`,
    `sync` and `KeepHistoryOnRetry` read). Not Tune's TensorBoard logger: importing it imports tensorboardX and
    torch into the launcher, 1.5 s before the first trial could start; MLflow is this project's dashboard."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


class PrepareFinish(tune.Callback):
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
