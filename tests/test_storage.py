"""Sweeps on object storage: a real S3-compatible server on loopback (moto's `moto.server`, started here), a real
launch whose state and checkpoints go there, `status` / `frontier` / `--resume` read from there; a storage URI that
cannot be opened or reached is one line and exit 2 before Ray starts, never a local folder named after it."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest
import yaml
from _sweep_helpers import write_spec
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import UserError
from orchestrator.storage import location_of
from orchestrator.sweep_dir import resolve_sweep

SECRET = "not-a-real-secret-0123456789"  # the credentials the server is given: must appear in no file written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (its own process), with a bucket `sweeps`; yields its endpoint URL."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto.server did not listen within 30 s")
    endpoint = f"http://127.0.0.1:{port}"
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, access_key="k", secret_key=SECRET, region="us-east-1",
                            allow_bucket_creation=True).create_dir("sweeps")
    yield endpoint
    proc.terminate()
    proc.wait(10)


def _aws_env(monkeypatch, endpoint: str, tmp_path: Path) -> None:
    """The standard AWS variables only (what a user sets), and a cache and key of the test's own."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("BVIT_SWEEP_CACHE", str(tmp_path / "cache"))


def _remote_files(endpoint: str, prefix: str) -> dict[str, int]:
    fs, path = pyarrow.fs.FileSystem.from_uri(prefix)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def _s3_spec(tmp_path: Path, storage: str) -> Path:
    spec = tmp_path / "s3.yaml"
    spec.write_text(yaml.safe_dump({"name": "far", "storage": storage, "base": {"data": {"path": "data/x"}}}))
    return spec


def test_a_storage_uri_that_cannot_be_opened_or_reached_is_one_line_before_ray(tmp_path, monkeypatch, free_port):
    """`validate` and `launch`: exit 2, one line naming the spec, its storage and what to set; no local folder
    named after the URI (before: `./s3:/bucket/...`), and Ray not started."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("BVIT_SWEEP_CACHE", str(tmp_path / "cache"))
    ray_was_up = ray.is_initialized()
    spec = _s3_spec(tmp_path, "s3://sweeps/bvit")
    for command in (["validate", "s3.yaml"], ["launch", "s3.yaml"]):
        r = CliRunner().invoke(app, command)
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.splitlines()
        assert line.startswith("s3.yaml: storage: s3://sweeps/bvit: cannot reach sweeps (")
        assert "set AWS_ENDPOINT_URL" in line and "Traceback" not in r.output
    assert ray.is_initialized() == ray_was_up  # refused before Ray
    spec.write_text(spec.read_text().replace("s3://", "nosuchfs://"))
    r = CliRunner().invoke(app, ["validate", "s3.yaml"])
    assert r.exit_code == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("s3.yaml: storage: nosuchfs://sweeps/bvit: cannot be opened (Unrecognized filesystem")
    r = CliRunner().invoke(app, ["launch", "s3.yaml", "--storage", "s3:///no-bucket"])
    assert r.exit_code == 2 and r.stderr.startswith("--storage s3:///no-bucket: cannot be opened (Missing bucket name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.yaml"]  # no s3:, nosuchfs:, runs, cache


def test_a_bucket_that_does_not_exist_is_named(tmp_path, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    _aws_env(monkeypatch, s3_server, tmp_path)
    _s3_spec(tmp_path, "s3://no-such-bucket/bvit")
    r = CliRunner().invoke(app, ["validate", "s3.yaml"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("s3.yaml: storage: s3://no-such-bucket/bvit: bucket no-such-bucket does not exist; "
                                "create it (e.g. `aws s3 mb s3://no-such-bucket`) or name another")
    _s3_spec(tmp_path, "s3://sweeps/bvit")
    r = CliRunner().invoke(app, ["validate", "s3.yaml"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "s3:").exists()


def test_a_sweep_path_given_relative_to_the_working_directory_is_not_looked_up_under_runs_again(tmp_path,
                                                                                                 monkeypatch):
    """`bvit-sweep status runs/cluster` names runs/cluster (it named runs/runs/cluster), and finds it when it is
    there; a bare name is still looked up under ./runs."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        resolve_sweep("runs/cluster")
    assert f"no sweep found at {tmp_path / 'runs' / 'cluster'};" in e.value.lines[0]
    assert "runs/runs" not in e.value.lines[0]
    sweep = tmp_path / "runs" / "cluster"
    sweep.mkdir(parents=True)
    (sweep / "tuner.pkl").write_bytes(b"")
    (sweep / "bvit_sweep.json").write_text(json.dumps({"spec": {"name": "cluster"}, "smoke": False, "trial_ids": []}))
    assert resolve_sweep("runs/cluster").dir == sweep
    assert resolve_sweep("cluster").dir == sweep
    assert resolve_sweep(str(sweep)).dir == sweep


