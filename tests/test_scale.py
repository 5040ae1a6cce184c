"""What the launcher does per trial event stays per trial as sweeps grow: counted, never timed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.envelope import TRIAL_KEY, TrialEnvelope
from orchestrator.spec import SweepSpec, expand_trials


def _trials(n: int) -> list[SimpleNamespace]:
    """n Tune-like trials of a one-axis grid (optim.lr), each with its envelope in `config` and a status."""
    spec = SweepSpec.model_validate({"name": "big", "axes": {"optim.lr": [1e-3 * (1 + i / n) for i in range(n)]}})
    return [SimpleNamespace(status="PENDING", config={TRIAL_KEY: TrialEnvelope(
        trial_id=t.id, config=t.config, resolved=t.config, resources=spec.resources, max_failures=0,
        sweep_dir="runs/big").to_tune()}) for t in expand_trials(spec)]


@pytest.mark.parametrize("n, most_rows", [(10, 10 * (10 + 1)), (1000, 2 * 1000)])
def test_the_live_table_renders_rows_in_proportion_to_the_trials(monkeypatch, n, most_rows):
    """Small sweeps: the whole table at the first result and at each trial's end (n (n + 1) rows, n <= FULL_TABLE). Large ones: the
    running trials now and then -- before, a 1,000-trial sweep rendered 1,000 rows at each of 1,000 ends."""
    import orchestrator.callbacks as progress

    rendered = []
    monkeypatch.setattr(progress, "render_table", lambda rows, **kw: rendered.append(len(rows)) or "")
    table = progress.ProgressTable(total=n)
    trials = _trials(n)
    for i, trial in enumerate(trials):  # two at a time: start, one result, end
        trial.status = "RUNNING"
        if i + 1 < n:
            trials[i + 1].status = "RUNNING"
        table.on_trial_result(0, trials, trial, {"epoch": 1, "test_top1": 50.0})
        trial.status = "TERMINATED"
        table.on_trial_complete(0, trials, trial)
    assert rendered and sum(rendered) <= most_rows
    if n <= progress.FULL_TABLE:
        assert rendered[-1] == n  # the last table lists every trial


def test_status_tables_import_no_ray_and_old_sweeps_still_find_the_progress_callback():
    """`bvit-sweep status` paid Ray Tune's import (~3 s) for a table; Ray-free now. A sweep launched before the
    live table's callback moved pickled it as orchestrator.progress.ProgressTable: its resume still unpickles."""
    import pickle
    import subprocess
    import sys

    from orchestrator.callbacks import ProgressTable

    code = ("import sys; import orchestrator.tables, orchestrator.sweep_dir, orchestrator.cli.sweep; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert pickle.loads(b"corchestrator.progress\nProgressTable\n.") is ProgressTable


def test_mlflow_finds_a_sweeps_runs_with_one_search_not_one_per_trial(tmp_path, monkeypatch):
    """Back-filling N trials searched the store once per trial (each search reading the whole experiment):
    N^2. The tracker now reads the sweep's runs once, page by page, and finds each trial's run in that index
    -- the same run as before, the oldest of the trial."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = _trials(30)
    envs = [TrialEnvelope.of(t.config) for t in trials]
    first = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    made = {e.trial_id: first.child_run_id(e.trial_id, e.resolved) for e in envs}
    first.finish(envs[0].trial_id, envs[0].resolved, "TERMINATED", end_ms=1_000)

    searches = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda self, *a, **kw: searches.append(kw) or real(self, *a, **kw))
    monkeypatch.setattr(tracking, "SEARCH_PAGE", 7)  # several pages
    again = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    assert {e.trial_id: again.child_run_id(e.trial_id, e.resolved) for e in envs} == made
    again.finish(envs[0].trial_id, envs[0].resolved, "TERMINATED", end_ms=1_000)  # already so: unchanged
    assert len(searches) == -(-31 // 7)  # 30 children and the parent, 7 a page: one pass
    assert again.client.get_run(made[envs[0].trial_id]).info.end_time == 1_000



def test_tunes_grid_copies_the_param_space_without_the_grid_once_per_trial():
    """Ray Tune's grid deep-copies the unresolved param space -- every trial's envelope -- once per trial it makes:
    N^2 copies, minutes at 2,000 trials before the first started (found by the simulated-cluster test). Patched
    (`patches.grid_without_copying_the_grid`): the grid, which each copy overwrites anyway, is not copied. Counted
    in objects deep-copied: ~ the spec's skeleton per trial, not the grid."""
    import copy

    from ray.tune.search import variant_generator
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.patches import grid_without_copying_the_grid

    def copied(n: int, patched: bool) -> tuple[int, list]:
        envelopes = [t.config[TRIAL_KEY] for t in _trials(n)]
        space = {TRIAL_KEY: {"grid_search": envelopes}, "other": {"grid_search": [1, 2]}, "fixed": {"a": [1]}}
        total = [0]

        class Counting:  # `copy` as the generator sees it: counts the objects each deep copy made
            def deepcopy(self, x, memo=None):
                memo = {} if memo is None else memo
                before = len(memo)
                out = copy.deepcopy(x, memo)
                total[0] += len(memo) - before
                return out

        real = variant_generator.copy
        variant_generator.copy = Counting()
        try:
            if patched:
                with grid_without_copying_the_grid():
                    variants = [config for _, config in generate_variants(space)]
            else:
                variants = [config for _, config in generate_variants(space)]
        finally:
            variant_generator.copy = real
        return total[0], variants

    plain_small, _ = copied(50, patched=False)
    plain_big, expected = copied(200, patched=False)
    small, _ = copied(50, patched=True)
    big, variants = copied(200, patched=True)
    assert variants == expected  # the same trials, in the same order
    assert len(variants) == 400 and variants[0]["other"] == 1 and variants[1]["other"] == 2
    assert big / small <= 4.5  # linear in the trials (4x the trials)
    assert plain_big / plain_small >= 12  # what Tune alone does: quadratic (16x)


def test_a_new_trial_costs_mlflow_four_calls_and_no_reads(tmp_path, monkeypatch):
    """The launcher's MLflow thread was the biggest part of its CPU per trial at 2,000 trials (SQLite commits):
    a new trial's run was read back (its epochs, its params, its status) and its retries tagged in a call of its
    own. A run this tracker made is known: create it, log its config, log each epoch (with the retries tag), end
    it -- and what it logs is what it logged before."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    envs = [TrialEnvelope.of(t.config) for t in _trials(6)]
    tracker = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    tracker.parent_run_id()
    calls: list[str] = []
    for name in ("create_run", "log_batch", "set_tag", "set_terminated", "get_run", "get_metric_history",
                 "search_runs"):
        real = getattr(MlflowClient, name)
        monkeypatch.setattr(MlflowClient, name, lambda self, *a, _n=name, _r=real, **kw: calls.append(_n) or _r(self, *a, **kw))
    record = {"epoch": 1, "train_loss": 1.5, "test_top1": 50.0, "params": 1234, "flops_per_image": 5678.0,
              "retries": 0, "reported_at": 1_000.0}
    for env in envs:
        tracker.log_epochs(env.trial_id, env.resolved, [record])
        tracker.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=2_000_000)
    calls = [c for c in calls if c != "search_runs"]  # the one read of the sweep's runs (the first trial)
    assert calls == ["create_run", "log_batch", "log_batch", "set_terminated"] * len(envs)
    monkeypatch.undo()
    run = MlflowClient(uri).get_run(tracker.child_run_id(envs[0].trial_id, envs[0].resolved))
    assert run.data.params["params"] == "1234" and run.data.metrics["flops_per_image"] == 5678.0
    assert run.data.tags[tracking.TAG_RETRIES] == "0" and run.info.status == "FINISHED"
    assert run.data.metrics["test_top1"] == 50.0 and run.info.end_time == 2_000_000


def test_the_end_of_a_launch_reads_no_run_history_when_live_logging_never_failed(tmp_path, monkeypatch):
    """The end of a launch back-fills MLflow from Ray's results (`sync_sweep`): at 2,000 trials that read every
    run's history twice and re-tagged every run, minutes. A fresh tracker now knows each run's latest epoch and
    retries from its one read of the sweep's runs: a run whose last epoch is logged costs nothing, unless live
    logging failed in this process (then every history is read, as `bvit-sweep sync` always does)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    envs = [TrialEnvelope.of(t.config) for t in _trials(5)]
    history = [{"epoch": e, "train_loss": 2.0 / e, "test_top1": 40.0 + e, "retries": 0, "reported_at": 1_000.0 + e}
               for e in (1, 2)]
    live = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    for env in envs:
        live.log_epochs(env.trial_id, env.resolved, history)
        live.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=2_000_000)

    def count(trust_last: bool, records=history) -> list[str]:
        calls: list[str] = []
        with monkeypatch.context() as m:
            for name in ("log_batch", "set_tag", "set_terminated", "get_run", "get_metric_history"):
                real = getattr(MlflowClient, name)
                m.setattr(MlflowClient, name, lambda self, *a, _n=name, _r=real, **kw: calls.append(_n) or _r(self, *a, **kw))
            end = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
            for env in envs:
                end.log_epochs(env.trial_id, env.resolved, records, trust_last=trust_last)
                end.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=2_000_000)
        return calls

    assert count(trust_last=True) == []  # nothing to write, nothing read back
    assert count(trust_last=False) == ["get_metric_history"] * 2 * len(envs)  # `bvit-sweep sync`: checks each
    third = [*history, {"epoch": 3, "train_loss": 0.5, "test_top1": 44.0, "retries": 0, "reported_at": 1_003.0}]
    assert count(trust_last=True, records=third) == ["get_metric_history", "get_metric_history", "log_batch"] * len(envs)


