"""The sweep's trial table, read back from Ray Tune's own state (the source of truth), and its files.

`collect_trials` works on a finished, interrupted or running sweep; `write_results` writes
results/<sweep>/trials.csv (one row per trial), curves.csv (one line per trial and epoch), the resolved spec
and the git SHA it came from.
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.cells import MEASURED, column_names
from orchestrator.curves import CURVES, curve_table
from orchestrator.envelope import TrialEnvelope, trial_status
from orchestrator.errors import UserError
from orchestrator.provenance import PROVENANCE_KEY, git_sha, machine_provenance, relative_to_repo
from orchestrator.records import read_records, trial_row
from orchestrator.spec import Convergence, SweepSpec, Trial
from orchestrator.spec.load import SNAPSHOT, read_snapshot

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["trial_status", "collect_trials", "trial_row", "write_results", "finalize", "best_checkpoint", "best_trial", "git_sha", "trial_envelopes",
           "trial_curves", "TrialTable", "COLUMNS"]

COLUMNS = [
    "trial_id", "status", "arch", "width", "steps", "heads", "seed", "params", "flops_per_image",
    "best_test_top1", "best_epoch", "final_test_top1", "final_test_top5", "final_test_loss", "final_train_loss",
    "epochs", "still_improving", "wall_s", "node", "retries", "error",
]


class TrialTable(list):
    """`collect_trials`' rows (a list of one dict per trial, as before) that also carries each trial's
    learning curve (`curves.epoch_curve`), by trial id, for curves.csv and curves.png."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), *, curves: dict[str, list[dict[str, Any]]] | None = None):
        super().__init__(rows)
        self.curves = dict(curves or {})


def trial_curves(table: list[dict[str, Any]]) -> pd.DataFrame | None:
    """curves.csv's table for a `TrialTable`: each trial's id, cell and axis columns, one line per epoch;
    None for a plain list of rows (no curves known)."""
    if not isinstance(table, TrialTable):
        return None
    columns = list(dict.fromkeys(k for r in table for k in r if k not in MEASURED))
    return curve_table(table, table.curves, columns)


def _axis_columns(trials: list[Trial] | None) -> dict[str, str]:
    """{dotted path: trials.csv column} of every path the trials vary but the seed (orchestrator.cells' names)."""
    if not trials:
        return {}
    flats = [t.config.flat() for t in trials]
    first = {k: (type(v), v) for k, v in flats[0].items()}  # 1 and 1.0 and True are different values of a path
    return column_names(k for k in first if k != "seed" and any((type(f.get(k)), f.get(k)) != first[k] for f in flats))


def trial_envelopes(sweep_dir: Path) -> dict[str, TrialEnvelope]:
    """{trial id -> envelope} of every trial the sweep at `sweep_dir` recorded (its JSON records only)."""
    return {r.trial_id: r.envelope for r in read_records(sweep_dir)}


def collect_trials(sweep_dir: Path, *, trials: list[Trial] | None = None) -> TrialTable:
    """One dict per trial in the sweep at `sweep_dir` (status, axes, counts, best/final metrics, whether it
    was still improving at its end, node...), with each trial's learning curve (`TrialTable.curves`).

    `trials` (the spec's, expanded) orders the rows and names the axis columns; without them rows come in
    id order with the model columns only. `still_improving` follows the `convergence` of the spec the sweep
    was launched with (its snapshot; the default where it has none).

    Reads only the project's own JSON records and Tune's result.json lines, never Tune's pickled state: a
    sweep directory from anyone can be read.
    """
    axis_cols = _axis_columns(trials)
    convergence = read_snapshot(sweep_dir)[1].convergence if (sweep_dir / SNAPSHOT).exists() else Convergence()
    rows, curves = [], {}
    for trial in read_records(sweep_dir):
        row, curves[trial.trial_id] = trial_row(sweep_dir, trial, axis_cols=axis_cols, convergence=convergence)
        rows.append(row)
    order = {t.id: i for i, t in enumerate(trials or [])}
    rows.sort(key=lambda r: (order.get(r["trial_id"], len(order)), r["trial_id"]))
    return TrialTable(rows, curves=curves)


