"""Nothing the launcher starts outlives it: a small watcher process that cleans up after a killed launcher.

    reaper = Reaper.start()       # before ray.init: it learns the launcher's process tree as it grows
    ...                           # the sweep; a SIGKILL of the launcher anywhere in here is covered
    reaper.stop()                 # after a clean ray.shutdown(): the watcher exits, killing nothing

Ray fate-shares its GCS and raylet with the driver that started them, but not the raylet's agents
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`): after a SIGKILL of the launcher they live on, reparented
to init, and ignore SIGTERM. The watcher runs in its own session (Ctrl-C in the terminal does not reach
it), polls the launcher's descendants while the launcher lives, and when the launcher is gone without
having said `done` (its end of a pipe closes: the kernel does that however a process dies), sends
SIGTERM, then SIGKILL, to every remembered process still alive (matched by pid and start time, so a
reused pid is never hit).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys

import psutil

__all__ = ["Reaper", "terminate_then_kill"]

POLL_S = 0.5
GRACE_S = 3.0


class Reaper:
    """The launcher's side: a handle on the watcher process."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @classmethod
    def start(cls) -> Reaper:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.reaper", str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        return cls(proc)

    def stop(self) -> None:
        """The launcher ends cleanly: tell the watcher to exit without killing anything."""
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _remember(parent: psutil.Process, seen: dict[int, float]) -> None:
    try:
        for child in parent.children(recursive=True):
            if child.pid == os.getpid():
                continue
            try:
                seen.setdefault(child.pid, child.create_time())
            except psutil.Error:
                pass
    except psutil.Error:
        pass


def _reap(seen: dict[int, float]) -> None:
    mine = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                mine.append(p)
        except psutil.Error:
            pass
    terminate_then_kill(mine, GRACE_S)


def terminate_then_kill(procs: list, grace_s: float) -> None:
    """SIGTERM each process, SIGKILL those still alive after `grace_s`, wait for them (gone ones are skipped)."""
    alive = []
    for p in procs:
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=grace_s)


def main(parent_pid: int) -> int:
    """Watch `parent_pid` until it says `done` on stdin (exit quietly) or dies (kill what it started)."""
    parent = psutil.Process(parent_pid)
    seen: dict[int, float] = {}
    fd = sys.stdin.fileno()
    buf = b""
    while True:
        _remember(parent, seen)
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if not ready:
            continue
        chunk = os.read(fd, 1024)
        buf += chunk
        if b"done" in buf:
            return 0
        if not chunk:  # EOF without "done": the launcher died
            _reap(seen)
            return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