def test_describing_the_children_at_the_end_is_one_write_per_run_and_none_when_unchanged(tmp_path, monkeypatch):
    """Each child's name, source tags, description and final top-1 were written a tag at a time: ~9 SQLite
    commits per trial at the end of every launch (minutes at 2,000 trials). Now one `log_batch` per run that
    changed, none for a run already so, and the sweep's runs read once -- and the run reads as before."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    envs = [TrialEnvelope.of(t.config) for t in _trials(4)]
    tracker = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    for env in envs:
        tracker.log_epochs(env.trial_id, env.resolved, [{"epoch": 1, "train_loss": 1.0, "test_top1": 50.0}])
        tracker.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=2_000_000)
    table = [{"trial_id": e.trial_id, "status": "TERMINATED", "final_test_top1": 50.0 + i, "epochs": 1, "seed": 0}
             for i, e in enumerate(envs)]
    configs = {e.trial_id: e.resolved for e in envs}

    def calls_to_describe() -> list[str]:
        calls: list[str] = []
        with monkeypatch.context() as m:
            for name in ("log_batch", "set_tag", "search_runs", "get_run"):
                real = getattr(MlflowClient, name)
                m.setattr(MlflowClient, name, lambda self, *a, _n=name, _r=real, **kw: calls.append(_n) or _r(self, *a, **kw))
            publishing = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")  # as publish_sweep makes one
            tracking._describe_children(publishing, table, configs, sha="abc123", command="bvit-sweep launch s.yaml",
                                        sweep_dir=None)
            publishing.finish_parent(ok=True)
        return [c for c in calls if c != "get_run"]  # the parent's own info, read once to end it

    assert calls_to_describe() == ["search_runs", *["log_batch"] * len(envs)]
    assert calls_to_describe() == ["search_runs"]  # published again (frontier, sync, --resume): nothing written
    run = MlflowClient(uri).get_run(tracker.child_run_id(envs[3].trial_id, envs[3].resolved))
    assert run.data.tags["mlflow.source.git.commit"] == "abc123" and run.data.tags["mlflow.source.name"].endswith("s.yaml")
    assert run.info.run_name == "seed 0 · top-1 53.0 %"  # through log_batch too
    assert run.data.metrics[tracking.FINAL_METRIC] == 53.0 and "finished after 1 epochs" in run.data.tags[tracking.TAG_NOTE]
    parent = MlflowClient(uri).get_run(tracker.parent_run_id())
    assert parent.info.status == "FINISHED" and parent.info.end_time == 2_000_000  # its last trial's end


def test_a_trial_described_as_it_finishes_leaves_the_end_of_the_launch_nothing_to_write(tmp_path, monkeypatch):
    """The launcher's MLflow thread describes each finished trial's run from its row of the trial table (the
    same `trial_row` the end of the launch reads): the end's check then writes nothing, whatever the sweep's size."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.cells import design_of
    from orchestrator.records import read_records, trial_row
    from orchestrator.results import collect_trials
    from orchestrator.spec import Convergence

    sweep = _finished_sweep(tmp_path, 6, {})
    spec = SweepSpec.model_validate({"name": "big", "axes": {"optim.lr": [1e-3 * (1 + i / 6) for i in range(6)]}})
    design = design_of(spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = tracking.SweepTracker(uri=uri, experiment="big", sweep="big", design=design, sweep_dir=sweep)
    for record in read_records(sweep):  # as MlflowProgressCallback's thread does at each trial's end
        cfg = record.envelope.resolved
        live.log_epochs(record.trial_id, cfg, [record.last_result])
        live.finish(record.trial_id, cfg, "TERMINATED", end_ms=2_000_000)
        row = trial_row(sweep, record, axis_cols=dict(design.names()), convergence=Convergence())[0]
        live.describe(record.trial_id, cfg, row, sha="abc123", command="bvit-sweep launch s.yaml", end_ms=2_000_000)

    table = collect_trials(sweep, trials=expand_trials(spec))
    writes: list[str] = []
    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **kw: writes.append("log_batch") or real(self, *a, **kw))
    end = tracking.SweepTracker(uri=uri, experiment="big", sweep="big", design=design, sweep_dir=sweep)
    tracking._describe_children(end, table, {r.trial_id: r.envelope.resolved for r in read_records(sweep)},
                                sha="abc123", command="bvit-sweep launch s.yaml", sweep_dir=sweep)
    assert writes == []
    run = end.trial_runs()[table[0]["trial_id"]]
    assert run.info.run_name == f"lr {table[0]['lr']} · seed 0 · top-1 52.0 %"


