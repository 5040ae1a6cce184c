"""How long `bvit-sweep plan` takes on a 10,000-trial grid (goal: <= 2 s, imports excluded).

    .venv/bin/python bench/plan.py [--trials-per-axis 10]

Writes a spec with four 10-value axes (width x steps x lr x seed = 10,000 trials), then times each stage of
`plan --json --no-bench` as the CLI runs it: load + check, expand + validate every trial, exact parameter and
FLOP counts, and the JSON document. Also times the rich table of the first 200 rows (what `plan` prints).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from orchestrator.plan import make_plan, print_plan
from orchestrator.spec import expand_trials, load_spec


def grid_spec(n: int) -> dict:
    return {
        "name": "bench-plan",
        "base": {"model": {"heads": 2}, "optim": {"epochs": 3}, "data": {"train_subset": 4096}},
        "axes": {
            "model.width": [16 * (i + 1) for i in range(n)],
            "model.steps": list(range(1, n + 1)),
            "optim.lr": [round(1e-4 * (i + 1), 6) for i in range(n)],
        },
        "seeds": list(range(n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-axis", type=int, default=10, help="values per axis (trials = this ** 4)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(grid_spec(args.trials_per_axis)))
        t0 = time.perf_counter()
        spec = load_spec(path)
        t1 = time.perf_counter()
        trials = expand_trials(spec)
        t2 = time.perf_counter()
        plan = make_plan(spec=spec, bench=False)  # expands again, then counts
        t3 = time.perf_counter()
        doc = json.dumps(plan.to_dict())
        t4 = time.perf_counter()
        print_plan(plan, console=Console(file=io.StringIO(), width=200), max_rows=200)
        t5 = time.perf_counter()

    plan_json = t4 - t0 - (t2 - t1)  # load + make_plan + JSON: what `plan --json --no-bench` does
    print(f"trials                      {len(trials):>10,}")
    print(f"load + check spec           {t1 - t0:>10.3f} s")
    print(f"expand + validate trials    {t2 - t1:>10.3f} s")
    print(f"make_plan (expand + counts) {t3 - t2:>10.3f} s")
    print(f"JSON document               {t4 - t3:>10.3f} s   ({len(doc) / 1e6:.1f} MB)")
    print(f"table, first 200 rows       {t5 - t4:>10.3f} s")
    print(f"plan --json --no-bench      {plan_json:>10.3f} s   (goal <= 2 s: {'met' if plan_json <= 2 else 'MISSED'})")
    print(f"plan (table) --no-bench     {t3 - t2 + t1 - t0 + t5 - t4:>10.3f} s")


if __name__ == "__main__":
    main()
