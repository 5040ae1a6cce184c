"""The launcher's Tune callbacks that keep the sweep directory readable as data and resumable by its owner.

    TrialRecords(sweep_dir)   bvit_trials/<id>.json: each trial's state as JSON (`orchestrator.records`)
    SignState(sweep_dir)      bvit_signatures.json: this user's HMAC of Tune's pickled state, with each save
    ProgressTable(total)      the live progress a person reads: a line per result, the trial table now and then
    PushOwnFiles(where)       a sweep on URI storage: the files above go up as they change (`orchestrator.storage`)
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray import tune
from rich.console import Console

from orchestrator.cells import Design
from orchestrator.envelope import TrialEnvelope
from orchestrator.records import record_trial
from orchestrator.signing import SIGNATURES, sign_state
from orchestrator.tables import progress_line, render_table

__all__ = ["ProgressTable", "PushOwnFiles", "SignState", "TrialRecords"]

FULL_TABLE = 40  # trials: up to this many the table lists each one at every trial's end; past it, every
# `every_s` seconds, the running trials and the counts per state (a table of every trial at every trial's
# end made a 1,000-trial sweep render a million rows)


class TrialRecords(tune.Callback):
    """Keeps `bvit_trials/<id>.json` current: every trial at the first step of a launch, then each trial as it
    starts, reports, fails, restarts or ends, and all of them when the experiment ends."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        self._all_written = False
        self.ended = False  # every trial's final record written as the experiment ended (the launch reads it)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if not self._all_written:
            self._all_written = True
            for trial in trials:
                record_trial(self.sweep_dir, trial)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        record_trial(self.sweep_dir, trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial, result, **info) -> None:
        record_trial(self.sweep_dir, trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        record_trial(self.sweep_dir, trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        record_trial(self.sweep_dir, trial, "ERROR")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        record_trial(self.sweep_dir, trial, "PENDING")

    def on_experiment_end(self, trials: list, **info) -> None:
        for trial in trials:
            record_trial(self.sweep_dir, trial)
        self.ended = True

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: a resumed launch writes all again
        return {"sweep_dir": self.sweep_dir, "_all_written": False, "ended": False}


class SignState(tune.Callback):
    """Signs Tune's pickled state with this user's key each time Tune saves it: Tune asks its callbacks for
    their state (`get_state`) right after writing its own into the driver staging directory and before
    syncing that directory to the sweep's storage, so the signatures travel in the same sync. Once more
    when the experiment ends. Nothing of this callback's own is saved (`get_state` returns None)."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        self._staging: Path | None = None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._staging is None and trials:  # Ray's StorageContext: where Tune stages the state it saves
            self._staging = Path(trials[0].storage.experiment_driver_staging_path)

    def get_state(self) -> None:
        if self._staging is not None and self._staging.is_dir():
            sign_state(self.sweep_dir, staging=self._staging)
        return None

    def on_experiment_end(self, trials: list, **info) -> None:
        sign_state(self.sweep_dir)

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_dir": self.sweep_dir, "_staging": None}


class PushOwnFiles(tune.Callback):
    """For a sweep on URI storage: uploads the launcher's own files of its local copy (trial records, a search's
    state) that changed, when a trial starts or ends and at most every `every_s` seconds in between, so that
    `status` elsewhere sees them while the sweep runs. Tune's state goes up by Tune's own sync; the signatures
    with it (`SignState` writes them into Tune's staging directory)."""

    def __init__(self, where, every_s: float = 10.0) -> None:
        self.where, self.every_s = where, every_s
        self._last = 0.0

    def _push(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.where.push(exclude=(SIGNATURES,))  # Tune's sync carries the signatures of the state it uploads

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._push()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._push(force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._push(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._push(force=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._push(force=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"where": self.where, "every_s": self.every_s, "_last": 0.0}


class ProgressTable(tune.Callback):
    """Prints each trial's epoch results as they arrive and the whole table every `every_s` seconds."""

    def __init__(self, total: int, every_s: float = 60.0, design: Design | None = None) -> None:
        self.total = total
        self.every_s = every_s
        self.names = design.names() if design else []  # (path, column) of each factor: a trial's columns
        self._last = 0.0
        self._rows: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # picklable with the experiment state (resume)
        return {"total": self.total, "every_s": self.every_s, "names": self.names, "_last": 0.0, "_rows": {}}

    def _row(self, trial) -> dict[str, Any]:
        env = TrialEnvelope.of(trial.config)
        flat = env.config.flat()
        row = self._rows.setdefault(env.trial_id, {
            "trial_id": env.trial_id, **{col: flat.get(path) for path, col in self.names},
            "seed": env.resolved.seed, "retries": 0,
        })
        row["status"] = trial.status
        return row

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = self._row(trial)
        row.update(epochs=result.get("epoch"), final_test_top1=result.get("test_top1"),
                   best_test_top1=result.get("best_test_top1"), node=result.get("node_ip"),
                   retries=result.get("retries", 0))
        Console(highlight=False).print(progress_line(row, result, [c for _, c in self.names]), markup=False,
                                       soft_wrap=True)
        self._maybe_table(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._row(trial)["status"] = "TERMINATED"
        self._maybe_table(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._row(trial)["status"] = "ERROR"
        Console(highlight=False).print(f"[{TrialEnvelope.of(trial.config).trial_id}] failed; see {trial.path}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        Console(highlight=False).print(
            f"[{TrialEnvelope.of(trial.config).trial_id}] crashed; restarting from its last checkpoint")

    def _maybe_table(self, trials, force: bool = False) -> None:
        now = time.monotonic()
        small = len(trials) <= FULL_TABLE
        if not (force and small) and now - self._last < self.every_s:
            return
        self._last = now
        counts = Counter(t.status for t in trials)
        title = f"{counts['TERMINATED']}/{self.total} trials finished"
        if small:
            for t in trials:
                self._row(t)
            rows = list(self._rows.values())
        else:
            rows = [self._row(t) for t in trials if t.status == "RUNNING"]
            title += f"; the {len(rows)} running shown (" + ", ".join(
                f"{n} {state.lower()}" for state, n in sorted(counts.items())) + "; all: `bvit-sweep status`)"
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(render_table(rows, title=title, factors=[c for _, c in self.names]))
