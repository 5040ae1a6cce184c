"""`make test-cluster`, after scripts/test-cluster.sh has a Docker engine up: the real cluster, checked from the host.

Builds the project image and a PostgreSQL stand-in from the local base, runs the image alone on the smoke
sweep, brings docker/compose.yaml up (PostgreSQL, MLflow, a Ray head, two CPU Ray workers) and submits sweeps
the README's way (`ray job submit ... -- bvit-sweep launch ...`). From the host it checks:
  1. trials of one sweep ran on >= 2 worker containers (trials.csv's node, mapped to containers);
  2. MLflow, over REST, holds the sweep's parent run and exactly one child run per trial, in PostgreSQL, and
     still after `docker compose restart mlflow`;
  3. a worker killed (`docker kill`) mid-trial: the trial resumes on a survivor from its last checkpoint (each
     epoch reported once), the sweep completes, no trial counted twice, no duplicate MLflow child;
  4. MLflow stopped during a sweep: training completes, and `bvit-sweep sync` back-fills every epoch.
It tears everything down (`down -v`) also when a check fails, and writes results/cluster/<date>.md with each
phase's wall time, the image sizes and the commands.

Run it through `make test-cluster` (root, a fresh clone is fine); alone it needs a running engine with the
buildx and compose v2 plugins, and BASE_IMAGE present locally.
"""
from __future__ import annotations

import csv
import datetime as dt
import http.server
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"bvit-sweep:{VERSION}"
PG_IMAGE = "local/postgres:15-bookworm"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "local/debian:bookworm")
PROJECT = os.environ.get("BVIT_CLUSTER_PROJECT", "bvit-cluster-test")
RAY = str(Path(sys.executable).parent / "ray")
SPEC = "sweeps/cluster.yaml"
EPOCHS = 5  # sweeps/cluster.yaml's optim.epochs
JOB_TIMEOUT_S = 900


class CheckFailed(AssertionError):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)
    print(f"  ok: {message}")


# --- running things, timing phases ---------------------------------------------------------------------------

PHASES: list[tuple[str, float, str]] = []  # (phase, seconds, command)
CHECKS: list[str] = []


