"""MLflow against a real `mlflow server` on loopback: parent/child runs, resume without duplicates,
and a server that goes away mid-sweep (training goes on; `sync` back-fills)."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _sweep_helpers import write_spec
from mlflow.tracking import MlflowClient

from bvit.config import ModelConfig
from orchestrator.frontier import frontier_table
from orchestrator.launch import launch
from orchestrator.planning import model_params
from orchestrator.sweep_dir import resolve_sweep, sweep_sync
from orchestrator.trainable import FAULT_ENV


class MlflowServer:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                MlflowClient(self.uri).search_experiments(max_results=1)
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up in 90 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def server(tmp_path, free_port):
    srv = MlflowServer(tmp_path / "mlflow-server", free_port)
    srv.root.mkdir()
    srv.start()
    yield srv
    srv.stop()


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bvit.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("bvit.role") == "trial"]
    return client, parents, children


def test_sweep_logs_parent_children_metrics_and_frontier_to_a_server(workdir, fmnist_dir, server):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="srv")
    result = launch(spec_path=spec, tracking_uri=server.uri, verbose=False)
    assert result.ok
    client, parents, children = runs_of(server.uri, "srv")
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags["bvit.trial_id"] for c in children} == {r["trial_id"] for r in result.trials}
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        model = ModelConfig(arch=c.data.params["model.arch"], width=32, steps=2, heads=2)
        assert int(c.data.params["params"]) == model_params(model)
        for key in ("test_top1", "train_loss", "lr"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, key)] == [1, 2]
        assert c.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "frontier")}
    assert {"frontier/frontier.csv", "frontier/frontier.png", "frontier/frontier_table.json"} <= arts
    best = parents[0].data.tags["bvit.best_trial"]
    best_run = next(c for c in children if c.data.tags["bvit.trial_id"] == best)
    assert [a.path for a in client.list_artifacts(best_run.info.run_id, "model")] == ["model/checkpoint.pt"]


def test_resumed_trial_continues_its_own_child_run(workdir, fmnist_dir, server, monkeypatch):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="res", epochs=3, axes={"model.arch": ["bvit"]})
    monkeypatch.setenv(FAULT_ENV, json.dumps({"crash_at_epoch": 2, "marker_dir": str(workdir / "faults")}))
    first = launch(spec_path=spec, tracking_uri=server.uri, verbose=False)
    monkeypatch.delenv(FAULT_ENV)
    assert [r["status"] for r in first.trials] == ["ERROR"]
    second = launch(spec_path=spec, tracking_uri=server.uri, resume=True, verbose=False)
    assert second.ok and second.trials[0]["epochs"] == 3
    client, parents, children = runs_of(server.uri, "res")
    assert len(parents) == 1 and len(children) == 1
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "test_top1")] == [1, 2, 3]


def test_server_down_mid_sweep_then_sync_backfills_everything(workdir, fmnist_dir, server):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="down", epochs=3)
    sweep_dir = workdir / "runs" / "down"

    def stop_after_first_epoch():
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
            if any(p.read_text().strip() for p in sweep_dir.glob("*/result.json")):
                server.stop()
                return

    threading.Thread(target=stop_after_first_epoch, daemon=True).start()
    result = launch(spec_path=spec, tracking_uri=server.uri, verbose=False)
    assert server.proc is None, "the server was never stopped"
    assert result.ok and all(r["epochs"] == 3 for r in result.trials)  # training did not stop

    server.start()
    sweep = resolve_sweep(str(sweep_dir))
    summary = sweep_sync(sweep, tracking_uri=server.uri)
    assert summary["trials"] == 2
    again = sweep_sync(sweep, tracking_uri=server.uri)
    assert again["epochs_logged"] == 0  # idempotent
    client, parents, children = runs_of(server.uri, "down")
    assert len(parents) == 1 and len(children) == 2
    for c in children:
        assert [m.step for m in client.get_metric_history(c.info.run_id, "test_top1")] == [1, 2, 3]


def test_frontier_pareto_and_recovered_fraction_numbers():
    rows = [
        {"status": "TERMINATED", "arch": a, "width": w, "steps": 4, "params": p, "flops_per_image": 1,
         "final_test_top1": t}
        for a, w, p, t in [("bvit", 32, 100, 80.0), ("bvit", 32, 100, 82.0), ("vit", 32, 400, 85.0),
                           ("bvit", 64, 300, 86.0), ("vit", 64, 1200, 87.0), ("vit", 64, 1200, 89.0)]
    ] + [{"status": "ERROR", "arch": "vit", "width": 16, "steps": 4, "params": 10, "flops_per_image": 1,
          "final_test_top1": None}]
    cells = frontier_table(rows).set_index(["arch", "width"])
    assert cells.loc[("bvit", 32), "top1_mean"] == 81.0 and cells.loc[("bvit", 32), "seeds"] == 2
    assert cells.loc[("bvit", 32), "recovered_fraction"] == pytest.approx(81.0 / 85.0)
    assert cells.loc[("bvit", 64), "gap_points"] == pytest.approx(2.0)
    assert dict(cells["on_frontier"].items()) == {
        ("bvit", 32): True, ("bvit", 64): True, ("vit", 32): False, ("vit", 64): True}
    records = cells.reset_index().to_dict("records")  # what the parent run logs as frontier_table.json
    first = json.loads(json.dumps(records))[0]
    assert {k: first[k] for k in ("arch", "width", "params", "flops_per_image", "top1_mean", "top1_std",
                                  "seeds", "on_frontier", "recovered_fraction", "gap_points")} == {
        "arch": "bvit", "width": 32, "params": 100, "flops_per_image": 1, "top1_mean": 81.0,
        "top1_std": pytest.approx(2 ** 0.5), "seeds": 2, "on_frontier": True,
        "recovered_fraction": pytest.approx(81 / 85), "gap_points": 4.0}
    assert first["verdict"] == "inconclusive (too few seeds for an interval)"  # one ViT seed: no gap interval


def test_resume_frontier_and_sync_keep_every_run_s_start_end_and_the_sweep_s_wall_time(workdir, fmnist_dir):
    """Runs' times are the trials' own (Ray's records), so nothing after the sweep moves them: a finished trial
    ran seconds, not the minutes until a later `frontier`, and the parent lasts the sweep's wall time."""
    from orchestrator.sweep_dir import sweep_frontier
    from orchestrator.timing import read_records

    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="times")
    assert launch(spec_path=spec, verbose=False).ok
    uri = f"sqlite:///{workdir / 'results' / 'times' / 'mlflow' / 'mlflow.db'}"

    def times():
        client, parents, children = runs_of(uri, "times")
        return {r.info.run_id: (r.info.start_time, r.info.end_time, r.info.status) for r in parents + children}

    before = times()
    sweep = resolve_sweep(str(workdir / "runs" / "times"))
    time.sleep(1.5)  # a later write would show as a later end
    assert launch(spec_path=spec, resume=True, verbose=False).ok
    assert times() == before, "--resume"
    for _ in range(2):
        sweep_frontier(sweep)
    assert times() == before, "frontier"
    for _ in range(2):
        sweep_sync(sweep)
    assert times() == before, "sync"

    _, parents, children = runs_of(uri, "times")
    history = {c.data.tags["bvit.trial_id"]: read_records(workdir / "runs" / "times" / c.data.tags["bvit.trial_id"]
                                                           / "result.json") for c in children}
    for c in children:
        recs = history[c.data.tags["bvit.trial_id"]]
        assert c.info.start_time == round(recs[0]["trial_started_at"] * 1000)  # when the trial's process took it
        assert c.info.end_time == round(max(r["reported_at"] for r in recs) * 1000)  # its last report
        assert c.info.end_time - c.info.start_time < 120_000  # seconds of training, not the time to the last sync
    first_launch = read_records(workdir / "runs" / "times" / "launches.jsonl")[0]["started_at"]
    assert len(read_records(workdir / "runs" / "times" / "launches.jsonl")) == 2  # the sweep and its resume
    assert parents[0].info.start_time == round(first_launch * 1000)
    assert parents[0].info.end_time == max(c.info.end_time for c in children)
