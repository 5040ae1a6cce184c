"""Downstream tasks for fine-tuning (fmnist-a, fmnist-b, digits), prepared like any data set (`train.beton`, `test.beton`, `meta.json`).

Both come from data already on the machine -- nothing is downloaded at run time:

  * `fmnist-a` / `fmnist-b`: a Fashion-MNIST class split (read from the Debian package's IDX files).
    Pretrain on A = {T-shirt/top, Trouser, Pullover, Dress, Coat} (original labels 0-4), fine-tune on
    B = {Sandal, Shirt, Sneaker, Bag, Ankle boot} (5-9), each relabelled 0-4 in that order. 30,000
    train / 5,000 test images per half, 28x28 grey; the two halves share no class.
  * `digits`: scikit-learn's bundled 8x8 handwritten digits (`sklearn.datasets.load_digits`, 1,797
    images, 10 classes, 16 grey levels), upsampled bilinearly to 28x28 and scaled to 0..255 so a
    Fashion-MNIST model reads them unchanged; a stratified split (seed 0) of 1,347 train / 450 test.

    prepare_task("fmnist-b", out="data/fmnist-b")   # or bvit-sweep finetune ... --data data/fmnist-b
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bvit.data.fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, read_idx
from bvit.data.format import (
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

__all__ = ["TASKS", "prepare_task", "prepare_fashion_mnist_split", "prepare_digits", "digits_arrays"]

TASKS: dict[str, str] = {
    "fmnist-a": "Fashion-MNIST classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat): the pretraining half",
    "fmnist-b": "Fashion-MNIST classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot): the transfer half",
    "digits": "scikit-learn 8x8 digits upsampled to 28x28 grey (1,347 train / 450 test, 10 classes)",
}
_SPLIT_CLASSES = {"fmnist-a": (0, 1, 2, 3, 4), "fmnist-b": (5, 6, 7, 8, 9)}
_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _write(out: Path, *, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str],
           dataset: str, source: dict[str, Any], params: dict[str, Any], command: str) -> dict[str, Any]:
    """Write uint8 (N, 28, 28) images + labels as a prepared directory (the Fashion-MNIST layout)."""
    import_ffcv()
    from ffcv.fields import IntField, NDArrayField

    start_preparation(out)
    fields = {"image": NDArrayField(dtype=np.dtype("uint8"), shape=(28, 28)), "label": IntField()}
    workers = min(4, os.cpu_count() or 1)
    records = {f"{split}.beton": write_beton(out / f"{split}.beton", ArrayDataset(*arrays), fields, workers=workers)
               for split, arrays in splits.items()}
    train = splits["train"][0]
    mean, std = channel_stats(np.array([train.sum(dtype=np.float64)]),
                              np.array([np.square(train, dtype=np.float64).sum()]), train.size)
    k = len(class_names)
    return finish_preparation(out, {
        "dataset": dataset, "kind": "ndarray", "num_classes": k, "class_names": list(class_names),
        "image_shape": [1, 28, 28], "fixed_size": True, "mean": mean, "std": std,
        "train_count": len(splits["train"][1]), "test_count": len(splits["test"][1]),
        "train_per_class": np.bincount(splits["train"][1], minlength=k).tolist(),
        "test_per_class": np.bincount(splits["test"][1], minlength=k).tolist(),
        "source": source, "params": params, "files": records, "prepare_command": command,
    })


def prepare_fashion_mnist_split(*, out: Path | str, classes: Sequence[int], source: Path | str | None = None,
                                force: bool = False) -> dict[str, Any]:
    """Fashion-MNIST restricted to `classes` (original labels), relabelled 0..len(classes)-1 in that order.

    Returns the metadata plus `status` ("up-to-date": nothing written, or "written").
    """
    out = Path(out)
    classes = [int(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(0 <= c < 10 for c in classes):
        raise DataError(f"classes must be at least two distinct Fashion-MNIST labels in 0..9, got {classes}")
    src = Path(source) if source is not None else DEBIAN_FASHION_MNIST
    files = {}
    for split, stems in _IDX.items():
        for stem in stems:
            path = next((p for p in (src / f"{stem}.gz", src / stem) if p.is_file()), None)
            if path is None:
                raise DataError(f"{src / stem}.gz: missing; install the Debian package "
                                "(apt-get install dataset-fashion-mnist) or pass source=DIR with the IDX files")
            files[split, stem] = path
    digests = {p.name: file_digest(p) for p in files.values()}
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    params = {"storage": "ndarray-uint8-28x28", "classes": classes}
    meta, reason = up_to_date(out, source_fingerprint=fingerprint, params=params)
    if meta is not None and not force:
        return {**meta, "status": "up-to-date"}

    relabel = np.full(10, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    splits = {}
    for split, (image_stem, label_stem) in _IDX.items():
        images = read_idx(files[split, image_stem], ndim=3)  # (N, 28, 28) uint8
        labels = read_idx(files[split, label_stem], ndim=1).astype(np.int64)  # (N,)
        keep = relabel[labels] >= 0
        splits[split] = np.ascontiguousarray(images[keep]), relabel[labels[keep]]
    meta = _write(out, splits=splits, class_names=[FASHION_MNIST_CLASSES[c] for c in classes],
                  dataset=f"fashion-mnist-classes-{'-'.join(map(str, classes))}",
                  source={"path": str(src.resolve()), "fingerprint": fingerprint, "files": digests},
                  params=params, command=f"python -c \"from bvit.data.downstream import prepare_fashion_mnist_split; "
                                         f"prepare_fashion_mnist_split(out='{out}', classes={classes})\"")
    return {**meta, "status": "written", "reason": "forced" if force else reason}


def digits_arrays(*, size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as {"train", "test"} -> (uint8 images (N, size, size), int64 labels (N,))."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] * (255.0 / 16.0)  # (1797, 1, 8, 8), 0..255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (1797, 1, size, size)
    images = x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=labels)
    return {"train": (images[idx_train], labels[idx_train]), "test": (images[idx_test], labels[idx_test])}


def prepare_digits(*, out: Path | str, force: bool = False) -> dict[str, Any]:
    """Write the upsampled scikit-learn digits (see the module docstring) as a prepared directory."""
    import sklearn

    out = Path(out)
    splits = digits_arrays()
    blob = b"".join(a.tobytes() for pair in splits.values() for a in pair)
    fingerprint = hashlib.sha256(blob).hexdigest()
    params = {"storage": "ndarray-uint8-28x28", "upsample": "bilinear 8->28", "test_fraction": 0.25, "seed": 0}
    meta, reason = up_to_date(out, source_fingerprint=fingerprint, params=params)
    if meta is not None and not force:
        return {**meta, "status": "up-to-date"}
    meta = _write(out, splits=splits, class_names=[str(d) for d in range(10)], dataset="sklearn-digits-28",
                  source={"path": f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
                          "fingerprint": fingerprint},
                  params=params, command=f"python -c \"from bvit.data.downstream import prepare_digits; "
                                         f"prepare_digits(out='{out}')\"")
    return {**meta, "status": "written", "reason": "forced" if force else reason}


def prepare_task(name: str, *, out: Path | str, source: Path | str | None = None, force: bool = False) -> dict[str, Any]:
    """Prepare the named downstream task (`TASKS`) into `out`; a no-op when it is already there."""
    if name in _SPLIT_CLASSES:
        return prepare_fashion_mnist_split(out=out, classes=_SPLIT_CLASSES[name], source=source, force=force)
    if name == "digits":
        return prepare_digits(out=out, force=force)
    raise DataError(f"unknown downstream task {name!r}; choose one of {', '.join(TASKS)}")
