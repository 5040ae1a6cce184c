"""One launcher per sweep: an exclusive lock on the sweep's directory, taken before anything is checked.

    with sweep_lock(sweep_dir):          # a second launcher of the same sweep gets a UserError at once
        ... can_restore, prepare data, ray.init, fit ...

The lock is `flock` on `<storage>/.<name>.lock`: atomic (two launchers started in the same instant
cannot both get it), released by the kernel when the process ends however it ends (SIGKILL included),
so a crashed launcher never leaves a stale lock behind. The file records the holder's pid, host and
start time for the error message. flock is local to a machine: launchers on two hosts sharing the
storage over NFS are not serialised by it.

A sweep on URI storage (s3://...) has no local folder to lock beside: its lock is beside its local copy,
`<cache>/<hash of the URI>/.<name>.lock` (`orchestrator.storage`), a file keyed by the URI. It serialises the
launchers of that URI on this host only; object stores have no lock a second host would see, so launch a sweep
on shared storage from one host.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import UserError

__all__ = ["sweep_lock", "lock_path"]


def lock_path(sweep_dir: Path) -> Path:
    """`<storage>/.<name>.lock`: beside the sweep directory, so it exists before the sweep does."""
    return sweep_dir.parent / f".{sweep_dir.name}.lock"


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep's lock for the duration of the context; `UserError` if another process holds it."""
    path = lock_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise UserError([f"{sweep_dir}: another launcher is running this sweep ({holder}); wait for it to "
                             "finish, or stop it (Ctrl-C) and then pass --resume"]) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (ValueError, KeyError, OSError):
        return "a process that has not written its details yet"
