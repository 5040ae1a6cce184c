"""`make bench`: every benchmark in one run; prints their tables and writes results/bench/<date>.md.

Each benchmark prints side-by-side ratios measured in the same run (never an asserted wall-clock time):
bench/model.py (bViT vs timm ViT), bench/loader.py (FFCV vs torch DataLoader), bench/plan.py (planning a
10,000-trial grid), bench/orchestration.py (sweep vs plain loop), bench/scale.py (the same as the number of trials grows).
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["model.py", "loader.py", "plan.py", "orchestration.py", "scale.py"]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES, help="run only these (default: all)")
    only = ap.parse_args().only
    sys.path.insert(0, str(ROOT))
    from orchestrator.results import git_sha

    sections = []
    for name in only:
        print(f"== bench/{name}", flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / name)], cwd=ROOT, capture_output=True, text=True)
        out = proc.stdout.strip() or "(no output)"
        if proc.returncode:
            out += f"\n\nFAILED (exit {proc.returncode}):\n```\n{proc.stderr[-3000:]}\n```"
        print(out, flush=True)
        sections.append(f"### bench/{name}\n\n{out}\n")
    now = dt.datetime.now(dt.UTC)
    head = (f"# Benchmarks {now:%Y-%m-%d %H:%M} UTC\n\nmachine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; git {git_sha(ROOT)}; command: `{_command(only)}`\n\n")
    out_dir = ROOT / "results" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{now:%Y-%m-%d}.md"
    if path.exists():  # a second run the same day: keep the first's record beside it
        path = out_dir / f"{now:%Y-%m-%d-%H%M}.md"
    path.write_text(head + "\n".join(sections))
    print(f"wrote {path}")


def _command(only: list[str]) -> str:
    case = "".join(f"{k}={os.environ[k]!r} " if " " in os.environ[k] else f"{k}={os.environ[k]} "
                   for k in ("BVIT_BENCH_CASE", "BVIT_BENCH_SCALE_N") if os.environ.get(k))
    return case + ("make bench" if only == BENCHES else f"python bench/run_all.py --only {' '.join(only)}")


if __name__ == "__main__":
    main()
