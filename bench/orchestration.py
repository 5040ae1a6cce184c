"""The launcher's overhead: N short trials through `bvit-sweep launch` vs the same trials in a plain loop.

    python bench/orchestration.py [--trials 16] [--data data/fashion-mnist]

Prints, side by side in one run: the plain loop's total trial time, the sweep's wall time, their
ratio sweep wall / (sum of trial times / parallelism) (goal <= 1.05), and the latency from calling
launch to the first optimizer step of the first trial (goal <= 10 s).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml


def _spec(path: Path, data: Path, trials: int) -> Path:
    spec = {
        "name": "bench-orchestration",
        "base": {"model": {"width": 16, "steps": 1, "heads": 2},
                 "data": {"path": str(data), "train_subset": 512, "batch_size": 128, "num_workers": 1},
                 "optim": {"epochs": 1, "warmup_epochs": 0.5}},
        "axes": {"optim.lr": [1e-3 * (1 + i / 10) for i in range(trials)]},
        "resources": {"cpus": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def run(trials: int = 16, data: str = "data/fashion-mnist") -> list[str]:
    import torch

    from bvit.datasets import prepare_fashion_mnist
    from bvit.train import train
    from orchestrator.launch import launch
    from orchestrator.spec import expand, load_spec

    data_dir = Path(data).resolve()
    prepare_fashion_mnist(out=data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_path = _spec(tmp / "bench.yaml", data_dir, trials)
        cfgs = expand(load_spec(spec_path))
        parallelism = 2

        torch.set_num_threads(1)  # as one trial gets inside the sweep (cpus: 1)
        loop_times = []
        for cfg in cfgs:
            t0 = time.perf_counter()
            train(cfg)
            loop_times.append(time.perf_counter() - t0)

        t0 = time.time()
        result = launch(spec_path=spec_path, storage=str(tmp / "runs"), results_root=tmp / "results", verbose=False)
        wall = time.time() - t0
        assert result.ok, result.trials
        starts = []
        for p in (tmp / "runs" / "bench-orchestration").glob("*/result.json"):
            first = json.loads(p.read_text().splitlines()[0])
            starts.append(first["timestamp"] - first["epoch_seconds"])
        first_step = min(starts) - t0
    ideal = sum(loop_times) / parallelism
    return [
        f"## Orchestration overhead ({trials} trials, width 16, 1 step, 512 images, 1 epoch; {parallelism} at once)",
        "",
        "| measure | value | goal |", "|---|---|---|",
        f"| plain loop: sum of trial times | {sum(loop_times):.1f} s | |",
        f"| sweep wall time (launch to results, Ray start-up included) | {wall:.1f} s | |",
        f"| sweep wall / (sum of trial times / {parallelism}) | {wall / ideal:.3f} | <= 1.05 |",
        f"| launch -> first optimizer step | {first_step:.1f} s | <= 10 s |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--data", default="data/fashion-mnist")
    a = ap.parse_args()
    print("\n".join(run(a.trials, a.data)))


if __name__ == "__main__":
    main()
