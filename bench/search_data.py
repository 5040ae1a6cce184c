"""Prepare `data/fmnist-small`: the first 2,000 Fashion-MNIST training images and the first 2,000 test images,
in the project's prepared layout (train.beton, test.beton, meta.json). The search benchmark's space
(sweeps/search-*.yaml) trains and scores on it: on a shared 2-core CPU scoring the full 10,000-image test set
costs more than training a tiny model on 2,000 images for an epoch.

    python bench/search_data.py [--out data/fmnist-small]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bvit.data.downstream import _IDX, _write
from bvit.data.fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, read_idx

COUNTS = {"train": 2000, "test": 2000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/fmnist-small")
    out = Path(parser.parse_args().out)
    splits = {}
    for split, (images, labels) in _IDX.items():
        x = read_idx(DEBIAN_FASHION_MNIST / f"{images}.gz", ndim=3)[:COUNTS[split]].copy()  # (N, 28, 28) uint8
        y = read_idx(DEBIAN_FASHION_MNIST / f"{labels}.gz", ndim=1)[:COUNTS[split]].astype("int64")
        splits[split] = x, y
    meta = _write(out, splits=splits, class_names=list(FASHION_MNIST_CLASSES), dataset="fashion-mnist-small",
                  source={"path": str(DEBIAN_FASHION_MNIST)}, params={"counts": COUNTS},
                  command="python bench/search_data.py")
    print(f"{out}: {meta['train_count']} train / {meta['test_count']} test images, per class {meta['test_per_class']}")


if __name__ == "__main__":
    main()
