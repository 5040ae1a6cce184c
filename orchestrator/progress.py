"""Live progress a person can read: one line per trial event, and a full trial table now and then."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray import tune
from rich.console import Console
from rich.table import Table

from orchestrator.cells import MEASURED, Design, text
from orchestrator.envelope import TrialEnvelope

__all__ = ["ProgressTable", "render_table", "progress_line"]

UNSCORED = "–"  # an epoch the test set was not scored on (eval_every > 1)
FULL_TABLE = 40  # trials: up to this many the table lists each one at every trial's end; past it, every
# `every_s` seconds, the running trials and the counts per state (a table of every trial at every trial's
# end made a 1,000-trial sweep render a million rows)


def _num(value: Any, fmt: str) -> str:
    return UNSCORED if value is None or value != value else fmt.format(value)


def factor_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that tell `rows` apart (orchestrator.cells: neither measured nor a trial's identity, and
    taking two values or more), in their order."""
    cols = dict.fromkeys(k for r in rows for k in r if k not in MEASURED and k not in ("trial_id", "seed"))
    return [c for c in cols if len({text(r.get(c)) for r in rows}) > 1]


def progress_line(row: dict[str, Any], result: dict[str, Any], factors: list[str] = ()) -> str:
    """One epoch of one trial: `[id] arch bvit · width 32 · steps 2 · seed 0 epoch 1: loss 2.104 top-1 – ...`."""
    what = " · ".join([f"{c} {text(row.get(c))}" for c in factors] + [f"seed {row['seed']}"])
    return (f"[{row['trial_id']}] {what} "
            f"epoch {row['epochs']}: loss {_num(result.get('train_loss'), '{:.3f}')} "
            f"top-1 {_num(result.get('test_top1'), '{:.2f}')} (best {_num(result.get('best_test_top1'), '{:.2f}')}) "
            f"{result.get('images_per_s') or 0:.0f} img/s on {row['node']}")


def render_table(rows: list[dict[str, Any]], title: str = "", factors: list[str] | None = None) -> Table:
    """A rich table of trials: id, the sweep's factors (default: `factor_columns(rows)`), seed, state, epoch,
    top-1, best top-1, node, retries."""
    factors = factor_columns(rows) if factors is None else list(factors)
    table = Table(title=title, header_style="bold")
    for col in ("trial", *factors, "seed", "state", "epoch", "top-1", "best top-1", "node", "retries"):
        table.add_column(col, justify="left" if col in ("trial", "state", "node", *factors) else "right")
    def cell(r: dict[str, Any], key: str, fmt: str = "{}") -> str:
        v = r.get(key)
        return "" if v is None or v != v else text(v) if fmt == "{}" else fmt.format(v)

    for r in rows:
        table.add_row(*(cell(r, k) for k in ("trial_id", *factors, "seed", "status", "epochs")),
                      cell(r, "final_test_top1", "{:.2f}"), cell(r, "best_test_top1", "{:.2f}"),
                      cell(r, "node"), cell(r, "retries"))
    return table


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
