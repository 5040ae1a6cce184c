"""Does search beat the grid? A tabular benchmark (as NAS-Bench-101/201 do): every point of the space was trained
once by the committed full grid (results/search-grid/trials.csv, sweeps/search-grid.yaml); a search here is the
real `PointSearcher` (Optuna through Ray Tune's `OptunaSearch`, the object `bvit-sweep launch` uses) whose trials
are not trained but looked up in that table. Each search's hypervolume is divided by the full grid's, with the same
reference point (the spec's default: 0 top-1, 1.1 x the space's largest parameter count).

    python bench/search.py                       # random, tpe, nsga2 x budgets 1/8, 1/4, 1/2 x seeds 0..9
    python bench/search.py --seeds 20 --out results/search
    python bench/search.py --grid-front          # also the grid's own pareto.csv, hypervolume.csv and plots
    python bench/search.py --algorithms tpe --budgets 1/2 --first-seed 5 --seeds 5 --out /tmp/b   # a slice
    python bench/search.py --merge /tmp/b*/replay.csv --out results/search                       # slices -> one summary

Writes replay.csv (one row per search), summary.csv (mean and 95 % t-interval per algorithm and budget),
hypervolume_fraction.png. `fraction` uses the spec's default reference point; `fraction_nadir` a stricter one just
beyond the worst point of the grid's own front (most of the default's volume is easy: any model above 0 % top-1
with fewer parameters than the largest adds to it). Replayed numbers are the grid's own single-seed accuracies: they say how well a sampler
finds this table's front, not how noisy training is.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from pathlib import Path

import numpy as np

from orchestrator.envelope import TrialEnvelope
from orchestrator.pareto import column_of, default_reference_point, hypervolume
from orchestrator.spec import load_spec
from orchestrator.strategy import OptunaStrategy, Space, strategy_for

ALGORITHMS = ("random", "tpe", "nsga2")
FRACTIONS = (("1/8", 8), ("1/4", 4), ("1/2", 2))


def load_table(path: Path, objectives: dict[str, str]) -> dict[str, list[float]]:
    """{trial id: objective values} of the grid's finished trials."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "TERMINATED"]
    return {r["trial_id"]: [float(r[column_of(m)]) for m in objectives] for r in rows}


def replay(spec, *, table: dict[str, list[float]], objectives: dict[str, str]) -> tuple[list[str], int]:
    """Run one search against the table: (config ids in the order issued, points the table lacks)."""
    strategy = strategy_for(spec)
    assert isinstance(strategy, OptunaStrategy), "the budget covers the space: nothing to search"
    searcher = strategy.search_alg(data_paths={spec.base["data"]["path"]: "/replay"}, sweep_dir=Path("/tmp/replay"))
    searcher._save_state = lambda: None  # nothing on disk
    issued, missing = [], 0
    for i in range(strategy.num_samples):
        config = searcher.suggest(f"r{i}")
        if not isinstance(config, dict):
            break
        tid = TrialEnvelope.of(config).trial_id
        issued.append(tid)
        if tid not in table:
            missing += 1
            searcher.on_trial_complete(f"r{i}", None, error=True)
            continue
        result = {m: v for m, v in zip(objectives, table[tid], strict=True)}
        searcher.on_trial_complete(f"r{i}", result)
    return issued, missing


def _typed(row: dict[str, str]) -> dict:
    out: dict = dict(row)
    for k in ("trials", "seed", "missing"):
        out[k] = int(row[k])
    for k in ("hypervolume", "fraction", "fraction_nadir", "seconds"):
        out[k] = float(row[k])
    return out


def write_grid_front(trials_csv: Path, *, objectives: dict[str, str], reference: list[float]) -> None:
    """pareto.csv, hypervolume.csv, pareto.png, hypervolume.png beside the grid's trials.csv (finishing order from
    the sweep's Ray state when it is here, else the table's order)."""
    from orchestrator.pareto import _finish_order, search_table, write_files

    with open(trials_csv) as f:
        table = list(csv.DictReader(f))
    sweep_dir = Path("runs") / trials_csv.parent.name
    order = _finish_order(sweep_dir) if sweep_dir.exists() else None
    rows, values = search_table(table, objectives, order)
    write_files(rows, values, objectives=objectives, reference=reference, results_dir=trials_csv.parent,
                title=trials_csv.parent.name)


def nadir_reference(values: np.ndarray, directions: list[str]) -> list[float]:
    """A stricter reference point: just beyond the worst value of each objective on the grid's own Pareto front
    (1 % of that objective's range on the front), so only the front's neighbourhood counts."""
    from orchestrator.pareto import pareto_mask

    front = values[pareto_mask(values, directions)]
    out = []
    for j, d in enumerate(directions):
        span = float(front[:, j].max() - front[:, j].min()) or 1.0
        out.append(float(front[:, j].min()) - 0.01 * span if d == "max" else float(front[:, j].max()) + 0.01 * span)
    return out


