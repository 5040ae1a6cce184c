"""A persistent local Ray for people who iterate: started once, attached to by every launch, stopped by one command.

    bvit-sweep ray up        # a Ray head on 127.0.0.1 that outlives launches (its address in HEAD_FILE)
    bvit-sweep launch ...    # no --address / RAY_ADDRESS / ray_address: attaches to it (no Ray start per launch)
    bvit-sweep ray down      # stops it (only it: other Ray instances on the machine are left alone)

The head listens on loopback only (Ray's "clusters disabled" setting, as for the embedded Ray) and has no
dashboard. It keeps its files in its own temp dir (`temp_dir()`, not /tmp/ray), so a plain `ray.init()` elsewhere
does not find it and `down` can tell its processes from any other Ray's. Its workers preload what a trial imports
(`trainable.PRELOAD`), like the embedded Ray's. Ray starts a job's workers when its driver connects, so each launch's
trials import the code as it is at that launch; what the head keeps from `up` is its Python, its project checkout
and its environment variables. A launch from another Python or checkout does not attach (it says so and runs an
embedded Ray). Authentication as for the embedded Ray: Ray's token (~/.ray/auth_token, made if missing) unless
RAY_AUTH_MODE says otherwise when `up` runs; launches attach in the head's mode.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

__all__ = ["HEAD_ENV", "HEAD_FILE_ENV", "attachable_head", "head_file", "start_head", "stop_head", "temp_dir"]

HEAD_FILE_ENV = "BVIT_SWEEP_RAY_HEAD"  # where the running head's address is recorded (tests point it elsewhere)
# The head's (and so its workers') environment: loopback only, and what Tune gives every trial actor.
HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PL_DISABLE_FORK": "1"}
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def head_file() -> Path:
    return Path(os.environ.get(HEAD_FILE_ENV) or Path.home() / ".cache" / "bvit-sweep" / "ray-head.json")


def temp_dir() -> Path:
    """The head's own Ray temp dir (short: Ray's socket paths must fit 107 bytes), one per head file."""
    import hashlib

    tag = hashlib.sha256(str(head_file().resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"bvit-ray-{os.getuid()}-{tag}"


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _listening(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def _read() -> dict[str, Any] | None:
    try:
        head = json.loads(head_file().read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) and isinstance(head.get("address"), str) else None


def attachable_head() -> tuple[dict[str, Any] | None, str | None]:
    """(the running head to attach to, None) or (None, why not: None when there is no head at all).

    A head file whose head no longer answers (a reboot, a killed head) is stale: removed, no head."""
    head = _read()
    if head is None:
        return None, None
    if not _listening(head["address"]):
        head_file().unlink(missing_ok=True)
        return None, None
    if head.get("python") != sys.prefix or head.get("project") != _project_root():
        return None, (f"the persistent Ray at {head['address']} runs the Python environment {head.get('python')} "
                      f"and the code in {head.get('project')}, this launch {sys.prefix} and {_project_root()}: "
                      "running on an embedded Ray instead "
                      "(`bvit-sweep ray down` then `bvit-sweep ray up` from here to use it)")
    return head, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int | None = None) -> dict[str, Any]:
    """Start the persistent head (or return the running one); record it in `head_file()`."""
    from ray.tune.execution.class_cache import ENV_VARS_TO_PROPAGATE

    from orchestrator.trainable import PRELOAD

    head, why = attachable_head()
    if head is not None:
        return {**head, "already_running": True}
    if why is not None:
        raise UserError([f"{head_file()}: a persistent local Ray of another environment or checkout runs "
                         f"({why.split(': running', 1)[0]}); stop it first with `bvit-sweep ray down`"])
    num_cpus = num_cpus or os.cpu_count() or 1
    address = f"127.0.0.1:{_free_port()}"
    # Ray 2.60's embedded Ray uses token authentication by default (making the token if missing); `ray start`
    # only when a token exists: the head is made to match, and launches attach in its mode.
    auth = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if auth == "token":
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       capture_output=True, timeout=60)  # prints the token: not shown
    # Tune gives an actor a runtime env of its own (and so a new worker process) when the launch has any of these
    # set (AWS credentials, Train's settings): the head's workers have none of them, never a stale value.
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS_TO_PROPAGATE} | HEAD_ENV | {"RAY_AUTH_MODE": auth}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={address.rpartition(':')[2]}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir()}",
           f"--system-config={json.dumps({'preload_python_modules': [PRELOAD]})}"]
    started = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if out.returncode or not _listening(address, timeout=5.0):
        stop_head()
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError([f"`ray start --head` failed (exit {out.returncode}): {tail[0]}"])
    head = {"address": address, "num_cpus": num_cpus, "temp_dir": str(temp_dir()), "python": sys.prefix,
            "project": _project_root(), "auth_mode": auth, "started_at": started, "start_s": round(time.time() - started, 2),
            "inherited": {k: v for k, v in HEAD_ENV.items() if k == "PL_DISABLE_FORK"}}
    head_file().parent.mkdir(parents=True, exist_ok=True)
    tmp = head_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(head, indent=1))
    tmp.replace(head_file())
    return head


def _processes() -> list:
    import psutil  # a Ray dependency

    mark, found = str(temp_dir()), []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.info["uids"] and p.info["uids"].real == os.getuid() and p.pid != os.getpid() \
                    and any(mark in arg for arg in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.Error, TypeError):
            continue
    return found


def stop_head() -> int:
    """Stop the persistent head's processes (SIGTERM, then SIGKILL after STOP_GRACE_S); the number stopped."""
    from orchestrator.reaper import terminate_then_kill

    procs = _processes()
    terminate_then_kill(procs, STOP_GRACE_S)
    head_file().unlink(missing_ok=True)
    return len(procs)