def test_the_lock_and_local_copy_of_a_uri_sweep_are_keyed_by_its_uri(tmp_path, monkeypatch):
    """Two URIs never share a local copy or a lock; neither lies in the working directory."""
    from orchestrator.lock import lock_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BVIT_SWEEP_CACHE", str(tmp_path / "cache"))
    a, b = location_of("s3://sweeps/a", "w"), location_of("s3://sweeps/b/", "w")
    assert (a.tune_path, a.storage_path, b.tune_path) == ("s3://sweeps/a/w", "s3://sweeps/a", "s3://sweeps/b/w")
    assert a.dir.name == b.dir.name == "w" and a.dir != b.dir and lock_path(a.dir) != lock_path(b.dir)
    assert all(p.is_relative_to(tmp_path / "cache") for p in (a.dir, b.dir, lock_path(a.dir)))
    assert location_of("file://" + str(tmp_path / "r"), "w").dir == tmp_path / "r" / "w"  # a local folder


def _cli(args: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    """`bvit-sweep ARGS` in its own process (its own embedded Ray, which inherits the AWS variables)."""
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-c", "from orchestrator.cli import app; app()", *args], cwd=cwd,
                              stdout=f, stderr=subprocess.STDOUT, timeout=600)


@pytest.mark.slow
def test_a_sweep_on_s3_runs_reads_back_and_resumes_from_there(tmp_path, monkeypatch, s3_server, fmnist_dir):
    """A real launch with `--storage s3://...`: Ray Tune's state and the checkpoints go to the server, nothing to a
    local `s3:` folder; `status` and `frontier` read the sweep from there (by URI and by spec); `--resume` of the
    finished sweep runs nothing again; no file written anywhere holds the secret key."""
    monkeypatch.chdir(tmp_path)
    _aws_env(monkeypatch, s3_server, tmp_path)
    write_spec(tmp_path / "s.yaml", fmnist_dir, name="ons3", epochs=1, axes={"model.arch": ["bvit", "vit"]},
               storage="s3://sweeps/bvit")
    t0 = time.time()
    r = _cli(["launch", "s.yaml"], tmp_path, tmp_path / "launch.log")
    launch_s = time.time() - t0
    assert r.returncode == 0, (tmp_path / "launch.log").read_text()[-4000:]
    remote = _remote_files(s3_server, "s3://sweeps/bvit/ons3")
    assert "tuner.pkl" in remote and "bvit_sweep.json" in remote and "bvit_signatures.json" in remote
    trials = sorted(n.split("/")[1][:-5] for n in remote if n.startswith("bvit_trials/"))
    assert len(trials) == 2
    for t in trials:  # each trial's history and its checkpoint, on the server
        assert f"{t}/result.json" in remote
        assert remote[f"{t}/checkpoint_000000/checkpoint.pt"] > 10_000
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()
    data = _remote_files(s3_server, "s3://sweeps/bvit/.bvit-data")  # the data, published beside the sweep
    assert sorted(n.split("/", 1)[1] for n in data) == ["manifest.json", "meta.json", "test.beton", "train.beton"]
    log = (tmp_path / "launch.log").read_text()
    assert "publishing " in log and not (tmp_path / "cache" / "data").exists()  # this node read the launcher's files
    run = json.loads((tmp_path / "results" / "ons3" / "run.json").read_text())
    assert run["sweep_dir"] == "s3://sweeps/bvit/ons3" and run["terminated"] == 2

    # status, by URI and by spec: the trial table, read from the server into a fresh local copy
    shutil.rmtree(tmp_path / "cache")
    r1 = CliRunner().invoke(app, ["status", "s3://sweeps/bvit/ons3", "--json"])
    assert r1.exit_code == 0, r1.output
    rows = json.loads(r1.stdout)["trials"]
    assert sorted(t["trial_id"] for t in rows) == trials
    assert all(t["status"] == "TERMINATED" and t["epochs"] == 1 and t["final_test_top1"] > 0 for t in rows)
    r2 = CliRunner().invoke(app, ["status", "s.yaml", "--json"])
    assert r2.exit_code == 0 and json.loads(r2.stdout)["trials"] == rows
    assert not list((tmp_path / "cache").rglob("checkpoint_*"))  # the copy leaves checkpoints on the server

    (tmp_path / "results" / "ons3" / "frontier.csv").unlink()
    r3 = CliRunner().invoke(app, ["frontier", "s3://sweeps/bvit/ons3", "--json"])
    assert r3.exit_code == 0, r3.output
    assert (tmp_path / "results" / "ons3" / "frontier.csv").exists()
    best = max(rows, key=lambda t: t["final_test_top1"])["trial_id"]  # its model fetched, for MLflow
    assert [p.parts[-3] for p in (tmp_path / "cache").rglob("checkpoint.pt")] == [best]

    before = {t: _remote_bytes(f"s3://sweeps/bvit/ons3/{t}/result.json") for t in trials}
    t0 = time.time()
    r = _cli(["launch", "s.yaml", "--resume"], tmp_path, tmp_path / "resume.log")
    resume_s = time.time() - t0
    assert r.returncode == 0, (tmp_path / "resume.log").read_text()[-4000:]
    for t in trials:
        assert _remote_bytes(f"s3://sweeps/bvit/ons3/{t}/result.json") == before[t], f"trial {t} ran again"
    assert not (tmp_path / "s3:").exists()
    written = [p for root in (tmp_path, Path(os.environ["BVIT_SWEEP_CACHE"])) for p in root.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert not [n for n in _remote_files(s3_server, "s3://sweeps/bvit/ons3")
                if SECRET.encode() in _remote_bytes(f"s3://sweeps/bvit/ons3/{n}")]
    print(f"launch {launch_s:.1f} s, resume with nothing to run {resume_s:.1f} s")


def _remote_bytes(uri: str) -> bytes:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


# --- the trials' data through the storage (orchestrator.data_share): nodes that share no folder ---------------

def test_data_is_published_once_per_content_and_fetched_verified_where_a_node_lacks_it(tmp_path, monkeypatch, capsys,
                                                                                        s3_server, fmnist_dir):
    """The launcher's data dir goes up once under <storage>/.bvit-data/<name>-<key> (manifest last); a node that
    sees the same files at the launcher's path reads them there; a node that does not gets a copy in its cache,
    byte-identical and checked against the manifest's SHA-256s; other data is another key, never an overwrite."""
    from orchestrator.data_share import MANIFEST, local_data, publish_data

    _aws_env(monkeypatch, s3_server, tmp_path)
    monkeypatch.setenv("BVIT_DATA_CACHE", str(tmp_path / "node-cache"))
    src = tmp_path / "fashion-mnist"
    shutil.copytree(fmnist_dir, src)
    (source,) = publish_data({"data/fashion-mnist": str(src)}, "s3://sweeps/bvit").values()
    assert source.startswith("s3://sweeps/bvit/.bvit-data/fashion-mnist-")
    remote = _remote_files(s3_server, source)
    assert sorted(remote) == ["manifest.json", "meta.json", "test.beton", "train.beton"]
    assert remote["train.beton"] == (src / "train.beton").stat().st_size

    assert capsys.readouterr().out.startswith(f"publishing {src} to {source} ")
    assert publish_data({"x": str(src)}, "s3://sweeps/bvit") == {str(src): source}  # the same content: no upload
    assert capsys.readouterr().out == ""

    assert local_data(source, str(src)) == str(src)  # this node sees the launcher's files: read there
    assert not (tmp_path / "node-cache").exists()
    gone = str(tmp_path / "not-on-this-node")
    copy = Path(local_data(source, gone))
    assert copy.parent == tmp_path / "node-cache" and (copy / MANIFEST).is_file()
    for name in ("meta.json", "train.beton", "test.beton"):
        assert (copy / name).read_bytes() == (src / name).read_bytes()
    assert local_data(source, gone) == str(copy)  # fetched once: the next trial on this node finds it

    with open(src / "test.beton", "r+b") as f:  # other data under the same name: another copy, the first kept
        f.seek(100)
        f.write(b"\xff")
    (other,) = publish_data({"d": str(src)}, "s3://sweeps/bvit").values()
    assert other != source and _remote_files(s3_server, source)["test.beton"] == remote["test.beton"]


def test_a_published_copy_that_does_not_match_its_manifest_is_refused_and_leaves_nothing_half_fetched(
        tmp_path, monkeypatch, s3_server, fmnist_dir):
    from orchestrator.data_share import local_data, publish_data

    _aws_env(monkeypatch, s3_server, tmp_path)
    monkeypatch.setenv("BVIT_DATA_CACHE", str(tmp_path / "node-cache"))
    (source,) = publish_data({"d": str(fmnist_dir)}, "s3://sweeps/corrupt").values()
    fs, path = pyarrow.fs.FileSystem.from_uri(source)
    with fs.open_output_stream(f"{path}/test.beton") as f:  # the object changed after it was published
        f.write(b"not the data")
    with pytest.raises(OSError, match=r"test.beton: its SHA-256 differs from the manifest's"):
        local_data(source, str(tmp_path / "elsewhere"))
    assert [p.name for p in (tmp_path / "node-cache").iterdir()] == [f".{source.rsplit('/', 1)[1]}.lock"]
    with pytest.raises(FileNotFoundError, match=r"manifest.json not found"):
        local_data("s3://sweeps/corrupt/.bvit-data/none-0", str(tmp_path / "elsewhere"))


def test_a_node_that_cannot_fetch_the_published_data_is_named_before_any_trial(ray_running, tmp_path):
    """The real Ray task on this node, asked for a copy that is not on the storage: one line naming the node, the
    URI and the reason, and what to do."""
    from orchestrator.data_share import stage_data_on_nodes

    source = "s3://sweeps/nowhere/.bvit-data/fashion-mnist-0123456789abcdef"
    with pytest.raises(UserError) as e:
        stage_data_on_nodes({str(tmp_path / "not-here"): source}, timeout_s=60)
    (line,) = e.value.lines
    assert line.startswith("data: 1 node(s) cannot get the trials' data from the sweep's storage -- node ")
    assert f"cannot fetch {source} (" in line and line.endswith("then launch again")
