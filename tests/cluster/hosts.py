"""`make test-cluster-hosts`: a cluster across "machines" that share nothing but ports and an S3 server.

One machine stands in for three hosts and an object store, each with its own address on this machine
(BVIT_HOSTS_NET, default 10.231.77.1-4, added to the loopback interface for the run and removed after):
  - the head host: docker/compose.yaml + docker/compose.head.yaml as project `bvit-hosts-head` (PostgreSQL,
    MLflow with its artifacts on S3 and its port published on 10.231.77.1, the Ray head on this machine's network
    advertising 10.231.77.1);
  - two worker hosts: docker/compose.worker.yaml as projects `bvit-hosts-worker-a` / `-b`, each on its own
    Docker network, advertising .2 / .3, reaching the head only through the head's published ports (Docker keeps
    one project's network from reaching another's containers directly), with no volume shared with the head;
  - the object store: moto's S3 server (`moto[s3]`, PyPI: it speaks S3's REST protocol over HTTP and is the
    faithful server that installs here; MinIO does not, Ceph's radosgw needs a whole Ceph) on .4, started here.
Sweeps run with `--storage s3://bvit/sweeps`: Ray Tune's state and checkpoints go to S3, the data goes there once
and each worker fetches it into its own cache; MLflow's artifacts go to s3://bvit/mlflow through the server.
Checks, from the host:
  1. the sweep's trials ran on both worker hosts; trials.csv and frontier.csv complete; MLflow holds one parent
     and one child per trial with every epoch, the parent's artifacts (frontier, tables, spec, run.json) and the
     best child's model, read back through the MLflow server and found in the bucket, none on the MLflow volume;
     each worker host fetched the data into its own cache;
  2. a worker host's container `docker kill`ed mid-trial: the trial resumes on the other host from its checkpoint
     in S3 (each epoch once), the sweep completes, no trial counted twice, curves.csv names both hosts' epochs.
Everything is torn down (`down -v`) also when a check fails; results/cluster/<date>-hosts.md has the phase times.
"""
from __future__ import annotations

import csv
import datetime as dt
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from pathlib import Path

import scenario as sc
from scenario import CHECKS, PHASES, CheckFailed, check, phase, run

ROOT = sc.ROOT
NET = os.environ.get("BVIT_HOSTS_NET", "10.231.77")
HEAD_IP, WORKER_IPS, S3_IP = f"{NET}.1", {"a": f"{NET}.2", "b": f"{NET}.3"}, f"{NET}.4"
S3_PORT, BUCKET = 9000, "bvit"
STORAGE = f"s3://{BUCKET}/sweeps"
HEAD_PROJECT = "bvit-hosts-head"
DOCKER = ROOT / "docker"


