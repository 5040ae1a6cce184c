"""How the orchestrator's cost grows with the work: N tiny trials through `bvit-sweep launch` and through plain
loops from a shared queue, for several N, in one run.

    python bench/scale.py [--n 25 100 400]        # `make bench` (about 10-15 min on the 2-core CPU)
    BVIT_BENCH_SCALE_N="100 400 1000" python bench/run_all.py --only scale.py   # `make bench-scale`

Each trial is a bViT of width 8, one step, trained one epoch on the first 1,024 Fashion-MNIST training images
and scored on the first 512 test images (a subset written from Debian's files into a temporary FFCV set):
about a second of work, so what the orchestrator adds per trial is visible. The N trials differ in their
learning rate only (N cells of one seed).

For every N, printed side by side: the wall time of the sweep (a fresh `bvit-sweep launch` process: embedded
Ray, MLflow, results and plots at the end) and of two plain loops from a shared queue (fresh processes running
`bvit.trial.run_trial` on the next unclaimed trial, no orchestrator); the launcher's peak RSS; the MLflow
store's size; Ray Tune's experiment state on disk; the end-of-sweep work (last trial's end -> the launcher's
exit: results, frontier, curves, plots, MLflow back-fill and parent); and, on the finished N-trial sweep, the
times of `bvit-sweep status`, `bvit-sweep frontier` and `bvit-sweep launch --resume` with nothing left to run
(each a fresh process; `bvit-sweep --version` is the floor a fresh process pays to import the CLI).
Between consecutive N, the marginal cost per trial (slope of wall time over N) of both and their ratio, the
figure issue #31 sets its goal on (<= 1.10 at N = 400).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from orchestration import _LOOP, PARALLELISM, _finish, _start  # noqa: E402  the plain loops, shared

TRAIN_IMAGES, TEST_IMAGES = 1024, 512
GOALS = {"marginal": 1.10, "rss": 1.5, "end_s": 10.0, "status_s": 2.0}

# The launcher, as a user runs it, reporting its own peak RSS and exit time as it exits.
_LAUNCHER = """
import atexit, json, resource, sys, time
out = sys.argv.pop()
atexit.register(lambda: open(out, "w").write(json.dumps(
    {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "exited_at": time.time()})))
sys.argv = ["bvit-sweep", *sys.argv[1:]]
from orchestrator.cli import app
app()
"""


def _write_idx(path: Path, array: np.ndarray) -> None:
    head = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(head + array.astype(np.uint8).tobytes()))


def tiny_fashion_mnist(tmp: Path) -> Path:
    """The first TRAIN_IMAGES / TEST_IMAGES images of Debian's Fashion-MNIST as a prepared FFCV data set."""
    from bvit.data.fashion_mnist import DEBIAN_FASHION_MNIST, prepare_fashion_mnist, read_idx

    src = tmp / "fmnist-idx"
    src.mkdir()
    for split, n in (("train", TRAIN_IMAGES), ("t10k", TEST_IMAGES)):
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            name = f"{split}-{kind}-ubyte"
            full = read_idx(next(p for p in (DEBIAN_FASHION_MNIST / f"{name}.gz", DEBIAN_FASHION_MNIST / name)
                                 if p.is_file()), ndim=ndim)
            _write_idx(src / f"{name}.gz", full[:n])
    prepare_fashion_mnist(out=tmp / "fmnist-tiny", source=src)
    return tmp / "fmnist-tiny"


def tiny_spec(n: int, data: Path) -> dict:
    return {
        "name": f"scale-{n}",
        "base": {"model": {"width": 8, "heads": 1, "steps": 1, "img_size": 28, "patch_size": 4, "in_chans": 1,
                           "num_classes": 10},
                 "data": {"path": str(data), "batch_size": 128, "eval_batch_size": 512, "num_workers": 1},
                 "optim": {"epochs": 1, "warmup_epochs": 0.2}},
        "axes": {"optim.lr": [round(3e-3 * (1 + i / n), 9) for i in range(n)]},
        "resources": {"cpus": 1},
    }


