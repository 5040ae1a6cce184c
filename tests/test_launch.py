"""The launcher on a real local Ray: a sweep completes, crashes retry from checkpoints, resume after SIGKILL,
data-parallel trials, and a 2-node cluster that loses a node."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from _sweep_helpers import write_spec

from bvit.checkpoint import read_checkpoint
from bvit.config import ModelConfig
from orchestrator.errors import UserError
from orchestrator.launch import launch
from orchestrator.planning import model_flops, model_params
from orchestrator.trainable import FAULT_ENV, KeepHistoryOnRetry


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_completes_with_trials_csv_and_mlflow_runs(workdir, fmnist_dir):
    from mlflow.tracking import MlflowClient

    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="tiny")
    result = launch(spec_path=spec, verbose=False)
    assert result.ok and len(result.trials) == 2
    rows = read_csv(workdir / "results" / "tiny" / "trials.csv")
    assert [r["status"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert {r["arch"] for r in rows} == {"bvit", "vit"}
    for r in rows:
        model = ModelConfig(arch=r["arch"], width=32, steps=2, heads=2)
        assert r["epochs"] == "2" and r["node"]
        assert float(r["best_test_top1"]) > 15  # learned: chance on 10,000 test images stays under 10.6 % (95 %); seen 19-26 %
        assert (int(r["params"]), int(r["flops_per_image"])) == (model_params(model), model_flops(model))
    assert (workdir / "results" / "tiny" / "frontier.csv").exists()
    # convergence, reported: each trial's two epochs in curves.csv, its flag in trials.csv, the plot beside them
    curves = read_csv(workdir / "results" / "tiny" / "curves.csv")
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == sorted((r["trial_id"], e) for r in rows for e in "12")
    assert all(float(c["train_loss"]) > 0 and float(c["test_top1"]) > 0 for c in curves)  # eval_every=1: scored each epoch
    assert {r["still_improving"] for r in rows} <= {"True", "False"}
    assert (workdir / "results" / "tiny" / "curves.png").exists()
    run = json.loads((workdir / "results" / "tiny" / "run.json").read_text())
    # one trial id everywhere: the results table (Ray's trial name) and each trial's own checkpoint
    saved = {read_checkpoint(p)["trial_id"] for p in (workdir / "runs" / "tiny").glob("*/checkpoint_*/checkpoint.pt")}
    assert saved == {r["trial_id"] for r in rows}
    assert run["command"] == f"bvit-sweep launch {spec}" and run["terminated"] == 2

    client = MlflowClient(f"sqlite:///{workdir / 'results' / 'tiny' / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bvit.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("bvit.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.params["model.width"] == "32" and "params" in c.data.params
        assert [m.step for m in client.get_metric_history(c.info.run_id, "test_top1")] == [1, 2]

    with pytest.raises(UserError, match="already exists"):
        launch(spec_path=spec, verbose=False)


def test_a_trials_id_is_the_same_in_plan_ray_checkpoint_csv_and_mlflow(workdir, fmnist_dir):
    """One id per trial, from the config as written: the data path is relative in the spec and absolute in
    the run, and the id does not change (nothing reads Ray's params.json to recover it)."""
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis
    from typer.testing import CliRunner

    from bvit.checkpoint import read_checkpoint
    from bvit.config import TrialConfig
    from orchestrator.cli import app

    (workdir / "data").mkdir()
    (workdir / "data" / "fashion-mnist").symlink_to(fmnist_dir)
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="ids", epochs=1)
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["data"]["path"] = "data/fashion-mnist"
    spec.write_text(yaml.safe_dump(doc))
    planned = CliRunner().invoke(app, ["plan", str(spec), "--json", "--no-bench"])
    assert planned.exit_code == 0, planned.output
    ids = [t["id"] for t in json.loads(planned.stdout)["trials"]]
    assert len(set(ids)) == 2

    assert launch(spec_path=spec, verbose=False).ok
    sweep_dir = workdir / "runs" / "ids"
    assert [r["trial_id"] for r in read_csv(workdir / "results" / "ids" / "trials.csv")] == ids
    trials = ExperimentAnalysis(str(sweep_dir)).trials
    assert sorted(str(t) for t in trials) == sorted(Path(t.path).name for t in trials) == sorted(ids)
    for tid in ids:
        (ckpt_file,) = sorted((sweep_dir / tid).glob("checkpoint_*/checkpoint.pt"))[-1:]
        ckpt = read_checkpoint(ckpt_file)
        assert ckpt["trial_id"] == tid
        ran = TrialConfig.model_validate(ckpt["config"])
        assert Path(ran.data.path).is_absolute() and ran.trial_id() != tid  # resolved outside the hash
    client = MlflowClient(f"sqlite:///{workdir / 'results' / 'ids' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ids").experiment_id])
    assert sorted(r.data.tags["bvit.trial_id"] for r in runs if r.data.tags.get("bvit.role") == "trial") == sorted(ids)


