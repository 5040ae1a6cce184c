"""The accuracy-parameter frontier and the paper's central comparison, from a sweep's trial table.

For each (arch, width, steps) cell, seeds are averaged; every interval is orchestrator.stats' (95 %). Outputs:
  * frontier.csv: one row per cell -- params, FLOPs, mean/std test top-1 and its interval, seeds, how many of
    them were still improving at their end (`still_improving`, orchestrator.curves), whether the cell is on
    the Pareto frontier (no cell with fewer or equal parameters is more accurate), and for bViT cells the
    recovered fraction (bViT top-1 / ViT top-1 at the same width and steps) and gap in points, each with its
    interval from the per-seed values, Welch's p, its Holm adjustment over the table's comparisons
    (`welch_p_holm`) and a verdict in words.
  * slope.json (two widths or more): the recovered fraction's slope per doubling of width, with its interval.
  * frontier.png (top-1 vs parameters, log x), steps.png (per width: top-1 vs steps, both arms),
    recovered.png (recovered fraction and gap vs width, one line per step count); error bars are 95 % intervals.
  * curves.png (when the trials' curves are given: curves.csv): train loss and test top-1 per epoch, per
    (width, steps), both arms.

A fine-tuning sweep (trials with a `finetune` section) gets the transfer table instead: per (pretrained
model, method, rank) cell, trainable parameters and mean/std test top-1 (and merged-LoRA top-1), seeds still
improving, each method's gap to full fine-tuning with Welch's and Holm's p, in transfer.csv and transfer.png
(top-1 vs trainable parameters), and curves.png per pretrained model, one line per method.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from orchestrator.curves import count_still_improving, plot_curves, still_improving_line
from orchestrator.stats import compare, corrected_verdict, describe, holm, verdict, width_slope

__all__ = ["frontier_table", "frontier_slope", "headline", "write_frontier", "transfer_table", "write_transfer",
           "summarize", "read_trials", "Summary", "METRIC"]

ARCH_COLORS = {"bvit": "tab:blue", "vit": "tab:orange"}  # each arm's colour in every plot

METRIC = "final_test_top1"
GAP_WORDS = dict(above="bViT below ViT", below="bViT above ViT")  # the gap is ViT - bViT


class Summary(NamedTuple):
    kind: str  # 'frontier' or 'transfer'
    cells: pd.DataFrame
    paths: dict[str, Path]
    headline: str  # the answer in a few lines, intervals and verdicts in words
    slope: dict[str, Any] | None  # stats.width_slope's result (frontier with two widths or more)


def _with_ci(cells: pd.DataFrame) -> pd.DataFrame:
    """top1_ci_low/high from the per-seed `values` column (None below two seeds)."""
    ci = [describe(v) for v in cells["values"]]
    return cells.assign(top1_ci_low=[c["ci_low"] for c in ci], top1_ci_high=[c["ci_high"] for c in ci])


def frontier_table(rows: list[dict[str, Any]] | pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Per-cell summary with Pareto flags and recovered fractions (finished trials only)."""
    df = _finished(rows, metric)
    df = df.assign(**{metric: pd.to_numeric(df[metric]), "params": pd.to_numeric(df["params"]),
                      "flops_per_image": pd.to_numeric(df["flops_per_image"])})
    cells = (_with_flags(df).groupby(["arch", "width", "steps"], as_index=False)
             .agg(params=("params", "first"), flops_per_image=("flops_per_image", "first"),
                  top1_mean=(metric, "mean"), top1_std=(metric, "std"), seeds=(metric, "size"),
                  still_improving=("still_improving", count_still_improving), values=(metric, list)))
    cells["top1_std"] = cells["top1_std"].fillna(0.0)
    cells = cells.sort_values(["params", "top1_mean"], ascending=[True, False]).reset_index(drop=True)
    best_so_far, on = -math.inf, []
    for top1 in cells["top1_mean"]:
        on.append(top1 > best_so_far)
        best_so_far = max(best_so_far, top1)
    cells["on_frontier"] = on
    vit = cells[cells["arch"] == "vit"].set_index(["width", "steps"])
    keys = ["gap_ci_low", "gap_ci_high", "recovered_ci_low", "recovered_ci_high", "welch_p"]
    rows = []
    for _, c in cells.iterrows():
        ref = vit.loc[(c["width"], c["steps"])] if c["arch"] == "bvit" and (c["width"], c["steps"]) in vit.index else None
        if ref is None or not ref["top1_mean"]:
            rows.append({"recovered_fraction": None, "gap_points": None, **dict.fromkeys(keys), "verdict": ""})
            continue
        cmp = compare(bvit=c["values"], vit=ref["values"])
        rows.append({"recovered_fraction": c["top1_mean"] / ref["top1_mean"], "gap_points": ref["top1_mean"] - c["top1_mean"],
                     **{k: cmp[k] for k in keys}, "verdict": verdict(cmp["gap_ci_low"], cmp["gap_ci_high"], **GAP_WORDS)})
    _correct_for_multiplicity(rows)
    cells = pd.concat([_with_ci(cells), pd.DataFrame(rows, index=cells.index)], axis=1).drop(columns="values")
    return cells.sort_values(["arch", "width", "steps"]).reset_index(drop=True)


