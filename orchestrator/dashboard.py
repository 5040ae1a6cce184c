"""`bvit-sweep ui`: MLflow's dashboard for a sweep's local store, opened on the sweep's runs.

The server is `mlflow ui` with one web worker (a local SQLite store needs no more; four cost a minute and
a half of start-up on a busy 2-core machine), bound to 127.0.0.1 unless told otherwise, started in its own
process group so that Ctrl-C, SIGTERM or an error stops all of it. The URL is printed only once the server
answers, and it is the URL of the view a researcher wants first: the experiment's runs page, in the
model-training workflow (`?workflowType=machine_learning`). The server is MLflow's own app whose page first
fills the browser's MLflow defaults where it has none (orchestrator/mlflow_ui.py): the model-training layout
on every page, the sweep's view (columns, order, charts; orchestrator/tracking.py) as the experiment's saved
view, so that F5 and Back keep it, and no Assistant panel opening by itself.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

__all__ = ["Dashboard", "open_dashboard", "view_url", "server_command", "check_port", "start", "wait_until_up", "stop", "serve"]

READY_TIMEOUT_S = 180.0  # MLflow's first start (imports, database migrations) on a busy 2-core machine
# MLflow 3.17's server also starts a job runner and eight task-queue processes (GenAI scorers, trace
# archival) unless told not to; a sweep's dashboard needs none of them (a user's own setting wins).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def view_url(base: str, experiment_id: str | None, view_id: str | None = None) -> str:
    """The runs page of one experiment in MLflow 3.17's model-training view (the root page without one)."""
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view_id}" if view_id else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def server_command(uri: str, *, host: str, port: int) -> list[str]:
    """`mlflow ui` for the store at `uri` (one worker, the given interface and port), its page seeded with the
    sweep's defaults (orchestrator/mlflow_ui.py: model-training layout, the sweep's view, no Assistant pop-up)."""
    return [sys.executable, "-m", "orchestrator.mlflow_ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """A UserError (one line, exit 1) when something already listens on host:port; exit 2 when `host` is not
    an address of this machine (a typo, an address that does not exist)."""
    try:
        if host.replace(".", "").isdigit():  # looks like an IPv4 address: no name lookup for a malformed one
            ipaddress.IPv4Address(host)
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise UserError([f"--host {host}: not an address this machine can listen on ({e}); use 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every interface)"]) from None
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError([f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 "
                                 "(this machine only) or 0.0.0.0 (every interface)"]) from None
            raise UserError([f"port {port} on {host} is in use ({e.strerror}); pick another, e.g. "
                             f"`--port {_free_port(host)}`"], code=1) from None


@dataclass
class Dashboard:
    """A running MLflow server: its process (leader of its own process group), base URL and log file."""
    proc: subprocess.Popen
    base: str
    log: Path


def start(cmd: list[str], *, host: str, port: int, log: Path) -> Dashboard:
    """Start the server in a new session (its own process group), its output into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**SERVER_ENV, **os.environ})
    return Dashboard(proc=proc, base=f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", log=log)


def wait_until_up(dash: Dashboard, *, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll the server's /health until it answers; a UserError if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dash.proc.poll() is not None:
            tail = dash.log.read_text(errors="replace").strip().splitlines()[-3:] if dash.log.exists() else []
            raise UserError([f"the MLflow server exited with code {dash.proc.returncode} before answering; "
                             f"its log: {dash.log}", *("  " + line for line in tail)], code=1)
        try:
            with urllib.request.urlopen(f"{dash.base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    stop(dash)
    raise UserError([f"the MLflow server did not answer on {dash.base} within {timeout_s:.0f} s; its log: {dash.log}"],
                    code=1)


def stop(dash: Dashboard, *, grace_s: float = 10.0) -> None:
    """SIGTERM the server's whole process group (uvicorn and its worker), SIGKILL after `grace_s`."""
    if dash.proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(dash.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            dash.proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(cmd: list[str], *, host: str, port: int, log: Path, url_for: Callable[[str], str],
          echo: Callable[[str], None] = print, more_urls: Callable[[str], dict[str, str]] | None = None) -> int:
    """Run the dashboard in the foreground: check the port, start, wait until it answers, print the view's
    URL (`url_for(base)`; then `more_urls(base)`: {what: URL}), then wait; SIGINT/SIGTERM stop the server's
    process group. Returns the exit code."""
    check_port(host, port)
    dash = start(cmd, host=host, port=port, log=log)
    stopping: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        echo(f"starting MLflow on {dash.base} (one worker; log {log}) ...")
        wait_until_up(dash)
        echo(f"MLflow dashboard, the sweep's runs: {url_for(dash.base)}")
        for what, url in (more_urls(dash.base) if more_urls else {}).items():
            echo(f"  {what}: {url}")
        echo("Ctrl-C stops it.")
        return dash.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(dash)
        for s, handler in previous.items():
            signal.signal(s, handler)


def open_dashboard(*, uri: str, experiment: str | None, log_dir: Path, host: str = "127.0.0.1", port: int = 5000,
                   echo: Callable[[str], None] = print) -> int:
    """`bvit-sweep ui`: set up the sweep's experiment for the UI (model-training kind, the saved view), then
    serve the store and print the URL of the experiment's runs. Returns the server's exit code."""
    from orchestrator.tracking import CELLS_VIEW_ID, prepare_experiment

    check_port(host, port)  # before seconds of imports: a busy port fails at once
    experiment_id = prepare_experiment(uri, experiment)
    cells = (lambda base: {"by cell, seeds averaged": view_url(base, experiment_id, CELLS_VIEW_ID)}) if experiment_id else None
    return serve(server_command(uri, host=host, port=port), host=host, port=port, log=Path(log_dir) / "ui.log",
                 url_for=lambda base: view_url(base, experiment_id), echo=echo, more_urls=cells)
