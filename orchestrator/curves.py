"""Learning curves: each trial's epochs as a table, whether it was still improving when it ended, the plot.

    curve = epoch_curve(records, eval_every=2, epochs=6)   # [{epoch, train_loss, test_loss, test_top1, test_top5}]
    still_improving(curve, Convergence())                  # True, False, or None (fewer than two values)
    table = curve_table(rows, curves, columns)             # curves.csv: a trial's cell columns, one line per epoch
    plot_curves(table, path, panel=bound.cell_label, line=bound.arm)   # orchestrator.cells: a panel per cell

Convergence is reported, not assumed: a trial is still improving when its `Convergence.metric` got better,
between the last two epochs it was recorded at, by more than `min_gain` of its value per epoch (the spec's
`convergence`). Its final accuracy is then not the one a longer run would reach; trials.csv's
`still_improving`, frontier.csv's count per cell and the headline say so.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.envelope import FAILED_KEY
from orchestrator.spec import METRICS, Convergence

if TYPE_CHECKING:  # pandas is imported where a table is made: `status` reads records without it
    import pandas as pd

__all__ = ["CURVES", "CURVE_METRICS", "finite", "epoch_curve", "still_improving", "curve_table", "read_curves", "flag",
           "count_still_improving", "still_improving_line", "plot_curves", "MAX_PANELS", "best_groups"]

CURVES = "curves.csv"  # beside trials.csv in results/<sweep>/
CURVE_METRICS = ("train_loss", "test_loss", "test_top1", "test_top5")
MAX_PANELS = 12  # a plot's panels at most: a 1,000-cell grid gets its best cells drawn, every cell in the CSVs
_SCORED = ("test_loss", "test_top1", "test_top5")  # fresh on scored epochs only; the records between repeat them


def finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def epoch_curve(records: Iterable[dict[str, Any]], *, eval_every: int = 1,
                epochs: int | None = None) -> list[dict[str, Any]]:
    """A trial's curve from its per-epoch records (Ray's result.json lines): one dict per epoch, in order,
    with CURVE_METRICS (None where not measured) and the `node` (IP) that trained it (a retry may move).

    An epoch reported twice (a restart from an earlier checkpoint) keeps its last record. A test metric is
    kept only on the epochs the test set was scored (every `eval_every`-th and the last, `epochs`):
    `bvit.engine.fit` repeats the last score in the records between.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in records:
        epoch = finite(r.get("epoch"))
        if epoch is None or isinstance(r.get(FAILED_KEY), str):
            continue
        e = int(epoch)
        scored = e % eval_every == 0 or e == epochs
        by_epoch[e] = {"epoch": e, **{k: finite(r.get(k)) if scored or k not in _SCORED else None
                                      for k in CURVE_METRICS}, "node": r.get("node_ip")}
    return [by_epoch[e] for e in sorted(by_epoch)]


def still_improving(curve: Sequence[dict[str, Any]], convergence: Convergence) -> bool | None:
    """Whether `convergence.metric` got better by more than `convergence.min_gain` of its value per epoch
    between the last two epochs the curve records it at; None when it records fewer than two."""
    metric = convergence.metric
    points = [(r["epoch"], r[metric]) for r in curve if r.get(metric) is not None]
    if len(points) < 2:
        return None
    (e0, v0), (e1, v1) = points[-2:]
    gain = v1 - v0 if METRICS[metric] == "max" else v0 - v1
    if v0 == 0:
        return gain > 0
    return gain / abs(v0) / (e1 - e0) > convergence.min_gain


def curve_table(rows: Sequence[dict[str, Any]], curves: dict[str, list[dict[str, Any]]],
                columns: Sequence[str]) -> pd.DataFrame:
    """curves.csv's table: for each row (a trial, in row order) its `columns` (trial_id, the cell and axis
    values) repeated on one line per epoch of its curve, then epoch and CURVE_METRICS."""
    lines = [{**{c: row.get(c) for c in columns}, **point}
             for row in rows for point in curves.get(row["trial_id"], [])]
    import pandas as pd

    return pd.DataFrame(lines, columns=[*columns, "epoch", *CURVE_METRICS, "node"])


def read_curves(path: Path) -> pd.DataFrame | None:
    """A committed results/<sweep>/curves.csv, or None where there is none (results from before it was
    written); ValueError (one line) when it is not a curves table."""
    if not path.is_file():
        return None
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"trial_id": str})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in ("trial_id", "epoch", "train_loss") if c not in df]
    if missing:
        raise ValueError(f"{path}: not a curves table (no column {', '.join(missing)})")
    return df


def flag(value: Any) -> bool | None:
    """A `still_improving` value as read back (True/False, 'True'/'False' from a CSV, blank) as a bool or None."""
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).strip().lower())