class Hosts(sc.Cluster):
    """The head host (sc.Cluster's checks and helpers, on compose.yaml + compose.head.yaml) and two worker hosts."""

    def __init__(self, tmp: Path, storage_env: Path) -> None:
        super().__init__(tmp)
        extra = {"RAY_HEAD_IP": HEAD_IP, "MLFLOW_BIND": HEAD_IP, "MLFLOW_PORT": 5000, "RAY_CPU_WORKERS": 0,
                 "RAY_CLIENT_PORT": sc.free_port(), "BVIT_STORAGE_ENV": storage_env,
                 "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
                 "MLFLOW_SERVER_ALLOWED_HOSTS": f"mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,"
                                                f"{HEAD_IP},{HEAD_IP}:*"}
        lines = [line for line in self.env_file.read_text().splitlines() if line.split("=", 1)[0] not in extra]
        self.env_file.write_text("\n".join(lines + [f"{k}={v}" for k, v in extra.items()]) + "\n")
        self.mlflow = f"http://{HEAD_IP}:5000"
        self.ray_address = f"http://{HEAD_IP}:8265"  # the head is on this machine's network (compose.head.yaml)
        self.worker_envs = {}
        for name, ip in WORKER_IPS.items():
            env = tmp / f"worker-{name}.env"
            env.write_text("\n".join(f"{k}={v}" for k, v in {
                "RAY_HEAD_IP": HEAD_IP, "RAY_NODE_IP": ip, "RAY_AUTH_TOKEN": self.token, "MLFLOW_PORT": 5000,
                "RAY_WORKER_CPUS": 1, "RAY_SHM_SIZE": "1gb", "BVIT_STORAGE_ENV": storage_env}.items()) + "\n")
            os.chmod(env, 0o600)
            self.worker_envs[name] = env

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(["docker", "compose", "-p", HEAD_PROJECT, "-f", str(DOCKER / "compose.yaml"),
                    "-f", str(DOCKER / "compose.head.yaml"), "--env-file", str(self.env_file), *args], **kw)

    def compose_cmd(self, *args: str) -> str:
        return (f"docker compose -p {HEAD_PROJECT} -f docker/compose.yaml -f docker/compose.head.yaml --env-file <env> "
                + " ".join(args))

    def head(self) -> str:
        (cid,) = self.compose("ps", "-q", "ray-head", capture=True, quiet=True).stdout.split()
        return run(["docker", "inspect", "-f", "{{.Name}}", cid], capture=True, quiet=True).stdout.strip().lstrip("/")

    def worker(self, name: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(["docker", "compose", "-p", f"bvit-hosts-worker-{name}", "-f", str(DOCKER / "compose.worker.yaml"),
                    "--env-file", str(self.worker_envs[name]), *args], **kw)

    def worker_container(self, name: str) -> str:
        cid = self.worker(name, "ps", "-q", "ray-worker", capture=True, quiet=True).stdout.split()
        check(len(cid) == 1, f"worker host {name}: one ray-worker container ({cid})")
        return run(["docker", "inspect", "-f", "{{.Name}}", cid[0]], capture=True, quiet=True).stdout.strip().lstrip("/")

    def result_files(self, sweep: str) -> str:
        """The launcher's staging copies on the head (Tune syncs them up to S3 only now and then)."""
        return f"/tmp/ray/session_latest/artifacts/*/{sweep}/driver_artifacts/*/result.json"

    def artifacts(self, run_id: str, path: str = "") -> dict[str, int]:
        """{path: size} of a run's artifacts, as the MLflow server lists them (recursively)."""
        out: dict[str, int] = {}
        query = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
        listing = self.rest(f"artifacts/list?{query}")  # (rest's own `path` argument is the endpoint)
        for f in listing.get("files", []):
            if f.get("is_dir"):
                out.update(self.artifacts(run_id, f["path"]))
            else:
                out[f["path"]] = int(f.get("file_size", 0))
        return out


def s3_fs(secret: str):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=f"http://{S3_IP}:{S3_PORT}", access_key="bvit-hosts",
                                   secret_key=secret, region="us-east-1", allow_bucket_creation=True)


def s3_files(fs, prefix: str) -> dict[str, int]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def launch(c: Hosts, sweep: str) -> str:
    return f"bvit-sweep launch {sc.write_spec(c, sweep)} --storage {STORAGE}"