def write_results(rows: list[dict[str, Any]], *, spec: SweepSpec, command: str, results_dir: Path,
                  sweep_dir: Path, sha: str | None = None, storage_uri: str | None = None) -> Path:
    """results/<name>[-smoke]/: trials.csv, curves.csv (when `rows` is `collect_trials`' TrialTable: one line
    per trial and epoch), spec.yaml (resolved; its `convergence` always, the threshold behind trials.csv's
    still_improving), run.json (SHA, the launch command as run, sweep dir relative to the repository (its URI on
    URI storage), and the
    launching machine's and the trials' provenance: CPU model and ISA, cores, torch's oneDNN / MKL / CUDA and
    threads, package versions)."""
    out = results_dir
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(COLUMNS[:7] + [k for r in rows for k in r] + COLUMNS[7:]))
    tmp = out / ".trials.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    tmp.replace(out / "trials.csv")
    if (curves := trial_curves(rows)) is not None:
        curves.to_csv(out / f".{CURVES}.tmp", index=False)
        (out / f".{CURVES}.tmp").replace(out / CURVES)
    resolved = spec.model_dump(mode="json", exclude_unset=True)
    resolved.setdefault("convergence", spec.convergence.model_dump(mode="json"))  # what still_improving means here
    (out / "spec.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (out / "run.json").write_text(json.dumps({
        "git_sha": sha or git_sha(), "command": command, "sweep_dir": storage_uri or relative_to_repo(sweep_dir),
        "python": sys.version.split()[0], "trials": len(rows),
        "terminated": sum(r["status"] == "TERMINATED" for r in rows),
        "launcher": machine_provenance(),  # the machine that launched the sweep and wrote these files
        "trial_machines": _trial_machines(sweep_dir),  # what the trials computed on (torch's kernels, threads)
    }, indent=1))
    return out


def _trial_machines(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each distinct machine-and-software record the trials reported (normally one), with the trials on it."""
    machines: dict[str, dict[str, Any]] = {}
    try:
        records = read_records(sweep_dir)
    except UserError:
        return []
    for r in records:
        prov = r.last_result.get(PROVENANCE_KEY)
        if isinstance(prov, dict):
            entry = machines.setdefault(json.dumps(prov, sort_keys=True), {**prov, "trials": []})
            entry["trials"].append(r.trial_id)
    return list(machines.values())


def best_trial(rows: list[dict[str, Any]]) -> str | None:
    """The id of the finished trial with the best final test top-1, or None."""
    done = [r for r in rows if r["status"] == "TERMINATED" and r.get("final_test_top1") is not None]
    return max(done, key=lambda r: r["final_test_top1"])["trial_id"] if done else None


def best_checkpoint(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[str, Path] | None:
    """(trial id, checkpoint.pt) of the finished trial with the best final test top-1, or None."""
    if (best := best_trial(rows)) is None:
        return None
    ckpts = sorted((sweep_dir / best).glob("checkpoint_*/checkpoint.pt"))
    return (best, ckpts[-1]) if ckpts else None


def finalize(*, sweep_dir: Path, results_dir: Path, table: list[dict[str, Any]], uri: str, experiment: str,
             sweep: str, artifact_root: str | None, complete: bool, verbose: bool = True,
             summary=None, design=None) -> dict[str, Any]:
    """After a sweep: frontier files, MLflow back-fill, frontier + best model on the parent run. `summary`:
    `frontier.summarize`'s result when the caller already made it (the files are then not written again);
    `design`: the spec's cells and comparison (orchestrator.cells.design_of).

    MLflow problems are reported, never raised: Ray's results stay the source of truth and
    `bvit-sweep sync` repeats this step later.
    """
    from orchestrator.frontier import summarize
    from orchestrator.tracking import MlflowProgressCallback, SweepTracker, publish_sweep, sync_sweep

    out: dict[str, Any] = {"frontier": None, "synced": None}
    try:
        summary = summary if summary is not None else summarize(  # frontier, or transfer for fine-tuning
            table, results_dir, title=sweep, curves=trial_curves(table), design=design)
        out["frontier"] = str(next(iter(summary.paths.values())))
    except ValueError as e:
        if verbose:
            print(f"no frontier yet: {e}")
    try:
        root = Path(artifact_root) if artifact_root else None
        tracker = SweepTracker(uri=uri, experiment=experiment, sweep=sweep, artifact_root=root, design=design,
                               sweep_dir=sweep_dir)  # one for both steps: the sweep's runs are read once
        # When live logging never failed in this process, a run whose last epoch is logged is complete.
        out["synced"] = sync_sweep(sweep_dir, uri=uri, experiment=experiment, sweep=sweep, artifact_root=root,
                                   design=design, trust_last=MlflowProgressCallback.failures == 0, tracker=tracker)
        ids = {row["trial_id"] for row in table}
        configs = {tid: env.resolved for tid, env in trial_envelopes(sweep_dir).items() if tid in ids}
        publish_sweep(results_dir=results_dir, table=table, summary=summary, uri=uri, experiment=experiment,
                      sweep=sweep, artifact_root=root, complete=complete, configs=configs,
                      best=best_checkpoint(sweep_dir, table), design=design, sweep_dir=sweep_dir, tracker=tracker)
    except Exception as e:  # tracking must never lose a finished sweep
        print(f"warning: MLflow at {uri} could not be updated ({type(e).__name__}: {e}); "
              f"rerun `bvit-sweep sync {sweep_dir}` when it is reachable")
    if verbose and out["synced"]:
        print(f"MLflow: {uri} (experiment {experiment!r}): {out['synced']['trials']} trial runs, "
              f"{out['synced']['epochs_logged']} epochs back-filled")
    return out

