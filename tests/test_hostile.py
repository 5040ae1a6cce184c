"""Files from users are data: a hostile checkpoint is refused by every command that opens one, and runs nothing.

Each hostile file, if unpickled with `weights_only=False`, runs `touch MARKER` through os.system. Every
command must exit 2 with one clear line, and the marker must not exist afterwards.
"""
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bvit.checkpoint import CheckpointError, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from bvit.config import CHECKPOINT_NAME, TrialConfig
from bvit.models.factory import build_model
from orchestrator.cli import app

CFG = TrialConfig.model_validate({"model": {"width": 16, "steps": 2, "heads": 2}})


class _Payload:
    """Unpickling this runs a shell command (what a malicious shared checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_hostile(kind: str, path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif kind == "torch-saved":
        torch.save(_Payload(marker), path)
    else:  # a real, valid checkpoint with one extra hostile entry
        model = build_model(arch="bvit", width=16, steps=2, heads=2, patch_size=4, img_size=28, in_chans=1,
                            num_classes=10)
        torch.save({"model": model.state_dict(), "config": CFG.model_dump(mode="json"), "optimizer": {},
                    "epoch": 1, "history": [], "extra": _Payload(marker)}, path)
    return path


KINDS = ["raw-pickle", "torch-saved", "valid-plus-hostile-key"]


def _assert_refused(result, marker: Path, path: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(path) in result.output and ("refused to load" in result.output or "not a file torch.save wrote"
                                           in result.output), result.output
    assert not marker.exists(), "the hostile checkpoint ran code"


@pytest.mark.parametrize("kind", KINDS)
def test_read_checkpoint_refuses_hostile_files_without_running_them(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = _write_hostile(kind, tmp_path / "c.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load|not a file torch.save wrote"):
        read_checkpoint(path)
    assert not marker.exists()
    # The proof that the marker mechanism works: the unsafe load the project no longer does runs it.
    if kind != "raw-pickle":
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_hostile_global_is_named_in_the_error(tmp_path):
    path = _write_hostile("valid-plus-hostile-key", tmp_path / "c.pt", tmp_path / "MARKER")
    with pytest.raises(CheckpointError, match=r"refused to load: it holds a Python object \(posix.system\)"):
        read_checkpoint(path)


@pytest.mark.parametrize("kind", KINDS)
def test_analyze_refuses_a_hostile_checkpoint(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = _write_hostile(kind, tmp_path / "t" / CHECKPOINT_NAME, marker)
    r = CliRunner().invoke(app, ["analyze", str(path), "--out", str(tmp_path / "out")])
    _assert_refused(r, marker, path)


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_refuses_a_hostile_checkpoint(tmp_path, fmnist_dir, kind):
    marker = tmp_path / "MARKER"
    path = _write_hostile(kind, tmp_path / "t" / CHECKPOINT_NAME, marker)
    r = CliRunner().invoke(app, ["finetune", str(path), "--method", "linear", "--data", str(fmnist_dir)])
    _assert_refused(r, marker, path)


@pytest.mark.parametrize("kind", KINDS)
def test_train_resume_refuses_a_hostile_checkpoint(tmp_path, fmnist_dir, kind):
    marker = tmp_path / "MARKER"
    ckpt_dir = tmp_path / "ckpt"
    path = _write_hostile(kind, ckpt_dir / CHECKPOINT_NAME, marker)
    r = CliRunner().invoke(app, ["train", "--set", f"data.path={fmnist_dir}", "--set", "model.width=16",
                                 "--set", "model.heads=2", "--set", "model.steps=2", "--set", "data.train_subset=64", "--set", "data.batch_size=32",
                                 "--set", "optim.epochs=2", "--checkpoint-dir", str(ckpt_dir), "--json"])
    _assert_refused(r, marker, path)
    assert path.read_bytes()  # the user's file is left as it was, not trained over


@pytest.mark.parametrize("kind", KINDS)
def test_launch_of_a_finetuning_sweep_refuses_a_hostile_checkpoint(tmp_path, fmnist_dir, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = _write_hostile(kind, tmp_path / "pre" / CHECKPOINT_NAME, marker)
    spec = {"name": "ft", "base": {"finetune": {"checkpoint": str(path), "method": "linear"},
                                   "data": {"path": str(fmnist_dir)}, "optim": {"epochs": 1, "warmup_epochs": 0}}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(app, ["launch", str(tmp_path / "ft.yaml")])
    _assert_refused(r, marker, path)
    assert not (tmp_path / "runs" / "ft").exists()  # refused before Ray or any sweep state


def test_checkpoints_the_project_writes_are_pure_data(tmp_path):
    """What `train` saves (RNG states included) loads with weights_only=True and restores the RNGs exactly."""
    state = rng_state()
    expected = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    save_checkpoint(tmp_path / "c.pt", {"rng": state, "config": CFG.model_dump(mode="json")})
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # raises on anything but data
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), __import__("numpy").random.rand(3).tolist(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(tmp_path, value):
    spec = tmp_path / "lr.yaml"
    spec.write_text(f"name: lr\nbase:\n  optim:\n    lr: {value}\n")
    r = CliRunner().invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "optim.lr: Input should be a finite number" in r.output, r.output