def _finished_sweep(root, n: int, unfinished: dict[int, str]):
    """A sweep directory as a launch leaves it (snapshot, Tune's state file, the project's records, result.json
    lines), without Ray: trials of `_trials(n)`, TERMINATED but for {index: status} in `unfinished`."""
    import json

    from orchestrator.records import record_trial
    from orchestrator.resume import snapshot, write_snapshot

    spec = SweepSpec.model_validate({"name": "big", "axes": {"optim.lr": [1e-3 * (1 + i / n) for i in range(n)]}})
    sweep = root / "runs" / "big"
    sweep.mkdir(parents=True)
    write_snapshot(sweep, snapshot(spec, False, expand_trials(spec)))
    (sweep / "tuner.pkl").write_bytes(b"")
    (sweep / "experiment_state-2026-12-07_00-00-00.json").write_text("{}")
    for i, trial in enumerate(_trials(n)):
        trial.status, trial.num_failures, trial.error_file = unfinished.get(i, "TERMINATED"), 0, None
        tid = TrialEnvelope.of(trial.config).trial_id
        history = [{"epoch": 1, "train_loss": 2.0, "test_top1": float("nan")},
                   {"epoch": 2, "train_loss": 1.5, "test_top1": 50.0 + i / n},
                   {"epoch": 3, "train_loss": 1.2, "test_top1": 52.0 + i / n},
                   {"epoch": 4, "train_loss": 1.1, "test_top1": 52.0 + i / n}]  # a tie: the first is the best epoch
        (sweep / tid).mkdir()
        (sweep / tid / "result.json").write_text("".join(json.dumps({**r, "trial_id": tid}) + "\n" for r in history))
        trial.last_result = {**history[-1], "node_ip": "127.0.0.1"}
        record_trial(sweep, trial)
    return sweep


