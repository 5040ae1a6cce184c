"""A search's outputs: the non-dominated trials and the hypervolume they cover (issue #27).

    results/<sweep>/pareto.csv        the non-dominated finished trials, objectives as columns
    results/<sweep>/hypervolume.csv   the hypervolume after each finished trial (in finishing order)
    results/<sweep>/pareto.png        every finished trial on the first two objectives, the front drawn
    results/<sweep>/hypervolume.png   hypervolume against trials finished

Hypervolume is Optuna's (`optuna._hypervolume.compute_hypervolume`, exact; WFG beyond two objectives), on the
objectives turned into losses (a `max` objective negated), against a reference point that every trial counted
must beat in every objective. The default reference point is fixed by the space, not by what a run found, so that
runs of one space compare: 0 for accuracies (`test_top1`, `test_top5`), 1.1 x the largest value in the space for
the static measures (`params`, `flops_per_image`), 1.1 x the worst value seen for losses.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["column_of", "default_reference_point", "hypervolume", "hypervolume_history", "pareto_mask",
           "static_measures", "write_search_results"]

ACCURACIES = ("test_top1", "test_top5")


def column_of(metric: str) -> str:
    """trials.csv's column of an objective (`test_top1` -> `final_test_top1`; static measures as named)."""
    return metric if metric in ("params", "flops_per_image") else f"final_{metric}"


