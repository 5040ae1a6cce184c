"""MLflow tracking: one parent run per sweep, one nested child run per trial, matched by trial id.

Ray Tune's results are the source of truth. During a sweep a Tune callback logs each epoch from a
background thread (an unreachable tracking server costs a warning, never the sweep); afterwards, and
on `bvit-sweep sync`, every epoch Ray recorded that MLflow lacks is back-filled. Logging is
idempotent: an epoch is one `log_batch` (all of its metrics at step=epoch), and an epoch already
present is never logged again, so a retried or resumed trial continues its own child run.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ray import tune

from bvit.config import TrialConfig
from orchestrator.envelope import TrialEnvelope

__all__ = ["SweepTracker", "MlflowProgressCallback", "default_tracking_uri", "resolve_tracking", "sync_sweep"]

TAG_SWEEP, TAG_TRIAL, TAG_ROLE = "bvit.sweep", "bvit.trial_id", "bvit.role"
EPOCH_METRICS = ("train_loss", "test_top1", "test_top5", "test_loss", "best_test_top1", "lr", "images_per_s",
                 "epoch_seconds", "retries", "merged_test_top1")

# Fail fast when the server is away: the sweep must not stall on HTTP retries (a user's own settings win).
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def default_tracking_uri(results_dir: Path) -> str:
    """The embedded store: SQLite in results/<sweep>/mlflow/ (artifacts beside it)."""
    d = (results_dir / "mlflow").resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def resolve_tracking(spec, results_dir: Path, override: str | None = None) -> tuple[str, str]:
    """(tracking URI, experiment name): --tracking-uri, else MLFLOW_TRACKING_URI, else the spec, else local."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or default_tracking_uri(results_dir)
    return uri, spec.tracking.experiment or spec.name