def run(cmd: list[str], *, check_rc: bool = True, capture: bool = False, env: dict | None = None,
        timeout: float | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print(f"$ {shlex.join(cmd)}", flush=True)
    p = subprocess.run(cmd, text=True, capture_output=capture, env={**os.environ, **(env or {})}, timeout=timeout)
    if check_rc and p.returncode != 0:
        detail = (p.stdout or "")[-3000:] + (p.stderr or "")[-3000:] if capture else ""
        raise CheckFailed(f"`{shlex.join(cmd)}` exited {p.returncode}\n{detail}")
    return p


class phase:
    """`with phase("cluster up", cmd):` times the block and records it for the report."""

    def __init__(self, name: str, command: str = "") -> None:
        self.name, self.command = name, command

    def __enter__(self):
        print(f"\n== {self.name}", flush=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        seconds = time.monotonic() - self.t0
        command = re.sub(r"/tmp/bvit-cluster-[^/\s]+", "<tmp>", self.command)
        PHASES.append((self.name + ("" if exc[0] is None else " (FAILED)"), seconds, command))
        print(f"== {self.name}: {seconds:.1f} s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- build inputs: the host's pip indexes and CA certificates, handed to the build as secrets --------------------

def serve_local_pip_sources() -> tuple[str, http.server.ThreadingHTTPServer | None]:
    """pip.conf text for the build: the host's file:// indexes and wheel directories, served on 127.0.0.1.

    A build reaches the host's loopback only with `--network host`; the image keeps none of it (a secret).
    """
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf = dict(re.findall(r"^global\.([\w-]+)='(.*)'$", out, re.M))
    roots: dict[str, Path] = {}
    extra, links = [], []
    for url in conf.get("extra-index-url", "").split():
        if url.startswith("file://"):
            path = Path(urllib.parse.urlparse(url).path)
            key = f"i{len(roots)}"
            roots[key] = path.parent  # the index's links (../../files/...) stay inside its parent
            extra.append((key, path.name))
    for item in conf.get("find-links", "").split():
        if Path(item).is_dir():
            key = f"w{len(roots)}"
            roots[key] = Path(item)
            links.append(key)
    if not roots:
        return "", None
    serve_dir = Path(tempfile.mkdtemp(prefix="bvit-pip-"))
    for key, path in roots.items():
        (serve_dir / key).symlink_to(path)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(serve_dir), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    lines = ["[global]", "trusted-host = 127.0.0.1"]
    if extra:
        lines.append("extra-index-url = " + " ".join(f"{base}/{k}/{name}" for k, name in extra))
    if links:
        lines.append("find-links = " + " ".join(f"{base}/{k}/" for k in links))
    print(f"build: serving the host's pip sources {sorted(map(str, roots.values()))} on {base} for the build")
    return "\n".join(lines) + "\n", server


def build_secrets(tmp: Path) -> list[str]:
    args = []
    pip_conf, _ = serve_local_pip_sources()
    if pip_conf:
        (tmp / "pip.conf").write_text(pip_conf)
        args += ["--secret", f"id=pip_conf,src={tmp / 'pip.conf'}"]
    cas = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if cas:
        (tmp / "ca.pem").write_text("".join(p.read_text() for p in cas))
        args += ["--secret", f"id=ca_certs,src={tmp / 'ca.pem'}"]
        print(f"build: extra CA certificates for pip: {[p.name for p in cas]}")
    return args


def build_commands(secret_args: list[str]) -> list[list[str]]:
    return [
        ["docker", "buildx", "build", "--load", "--progress", "plain", "--network", "host", *secret_args,
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", "docker/Dockerfile", "-t", IMAGE, "."],
        ["docker", "buildx", "build", "--load", "--progress", "plain", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
         "-f", "docker/Dockerfile.postgres", "-t", PG_IMAGE, "docker/postgres"],
    ]


def build(commands: list[list[str]], log: Path) -> None:
    with open(log, "a") as f:
        for cmd in commands:
            print(f"$ {shlex.join(cmd)}   (log: {log})", flush=True)
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            if p.returncode != 0:
                raise CheckFailed(f"build failed ({shlex.join(cmd)}); last lines of {log}:\n"
                                  + "".join(log.read_text().splitlines(keepends=True)[-30:]))


def image_size(image: str) -> int:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture=True, quiet=True).stdout)


# --- the compose cluster ----------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.results = tmp / "results"
        for d in (self.data, self.results):
            d.mkdir()
            os.chown(d, 1000, 1000)  # the image's user
        self.mlflow_port, self.ray_port = free_port(), free_port()
        self.token = secrets.token_hex(32)
        self.env_file = tmp / "cluster.env"
        self.env_file.write_text("\n".join(f"{k}={v}" for k, v in {
            "POSTGRES_PASSWORD": secrets.token_hex(24), "RAY_AUTH_TOKEN": self.token,
            "POSTGRES_IMAGE": PG_IMAGE, "BASE_IMAGE": BASE_IMAGE,
            "BVIT_DATA_DIR": self.data, "BVIT_RESULTS_DIR": self.results,
            "MLFLOW_PORT": self.mlflow_port, "RAY_DASHBOARD_PORT": self.ray_port,
            "RAY_SHM_SIZE": "1gb", "RAY_CPU_WORKERS": 2, "RAY_WORKER_CPUS": 1,
        }.items()) + "\n")
        os.chmod(self.env_file, 0o600)
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.ray_address = f"http://127.0.0.1:{self.ray_port}"
        self.ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(["docker", "compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file),
                    *args], **kw)

    def compose_cmd(self, *args: str) -> str:
        return f"docker compose -p {PROJECT} -f docker/compose.yaml --env-file <env> {' '.join(args)}"

    def containers(self, service: str) -> dict[str, str]:
        """{container name: IP on the compose network} of a service's running containers."""
        ids = self.compose("ps", "-q", service, capture=True, quiet=True).stdout.split()
        out = {}
        for cid in ids:
            name, ip = run(["docker", "inspect", "-f", "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                            cid], capture=True, quiet=True).stdout.split()
            out[name.lstrip("/")] = ip
        return out

    def head(self) -> str:
        return next(iter(self.containers("ray-head")))

    # Ray jobs, the README's way
    def submit(self, command: str, job_id: str) -> None:
        """`ray job submit ... -- bash -c 'cd /app && COMMAND'` (unquoted, Ray would run the quoted string as a
        program name: /bin/sh: 1: cd /app && ...: not found)."""
        run([RAY, "job", "submit", "--address", self.ray_address, "--submission-id", job_id, "--no-wait",
             "--", "bash", "-c", f"cd /app && {command}"], env=self.ray_env, capture=True)

    def jobs(self):
        os.environ.update(self.ray_env)  # read when ray is imported: the client authenticates with RAY_AUTH_TOKEN
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.ray_address)

    def job_status(self, job_id: str) -> str:
        return str(self.jobs().get_job_status(job_id).value)

    def job_logs(self, job_id: str) -> str:
        return self.jobs().get_job_logs(job_id)

    def wait_job(self, job_id: str, *, timeout: float = JOB_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                logs = self.job_logs(job_id)
                (self.tmp / f"{job_id}.log").write_text(logs)
                if status != "SUCCEEDED":
                    raise CheckFailed(f"job {job_id} {status}; its log ends:\n{logs[-4000:]}")
                return logs
            time.sleep(3)
        raise CheckFailed(f"job {job_id} still running after {timeout:.0f} s")

    def result_files(self, sweep: str) -> str:
        """The glob, in the head container, of the sweep's trials' result.json files: the shared Ray storage."""
        return f"/shared/runs/{sweep}/*/result.json"

    def results_of(self, sweep: str) -> dict[str, list[dict]]:
        """{trial id: [result rows in order]} from the sweep's result.json files (`result_files`)."""
        script = (f"for f in {self.result_files(sweep)}; do [ -f \"$f\" ] && "
                  "echo \"== $(basename $(dirname $f))\" && cat \"$f\"; done; true")
        out = run(["docker", "exec", self.head(), "sh", "-c", script], capture=True, quiet=True).stdout
        trials: dict[str, list[dict]] = {}
        current = None
        for line in out.splitlines():
            if line.startswith("== "):
                current = trials.setdefault(line[3:], [])
            elif line.strip() and current is not None:
                current.append(json.loads(line))
        return trials

    def trials_csv(self, sweep: str) -> list[dict[str, str]]:
        with open(self.results / sweep / "trials.csv") as f:
            return list(csv.DictReader(f))

    # MLflow over REST, from the host
    def rest(self, path: str, body: dict | None = None, **query) -> dict:
        url = f"{self.mlflow}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def mlflow_runs(self, experiment: str) -> tuple[dict, list[dict]]:
        """(parent run, child runs) of a sweep's experiment; fails unless there is exactly one parent."""
        exp = self.rest("experiments/get-by-name", experiment_name=experiment)["experiment"]
        runs = self.rest("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", [])
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags, strict=True) if t.get("bvit.role") == "parent"]
        check(len(parents) == 1, f"MLflow experiment {experiment!r} holds 1 parent run (found {len(parents)})")
        pid = parents[0]["info"]["run_id"]
        children = [r for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == pid]
        for c in children:
            c["trial_id"] = {t["key"]: t["value"] for t in c["data"]["tags"]}.get("bvit.trial_id")
        strays = len(runs) - 1 - len(children)
        check(strays == 0, f"every other run of {experiment!r} is a child of the parent ({strays} strays)")
        return parents[0], children

    def epochs_logged(self, run_id: str) -> list[int]:
        hist = self.rest("metrics/get-history", run_id=run_id, metric_key="train_loss", max_results=1000)  # epochs are its steps
        return sorted(int(m["step"]) for m in hist.get("metrics", []))

    def mlflow_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.mlflow}/health", timeout=3) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise CheckFailed(f"MLflow at {self.mlflow} not healthy after {timeout} s")

    def postgres_runs(self, experiment: str) -> int:
        sql = ("select count(*) from runs r join experiments e on r.experiment_id = e.experiment_id "
               f"where e.name = '{experiment}' and r.lifecycle_stage = 'active'")
        out = self.compose("exec", "-T", "postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tAc", sql,
                           capture=True, quiet=True).stdout
        return int(out.strip())


def idle_footprint(c: Cluster) -> str:
    """Memory and processes of each service's container (docker stats), as a line for the report."""
    out = []
    for service in ("postgres", "mlflow", "ray-head", "ray-worker"):
        for cid in c.compose("ps", "-q", service, capture=True, quiet=True).stdout.split()[:1]:
            mem = run(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", cid], capture=True,
                      quiet=True).stdout.split("/")[0].strip()
            procs = len(run(["docker", "top", cid], capture=True, quiet=True).stdout.splitlines()) - 1
            out.append(f"{service} {mem} ({procs} processes)")
    return ", ".join(out)


# --- the checks -------------------------------------------------------------------------------------------------

def write_spec(c: Cluster, name: str) -> str:
    """A copy of sweeps/cluster.yaml under another name (its own sweep, results and MLflow experiment), placed
    in the results mount so the cluster's nodes see it; returns its path inside the containers."""
    text = (ROOT / SPEC).read_text()
    text, n = re.subn(r"^name: cluster-check\b.*$", f"name: {name}", text, flags=re.M)
    assert n == 1, f"{SPEC}: expected a `name: cluster-check` line"
    d = c.results / "specs"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(text)
    return f"results/specs/{name}.yaml"


def check_sweep_table(c: Cluster, sweep: str, workers: dict[str, str]) -> list[dict[str, str]]:
    rows = c.trials_csv(sweep)
    ids = [r["trial_id"] for r in rows]
    check(len(rows) == 4 and len(set(ids)) == 4, f"{sweep}: trials.csv has 4 rows, 4 distinct trial ids (no trial counted twice)")
    check(all(r["status"] == "TERMINATED" for r in rows), f"{sweep}: every trial TERMINATED")
    check(all(int(r["epochs"]) == EPOCHS for r in rows), f"{sweep}: every trial reached epoch {EPOCHS}")
    return rows


def check_mlflow(c: Cluster, sweep: str, trial_ids: list[str], *, every_epoch: bool = True) -> tuple[dict, list[dict]]:
    parent, children = c.mlflow_runs(sweep)
    got = sorted(ch["trial_id"] for ch in children)
    check(got == sorted(trial_ids), f"{sweep}: MLflow holds exactly one child run per trial ({len(children)} children "
                                    f"for {len(trial_ids)} trials)")
    if every_epoch:
        for ch in children:
            epochs = c.epochs_logged(ch["info"]["run_id"])
            check(epochs == list(range(1, EPOCHS + 1)), f"{sweep}: child {ch['trial_id']} logged epochs {epochs}")
    return parent, children


def sweep_distinct_workers(c: Cluster, workers: dict[str, str]) -> dict:
    sweep = "cluster-check"  # sweeps/cluster.yaml's name
    cmd = f"bvit-sweep launch {SPEC}"
    with phase(f"sweep `{sweep}` (4 trials)", f"ray job submit --address {c.ray_address} -- bash -c 'cd /app && {cmd}'"):
        c.submit(cmd, "sweep-cluster")
        c.wait_job("sweep-cluster")
    rows = check_sweep_table(c, sweep, workers)
    by_ip = {ip: name for name, ip in workers.items()}
    ran_on = {r["trial_id"]: by_ip.get(r["node"], f"? {r['node']}") for r in rows}
    used = sorted(set(ran_on.values()))
    for t, w in ran_on.items():
        print(f"  trial {t} ran on {w}")
    check(all(not w.startswith("?") for w in used), f"{sweep}: every trial ran on a worker container ({used})")
    check(len(used) >= 2, f"{sweep}: trials ran on {len(used)} distinct worker containers: {', '.join(used)}")
    CHECKS.append(f"`{sweep}`: trials ran on {len(used)} worker containers: " + ", ".join(
        f"{t} on {w}" for t, w in ran_on.items()))
    parent, children = check_mlflow(c, sweep, list(ran_on))
    in_pg = c.postgres_runs(sweep)
    check(in_pg == 1 + len(children), f"{sweep}: PostgreSQL's runs table holds {in_pg} runs of the experiment (1 + {len(children)})")
    with phase("docker compose restart mlflow", c.compose_cmd("restart", "mlflow")):
        c.compose("restart", "mlflow")
        c.mlflow_healthy()
    parent2, children2 = check_mlflow(c, sweep, list(ran_on))
    check(parent2["info"]["run_id"] == parent["info"]["run_id"]
          and sorted(ch["info"]["run_id"] for ch in children2) == sorted(ch["info"]["run_id"] for ch in children),
          f"{sweep}: after `docker compose restart mlflow` the same parent and {len(children2)} child runs are served")
    CHECKS.append(f"`{sweep}`: MLflow over REST: 1 parent run, {len(children)} child runs (one per trial, {EPOCHS} epochs "
                  f"each), {in_pg} runs in PostgreSQL; the same after `docker compose restart mlflow`")
    return {"workers": used}


def sweep_worker_killed(c: Cluster, workers: dict[str, str]) -> None:
    sweep = "cluster-kill"
    cmd = f"bvit-sweep launch {write_spec(c, sweep)}"
    by_ip = {ip: name for name, ip in workers.items()}
    with phase(f"sweep `{sweep}` (4 trials, a worker killed mid-trial)", f"ray job submit ... -- bash -c 'cd /app && {cmd}'"):
        c.submit(cmd, "sweep-kill")
        trial, victim, at_epoch = kill_mid_trial(c, sweep, "sweep-kill", by_ip)
        c.wait_job("sweep-kill")
    rows = check_sweep_table(c, sweep, workers)
    row = next(r for r in rows if r["trial_id"] == trial)
    survivor = by_ip.get(row["node"], row["node"])
    check(survivor != victim and survivor in workers, f"{sweep}: trial {trial} finished on {survivor}, not on the killed {victim}")
    check(int(row["retries"]) >= 1, f"{sweep}: trial {trial} counts {row['retries']} retry")
    history = c.results_of(sweep)[trial]
    epochs = [r["epoch"] for r in history]
    nodes = [by_ip.get(r["node_ip"], r["node_ip"]) for r in history]
    print(f"  trial {trial}: epochs {epochs} on {nodes}")
    check(epochs == list(range(1, EPOCHS + 1)), f"{sweep}: trial {trial} reported each epoch once, 1..{EPOCHS} "
                                               "(it resumed from its last checkpoint, not from epoch 1)")
    first_after = next(i for i, n in enumerate(nodes) if n != victim)
    check(all(n == victim for n in nodes[:first_after]) and all(n == survivor for n in nodes[first_after:]),
          f"{sweep}: epochs 1..{epochs[first_after - 1]} on {victim}, {epochs[first_after]}..{EPOCHS} on {survivor}")
    parent, children = check_mlflow(c, sweep, [r["trial_id"] for r in rows])
    CHECKS.append(f"`{sweep}`: `docker kill {victim}` while trial {trial} was at epoch {at_epoch} there; the trial "
                  f"resumed on {survivor} at epoch {epochs[first_after]} (epochs {epochs}, retries {row['retries']}); "
                  f"4 trials in trials.csv, MLflow: 1 parent, {len(children)} children, no duplicate")
    with phase("restore the killed worker", c.compose_cmd("up", "-d", "--wait", "--no-build")):
        run(["docker", "update", "--restart=unless-stopped", victim], capture=True)
        c.compose("up", "-d", "--wait", "--no-build", "--pull", "never")


def kill_mid_trial(c: Cluster, sweep: str, job_id: str, by_ip: dict[str, str]) -> tuple[str, str, int]:
    """Wait for a trial past epoch 2 (and before the last two) on a worker, then `docker kill` that worker and
    leave it down (no restart policy), so the trial can only go on elsewhere: (trial, worker, its epoch)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        if time.monotonic() > deadline:
            raise CheckFailed(f"{sweep}: no trial reached epoch 2 in time")
        for t, rows in c.results_of(sweep).items():
            if rows and 2 <= rows[-1]["epoch"] < EPOCHS - 1 and rows[-1].get("node_ip") in by_ip:
                trial, victim, at_epoch = t, by_ip[rows[-1]["node_ip"]], rows[-1]["epoch"]
                run(["docker", "update", "--restart=no", victim], capture=True)
                run(["docker", "kill", victim])
                print(f"  killed {victim} while trial {trial} was past epoch {at_epoch} there")
                return trial, victim, at_epoch
        if c.job_status(job_id) not in ("PENDING", "RUNNING"):
            raise CheckFailed(f"{sweep}: the job ended before a worker could be killed")
        time.sleep(0.5)


def sweep_mlflow_down(c: Cluster) -> None:
    sweep = "cluster-mlflow-down"
    cmd = f"bvit-sweep launch {write_spec(c, sweep)}"
    with phase(f"sweep `{sweep}` (4 trials, MLflow stopped after the first epoch)", f"ray job submit ... -- bash -c 'cd /app && {cmd}'"):
        c.submit(cmd, "sweep-mlflow-down")
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not any(rows for rows in c.results_of(sweep).values()):
            if time.monotonic() > deadline or c.job_status("sweep-mlflow-down") not in ("PENDING", "RUNNING"):
                raise CheckFailed(f"{sweep}: no epoch reported before the job ended")
            time.sleep(0.5)
        c.compose("stop", "mlflow")
        logs = c.wait_job("sweep-mlflow-down")
    check("MLflow at http://mlflow:5000 unreachable" in logs and "rerun `bvit-sweep sync" in logs,
          f"{sweep}: the sweep warned that MLflow was unreachable, went on, and named `bvit-sweep sync`")
    rows = check_sweep_table(c, sweep, {})
    with phase("docker compose start mlflow", c.compose_cmd("start", "mlflow")):
        c.compose("start", "mlflow")
        c.mlflow_healthy()
    missing_before = None
    try:
        _, children = c.mlflow_runs(sweep)
        missing_before = 4 * EPOCHS - sum(len(c.epochs_logged(ch["info"]["run_id"])) for ch in children)
    except (CheckFailed, urllib.error.HTTPError) as e:  # the parent may not even exist yet
        print(f"  before sync: {e}")
        missing_before = 4 * EPOCHS
    check(missing_before > 0, f"{sweep}: MLflow lacked {missing_before} of {4 * EPOCHS} trial-epochs before sync")
    sync = f"bvit-sweep sync runs/{sweep}"
    with phase(f"bvit-sweep sync runs/{sweep}", f"ray job submit ... -- bash -c 'cd /app && {sync}'"):
        c.submit(sync, "sync-mlflow-down")
        logs = c.wait_job("sync-mlflow-down")
    print("  " + " ".join(line for line in logs.splitlines() if "epoch" in line.lower())[-300:])
    parent, children = check_mlflow(c, sweep, [r["trial_id"] for r in rows])
    CHECKS.append(f"`{sweep}`: MLflow stopped after the first epoch; all 4 trials finished; MLflow then lacked "
                  f"{missing_before} of {4 * EPOCHS} trial-epochs; after `bvit-sweep sync` 1 parent, {len(children)} "
                  f"children with epochs 1..{EPOCHS} each")


def image_alone() -> None:
    cmd = ["docker", "run", "--rm", IMAGE, "launch", "sweeps/smoke.yaml"]
    with phase("image alone: smoke sweep", shlex.join(cmd)):
        p = run(cmd, capture=True, check_rc=False)
    out = p.stdout + p.stderr
    runs = re.search(r"MLflow: .*?: (\d+) trial runs", out)
    check(p.returncode == 0 and runs is not None and runs.group(1) == "4",  # exit 0: every trial TERMINATED
          f"`{shlex.join(cmd)}` exits 0 with 4 trials finished and tracked (rc {p.returncode})"
          + ("" if p.returncode == 0 else "\n" + out[-3000:]))
    CHECKS.append(f"`{shlex.join(cmd)}`: exit 0, all 4 trials finished, 4 MLflow runs in the container's own store")


# --- the report -------------------------------------------------------------------------------------------------

def write_report(ok: bool, error: str, sizes: dict[str, int], first_build_state: str, started_at: str) -> Path:
    out = ROOT / "results" / "cluster" / f"{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    sha, dirty = STARTED_AT_SHA  # the checkout the images were built from, not one committed during the run
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        f"# `make test-cluster`, {started_at}",
        "",
        f"**{'PASSED' if ok else 'FAILED'}** on {os.cpu_count()} cores ({cpu}), git `{sha}{'-dirty' if dirty else ''}`, "
        f"Docker {run(['docker', 'version', '-f', '{{.Server.Version}}'], capture=True, quiet=True).stdout.strip()}, "
        f"base image `{BASE_IMAGE}`. First build: {first_build_state}.",
        "",
        "## Checks",
        "",
        *[f"- {c}" for c in CHECKS],
        *([f"- **failed:** {error}"] if error else []),
        "",
        "## Phases (wall time)",
        "",
        "| phase | seconds | command |",
        "|---|---|---|",
        *[f"| {name} | {s:.0f} | `{cmd}` |" if cmd else f"| {name} | {s:.0f} | |" for name, s, cmd in PHASES],
        f"| **total** | {sum(s for _, s, _ in PHASES):.0f} | |",
        "",
        "## Images",
        "",
        "| image | size |",
        "|---|---|",
        *[f"| `{name}` | {size / 1e9:.2f} GB |" for name, size in sizes.items()],
        "",
        "Rerun: `sudo make test-cluster` (scripts/test-cluster.sh, tests/cluster/scenario.py).",
        "",
    ]
    out.write_text("\n".join(lines))
    return out


def checkout_state() -> tuple[str, bool]:
    """(short git SHA, whether tracked files differ from it) of the checkout, now."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return sha, bool(dirty)


STARTED_AT_SHA = checkout_state()


def main() -> int:
    started_at = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    engine = os.environ.get("BVIT_ENGINE_PHASES", "")
    for item in filter(None, engine.splitlines()):  # phases timed by scripts/test-cluster.sh
        name, seconds, command = item.split("|", 2)  # the command may hold a pipe
        PHASES.append((name, float(seconds), command))
    tmp = Path(tempfile.mkdtemp(prefix="bvit-cluster-"))
    os.chmod(tmp, 0o755)
    ok, error, sizes = False, "", {}
    first_build_state = ("no image and no build cache (cold)" if subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0 else "the image was already built")
    cluster = None
    try:
        os.chdir(ROOT)
        commands = build_commands(build_secrets(tmp))
        with phase("build images (first)", " && ".join(shlex.join(c) for c in commands)):
            build(commands, tmp / "build.log")
        with phase("build images (cached rebuild)", "the same"):
            build(commands, tmp / "build.log")
        sizes = {name: image_size(name) for name in (BASE_IMAGE, IMAGE, PG_IMAGE)}
        cluster = Cluster(tmp)
        with phase("cluster up (postgres, mlflow, ray-head, 2 ray-workers)",
                   cluster.compose_cmd("up", "-d", "--wait", "--no-build", "--pull", "never")):
            cluster.compose("up", "-d", "--wait", "--no-build", "--pull", "never")
        workers = cluster.containers("ray-worker")
        check(len(workers) == 2, f"2 Ray worker containers: {workers}")
        CHECKS.append(f"idle, just up: {idle_footprint(cluster)}")
        sweep_distinct_workers(cluster, workers)
        sweep_worker_killed(cluster, workers)
        sweep_mlflow_down(cluster)
        ok = True
    except Exception as e:  # noqa: BLE001 -- reported, then the cluster is torn down
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        if cluster is not None:
            print("\n== the cluster's logs (last 40 lines per service)")
            cluster.compose("logs", "--tail", "40", check_rc=False)
    finally:
        if cluster is not None:
            with phase("teardown", cluster.compose_cmd("down", "-v", "-t", "1")):
                cluster.compose("down", "-v", "-t", "1", check_rc=False)
                left = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                           capture=True, quiet=True).stdout.split()
            if left:
                ok, error = False, error or f"teardown left containers behind: {left}"
    if ok:  # the image alone, with the cluster gone (two cores)
        try:
            image_alone()
        except Exception as e:  # noqa: BLE001
            ok, error = False, f"{type(e).__name__}: {e}"
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept for inspection: {tmp} (build.log, the jobs' logs, the cluster's data and results)")
    report = write_report(ok, error, sizes, first_build_state, started_at)
    print(f"\nreport: {report.relative_to(ROOT)}")
    print("\n".join(["", "make test-cluster: " + ("PASSED" if ok else f"FAILED: {error}"), *CHECKS]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