def _losses(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return np.asarray(values, dtype=float) * sign


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Which rows no other row dominates (at least as good in every objective, better in one)."""
    loss = _losses(values, directions)
    n = len(loss)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(loss <= loss[i], axis=1) & np.any(loss < loss[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """The hypervolume the points dominate up to `reference` (Optuna's exact computation); points that do not
    beat the reference in every objective add nothing."""
    from optuna._hypervolume import compute_hypervolume

    loss = _losses(np.reshape(values, (-1, len(directions))), directions)
    ref = _losses(np.asarray(reference, dtype=float)[None, :], directions)[0]
    inside = loss[np.all(loss < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref))


def hypervolume_history(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> list[float]:
    """The hypervolume of the first k points, for k = 1..n (the order is the order the trials finished)."""
    return [hypervolume(values[:k], directions, reference) for k in range(1, len(values) + 1)]


def static_measures(cfg) -> dict[str, float]:
    """A TrialConfig's model parameters and forward FLOPs per image, in closed form (no model is built)."""
    from bvit.archs import get_arch

    params, flops = get_arch(cfg.model.arch).counts(cfg.model)
    return {"params": float(params), "flops_per_image": float(flops)}


def default_reference_point(objectives: dict[str, str], *, space_configs: list, observed: np.ndarray) -> list[float]:
    """The hypervolume's reference point when the spec gives none (see the module docstring)."""
    statics = [static_measures(c) for c in space_configs]
    out = []
    for j, (metric, direction) in enumerate(objectives.items()):
        if metric in ACCURACIES:
            out.append(0.0)
        elif statics and metric in statics[0]:
            out.append(1.1 * max(s[metric] for s in statics))
        else:
            worst = np.max(observed[:, j]) if direction == "min" else np.min(observed[:, j])
            out.append(float(worst) * (1.1 if direction == "min" else 0.9))
    return out


def _finish_order(sweep_dir: Path) -> dict[str, float]:
    """{config id: when its last result came}, from the trials' JSON records (`orchestrator.records`, written
    from Tune's state as the launch ends): not a second unpickling of Tune's state per launch."""
    from orchestrator.records import read_records

    return {t.envelope.trial_id: float(t.last_result.get("timestamp", 0.0)) for t in read_records(Path(sweep_dir))}


def search_table(table: list[dict[str, Any]], objectives: dict[str, str],
                 order: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The finished trials that report every objective, in finishing order, and their objective values."""
    cols = [column_of(m) for m in objectives]
    done = [r for r in table if r.get("status") == "TERMINATED" and all(_number(r.get(c)) for c in cols)]
    if order is not None:
        done.sort(key=lambda r: order.get(r["trial_id"], float("inf")))
    values = np.array([[float(r[c]) for c in cols] for r in done], dtype=float).reshape(-1, len(cols))
    return done, values


def _number(v: Any) -> bool:
    try:
        return v is not None and v == v and float(v) == float(v)
    except (TypeError, ValueError):
        return False


def write_search_results(table: list[dict[str, Any]], *, spec, sweep_dir: Path, results_dir: Path, strategy,
                         uri: str, experiment: str, verbose: bool = True) -> dict[str, Any] | None:
    """pareto.csv, hypervolume.csv, pareto.png, hypervolume.png in `results_dir`; the hypervolume history and the
    Pareto table on the sweep's MLflow parent run. None when no trial has finished yet."""
    objectives = dict(spec.search.objectives)
    rows, values = search_table(table, objectives, _finish_order(sweep_dir))
    if not rows:
        return None
    given = spec.search.reference_point
    reference = [given[m] for m in objectives] if given else default_reference_point(
        objectives, space_configs=strategy.configs, observed=values)
    if verbose:
        print("hypervolume reference point" + ("" if given else " (derived)") + ": "
              + ", ".join(f"{m}={r:g}" for m, r in zip(objectives, reference, strict=True)))
    out = write_files(rows, values, objectives=objectives, reference=reference, results_dir=results_dir,
                      title=spec.name)
    try:
        from orchestrator.tracking import log_hypervolume

        log_hypervolume(uri=uri, experiment=experiment, sweep=results_dir.name, history=out["history"],
                        files=[results_dir / "pareto.csv", results_dir / "hypervolume.csv"])
    except Exception as e:  # tracking must never lose a finished sweep
        print(f"warning: MLflow at {uri}: hypervolume not logged ({type(e).__name__}: {e})")
    return out


def write_files(rows: list[dict[str, Any]], values: np.ndarray, *, objectives: dict[str, str],
                reference: list[float], results_dir: Path, title: str) -> dict[str, Any]:
    """The four files from finished trials in finishing order (`rows`, `values`: see `search_table`)."""
    import pandas as pd

    directions = list(objectives.values())
    results_dir.mkdir(parents=True, exist_ok=True)
    mask = pareto_mask(values, directions)
    ident = [c for c in ("trial_id", "arch", "width", "heads", "steps", "seed") if c in rows[0]]
    front = pd.DataFrame([{**{c: r[c] for c in ident}, **dict(zip(objectives, v, strict=True))}
                          for r, v, m in zip(rows, values, mask, strict=True) if m])
    front = front.sort_values(list(objectives)[-1]).reset_index(drop=True)
    front.to_csv(results_dir / "pareto.csv", index=False)
    history = hypervolume_history(values, directions, reference)
    hv = pd.DataFrame({"trials": range(1, len(rows) + 1), "trial_id": [r["trial_id"] for r in rows],
                       "hypervolume": history})
    for m, r in zip(objectives, reference, strict=True):
        hv[f"reference_{m}"] = r
    hv.to_csv(results_dir / "hypervolume.csv", index=False)
    _plots(rows, values, mask, objectives=objectives, history=history, results_dir=results_dir, title=title)
    return {"history": history, "front": front, "reference": reference}


def _plots(rows, values, mask, *, objectives, history, results_dir: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(objectives)
    if len(names) >= 2:
        x, y = values[:, 1], values[:, 0]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        archs = sorted({str(r.get("arch")) for r in rows})
        for arch in archs:
            sel = np.array([str(r.get("arch")) == arch for r in rows])
            ax.scatter(x[sel], y[sel], s=14, alpha=0.6, label=arch)
        order = np.argsort(x[mask])
        ax.step(x[mask][order], y[mask][order], where="post", color="k", lw=1.2, label="Pareto front")
        if names[1] in ("params", "flops_per_image"):
            ax.set_xscale("log")
        ax.set_xlabel(names[1])
        ax.set_ylabel(names[0])
        ax.set_title(f"{title}: {len(rows)} trials, {int(mask.sum())} on the front")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results_dir / "pareto.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(1, len(history) + 1), history, marker=".")
    ax.set_xlabel("trials finished")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"{title}: hypervolume ({', '.join(f'{m} {d}' for m, d in objectives.items())})")
    fig.tight_layout()
    fig.savefig(results_dir / "hypervolume.png", dpi=120)
    plt.close(fig)
