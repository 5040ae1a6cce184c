"""Uncertainty for every number a sweep compares: cell means, gaps to a baseline arm, recovered fractions, trends.

    cell = describe([61.2, 59.8, 60.4])                  # mean, sd, n, 95 % Student-t interval
    cmp = compare(arm=[...], baseline=[...])             # gap (baseline - arm), recovered fraction, Welch test
    slope = trend_slope(points)                          # recovered fraction vs log2(a numeric factor), with its CI
    adjusted = holm([cmp["welch_p"] for cmp in cmps])    # the comparisons of one table, tested together

Definitions (95 % by default; seeds are the replicates, each trial one observation):
  * cell: mean, sample sd, n and the Student-t interval mean +- t(n-1) sd / sqrt(n).
  * gap: mean(baseline) - mean(arm) in points (e.g. ViT - bViT), Welch's unequal-variance t interval and two-sided p-value
    (scipy.stats.ttest_ind(equal_var=False)).
  * recovered fraction: mean(arm) / mean(baseline). Its interval is built on the log scale, where the ratio
    of two independent means is a difference: var(log R) ~ sd_b^2/(n_b m_b^2) + sd_v^2/(n_v m_v^2) (delta
    method), with Welch-Satterthwaite degrees of freedom; exp() brings it back, so it stays positive.
  * trend slope: least squares of each cell's recovered fraction on log2 of a numeric factor (the spec's
    `compare.trend`, e.g. width), with one intercept per group of the other factors (e.g. per step count),
    Student-t interval on the slope.
  * multiplicity: a table's comparisons (one per arm and cell) are tested together; Holm's
    step-down adjustment of their Welch p-values keeps the chance of any false "ahead" at most 1 - LEVEL.
A difference whose interval includes 0 (a ratio whose interval includes 1) is "inconclusive" -- said in
words in every table, plot and README that shows it; one whose interval excludes 0 but whose Holm-adjusted
p does not reach 1 - LEVEL is said to hold "before correction only".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as st

__all__ = ["LEVEL", "MIN_SEEDS", "describe", "compare", "trend_slope", "verdict", "holm", "corrected_verdict"]

LEVEL = 0.95
MIN_SEEDS = 3  # below this a comparison's interval is too wide to mean much (plan warns)


def _clean(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    return x


def describe(values: Sequence[float], *, level: float = LEVEL) -> dict[str, Any]:
    """mean, sd, n and the Student-t interval of the mean (None where n < 2 leaves it undefined)."""
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": 1, "ci_low": None, "ci_high": None}
    sd = float(x.std(ddof=1))
    half = float(st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def verdict(low: float | None, high: float | None, *, null: float = 0.0, above: str, below: str) -> str:
    """`above` / `below` when the interval excludes `null` on that side, else 'inconclusive'."""
    if low is None or high is None:
        return "inconclusive (too few seeds for an interval)"
    if low > null:
        return above
    if high < null:
        return below
    return f"inconclusive (interval includes {null:g})"


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's adjusted p-values of tests made together (None or NaN: no test, left out of their number m).

    With the m p-values sorted, p(1) <= ... <= p(m), the adjusted p(i) is max over j <= i of
    min(1, (m - j + 1) p(j)) (Holm 1979): rejecting where it is below alpha keeps the family-wise error
    rate at most alpha, whatever the tests' dependence.
    """
    tested = sorted((float(p), i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(float(p)))
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        out[i] = running
    return out


def corrected_verdict(words: str, p_adjusted: float | None, *, m: int, level: float = LEVEL) -> str:
    """`words` (a `verdict`) qualified by multiplicity: a verdict that is not inconclusive but whose
    Holm-adjusted p is not below 1 - `level` holds "before correction only"."""
    if words.startswith("inconclusive") or p_adjusted is None or p_adjusted < 1 - level:
        return words
    return f"{words} before correction only (Holm-adjusted p {p_adjusted:.3g} over {m} comparisons)"


def compare(*, arm: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """One arm against its cell's baseline arm (per-seed values of each): gap (baseline - arm) and recovered
    fraction (arm / baseline) with intervals, Welch's p."""
    b, v = _clean(arm), _clean(baseline)
    out: dict[str, Any] = {"n_arm": int(b.size), "n_baseline": int(v.size), "gap": None, "gap_ci_low": None,
                           "gap_ci_high": None, "welch_p": None, "recovered": None, "recovered_ci_low": None,
                           "recovered_ci_high": None}
    if b.size == 0 or v.size == 0:
        out["verdict"] = "inconclusive (an arm has no finished trial)"
        return out
    mb, mv = float(b.mean()), float(v.mean())
    out["gap"] = mv - mb
    out["recovered"] = mb / mv if mv else None
    if b.size >= 2 and v.size >= 2 and (b.std(ddof=1) > 0 or v.std(ddof=1) > 0):
        res = st.ttest_ind(v, b, equal_var=False)
        ci = res.confidence_interval(level)
        out.update(gap_ci_low=float(ci.low), gap_ci_high=float(ci.high), welch_p=float(res.pvalue))
        if mb > 0 and mv > 0:
            a_b = b.var(ddof=1) / (b.size * mb * mb)
            a_v = v.var(ddof=1) / (v.size * mv * mv)
            df = (a_b + a_v) ** 2 / (a_b ** 2 / (b.size - 1) + a_v ** 2 / (v.size - 1))
            half = float(st.t.ppf(0.5 + level / 2, df)) * math.sqrt(a_b + a_v)
            log_r = math.log(mb / mv)
            out.update(recovered_ci_low=math.exp(log_r - half), recovered_ci_high=math.exp(log_r + half))
    elif b.size >= 2 and v.size >= 2:  # no spread at all: the difference is exact
        out.update(gap_ci_low=out["gap"], gap_ci_high=out["gap"], welch_p=0.0 if out["gap"] else 1.0,
                   recovered_ci_low=out["recovered"], recovered_ci_high=out["recovered"])
    out["verdict"] = verdict(out["gap_ci_low"], out["gap_ci_high"], above="baseline ahead", below="arm ahead")
    return out


def trend_slope(points: Sequence[tuple[float, Any, float | None]], *, factor: str = "x",
                level: float = LEVEL) -> dict[str, Any]:
    """Slope of the recovered fraction per doubling of a numeric factor, one intercept per group.

    `points`: (factor value, group, recovered fraction) per cell -- the group is the cell's other factors
    (compared within themselves); points without a recovered fraction are left out. `factor` names the
    factor in the verdict. The paper's width claim is a positive slope over width.
    """
    rows = [(float(x), g, float(r)) for x, g, r in points if r is not None and not math.isnan(float(r))]
    groups = sorted({g for _, g, _ in rows}, key=str)
    xs = sorted({x for x, _, _ in rows})
    out: dict[str, Any] = {"factor": factor, "slope": None, "ci_low": None, "ci_high": None, "df": 0,
                           "cells": len(rows), "values": [int(x) if x.is_integer() else x for x in xs],
                           "groups": [str(g) for g in groups]}
    if len(xs) < 2:
        out["verdict"] = f"inconclusive (fewer than two values of {factor})"
        return out
    x = np.array([[math.log2(v)] + [1.0 if g == k else 0.0 for k in groups] for v, g, _ in rows])  # (cells, 1+G)
    y = np.array([r for _, _, r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(rows) - x.shape[1]
    out.update(slope=float(coef[0]), df=df)
    if df >= 1:
        resid = y - x @ coef
        sigma2 = float(resid @ resid) / df
        se = math.sqrt(sigma2 * float(np.linalg.inv(x.T @ x)[0, 0]))
        half = float(st.t.ppf(0.5 + level / 2, df)) * se
        out.update(ci_low=out["slope"] - half, ci_high=out["slope"] + half)
    out["verdict"] = verdict(out["ci_low"], out["ci_high"], above=f"supported: a larger {factor} recovers more",
                             below=f"contradicted: a larger {factor} recovers less")
    return out
