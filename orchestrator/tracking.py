"""MLflow tracking: one parent run per sweep, one nested child run per trial, matched by trial id.

Ray Tune's results are the source of truth. During a sweep a Tune callback logs each epoch from a
background thread (an unreachable tracking server costs a warning, never the sweep); afterwards, and
on `bvit-sweep sync`, every epoch Ray recorded that MLflow lacks is back-filled. Logging is
idempotent: an epoch is one `log_batch` (all of its metrics at step=epoch), and an epoch already
present is never logged again, so a retried or resumed trial continues its own child run.

What a researcher sees in MLflow's UI (3.17) is set up here too, idempotently:
  * the experiment carries a saved view (`mlflow.sharedViewState.bvit-sweep`, MLflow's "saved views"
    envelope; its state is orchestrator.mlflow_view's): the runs table with the sweep's factors
    (orchestrator.cells), seed and final test top-1 as columns, the parent pinned first, then the trials
    best first by `final_test_top1` (ordering by anything but start time also makes MLflow list the
    children flat), and the chart view's "Sweep" charts.
    `bvit-sweep ui` makes it the browser's default. A second saved view, `bvit-sweep-cells`, groups the
    trials by cell with their seeds averaged (its URL: `?viewStateShareKey=bvit-sweep-cells`);
  * run names carry the trial's value of every factor, its seed and, once known, the final test top-1;
  * a run's step is its epoch (no `epoch` metric); values are logged to 5 significant digits; a trial's
    restarts are the tag `bvit.retries`;
  * times are the trials' own: a child starts when its trial first started and ends at its last report
    (Ray's records, so `--resume`, `frontier` and `sync` leave them as they are); the parent starts with the
    sweep's first launch and ends with its last trial;
  * `publish_sweep` gives the parent run its description (the frontier table, the plots inline),
    the spec, run.json, the command and git SHA; and every child its git SHA and command as MLflow's source
    tags, a short description (cell, seed, outcome), its checkpoint's location (`bvit.checkpoint`), its
    `final_test_top1` and a colour per compared arm -- written by the launcher's MLflow thread as each trial
    finishes, checked (one read of the sweep's runs) at the end. Every artifact is written whole, never appended.
"""
from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ray import tune

from bvit.config import TrialConfig
from orchestrator.cells import Design, text
from orchestrator.envelope import FAILED_KEY, TrialEnvelope, trial_status
from orchestrator.errors import UserError
from orchestrator.mlflow_view import FINAL_METRIC, arm_colors, cells_view_state, view_state
from orchestrator.provenance import code_version
from orchestrator.timing import LAUNCHES
from orchestrator.timing import read_records as read_lines

__all__ = ["SweepTracker", "MlflowProgressCallback", "default_tracking_uri", "resolve_tracking", "sync_sweep",
           "publish_sweep", "prepare_experiment", "run_name", "view_state", "VIEW_ID", "CELLS_VIEW_ID"]

TAG_SWEEP, TAG_TRIAL, TAG_ROLE = "bvit.sweep", "bvit.trial_id", "bvit.role"
# A saved view of the runs page: its id goes in the URL as ?viewStateShareKey=<id> (see orchestrator/dashboard.py).
VIEW_TAG_PREFIX, VIEW_ID = "mlflow.sharedViewState.", "bvit-sweep"
CELLS_VIEW_ID = "bvit-sweep-cells"  # the same page grouped by cell, seeds averaged (a second saved view)
TAG_NOTE, TAG_LOGGED = "mlflow.note.content", "mlflow.loggedArtifacts"
TAG_RETRIES, TAG_CHECKPOINT, TAG_COLOR = "bvit.retries", "bvit.checkpoint", "mlflow.runColor"
# Logged at step=epoch, test_top1 first (MLflow's compare page plots the first metric its runs share).
EPOCH_METRICS = ("test_top1", "train_loss", "test_top5", "test_loss", "best_test_top1", "lr", "images_per_s",
                 "epoch_seconds", "merged_test_top1")
STEP_MARKERS = ("train_loss", "epoch")  # whose steps are the epochs already logged (`epoch`: older stores)
DIGITS = 5  # significant digits of a logged value
SEARCH_PAGE = 1000  # runs per search request (MLflow's REST API takes up to 50,000; a page stays small)


def rounded(value: Any) -> float:
    """A metric value as logged: 5 significant digits (NaN stays NaN: a diverged loss shows as such)."""
    value = float(value)
    return value if value != value else float(f"{value:.{DIGITS}g}")