def _timed(args: list[str], cwd: Path) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "from orchestrator.cli import app; app()", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"bvit-sweep {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t0


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def run_n(n: int, data: Path, tmp: Path) -> dict:
    from orchestrator.timing import sweep_timing

    work = tmp / f"n{n}"
    work.mkdir()
    spec_path = work / "scale.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(n, data)))
    name = f"scale-{n}"

    claims = work / "claims"
    claims.mkdir()
    procs = [_start(_LOOP, str(spec_path), str(claims))[0] for _ in range(PARALLELISM)]
    plain_wall = max(_finish(p)["wall"] for p in procs)

    report = work / "launcher.json"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, "launch", str(spec_path), str(report)], cwd=work,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"the {n}-trial sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    sweep_wall = time.time() - t0
    launcher = json.loads(report.read_text())
    sweep_dir = work / "runs" / name
    rows, _ = sweep_timing(sweep_dir)
    assert len(rows) == n, f"the sweep left results for {len(rows)} of {n} trials"
    store = work / "results" / name / "mlflow"
    out = {
        "n": n, "plain_wall": plain_wall, "sweep_wall": sweep_wall, "maxrss_mb": launcher["maxrss_kb"] / 1024,
        "end_s": launcher["exited_at"] - max(r["ended_at"] for r in rows),
        "mlflow_mb": _bytes(store.rglob("*")) / 2**20,
        "tune_state_kb": _bytes([*sweep_dir.glob("experiment_state-*.json"), *sweep_dir.glob("*-state-*.json"),
                                 sweep_dir / "tuner.pkl"]) / 1024,
        "version_s": _timed(["--version"], work),
        "status_s": _timed(["status", str(sweep_dir)], work),
        "frontier_s": _timed(["frontier", str(sweep_dir)], work),
        "resume_s": _timed(["launch", str(spec_path), "--resume"], work),
    }
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def table(results: list[dict]) -> list[str]:
    lines = [f"## Orchestration cost as the work grows ({PARALLELISM} trials at once, tiny trials: "
             f"width 8, 1 epoch of {TRAIN_IMAGES} images, {TEST_IMAGES} scored)", "",
             "| N | plain loops wall | sweep wall | sweep / plain | launcher peak RSS | MLflow store | Tune state "
             "| end-of-sweep work | `status` | `frontier` | `--resume` (nothing to run) | fresh CLI process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['n']} | {r['plain_wall']:.1f} s | {r['sweep_wall']:.1f} s | "
                     f"{r['sweep_wall'] / r['plain_wall']:.2f} | {r['maxrss_mb']:.0f} MiB | {r['mlflow_mb']:.1f} MiB | "
                     f"{r['tune_state_kb']:.0f} KiB | {r['end_s']:.1f} s | {r['status_s']:.1f} s | "
                     f"{r['frontier_s']:.1f} s | {r['resume_s']:.1f} s | {r['version_s']:.1f} s |")
    lines += ["", "| between N | plain: s per extra trial | sweep: s per extra trial | ratio (goal at 400: "
              f"<= {GOALS['marginal']}) |", "|---|---|---|---|"]
    for a, b in zip(results, results[1:], strict=False):
        dn = b["n"] - a["n"]
        plain, sweep = (b["plain_wall"] - a["plain_wall"]) / dn, (b["sweep_wall"] - a["sweep_wall"]) / dn
        verdict = f" ({'met' if sweep / plain <= GOALS['marginal'] else 'not met'})" if b["n"] == 400 else ""
        lines.append(f"| {a['n']} -> {b['n']} | {plain:.2f} | {sweep:.2f} | {sweep / plain:.3f}{verdict} |")
    by_n = {r["n"]: r for r in results}
    if 100 in by_n and 1000 in by_n:
        rss = by_n[1000]["maxrss_mb"] / by_n[100]["maxrss_mb"]
        lines += ["", f"- launcher peak RSS, N = 1,000 / N = 100: {rss:.2f} (goal <= {GOALS['rss']}: "
                      f"{'met' if rss <= GOALS['rss'] else 'not met'})"]
    if 1000 in by_n:
        r = by_n[1000]
        lines += [f"- end-of-sweep work at N = 1,000: {r['end_s']:.1f} s (goal <= {GOALS['end_s']:.0f} s: "
                  f"{'met' if r['end_s'] <= GOALS['end_s'] else 'not met'}); `status`: {r['status_s']:.1f} s "
                  f"(goal <= {GOALS['status_s']:.0f} s: {'met' if r['status_s'] <= GOALS['status_s'] else 'not met'};"
                  f" a fresh CLI process alone takes {r['version_s']:.1f} s)"]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [int(n) for n in os.environ.get("BVIT_BENCH_SCALE_N", "25 100 400").split()]  # run_all passes no args
    ap.add_argument("--n", type=int, nargs="+", default=default)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BVIT_SWEEP_RAY_HEAD"] = str(Path(tmp) / "ray-head.json")  # embedded Ray, whatever else runs
        data = tiny_fashion_mnist(Path(tmp))
        results = [run_n(n, data, Path(tmp)) for n in sorted(a.n)]
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