def test_status_of_a_large_sweep_shows_its_unfinished_trials_and_imports_neither_ray_nor_pandas(tmp_path):
    """`status` on 1,000 trials took 4.7 s at 400 (a pandas DataFrame per trial, pandas' import, a rich row per
    trial). Records are read as plain data now, and the table keeps 200 rows: every unfinished trial, then the
    first finished ones, and says how many it left out; `--all` lists every trial."""
    import json
    import os
    import subprocess
    import sys

    n, unfinished = 250, {120: "ERROR", 230: "RUNNING", 249: "PENDING"}
    sweep = _finished_sweep(tmp_path, n, unfinished)
    ids = [TrialEnvelope.of(t.config).trial_id for t in _trials(n)]
    code = ("import sys\nfrom orchestrator.cli import app\nsys.argv = ['bvit-sweep', *sys.argv[1:]]\n"
            "try:\n    app()\nfinally:\n"
            "    print('imported:', sorted(m for m in ('pandas', 'ray') if m in sys.modules), file=sys.stderr)\n")

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, "status", str(sweep), *args], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "200"}, cwd=tmp_path)

    shown = status()
    assert shown.returncode == 0, shown.stderr
    assert "imported: []" in shown.stderr
    rows = [line for line in shown.stdout.splitlines() if any(i in line for i in ids)]
    assert len(rows) == 200 and all(ids[i] in shown.stdout for i in unfinished)
    assert [r.split()[1] for r in rows[:3]] == ids[:3]  # in the spec's order
    assert "and 50 more finished trials" in shown.stdout and "bvit-sweep status --all" in shown.stdout
    every = status("--all")
    assert sum(any(i in line for i in ids) for line in every.stdout.splitlines()) == n
    doc = json.loads(status("--json").stdout)
    assert len(doc["trials"]) == n
    last = doc["trials"][-1]
    assert (last["best_test_top1"], last["best_epoch"], last["status"]) == (52.0 + (n - 1) / n, 3, "PENDING")


