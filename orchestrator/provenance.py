"""Where a result came from: the git SHA a sweep ran (recorded at launch in run.json, or read from the
checkout), and the machine and software it ran on (CPU model and ISA, cores, torch's oneDNN / MKL / CUDA
and threads, package versions), recorded in run.json and in each trial's records."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["PROVENANCE_KEY", "git_sha", "code_version", "cpu_info", "machine_provenance", "package_versions", "relative_to_repo",
           "torch_runtime"]


def git_sha(cwd: Path | None = None) -> str:
    """HEAD's SHA, with '-dirty' when the work tree has uncommitted changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def code_version(results_dir: Path | None = None) -> str:
    """The git SHA of the code a sweep ran: run.json's (recorded at launch), else the checkout this package
    lives in, else the working directory's; 'unknown' only when none is a git checkout."""
    if results_dir is not None and (results_dir / "run.json").exists():
        sha = json.loads((results_dir / "run.json").read_text()).get("git_sha")
        if sha and sha != "unknown":
            return sha
    sha = git_sha(Path(__file__).resolve().parent)
    return sha if sha != "unknown" else git_sha()


# ---- the machine and software a number came from -----------------------------------------------------------
# Float results of training differ across CPU types (oneDNN and MKL pick kernels by ISA): what to record.
_ISA = re.compile(r"^(sse\d?(_\d)?|ssse3|avx\w*|fma\w*|f16c|amx\w*|bmi\d|\w*vnni\w*|\w*bf16\w*|neon|asimd\w*|sve\w*)$")
PROVENANCE_KEY = "provenance"  # in every trial result: the machine and software that computed it
_PACKAGES = ("torch", "ray", "mlflow", "timm", "numpy", "ffcv")


def cpu_info() -> dict[str, Any]:
    """This machine's CPU: model name, the ISA extensions numeric kernels choose by, logical and physical cores."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = sorted(f for f in value.split() if _ISA.match(f))
    except OSError:
        pass
    try:
        import psutil  # a Ray dependency
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {"cpu_model": model, "cpu_isa": flags, "cpu_logical_cores": os.cpu_count(),
            "cpu_physical_cores": physical, "machine": platform.machine(), "os": platform.platform()}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (read from their metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def torch_runtime() -> dict[str, Any]:
    """What torch computes with in this process: oneDNN, MKL, CUDA/cuDNN versions and its thread counts.
    Imports torch: call it where torch is loaded already (a trial process)."""
    import torch

    config = torch.__config__.show()
    onednn = re.search(r"(?:oneDNN|MKL-DNN)\s*v?([\w.\-]+(?:\s*\(Git Hash \w+\))?)", config)
    mkl = re.search(r"Intel\(R\)[^\n]*Math Kernel Library Version ([\w.]+)", config)
    # cuDNN's version only where this process uses CUDA already: asking loads it, and a CPU trial never does
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_initialized() else None
    return {"torch_onednn": onednn.group(1) if onednn else None, "torch_mkl": mkl.group(1) if mkl else None,
            "torch_mkl_available": torch.backends.mkl.is_available(), "torch_cuda": torch.version.cuda,
            "torch_cudnn": cudnn, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def machine_provenance(*, with_torch: bool = False) -> dict[str, Any]:
    """CPU model and ISA, cores, package versions (and, `with_torch`, torch's kernels and threads)."""
    out = {**cpu_info(), "versions": package_versions()}
    if with_torch:
        out.update(torch_runtime())
    return out


def relative_to_repo(path: Path | str) -> str:
    """`path` relative to the repository (or working directory) it lies in; as given when it lies outside."""
    path = Path(path).resolve()
    for root in (_repo_root(), Path.cwd().resolve()):
        if root is not None and path.is_relative_to(root):
            return path.relative_to(root).as_posix() or "."
    return str(path)


def _repo_root() -> Path | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return None
