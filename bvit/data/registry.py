"""Data sets this project can prepare by name, from files already on the machine (nothing is downloaded).

    preparable("data/fmnist-b")       # -> "fmnist-b": what `prepare_known` would build there
    prepare_known("data/fmnist-b")    # builds it (a no-op when it is already prepared)

A name maps to one source module: `fashion-mnist` (`bvit.data.fashion_mnist`) and the downstream tasks
`fmnist-a`, `fmnist-b`, `digits` (`bvit.data.downstream`). Image folders need a source directory, so
they are prepared by `bvit.data.image_folder.prepare_image_folder`, never by name.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bvit.data.downstream import TASKS, prepare_task
from bvit.data.fashion_mnist import prepare_fashion_mnist
from bvit.data.format import META_NAME, DataError

__all__ = ["SOURCES", "preparable", "prepare_known"]

SOURCES: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST, all 10 classes (60,000 train / 10,000 test, 28x28 grey)",
    **TASKS,
}


def _preparer(name: str) -> Callable[..., dict[str, Any]]:
    if name == "fashion-mnist":
        return prepare_fashion_mnist
    return lambda *, out: prepare_task(name, out=out)


def preparable(path: Path | str) -> str | None:
    """What `prepare_known(path)` would build there, judged by the directory's name; None if nothing.

    `.../fashion-mnist` (or any name containing it) is Fashion-MNIST; `.../fmnist-a`, `.../fmnist-b` and
    `.../digits` are the downstream tasks. A directory that already has a `meta.json` is never rebuilt by name.
    """
    path = Path(path)
    if (path / META_NAME).exists():
        return None
    if "fashion-mnist" in path.name:
        return "fashion-mnist"
    return path.name if path.name in SOURCES else None


def prepare_known(path: Path | str) -> dict[str, Any]:
    """Prepare the data set `preparable(path)` names into `path` (from local files only); DataError if none."""
    name = preparable(path)
    if name is None:
        raise DataError(f"{path}: not a data set this project can prepare by name ({', '.join(SOURCES)}); "
                        "prepare it with `bvit-sweep data prepare`")
    return _preparer(name)(out=path)