def test_the_end_of_a_launch_rereads_neither_tunes_histories_nor_ends_a_finished_run_again(tmp_path, monkeypatch):
    """Three costs of the end of a 1,000-trial launch, measured there: fit's ResultGrid loaded every trial's history
    with pandas (13 s), the launcher read Tune's final state back the same way to rewrite records its callback had
    just written (14 s), and the back-fill ended every run again because its end time differed by a few ms from the
    live one (15 s of SQLite writes)."""
    import inspect

    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.analysis import experiment_analysis as ea

    from orchestrator import patches, resume, tracking

    # 1. Tune 2.60 builds fit's result through _fetch_trial_dataframes; under the patch no trial's files are read.
    assert "self._fetch_trial_dataframes()" in inspect.getsource(ea.ExperimentAnalysis.__init__)
    original = ea.ExperimentAnalysis._fetch_trial_dataframes
    with patches.result_grid_without_histories():
        frames = ea.ExperimentAnalysis._fetch_trial_dataframes(SimpleNamespace(trials=[SimpleNamespace(trial_id="a")]))
        assert list(frames) == ["a"] and frames["a"].empty
    assert ea.ExperimentAnalysis._fetch_trial_dataframes is original

    # 2. Records the callback wrote at the experiment's end are not rewritten from Tune's state; it is still signed.
    sweep = _finished_sweep(tmp_path, 3, {})
    signed = []
    monkeypatch.setattr(resume, "sign_state", signed.append)
    monkeypatch.setattr(tune, "ExperimentAnalysis", lambda *a, **kw: pytest.fail("Tune's state read back"))
    resume.record_final_state(sweep, records_written=True)
    assert signed == [sweep]

    # 3. A finished trial's run keeps the end it was given first; a status that changed is written.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = TrialEnvelope.of(_trials(1)[0].config)
    live = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    live.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=1_000_000)
    live.finish_parent(ok=True)
    ended = []
    real = MlflowClient.set_terminated
    monkeypatch.setattr(MlflowClient, "set_terminated", lambda self, rid, *a, **kw: ended.append(rid) or real(self, rid, *a, **kw))
    back_fill = tracking.SweepTracker(uri=uri, experiment="big", sweep="big")
    back_fill.finish(env.trial_id, env.resolved, "TERMINATED", end_ms=1_000_007)  # Ray's records: 7 ms later
    assert ended == []
    back_fill.finish(env.trial_id, env.resolved, "ERROR", end_ms=1_000_007)  # a status that changed is written
    assert ended == [back_fill.child_run_id(env.trial_id, env.resolved)]
