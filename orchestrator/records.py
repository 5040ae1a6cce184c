"""The project's own record of each trial, as JSON: what every read-only command reads instead of Tune's
pickled state.

    <sweep_dir>/bvit_trials/<trial id>.json   {"trial_id", "status", "num_failures", "error_file",
                                               "envelope": TrialEnvelope as JSON, "last_result": {...}}
    <sweep_dir>/<trial id>/result.json        Tune's per-epoch history (JSON lines), read as before

`orchestrator.callbacks.TrialRecords` (a Tune callback in the launcher) writes a trial's record when it starts, reports, fails,
restarts or ends, and every trial's once per launch; the launcher writes them all again from Tune's final
state when the sweep stops. `read_records` gives them back without importing Ray or unpickling anything,
so `status`, `frontier`, `sync`, `ui` and the fine-tuning preflight can read a sweep someone else wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orchestrator.curves import epoch_curve, finite, still_improving
from orchestrator.envelope import FAILED_KEY, TrialEnvelope
from orchestrator.errors import UserError
from orchestrator.spec import Convergence

__all__ = ["RECORDS", "TrialRecord", "read_history", "read_records", "record_doc", "record_trial", "trial_row"]

RECORDS = "bvit_trials"  # in the sweep directory: one JSON record per trial


class TrialRecord:
    """One trial as a read-only command needs it (the few attributes `collect_trials` reads of Tune's Trial)."""

    def __init__(self, doc: dict[str, Any], source: Path) -> None:
        try:
            self.envelope = TrialEnvelope.model_validate(doc["envelope"])
            self.status = str(doc["status"])
            self.num_failures = int(doc.get("num_failures") or 0)
            self.error_file = doc.get("error_file") or None
            last = doc.get("last_result") or {}
            if not isinstance(last, dict):
                raise TypeError("last_result is not a mapping")
            self.last_result = last
        except (KeyError, TypeError, ValueError) as e:
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError([f"{source}: damaged trial record ({what}); `bvit-sweep launch SPEC --resume` "
                             "writes it again"]) from None

    @property
    def trial_id(self) -> str:
        return self.envelope.trial_id


def _json_safe(value: Any) -> Any:
    """Plain JSON data: nested mappings and lists of numbers and strings (NaN and inf as null)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if k != "config"}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)


def record_doc(trial, status: str | None = None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of Tune trial `trial` as JSON data; `status` overrides the trial's own, `result` its last
    result (Tune calls `on_trial_result` before it updates `trial.last_result`)."""
    env = TrialEnvelope.of(trial.config)
    return {"trial_id": env.trial_id, "status": status or trial.status, "num_failures": trial.num_failures,
            "error_file": str(trial.error_file) if getattr(trial, "error_file", None) else None,
            "envelope": env.to_tune(), "last_result": _json_safe(result if result is not None else trial.last_result or {})}


def record_trial(sweep_dir: Path, trial, status: str | None = None, result: dict[str, Any] | None = None) -> None:
    """Write (atomically) the record of Tune trial `trial` (`record_doc`)."""
    doc = record_doc(trial, status, result)
    out = Path(sweep_dir) / RECORDS
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{doc['trial_id']}.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(out / f"{doc['trial_id']}.json")


def read_records(sweep_dir: Path) -> list[TrialRecord]:
    """Every trial's record, in trial-id order; a one-line `UserError` when the sweep has none."""
    folder = Path(sweep_dir) / RECORDS
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise UserError([f"{sweep_dir}: no trial records ({RECORDS}/); the sweep was launched by an older "
                         "bvit-sweep or has not started a trial yet: `bvit-sweep launch SPEC --resume` writes them"])
    out = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (ValueError, RecursionError) as e:
            raise UserError([f"{f}: damaged trial record ({str(e).splitlines()[0]}); "
                             "`bvit-sweep launch SPEC --resume` writes it again"]) from None
        out.append(TrialRecord(doc if isinstance(doc, dict) else {}, f))
    return out


def read_history(sweep_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    """A trial's per-epoch results (Tune's result.json, JSON lines; a line cut short by a crash is skipped),
    without the config Tune repeats in each."""
    from orchestrator.timing import read_records as read_lines

    path = Path(sweep_dir) / trial_id / "result.json"
    return [{k: v for k, v in rec.items() if k != "config"} for rec in read_lines(path)] if path.is_file() else []


def _best(history: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """(best test top-1, the epoch it was reached at; the first on a tie) of a trial's per-epoch records;
    (None, None) when it has none."""
    scored = [(x, r) for r in history if (x := finite(r.get("test_top1"))) is not None and finite(r.get("epoch")) is not None]
    if not scored:
        return None, None
    top, rec = max(scored, key=lambda xr: xr[0])  # max keeps the first of equal values
    return top, int(rec["epoch"])


def trial_row(sweep_dir: Path, trial: TrialRecord, *, axis_cols: dict[str, str],
              convergence: Convergence) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One trial's row of the trial table and its learning curve (`collect_trials`; the launcher's MLflow
    thread describes a finished trial's run from the same row). `axis_cols`: {dotted path: column} of the
    paths the sweep varies."""
    env = trial.envelope
    cfg = env.resolved  # a fine-tuning trial's model is its checkpoint's
    flat = cfg.flat()
    last = trial.last_result or {}
    history = read_history(sweep_dir, env.trial_id)
    curve = epoch_curve(history, eval_every=cfg.eval_every, epochs=cfg.optim.epochs) if history else []
    row: dict[str, Any] = {
        "trial_id": env.trial_id, "status": trial.status, "arch": cfg.model.arch,
        "width": cfg.model.width, "steps": cfg.model.steps, "heads": cfg.model.heads, "seed": cfg.seed,
        **{col: flat[path] for path, col in axis_cols.items() if col not in ("arch", "width", "steps", "heads")},
        "params": last.get("params"), "flops_per_image": last.get("flops_per_image"),
        "final_test_top1": last.get("test_top1"), "final_test_top5": last.get("test_top5"),
        "final_test_loss": last.get("test_loss"), "final_train_loss": last.get("train_loss"),
        "epochs": last.get("epoch", 0), "still_improving": still_improving(curve, convergence),
        "wall_s": last.get("time_total_s"), "node": last.get("node_ip"),
        "retries": max(int(last.get("retries", 0)), trial.num_failures), "error": "",
    }
    if cfg.finetune is not None:  # a fine-tuning trial: how it adapted the pretrained model
        ft = cfg.finetune
        row.update(method=ft.method, rank=ft.rank if ft.method.startswith("lora") else None,
                   trainable_params=last.get("trainable_params"), merged_test_top1=last.get("merged_test_top1"))
    row["best_test_top1"], row["best_epoch"] = _best(history)
    if isinstance(last.get(FAILED_KEY), str):  # failed for good (diverged, bad data): not retried
        row["status"], row["error"] = "ERROR", last[FAILED_KEY]
    elif trial.status == "ERROR":  # Tune's copy in the sweep directory, not the node's temporary one
        kept = Path(sweep_dir) / env.trial_id / "error.txt"
        row["error"] = f"see {kept}" if kept.exists() else (f"see {trial.error_file}" if trial.error_file else "")
    return row, curve