def trial_times(history: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(start, end) of a trial in ms since the epoch, from Ray's records of it: when its first process started,
    when it reported last. None where the records do not say."""
    starts = [float(r["trial_started_at"]) for r in history if r.get("trial_started_at")]
    ends = [float(r.get("reported_at") or r.get("timestamp") or 0) for r in history]
    ends = [e for e in ends if e > 0]
    if not starts and history and ends:  # a record from before `trial_started_at`: its first report's start
        first = history[0]
        starts = [float(first.get("reported_at") or first.get("timestamp")) - float(first.get("time_this_iter_s") or 0)]
    ms = lambda t: int(round(t * 1000))  # noqa: E731
    return (ms(min(starts)) if starts else None), (ms(max(ends)) if ends else None)


def sweep_start_ms(sweep_dir: Path | None) -> int | None:
    """When the sweep was first launched (its launches.jsonl's first line), in ms; None without one."""
    path = Path(sweep_dir) / LAUNCHES if sweep_dir is not None else None
    if path is None or not path.is_file():
        return None
    starts = [float(r["started_at"]) for r in read_lines(path) if r.get("started_at")]
    return int(round(min(starts) * 1000)) if starts else None

# Fail fast when the server is away: the sweep must not stall on HTTP retries (a user's own settings win).
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def default_tracking_uri(results_dir: Path) -> str:
    """The embedded store: SQLite in results/<sweep>/mlflow/ (artifacts beside it)."""
    d = (results_dir / "mlflow").resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def store_uri(value: str) -> str:
    """A tracking URI as given, or one a person would type instead: a results/<sweep>/mlflow directory or its
    mlflow.db file becomes its SQLite URI. Any other plain path is refused (MLflow would take it for its
    retired file store and fail deep inside), naming what to give instead."""
    if "://" in value or value.startswith(("sqlite:", "file:", "databricks")):
        return value
    path = Path(value)
    db = path / "mlflow.db" if path.is_dir() else path
    if db.is_file() and db.suffix == ".db":
        return f"sqlite:///{db.resolve()}"
    raise UserError(f"--tracking-uri {value}: not an MLflow store; give a server (http://127.0.0.1:5000), "
                    "a SQLite URI (sqlite:///results/<sweep>/mlflow/mlflow.db) or a results/<sweep>/mlflow "
                    "directory that holds mlflow.db")


def resolve_tracking(spec, results_dir: Path, override: str | None = None) -> tuple[str, str]:
    """(tracking URI, experiment name): --tracking-uri, else MLFLOW_TRACKING_URI, else the spec, else local."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    uri = store_uri(uri) if uri else default_tracking_uri(results_dir)
    return uri, spec.tracking.experiment or spec.name


def run_name(cfg: TrialConfig, top1: float | None = None, design: Design | None = None) -> str:
    """`arch bvit · width 32 · steps 4 · seed 0 · top-1 61.2 %`: the trial's value of every factor the sweep
    varies (`design`, orchestrator.cells; the compared one first), its seed and, once known, its top-1."""
    flat = cfg.flat()
    parts = [f"{col} {text(flat.get(path))}" for path, col in (design.names() if design else [])]
    parts.append(f"seed {cfg.seed}")
    if top1 is not None and top1 == top1:
        parts.append(f"top-1 {top1:.1f} %")
    return " · ".join(parts)


def prepare_experiment(uri: str, experiment: str | None) -> str | None:
    """The id of the experiment `bvit-sweep ui` opens, with the saved view set up; with no name, the
    store's only experiment besides MLflow's Default. None when there is none to open."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment is None:
        found = [e for e in client.search_experiments() if e.name != "Default"]
        if len(found) != 1:
            return None
        experiment = found[0].name
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    SweepTracker(uri=uri, experiment=experiment, sweep=experiment)  # saves the view when missing
    return exp.experiment_id


class SweepTracker:
    """Parent/child runs of one sweep in one MLflow experiment."""

    def __init__(self, *, uri: str, experiment: str, sweep: str, artifact_root: Path | None = None,
                 design: Design | None = None, sweep_dir: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.design = design  # the spec's factors: child run names and the saved view's columns
        self.sweep_dir = sweep_dir  # Ray's sweep directory, when known: the parent's start time
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
        self._runs: dict[str, str] = {}  # trial id (or "__parent__") -> run id
        self._info: dict[str, Any] = {}  # run id -> its RunInfo as last read (status, end time)
        self._indexed = False
        self._epochs: dict[str, set[int]] = {}
        self._retries: dict[str, int] = {}
        self._fresh: set[str] = set()  # runs this tracker created that have no epoch logged yet
        self._last_epoch: dict[str, int] = {}  # run id -> its latest logged epoch, as the sweep's index read it
        self._indexed_runs: dict[str, Any] = {}  # trial id -> its run as the sweep's index read it (tags, times)
        self._ended: dict[str, int] = {}  # run id -> the end time this tracker gave it
        if any(VIEW_TAG_PREFIX + v not in (exp.tags if exp is not None else {}) for v in (VIEW_ID, CELLS_VIEW_ID)):
            if exp is not None:
                self._index()  # an older store: its parent, to pin
            self.save_view(self._runs.get("__parent__"))

    def save_view(self, parent_run_id: str | None = None) -> None:
        """The saved views `bvit-sweep` (the parent run pinned, when known) and `bvit-sweep-cells` (grouped by cell,
        seeds averaged): MLflow's "saved views" envelope around the page state, overwritten."""
        created = int(self.client.get_experiment(self.experiment_id).creation_time or 0)
        factors = [col for _, col in (self.design.names() if self.design else [])]
        columns = factors + ["seed", "test top-1"]
        views = {VIEW_ID: (f"sweep: {', '.join(columns)}", view_state(self.design, parent_run_id)),
                 CELLS_VIEW_ID: (f"cells ({', '.join(factors) or 'one'}), seeds averaged", cells_view_state(self.design))}
        for view_id, (name, state) in views.items():
            envelope = {"name": name, "createdAt": created, "updatedAt": created, "state": json.dumps(state)}
            self.client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + view_id, json.dumps(envelope))

    def runs(self, role: str | None = None) -> list[Any]:
        """Every run of this sweep (of one `role`: 'parent' or 'trial'), oldest first, page by page."""
        where = f"tags.`{TAG_SWEEP}` = '{self.sweep}'" + (f" and tags.`{TAG_ROLE}` = '{role}'" if role else "")
        found, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=SEARCH_PAGE,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            found += page
            if not (token := page.token):
                return found

    def _index(self) -> None:
        """The sweep's runs by trial id, read once: a search per trial made a sweep's MLflow work grow as N^2.
        The oldest run of a trial is its run (as a search per trial ordered by start time found it)."""
        if self._indexed:
            return
        self._indexed = True
        for run in self.runs():
            tags = run.data.tags
            key = "__parent__" if tags.get(TAG_ROLE) == "parent" else tags.get(TAG_TRIAL)
            if key is not None and key not in self._runs:
                rid = self._runs[key] = run.info.run_id
                self._info[rid] = run.info
                self._indexed_runs[key] = run
                if (retries := tags.get(TAG_RETRIES)) is not None and retries.isdigit():
                    self._retries[rid] = int(retries)
                steps = [int(m.step) for m in run.data._metric_objs if m.key == STEP_MARKERS[0]]
                if steps:
                    self._last_epoch[rid] = max(steps)  # the latest epoch logged (MLflow keeps the latest value)

    def parent_run_id(self) -> str:
        if "__parent__" not in self._runs:
            self._index()
            rid = self._runs.get("__parent__")
            if rid is None:
                rid = self.client.create_run(self.experiment_id, start_time=sweep_start_ms(self.sweep_dir),
                                             run_name=f"{self.sweep} · sweep", tags={
                                                 TAG_SWEEP: self.sweep, TAG_ROLE: "parent"}).info.run_id
                self.save_view(rid)  # the view pins it
            self._runs["__parent__"] = rid
        return self._runs["__parent__"]

    def child_run_id(self, trial_id: str, cfg: TrialConfig, start_ms: int | None = None) -> str:
        """The trial's run (found by trial id, else created nested under the parent with its params, started at
        `start_ms`: when the trial started)."""
        if trial_id not in self._runs:
            self._index()
            rid = self._runs.get(trial_id)
            if rid is None:
                from mlflow.entities import Param
                run = self.client.create_run(self.experiment_id, run_name=run_name(cfg, design=self.design),
                                             start_time=start_ms, tags={
                    TAG_SWEEP: self.sweep, TAG_TRIAL: trial_id, TAG_ROLE: "trial",
                    "mlflow.parentRunId": self.parent_run_id(),
                })
                rid = run.info.run_id
                params = [Param(k, str(v)) for k, v in cfg.flat().items()]
                for i in range(0, len(params), 100):
                    self.client.log_batch(rid, params=params[i:i + 100])
                # What this process knows of the run it just made, so the trial's first epoch and its end cost
                # no reads: no epoch logged, no `params`/`flops_per_image` yet, status as created.
                self._epochs[rid], self._info[rid] = set(), run.info
                self._fresh.add(rid)
            self._runs[trial_id] = rid
        return self._runs[trial_id]

    def _logged_epochs(self, run_id: str) -> set[int]:
        if run_id not in self._epochs:
            self._epochs[run_id] = {int(m.step) for key in STEP_MARKERS
                                    for m in self.client.get_metric_history(run_id, key)}
        return self._epochs[run_id]

    def log_epochs(self, trial_id: str, cfg: TrialConfig, records: list[dict[str, Any]], *,
                   trust_last: bool = False) -> int:
        """Log every record (one per epoch) not yet in the trial's run; returns how many were logged.

        `trust_last`: a run whose latest logged epoch (from the sweep's index) is the records' last is taken as
        complete, without reading its history (epochs are logged in order; the launch passes it when its live
        logging never failed, `bvit-sweep sync` never)."""
        from mlflow.entities import Metric, Param, RunTag

        rid = self.child_run_id(trial_id, cfg, start_ms=trial_times(records)[0])
        epochs = [int(r["epoch"]) for r in records if not isinstance(r.get(FAILED_KEY), str)]
        if trust_last and epochs and self._last_epoch.get(rid) == max(epochs):
            done = self._epochs.setdefault(rid, set(epochs))
        else:
            done = self._logged_epochs(rid)
        counts = [int(r["retries"]) for r in records if r.get("retries") is not None]
        retries = max(counts) if counts else None
        tags = [RunTag(TAG_RETRIES, str(retries))] if retries is not None and self._retries.get(rid) != retries else []
        logged = 0
        for r in sorted(records, key=lambda r: r["epoch"]):
            if isinstance(r.get(FAILED_KEY), str):  # the failure itself: the run's status, not an epoch
                continue
            epoch = int(r["epoch"])
            if epoch in done:
                continue
            ts = int(round(float(r.get("reported_at") or time.time()) * 1000))
            metrics = [Metric(k, rounded(r[k]), ts, epoch) for k in EPOCH_METRICS
                       if r.get(k) is not None and (r[k] == r[k] or k == "train_loss")]
            params = []
            if not done and r.get("params") is not None:
                if rid in self._fresh:  # made here, nothing logged since: neither is there
                    have_params, have_flops = False, False
                else:
                    run = self.client.get_run(rid)
                    have_params, have_flops = "params" in run.data.params, "flops_per_image" in run.data.metrics
                params = [] if have_params else [Param("params", str(int(r["params"])))]
                if r.get("flops_per_image") is not None and not have_flops:
                    metrics.append(Metric("flops_per_image", float(r["flops_per_image"]), ts, 0))
            self.client.log_batch(rid, metrics=metrics, params=params, tags=tags)  # the retries tag rides along
            self._fresh.discard(rid)
            tags = []
            done.add(epoch)
            logged += 1
        if tags:  # no epoch to log it with
            self.client.set_tag(rid, TAG_RETRIES, str(retries))
        if retries is not None:
            self._retries[rid] = retries
        return logged

    def _terminate(self, run_id: str, status: str, end_ms: int | None, *, keep_end: bool = False) -> None:
        """End a run with `status` at `end_ms`, unless it already ended so (with `keep_end`: ended with that status
        at any time -- a trial's run keeps the end its first writer gave it; the parent's moves with its trials)."""
        info = self._info.pop(run_id, None) or self.client.get_run(run_id).info
        if info.status == status and info.end_time and (keep_end or end_ms is None or info.end_time == end_ms):
            self._info[run_id] = info
            return
        self.client.set_terminated(run_id, status, end_time=end_ms)
        self._ended[run_id] = end_ms or int(time.time() * 1000)

    def finish(self, trial_id: str, cfg: TrialConfig, status: str, end_ms: int | None = None) -> None:
        """End the trial's run (its status from Tune's), at `end_ms`: its last report."""
        rid = self.child_run_id(trial_id, cfg)
        self._terminate(rid, {"TERMINATED": "FINISHED", "ERROR": "FAILED"}.get(status, "KILLED"), end_ms, keep_end=True)

    def trial_runs(self) -> dict[str, Any]:
        """{trial id: its run} as the sweep's index read them (tags, metrics, times: a trial's run is its oldest)."""
        self._index()
        return {key: run for key, run in self._indexed_runs.items() if key != "__parent__"}

    def describe(self, trial_id: str, cfg: TrialConfig, row: dict[str, Any], *, sha: str, command: str,
                 end_ms: int | None = None) -> None:
        """Write what a finished trial's run says of it (`child_description`, from its row of the trial table), in
        one `log_batch`: the end of the launch then finds nothing left to write."""
        want, final = child_description(row, cfg, design=self.design, parent=self.parent_run_id(), sha=sha,
                                        command=command, sweep_dir=self.sweep_dir)
        _write_description(self.client, self.child_run_id(trial_id, cfg), want, final,
                           epochs=int(row.get("epochs") or 0), end_ms=end_ms)

    def finish_parent(self, ok: bool) -> None:
        """End the parent run when its last trial ended: the sweep's wall time is the parent's duration."""
        self._index()  # the trials' runs as read once (and the ends this tracker wrote since)
        ends = [self._ended.get(run.info.run_id) or run.info.end_time
                for key, run in self._indexed_runs.items() if key != "__parent__"]
        ends = [e for e in ends if e]
        self._terminate(self.parent_run_id(), "FINISHED" if ok else "KILLED", max(ends) if ends else None)


class MlflowProgressCallback(tune.Callback):
    """Logs each epoch result to the trial's child run from a background thread; failures only warn (and are
    counted in `failures`, for this process: the end of the launch then checks every run's history)."""

    failures = 0

    def __init__(self, *, uri: str, experiment: str, sweep: str, artifact_root: str | None = None,
                 design: Design | None = None, source: tuple[str, str] | None = None) -> None:
        self.kw = dict(uri=uri, experiment=experiment, sweep=sweep,
                       artifact_root=Path(artifact_root) if artifact_root else None, design=design)
        self.source = source  # (git SHA, command) of the launch: a finished trial's run is described as it ends
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"kw": self.kw, "source": self.source, "_q": None, "_thread": None}

    def _worker(self) -> None:
        tracker, warned = None, False
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                kind, trial_id, cfg, payload = item
                if kind == "setup":  # the store, its tables and the experiment, before a trial's process looks
                    SweepTracker(**self.kw)  # (the sweep directory, hence the parent's start, comes with a trial)
                    continue
                tracker = tracker or SweepTracker(**self.kw)
                if kind == "epoch":
                    tracker.log_epochs(trial_id, cfg, [payload])
                else:
                    status, end, row = payload
                    tracker.finish(trial_id, cfg, status, end)
                    if row is not None and getattr(self, "source", None):
                        tracker.describe(trial_id, cfg, row, sha=self.source[0], command=self.source[1], end_ms=end)
            except Exception as e:  # the server being away must not stop training; `sync` back-fills
                tracker = None
                MlflowProgressCallback.failures += 1
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

    def _sweep_dir(self, trial) -> None:
        """The sweep directory (the trial's parent folder, where it is local): the parent run's start time."""
        if "sweep_dir" not in self.kw:
            try:
                folder = Path(trial.path).parent
            except Exception:  # a trial without a local path (remote storage): no start time from it
                folder = None
            self.kw["sweep_dir"] = folder if folder is not None and folder.is_dir() else None

    def setup(self, **info) -> None:
        """At the experiment's start: the store is made ready (a new SQLite file's tables) by this process, once,
        before any trial's process opens it to log its system metrics (orchestrator.system_metrics)."""
        self._put(("setup", None, None, None))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        env = TrialEnvelope.of(trial.config)
        self._sweep_dir(trial)
        self._put(("epoch", env.trial_id, env.resolved, dict(result)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        env = TrialEnvelope.of(trial.config)
        self._sweep_dir(trial)
        end = trial_times([trial.last_result or {}])[1]
        self._put(("end", env.trial_id, env.resolved, (trial_status(trial), end, self._row(trial))))

    def _row(self, trial) -> dict[str, Any] | None:
        """The finished trial's row of the trial table, as the end of the launch will read it (None: not here)."""
        from orchestrator.records import TrialRecord, record_doc, trial_row
        from orchestrator.spec import Convergence

        sweep_dir, design = self.kw.get("sweep_dir"), self.kw.get("design")
        if sweep_dir is None:
            return None
        try:
            record = TrialRecord(record_doc(trial, "TERMINATED"), Path(sweep_dir))
            cols = dict(design.names()) if design is not None else {}
            return trial_row(Path(sweep_dir), record, axis_cols=cols, convergence=Convergence())[0]
        except Exception:  # a trial the launcher cannot read back: the end of the launch describes it
            return None

    def on_experiment_end(self, trials, **info) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=120)
            self._thread = None


def sync_sweep(sweep_dir: Path, *, uri: str, experiment: str, sweep: str,
               artifact_root: Path | None = None, design: Design | None = None,
               trust_last: bool = False, tracker: SweepTracker | None = None) -> dict[str, int]:
    """Back-fill MLflow from Ray's results: every trial's every epoch, and run status. Idempotent. Reads the
    sweep's JSON records and result.json lines only (`orchestrator.records`), never Tune's pickled state.
    `trust_last`: see `SweepTracker.log_epochs` (a run whose last epoch is logged is not read back). `tracker`:
    one to reuse (the end of a launch passes the same to `publish_sweep`: the sweep's runs are read once)."""
    from orchestrator.records import read_history, read_records

    records = read_records(sweep_dir)
    tracker = tracker or SweepTracker(uri=uri, experiment=experiment, sweep=sweep, artifact_root=artifact_root,
                                      design=design, sweep_dir=sweep_dir)
    tracker.parent_run_id()
    logged = trials = 0
    for trial in records:
        env = trial.envelope
        history = read_history(sweep_dir, env.trial_id)
        logged += tracker.log_epochs(env.trial_id, env.resolved, history, trust_last=trust_last)
        if (status := trial_status(trial)) in ("TERMINATED", "ERROR"):
            tracker.finish(env.trial_id, env.resolved, status, trial_times(history or [trial.last_result])[1])
        trials += 1
    return {"trials": trials, "epochs_logged": logged}


# ---- the parent run as the sweep's front page ------------------------------------------------------------
_CELL_COLUMNS = [  # (measured column of the frontier/transfer table, header, format); the factors' columns go first
    ("params", "params", "{:,.0f}"), ("trainable_params", "trained params", "{:,.0f}"),
    ("seeds", "seeds", "{}"), ("still_improving", "still improving", "{:.0f}"), ("top1_mean", "test top-1 (%)", "{:.2f}"), ("top1_std", "± std", "{:.2f}"),
    ("merged_top1_mean", "merged top-1 (%)", "{:.2f}"), ("on_frontier", "on frontier", "{}"),
    ("baseline", "compared with", "{}"), ("recovered_fraction", "recovered (arm/baseline)", "{:.3f}"),
    ("gap_points", "gap (points)", "{:.2f}"),
    ("gap_ci_low", "gap CI low", "{:.2f}"), ("gap_ci_high", "gap CI high", "{:.2f}"),
    ("welch_p_holm", "Holm p", "{:.3g}"), ("verdict", "verdict", "{}"),
]


def _markdown_table(cells, design: Design | None = None) -> str:
    factors = [(col, col, "{}") for _, col in (design.names() if design else []) if col in cells.columns]
    cols = factors + [c for c in _CELL_COLUMNS if c[0] in cells.columns]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in cells.iterrows():
        out = []
        for key, _, fmt in cols:
            v = row[key]
            blank = v is None or (isinstance(v, float) and v != v)
            out.append("" if blank else ("yes" if v is True else "" if v is False else
                                         text(v) if fmt == "{}" else fmt.format(v)))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def describe_parent(*, sweep: str, table: list[dict[str, Any]], cells, plots: list[str], experiment_id: str,
                    run_id: str, command: str, sha: str, headline: str = "", design: Design | None = None) -> str:
    """The parent run's description (markdown, rendered by MLflow's run page): the answer first."""
    done = [r for r in table if r["status"] == "TERMINATED" and r.get("final_test_top1") is not None]
    lines = [f"**{sweep}**: {len(table)} trials, {len(done)} finished."]
    if done:
        best = max(done, key=lambda r: r["final_test_top1"])
        what = ", ".join(f"{col} {text(best.get(col))}" for _, col in (design.names() if design else []))
        lines[0] += (f" Best final test top-1 **{best['final_test_top1']:.2f} %**: {what + ', ' if what else ''}"
                     f"seed {best['seed']} (trial `{best['trial_id']}`).")
    lines += ["", f"Command: `{command}` · code: `{sha}`", ""]
    if headline:
        lines += ["95 % intervals over seeds (an interval that includes 0 is inconclusive):", "",
                  *(f"- {line}" for line in headline.splitlines()), ""]
    if cells is not None:
        lines += ["Per cell and arm, seeds averaged (final test top-1):", "", _markdown_table(cells, design), ""]
    for name in plots:
        path = f"frontier/{name}"
        lines += [f"![{name}](get-artifact?path=frontier%2F{name}&run_uuid={run_id})",
                  f"[{name}](#/experiments/{experiment_id}/runs/{run_id}/artifactPath/{path})", ""]
    named = " · ".join([col for _, col in (design.names() if design else [])] + ["seed", "top-1"])
    lines.append(f"Children: one run per trial (name: {named}); the experiment's "
                 "saved view `bvit-sweep` lists them with these columns, best first; "
                 f"[by cell, seeds averaged](#/experiments/{experiment_id}/runs?viewStateShareKey={CELLS_VIEW_ID}).")
    return "\n".join(lines)


def _write_table(client, run_id: str, cells, artifact_file: str) -> None:
    """`log_table`'s format and run tag, but the file is replaced, never appended to (log_table appends)."""
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        cells.to_json(Path(tmp) / name, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(Path(tmp) / name), artifact_path=folder or None)
    logged = json.loads(client.get_run(run_id).data.tags.get(TAG_LOGGED, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, TAG_LOGGED, json.dumps(logged + [entry]))


def describe_child(row: dict[str, Any], design: Design | None, checkpoint: Path | None, parent_id: str) -> str:
    """A child run's description: its cell and seed, how it ended, where its checkpoint is."""
    what = " · ".join(f"{col} {text(row.get(col))}" for _, col in (design.names() if design else [])) or "the trial"
    outcome = {"TERMINATED": "finished", "ERROR": "failed"}.get(row["status"], row["status"].lower())
    line = f"**{what}**, seed {row.get('seed')}: {outcome} after {row.get('epochs') or 0} epochs"
    if row.get("final_test_top1") is not None:
        best = row.get("best_test_top1") or row["final_test_top1"]
        line += f", final test top-1 **{row['final_test_top1']:.2f} %** (best {best:.2f} %)"
    if row.get("retries"):
        line += f"; restarted {row['retries']}x"
    if row.get("error"):
        line += f"; error: {str(row['error']).splitlines()[0][:200]}"
    lines = [line + ".", "", f"Trial `{row['trial_id']}` of the sweep run `{parent_id}`."]
    if checkpoint is not None:
        lines.append(f"Checkpoint (last epoch, Ray's storage): `{checkpoint}`")
    return "\n".join(lines)


def _last_checkpoint(sweep_dir: Path | None, trial_id: str) -> Path | None:
    ckpts = sorted((Path(sweep_dir) / trial_id).glob("checkpoint_*/checkpoint.pt")) if sweep_dir else []
    return ckpts[-1].resolve() if ckpts else None


def child_description(row: dict[str, Any], cfg: TrialConfig, *, design: Design | None, parent: str, sha: str,
                      command: str, sweep_dir: Path | None) -> tuple[dict[str, str], float | None]:
    """What a finished trial's run says of it, from its row of the trial table (`results.trial_row`): its tags
    (its name with its final top-1, the git SHA and command as MLflow's source tags, a description, its
    checkpoint, its arm's colour) and the `final_test_top1` to log (None: none yet)."""
    ckpt = _last_checkpoint(sweep_dir, row["trial_id"])
    want = {"mlflow.runName": run_name(cfg, row.get("final_test_top1"), design),
            "mlflow.source.git.commit": sha, "mlflow.source.name": command, "mlflow.source.type": "LOCAL",
            TAG_NOTE: describe_child(row, design, ckpt, parent)}
    if ckpt is not None:
        want[TAG_CHECKPOINT] = str(ckpt)
    arm = design.column(design.compare) if design is not None and design.compare else None
    if arm is not None and design.arms and text(row.get(arm)) in design.arms:  # a colour per arm the spec lists
        want[TAG_COLOR] = arm_colors(list(design.arms))[text(row.get(arm))]
    final = row.get("final_test_top1")
    return want, (rounded(final) if row["status"] == "TERMINATED" and final is not None else None)


def _write_description(client, run_id: str, want: dict[str, str], final: float | None, *, epochs: int,
                       end_ms: int | None, run: Any = None) -> bool:
    """One `log_batch` of what `run` (as last read; None: unknown) lacks of `want` and `final`; False: nothing
    to write."""
    from mlflow.entities import Metric, RunTag

    tags = [RunTag(key, value) for key, value in want.items() if run is None or run.data.tags.get(key) != value]
    metrics = [] if final is None or (run is not None and run.data.metrics.get(FINAL_METRIC) == final) else [
        Metric(FINAL_METRIC, final, end_ms or int(time.time() * 1000), epochs)]
    if tags or metrics:  # one write per run (a write per tag was ~9 SQLite commits per trial)
        client.log_batch(run_id, metrics=metrics, tags=tags)
    return bool(tags or metrics)


def _describe_children(tracker: SweepTracker, table: list[dict[str, Any]], configs: dict[str, TrialConfig], *,
                       sha: str, command: str, sweep_dir: Path | None) -> None:
    """Each child as `child_description` has it, written where its run (as the sweep's one index read it) differs:
    the launcher's MLflow thread describes each trial as it finishes, so at the end of a launch this is a check."""
    parent = tracker.parent_run_id()
    runs = tracker.trial_runs()
    for row in table:
        run, cfg = runs.get(row["trial_id"]), configs.get(row["trial_id"])
        if run is None or cfg is None:
            continue
        want, final = child_description(row, cfg, design=tracker.design, parent=parent, sha=sha, command=command,
                                        sweep_dir=sweep_dir)
        _write_description(tracker.client, run.info.run_id, want, final, epochs=int(row.get("epochs") or 0),
                           end_ms=run.info.end_time, run=run)


def publish_sweep(*, results_dir: Path, table: list[dict[str, Any]], summary: tuple | None, uri: str,
                  experiment: str, sweep: str, artifact_root: Path | None, complete: bool,
                  configs: dict[str, TrialConfig], best: tuple[str, Path] | None, design: Design | None = None,
                  sweep_dir: Path | None = None, tracker: SweepTracker | None = None) -> None:
    """The sweep's front page in MLflow, idempotent: any number of calls leave one copy of everything.

    `summary` is frontier.summarize's Summary or None before any trial finished. On the parent: the frontier
    files and table, trials.csv, curves.csv, spec.yaml, run.json, the command (as its source), the git SHA (as its
    version), a few sweep parameters, the width slope and its interval (metrics) and the description; the best trial's checkpoint on
    its child; each child's name, rank, source tags, description and checkpoint (`sweep_dir`: Ray's sweep directory). `configs`: {trial id: resolved config} of the table's trials;
    `best`: (trial id, checkpoint) of the best finished trial, or None.
    """
    from mlflow.entities import Param

    tracker = tracker or SweepTracker(uri=uri, experiment=experiment, sweep=sweep, artifact_root=artifact_root,
                                      design=design, sweep_dir=sweep_dir)
    client, parent = tracker.client, tracker.parent_run_id()
    cells, paths = (summary.cells, summary.paths) if summary is not None else (None, {})
    tracker.save_view(parent)  # rewritten each time: a newer bvit-sweep's view replaces an older one
    for path in paths.values():
        client.log_artifact(parent, str(path), artifact_path="frontier")
    if cells is not None:
        _write_table(client, parent, cells, "frontier/frontier_table.json")
    for name in ("trials.csv", "curves.csv", "spec.yaml", "run.json"):
        if (results_dir / name).exists():
            client.log_artifact(parent, str(results_dir / name))

    run_json = json.loads((results_dir / "run.json").read_text()) if (results_dir / "run.json").exists() else {}
    command = run_json.get("command", f"bvit-sweep launch {sweep}")
    sha = code_version(results_dir)
    run = client.get_run(parent)
    params = {"sweep.trials": str(len(table)), "sweep.command": command}
    if configs:
        flats = [c.flat() for c in configs.values()]
        axes = {k: sorted({json.dumps(f[k]) for f in flats}) for k in flats[0] if len({json.dumps(f[k]) for f in flats}) > 1}
        params.update({f"sweep.axis.{k}": ", ".join(v)[:500] for k, v in axes.items()})
    new = [Param(k, v) for k, v in params.items() if k not in run.data.params]  # params are write-once
    if new:
        client.log_batch(parent, params=new)
    plots = [p.name for p in paths.values() if p.suffix == ".png"]
    done = [r for r in table if r["status"] == "TERMINATED" and r.get("final_test_top1") is not None]
    name = f"{sweep} · sweep" + (f" · best top-1 {max(r['final_test_top1'] for r in done):.1f} %" if done else "")
    tags = {"mlflow.runName": name, "mlflow.source.name": command, "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": sha,
            TAG_NOTE: describe_parent(sweep=sweep, table=table, cells=cells, plots=plots, run_id=parent,
                                      experiment_id=tracker.experiment_id, command=command, sha=sha,
                                      headline=summary.headline if summary is not None else "", design=design)}
    for key, value in tags.items():
        if run.data.tags.get(key) != value:
            client.set_tag(parent, key, value)

    if best is not None and best[0] in configs:
        trial_id, ckpt = best
        row = next(r for r in table if r["trial_id"] == trial_id)
        client.log_artifact(tracker.child_run_id(trial_id, configs[trial_id]), str(ckpt), artifact_path="model")
        if run.data.tags.get("bvit.best_trial") != trial_id:
            client.set_tag(parent, "bvit.best_trial", trial_id)
        if run.data.metrics.get("best_final_test_top1") != float(row["final_test_top1"]):  # one point, not one per call
            client.log_metric(parent, "best_final_test_top1", float(row["final_test_top1"]))
    slope = (summary.slope or {}) if summary is not None else {}
    for key, name in (("slope", "{}_slope"), ("ci_low", "{}_slope_ci_low"), ("ci_high", "{}_slope_ci_high")):
        name = name.format(slope.get("factor", "trend"))
        if slope.get(key) is not None and run.data.metrics.get(name) != slope[key]:
            client.log_metric(parent, name, float(slope[key]))
    _describe_children(tracker, table, configs, sha=sha, command=command, sweep_dir=sweep_dir)
    if complete:
        tracker.finish_parent(ok=all(r["status"] == "TERMINATED" for r in table))



def log_hypervolume(*, uri: str, experiment: str, sweep: str, history: list[float], files: list[Path]) -> None:
    """A search's hypervolume on the sweep's parent run, as metric `hypervolume` stepped by trials finished
    (idempotent: steps already logged are not logged again), and its Pareto and hypervolume tables."""
    tracker = SweepTracker(uri=uri, experiment=experiment, sweep=sweep)
    parent = tracker.parent_run_id()
    logged = {m.step for m in tracker.client.get_metric_history(parent, "hypervolume")}
    for step, value in enumerate(history, start=1):
        if step not in logged:
            tracker.client.log_metric(parent, "hypervolume", float(value), step=step)
    for path in files:
        if Path(path).exists():
            tracker.client.log_artifact(parent, str(path), artifact_path="search")
