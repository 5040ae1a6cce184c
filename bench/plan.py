"""How long `bvit-sweep plan` takes on a 10,000-trial grid (goal: <= 2 s, imports excluded).

    .venv/bin/python bench/plan.py [--trials-per-axis 10] [--repeats 3]

Writes a spec with four 10-value axes (width x steps x lr x seed = 10,000 trials) and times each stage of
`plan --no-bench` as the CLI runs it: load + check the spec; expand, validate and cost every trial; the JSON
document (`--json`) or the rich table of the first 200 rows. Best of `--repeats` runs, wall and CPU time
(the CPU time is steadier on a shared machine; the load average is printed too).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from orchestrator.planning import make_plan, print_plan
from orchestrator.spec import load_spec


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


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-axis", type=int, default=10, help="values per axis (trials: this ** 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the best of each stage is reported")
    args = parser.parse_args()

    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(grid_spec(args.trials_per_axis)))
        for _ in range(args.repeats):
            spec, *load = timed(lambda: load_spec(path))
            plan, *cost = timed(lambda spec=spec: make_plan(spec=spec, bench=False))
            doc, *js = timed(lambda plan=plan: json.dumps(plan.to_dict()))  # as `--json` prints to a pipe
            console = Console(file=io.StringIO(), width=200)
            _, *table = timed(lambda plan=plan, console=console: print_plan(plan, console=console))
            for stage, t in (("load", load), ("plan", cost), ("json", js), ("table", table)):
                best[stage] = min(best.get(stage, (float("inf"),) * 2), tuple(t))

    print(f"trials: {len(plan.trials):,}   load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<34}{'wall s':>9}{'cpu s':>9}")
    rows = [("load + check spec", ("load",)), ("expand + validate + cost trials", ("plan",)),
            (f"JSON document ({len(doc) / 1e6:.1f} MB)", ("json",)), ("table, first 200 rows", ("table",)),
            ("plan --json --no-bench", ("load", "plan", "json")),
            ("plan --no-bench (table)", ("load", "plan", "table"))]
    for name, stages in rows:
        wall, cpu = (sum(best[s][i] for s in stages) for i in (0, 1))
        goal = f"   goal <= 2 s: {'met' if wall <= 2 else 'MISSED'}" if len(stages) > 1 else ""
        print(f"{name:<34}{wall:>9.3f}{cpu:>9.3f}{goal}")


if __name__ == "__main__":
    main()