def sweep_on_both_hosts(c: Hosts, fs, workers: dict[str, str]) -> None:
    sweep = "hosts"
    cmd = launch(c, sweep)
    with phase(f"sweep `{sweep}` (4 trials, storage {STORAGE})", f"ray job submit ... -- bash -c 'cd /app && {cmd}'"):
        c.submit(cmd, "sweep-hosts")
        c.wait_job("sweep-hosts")
    rows = sc.check_sweep_table(c, sweep, workers)
    by_ip = {ip: name for name, ip in workers.items()}
    ran_on = {r["trial_id"]: by_ip.get(r["node"], f"? {r['node']}") for r in rows}
    used = sorted(set(ran_on.values()))
    check(not any(w.startswith("?") for w in used) and len(used) == 2,
          f"{sweep}: trials ran on both worker hosts ({', '.join(f'{t} on {w}' for t, w in ran_on.items())})")
    with open(c.results / sweep / "frontier.csv") as f:
        frontier = list(csv.DictReader(f))
    check(len(frontier) == 4, f"{sweep}: frontier.csv has a row per cell (4: arch x steps), found {len(frontier)}")
    remote = s3_files(fs, f"{BUCKET}/sweeps/{sweep}")
    ckpts = [n for n in remote if n.endswith("/checkpoint.pt")]
    check("tuner.pkl" in remote and len({n.split("/")[0] for n in ckpts}) == 4,
          f"{sweep}: Ray Tune's state and every trial's checkpoints are in {STORAGE}/{sweep} ({len(remote)} objects)")
    for name, ip in WORKER_IPS.items():
        container = workers_by_host(workers)[name]
        cached = run(["docker", "exec", container, "sh", "-c", "ls /home/bvit/.cache/bvit-sweep/data/*/manifest.json"],
                     capture=True, quiet=True, check_rc=False).stdout.split()
        check(len(cached) == 1, f"{sweep}: worker host {name} ({ip}) fetched the data once into its own cache: {cached}")
    parent, children = sc.check_mlflow(c, sweep, list(ran_on))
    arts = c.artifacts(parent["info"]["run_id"])
    want = {"trials.csv", "curves.csv", "spec.yaml", "run.json", "frontier/frontier.csv", "frontier/frontier.png"}
    check(want <= arts.keys(), f"{sweep}: the parent run's artifacts, through MLflow: {sorted(arts)}")
    best_trial = next(t["value"] for t in parent["data"]["tags"] if t["key"] == "bvit.best_trial")
    best_run = next(ch for ch in children if ch["trial_id"] == best_trial)
    model = c.artifacts(best_run["info"]["run_id"])
    check(model.get("model/checkpoint.pt", 0) > 10_000, f"{sweep}: the best trial's ({best_trial}) model is an "
                                                         f"artifact of its run: {model}")
    in_bucket = s3_files(fs, f"{BUCKET}/mlflow")
    check(any(n.endswith("/artifacts/trials.csv") for n in in_bucket)
          and any(n.endswith("/artifacts/model/checkpoint.pt") for n in in_bucket),
          f"{sweep}: MLflow's artifacts are objects in s3://{BUCKET}/mlflow ({len(in_bucket)})")
    local = run(["docker", "compose", "-p", HEAD_PROJECT, "-f", str(DOCKER / "compose.yaml"), "-f",
                 str(DOCKER / "compose.head.yaml"), "--env-file", str(c.env_file), "exec", "-T", "mlflow",
                 "find", "/mlflow", "-type", "f"], capture=True, quiet=True).stdout.split()
    check(local == [], f"{sweep}: none on the MLflow container's volume ({local[:3]})")
    CHECKS.append(f"`{sweep}` (`--storage {STORAGE}`): trials on both worker hosts ("
                  + ", ".join(f"{t} on {w}" for t, w in ran_on.items()) + f"); {len(remote)} objects in "
                  f"{STORAGE}/{sweep} (tuner.pkl, 4 trials' checkpoints); frontier.csv 4 cells; each worker host "
                  f"fetched the data once into its own cache; MLflow: 1 parent, {len(children)} children with every "
                  f"epoch, parent artifacts {sorted(want)}, the best trial's model/checkpoint.pt, {len(in_bucket)} "
                  "artifact objects in the bucket and none on the MLflow volume")


def workers_by_host(workers: dict[str, str]) -> dict[str, str]:
    """{host name: container} from {container: IP}."""
    return {name: container for container, ip in workers.items() for name, wip in WORKER_IPS.items() if ip == wip}


def sweep_host_killed(c: Hosts, workers: dict[str, str]) -> None:
    sweep = "hosts-kill"
    cmd = launch(c, sweep)
    by_ip = {ip: name for name, ip in workers.items()}
    with phase(f"sweep `{sweep}` (a worker host's container killed mid-trial)", f"ray job submit ... -- bash -c 'cd /app && {cmd}'"):
        c.submit(cmd, "sweep-hosts-kill")
        trial, victim, at_epoch = sc.kill_mid_trial(c, sweep, "sweep-hosts-kill", by_ip)
        c.wait_job("sweep-hosts-kill")
    rows = sc.check_sweep_table(c, sweep, workers)
    row = next(r for r in rows if r["trial_id"] == trial)
    survivor = by_ip.get(row["node"], row["node"])
    check(survivor != victim and survivor in workers, f"{sweep}: trial {trial} finished on {survivor}, not on the killed {victim}")
    check(int(row["retries"]) >= 1, f"{sweep}: trial {trial} counts {row['retries']} retry")
    with open(c.results / sweep / "curves.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["trial_id"] == trial]
    epochs = [int(r["epoch"]) for r in curve]
    nodes = [by_ip.get(r["node"], r["node"]) for r in curve]
    print(f"  trial {trial}: epochs {epochs} on {nodes}")
    check(epochs == list(range(1, sc.EPOCHS + 1)), f"{sweep}: curves.csv has trial {trial}'s epochs once each, "
                                                  f"1..{sc.EPOCHS}")
    first_after = next(i for i, n in enumerate(nodes) if n != victim)
    check(first_after > 0 and all(n == victim for n in nodes[:first_after])
          and all(n == survivor for n in nodes[first_after:]),
          f"{sweep}: curves.csv's node: epochs 1..{epochs[first_after - 1]} on {victim}, {epochs[first_after]}.."
          f"{sc.EPOCHS} on {survivor} (resumed from the checkpoint in S3, not from epoch 1)")
    parent, children = sc.check_mlflow(c, sweep, [r["trial_id"] for r in rows])
    CHECKS.append(f"`{sweep}`: `docker kill {victim}` while trial {trial} was at epoch {at_epoch} there; it resumed on "
                  f"{survivor} at epoch {epochs[first_after]} from its checkpoint in S3 (no volume shared; curves.csv "
                  f"epochs {epochs} on {nodes}); 4 trials, MLflow 1 parent + {len(children)} children, no duplicate")
    name = next(n for n, cont in workers_by_host(workers).items() if cont == victim)
    with phase("restore the killed worker host", f"docker compose -p bvit-hosts-worker-{name} ... up -d --wait"):
        run(["docker", "update", "--restart=unless-stopped", victim], capture=True)
        c.worker(name, "up", "-d", "--wait", "--no-build", "--pull", "never")


def add_addresses() -> list[str]:
    have = run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture=True, quiet=True).stdout
    added = []
    for ip in (HEAD_IP, *WORKER_IPS.values(), S3_IP):
        if f" {ip}/" not in have:
            run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
            added.append(ip)
    return added