def t_interval(x: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    mean = float(np.mean(x))
    if len(x) < 2 or np.std(x) == 0:
        return mean, mean, mean
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=mean, scale=stats.sem(x))
    return mean, float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="results/search-grid/trials.csv")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", default="results/search")
    parser.add_argument("--first-seed", type=int, default=0, help="sampler seeds first-seed .. first-seed+seeds-1")
    parser.add_argument("--budgets", default=",".join(label for label, _ in FRACTIONS), help="e.g. 1/8,1/4")
    parser.add_argument("--merge", nargs="*", default=None, help="replay.csv files to summarise instead of running")
    parser.add_argument("--grid-front", action="store_true", help="also write the grid's pareto/hypervolume files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = load_spec("sweeps/search-tpe.yaml")
    objectives = dict(base.search.objectives)
    table = load_table(Path(args.grid), objectives)
    space_trials, _ = Space.of(base).enumerate()
    assert {t.id for t in space_trials} >= set(table), "the grid table holds points outside the search space"
    values = np.array(list(table.values()))
    reference = default_reference_point(objectives, space_configs=[t.config for t in space_trials], observed=values)
    directions = list(objectives.values())
    grid_hv = hypervolume(values, directions, reference)
    nadir = nadir_reference(values, directions)
    grid_hv_nadir = hypervolume(values, directions, nadir)
    print(f"grid: {len(table)} of {len(space_trials)} points finished; reference {reference}; hypervolume {grid_hv:.6g}")

    if args.grid_front:  # the grid's own pareto.csv / hypervolume.csv / plots, as a search sweep writes them
        write_grid_front(Path(args.grid), objectives=objectives, reference=reference)

    rows = [] if args.merge is None else [_typed(r) for m in args.merge for r in csv.DictReader(open(m))]
    for alg in (args.algorithms.split(",") if args.merge is None else []):
        for label, div in [f for f in FRACTIONS if f[0] in args.budgets.split(",")]:
            budget = round(len(space_trials) / div)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                data = base.model_dump(mode="json", exclude_unset=True)
                data["search"] = {**data["search"], "algorithm": alg, "num_trials": budget, "seed": seed}
                spec = type(base).model_validate(data)
                started = time.time()
                issued, missing = replay(spec, table=table, objectives=objectives)
                found = np.array([table[t] for t in issued if t in table]).reshape(-1, len(objectives))
                hv = hypervolume(found, directions, reference)
                rows.append({"algorithm": alg, "budget": label, "trials": len(issued), "seed": seed,
                             "hypervolume": hv, "fraction": hv / grid_hv,
                             "fraction_nadir": hypervolume(found, directions, nadir) / grid_hv_nadir, "missing": missing,
                             "seconds": round(time.time() - started, 2)})
                print(f"{alg:6s} {label} ({budget:3d} trials) seed {seed:2d}: {hv / grid_hv:.4f} of the grid's")
    with open(out / "replay.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = []
    for alg in dict.fromkeys(r["algorithm"] for r in rows):
        for label, _ in [f for f in FRACTIONS if any(r["budget"] == f[0] and r["algorithm"] == alg for r in rows)]:
            x = np.array([r["fraction"] for r in rows if r["algorithm"] == alg and r["budget"] == label])
            mean, lo, hi = t_interval(x)
            xn = np.array([r["fraction_nadir"] for r in rows if r["algorithm"] == alg and r["budget"] == label])
            mean_n, lo_n, hi_n = t_interval(xn)
            summary.append({"algorithm": alg, "budget": label, "trials": next(
                r["trials"] for r in rows if r["algorithm"] == alg and r["budget"] == label), "seeds": len(x),
                "mean_fraction": round(mean, 4), "ci95_low": round(lo, 4), "ci95_high": round(hi, 4),
                "min": round(float(x.min()), 4), "seeds_at_95pct": int((x >= 0.95).sum()),
                "nadir_mean_fraction": round(mean_n, 4), "nadir_ci95_low": round(lo_n, 4),
                "nadir_ci95_high": round(hi_n, 4), "nadir_seeds_at_95pct": int((xn >= 0.95).sum())})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    (out / "grid_reference.json").write_text(json.dumps(
        {"grid_trials": len(table), "space_points": len(space_trials), "reference_point": dict(zip(objectives, reference, strict=True)),
         "grid_hypervolume": grid_hv, "nadir_reference_point": dict(zip(objectives, nadir, strict=True)),
         "grid_hypervolume_nadir": grid_hv_nadir}, indent=1))
    _plot(summary, out)
    for s in summary:
        print(s)


def _plot(summary, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, alg in enumerate(dict.fromkeys(s["algorithm"] for s in summary)):
        rows = [s for s in summary if s["algorithm"] == alg]
        x = np.array([r["trials"] for r in rows]) * (1 + 0.03 * (i - 1))
        y = np.array([r["mean_fraction"] for r in rows])
        err = np.array([[r["mean_fraction"] - r["ci95_low"] for r in rows], [r["ci95_high"] - r["mean_fraction"] for r in rows]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=alg)
    ax.axhline(0.95, color="k", ls=":", lw=1, label="95 % goal")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trials (of the grid's)")
    ax.set_ylabel("hypervolume / grid's")
    ax.set_title("search vs full grid (replayed, mean and 95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hypervolume_fraction.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
