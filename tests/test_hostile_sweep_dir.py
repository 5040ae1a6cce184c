"""A sweep directory is data: a copied sweep whose pickled Ray Tune state holds a payload runs nothing.

One real sweep is launched; each test copies it and plants, in one of Tune's pickled files (or in all of them),
a pickle that runs `touch MARKER` when unpickled. `status`, `frontier`, `sync`, `ui` and the fine-tuning
preflight read the project's JSON records only; `--resume` refuses state this user's key did not sign, naming
the file; the user's own sweep still resumes. The planting itself is shown to work (Tune's own reader runs it).
"""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
from _sweep_helpers import write_spec
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.signing import KEY_ENV, SIGNATURES

SWITCHES = ("TUNE_DISABLE_STRICT_METRIC_CHECKING", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "PL_DISABLE_FORK")  # launch sets them
TARGETS = ["tuner.pkl", "experiment_state", "basic-variant-state", "params.pkl", "all"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fmnist_dir, ray_local):
    """A finished one-trial sweep (spec, sweep dir), launched once for the module."""
    from orchestrator.launch import launch

    root = tmp_path_factory.mktemp("own")
    spec = write_spec(root / "h.yaml", fmnist_dir, name="h", epochs=1, axes={"model.arch": ["bvit"]},
                      storage=str(root / "runs"))
    before = {k: os.environ.get(k) for k in SWITCHES}
    result = launch(spec_path=spec, results_root=root / "results", verbose=False)
    assert result.ok, result.trials
    assert {k: os.environ.get(k) for k in SWITCHES} == before  # the launcher's switches for Tune are restored
    return spec, result.sweep_dir


def _copy(sweep_dir: Path, dest: Path) -> Path:
    copy = dest / "storage" / sweep_dir.name
    shutil.copytree(sweep_dir, copy)
    return copy


def _plant(copy: Path, target: str, marker: Path) -> list[Path]:
    """Put the payload into `target` (one of TARGETS); returns the files changed."""
    payload = pickle.dumps(_Payload(marker))
    changed = []
    for path in sorted(copy.rglob("*")):
        name = path.relative_to(copy).as_posix()
        if not path.is_file():
            continue
        if name.endswith(".pkl") and (target in ("all", name) or (target == "params.pkl" and "/" in name)):
            path.write_bytes(payload)
        elif name.startswith("basic-variant-state-") and target in ("all", "basic-variant-state"):
            path.write_bytes(payload)  # a pickle, despite its name
        elif name.startswith("experiment_state-") and target in ("all", "experiment_state"):
            # every cloudpickled value Tune keeps as hex inside the JSON
            text, n = re.subn(r"8005[0-9a-f]{20,}", payload.hex(), path.read_text())
            assert n > 0
            path.write_text(text)
        else:
            continue
        changed.append(path)
    assert changed, target
    return changed


def test_the_planted_payload_runs_when_tunes_own_reader_opens_the_state(sweep, tmp_path):
    """The proof that the marker works: Tune's ExperimentAnalysis (what status used to call) runs it."""
    from ray.tune import ExperimentAnalysis

    marker = tmp_path / "MARKER"
    copy = _copy(sweep[1], tmp_path)
    _plant(copy, "experiment_state", marker)
    try:
        ExperimentAnalysis(str(copy))
    except Exception:  # the payload returns 0 where Tune expects its object: what follows fails
        pass
    assert marker.exists()