def _correct_for_multiplicity(rows: list[dict[str, Any]]) -> None:
    """Add `welch_p_holm` (Holm over the table's comparisons, stats.holm) to each row, after `welch_p`, and
    qualify each verdict that holds before correction only."""
    adjusted = holm([r["welch_p"] for r in rows])
    m = sum(p is not None for p in adjusted)
    for r, p in zip(rows, adjusted, strict=True):
        words = r.pop("verdict")
        r.update(welch_p_holm=p, verdict=corrected_verdict(words, p, m=m) if words else words)


def frontier_slope(cells: pd.DataFrame) -> dict[str, Any]:
    """stats.width_slope of the bViT cells' recovered fractions (one intercept per step count)."""
    rec = cells[cells["recovered_fraction"].notna()]
    return width_slope([{"width": c["width"], "steps": c["steps"], "recovered": c["recovered_fraction"]}
                        for _, c in rec.iterrows()])


def _interval(low: Any, high: Any, fmt: str) -> str:
    return "no interval (one seed)" if low is None or low != low else f"95 % CI [{fmt.format(low)}, {fmt.format(high)}]"


def _p(c: pd.Series) -> str:
    """`, Welch p 0.012 (Holm 0.048)` where the comparison has a test."""
    p, holm = c.get("welch_p"), c.get("welch_p_holm")
    return "" if p is None or p != p else f", Welch p {p:.3g} (Holm {holm:.3g})"


def headline(cells: pd.DataFrame, slope: dict[str, Any] | None = None, *, convergence: str = "") -> str:
    """The frontier's answer in words: `convergence` (curves.still_improving_line: were the accuracies still
    rising?), each bViT-vs-ViT gap with its interval, p-values and verdict, then the width slope."""
    lines = [convergence] if convergence else []
    for _, c in cells[cells["recovered_fraction"].notna()].iterrows():
        lines.append(f"width {c['width']}, T={c['steps']}: gap {c['gap_points']:.2f} points "
                     f"({_interval(c['gap_ci_low'], c['gap_ci_high'], '{:.2f}')}), recovered {c['recovered_fraction']:.3f} "
                     f"({_interval(c['recovered_ci_low'], c['recovered_ci_high'], '{:.3f}')}), "
                     f"{c['seeds']} seeds{_p(c)}: {c['verdict']}")
    if slope is not None and slope["slope"] is not None:
        lines.append(f"width slope (recovered fraction per doubling of width): {slope['slope']:+.4f} "
                     f"({_interval(slope['ci_low'], slope['ci_high'], '{:+.4f}')}, df {slope['df']}): {slope['verdict']}")
    if len(lines) == (1 if convergence else 0):
        lines.append("no bViT cell has a ViT partner at the same width and steps")
    return "\n".join(lines)


