"""The launcher's Tune callbacks that keep the sweep directory readable as data and resumable by its owner.

    TrialRecords(sweep_dir)   bvit_trials/<id>.json: each trial's state as JSON (`orchestrator.records`)
    SignState(sweep_dir)      bvit_signatures.json: this user's HMAC of Tune's pickled state, with each save
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.records import record_trial
from orchestrator.signing import sign_state

__all__ = ["SignState", "TrialRecords"]


class TrialRecords(tune.Callback):
    """Keeps `bvit_trials/<id>.json` current: every trial at the first step of a launch, then each trial as it
    starts, reports, fails, restarts or ends, and all of them when the experiment ends."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        self._all_written = False

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

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: a resumed launch writes all again
        return {"sweep_dir": self.sweep_dir, "_all_written": False}


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