class SweepTracker:
    """Parent/child runs of one sweep in one MLflow experiment."""

    def __init__(self, *, uri: str, experiment: str, sweep: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for key, value in FAIL_FAST_HTTP.items():  # read by MLflow at each request
            os.environ.setdefault(key, value)
        self.uri, self.sweep = uri, sweep
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self._runs: dict[str, str] = {}
        self._epochs: dict[str, set[int]] = {}

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def parent_run_id(self) -> str:
        if "__parent__" not in self._runs:
            rid = self._find(f"tags.`{TAG_SWEEP}` = '{self.sweep}' and tags.`{TAG_ROLE}` = 'parent'")
            if rid is None:
                rid = self.client.create_run(self.experiment_id, run_name=self.sweep,
                                             tags={TAG_SWEEP: self.sweep, TAG_ROLE: "parent"}).info.run_id
            self._runs["__parent__"] = rid
        return self._runs["__parent__"]

    def child_run_id(self, trial_id: str, cfg: TrialConfig) -> str:
        """The trial's run (found by trial id, else created nested under the parent with its params)."""
        if trial_id not in self._runs:
            rid = self._find(f"tags.`{TAG_SWEEP}` = '{self.sweep}' and tags.`{TAG_TRIAL}` = '{trial_id}'")
            if rid is None:
                from mlflow.entities import Param
                m = cfg.model
                rid = self.client.create_run(self.experiment_id, run_name=f"{m.arch}-w{m.width}-T{m.steps}-s{cfg.seed}-{trial_id}", tags={
                    TAG_SWEEP: self.sweep, TAG_TRIAL: trial_id, TAG_ROLE: "trial",
                    "mlflow.parentRunId": self.parent_run_id(),
                }).info.run_id
                params = [Param(k, str(v)) for k, v in cfg.flat().items()]
                for i in range(0, len(params), 100):
                    self.client.log_batch(rid, params=params[i:i + 100])
            self._runs[trial_id] = rid
        return self._runs[trial_id]

    def _logged_epochs(self, run_id: str) -> set[int]:
        if run_id not in self._epochs:
            self._epochs[run_id] = {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}
        return self._epochs[run_id]

    def log_epochs(self, trial_id: str, cfg: TrialConfig, records: list[dict[str, Any]]) -> int:
        """Log every record (one per epoch) not yet in the trial's run; returns how many were logged."""
        from mlflow.entities import Metric, Param

        rid = self.child_run_id(trial_id, cfg)
        done = self._logged_epochs(rid)
        logged = 0
        for r in sorted(records, key=lambda r: r["epoch"]):
            epoch = int(r["epoch"])
            if epoch in done:
                continue
            ts = int(time.time() * 1000)
            metrics = [Metric("epoch", epoch, ts, epoch)] + [
                Metric(k, float(r[k]), ts, epoch) for k in EPOCH_METRICS if r.get(k) is not None and r[k] == r[k]]
            params = []
            if not done and r.get("params") is not None:
                run_params = self.client.get_run(rid).data.params
                params = [Param(k, str(int(r[k]))) for k in ("params", "flops_per_image") if k not in run_params]
            self.client.log_batch(rid, metrics=metrics, params=params)
            done.add(epoch)
            logged += 1
        return logged

    def finish(self, trial_id: str, cfg: TrialConfig, status: str) -> None:
        rid = self.child_run_id(trial_id, cfg)
        self.client.set_terminated(rid, {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(status, "KILLED"))

    def finish_parent(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_run_id(), "FINISHED" if ok else "KILLED")


class MlflowProgressCallback(tune.Callback):
    """Logs each epoch result to the trial's child run from a background thread; failures only warn."""

    def __init__(self, *, uri: str, experiment: str, sweep: str, artifact_root: str | None = None) -> None:
        self.kw = dict(uri=uri, experiment=experiment, sweep=sweep,
                       artifact_root=Path(artifact_root) if artifact_root else None)
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"kw": self.kw, "_q": None, "_thread": None}

    def _worker(self) -> None:
        tracker, warned = None, False
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                tracker = tracker or SweepTracker(**self.kw)
                kind, trial_id, cfg, payload = item
                if kind == "epoch":
                    tracker.log_epochs(trial_id, cfg, [payload])
                else:
                    tracker.finish(trial_id, cfg, payload)
            except Exception as e:  # the server being away must not stop training; `sync` back-fills
                tracker = None
                if not warned:
                    warnings.warn(f"MLflow at {self.kw['uri']} unreachable ({type(e).__name__}: {e}); training goes "
                                  "on, and the sweep back-fills MLflow at the end (or run `bvit-sweep sync`)",
                                  stacklevel=1)
                    warned = True

    def _put(self, item) -> None:
        if self._thread is None:
            self._q = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self._thread.start()
        self._q.put(item)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        env = TrialEnvelope.of(trial.config)
        self._put(("epoch", env.trial_id, env.resolved, dict(result)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        env = TrialEnvelope.of(trial.config)
        self._put(("end", env.trial_id, env.resolved, "TERMINATED"))

    def on_experiment_end(self, trials, **info) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=120)
            self._thread = None


def sync_sweep(sweep_dir: Path, *, uri: str, experiment: str, sweep: str,
               artifact_root: Path | None = None) -> dict[str, int]:
    """Back-fill MLflow from Ray's results: every trial's every epoch, and run status. Idempotent."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep_dir))
    tracker = SweepTracker(uri=uri, experiment=experiment, sweep=sweep, artifact_root=artifact_root)
    tracker.parent_run_id()
    logged = trials = 0
    for trial in analysis.trials:
        env = TrialEnvelope.of(trial.config)
        df = analysis.trial_dataframes.get(trial.trial_id)
        records = [] if df is None or df.empty else df.to_dict("records")
        logged += tracker.log_epochs(env.trial_id, env.resolved, records)
        if trial.status in ("TERMINATED", "ERROR"):
            tracker.finish(env.trial_id, env.resolved, trial.status)
        trials += 1
    return {"trials": trials, "epochs_logged": logged}