def write_frontier(cells: pd.DataFrame, out_dir: Path, *, title: str = "",
                   slope: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write frontier.csv, slope.json (when `slope`, `frontier_slope`'s result, is given) and the three PNG
    plots into `out_dir`; returns {name: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"frontier.csv": out_dir / "frontier.csv"}
    cells.to_csv(paths["frontier.csv"], index=False, float_format="%.4f")
    if slope is not None:
        paths["slope.json"] = out_dir / "slope.json"
        paths["slope.json"].write_text(json.dumps(slope, indent=1) + "\n")
    style = {arch: dict(marker=marker, color=ARCH_COLORS[arch]) for arch, marker in (("bvit", "o"), ("vit", "s"))}

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arch, g in cells.groupby("arch"):
        ax.errorbar(g["params"], g["top1_mean"], yerr=_yerr(g), linestyle="none", label=arch, capsize=3, **style[arch])
        for _, c in g.iterrows():
            ax.annotate(f"w{c['width']}·T{c['steps']}", (c["params"], c["top1_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    front = cells[cells["on_frontier"]].sort_values("params")
    if len(front) >= 2:  # a frontier of one cell is a point, not a line: no legend entry for what is not drawn
        ax.plot(front["params"], front["top1_mean"], color="grey", linestyle="--", linewidth=1, label="Pareto frontier")
    ax.set(xscale="log", xlabel="parameters", ylabel="test top-1 (%)", title=title or "accuracy vs parameters")
    _count_ticks(ax, cells["params"])
    ax.grid(alpha=.3)
    ax.legend()
    fig.tight_layout()
    paths["frontier.png"] = out_dir / "frontier.png"
    fig.savefig(paths["frontier.png"], dpi=120)
    plt.close(fig)

    widths = sorted(cells["width"].unique())
    fig, axes = plt.subplots(1, len(widths), figsize=(3.2 * len(widths), 3.2), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], widths, strict=True):
        for arch, g in cells[cells["width"] == w].groupby("arch"):
            g = g.sort_values("steps")
            ax.errorbar(g["steps"], g["top1_mean"], yerr=_yerr(g), label=arch, capsize=3, **style[arch])
        ax.set(title=f"width {w}", xlabel="steps (bViT) / depth (ViT)")
        ax.set_xticks(sorted(cells["steps"].unique()))
        ax.grid(alpha=.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend()
    fig.tight_layout()
    paths["steps.png"] = out_dir / "steps.png"
    fig.savefig(paths["steps.png"], dpi=120)
    plt.close(fig)

    rec = cells[cells["recovered_fraction"].notna()]
    if not rec.empty:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for steps, g in rec.groupby("steps"):
            g = g.sort_values("width")
            a1.errorbar(g["width"], g["recovered_fraction"], yerr=_yerr(g, "recovered_fraction", "recovered_ci"),
                        marker="o", capsize=3, label=f"T={steps}")
            a2.errorbar(g["width"], g["gap_points"], yerr=_yerr(g, "gap_points", "gap_ci"), marker="o", capsize=3,
                        label=f"T={steps}")
        a1.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        a1.set(xscale="log", xlabel="width", ylabel="bViT top-1 / ViT top-1", title="recovered fraction (95 % CI)")
        a2.axhline(0.0, color="grey", linewidth=1, linestyle="--")
        a2.set(xscale="log", xlabel="width", ylabel="ViT − bViT (points)", title="gap (95 % CI; includes 0: inconclusive)")
        for a in (a1, a2):
            a.minorticks_off()
            a.set_xticks(sorted(rec["width"].unique()), labels=[str(w) for w in sorted(rec["width"].unique())])
            a.grid(alpha=.3)
            a.legend()
        fig.tight_layout()
        paths["recovered.png"] = out_dir / "recovered.png"
        fig.savefig(paths["recovered.png"], dpi=120)
        plt.close(fig)
    return paths


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


def _rank_labels(ranks: pd.Series) -> list[str]:
    """LoRA ranks as labels: '8', or '-' for a method without one."""
    return [str(int(r)) if pd.notna(r) and r != "" else "-" for r in ranks]


def _method_label(method: str, rank: str) -> str:
    """'lora-step r8', or the method alone where it has no rank ('-')."""
    return method + ("" if rank == "-" else f" r{rank}")


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


def transfer_table(rows: list[dict[str, Any]] | pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Per (arch, width, steps, method, rank) cell of a fine-tuning sweep: trainable parameters and
    mean/std test top-1 over seeds (and the merged-LoRA top-1), fewest trainable parameters first."""
    df = _with_flags(_finished(rows, metric))
    if "method" not in df:
        raise ValueError("not a fine-tuning sweep: no trial has a finetune section")
    df = df.assign(rank=_rank_labels(df["rank"]),
                   merged_test_top1=pd.to_numeric(df.get("merged_test_top1"), errors="coerce"))
    cells = (df.groupby(["arch", "width", "steps", "method", "rank"], as_index=False)
             .agg(trainable_params=("trainable_params", "first"), params=("params", "first"),
                  top1_mean=(metric, "mean"), top1_std=(metric, "std"),
                  merged_top1_mean=("merged_test_top1", "mean"), seeds=(metric, "size"),
                  still_improving=("still_improving", count_still_improving), values=(metric, list)))
    cells["top1_std"] = cells["top1_std"].fillna(0.0)
    cells["trainable_fraction"] = cells["trainable_params"] / cells["params"]
    # each method against full fine-tuning of the same model: the gap (full - method) and its interval
    full = cells[cells["method"] == "full"].set_index(["arch", "width", "steps"])["values"]
    gaps = []
    for _, c in cells.iterrows():
        ref = full.get((c["arch"], c["width"], c["steps"]))
        cmp = compare(bvit=c["values"], vit=ref) if ref is not None and c["method"] != "full" else None
        gaps.append({"gap_to_full": cmp and cmp["gap"], "gap_ci_low": cmp and cmp["gap_ci_low"],
                     "gap_ci_high": cmp and cmp["gap_ci_high"], "welch_p": cmp and cmp["welch_p"],
                     "verdict": "" if cmp is None else verdict(cmp["gap_ci_low"], cmp["gap_ci_high"],
                                                               above="below full fine-tuning",
                                                               below="above full fine-tuning")})
    _correct_for_multiplicity(gaps)
    cells = pd.concat([_with_ci(cells), pd.DataFrame(gaps, index=cells.index)], axis=1).drop(columns="values")
    return cells.sort_values(["trainable_params", "method", "rank"]).reset_index(drop=True)


def write_transfer(cells: pd.DataFrame, out_dir: Path, *, title: str = "") -> dict[str, Path]:
    """Write transfer.csv and transfer.png (top-1 vs trainable parameters) into `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"transfer.csv": out_dir / "transfer.csv", "transfer.png": out_dir / "transfer.png"}
    cells.to_csv(paths["transfer.csv"], index=False, float_format="%.4f")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, g in cells.groupby("method", sort=False):
        ax.errorbar(g["trainable_params"], g["top1_mean"], yerr=_yerr(g), marker="o", linestyle="none",
                    label=method, capsize=3)
        for _, c in g.iterrows():
            if c["rank"] != "-":
                ax.annotate(f"r{c['rank']}", (c["trainable_params"], c["top1_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="test top-1 (%)",
           title=title or "fine-tuning: accuracy vs trainable parameters")
    _count_ticks(ax, cells["trainable_params"])
    ax.grid(alpha=.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["transfer.png"], dpi=120)
    plt.close(fig)
    return paths


def transfer_headline(cells: pd.DataFrame, *, convergence: str = "") -> str:
    """`convergence` (as in `headline`), then each fine-tuning method against full fine-tuning, with its
    interval, p-values and verdict."""
    lines = [f"{_method_label(c['method'], c['rank'])} ({100 * c['trainable_fraction']:.1f} % "
             f"trainable): {c['gap_to_full']:.2f} points below full ({_interval(c['gap_ci_low'], c['gap_ci_high'], '{:.2f}')}), "
             f"{c['seeds']} seeds{_p(c)}: {c['verdict']}" for _, c in cells[cells["gap_to_full"].notna()].iterrows()]
    return "\n".join(([convergence] if convergence else []) + (lines or ["no full fine-tuning cell to compare with"]))


def summarize(rows: list[dict[str, Any]] | pd.DataFrame, out_dir: Path, *, title: str = "",
              curves: pd.DataFrame | None = None) -> Summary:
    """The sweep's summary: table, files and headline; kind 'transfer' for a fine-tuning sweep, else 'frontier'.
    `curves`: the trials' learning curves (curves.csv's table), plotted in curves.png; None: no curves.png.

    Raises ValueError when no trial has finished yet.
    """
    df = pd.DataFrame(rows)
    if "method" in df and df["method"].notna().any():
        cells = transfer_table(df)
        done = _finished(df, METRIC).pipe(lambda d: d.assign(rank=_rank_labels(d["rank"])))
        curves = curves if curves is None or "rank" not in curves else curves.assign(rank=_rank_labels(curves["rank"]))
        convergence = still_improving_line(done, by=["method", "rank"], label=_method_label)
        paths = write_transfer(cells, out_dir, title=title)
        _plot_curves(paths, curves, done, out_dir, title=title, panels=["arch", "width", "steps"], lines=["method", "rank"],
                     panel_label=lambda a, w, t: f"{a} width {w}, T={t}", line_label=_method_label)
        return Summary("transfer", cells, paths, transfer_headline(cells, convergence=convergence), None)
    cells = frontier_table(df)
    slope = frontier_slope(cells) if cells["width"].nunique() >= 2 else None
    paths = write_frontier(cells, out_dir, title=title, slope=slope)
    done = _finished(df, METRIC)
    convergence = still_improving_line(done, by=["arch", "width", "steps"],
                                       label=lambda a, w, t: f"{a} width {w}, T={t}")
    _plot_curves(paths, curves, done, out_dir, title=title, panels=["width", "steps"], lines=["arch"],
                 panel_label=lambda w, t: f"width {w}, T={t}", colors=ARCH_COLORS)
    return Summary("frontier", cells, paths, headline(cells, slope, convergence=convergence), slope)


def _plot_curves(paths: dict[str, Path], curves: pd.DataFrame | None, done: pd.DataFrame, out_dir: Path,
                 **kw: Any) -> None:
    """curves.png of the finished trials (`done`) into `paths`, when their curves are given."""
    if curves is None or "trial_id" not in done:
        return
    mine = curves[curves["trial_id"].astype(str).isin(done["trial_id"].astype(str))]
    if (path := plot_curves(mine, out_dir / "curves.png", **kw)) is not None:
        paths["curves.png"] = path


def read_trials(path: Path) -> pd.DataFrame:
    """A committed results/<sweep>/trials.csv as a table; ValueError (one line) when missing or malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a trials.csv written by `bvit-sweep launch`")
    try:
        df = pd.read_csv(path, dtype={"trial_id": str, "rank": "Int64"})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in ("status", "arch", "width", "steps", "params", "flops_per_image", METRIC) if c not in df]
    if missing:
        raise ValueError(f"{path}: not a trials table (no column {', '.join(missing)})")
    return df
