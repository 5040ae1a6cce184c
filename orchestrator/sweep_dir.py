"""After-the-fact views of a sweep: status, frontier, MLflow sync and the MLflow dashboard.

A SWEEP argument is a sweep directory (<storage>/<name>, a folder or a URI such as s3://bucket/prefix/name), a spec
file (its sweep under the spec's storage), or a bare name (looked up under ./runs). A sweep on URI storage is read
from its local copy, pulled first (orchestrator.storage). `rebuild_frontier` needs no sweep directory: it remakes
the frontier files from a committed results/<sweep>/trials.csv (and its curves.csv, where there is one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cells import Design, design_of, text
from orchestrator.errors import UserError
from orchestrator.spec import SweepSpec, load_spec
from orchestrator.spec.load import SNAPSHOT, read_snapshot
from orchestrator.storage import (
    SweepLocation,
    is_uri,
    location_of,
    storage_problems,
    sweep_location,
    sweep_name,
)

TUNER_STATE = "tuner.pkl"  # Ray Tune's (ray.tune.impl.tuner_internal._TUNER_PKL): a launched sweep has one

__all__ = ["SNAPSHOT", "Sweep", "sweep_name", "sweep_dir_for", "resolve_sweep", "read_snapshot", "check_tune_state", "sweep_status", "sweep_frontier", "rebuild_frontier", "sweep_sync", "ui_store"]


def sweep_dir_for(spec: SweepSpec, storage: str | None = None, *, smoke: bool = False) -> Path:
    """The sweep's directory on this machine: <storage>/<name> (storage from the CLI, else the spec), or, for a URI
    storage, its local copy (`orchestrator.storage.sweep_location` has both)."""
    return sweep_location(spec, storage, smoke=smoke).dir


@dataclass
class Sweep:
    dir: Path
    spec: SweepSpec
    results_dir: Path
    location: SweepLocation | None = None  # where it lives (a URI's local copy is `dir`)

    @property
    def name(self) -> str:
        return self.dir.name


def resolve_sweep(arg: str, *, results_root: Path | str = "results", smoke: bool = False) -> Sweep:
    """Find a sweep from a directory, a spec file or a name; a clear error when there is none. Ray-free: a sweep
    is a directory with the launch's snapshot and Tune's `tuner.pkl` (what `Tuner.can_restore` looks for)."""
    p = Path(arg).expanduser()
    if is_uri(arg):
        where = location_of(*arg.rstrip("/").rsplit("/", 1))
        if problems := storage_problems(where.storage_path, source=arg):
            raise UserError(problems)
    elif p.suffix in (".yaml", ".yml"):
        spec = load_spec(p)
        where = sweep_location(spec, smoke=smoke)
        if problems := storage_problems(spec.storage, source=str(p)):
            raise UserError(problems)
    elif p.is_dir() or len(p.parts) > 1 or p.is_absolute():  # a path: taken as given, never under ./runs again
        where = location_of(str(p.parent), p.name)
    else:
        where = location_of("runs", arg)
    if where.uri is not None and where.exists():
        where.pull()  # Ray's state and results and the project's records; checkpoints stay where they are
    d = where.dir
    if not (d / SNAPSHOT).exists() or not (d / TUNER_STATE).is_file():
        raise UserError([f"{arg}: no sweep found at {where}; pass a sweep directory (<storage>/<name>), "
                         "its spec file, or its name under ./runs"])
    check_tune_state(d)
    spec = read_snapshot(d)[1]
    return Sweep(dir=d, spec=spec, results_dir=Path(results_root) / d.name, location=where)


def check_tune_state(sweep_dir: Path) -> None:
    """A one-line `UserError` when Ray Tune's newest `experiment_state-*.json` in the sweep is not JSON."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return
    try:
        json.loads(states[-1].read_text())
    except ValueError as e:
        raise UserError([f"{states[-1]}: damaged ({str(e).splitlines()[0]}); Ray Tune's record of the trials is "
                         "unreadable, so the sweep can neither be read nor resumed: restore the file from a backup, "
                         f"or launch the trials again as a new sweep (the trials' results and checkpoints under "
                         f"{sweep_dir} are left as they are)"]) from None


def sweep_status(sweep: Sweep) -> list[dict[str, Any]]:
    """The trial table of a sweep (finished, interrupted or running), with a column for every path the spec it
    was launched with varies (orchestrator.cells' names), rows in the spec's order."""
    from orchestrator.results import collect_trials
    from orchestrator.spec import expand_trials

    smoke = bool(read_snapshot(sweep.dir)[0].get("smoke"))
    return collect_trials(sweep.dir, trials=expand_trials(sweep.spec, smoke=smoke))


