"""What the orchestrator costs over plain loops: the same trials through `bvit-sweep launch` and by hand.

    python bench/orchestration.py [--case realistic|short|both] [--data data/fashion-mnist]

Two cases, each run three ways from cold processes, in one run:

  * realistic: the shipped width sweep's seed-0 trials (sweeps/width.yaml, 12 trials) at the 10 epochs scored
    every 2 that the spec trained until 3cdf812 (it trains 20 now): the figure stays comparable with earlier runs;
  * short: 16 trials of width 16, 1 step, 512 images, 1 epoch (set-up dominates; as in 2026-11-29's run).

  1. plain loop: one fresh process runs every trial one after another (`bvit.trial.run_trial`, torch threads
     as a sweep trial gets them, in the sweep's order); its wall time / parallelism is the ideal the sweep
     is held to;
  2. plain loops in parallel: `parallelism` fresh processes at once, each taking the next unclaimed trial
     (a work queue by hand, no orchestrator): wall time until the last one ends;
  3. the sweep: `launch()` in a fresh process (embedded Ray, MLflow, results and plots at the end);
  4. (short case) the sweep on a persistent local Ray (`bvit-sweep ray up` before the clock starts; one launch
     to warm it, then the measured one): what a person who iterates pays per launch.

Printed side by side: wall times, process start -> first optimizer step, the per-phase breakdown each trial
records (`bvit.config.PHASES`, summed over trials; the sweep's from `orchestrator.timing`), and the ratios
the issue sets goals for: sweep wall / (plain loop wall / parallelism) -- realistic <= 1.10, short <= 1.5 --
and sweep first step / plain process first step <= 1.3. Two more ratios say what of the gap is the
orchestrator's: the sweep against the plain loops in parallel (same trials, same sharing of the cores), and
the plain loops in parallel against the ideal -- what running trials side by side costs with no
orchestrator at all (cores shared: on the 2-core CPU two trials at once train slower than one alone).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARALLELISM = 2  # trials at once in the sweep (cpus: 1 each on 2 cores), and plain processes at once
GOALS = {"realistic": 1.10, "short": 1.5}
FIRST_STEP_GOAL = 1.3


def _short_spec(data: Path, trials: int = 16) -> dict:
    return {
        "name": "bench-short",
        "base": {"model": {"width": 16, "steps": 1, "heads": 2},
                 "data": {"path": str(data), "train_subset": 512, "batch_size": 128, "num_workers": 1},
                 "optim": {"epochs": 1, "warmup_epochs": 0.5}},
        "axes": {"optim.lr": [1e-3 * (1 + i / 10) for i in range(trials)]},
        "resources": {"cpus": 1},
    }


def _realistic_spec(data: Path) -> dict:
    spec = yaml.safe_load((ROOT / "sweeps" / "width.yaml").read_text())
    spec.update(name="bench-realistic", seeds=[0])
    spec["base"]["data"]["path"] = str(data)
    spec["base"]["optim"]["epochs"], spec["base"]["eval_every"] = 10, 2  # as measured before width.yaml went to 20
    spec.pop("smoke", None)
    return spec


# A plain loop: trials one after another in this process, in the order the sweep starts them
# (`planning.run_order`); with several such processes at once, each takes the next trial nobody has claimed
# yet (a file created exclusively in the claims folder) -- a work queue by hand, no orchestrator.
# Prints its timings as one JSON line.
_LOOP = """
import json, os, sys, time
t0 = float(sys.argv[-1])
import torch
from orchestrator.planning import run_order
from orchestrator.spec import expand_trials, load_spec
spec = load_spec(sys.argv[1])
torch.set_num_threads(spec.resources.torch_threads)  # what each sweep trial gets
from bvit.trial import run_trial
from orchestrator.timing import SETUP  # the phases between a trial's entry and its first step
claims = sys.argv[2]
out = {"trial_times": [], "records": []}
for i, trial in enumerate(run_order(expand_trials(spec))):
    try:
        os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        continue
    s = time.time()
    history = run_trial(trial.config)["history"]
    out["trial_times"].append(time.time() - s)
    out["records"] += history
    if "first_step" not in out:
        first = history[0]
        setup = sum(first.get(k, 0.0) for k in SETUP)
        out["first_step"] = s + setup + first["phase_first_step_s"] - t0