def test_shipped_smoke_sweep_completes_every_trial(workdir, fmnist_dir):
    """`bvit-sweep launch sweeps/smoke.yaml` as shipped (its data path resolved under the working directory)."""
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
    (workdir / "data").mkdir()
    (workdir / "data" / "fashion-mnist").symlink_to(fmnist_dir)  # the prepared copy: skip re-preparing
    result = launch(spec_path=spec, verbose=False)
    rows = read_csv(workdir / "results" / "smoke" / "trials.csv")
    assert result.ok and len(rows) == 4  # the header's "trials: 4"
    assert sorted((r["arch"], r["steps"]) for r in rows) == [("bvit", "1"), ("bvit", "2"), ("vit", "1"), ("vit", "2")]
    for r in rows:
        assert r["status"] == "TERMINATED" and r["epochs"] == "2" and r["error"] == ""
        assert float(r["final_test_top1"]) > 15.0  # the header's hypothesis, above chance: chance on 10,000 test images stays under 10.6 % (95 %)
        assert all(r[c] != "" for c in ("trial_id", "params", "flops_per_image", "best_test_top1", "wall_s", "node"))
    bvit = {r["steps"]: int(r["params"]) for r in rows if r["arch"] == "bvit"}
    assert bvit["1"] == bvit["2"]  # one shared block whatever the step count


