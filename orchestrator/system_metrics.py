"""A trial's system metrics (CPU, memory, disk, network; each NVIDIA GPU's utilisation and memory where
`nvidia-ml-py` finds one) in the trial's own MLflow child run, while it trains.

The samples are MLflow 3.17's own (`mlflow.system_metrics`: its CPU, disk, network and GPU monitors, its
`system/` names, e.g. `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
`system/gpu_0_utilization_percentage`), so a run's "System metrics" tab shows them. MLflow's own loop
(`SystemMetricsMonitor.monitor`) does not fit a Tune trial: it needs the run's id before it starts, while the
trial's run is made by the launcher's callback (orchestrator.tracking) once the trial's first epoch reaches
it; and it stops at the first sample that finds the run not RUNNING, which a resumed trial's run is until it
ends again. So the loop here samples from the trial's start, keeps what it sampled, looks its run up by
its tags (`bvit.sweep`, `bvit.trial_id`, as the launcher does: a trial's run is its oldest) once the trial
has reported an epoch, and from then logs every sample at once: step = sample number (continuing after a
resumed run's last one), timestamp = when it was taken. It only logs metrics: the run's status, times and
tags stay the launcher's.

    with TrialSystemMetrics(TrialTracking(uri=..., experiment=..., sweep=...), trial_id=...) as sm:
        train(..., report=lambda m: (tune.report(m), sm.reported()))

Nothing here can fail a trial: a store that cannot be reached costs one warning per process, and the
samples taken meanwhile are kept (up to `MAX_PENDING`) for the next try. Cost: one sample reads /proc
(and NVML) and writes one small batch; see README ("The dashboard") for its measured share of a trial.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_INTERVAL_S", "TrialTracking", "TrialSystemMetrics", "CPU_METRIC"]

DEFAULT_INTERVAL_S = 10.0  # MLflow's own default sampling interval
CPU = "cpu_utilization_percentage"  # a metric every sample has: where a run's last logged step is read
CPU_METRIC = "system/" + CPU
MAX_PENDING = 10_000  # samples kept while the store is away (a day at 10 s), the oldest dropped first
MAX_PER_BATCH = 1000  # MLflow's log_batch limit on metrics per request
STOP_WAIT_S = 15.0  # at most this long at a trial's end for the last sample to be logged
# A trial must not stall on HTTP retries either (orchestrator.tracking sets the same in the launcher).
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_WARNED: set[str] = set()  # tracking URIs this process has warned about


@dataclass(frozen=True)
class TrialTracking:
    """Where a trial's system metrics go: the sweep's MLflow store, experiment and sweep (its runs' `bvit.sweep`
    tag), and how often they are sampled (`interval_s`, seconds; 0: not at all)."""

    uri: str
    experiment: str
    sweep: str
    interval_s: float = DEFAULT_INTERVAL_S


def _monitors() -> list[Any]:
    """MLflow's monitors, as `SystemMetricsMonitor` picks them: CPU (and memory), disk, network, then NVIDIA's
    GPUs (NVML, `nvidia-ml-py`) or else AMD's; none for GPUs where neither library finds one."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            found.append(gpu())
            break
        except Exception:  # no library, no driver, no device: no GPU metrics
            continue
    return found


class TrialSystemMetrics:
    """Samples MLflow's system metrics every `tracking.interval_s` in a background thread and logs them into the
    trial's child run (see the module docstring). `node_id` (e.g. `rank1`) goes into the names:
    `system/rank1/cpu_utilization_percentage`, as MLflow's `node_id` does."""

    def __init__(self, tracking: TrialTracking | None, *, trial_id: str, node_id: str | None = None) -> None:
        self.tracking, self.trial_id = tracking, trial_id
        self.prefix = "system/" + (f"{node_id}/" if node_id else "")
        self.pending: list[tuple[int, dict[str, float]]] = []  # (ms, {name: value}) sampled, not yet logged
        self.logged = 0  # samples logged
        self.run_id: str | None = None
        self._step: int | None = None
        self._reported = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_s = 0.0  # CPU time the sampling thread spent (measured by the thread itself)

    @property
    def enabled(self) -> bool:
        return self.tracking is not None and self.tracking.interval_s > 0

    def __enter__(self) -> TrialSystemMetrics:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        for key, value in FAIL_FAST_HTTP.items():
            os.environ.setdefault(key, value)
        self._thread = threading.Thread(target=self._loop, name=f"system-metrics-{self.trial_id}", daemon=True)
        self._thread.start()

    def reported(self) -> None:
        """The trial reported an epoch: the launcher makes its run on the first one, so from now on it is looked for."""
        self._reported.set()

    def stop(self) -> None:
        """Take a last sample, log what is pending, stop (waits at most STOP_WAIT_S: never holds a trial up)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_S)
        self._thread = None

    # ---- the sampling thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        cpu0 = time.thread_time()
        try:
            import psutil

            monitors = _monitors()
            psutil.cpu_percent()  # psutil's first reading is 0.0: each sample is then the mean since the last
        except Exception as e:
            self._warn(e)
            return
        while True:
            stopping = self._stop.wait(self.tracking.interval_s)
            try:
                self._sample(monitors)
                if self._reported.is_set() or stopping:
                    self._publish()
            except Exception as e:  # a store away, a sample that failed: training goes on
                self._warn(e)
            self.cpu_s = time.thread_time() - cpu0
            if stopping:
                return

    def _sample(self, monitors: list[Any]) -> None:
        values: dict[str, float] = {}
        for m in monitors:
            try:
                m.collect_metrics()
                values.update({self.prefix + k: float(v) for k, v in m.aggregate_metrics().items()})
            finally:
                m.clear_metrics()
        self.pending.append((int(time.time() * 1000), values))
        del self.pending[:-MAX_PENDING]

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking.uri)

    def _find_run(self, client) -> str | None:
        exp = client.get_experiment_by_name(self.tracking.experiment)
        if exp is None:
            return None
        where = (f"tags.`bvit.sweep` = '{self.tracking.sweep}' and tags.`bvit.trial_id` = '{self.trial_id}'"
                 " and tags.`bvit.role` = 'trial'")
        runs = client.search_runs([exp.experiment_id], filter_string=where, max_results=1,
                                  order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def _publish(self) -> None:
        from mlflow.entities import Metric

        if not self.pending:
            return
        client = self._client()
        if self.run_id is None:
            self.run_id = self._find_run(client)
            if self.run_id is None:
                return  # not made yet: the samples wait for the next try
        if self._step is None:  # a retried or resumed trial continues its run's system steps
            steps = [m.step for m in client.get_metric_history(self.run_id, self.prefix + CPU)]
            self._step = max(steps) + 1 if steps else 0
        metrics = [Metric(k, v, ms, self._step + i) for i, (ms, values) in enumerate(self.pending)
                   for k, v in values.items()]
        for i in range(0, len(metrics), MAX_PER_BATCH):
            client.log_batch(self.run_id, metrics=metrics[i:i + MAX_PER_BATCH])
        self._step += len(self.pending)
        self.logged += len(self.pending)
        self.pending.clear()

    def _warn(self, e: Exception) -> None:
        if self.tracking.uri in _WARNED:
            return
        _WARNED.add(self.tracking.uri)
        warnings.warn(f"system metrics of trial {self.trial_id} not logged to MLflow at {self.tracking.uri} "
                      f"({type(e).__name__}: {e}); training goes on", stacklevel=1)
