"""Which code a sweep ran: the git SHA recorded at launch (run.json) or read from the checkout."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

__all__ = ["git_sha", "code_version"]


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
