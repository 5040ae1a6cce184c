"""The accuracy-parameter frontier and the sweep's comparisons, from its trial table and its design.

The design (orchestrator.cells) comes from the spec: a row per (cell, arm) -- one value of every factor the
spec varies -- with seeds averaged; every interval is orchestrator.stats' (95 %). Outputs:
  * frontier.csv: a column per varied factor, then params and FLOPs of the model built for that row, mean/std
    test top-1 and its interval, seeds, how many were still improving at their end (`still_improving`,
    orchestrator.curves), whether the row is on the Pareto frontier (no row with fewer or equal parameters is
    more accurate), and for every arm but the baseline (the spec's `compare`): the baseline it is compared
    with, the recovered fraction (arm top-1 / baseline top-1) and gap in points (baseline - arm), each with its
    interval from the per-seed values, Welch's p, its Holm adjustment over the table's comparisons
    (`welch_p_holm`) and a verdict in words.
  * slope.json (with `compare.trend`): the recovered fraction's slope per doubling of that factor, with its
    interval, one intercept per group of the other factors.
  * frontier.png (top-1 vs parameters, log x, one colour per arm), top1_vs_<factor>.png (top-1 vs the first
    numeric factor of the cells, a panel per value of the others, a line per arm), recovered.png (recovered
    fraction and gap per cell); error bars are 95 % intervals.
  * curves.png (when the trials' curves are given: curves.csv): train loss and test top-1 per epoch, a panel
    per cell, a line per arm.

A fine-tuning sweep (trials with a `finetune` section) gets the transfer table instead: the same rows with
trainable parameters and the merged-LoRA top-1, each arm's gap to the baseline (e.g. `compare:
{axis: finetune.method, baseline: full}`), in transfer.csv and transfer.png (top-1 vs trainable parameters).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from orchestrator.cells import Bound, Design, design_of_table, text
from orchestrator.curves import best_groups, count_still_improving, plot_curves, still_improving_line
from orchestrator.stats import compare, corrected_verdict, describe, holm, trend_slope, verdict

__all__ = ["frontier_table", "frontier_slope", "headline", "write_frontier", "transfer_table", "write_transfer",
           "summarize", "read_trials", "Summary", "METRIC"]

METRIC = "final_test_top1"
_COMPARED = ("gap_ci_low", "gap_ci_high", "recovered_ci_low", "recovered_ci_high", "welch_p")


class Summary(NamedTuple):
    kind: str  # 'frontier' or 'transfer'
    cells: pd.DataFrame
    paths: dict[str, Path]
    headline: str  # the answer in a few lines, intervals and verdicts in words
    slope: dict[str, Any] | None  # stats.trend_slope's result (with a declared trend)
    factors: list[str] = []  # the table's factor columns (orchestrator.cells), in spec order


def _with_ci(cells: pd.DataFrame) -> pd.DataFrame:
    """top1_ci_low/high from the per-seed `values` column (None below two seeds)."""
    ci = [describe(v) for v in cells["values"]]
    return cells.assign(top1_ci_low=[c["ci_low"] for c in ci], top1_ci_high=[c["ci_high"] for c in ci])


def _bound(df: pd.DataFrame, design: Design | Bound | None) -> tuple[pd.DataFrame, Bound]:
    """(`df` with its factor columns under the design's names, the design bound to it)."""
    if not isinstance(design, Bound):
        design = (design if design is not None else design_of_table(df)).bind(df)
    return design.rename(df), design


def _group(df: pd.DataFrame, bound: Bound, **agg: tuple[str, Any]) -> pd.DataFrame:
    """One row per (cell, arm): the factors' columns in spec order, then `agg`; rows in the table's order.
    A row whose trials built models of different sizes pools something the design cannot see: a warning."""
    import warnings

    from orchestrator.errors import InputWarning

    keys = bound.columns
    key_text = df[keys].map(text) if keys else pd.DataFrame(index=df.index)
    groups = df.assign(_key=key_text.agg("\x1f".join, axis=1) if keys else "")
    out = groups.groupby("_key", sort=False).agg(**{k: (k, "first") for k in keys}, **agg,
                                                   _sizes=("params", lambda p: sorted({text(v) for v in p})))
    for _, row in out.iterrows():
        if len(row["_sizes"]) > 1:
            warnings.warn(f"{bound.label(row)}: its trials built models of {' and '.join(row['_sizes'])} parameters; "
                          "a factor the sweep varies is not in the analysis, so they are pooled: declare it as "
                          "an axis (or rewrite trials.csv with `bvit-sweep status`)", InputWarning, stacklevel=3)
    return out.drop(columns="_sizes").reset_index(drop=True)


def _compare_arms(cells: pd.DataFrame, bound: Bound, **words: str) -> list[dict[str, Any]]:
    """Each arm against the baseline arm of its cell: baseline, gap, recovered fraction, Welch and Holm,
    verdict (`words`: extra names for the verdict); empty entries for baseline rows and unpaired ones."""
    base = {bound.cell_key(c): c for _, c in cells.iterrows() if bound.is_baseline(c)}
    out = []
    for _, c in cells.iterrows():
        ref = None if bound.arm_column is None or bound.is_baseline(c) else base.get(bound.cell_key(c))
        if ref is None or not ref["top1_mean"]:
            out.append({"baseline": None, "recovered_fraction": None, "gap_points": None,
                        **dict.fromkeys(_COMPARED), "verdict": ""})
            continue
        cmp = compare(arm=c["values"], baseline=ref["values"])
        arm, against = bound.arm(c), bound.baseline_label()
        out.append({"baseline": against, "recovered_fraction": c["top1_mean"] / ref["top1_mean"],
                    "gap_points": ref["top1_mean"] - c["top1_mean"], **{k: cmp[k] for k in _COMPARED},
                    "verdict": verdict(cmp["gap_ci_low"], cmp["gap_ci_high"],
                                       above=words.get("above", f"{arm} below {against}"),
                                       below=words.get("below", f"{arm} above {against}"))})
    _correct_for_multiplicity(out)
    return out


def frontier_table(rows: list[dict[str, Any]] | pd.DataFrame, design: Design | Bound | None = None,
                   metric: str = METRIC) -> pd.DataFrame:
    """A row per (cell, arm) of the finished trials, with Pareto flags and each arm's comparison with its cell's
    baseline. `design`: the spec's (orchestrator.cells.design_of); None reads one from the table's columns."""
    df = _finished(rows, metric)
    df = df.assign(**{metric: pd.to_numeric(df[metric]), "params": pd.to_numeric(df["params"]),
                      "flops_per_image": pd.to_numeric(df["flops_per_image"])})
    df, bound = _bound(df, design)
    cells = _group(_with_flags(df), bound, params=("params", "first"), flops_per_image=("flops_per_image", "first"),
                   top1_mean=(metric, "mean"), top1_std=(metric, "std"), seeds=(metric, "size"),
                   still_improving=("still_improving", count_still_improving), values=(metric, list))
    cells["top1_std"] = cells["top1_std"].fillna(0.0)
    best_so_far, on = -math.inf, {}
    for i, c in cells.sort_values(["params", "top1_mean"], ascending=[True, False]).iterrows():
        on[i] = c["top1_mean"] > best_so_far
        best_so_far = max(best_so_far, c["top1_mean"])
    cells["on_frontier"] = pd.Series(on)
    compared = _compare_arms(cells, bound)
    return pd.concat([_with_ci(cells), pd.DataFrame(compared, index=cells.index)], axis=1).drop(columns="values")


def _correct_for_multiplicity(rows: list[dict[str, Any]]) -> None:
    """Add `welch_p_holm` (Holm over the table's comparisons, stats.holm) to each row, after `welch_p`, and
    qualify each verdict that holds before correction only."""
    adjusted = holm([r["welch_p"] for r in rows])
    m = sum(p is not None for p in adjusted)
    for r, p in zip(rows, adjusted, strict=True):
        words = r.pop("verdict")
        r.update(welch_p_holm=p, verdict=corrected_verdict(words, p, m=m) if words else words)


def frontier_slope(cells: pd.DataFrame, bound: Bound) -> dict[str, Any] | None:
    """stats.trend_slope of the compared rows' recovered fractions over the design's trend factor (one
    intercept per arm and value of the other cell factors); None without a declared trend or with fewer than
    two of its values compared."""
    x = bound.trend_column
    if x is None or "recovered_fraction" not in cells:
        return None
    others = [c for c in bound.cell_columns if c not in bound.tied(x)]  # heads zipped with width: no intercept
    rec = cells[cells["recovered_fraction"].notna()]
    if rec[x].map(text).nunique() < 2:
        return None
    return trend_slope([(c[x], (bound.arm(c),) + tuple(text(c[o]) for o in others), c["recovered_fraction"])
                        for _, c in rec.iterrows()], factor=x)


def _interval(low: Any, high: Any, fmt: str) -> str:
    return "no interval (one seed)" if low is None or low != low else f"95 % CI [{fmt.format(low)}, {fmt.format(high)}]"


def _p(c: pd.Series) -> str:
    """`, Welch p 0.012 (Holm 0.048)` where the comparison has a test."""
    p, holm = c.get("welch_p"), c.get("welch_p_holm")
    return "" if p is None or p != p else f", Welch p {p:.3g} (Holm {holm:.3g})"


def headline(cells: pd.DataFrame, bound: Bound, slope: dict[str, Any] | None = None, *, convergence: str = "") -> str:
    """The frontier's answer in words: `convergence` (curves.still_improving_line: were the accuracies still
    rising?), each arm's gap to its baseline with its interval, p-values and verdict, then the trend slope;
    with no comparison, each row's top-1 with its interval."""
    lines = [convergence] if convergence else []
    compared = cells[cells["recovered_fraction"].notna()] if "recovered_fraction" in cells else cells.iloc[:0]
    for _, c in compared.iterrows():
        lines.append(f"{bound.label(c)} vs {c['baseline']}: gap {c['gap_points']:.2f} points "
                     f"({_interval(c['gap_ci_low'], c['gap_ci_high'], '{:.2f}')}), recovered {c['recovered_fraction']:.3f} "
                     f"({_interval(c['recovered_ci_low'], c['recovered_ci_high'], '{:.3f}')}), "
                     f"{c['seeds']} seeds{_p(c)}: {c['verdict']}")
    if compared.empty:
        if bound.arm_column is not None:
            lines.append(f"no arm has a {bound.baseline_label()} partner in its cell")
        for _, c in cells.iterrows():
            lines.append(f"{bound.label(c)}: top-1 {c['top1_mean']:.2f} % "
                         f"({_interval(c['top1_ci_low'], c['top1_ci_high'], '{:.2f}')}), {c['seeds']} seeds")
    if slope is not None and slope["slope"] is not None:
        lines.append(f"{slope['factor']} slope (recovered fraction per doubling of {slope['factor']}): {slope['slope']:+.4f} "
                     f"({_interval(slope['ci_low'], slope['ci_high'], '{:+.4f}')}, df {slope['df']}): {slope['verdict']}")
    return "\n".join(lines)


MAX_TICKS = 16  # a numeric axis gets a tick per value up to this many
MAX_ANNOTATED = 40  # frontier.png names every cell up to this many, then only the cells on the frontier


def _arms(cells: pd.DataFrame, bound: Bound) -> list[tuple[str, pd.DataFrame]]:
    """(arm label, its rows) for each arm in table order; one unnamed arm without a comparison."""
    if not bound.arm_columns:
        return [("", cells)]
    labels = cells.apply(bound.arm, axis=1)
    return [(name, cells[labels == name]) for name in dict.fromkeys(labels)]


def _numeric(values: pd.Series) -> bool:
    return pd.to_numeric(values, errors="coerce").notna().all()


def write_frontier(cells: pd.DataFrame, bound: Bound, out_dir: Path, *, title: str = "",
                   slope: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write frontier.csv, slope.json (when `slope`, `frontier_slope`'s result, is given) and the PNG plots
    into `out_dir`; returns {name: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"frontier.csv": out_dir / "frontier.csv"}
    _to_csv(cells, bound, paths["frontier.csv"])
    if slope is not None:
        paths["slope.json"] = out_dir / "slope.json"
        paths["slope.json"].write_text(json.dumps(slope, indent=1) + "\n")
    markers = "os^vDP*X"

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, (arm, g) in enumerate(_arms(cells, bound)):
        ax.errorbar(g["params"], g["top1_mean"], yerr=_yerr(g), linestyle="none", label=arm or None, capsize=3,
                    marker=markers[k % len(markers)], color=f"C{k}")
        for _, c in g.iterrows():  # every cell named while the names can be read; past that the frontier's
            if bound.cell_columns and (len(cells) <= MAX_ANNOTATED or c["on_frontier"]):
                ax.annotate(bound.cell_label(c, sep="·").replace(" ", ""), (c["params"], c["top1_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    front = cells[cells["on_frontier"].astype(bool)].sort_values("params")
    if len(front) >= 2:  # a frontier of one cell is a point, not a line: no legend entry for what is not drawn
        ax.plot(front["params"], front["top1_mean"], color="grey", linestyle="--", linewidth=1, label="Pareto frontier")
    ax.set(xscale="log", xlabel="parameters", ylabel="test top-1 (%)", title=title or "accuracy vs parameters")
    _count_ticks(ax, cells["params"])
    ax.grid(alpha=.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths["frontier.png"] = out_dir / "frontier.png"
    fig.savefig(paths["frontier.png"], dpi=120)
    plt.close(fig)

    x = next((c for c in bound.cell_columns if cells[c].map(text).nunique() > 1 and _numeric(cells[c])), None)
    if x is not None:
        others = [c for c in bound.cell_columns if c != x]
        panels, shown = best_groups(list(cells.groupby(others, sort=False)) if others else [((), cells)],
                                    cells.groupby(others, sort=False)["top1_mean"].max() if others else {})
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.8, 3.2), sharey=True, squeeze=False)
        for ax, (key, p) in zip(axes[0], panels, strict=True):
            for k, (arm, g) in enumerate(_arms(p, bound)):
                g = g.assign(_x=pd.to_numeric(g[x])).sort_values("_x")
                ax.errorbar(g["_x"], g["top1_mean"], yerr=_yerr(g), label=arm or None, capsize=3,
                            marker=markers[k % len(markers)], color=f"C{k}")
            key = key if isinstance(key, tuple) else (key,)
            ax.set(title=" · ".join(f"{o} {text(v)}" for o, v in zip(others, key, strict=True)) or title, xlabel=x)
            if (xs := sorted(pd.to_numeric(cells[x]).unique())) and len(xs) <= MAX_TICKS:  # else matplotlib's
                ax.set_xticks(xs)
            ax.grid(alpha=.3)
        axes[0][0].set_ylabel("test top-1 (%)")
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        if shown:
            fig.suptitle(f"{shown} panels by best top-1 (all in frontier.csv)", fontsize=9)
        fig.tight_layout()
        paths[f"top1_vs_{x}.png"] = out_dir / f"top1_vs_{x}.png"
        fig.savefig(paths[f"top1_vs_{x}.png"], dpi=120)
        plt.close(fig)

    rec = cells[cells["recovered_fraction"].notna()] if "recovered_fraction" in cells else cells.iloc[:0]
    if not rec.empty:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
        t = bound.trend_column
        lines = [c for c in bound.cell_columns if c not in bound.tied(t)]
        keyed = rec.assign(_line=rec.apply(lambda c: " · ".join(p for p in (bound.arm(c), " · ".join(
            f"{o} {text(c[o])}" for o in lines)) if p), axis=1))
        labels = list(dict.fromkeys(rec.apply(bound.cell_label, axis=1)))
        for name, g in keyed.groupby("_line", sort=False):
            xs = pd.to_numeric(g[t]) if t else g.apply(lambda c: labels.index(bound.cell_label(c)), axis=1)
            g = g.assign(_x=xs).sort_values("_x")
            a1.errorbar(g["_x"], g["recovered_fraction"], yerr=_yerr(g, "recovered_fraction", "recovered_ci"),
                        marker="o", capsize=3, label=name or None, linestyle="-" if t else "none")
            a2.errorbar(g["_x"], g["gap_points"], yerr=_yerr(g, "gap_points", "gap_ci"), marker="o", capsize=3,
                        label=name or None, linestyle="-" if t else "none")
        against = bound.baseline_label()
        a1.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        a1.set(ylabel=f"top-1 / top-1 of {against}", title="recovered fraction (95 % CI)")
        a2.axhline(0.0, color="grey", linewidth=1, linestyle="--")
        a2.set(ylabel=f"{against} − arm (points)", title="gap (95 % CI; includes 0: inconclusive)")
        for a in (a1, a2):
            if t:
                values = sorted(pd.to_numeric(rec[t]).unique())
                a.set(xscale="log", xlabel=t)
                if len(values) <= MAX_TICKS:
                    a.minorticks_off()
                    a.set_xticks(values, labels=[text(v) for v in values])
            elif len(labels) <= MAX_TICKS:
                a.set_xticks(range(len(labels)), labels=labels, rotation=20, fontsize=7, ha="right")
            else:  # too many cells to name on an axis: their order in frontier.csv
                a.set_xlabel(f"cell (frontier.csv's order, {len(labels)} cells)")
            a.grid(alpha=.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.tight_layout()
        paths["recovered.png"] = out_dir / "recovered.png"
        fig.savefig(paths["recovered.png"], dpi=120)
        plt.close(fig)
    return paths


def _to_csv(cells: pd.DataFrame, bound: Bound, path: Path) -> None:
    """Measures to 4 decimals; the factors' values as every label shows them (orchestrator.cells.text: 64, not
    64.0000; a rank of 8 read back beside blanks, 8, not 8.0)."""
    cells.assign(**{c: cells[c].map(text) for c in bound.columns}).to_csv(path, index=False, float_format="%.4f")


def _yerr(g: pd.DataFrame, mean: str = "top1_mean", ci: str = "top1_ci"):
    """Asymmetric error bars to the 95 % interval (2, cells) where a cell has one; None draws none."""
    low, high = (pd.to_numeric(g.get(f"{ci}_{s}"), errors="coerce") for s in ("low", "high"))
    if low is None or high is None or low.isna().all():
        return None
    return [(g[mean] - low).fillna(0.0).clip(lower=0).to_numpy(), (high - g[mean]).fillna(0.0).clip(lower=0).to_numpy()]


def _compact(n: float) -> str:
    """4570 -> '4.6k', 1_250_000 -> '1.25M': short tick labels."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _count_ticks(ax, values: pd.Series, min_gap: float = 0.09) -> None:
    """Log-x ticks at the plotted counts themselves, labelled compactly; a count closer than `min_gap` of the
    axis width to the previous labelled one is left unlabelled, so labels never overlap."""
    from matplotlib.ticker import NullFormatter, NullLocator

    counts = sorted({float(v) for v in values if v == v and v > 0})
    if not counts:
        return
    lo, hi = math.log10(counts[0]), math.log10(counts[-1])
    pad = max(0.15, (hi - lo) * 0.08)  # room for the annotations at both ends
    span = hi - lo + 2 * pad
    kept: list[float] = []
    for v in counts:
        if not kept or (math.log10(v) - math.log10(kept[-1])) / span >= min_gap:
            kept.append(v)
    ax.set_xlim(10 ** (lo - pad), 10 ** (hi + pad))
    ax.set_xticks(kept, labels=[_compact(v) for v in kept])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _with_flags(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `still_improving` column (blank where the trial table has none: results from before it)."""
    return df if "still_improving" in df else df.assign(still_improving=None)


def _finished(rows: list[dict[str, Any]] | pd.DataFrame, metric: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty or metric not in df:
        raise ValueError(f"no finished trials with {metric!r} to build a table from")
    df = df[(df["status"] == "TERMINATED") & df[metric].notna()] if "status" in df else df[df[metric].notna()]
    if df.empty:
        raise ValueError("no TERMINATED trial has a test accuracy yet; run or resume the sweep first")
    return df


def transfer_table(rows: list[dict[str, Any]] | pd.DataFrame, design: Design | Bound | None = None,
                   metric: str = METRIC) -> pd.DataFrame:
    """A row per (cell, arm) of a fine-tuning sweep: trainable parameters and mean/std test top-1 over seeds
    (and the merged-LoRA top-1), each arm against its cell's baseline (the spec's `compare`), fewest trainable
    parameters first."""
    df = _with_flags(_finished(rows, metric))
    if "trainable_params" not in df:
        raise ValueError("not a fine-tuning sweep: no trial has a finetune section")
    df = df.assign(merged_test_top1=pd.to_numeric(df.get("merged_test_top1"), errors="coerce"))
    df, bound = _bound(df, design)
    cells = _group(df, bound, trainable_params=("trainable_params", "first"), params=("params", "first"),
                   top1_mean=(metric, "mean"), top1_std=(metric, "std"),
                   merged_top1_mean=("merged_test_top1", "mean"), seeds=(metric, "size"),
                   still_improving=("still_improving", count_still_improving), values=(metric, list))
    cells["top1_std"] = cells["top1_std"].fillna(0.0)
    cells["trainable_fraction"] = pd.to_numeric(cells["trainable_params"]) / pd.to_numeric(cells["params"])
    compared = _compare_arms(cells, bound)
    cells = pd.concat([_with_ci(cells), pd.DataFrame(compared, index=cells.index)], axis=1).drop(columns="values")
    return cells.sort_values("trainable_params", kind="stable").reset_index(drop=True)


def write_transfer(cells: pd.DataFrame, bound: Bound, out_dir: Path, *, title: str = "") -> dict[str, Path]:
    """Write transfer.csv and transfer.png (top-1 vs trainable parameters, a colour per arm) into `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"transfer.csv": out_dir / "transfer.csv", "transfer.png": out_dir / "transfer.png"}
    _to_csv(cells, bound, paths["transfer.csv"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, g in _arms(cells, bound):
        ax.errorbar(g["trainable_params"], g["top1_mean"], yerr=_yerr(g), marker="o", linestyle="none",
                    label=arm or None, capsize=3)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="test top-1 (%)",
           title=title or "fine-tuning: accuracy vs trainable parameters")
    _count_ticks(ax, cells["trainable_params"])
    ax.grid(alpha=.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["transfer.png"], dpi=120)
    plt.close(fig)
    return paths


def transfer_headline(cells: pd.DataFrame, bound: Bound, *, convergence: str = "") -> str:
    """`convergence` (as in `headline`), then each arm against its baseline, with its interval, p-values and
    verdict."""
    compared = cells[cells["gap_points"].notna()]
    lines = [f"{bound.label(c)} ({100 * c['trainable_fraction']:.1f} % trainable): {c['gap_points']:.2f} points below "
             f"{c['baseline']} ({_interval(c['gap_ci_low'], c['gap_ci_high'], '{:.2f}')}), "
             f"{c['seeds']} seeds{_p(c)}: {c['verdict']}" for _, c in compared.iterrows()]
    if not lines:
        lines = [f"{bound.label(c)} ({100 * c['trainable_fraction']:.1f} % trainable): top-1 {c['top1_mean']:.2f} % "
                 f"({_interval(c['top1_ci_low'], c['top1_ci_high'], '{:.2f}')}), {c['seeds']} seeds"
                 for _, c in cells.iterrows()]
    return "\n".join(([convergence] if convergence else []) + lines)


def summarize(rows: list[dict[str, Any]] | pd.DataFrame, out_dir: Path, *, title: str = "",
              curves: pd.DataFrame | None = None, design: Design | None = None) -> Summary:
    """The sweep's summary: table, files and headline; kind 'transfer' for a fine-tuning sweep, else 'frontier'.
    `curves`: the trials' learning curves (curves.csv's table), plotted in curves.png; None: no curves.png.
    `design`: the spec's (orchestrator.cells.design_of); None reads one from the table.

    Raises ValueError when no trial has finished yet.
    """
    df = pd.DataFrame(rows)
    done, bound = _bound(_finished(df, METRIC), design)
    df = bound.rename(df)
    convergence = still_improving_line(done, label=bound.label)
    if "trainable_params" in df and df["trainable_params"].notna().any():
        cells = transfer_table(df, bound)
        paths = write_transfer(cells, bound, out_dir, title=title)
        _plot_curves(paths, curves, done, out_dir, bound, title=title)
        return Summary("transfer", cells, paths, transfer_headline(cells, bound, convergence=convergence), None,
                       bound.columns)
    cells = frontier_table(df, bound)
    slope = frontier_slope(cells, bound)
    paths = write_frontier(cells, bound, out_dir, title=title, slope=slope)
    _plot_curves(paths, curves, done, out_dir, bound, title=title)
    return Summary("frontier", cells, paths, headline(cells, bound, slope, convergence=convergence), slope,
                   bound.columns)


def _plot_curves(paths: dict[str, Path], curves: pd.DataFrame | None, done: pd.DataFrame, out_dir: Path,
                 bound: Bound, *, title: str) -> None:
    """curves.png of the finished trials (`done`) into `paths`, when their curves are given: a panel per cell,
    a line per arm."""
    if curves is None or "trial_id" not in done:
        return
    mine = bound.rename(curves[curves["trial_id"].astype(str).isin(done["trial_id"].astype(str))])
    if (path := plot_curves(mine, out_dir / "curves.png", panel=bound.cell_label, line=bound.arm,
                            title=title)) is not None:
        paths["curves.png"] = path


def read_trials(path: Path) -> pd.DataFrame:
    """A committed results/<sweep>/trials.csv as a table; ValueError (one line) when missing or malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a trials.csv written by `bvit-sweep launch`")
    try:
        df = pd.read_csv(path, dtype={"trial_id": str})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in ("trial_id", "status", "params", "flops_per_image", METRIC) if c not in df]
    if missing:
        raise ValueError(f"{path}: not a trials table (no column {', '.join(missing)})")
    return df