def sweep_frontier(sweep: Sweep, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Recompute frontier.csv and plots (transfer.* for a fine-tuning sweep) into results/<sweep>/ and log
    them to the parent MLflow run."""
    from orchestrator.frontier import summarize
    from orchestrator.results import best_trial, finalize, trial_curves
    from orchestrator.tracking import resolve_tracking

    table = sweep_status(sweep)
    design = sweep_design(sweep)
    if sweep.location is not None and (best := best_trial(table)) is not None:
        sweep.location.pull_checkpoint(best)  # URI storage: the best model, for MLflow (the copy leaves checkpoints out)
    try:
        summary = summarize(table, sweep.results_dir, title=sweep.name, curves=trial_curves(table), design=design)
    except ValueError as e:
        raise UserError([f"{sweep.dir}: {e}"], code=1) from e
    uri, experiment = resolve_tracking(sweep.spec, sweep.results_dir, tracking_uri)
    finalize(sweep_dir=sweep.dir, results_dir=sweep.results_dir, table=table, uri=uri, experiment=experiment,
             sweep=sweep.name, artifact_root=str(sweep.results_dir / "mlflow" / "artifacts"),
             complete=all(r["status"] in ("TERMINATED", "ERROR") for r in table), verbose=False, summary=summary,
             design=design)
    return _frontier_doc(summary, sweep.results_dir)


def rebuild_frontier(trials_csv: Path) -> dict[str, Any]:
    """Rewrite frontier.csv (transfer.csv), slope.json and the plots beside a committed trials.csv, without
    Ray's sweep directory and without MLflow; curves.png too where curves.csv lies beside it (results from
    before it have none). A one-line UserError (exit 2) for a missing or malformed file."""
    from orchestrator.curves import CURVES, read_curves
    from orchestrator.frontier import read_trials, summarize

    curves_csv = trials_csv.parent / CURVES
    try:
        summary = summarize(read_trials(trials_csv), trials_csv.parent, title=trials_csv.parent.name,
                            curves=read_curves(curves_csv), design=results_design(trials_csv.parent))
    except ValueError as e:
        msg = str(e) if str(e).startswith((str(trials_csv), str(curves_csv))) else f"{trials_csv}: {e}"
        raise UserError([msg]) from None
    return _frontier_doc(summary, trials_csv.parent)


def sweep_design(sweep: Sweep) -> Design:
    """The cells and comparison of the spec the sweep was launched with (orchestrator.cells)."""
    return design_of(sweep.spec, smoke=bool(read_snapshot(sweep.dir)[0].get("smoke")))


def results_design(results_dir: Path) -> Design | None:
    """The design of the sweep whose results lie in `results_dir`: from the spec.yaml written beside its
    trials.csv (its smoke variant for a `<name>-smoke` folder); None (read from the table) without one."""
    spec_file = results_dir / "spec.yaml"
    if not spec_file.is_file():
        return None
    spec = load_spec(spec_file)
    return design_of(spec, smoke=results_dir.name == sweep_name(spec, True))


def _frontier_doc(summary, out: Path) -> dict[str, Any]:
    cells = summary.cells.assign(**{c: summary.cells[c].map(text) for c in summary.factors})  # as labels show them
    cells = cells.astype(object).where(cells.notna(), None)  # NaN -> null in JSON
    return {"kind": summary.kind, "factors": summary.factors, "cells": cells.to_dict("records"), "dir": str(out),
            "headline": summary.headline,
            "slope": summary.slope, "files": [str(p) for p in summary.paths.values()]}


def sweep_sync(sweep: Sweep, *, tracking_uri: str | None = None) -> dict[str, int]:
    """Back-fill MLflow from Ray's results (idempotent); raises a UserError when MLflow is unreachable."""
    from orchestrator.tracking import resolve_tracking, sync_sweep

    uri, experiment = resolve_tracking(sweep.spec, sweep.results_dir, tracking_uri)
    try:
        return sync_sweep(sweep.dir, uri=uri, experiment=experiment, sweep=sweep.name, design=sweep_design(sweep),
                          artifact_root=sweep.results_dir / "mlflow" / "artifacts")
    except Exception as e:
        raise UserError([f"{uri}: cannot reach MLflow ({type(e).__name__}: {e}); nothing was lost, "
                         "Ray's results are kept: retry when the server is up"], code=1) from e


def ui_store(sweep: Sweep | None, *, tracking_uri: str | None = None,
             results_root: Path | str = "results") -> tuple[str, str | None, Path]:
    """(local store URI, experiment name or None, folder for the server's log) for `bvit-sweep ui`: the
    sweep's store, else --tracking-uri, else ./results' newest local store."""
    from orchestrator.tracking import resolve_tracking

    if sweep is not None:
        uri, experiment = resolve_tracking(sweep.spec, sweep.results_dir, tracking_uri)
        log_dir = sweep.results_dir / "mlflow"
    elif tracking_uri:
        uri, experiment, log_dir = tracking_uri, None, Path(results_root)
    else:
        stores = sorted(Path(results_root).glob("*/mlflow/mlflow.db"), key=lambda p: p.stat().st_mtime)
        if not stores:
            raise UserError([f"{results_root}: no local MLflow store yet; run a sweep first or pass --tracking-uri"])
        uri, experiment, log_dir = f"sqlite:///{stores[-1].resolve()}", None, stores[-1].parent
    if not uri.startswith("sqlite"):
        raise UserError([f"{uri} is a tracking server already: open it in a browser"], code=1)
    return uri, experiment, log_dir
