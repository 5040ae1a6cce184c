"""A sweep's saved state across launches: may this launch start or resume it, and leave it resumable.

    snap = snapshot(spec, smoke, strategy.trials)       # the spec and trial ids the sweep is launched with
    check_sweep_state(sweep_dir, snap, spec=spec, spec_path=p, resume=r, force=f, trust_state=t)  # before Ray
    ...
    write_snapshot(sweep_dir, snap)                      # a new sweep, or a --force resume
    record_final_state(sweep_dir)                        # after `fit`: sign Tune's state, write every trial's record

A new launch refuses a sweep that exists; `--resume` refuses one that does not, one whose Tune state is damaged
or not signed by this user (`orchestrator.signing`; `--trust-state` resumes it anyway), and one whose spec
changed since it started (`--force` resumes only edits that change no trial).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.errors import UserError
from orchestrator.records import record_trial
from orchestrator.signing import sign_state, verify_state
from orchestrator.spec import SweepSpec, Trial
from orchestrator.spec.load import SNAPSHOT, read_snapshot
from orchestrator.sweep_dir import check_tune_state

__all__ = ["TRIAL_FIELDS", "check_sweep_state", "record_final_state", "snapshot", "write_snapshot"]

# Spec fields that decide how each trial runs (the trials themselves are compared by id, a hash of the config).
TRIAL_FIELDS = ("resources", "scheduler", "max_failures")


def snapshot(spec: SweepSpec, smoke: bool, trials: list[Trial]) -> dict[str, Any]:
    """What `--resume` compares against: the spec as written, smoke or not, and the trials' ids."""
    return {"spec": spec.model_dump(mode="json", exclude_unset=True), "smoke": smoke, "trial_ids": [t.id for t in trials]}


def write_snapshot(sweep_dir: Path, snap: dict[str, Any]) -> None:
    (sweep_dir / SNAPSHOT).write_text(json.dumps(snap, indent=1))


def check_sweep_state(sweep_dir: Path, snap: dict[str, Any], *, spec: SweepSpec, spec_path: Path, resume: bool,
                      force: bool, trust_state: bool) -> None:
    """A one-line `UserError` unless this launch may start (or, with `resume`, continue) the sweep in
    `sweep_dir`: checked before anything unpickles Tune's state, and before Ray starts."""
    exists = tune.Tuner.can_restore(str(sweep_dir))
    if exists and not resume:
        raise UserError([f"{sweep_dir}: a sweep named {spec.name!r} already exists there; "
                         "pass --resume to continue it, or --storage DIR / a new name to start another"])
    if resume and not exists:
        raise UserError([f"{sweep_dir}: no sweep state to resume; run without --resume to start it"])
    if exists:
        check_tune_state(sweep_dir)
        if not trust_state:
            verify_state(sweep_dir)  # before anything unpickles it: only state this user's launcher signed
    if resume and (sweep_dir / SNAPSHOT).exists():
        _check_resume(read_snapshot(sweep_dir)[0], snap, force=force, spec_path=spec_path)


def record_final_state(sweep_dir: Path, *, records_written: bool = False) -> None:
    """After `fit`: sign Tune's state as it was saved last, and write every trial's JSON record from it (this
    launcher's own state, verified or written here: a sweep launched before the records gets them now) --
    unless `records_written`: the launch's `TrialRecords` wrote every trial's final record as the experiment
    ended (reading the state back cost 13 s at 1,000 trials, every trial's history loaded with pandas)."""
    if not tune.Tuner.can_restore(str(sweep_dir)):
        return
    sign_state(sweep_dir)
    if records_written:
        return
    for trial in tune.ExperimentAnalysis(str(sweep_dir)).trials:
        record_trial(sweep_dir, trial)


def _check_resume(old: dict[str, Any], new: dict[str, Any], *, force: bool, spec_path: Path) -> None:
    """Resume only the sweep that was started: any change is refused without --force; with --force only
    changes that leave every trial as it was (description, tracking, ray_address, ...)."""
    changes = _diff(old, new)
    if not changes:
        return
    if not force:
        raise UserError([f"{spec_path}: the spec changed since the sweep started; refusing to resume "
                         "(--force resumes edits that change no trial, e.g. description or tracking):",
                         *("  " + c for c in changes)])
    was, now = old.get("trial_ids", []), new["trial_ids"]
    what = []
    if added := [t for t in now if t not in was]:
        what.append(f"{len(added)} trials added (ids {', '.join(added[:3])}{', ...' if len(added) > 3 else ''})")
    if removed := [t for t in was if t not in now]:
        what.append(f"{len(removed)} trials removed or changed (ids {', '.join(removed[:3])}"
                    f"{', ...' if len(removed) > 3 else ''})")
    if old.get("smoke") != new["smoke"]:
        what.append(f"smoke: {json.dumps(old.get('smoke'))} -> {json.dumps(new['smoke'])}")
    before, after = SweepSpec.model_validate(old["spec"]), SweepSpec.model_validate(new["spec"])
    for name in TRIAL_FIELDS:
        what += _diff(_as_data(getattr(before, name)), _as_data(getattr(after, name)), name)
    if what:
        shown = "; ".join(what[:5]) + (f"; and {len(what) - 5} more" if len(what) > 5 else "")
        raise UserError([f"{spec_path}: the sweep's trials changed since it started ({shown}); --force resumes "
                         "only edits that change no trial: start these trials as a new sweep (a new name or --storage)"])


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys(), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {json.dumps(old)} -> {json.dumps(new)}"]


def _as_data(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value
