"""Checkpoint files: written atomically, read as data only.

    save_checkpoint(path, {"model": ..., "rng": rng_state(), ...})
    ckpt = read_checkpoint(path)          # torch.load(..., weights_only=True): tensors and plain data only
    model, cfg = load_trained("runs/t/checkpoint.pt")   # a trained model and its TrialConfig

Checkpoints are files people download and share, so reading one must never run code: every read goes
through `read_checkpoint`, which unpickles with `weights_only=True`. A file that holds any other Python
object (a hostile `__reduce__`, a numpy array, a custom class) is refused with `CheckpointError`, and
nothing in it executes. What the project writes is plain data by construction: tensors, dicts, lists,
tuples, str, int, float, bool, None -- the RNG states included (`rng_state`).

Checkpoints written before 0.1.0's data-only format stored numpy's RNG state as an ndarray; those
load too, through an allow-list of exactly numpy's array-reconstruction types (`_LEGACY_NUMPY`).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from pydantic import ValidationError

from bvit.config import CHECKPOINT_NAME, FINETUNED_NAME, TrialConfig
from bvit.models.factory import build_from_config
from bvit.peft import apply_peft, lora_modules, merge_lora

__all__ = ["CheckpointError", "read_checkpoint", "save_checkpoint", "rng_state", "set_rng_state",
           "load_training_checkpoint", "checkpoint_config", "load_trained", "load_finetuned"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, foreign, or holding more than data."""


def _legacy_numpy_globals() -> list[Any]:
    # Exactly what pickling a numpy integer array needs: no callable beyond ndarray reconstruction.
    from numpy._core.multiarray import _reconstruct  # numpy's own pickle entry point for arrays
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """The object in a checkpoint file, loaded as data only; `CheckpointError` if that is not possible."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the error below says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: it holds a Python object ({refused.group(1)}) that is not a tensor or "
                "plain data, and unpickling it could run code; bvit-sweep reads checkpoints as data only -- "
                "use a checkpoint written by bvit-sweep, or re-save the weights as a plain state dict") from None
        detail = re.search(r"(Unsupported operand \S+|invalid load key[^\n]*)", str(e))
        raise CheckpointError(f"{path}: cannot read checkpoint: not a file torch.save wrote "
                              f"({detail.group(1) if detail else type(e).__name__})") from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic: write a temp file in the same directory, fsync, then rename over the old checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data (and the CUDA state of `device` only, if CUDA)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved (either format: numpy keys as a tensor or a legacy ndarray)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        # Saved by `rng_state` (one tensor) or by the legacy code (a list, one per visible GPU).
        if not isinstance(cuda, torch.Tensor):
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)


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