def test_crashed_trial_restarts_from_its_last_checkpoint(workdir, fmnist_dir, monkeypatch):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="crash", epochs=3, axes={"model.arch": ["bvit"]},
                      max_failures=1)
    monkeypatch.setenv(FAULT_ENV, json.dumps({"crash_at_epoch": 2, "marker_dir": str(workdir / "faults")}))
    result = launch(spec_path=spec, verbose=False)
    assert result.ok
    (row,) = result.trials
    assert row["status"] == "TERMINATED" and row["epochs"] == 3 and row["retries"] == 1
    trial_dir = workdir / "runs" / "crash" / row["trial_id"]
    epochs = [json.loads(line)["epoch"] for line in (trial_dir / "result.json").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # epochs 1-2 kept, only epoch 3 ran after the crash


def test_a_retried_trial_keeps_the_epochs_reported_since_the_last_sync(tmp_path):
    """Tune restores a restarted trial's result.json from the sweep's storage; a copy synced before the
    last epochs must not win over the driver's whole history (CI saw epochs [1, 3] after a crash)."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.logger import JsonLoggerCallback

    staging, storage = tmp_path / "staging", tmp_path / "storage"
    staging.mkdir(), storage.mkdir()
    (storage / "result.json").write_text('{"epoch": 1}\n')  # synced after epoch 1
    (staging / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # what the driver logged
    (staging / "progress.csv").write_text("epoch\n1\n2\n")
    trial = SimpleNamespace(local_path=str(staging), checkpoint=object(), storage=SimpleNamespace(
        trial_fs_path=str(storage), storage_filesystem=pyarrow.fs.LocalFileSystem()))

    KeepHistoryOnRetry().on_trial_recover(iteration=0, trials=[trial], trial=trial)
    JsonLoggerCallback()._restore_from_remote("result.json", trial)  # what Tune does as the trial restarts
    assert [json.loads(line)["epoch"] for line in (staging / "result.json").read_text().splitlines()] == [1, 2]
    assert (storage / "progress.csv").read_text() == "epoch\n1\n2\n"


def test_changed_spec_is_refused_on_resume_and_force_accepts_only_edits_that_change_no_trial(workdir, fmnist_dir):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="chg", epochs=1, axes={"model.arch": ["bvit"]})
    launch(spec_path=spec, verbose=False)
    (trial_id,) = json.loads((workdir / "runs" / "chg" / "bvit_sweep.json").read_text())["trial_ids"]

    write_spec(spec, fmnist_dir, name="chg", epochs=1, axes={"model.arch": ["bvit"]}, description="now described",
               tracking={"experiment": "chg-2"})
    with pytest.raises(UserError) as e:
        launch(spec_path=spec, resume=True, verbose=False)
    assert "spec changed" in e.value.lines[0] and "--force resumes edits that change no trial" in e.value.lines[0]
    assert '  spec.description: null -> "now described"' in e.value.lines[1:]
    r = CliRunner().invoke(app, ["launch", str(spec), "--resume", "--force", "--json"])
    assert r.exit_code == 0, r.output
    snapshot = json.loads((workdir / "runs" / "chg" / "bvit_sweep.json").read_text())
    assert snapshot["spec"]["description"] == "now described" and snapshot["trial_ids"] == [trial_id]
    assert yaml.safe_load((workdir / "results" / "chg" / "spec.yaml").read_text())["description"] == "now described"
    run = json.loads((workdir / "results" / "chg" / "run.json").read_text())
    assert run["command"] == f"bvit-sweep launch {spec} --resume --force" and run["terminated"] == 1

    write_spec(spec, fmnist_dir, name="chg", epochs=2, axes={"model.arch": ["bvit"]}, description="now described",
               tracking={"experiment": "chg-2"}, resources={"cpus": 2})
    r = CliRunner().invoke(app, ["launch", str(spec), "--resume", "--force"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{spec}: the sweep's trials changed since it started (1 trials added (ids "), line
    assert f"1 trials removed or changed (ids {trial_id}); resources.cpus: 1.0 -> 2.0); --force resumes only" in line
    assert json.loads((workdir / "runs" / "chg" / "bvit_sweep.json").read_text()) == snapshot  # left as it was


@pytest.mark.slow  # minutes here: `make test-slow` (the default suite stays ~20 min on 2 cores)
def test_finetune_method_is_a_sweep_axis_over_a_pretraining_sweeps_best_trial(workdir, fmnist_dir):
    from bvit.checkpoint import load_trained
    from bvit.models.factory import count_params
    from bvit.peft import apply_peft

    pre = write_spec(workdir / "pre.yaml", fmnist_dir, name="pre", epochs=1, axes={"model.arch": ["bvit"]})
    assert launch(spec_path=pre, verbose=False).ok
    spec = {
        "name": "ft",
        "base": {"finetune": {"checkpoint": "runs/pre"},  # a sweep dir: its best trial's last checkpoint
                 "data": {"path": str(fmnist_dir), "train_subset": 512, "batch_size": 128, "num_workers": 1,
                          "augment": "none"},
                 "optim": {"epochs": 1, "warmup_epochs": 0.2}},
        "zip": [{"finetune.method": ["linear", "lora-step"], "finetune.rank": [8, 2]}],
        "resources": {"cpus": 1},
    }
    (workdir / "ft.yaml").write_text(yaml.safe_dump(spec))
    result = launch(spec_path=workdir / "ft.yaml", verbose=False)
    assert result.ok
    rows = read_csv(workdir / "results" / "ft" / "trials.csv")
    assert [(r["status"], r["method"], r["rank"]) for r in rows] == [("TERMINATED", "linear", ""),
                                                                     ("TERMINATED", "lora-step", "2")]
    (ckpt,) = sorted((workdir / "runs" / "pre").glob("*/checkpoint_000000/checkpoint.pt"))
    pretrained, cfg = load_trained(ckpt)
    for r in rows:  # the model is the checkpoint's (width 32, 2 steps), not the trial config's defaults
        assert (r["arch"], r["width"], r["steps"]) == ("bvit", "32", "2")
        rank = int(r["rank"] or 8)
        model = apply_peft(load_trained(ckpt)[0], method=r["method"], num_classes=10, rank=rank)
        assert int(r["trainable_params"]) == count_params(model, trainable_only=True)
        assert int(r["params"]) == count_params(model)
    assert rows[0]["merged_test_top1"] == ""  # merged: the same model as the unmerged one, up to a few images
    assert abs(float(rows[1]["merged_test_top1"]) - float(rows[1]["final_test_top1"])) <= 0.05
    transfer = read_csv(workdir / "results" / "ft" / "transfer.csv")
    assert [t["method"] for t in transfer] == ["linear", "lora-step"]  # fewest trainable parameters first
    assert (workdir / "results" / "ft" / "transfer.png").exists()

    spec["name"], spec["base"]["finetune"]["checkpoint"] = "ft2", "runs/missing"
    (workdir / "ft2.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError) as e:
        launch(spec_path=workdir / "ft2.yaml", verbose=False)
    assert e.value.lines == [f"{workdir / 'ft2.yaml'}: finetune.checkpoint: {workdir / 'runs' / 'missing'}: no such "
                             f"checkpoint; pass a trial's checkpoint.pt or its directory; pretrain one first: "
                             "`bvit-sweep launch SPEC` (then finetune.checkpoint: <storage>/<name>, the sweep's best "
                             "trial) or `bvit-sweep train SPEC --checkpoint-dir DIR` (then DIR)"]
    assert not (workdir / "runs" / "ft2").exists()  # refused before anything started


@pytest.mark.slow
def test_sigkilled_launcher_resumes_without_rerunning_finished_trials(workdir, fmnist_dir):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="kill", epochs=2,
                      axes={"model.width": [16, 32, 48, 64]}, max_concurrent_trials=1)
    yaml_spec = yaml.safe_load(spec.read_text())
    yaml_spec["base"]["model"]["heads"] = 2
    spec.write_text(yaml.safe_dump(yaml_spec))
    code = f"from orchestrator.launch import launch; launch(spec_path={str(spec)!r}, verbose=False)"
    log = open(workdir / "launcher.log", "w")  # noqa: SIM115  (read back when the launcher fails)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    sweep = workdir / "runs" / "kill"

    def terminated() -> set[str]:  # as Tune's own saved state says (what --resume reads; ours: the test's own)
        from ray.tune import ExperimentAnalysis

        from orchestrator.envelope import TrialEnvelope
        try:
            return {TrialEnvelope.of(t.config).trial_id for t in ExperimentAnalysis(str(sweep)).trials
                    if t.status == "TERMINATED"}
        except Exception:  # no state written yet
            return set()

    deadline = time.time() + 300
    finished: set[str] = set()
    while time.time() < deadline and not finished:
        time.sleep(1)
        finished = terminated()
    assert finished, "no trial finished within 5 minutes:\n" + (workdir / "launcher.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = terminated()  # the state as the launcher left it
    assert len(finished) < 4, "the sweep ended before the kill; nothing left to resume"
    before = {name: (sweep / name / "result.json").read_text() for name in finished}
    time.sleep(2)
    result = launch(spec_path=spec, resume=True, verbose=False)
    assert result.ok and len(result.trials) == 4
    assert all(r["epochs"] == 2 for r in result.trials)
    for name, text in before.items():
        assert (sweep / name / "result.json").read_text() == text, f"finished trial {name} ran again"


@pytest.mark.slow
def test_trial_with_two_workers_trains_data_parallel(workdir, fmnist_dir):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="ddp", epochs=1, axes={"model.arch": ["bvit"]},
                      resources={"cpus": 1, "workers": 2})
    result = launch(spec_path=spec, verbose=False)
    assert result.ok
    (row,) = result.trials
    assert row["epochs"] == 1 and row["final_test_top1"] > 15  # learned: chance on 10,000 test images stays under 10.6 % (95 %)


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_and_survives_losing_one(tmp_path, monkeypatch, fmnist_dir):
    import threading

    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test runs its own 2-node cluster
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    sweep = workdir / "runs" / "multi"
    removed = threading.Event()

    def results():
        return [json.loads(x) for p in sweep.glob("*/result.json") for x in p.read_text().splitlines()]

    def remove_worker_mid_trial():  # as soon as a trial on the worker has reported an epoch and is not done
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            if any(r.get("node_id") == worker.node_id and not r.get("done") for r in results()):
                cluster.remove_node(worker)
                removed.set()
                return

    try:
        spec = write_spec(workdir / "s.yaml", fmnist_dir, name="multi", epochs=4,
                          axes={"model.width": [16, 32, 48, 64]}, max_failures=2)
        s = yaml.safe_load(spec.read_text())
        s["base"]["model"]["heads"] = 2
        spec.write_text(yaml.safe_dump(s))
        ray.init(address=cluster.address)
        threading.Thread(target=remove_worker_mid_trial, daemon=True).start()
        result = launch(spec_path=spec, verbose=False)
        assert removed.is_set(), "no trial ever ran on the worker node"
        assert result.ok, result.trials
        assert all(r["epochs"] == 4 for r in result.trials)
        assert {r["node_id"] for r in results()} == {cluster.head_node.node_id, worker.node_id}
        assert sum(r["retries"] for r in result.trials) >= 1  # the worker's trial restarted on the head
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_missing_data_that_cannot_be_prepared_is_a_clear_error(workdir, fmnist_dir):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="nodata", axes={"model.arch": ["bvit"]})
    s = yaml.safe_load(spec.read_text())
    s["base"]["data"]["path"] = str(workdir / "imagenet")
    spec.write_text(yaml.safe_dump(s))
    with pytest.raises(UserError) as e:
        launch(spec_path=spec, verbose=False)
    assert str(workdir / "imagenet") in e.value.lines[0]
    assert not (workdir / "runs" / "nodata").exists()  # failed before any compute was spent


def test_a_cluster_address_where_nothing_listens_is_one_line_at_once(tmp_path, free_port):
    """Not Ray's minutes of retries: the address is probed before data is prepared (none exists here)."""
    (tmp_path / "s.yaml").write_text("name: far\nbase: {data: {path: /nonexistent/data}}\n")
    for address in (f"127.0.0.1:{free_port}", f"ray://127.0.0.1:{free_port}"):
        r = subprocess.run([sys.executable, "-c", "from orchestrator.cli import app; app()", "launch", "s.yaml",
                            "--address", address], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert line.startswith(f"{address}: cannot join the Ray cluster there (")
        assert f":{free_port}: nothing answers at that port); check --address, RAY_ADDRESS" in line, line
        assert not (tmp_path / "runs" / "far").exists()  # only the lock beside it


def test_damaged_sweep_state_is_one_line_naming_the_file_for_status_and_resume(workdir, fmnist_dir):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="dmg", epochs=1, axes={"model.arch": ["bvit"]})
    assert launch(spec_path=spec, verbose=False).ok
    sweep = workdir / "runs" / "dmg"
    snapshot = sweep / "bvit_sweep.json"
    (state,) = sweep.glob("experiment_state-*.json")
    for damaged, advice in ((snapshot, "remove it and run `bvit-sweep launch SPEC --resume --force`"),
                            (state, "restore the file from a backup, or launch the trials again as a new sweep")):
        intact = damaged.read_bytes()
        damaged.write_bytes(intact[: len(intact) // 2])  # truncated, as a full disk or a killed copy leaves it
        for args in (["status", str(sweep)], ["launch", str(spec), "--resume"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 2 and "Traceback" not in r.output, r.output
            (line,) = r.stderr.splitlines()
            assert line.startswith(f"{damaged}: damaged (") and advice in line, line
        damaged.write_bytes(intact)
    assert CliRunner().invoke(app, ["status", str(sweep), "--json"]).exit_code == 0


def _refused(tmp_path, spec: dict) -> list[str]:
    """`bvit-sweep launch` of `spec`: exit 2, no traceback, nothing started; the stderr lines."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(app, ["launch", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "runs" / spec["name"]).exists()
    return r.stderr.splitlines()


def test_a_model_that_does_not_fit_the_data_is_refused_before_ray(tmp_path, fmnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = _refused(tmp_path, {"name": "fit", "base": {"data": {"path": str(fmnist_dir)}, "model": {
        "in_chans": 3, "num_classes": 100, "img_size": 32}}})
    where = f"{tmp_path / 's.yaml'}: data.path {fmnist_dir}"
    assert lines == [f"{where} holds 1-channel images but model.in_chans=3; set model.in_chans: 1",
                     f"{where} has 10 classes but model.num_classes=100; set model.num_classes: 10",
                     f"{where} holds 28x28 images (used at their stored size) but model.img_size=32; "
                     "set model.img_size: 28"]


def test_trials_larger_than_this_machine_are_refused_before_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "s.yaml"
    cpus = os.cpu_count() + 1
    (line,) = _refused(tmp_path, {"name": "big", "resources": {"cpus": cpus}})
    assert line == (f"{source}: resources.cpus: {cpus} CPUs per trial, but this machine has {os.cpu_count()}; lower "
                    "it, or pass --address to run on a cluster that has them")
    import torch
    gpus = torch.cuda.device_count() + 1
    (line,) = _refused(tmp_path, {"name": "big", "resources": {"gpus": gpus, "workers": gpus}})
    assert line.startswith(f"{source}: resources.gpus: {gpus} GPUs per trial, but this machine has {gpus - 1}; ")
    (line,) = _refused(tmp_path, {"name": "ddp", "resources": {"cpus": os.cpu_count(), "workers": 2}})
    assert line.startswith(f"{source}: resources.cpus: {os.cpu_count() + 0.01:g} CPUs per trial (its 2 workers' "
                           f"{os.cpu_count()} plus 0.01 for the Tune trial that drives them), but this machine has ")
    (line,) = _refused(tmp_path, {"name": "uri", "tracking": {"uri": str(tmp_path / "no-store")}})
    assert line.startswith(f"--tracking-uri {tmp_path / 'no-store'}: not an MLflow store")
    (line,) = _refused(tmp_path, {"name": "wide", "base": {"model": {"width": 10**9, "heads": 1}}})
    assert line.startswith(f"{source}: model.width=1000000000 (bvit, 6 steps): 1.2e+19 parameters need at least ")
    assert "GiB to train (weights, gradients, AdamW moments, 4 bytes each), but " in line


@pytest.mark.slow  # minutes here: `make test-slow` (the default suite stays ~20 min on 2 cores)
def test_a_diverging_trial_fails_at_once_while_a_crashed_one_is_retried(workdir, fmnist_dir, monkeypatch):
    """Divergence is deterministic: retrying it from its checkpoint would diverge again. A crash is not."""
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="div", epochs=2, axes={"optim.lr": [1e-3, 1e6]},
                      max_failures=1)
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["optim"].update(grad_clip=None, min_lr=0.0)
    spec.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv(FAULT_ENV, json.dumps({"crash_at_epoch": 1, "marker_dir": str(workdir / "faults")}))
    result = launch(spec_path=spec, verbose=False)
    assert not result.ok and not result.interrupted
    ok, diverged = result.trials
    assert (ok["status"], ok["epochs"], ok["retries"], ok["error"]) == ("TERMINATED", 2, 1, "")  # crashed once
    assert (diverged["status"], diverged["retries"], diverged["epochs"]) == ("ERROR", 0, 0)
    assert re.fullmatch(r"TrainingError: the loss became non-finite \(\S+\) at epoch 1, step \d+ \(lr \S+\); "
                        r"lower optim.lr, or set optim.grad_clip \(e.g. 1.0\)", diverged["error"]), diverged["error"]
    rows = read_csv(workdir / "results" / "div" / "trials.csv")
    assert [r["status"] for r in rows] == ["TERMINATED", "ERROR"] and rows[1]["error"] == diverged["error"]


@pytest.mark.slow
def test_a_diverging_data_parallel_trial_fails_once_like_a_single_process_one(workdir, fmnist_dir):
    """Neither Ray Train (inside the trial) nor Tune retries a deterministic failure of a workers > 1 trial."""
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="ddpdiv", epochs=2, axes={"optim.lr": [1e6]},
                      max_failures=2, resources={"cpus": 1, "workers": 2})
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["optim"].update(grad_clip=None, min_lr=0.0)
    spec.write_text(yaml.safe_dump(doc))
    result = launch(spec_path=spec, verbose=False)
    (row,) = result.trials
    assert (row["status"], row["retries"], row["epochs"]) == ("ERROR", 0, 0), row
    assert row["error"].startswith("TrainingError: the loss became non-finite"), row["error"]
    assert not (workdir / "runs" / "ddpdiv" / row["trial_id"] / "error.txt").exists()  # Tune saw no failure


def test_a_trial_that_crashes_for_good_points_to_its_error_inside_the_sweep(workdir, fmnist_dir, monkeypatch):
    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="dead", epochs=2, axes={"model.arch": ["bvit"]},
                      max_failures=0)
    monkeypatch.setenv(FAULT_ENV, json.dumps({"crash_at_epoch": 1, "marker_dir": str(workdir / "faults")}))
    result = launch(spec_path=spec, verbose=False)
    assert not result.ok
    (row,) = result.trials
    kept = workdir / "runs" / "dead" / row["trial_id"] / "error.txt"
    assert row["status"] == "ERROR" and row["error"] == f"see {kept}"
    assert "FaultInjected: injected crash of trial" in kept.read_text()
    assert read_csv(workdir / "results" / "dead" / "trials.csv")[0]["error"] == f"see {kept}"


_FRESH = """
import json, sys
import torch
torch.set_num_threads(1)  # what the trainable sets for a cpus: 1 trial
from bvit.config import TrialConfig
from bvit.trial import run_trial
cfg = TrialConfig.model_validate_json(sys.argv[1])
result = run_trial(cfg, trial_id=sys.argv[2], checkpoint_dir=sys.argv[3], device=torch.device("cpu"))
"""


@pytest.mark.slow  # minutes here: `make test-slow` (the default suite stays ~20 min on 2 cores)
def test_trials_run_back_to_back_in_one_reused_process_equal_each_run_in_a_fresh_one(workdir, fmnist_dir):
    """Tune reuses a trial's process for the next trial: nothing may leak from one into the next (RNG states,
    thread counts, cached data loaders, autocast, the model or optimizer). The second trial differs from the
    first in architecture, augmentation and precision, runs after it in the same process, and must give
    the weights and per-epoch metrics it gives in a process of its own."""
    from orchestrator.spec import expand_trials, load_spec
    from orchestrator.timing import read_records

    spec = write_spec(workdir / "s.yaml", fmnist_dir, name="reuse", axes={"optim.lr": [1e-3]}, max_concurrent_trials=1,
                      zip=[{"model.arch": ["vit", "bvit"], "data.augment": ["crop-flip", "none"],
                            "precision": ["bf16", "fp32"]}])
    result = launch(spec_path=spec, verbose=False)
    assert result.ok
    trials = expand_trials(load_spec(spec))
    sweep = workdir / "runs" / "reuse"
    first = {t.id: read_records(sweep / t.id / "result.json")[0] for t in trials}
    assert sorted(r["process_trials"] for r in first.values()) == [1, 2]  # one process ran both, one after the other
    reused = next(r for r in first.values() if r["process_trials"] == 2)
    assert reused["phase_compile_s"] == 0.0  # same data, same pipelines: the FFCV loaders were kept, not rebuilt

    from typer.testing import CliRunner

    from orchestrator.cli import app

    shown = CliRunner().invoke(app, ["status", str(sweep), "--timing", "--json"])
    assert shown.exit_code == 0, shown.output
    timing = json.loads(shown.output)
    assert (timing["trials"], timing["fresh_processes"]) == (2, 1)
    assert {row["trial_id"] for row in timing["rows"]} == {t.id for t in trials}
    launch_line = timing["launch"]
    assert 0 < launch_line["ray_ready_s"] <= launch_line["first_trial_start_s"] <= launch_line["first_step_s"]
    for t in trials:
        fresh = workdir / "fresh" / t.id
        fresh.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", _FRESH, t.config.model_dump_json(), t.id, str(fresh)], check=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        in_sweep = read_checkpoint(max((sweep / t.id).glob("checkpoint_*/checkpoint.pt")))
        alone = read_checkpoint(fresh / "checkpoint.pt")
        assert in_sweep["epoch"] == alone["epoch"] == 2
        assert in_sweep["model"].keys() == alone["model"].keys()
        for name, tensor in alone["model"].items():
            assert torch.equal(in_sweep["model"][name], tensor), (t.id, name)

        def timeless(history):
            return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")
                     and not k.startswith("phase_")} for r in history]

        assert timeless(in_sweep["history"]) == timeless(alone["history"])


def test_a_fresh_launch_starts_its_trials_on_the_workers_ray_started_with_it_preloaded(tmp_path, fmnist_dir):
    """`bvit-sweep launch` with its own embedded Ray (not the test session's): the first trials run as actors
    without a runtime env of their own -- so Ray can give them the worker processes it starts with the node
    (Tune's env-var runtime env made Ray start a new process for each) -- and those processes had imported what
    a trial needs (`orchestrator.preload`) before taking it. (Comparing a worker's creation time with
    `ray.init`'s return failed on a loaded machine: Ray creates those workers asynchronously.)"""
    from orchestrator.timing import read_records

    spec = write_spec(tmp_path / "s.yaml", fmnist_dir, name="warm", epochs=1)
    proc = subprocess.run([sys.executable, "-c", "from orchestrator.cli import app; app()", "launch", spec.name,
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "warm"
    launched = json.loads((sweep / "launches.jsonl").read_text().splitlines()[-1])
    firsts = [read_records(p)[0] for p in sweep.glob("*/result.json")]
    assert len(firsts) == 2 and all(r["process_trials"] == 1 for r in firsts)  # two at once, each a fresh process
    for r in firsts:
        assert r["process_runtime_env"] is False  # Tune's env-var runtime env dropped: a node worker can take it
        assert r["trial_started_at"] >= launched["ray_ready_at"]
        assert r["process_preloaded"]


def test_trial_actors_keep_tunes_runtime_env_when_a_worker_would_lack_one_of_its_variables(monkeypatch):
    """The embedded Ray's trial actors go without Tune's runtime env only when every variable Tune would set is
    already in the environment the workers inherited; otherwise Tune's actor options stand (and are restored)."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from orchestrator.patches import trial_actors_on_started_workers

    class Trainable:
        pass

    original = _ActorClassCache.get
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")  # one Tune passes on to trial actors
    with trial_actors_on_started_workers({"PL_DISABLE_FORK": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}):
        inherited = _ActorClassCache().get(Trainable)
    with trial_actors_on_started_workers({"PL_DISABLE_FORK": "1"}):  # set after the workers started
        missing = _ActorClassCache().get(Trainable)
    assert inherited._default_options == {}
    assert missing._default_options["runtime_env"]["env_vars"] == {"PL_DISABLE_FORK": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    assert _ActorClassCache.get is original