# The one thing this machine cannot make real: the hosts' addresses are all this machine's, so a connection from
# the head (on this machine's network) to a worker's address leaves with that same address as its source, which
# inside the worker's container is its own (orchestrator/node_address.py) and the reply never leaves. Between real
# machines the source is the head's own address. Traffic from the hosts' addresses into Docker's networks is
# therefore source-NATed to the network's gateway, as a router between the machines would show it.
SNAT = ["POSTROUTING", "-s", f"{NET}.0/24", "!", "-d", f"{NET}.0/24", "-j", "MASQUERADE",
        "-m", "comment", "--comment", "bvit-hosts: the head's address is not the worker's"]


def start_s3(tmp: Path, secret: str) -> subprocess.Popen:
    log = open(tmp / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", S3_IP, "-p", str(S3_PORT)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((S3_IP, S3_PORT), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise CheckFailed(f"moto's S3 server did not listen on {S3_IP}:{S3_PORT}; see {tmp / 'moto.log'}") from None
            time.sleep(0.3)
    s3_fs(secret).create_dir(BUCKET)
    return proc


def write_report(ok: bool, error: str, started_at: str) -> Path:
    out = ROOT / "results" / "cluster" / f"{dt.date.today().isoformat()}-hosts.md"
    sha, dirty = STARTED_AT_SHA  # the checkout the images were built from, not one committed during the run
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    lines = [
        f"# `make test-cluster-hosts`, {started_at}", "",
        f"**{'PASSED' if ok else 'FAILED'}** on {os.cpu_count()} cores ({cpu}), git `{sha}{'-dirty' if dirty else ''}`. "
        f"Three hosts and an S3 server on one machine: head {HEAD_IP} (docker/compose.yaml + compose.head.yaml; "
        "its Ray head on the machine's network), "
        f"worker hosts {', '.join(WORKER_IPS.values())} (docker/compose.worker.yaml, a project and network each, "
        f"no shared volume), moto's S3 server on {S3_IP}:{S3_PORT}; storage `{STORAGE}`, MLflow artifacts "
        f"`s3://{BUCKET}/mlflow`.", "",
        "## Checks", "", *[f"- {c}" for c in CHECKS], *([f"- **failed:** {error}"] if error else []), "",
        "## Phases (wall time)", "", "| phase | seconds | command |", "|---|---|---|",
        *[f"| {name} | {s:.0f} | `{cmd}` |" if cmd else f"| {name} | {s:.0f} | |" for name, s, cmd in PHASES],
        f"| **total** | {sum(s for _, s, _ in PHASES):.0f} | |", "",
        "Rerun: `sudo make test-cluster-hosts` (scripts/test-cluster.sh hosts, tests/cluster/hosts.py).", "",
    ]
    out.write_text("\n".join(lines))
    return out


STARTED_AT_SHA = sc.STARTED_AT_SHA  # taken when scenario was imported, before the build


def main() -> int:
    started_at = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    for item in filter(None, os.environ.get("BVIT_ENGINE_PHASES", "").splitlines()):
        name, seconds, command = item.split("|", 2)
        PHASES.append((name, float(seconds), command))
    tmp = Path(tempfile.mkdtemp(prefix="bvit-cluster-hosts-"))
    os.chmod(tmp, 0o755)
    secret = secrets.token_hex(20)
    storage_env = tmp / "storage.env"
    storage_env.write_text(f"AWS_ACCESS_KEY_ID=bvit-hosts\nAWS_SECRET_ACCESS_KEY={secret}\nAWS_REGION=us-east-1\n"
                           f"AWS_ENDPOINT_URL=http://{S3_IP}:{S3_PORT}\n")
    os.chmod(storage_env, 0o600)
    ok, error, added, s3, c, snat = False, "", [], None, None, False
    try:
        os.chdir(ROOT)
        commands = sc.build_commands(sc.build_secrets(tmp))
        with phase("build images (cached when make test-cluster ran)", " && ".join(shlex.join(x) for x in commands)):
            sc.build(commands, tmp / "build.log")
        added = add_addresses()
        run(["iptables", "-t", "nat", "-I", *SNAT])
        snat = True
        with phase(f"S3 server (moto) on {S3_IP}:{S3_PORT}", f"python -m moto.server -H {S3_IP} -p {S3_PORT}"):
            s3 = start_s3(tmp, secret)
        fs = s3_fs(secret)
        c = Hosts(tmp, storage_env)
        with phase("head host up (postgres, mlflow, ray-head)", c.compose_cmd("up", "-d", "--wait", "--no-build")):
            c.compose("up", "-d", "--wait", "--no-build", "--pull", "never")
        with phase("worker hosts up (a, b)", "docker compose -p bvit-hosts-worker-X -f docker/compose.worker.yaml "
                                             "--env-file <worker-X.env> up -d --wait"):
            for name in WORKER_IPS:
                c.worker(name, "up", "-d", "--wait", "--no-build", "--pull", "never")
        workers = {c.worker_container(name): ip for name, ip in WORKER_IPS.items()}
        head_mounts = run(["docker", "inspect", "-f", "{{range .Mounts}}{{.Name}}{{.Source}} {{end}}", c.head()],
                          capture=True, quiet=True).stdout.split()
        for container in workers:
            mounts = run(["docker", "inspect", "-f", "{{range .Mounts}}{{.Name}}{{.Source}} {{end}}", container],
                         capture=True, quiet=True).stdout.split()
            check(len(mounts) == 1 and "node-cache" in mounts[0] and not set(mounts) & set(head_mounts),
                  f"worker {container} mounts only its own cache volume ({mounts}), nothing of the head's")
            nets = run(["docker", "inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
                        container], capture=True, quiet=True).stdout.split()
            check(all(n.startswith("bvit-hosts-worker-") for n in nets), f"worker {container} is on its own network {nets}")
        CHECKS.append("worker hosts share no volume and no network with the head: "
                      + ", ".join(f"{w} at {ip}" for w, ip in workers.items()))
        sweep_on_both_hosts(c, fs, workers)
        sweep_host_killed(c, workers)
        ok = True
    except Exception as e:  # noqa: BLE001 -- reported, then torn down
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        if c is not None:
            c.compose("logs", "--tail", "40", check_rc=False)
            for name in WORKER_IPS:
                c.worker(name, "logs", "--tail", "40", check_rc=False)
    finally:
        if c is not None:
            with phase("teardown", "docker compose ... down -v -t 1 (head and both worker hosts)"):
                c.compose("down", "-v", "-t", "1", check_rc=False)
                for name in WORKER_IPS:
                    c.worker(name, "down", "-v", "-t", "1", check_rc=False)
                left = run(["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project"], capture=True,
                           quiet=True).stdout.split()
                left = [x for x in left if "bvit-hosts" in run(["docker", "inspect", "-f", "{{index .Config.Labels "
                        "\"com.docker.compose.project\"}}", x], capture=True, quiet=True).stdout]
            if left:
                ok, error = False, error or f"teardown left containers behind: {left}"
        if s3 is not None:
            s3.terminate()
            s3.wait(10)
        for ip in added:
            run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check_rc=False)
        if snat:
            run(["iptables", "-t", "nat", "-D", *SNAT], check_rc=False)
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept for inspection: {tmp}")
    report = write_report(ok, error, started_at)
    print(f"\nreport: {report.relative_to(ROOT)}")
    print("\n".join(["", "make test-cluster-hosts: " + ("PASSED" if ok else f"FAILED: {error}"), *CHECKS]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
