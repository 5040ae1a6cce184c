"""Nothing the launcher starts outlives it: a SIGKILLed launcher's Ray processes are cleaned up; the sweep lock."""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from orchestrator.errors import UserError
from orchestrator.lock import lock_path, sweep_lock

LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    import ray
    from orchestrator.reaper import Reaper
    reaper = Reaper.start()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    print("ready", flush=True)
    if sys.argv[1] == "clean":
        ray.shutdown()
        reaper.stop()
        print("stopped", flush=True)
    time.sleep(600)
""")


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def test_a_sigkilled_launcher_leaves_no_ray_process_behind(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "kill"], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60  # the raylet's agents start a moment after ray.init returns
        while True:
            started = _descendants(proc.pid)
            names = {p.name() for p in started}
            if any("Agent" in n for n in names) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert any("Agent" in n for n in names), names  # what used to outlive the launcher
        watchers = [p for p in started if "orchestrator.reaper" in " ".join(p.cmdline())]
        assert len(watchers) == 1
        ray_procs = [p for p in started if p not in watchers]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_gone(ray_procs, timeout=20) == []
    assert _wait_gone(watchers, timeout=10) == []


def test_a_clean_stop_kills_nothing():
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "clean"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "stopped"
        assert not any("orchestrator.reaper" in " ".join(p.cmdline()) for p in _descendants(proc.pid))
        assert proc.poll() is None  # the launcher itself carries on
    finally:
        proc.kill()
        proc.wait()


def _hold(path: str, ready, release) -> None:
    from pathlib import Path

    with sweep_lock(Path(path)):
        ready.set()
        release.wait(30)


def test_a_second_launcher_of_the_same_sweep_is_refused_until_the_first_ends(tmp_path):
    sweep = tmp_path / "runs" / "width"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(sweep), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError) as e, sweep_lock(sweep):
            pass
        assert e.value.code == 2
        assert e.value.lines[0].startswith(f"{sweep}: another launcher is running this sweep (pid {holder.pid} on ")
    finally:
        release.set()
        holder.join(30)
    with sweep_lock(sweep):  # released when its holder ended
        assert lock_path(sweep).exists()


def test_the_lock_is_released_when_its_holder_is_sigkilled(tmp_path):
    sweep = tmp_path / "runs" / "s"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(sweep), ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with sweep_lock(sweep):
        pass


# ---- the real launcher: lock, loopback, reaper ---------------------------------------------------------------


def test_launch_of_a_sweep_another_launcher_holds_is_refused_in_one_line(tmp_path, monkeypatch):
    """The lock is taken before anything else: data that does not exist is not even looked at."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("name: held\nbase: {data: {path: /nonexistent/data}}\n")
    sweep = tmp_path / "runs" / "held"
    with sweep_lock(sweep):  # this process is the first launcher
        r = CliRunner().invoke(app, ["launch", "s.yaml"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{sweep}: another launcher is running this sweep (pid {os.getpid()} on "), line
    assert line.endswith("wait for it to finish, or stop it (Ctrl-C) and then pass --resume")
    assert not sweep.exists()


def _start_launcher(tmp_path, fmnist_dir) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A real `launch()` of a one-trial sweep in a subprocess, returned once its trial is running
    (with the Ray processes it started: everything under it but the watcher)."""
    from _sweep_helpers import write_spec

    spec = write_spec(tmp_path / "s.yaml", fmnist_dir, name="k", epochs=50, axes={"model.arch": ["bvit"]})
    code = f"from orchestrator.launch import launch; launch(spec_path={str(spec)!r}, verbose=False)"
    log = open(tmp_path / "launcher.log", "w")  # noqa: SIM115  (read back when the launcher fails)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        if any(p.stat().st_size for p in (tmp_path / "runs" / "k").glob("*/result.json")):  # an epoch reported
            started = _descendants(proc.pid)
            return proc, [p for p in started if "orchestrator.reaper" not in " ".join(p.cmdline())]
    proc.kill()
    pytest.fail("no trial started within 2 minutes:\n" + (tmp_path / "launcher.log").read_text()[-3000:])


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_a_launchs_local_ray_listens_on_loopback_only(tmp_path, fmnist_dir):
    import ipaddress

    proc, ray_procs = _start_launcher(tmp_path, fmnist_dir)
    try:
        sockets = _listening(ray_procs)
        assert sockets, "no listening socket found: the check sees nothing"
        exposed = [s for s in sockets if not ipaddress.ip_address(s[1].removeprefix("::ffff:")).is_loopback]
        assert exposed == [], exposed
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_sigkilled_launch_leaves_no_ray_process_behind(tmp_path, fmnist_dir):
    proc, ray_procs = _start_launcher(tmp_path, fmnist_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_gone(ray_procs, timeout=20) == []


SESSION = textwrap.dedent("""
    import json, psutil
    from types import SimpleNamespace
    from orchestrator.launch import ray_session
    with ray_session(None, SimpleNamespace(ray_address=None)) as where:
        started = [p for p in psutil.Process().children(recursive=True)
                   if "orchestrator.reaper" not in " ".join(p.cmdline())]
        names = [" ".join(p.cmdline()) for p in started]
    _, alive = psutil.wait_procs(started, timeout=10)
    alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({"where": where, "monitor": any("monitor.py" in n for n in names), "started": len(started),
                      "alive": alive}))
""")


def test_a_clean_end_of_the_embedded_ray_leaves_no_process_behind():
    """The launcher stops its embedded Ray itself at the end (the autoscaler monitor first, then Ray's own
    shutdown): every process it started is gone, with no watcher needed."""
    import json

    proc = subprocess.run([sys.executable, "-c", SESSION], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["where"] == "local" and seen["monitor"] and seen["started"] >= 4  # GCS, raylet, monitor, workers...
    assert seen["alive"] == []
