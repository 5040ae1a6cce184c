"""Fashion-MNIST (Xiao et al., 2017) from the Debian package's IDX files to a prepared directory.

    prepare_fashion_mnist(out="data/fashion-mnist")      # bvit-sweep data prepare fashion-mnist --out ...

Stored as `NDArrayField` uint8 (28, 28) + `IntField` label (see `bvit.data.format`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bvit.data.format import (
    SPLITS,
    ArrayDataset,
    DataError,
    channel_stats,
    file_digest,
    finish_preparation,
    import_ffcv,
    start_preparation,
    up_to_date,
    write_beton,
)

__all__ = ["prepare_fashion_mnist", "read_idx", "FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FMNIST_FILES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
                 ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}


def read_idx(path: Path | str, *, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (`.gz` or plain) with `ndim` dimensions, validating magic and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is damaged -- reinstall it "
                        "(apt-get install --reinstall dataset-fashion-mnist) or pass another --source") from e
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, dtype_code, got_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or got_ndim != ndim:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000080{ndim}: unsigned bytes, "
                        f"{ndim} dimension(s)); this is not the expected IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says {'x'.join(map(str, dims))} items = {expected} bytes "
                        f"(decompressed), file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_fmnist_files(source: Path) -> dict[tuple[str, str], Path]:
    hint = ("install the Debian package (apt-get install dataset-fashion-mnist) or pass --source DIR "
            "holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    if not source.is_dir():
        raise DataError(f"{source}: Fashion-MNIST directory not found; {hint}")
    found = {}
    for key, stem in _FMNIST_FILES.items():
        candidates = [source / f"{stem}.gz", source / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{candidates[0]}: missing (nor {candidates[1].name}); {hint}")
        found[key] = path
    return found


def _load_fmnist(files: Mapping[tuple[str, str], Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split in SPLITS:
        images = read_idx(files[split, "images"], ndim=3)  # (N, 28, 28) uint8
        labels = read_idx(files[split, "labels"], ndim=1)  # (N,) uint8
        if images.shape[1:] != (28, 28):
            raise DataError(f"{files[split, 'images']}: images are {images.shape[1]}x{images.shape[2]}, "
                            "Fashion-MNIST is 28x28")
        if len(images) != len(labels):
            raise DataError(f"{files[split, 'labels']}: {len(labels)} labels for {len(images)} images in "
                            f"{files[split, 'images'].name}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{files[split, 'labels']}: label {labels.max()} out of range 0..9")
        out[split] = images, labels
    return out


def prepare_fashion_mnist(*, out: Path | str, source: Path | str | None = None, progress: bool = False,
                          force: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Parse the Fashion-MNIST IDX files and write `train.beton`, `test.beton` and `meta.json` to `out`.

    `source` defaults to the Debian package's directory. Returns the metadata plus `status`:
    "up-to-date" (nothing written: same source checksums, options and FFCV version, files verified) or
    "written" (with `reason`).
    """
    out = Path(out)
    source = Path(source) if source is not None else DEBIAN_FASHION_MNIST
    files = _find_fmnist_files(source)
    digests = {p.name: file_digest(p) for p in files.values()}
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    params = {"storage": "ndarray-uint8-28x28"}
    meta, reason = up_to_date(out, source_fingerprint=fingerprint, params=params)
    if meta is not None and not force:
        return {**meta, "status": "up-to-date"}
    reason = "forced" if force else reason

    data = _load_fmnist(files)
    start_preparation(out)
    import_ffcv()
    from ffcv.fields import IntField, NDArrayField

    fields = {"image": NDArrayField(dtype=np.dtype("uint8"), shape=(28, 28)), "label": IntField()}
    workers = workers or min(4, os.cpu_count() or 1)
    records = {f"{split}.beton": write_beton(out / f"{split}.beton", ArrayDataset(*data[split]), fields,
                                             workers=workers, progress=progress) for split in SPLITS}
    train_images = data["train"][0]
    mean, std = channel_stats(np.array([train_images.sum(dtype=np.float64)]),
                              np.array([np.square(train_images, dtype=np.float64).sum()]), train_images.size)
    meta = finish_preparation(out, {
        "dataset": "fashion-mnist",
        "kind": "ndarray",
        "num_classes": len(FASHION_MNIST_CLASSES),
        "class_names": list(FASHION_MNIST_CLASSES),
        "image_shape": [1, 28, 28],
        "fixed_size": True,
        "mean": mean,
        "std": std,
        "train_count": len(data["train"][1]),
        "test_count": len(data["test"][1]),
        "train_per_class": np.bincount(data["train"][1], minlength=10).tolist(),
        "test_per_class": np.bincount(data["test"][1], minlength=10).tolist(),
        "source": {"path": str(source.resolve()), "fingerprint": fingerprint,
                   "files": digests},
        "params": params,
        "files": records,
        "prepare_command": f"bvit-sweep data prepare fashion-mnist --source {source} --out {out}",
    })
    return {**meta, "status": "written", "reason": reason}
