"""The GPU check's CPU path (issue 20): bench/gpu.py --tiny, and scripts/gpu-check.sh --tiny end to end.

The device run itself needs the lent GPU; these make sure it is not the first run of its code. They check
what the reports contain (both arms, sane ratios), never wall-clock thresholds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_peak_table_names_its_source():
    code = ("import sys; sys.path.insert(0, 'bench'); import gpu, torch\n"
            "torch.cuda.get_device_name = lambda d=None: NAME\n"
            "for NAME in ('NVIDIA H200', 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200 NVL', 'Tesla T4'):\n"
            "    print(NAME, *gpu.peak_flops(torch.device('cuda')), sep='|')\n")
    lines = _run([sys.executable, "-c", code], timeout=120).stdout.strip().splitlines()
    got = {line.split("|")[0]: line.split("|")[1:] for line in lines}
    assert float(got["NVIDIA H200"][0]) == 989.4e12 and "datasheet" in got["NVIDIA H200"][1]
    assert float(got["NVIDIA H100 80GB HBM3"][0]) == 989.4e12
    assert float(got["NVIDIA H100 PCIe"][0]) == 756e12
    assert float(got["NVIDIA H200 NVL"][0]) == 835e12
    assert got["Tesla T4"][0] == "None" and "not in" in got["Tesla T4"][1]


@pytest.mark.slow  # minutes here: `make test-slow` (the default suite stays ~20 min on 2 cores)
def test_bench_gpu_tiny_reports_both_arms(tmp_path):
    """bench/gpu.py --tiny: every section runs on the CPU and the report compares the two arms sanely."""
    _run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(tmp_path), "--data", str(tmp_path / "none"),
          "--budget-s", "300"], timeout=600)
    [md] = tmp_path.glob("*-tiny.md")
    data = json.loads(md.with_suffix(".json").read_text())
    text = md.read_text()
    arms = ["bViT-tiny", "ViT-tiny"]
    sec = data["sections"]
    for title in ("## 1. Training", "## 2. Memory", "## 3. Largest batch", "## 4. Loaders: skipped",
                  "## 5. torch.compile"):
        assert title in text, f"{title!r} missing from:\n{text}"
    assert "FAILED" not in text, text
    train = sec["train"]
    assert set(train["img_per_s"]) == set(arms) and all(v > 0 for v in train["img_per_s"].values())
    # Same width and steps = depth: equal FLOPs (flop_counter), and the bViT has fewer parameters.
    fwd = {k: v[0] for k, v in train["flops"].items()}
    both = {k: v[1] for k, v in train["flops"].items()}
    assert fwd["bViT-tiny"] == pytest.approx(fwd["ViT-tiny"], rel=1e-6)
    assert 2.5 <= both["ViT-tiny"] / fwd["ViT-tiny"] <= 3.5  # backward ~ 2x forward
    assert train["params"]["bViT-tiny"] < train["params"]["ViT-tiny"]
    for arm in arms:  # per-step checkpointing keeps less for backward
        assert 0 < sec["memory"][arm]["checkpointing"] < sec["memory"][arm]["plain"]
        assert sec["largest_batch"][arm] >= train["batch"]
        assert sec["compile"]["seconds"][arm] > 0 and sec["compile"]["img_per_s"][arm] > 0
    assert data["peak_flops"] is None and "| MFU" not in text  # no peak for a CPU


def test_scripts_parse_and_bundle_is_ignored():
    for script in ("scripts/gpu-check.sh", "scripts/gpu-bundle.sh"):
        _run(["bash", "-n", script], timeout=30)
    ignored = subprocess.run(["git", "check-ignore", ".gpu-bundle/part1/x", ".gpu-out/x"], cwd=ROOT)
    assert ignored.returncode == 0, "the bundle and the tiny run's output must stay out of git"
    help_text = _run(["bash", "scripts/gpu-check.sh", "--help"], timeout=30).stdout
    assert "--tiny" in help_text and "$OUT" in help_text


@pytest.mark.slow
def test_gpu_check_tiny_end_to_end(tmp_path):
    """scripts/gpu-check.sh --tiny: bench, then the spec's smoke sweep through Ray on a node told it has a GPU
    (so `resources.gpus: 0.25` schedules), packed into at most 8 files, as the device tool returns them."""
    out = tmp_path / "out"
    proc = _run(["bash", "scripts/gpu-check.sh", "--tiny"], timeout=900,
                env={"OUT": str(out), "GPU_CHECK_RUN_DIR": str(tmp_path / "run")})
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu-check.log", "summary.md", "results.tgz"} <= set(files), files
    summary = (out / "summary.md").read_text()
    assert "- imports: ok" in summary and "- data: ok" in summary and "bench: exit 0" in summary, summary
    assert "sweep: launcher exit 0" in summary and "## 1. Training" in summary, summary
    assert summary.count("TERMINATED") >= 3, summary  # the status count and both trials' rows
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("gpu-fmnist-width-smoke/trials.csv") for n in names), names
    assert any(n.endswith("gpu-fmnist-width-smoke/frontier.csv") for n in names), names
    assert any(n.startswith("results/gpu/") and n.endswith("-tiny.md") for n in names), names
    assert not any(n.endswith(".pt") for n in names), "checkpoints stay on the device"
    assert "gpu-check: total" in proc.stdout
