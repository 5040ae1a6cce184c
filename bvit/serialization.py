"""Checkpoint files at the byte level: written atomically, read as data only, RNG states as plain data.

    save_checkpoint(path, {"model": ..., "rng": rng_state(), ...})
    ckpt = read_checkpoint(path)          # torch.load(..., weights_only=True): tensors and plain data only

Checkpoints are files people download and share, so reading one must never run code: every read goes
through `read_checkpoint`, which unpickles with `weights_only=True`. A file that holds any other Python
object (a hostile `__reduce__`, a numpy array, a custom class) is refused with `CheckpointError`, and
nothing in it executes. What the project writes is plain data by construction: tensors, dicts, lists,
tuples, str, int, float, bool, None -- the RNG states included (`rng_state`).

Checkpoints written before 0.1.0's data-only format stored numpy's RNG state as an ndarray; those
load too, through an allow-list of exactly numpy's array-reconstruction types (`_legacy_numpy_globals`).

This module sits below `bvit.models` (timm's `create_model(pretrained=True)` reads files through it);
`bvit.checkpoint` builds on it to turn what the project's checkpoints hold into models and configs.
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

__all__ = ["CheckpointError", "read_checkpoint", "save_checkpoint", "rng_state", "set_rng_state"]


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
