"""A trial's system metrics (orchestrator.system_metrics) against a real MLflow store: they land in the run the
launcher made for the trial, found by its tags, and leave that run's status and times alone; a store that
cannot be reached costs one warning, never the trial. The launch end to end: tests/test_dashboard.py."""
import socket
import time
import warnings

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.system_metrics import CPU_METRIC, TrialSystemMetrics, TrialTracking

MEMORY = "system/system_memory_usage_megabytes"


@pytest.fixture
def store(tmp_path):
    """A SQLite store with the launcher's run of trial `t1` (sweep `s`), ended as the launcher ends it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s")
    client.create_run(exp, tags={"bvit.sweep": "s", "bvit.role": "parent"})
    run = client.create_run(exp, start_time=1_000, tags={"bvit.sweep": "s", "bvit.trial_id": "t1",
                                                        "bvit.role": "trial"})
    client.set_terminated(run.info.run_id, "FAILED", end_time=2_000)  # e.g. a crashed trial, then resumed
    return uri, client, run.info.run_id


def _train(tracking, seconds: float, report_after: float = 0.0) -> TrialSystemMetrics:
    with TrialSystemMetrics(tracking, trial_id="t1") as system:
        time.sleep(report_after)
        system.reported()
        time.sleep(seconds - report_after)
    return system


def test_samples_land_in_the_trial_s_run_from_its_start_and_leave_its_status_and_times_alone(store):
    uri, client, run_id = store
    tracking = TrialTracking(uri=uri, experiment="s", sweep="s", interval_s=0.1)
    started = time.time() * 1000
    first = _train(tracking, 1.0, report_after=0.5)  # the run is looked for only after the first report
    history = client.get_metric_history(run_id, CPU_METRIC)
    assert first.logged == len(history) >= 5 and not first.pending
    assert [m.step for m in history] == list(range(len(history)))
    assert min(m.timestamp for m in history) < started + 500  # the samples before the first report are kept
    assert all(m.value > 0 for m in client.get_metric_history(run_id, MEMORY))
    again = _train(tracking, 0.3)  # a resumed trial continues its run's steps
    steps = [m.step for m in client.get_metric_history(run_id, CPU_METRIC)]
    assert steps == list(range(len(history) + again.logged))
    info = client.get_run(run_id).info
    assert (info.status, info.start_time, info.end_time) == ("FAILED", 1_000, 2_000)  # the launcher's to set
    assert len(client.search_runs([client.get_experiment_by_name("s").experiment_id])) == 2  # no run of its own
    assert first.cpu_s < 0.2 * 1.0, first.cpu_s  # a sample every 0.1 s; at 10 s (the default) it is 100x less


def test_an_unreachable_store_costs_one_warning_and_never_the_trial():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    tracking = TrialTracking(uri=f"http://127.0.0.1:{port}", experiment="s", sweep="s", interval_s=0.05)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        system = _train(tracking, 0.5)
        _train(tracking, 0.2)  # the next trial in the same process: no second warning
    assert time.monotonic() - t0 < 20
    assert system.logged == 0 and system.pending  # kept for a later try
    ours = [w for w in seen if "system metrics of trial t1" in str(w.message)]
    assert len(ours) == 1 and "training goes on" in str(ours[0].message)


def test_off_when_the_interval_is_zero_or_there_is_no_store():
    for tracking in (None, TrialTracking(uri="sqlite:///nowhere.db", experiment="s", sweep="s", interval_s=0)):
        with TrialSystemMetrics(tracking, trial_id="t1") as system:
            system.reported()
        assert system._thread is None and not system.pending
