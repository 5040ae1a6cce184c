"""What the project's checkpoints hold, turned back into models and configs.

    model, cfg = load_trained("runs/t/checkpoint.pt")   # a trained model and its TrialConfig
    model, meta = load_finetuned("runs/t/finetuned.pt")

Every file is read as data only, through `bvit.serialization.read_checkpoint` (re-exported here with
the rest of the byte-level API: `save_checkpoint`, `rng_state`, `set_rng_state`, `CheckpointError`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from bvit.config import CHECKPOINT_NAME, FINETUNED_NAME, TrialConfig
from bvit.models.factory import build_from_config
from bvit.peft import apply_peft, lora_modules, merge_lora
from bvit.serialization import CheckpointError, read_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["CheckpointError", "read_checkpoint", "save_checkpoint", "rng_state", "set_rng_state",
           "load_training_checkpoint", "checkpoint_config", "load_trained", "load_finetuned"]


# ---- what the project's checkpoints hold -----------------------------------------------------------------

def load_training_checkpoint(checkpoint_dir: Path | str) -> dict[str, Any] | None:
    """The training checkpoint in `checkpoint_dir` (read as data only), or None when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:  # a truncated, foreign or hostile file must not be trained over silently
        raise CheckpointError(f"{e}; delete it to start this trial afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "config", "epoch"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a bvit-sweep training checkpoint; delete it to start this trial afresh")
    return ckpt


def _read_trained(checkpoint: str | Path, map_location: str | torch.device) -> tuple[Path, dict, TrialConfig]:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; pass a trial's {CHECKPOINT_NAME} or its directory")
    ckpt = read_checkpoint(path, map_location=map_location)  # data only: a hostile pickle is refused
    missing = [k for k in ("model", "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a bvit-sweep training checkpoint (no {' or '.join(repr(k) for k in missing)})")
    try:
        cfg = TrialConfig.model_validate(ckpt["config"])
    except ValidationError as e:
        lines = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
                          for err in e.errors())
        raise ValueError(f"{path}: the checkpoint's config is not valid here ({lines})") from e
    return path, ckpt, cfg


def checkpoint_config(checkpoint: str | Path) -> tuple[Path, TrialConfig]:
    """(the checkpoint.pt file, its `TrialConfig`), checked as `load_trained` checks it, without building a model."""
    path, _, cfg = _read_trained(checkpoint, "cpu")
    return path, cfg


def load_trained(checkpoint: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrialConfig]:
    """The trained model (eval mode) and its `TrialConfig` from a `checkpoint.pt` (or the directory holding it)."""
    path, ckpt, cfg = _read_trained(checkpoint, map_location)
    model = build_from_config(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model its config describes ({e})") from e
    return model.eval(), cfg


def load_finetuned(path: str | Path, *, merge: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A model saved by `bvit.trial.finetune(out=...)` (adapters in place, or merged with `merge=True`) and its record."""
    path = Path(path)
    if path.is_dir():
        path = path / FINETUNED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint; `finetune(out=DIR)` writes DIR/{FINETUNED_NAME}")
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or "peft" not in saved:
        raise ValueError(f"{path}: not written by bvit fine-tuning (no 'peft' record)")
    cfg = TrialConfig.model_validate(saved["config"])
    p = saved["peft"]
    model = build_from_config(cfg.model)
    apply_peft(model, method=p["method"], num_classes=p["num_classes"], rank=p["rank"], alpha=p["alpha"])
    model.load_state_dict(saved["model"])
    if merge and lora_modules(model):
        merge_lora(model)
    return model.eval(), saved["result"]
