"""The persistent local Ray (`bvit-sweep ray up | status | down`): launches attach to it, it outlives them, it
listens on loopback only, `down` stops it and nothing else, and a head it cannot use is never attached to."""
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _sweep_helpers import write_spec
from typer.testing import CliRunner

from orchestrator import local_ray
from orchestrator.cli import app
from orchestrator.errors import InputWarning

runner = CliRunner()

# How many jobs (drivers) of process `pid` the head has seen: one per launch that attached to it.
_JOBS = """
import json, sys, ray
from orchestrator.patches import loopback_only
with loopback_only():
    ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps(sum(int(j["DriverPid"]) == int(sys.argv[2]) for j in ray._private.state.jobs())))
"""


def _jobs(address: str, pid: int) -> int:
    mode = local_ray.attachable_head()[0]["auth_mode"]  # read by Ray as it is imported: set before
    out = subprocess.run([sys.executable, "-c", _JOBS, address, str(pid)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "RAY_AUTH_MODE": mode})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def head_file(tmp_path, monkeypatch):
    import ray

    ray.shutdown()  # a Ray an earlier test left connected would be used as it is ("existing")
    path = tmp_path / "ray-head.json"
    monkeypatch.setenv(local_ray.HEAD_FILE_ENV, str(path))
    yield path
    local_ray.stop_head()  # whatever a failing test left running


def test_up_launch_attaches_and_down_stops_only_it(head_file, fmnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    up = runner.invoke(app, ["ray", "up", "--num-cpus", "2", "--json"])
    assert up.exit_code == 0, up.output
    head = json.loads(up.output)
    assert head["address"].startswith("127.0.0.1:") and json.loads(head_file.read_text()) == head
    listeners = {c.laddr.ip for p in local_ray._processes() for c in _connections(p) if c.status == "LISTEN"}
    assert listeners and listeners <= {"127.0.0.1", "::ffff:127.0.0.1"}, listeners  # loopback only

    again = runner.invoke(app, ["ray", "up"])  # idempotent: the running head, not a second one
    assert again.exit_code == 0 and "already running" in again.output and head["address"] in again.output

    # Launches as a user runs them: each its own process (Ray keeps per-process state between sessions).
    def launch_cli(spec, *extra) -> int:
        proc = subprocess.Popen([sys.executable, "-c", "from orchestrator.cli import app; app()", "launch", str(spec),
                                 "--json", *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["ok"] and len(result["trials"]) == 2
        return proc.pid

    storage = str(tmp_path / "runs")
    attached = launch_cli(write_spec(tmp_path / "s.yaml", fmnist_dir, name="pl", epochs=1, storage=storage))
    assert _jobs(head["address"], attached) == 1  # the launch was a job of the persistent head...
    assert local_ray.attachable_head()[0]["address"] == head["address"]  # ...which outlives it
    embedded = launch_cli(write_spec(tmp_path / "e.yaml", fmnist_dir, name="emb", epochs=1, storage=storage),
                          "--address", "local")
    assert _jobs(head["address"], embedded) == 0  # --address local: an embedded Ray, not the head

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another process
    try:
        down = runner.invoke(app, ["ray", "down"])
        assert down.exit_code == 0 and "stopped the persistent local Ray" in down.output
        assert not head_file.exists() and local_ray._processes() == []
        assert not local_ray._listening(head["address"])
        assert bystander.poll() is None  # only the head's processes were stopped
    finally:
        bystander.kill()
    assert "no persistent local Ray" in runner.invoke(app, ["ray", "down"]).output
    assert "no persistent local Ray" in runner.invoke(app, ["ray", "status"]).output


def _connections(p: psutil.Process) -> list:
    try:
        return p.net_connections(kind="tcp")
    except psutil.Error:
        return []


def test_a_stale_head_file_is_removed_and_not_attached(head_file, free_port):
    head_file.write_text(json.dumps({"address": f"127.0.0.1:{free_port}", "python": sys.prefix,
                                     "project": local_ray._project_root()}))
    assert local_ray.attachable_head() == (None, None)  # nothing listens there (a reboot, a killed head)
    assert not head_file.exists()


def test_a_head_of_another_checkout_is_not_attached_and_says_why(head_file, tmp_path):
    import socket

    with socket.socket() as s:  # something listens at the recorded address
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        head_file.write_text(json.dumps({"address": address, "python": sys.prefix, "project": "/elsewhere/bvit"}))
        head, why = local_ray.attachable_head()
        assert head is None and address in why and "/elsewhere/bvit" in why and "embedded Ray" in why
        status = runner.invoke(app, ["ray", "status"])
        assert status.exit_code == 0 and "/elsewhere/bvit" in status.output
        up = runner.invoke(app, ["ray", "up"])  # refuses to start a second head beside it
        assert up.exit_code == 2 and "bvit-sweep ray down" in up.output and len(up.output.strip().splitlines()) == 1

        from types import SimpleNamespace

        from orchestrator.ray_cluster import ray_session

        with pytest.warns(InputWarning, match="/elsewhere/bvit"):  # the launch says why, then runs embedded
            with ray_session(None, SimpleNamespace(ray_address=None)) as where:
                assert where == "local"
