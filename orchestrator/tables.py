"""Trial tables a person can read: one line per trial event (`progress_line`) and the table (`render_table`), for
the launcher's live progress (`orchestrator.callbacks.ProgressTable`) and `bvit-sweep status`. No Ray here: `status`
starts in the time it takes to import pandas and rich, not Ray Tune."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from orchestrator.cells import MEASURED, text

__all__ = ["render_table", "progress_line", "factor_columns"]

UNSCORED = "–"  # an epoch the test set was not scored on (eval_every > 1)


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


def render_table(rows: list[dict[str, Any]], title: str = "", factors: list[str] | None = None,
                 max_rows: int | None = None) -> Table:
    """A rich table of trials: id, the sweep's factors (default: `factor_columns(rows)`), seed, state, epoch,
    top-1, best top-1, node, retries. Past `max_rows` (None: no limit) it keeps the trials that are not finished
    (running, pending, failed) and as many finished ones as fit, in their order, and says how many it left out."""
    factors = factor_columns(rows) if factors is None else list(factors)
    shown = range(len(rows)) if max_rows is None or len(rows) <= max_rows else _most_telling(rows, max_rows)
    table = Table(title=title, header_style="bold")
    for col in ("trial", *factors, "seed", "state", "epoch", "top-1", "best top-1", "node", "retries"):
        table.add_column(col, justify="left" if col in ("trial", "state", "node", *factors) else "right")
    def cell(r: dict[str, Any], key: str, fmt: str = "{}") -> str:
        v = r.get(key)
        return "" if v is None or v != v else text(v) if fmt == "{}" else fmt.format(v)

    for i in shown:
        r = rows[i]
        table.add_row(*(cell(r, k) for k in ("trial_id", *factors, "seed", "status", "epochs")),
                      cell(r, "final_test_top1", "{:.2f}"), cell(r, "best_test_top1", "{:.2f}"),
                      cell(r, "node"), cell(r, "retries"))
    if len(shown) < len(rows):
        left = [rows[i].get("status") for i in set(range(len(rows))) - set(shown)]
        what = "finished trials" if all(s == "TERMINATED" for s in left) else "trials"
        table.caption = f"... and {len(left):,} more {what} (`bvit-sweep status --all` lists every trial)"
    return table


def _most_telling(rows: list[dict[str, Any]], max_rows: int) -> list[int]:
    """The indices of at most `max_rows` of `rows`, in order: every unfinished trial (running, pending, failed)
    first, then as many finished ones as fit."""
    unfinished = [i for i, r in enumerate(rows) if r.get("status") != "TERMINATED"][:max_rows]
    finished = [i for i, r in enumerate(rows) if r.get("status") == "TERMINATED"][:max_rows - len(unfinished)]
    return sorted(unfinished + finished)