def count_still_improving(values: Iterable[Any]) -> int | None:
    """How many of a cell's trials were still improving; None when none of them has a flag."""
    flags = [f for f in map(flag, values) if f is not None]
    return sum(flags) if flags else None


def still_improving_line(trials: pd.DataFrame, *, label: Callable[[Any], str]) -> str:
    """The headline's sentence on convergence, from the finished trials' `still_improving`: how many were
    still improving at the end and where (each trial named by `label(row)`, e.g. its cell and arm)."""
    if "still_improving" not in trials:
        return "convergence not recorded (the trial table has no still_improving column)"
    flags = trials["still_improving"].map(flag)
    known = trials[flags.notna()].assign(still_improving=flags[flags.notna()].astype(bool))
    unknown = len(trials) - len(known)
    if known.empty:
        return "convergence unknown: no finished trial recorded two epochs to compare"
    without = f"; {unknown} more without two recorded epochs" if unknown else ""
    n = int(known["still_improving"].sum())
    if n == 0:
        return f"none of the {len(known)} trials was still improving at the end{without}"
    named = known.assign(_label=known.apply(label, axis=1))
    cells = [f"{name}: {int(g['still_improving'].sum())} of {len(g)}"
             for name, g in named.groupby("_label", sort=True) if g["still_improving"].any()]
    return (f"{n} of {len(known)} trials were still improving at the end: accuracies are not converged "
            f"({'; '.join(cells)}{without})")


def best_groups(groups: list[tuple[Any, pd.DataFrame]], scores: Mapping[Any, float],
                limit: int = MAX_PANELS) -> tuple[list[tuple[Any, pd.DataFrame]], str]:
    """At most `limit` of `groups` ((key, rows) pairs): all of them in their order when they fit, else the
    `limit` whose key has the highest score in `scores` (missing or NaN last), kept in their order; and a note
    saying so ('' when all fit)."""
    if len(groups) <= limit:
        return groups, ""
    score = [float(scores.get(key, math.nan)) for key, _ in groups]
    ranked = sorted(range(len(groups)), key=lambda i: (math.isnan(score[i]), -score[i] if score[i] == score[i] else 0.0))
    return [groups[i] for i in sorted(ranked[:limit])], f"best {limit} of {len(groups)}"


def _final_top1(curves: pd.DataFrame) -> pd.Series:
    """Each panel's score: its best line's mean test top-1 at the panel's last scored epoch (one groupby)."""
    scored = curves.dropna(subset=["test_top1"])
    last = scored[scored["epoch"] == scored.groupby("_panel")["epoch"].transform("max")]
    return last.groupby(["_panel", "_line"])["test_top1"].mean().groupby(level=0).max()


def plot_curves(curves: pd.DataFrame, path: Path, *, panel: Callable[[Any], str], line: Callable[[Any], str],
                title: str = "") -> Path | None:
    """curves.png: one column of panels per `panel(row)` (e.g. a cell, `width 64 · steps 4`), one line per
    `line(row)` (e.g. an arm, `arch bvit`), in the table's order:
    train loss per epoch (top row) and test top-1 (bottom row, when a trial was scored more than once), the
    mean over seeds with a band from the lowest to the highest seed. More than `MAX_PANELS` panels: those whose
    best line ends highest in test top-1, and the title says how many of how many. None when there is no curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if curves is None or curves.empty:
        return None
    scored = curves.dropna(subset=["test_top1"]).groupby("trial_id")["epoch"].nunique()
    metrics = [("train_loss", "train loss")] + ([("test_top1", "test top-1 (%)")] if (scored > 1).any() else [])
    curves = curves.assign(_panel=curves.apply(panel, axis=1), _line=curves.apply(line, axis=1))
    kept, shown = best_groups([(key, None) for key in dict.fromkeys(curves["_panel"])], _final_top1(curves))
    groups = list(curves[curves["_panel"].isin([key for key, _ in kept])].groupby("_panel", sort=False))
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(max(4.8, 3.2 * len(groups)), 2.8 * len(metrics)),
                             sharex="col", sharey="row", squeeze=False)
    for j, (key, g) in enumerate(groups):
        for i, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            for k, (name, h) in enumerate(g.groupby("_line", sort=False)):
                per_epoch = h.dropna(subset=[metric]).groupby("epoch")[metric]
                mean = per_epoch.mean()
                if mean.empty:
                    continue
                drawn, = ax.plot(mean.index, mean.to_numpy(), marker="o", markersize=3, color=f"C{k}",
                                 label=name or None)
                ax.fill_between(mean.index, per_epoch.min().to_numpy(), per_epoch.max().to_numpy(),
                                color=drawn.get_color(), alpha=.2, linewidth=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=.3)
            if i == 0:
                ax.set_title(key, fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel(ylabel)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    shown = f"; {shown} cells by final test top-1 (all in {CURVES})" if shown else ""
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, band: seed range{shown}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