out["wall"] = time.time() - t0
print(json.dumps(out))
"""

_SWEEP = """
import json, sys, time
t0 = float(sys.argv[-1])
from orchestrator.launch import launch
result = launch(spec_path=sys.argv[1], storage=sys.argv[2] + "/runs", results_root=sys.argv[2] + "/results",
                verbose=False)
assert result.ok, result.trials
print(json.dumps({"wall": time.time() - t0, "torch_in_launcher": "torch" in sys.modules}))
"""


def _start(code: str, *args: str) -> tuple[subprocess.Popen, float]:
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *args, str(t0)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, t0


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"benchmark process failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _phases(records: list[dict]) -> dict[str, float]:
    from bvit.config import PHASES

    return {p: sum(float(r.get(p) or 0.0) for r in records) for p in PHASES}


def run_case(case: str, data: Path, tmp: Path) -> list[str]:
    from orchestrator.spec import expand_trials, load_spec
    from orchestrator.timing import read_records, sweep_timing

    spec_path = tmp / f"{case}.yaml"
    spec_path.write_text(yaml.safe_dump(_realistic_spec(data) if case == "realistic" else _short_spec(data)))
    n = len(expand_trials(load_spec(spec_path)))

    claims = [tmp / f"{case}-claims-{k}" for k in ("loop", "parallel")]
    for d in claims:
        d.mkdir()
    loop = _finish(_start(_LOOP, str(spec_path), str(claims[0]))[0])
    procs = [_start(_LOOP, str(spec_path), str(claims[1]))[0] for _ in range(PARALLELISM)]
    parallel = [_finish(p) for p in procs]
    parallel_wall = max(p["wall"] for p in parallel)  # each measured from its own start (started together)

    proc, t0 = _start(_SWEEP, str(spec_path), str(tmp / case))
    sweep = _finish(proc)
    sweep_dir = tmp / case / "runs" / load_spec(spec_path).name
    rows, summary = sweep_timing(sweep_dir)
    records = [r for p in sweep_dir.glob("*/result.json") for r in read_records(p)]
    assert len(rows) == n, f"the sweep left results for {len(rows)} of {n} trials"
    sweep_first = min(r["first_step_at"] for r in rows) - t0
    launch = summary.get("launch", {})
    persistent = _persistent(spec_path, tmp / f"{case}-persistent") if case == "short" else None

    ideal = loop["wall"] / PARALLELISM
    ratio, first_ratio = sweep["wall"] / ideal, sweep_first / loop["first_step"]
    plain_phases, sweep_phases = _phases(loop["records"]), _phases(records)
    parallel_phases = _phases([r for p in parallel for r in p["records"]])
    work = ("phase_train_s", "phase_eval_s")
    contention = sum(parallel_phases[k] for k in work) / sum(plain_phases[k] for k in work)
    floor = parallel_wall / ideal
    goal = GOALS[case]
    lines = [
        f"## {case}: {n} trials, {PARALLELISM} at once (all processes start cold)",
        "",
        f"| measure | plain loop (1 process) | {PARALLELISM} plain loops at once | sweep (bvit-sweep launch) |",
        "|---|---|---|---|",
        f"| wall time, process start to done | {loop['wall']:.1f} s | {parallel_wall:.1f} s | {sweep['wall']:.1f} s |",
        f"| process start -> first optimizer step | {loop['first_step']:.1f} s | "
        f"{min(p['first_step'] for p in parallel):.1f} s | {sweep_first:.1f} s |",
        f"| sum of trial times | {sum(loop['trial_times']):.1f} s | "
        f"{sum(sum(p['trial_times']) for p in parallel):.1f} s | - |",
        "",
        f"| phase, summed over trials | plain loop | {PARALLELISM} plain loops at once | sweep |", "|---|---|---|---|",
        *(f"| {p.removeprefix('phase_').removesuffix('_s')} | {plain_phases[p]:.1f} s | {parallel_phases[p]:.1f} s | "
          f"{sweep_phases[p]:.1f} s |" for p in plain_phases),
        f"| sweep only: launch -> Ray ready / first trial start / first step | | "
        f"{launch.get('ray_ready_s', float('nan')):.1f} / {launch.get('first_trial_start_s', float('nan')):.1f} / "
        f"{launch.get('first_step_s', float('nan')):.1f} s |",
        f"| sweep only: last trial's end -> done (results, plots, MLflow) | | "
        f"{t0 + sweep['wall'] - max(r['ended_at'] for r in rows):.1f} s |",
        f"| sweep only: trial processes started / trials | | {summary['fresh_processes']} / {summary['trials']} |",
        f"| sweep only: torch imported in the launcher | | {'yes' if sweep['torch_in_launcher'] else 'no'} |",
        "",
        "| ratio | value | goal |", "|---|---|---|",
        f"| sweep wall / (plain loop wall / {PARALLELISM}) | {ratio:.3f} | <= {goal} ({'met' if ratio <= goal else 'not met'}) |",
        f"| sweep wall / {PARALLELISM} plain loops' wall (the orchestrator's own cost) | "
        f"{sweep['wall'] / parallel_wall:.3f} | |",
        f"| no orchestrator: {PARALLELISM} plain loops' wall / (plain loop wall / {PARALLELISM}) | {floor:.3f} | "
        f"the floor of the first ratio on this machine |",
        f"| train + eval seconds, {PARALLELISM} trials at once / one at a time (plain loops) | {contention:.3f} | "
        f"cores shared, no orchestrator |",
        f"| sweep first step / plain process first step | {first_ratio:.2f} | <= {FIRST_STEP_GOAL} "
        f"({'met' if first_ratio <= FIRST_STEP_GOAL else 'not met'}) |",
    ]
    if persistent:
        p_ratio = persistent["first_step"] / loop["first_step"]
        lines += [
            f"| on a persistent local Ray: sweep first step / plain process first step ({persistent['first_step']:.1f} s"
            f" / {loop['first_step']:.1f} s; wall {persistent['wall']:.1f} s, head started in "
            f"{persistent['head_start_s']:.1f} s beforehand) | {p_ratio:.2f} | <= {FIRST_STEP_GOAL} "
            f"({'met' if p_ratio <= FIRST_STEP_GOAL else 'not met'}) |",
        ]
    return lines + [""]


def _persistent(spec_path: Path, out: Path) -> dict:
    """The sweep on a persistent local Ray: `ray up`, a warm-up launch, then the measured launch; `ray down`."""
    from orchestrator.local_ray import start_head, stop_head
    from orchestrator.spec import load_spec
    from orchestrator.timing import sweep_timing

    head = start_head()
    try:
        _finish(_start(_SWEEP, str(spec_path), str(out / "warm-up"))[0])
        proc, t0 = _start(_SWEEP, str(spec_path), str(out / "measured"))
        sweep = _finish(proc)
    finally:
        stop_head()
    rows, _ = sweep_timing(out / "measured" / "runs" / load_spec(spec_path).name)
    return {"first_step": min(r["first_step_at"] for r in rows) - t0, "wall": sweep["wall"],
            "head_start_s": head["start_s"]}


def run(cases: list[str], data: str = "data/fashion-mnist") -> list[str]:
    sys.path.insert(0, str(ROOT))
    from bvit.data.fashion_mnist import prepare_fashion_mnist

    data_dir = Path(data).resolve()
    prepare_fashion_mnist(out=data_dir)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        # No persistent local Ray of the person running this: the embedded sweep is measured embedded.
        os.environ["BVIT_SWEEP_RAY_HEAD"] = str(Path(tmp) / "ray-head.json")
        for case in cases:
            out += run_case(case, data_dir, Path(tmp))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["realistic", "short", "both"], default=os.environ.get("BVIT_BENCH_CASE", "both"),
                    help="default: both, or BVIT_BENCH_CASE (how `bench/run_all.py` picks one)")
    ap.add_argument("--data", default="data/fashion-mnist")
    a = ap.parse_args()
    print("\n".join(run(["realistic", "short"] if a.case == "both" else [a.case], a.data)))


if __name__ == "__main__":
    main()