@pytest.mark.parametrize("target", [pytest.param(t, marks=pytest.mark.slow) if t != "all" else t for t in TARGETS])
def test_read_only_commands_run_nothing_from_a_hostile_sweep_dir(sweep, tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    copy = _copy(sweep[1], tmp_path)
    _plant(copy, target, marker)
    monkeypatch.setattr("orchestrator.dashboard.open_dashboard", lambda **kw: 0)  # ui: up to the server start
    runner = CliRunner()
    trial_id = json.loads((copy / "bvit_sweep.json").read_text())["trial_ids"][0]
    for args in (["status", str(copy), "--json"], ["status", str(copy), "--timing"], ["frontier", str(copy)],
                 ["sync", str(copy)], ["ui", str(copy)]):
        r = runner.invoke(app, args)
        assert "Traceback" not in r.output, (args, r.output)
        assert not marker.exists(), f"{' '.join(args)} ran the payload planted in {target}"
        if args[0] in ("status", "sync", "ui"):
            assert r.exit_code == 0, (args, r.output)  # read from the JSON records, as usual
    status = json.loads(runner.invoke(app, ["status", str(copy), "--json"]).output)
    assert [(t["trial_id"], t["status"], t["epochs"]) for t in status["trials"]] == [(trial_id, "TERMINATED", 1)]


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "params.pkl"])  # params.pkl: below
def test_resume_refuses_state_this_user_did_not_sign(sweep, tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    copy = _copy(sweep[1], tmp_path)
    changed = _plant(copy, target, marker)
    r = CliRunner().invoke(app, ["launch", str(sweep[0]), "--resume", "--storage", str(copy.parent)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert any(str(p) in r.output for p in changed) and "--trust-state" in r.output, r.output
    assert not marker.exists()


def test_the_users_own_sweep_resumes_and_a_copy_signed_with_another_key_is_refused(sweep, tmp_path, monkeypatch,
                                                                                    ray_local):
    from orchestrator.launch import launch

    monkeypatch.chdir(tmp_path)
    spec, sweep_dir = sweep
    own = _copy(sweep_dir, tmp_path / "own")  # a copy keeps its signatures: they name files, not places
    marker = tmp_path / "MARKER"
    _plant(own, "params.pkl", marker)  # Tune only writes and copies a trial's params.pkl: not signed, never read
    monkeypatch.setenv(SWITCHES[0], "0")
    result = launch(spec_path=spec, storage=str(own.parent), resume=True, verbose=False)
    assert result.ok and [t["status"] for t in result.trials] == ["TERMINATED"]
    assert not marker.exists()
    assert os.environ.get(SWITCHES[0]) == "0"  # restored after the launch

    theirs = _copy(sweep_dir, tmp_path / "theirs")
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other-user.key"))
    r = CliRunner().invoke(app, ["launch", str(spec), "--resume", "--storage", str(theirs.parent)])
    assert r.exit_code == 2, r.output
    assert "does not match this user's key" in r.output and str(tmp_path / "other-user.key") in r.output
    (theirs / SIGNATURES).unlink()
    r = CliRunner().invoke(app, ["launch", str(spec), "--resume", "--storage", str(theirs.parent)])
    assert r.exit_code == 2 and "no signature from this user's key" in r.output, r.output


def test_the_key_is_private_to_its_user(sweep):
    from orchestrator.signing import key_path

    assert key_path().stat().st_mode & 0o777 == 0o600
    assert not key_path().is_relative_to(sweep[1])


def test_finetune_preflight_takes_the_best_trial_of_a_hostile_pretraining_sweep_without_running_it(
        sweep, tmp_path, fmnist_dir):
    from bvit.config import TrialConfig
    from orchestrator.launch import resolve_pretrained

    marker = tmp_path / "MARKER"
    copy = _copy(sweep[1], tmp_path)
    _plant(copy, "all", marker)
    cfg = TrialConfig.model_validate({"finetune": {"checkpoint": str(copy), "method": "linear"},
                                      "data": {"path": str(fmnist_dir)}})
    out = resolve_pretrained([cfg], {str(fmnist_dir): str(fmnist_dir)}, cwd=tmp_path, source="ft.yaml")
    (file, model), = out.values()
    assert Path(file).is_relative_to(copy) and file.endswith("checkpoint.pt") and model.width == 32
    assert not marker.exists()


def test_run_json_and_each_trial_record_carry_provenance(sweep):
    spec, sweep_dir = sweep
    run = json.loads((sweep_dir.parent.parent / "results" / "h" / "run.json").read_text())
    record = json.loads(next((sweep_dir / "bvit_trials").glob("*.json")).read_text())
    trial = record["last_result"]["provenance"]
    for prov in (run["launcher"], trial):
        assert prov["cpu_model"] and prov["cpu_logical_cores"] == os.cpu_count()
        assert prov["versions"]["torch"] and prov["versions"]["ray"] and prov["versions"]["mlflow"]
        assert prov["versions"]["timm"]
    assert trial["torch_threads"] == 1 and "torch_onednn" in trial and "torch_mkl" in trial
    assert run["trial_machines"][0]["trials"] == [record["trial_id"]]


def test_paths_in_run_json_are_relative_to_the_repository():
    from orchestrator.provenance import relative_to_repo

    root = Path(__file__).resolve().parents[1]
    assert relative_to_repo(root / "runs" / "width") == "runs/width"
