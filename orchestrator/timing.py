"""Where a sweep's time went: the phases every trial records (`bvit.config.PHASES`), per trial and summed.

    rows, summary = sweep_timing(Path("runs/width"))     # what `bvit-sweep status runs/width --timing` prints

Each trial's records (runs/<sweep>/<trial>/result.json, one line per reported epoch, restarts included)
carry `phase_*_s` seconds; a trial's phase is their sum. The sweep's launches (`launches.jsonl`, one line
per `bvit-sweep launch`, written by `orchestrator.launch`) give the launch -> Ray ready -> first trial
start -> first optimizer step timeline of the latest launch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bvit.config import PHASES

__all__ = ["LAUNCHES", "record_launch", "read_records", "trial_timing", "sweep_timing"]

LAUNCHES = "launches.jsonl"  # in the sweep directory: one line per launch (start time, Ray ready, command)
SETUP = ("phase_import_s", "phase_model_s", "phase_data_s", "phase_compile_s")  # between entry and fit


def record_launch(sweep_dir: Path, **fields: Any) -> None:
    """Append one launch's line to the sweep's `launches.jsonl`."""
    with open(sweep_dir / LAUNCHES, "a") as f:
        f.write(json.dumps(fields) + "\n")


def read_records(result_json: Path) -> list[dict[str, Any]]:
    """The JSON lines of a trial's result.json (or launches.jsonl) that are records: a line cut short by a
    crash, or anything else that is not a JSON object, is skipped."""
    out = []
    for line in result_json.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def trial_timing(trial_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One trial's phases summed over its records; `wall_s` from its first start to its last report
    (`ended_at`); `first_step_at`: Unix time of its first optimizer step; `fresh_process`: it paid a process
    start."""
    row: dict[str, Any] = {"trial_id": trial_id, "epochs": len([r for r in records if "epoch_seconds" in r])}
    for p in PHASES:
        row[p] = sum(float(r.get(p) or 0.0) for r in records)
    starts = [r for r in records if "trial_started_at" in r]
    row["starts"] = len(starts)
    row["fresh_process"] = any(r.get("process_trials") == 1 for r in starts)
    if starts:
        first = starts[0]
        row["started_at"] = first["trial_started_at"]
        row["first_step_at"] = first["trial_started_at"] + sum(float(first.get(p) or 0.0) for p in SETUP) + float(
            first.get("phase_first_step_s") or 0.0)
        ends = [r.get("reported_at", r.get("timestamp")) for r in records]  # Tune's timestamp: whole seconds
        ends = [e for e in ends if e is not None]
        row["ended_at"] = max(ends) if ends else None
        row["wall_s"] = row["ended_at"] - row["started_at"] if ends else None
    return row


def sweep_timing(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per trial that reported, the sweep's totals and launch timeline)."""
    rows = [trial_timing(p.parent.name, recs) for p in sorted(sweep_dir.glob("*/result.json"))
            if (recs := read_records(p))]
    totals = {p: sum(r[p] for r in rows) for p in PHASES}
    accounted = sum(v for p, v in totals.items() if p != "phase_first_step_s")
    summary: dict[str, Any] = {"trials": len(rows), "fresh_processes": sum(r["fresh_process"] for r in rows),
                               "phases": totals, "accounted_s": accounted}
    started = [r for r in rows if "started_at" in r]
    if started:
        summary["span_s"] = max(r["ended_at"] or r["started_at"] for r in started) - min(
            r["started_at"] for r in started)
    launches = [r for r in (read_records(sweep_dir / LAUNCHES) if (sweep_dir / LAUNCHES).exists() else [])
                if all(isinstance(r.get(k), (int, float)) for k in ("started_at", "ray_ready_at"))]
    if launches and started:
        last = launches[-1]
        mine = [r for r in started if r["started_at"] >= last["started_at"]]
        if mine:
            summary["launch"] = {
                "ray_ready_s": last["ray_ready_at"] - last["started_at"],
                "first_trial_start_s": min(r["started_at"] for r in mine) - last["started_at"],
                "first_step_s": min(r["first_step_at"] for r in mine) - last["started_at"],
            }
    return rows, summary
