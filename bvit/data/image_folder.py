"""Class-folder image data sets (ImageNet layout) to FFCV.

    src/train/<class>/<image>      src/val/<class>/<image>      (nested folders inside a class are fine)

Class names are the sorted folder names under `train/`; label i is the i-th. `val/` may lack classes but may
not add any. Every regular, non-hidden file counts as a candidate image and is decoded with Pillow
(converted to RGB; 16-bit greyscale scaled to 8 bits), then shrunk (area averaging) so its longer side is
at most `max_res`.

Unreadable files (corrupt, truncated, not an image, unsupported pixel mode): by default they are
**skipped and reported** -- their count is printed, and each path and reason is listed under `skipped` in
`meta.json`. With `strict=True` (`--strict`) preparation stops at the first one, naming it. A file that
decodes during the scan but fails during writing (changed in between) always stops preparation: no bad
record is ever written.

Images are stored as JPEG at `jpeg_quality` or, with `jpeg_quality=None` (`--raw`), as raw pixels
(lossless). `train.beton` holds the training images in one fixed pseudo-random order (the same for every
preparation of the same files), so its first N items are a class-mixed subset (`data.train_subset`);
`test.beton` holds `val/` in class order. Mean and std are measured on the training pixels after resizing,
before JPEG coding.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np

from bvit.data.format import (
    DataError,
    channel_stats,
    finish_preparation,
    import_ffcv,
    start_preparation,
    up_to_date,
    write_beton,
)

__all__ = ["prepare_image_folder", "decode_image"]

_SPLIT_DIRS = {"train": "train", "test": "val"}


def decode_image(path: Path | str, max_res: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, longer side shrunk to `max_res`; raises on anything unreadable.

    Pillow only (area-averaging BOX resize): it runs in the processes FFCV's writer forks, where a
    thread pool inherited from the parent (OpenCV's) could deadlock.
    """
    from PIL import Image

    with Image.open(path) as im:
        if max_res is not None and im.format == "JPEG" and max(im.size) > max_res:
            scale = max_res / max(im.size)
            im.draft("RGB", (int(im.size[0] * scale), int(im.size[1] * scale)))  # DCT-domain downscale
        im.load()
        if im.mode.startswith("I;16"):
            im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
        elif im.mode in ("I", "F"):
            raise ValueError(f"unsupported pixel mode {im.mode}")
        im = im.convert("RGB")
        w, h = im.size
        if w == 0 or h == 0:
            raise ValueError("empty image")
        if max_res is not None and max(w, h) > max_res:
            ratio = max_res / max(w, h)
            im = im.resize((max(1, int(w * ratio)), max(1, int(h * ratio))), Image.Resampling.BOX)
        return np.array(im, dtype=np.uint8)  # (H, W, 3)


def _scan_one(args: tuple[str, int | None]) -> tuple[int, int, np.ndarray, np.ndarray] | str:
    path, max_res = args
    try:
        img = decode_image(path, max_res)
    except Exception as e:  # Pillow raises many types for bad files; each becomes a reported skip
        return f"{type(e).__name__}: {e}"
    pixels = img.reshape(-1, 3).astype(np.float64)
    return img.shape[0], img.shape[1], pixels.sum(0), np.square(pixels).sum(0)


class _FolderDataset:
    """FFCV writer input: decodes again; a failure is logged and a placeholder returned (never raised,
    since FFCV's writer would hang), and the caller then discards the file."""

    def __init__(self, files: list[Path], labels: list[int], max_res: int | None, error_log: Path):
        self.files, self.labels, self.max_res, self.error_log = files, labels, max_res, error_log

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            return decode_image(self.files[i], self.max_res), self.labels[i]
        except Exception as e:
            with open(self.error_log, "a") as f:
                f.write(f"{self.files[i]}\t{type(e).__name__}: {e}\n")
            return np.zeros((1, 1, 3), np.uint8), -1


def _list_split(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    items = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
                items.append((p, label))
    return items


def _discover(src: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    for d in _SPLIT_DIRS.values():
        if not (src / d).is_dir():
            raise DataError(f"{src / d}: missing; an image-folder data set needs {src}/train/<class>/* "
                            f"and {src}/val/<class>/* (ImageNet layout)")
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{src / 'train'}: found {len(classes)} class folder(s); need at least 2")
    extra = sorted(p.name for p in (src / "val").iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in classes)
    if extra:
        raise DataError(f"{src / 'val' / extra[0]}: class not present under {src / 'train'} "
                        f"({len(extra)} such folder(s)); val classes must be a subset of train classes")
    return classes, {split: _list_split(src / d, classes) for split, d in _SPLIT_DIRS.items()}


def _fingerprint(src: Path, items: dict[str, list[tuple[Path, int]]]) -> str:
    h = hashlib.sha256()
    for split in _SPLIT_DIRS:
        for p, label in items[split]:
            st = p.stat()
            h.update(f"{p.relative_to(src)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _scan(items: list[tuple[Path, int]], *, max_res: int | None, workers: int, desc: str, progress: bool) -> list:
    from tqdm import tqdm

    jobs = [(str(p), max_res) for p, _ in items]
    chunk = max(1, min(64, len(jobs) // (8 * workers) or 1))
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_scan_one, jobs, chunksize=chunk), total=len(jobs), desc=desc,
                                disable=not progress, leave=False))
    else:
        results = [_scan_one(j) for j in tqdm(jobs, desc=desc, disable=not progress, leave=False)]
    return results


def prepare_image_folder(*, src: Path | str, out: Path | str, max_res: int | None = None,
                         jpeg_quality: int | None = 90, workers: int | None = None, progress: bool = False,
                         strict: bool = False, force: bool = False) -> dict[str, Any]:
    """Write `src/train` and `src/val` class folders to `out/{train,test}.beton` plus `meta.json`.

    Returns the metadata plus `status` ("up-to-date": same file list, sizes, mtimes and options, outputs
    verified -- nothing written; or "written" with `reason`). Skipped files are in `meta["skipped"]`.
    """
    src, out = Path(src), Path(out)
    if max_res is not None and max_res < 1:
        raise DataError(f"max_res={max_res}: must be a positive number of pixels")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise DataError(f"jpeg_quality={jpeg_quality}: must lie in 1..100 (or use raw storage)")
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    if not src.is_dir():
        raise DataError(f"{src}: image-folder source directory not found")
    classes, items = _discover(src)
    params = {"max_res": max_res, "jpeg_quality": jpeg_quality, "strict": strict}
    fingerprint = _fingerprint(src, items)
    meta, reason = up_to_date(out, source_fingerprint=fingerprint, params=params)
    if meta is not None and not force:
        return {**meta, "status": "up-to-date"}
    reason = "forced" if force else reason

    kept: dict[str, list[tuple[Path, int]]] = {}
    skipped, shapes = [], []
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    for split in _SPLIT_DIRS:
        results = _scan(items[split], max_res=max_res, workers=workers, desc=f"scan {_SPLIT_DIRS[split]}",
                        progress=progress)
        kept[split] = []
        for (path, label), res in zip(items[split], results, strict=True):
            if isinstance(res, str):
                if strict:
                    raise DataError(f"{path}: unreadable image ({res}); remove or fix it, or prepare without "
                                    "--strict to skip such files")
                skipped.append({"path": str(path.relative_to(src)), "reason": res})
                continue
            h, w, s, sq = res
            kept[split].append((path, label))
            shapes.append((h, w))
            if split == "train":
                total, total_sq, pixels = total + s, total_sq + sq, pixels + h * w
    counts = {split: np.bincount([lb for _, lb in kept[split]], minlength=len(classes)).tolist()
              for split in _SPLIT_DIRS}
    empty = [classes[i] for i, n in enumerate(counts["train"]) if n == 0]
    if empty:
        raise DataError(f"{src / 'train' / empty[0]}: no readable image ({len(empty)} empty class folder(s))")
    if not kept["test"]:
        raise DataError(f"{src / 'val'}: no readable image")

    order = np.random.default_rng(0).permutation(len(kept["train"]))
    kept["train"] = [kept["train"][i] for i in order]
    max_h, max_w = (max(s[i] for s in shapes) for i in (0, 1))
    page_size = max(1 << 21, 1 << int(2 * max_h * max_w * 3 + (1 << 16) - 1).bit_length())
    start_preparation(out)
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    mode = {"write_mode": "raw"} if jpeg_quality is None else {"write_mode": "jpg", "jpeg_quality": jpeg_quality}
    fields = {"image": RGBImageField(max_resolution=None, **mode), "label": IntField()}
    records = {}
    for split in _SPLIT_DIRS:
        target = out / f"{split}.beton"
        error_log = out / f".{split}.errors.{os.getpid()}"
        error_log.unlink(missing_ok=True)
        dataset = _FolderDataset([p for p, _ in kept[split]], [lb for _, lb in kept[split]], max_res, error_log)
        records[target.name] = write_beton(target, dataset, fields, page_size=page_size, workers=workers,
                                           progress=progress)
        if error_log.exists():
            failures = error_log.read_text().splitlines()
            error_log.unlink()
            target.unlink()
            path, why = failures[0].split("\t", 1)
            raise DataError(f"{path}: became unreadable while writing ({why}; {len(failures)} file(s)); "
                            f"{target} was removed -- fix the source and prepare again")

    mean, std = channel_stats(total, total_sq, pixels)
    meta = finish_preparation(out, {
        "dataset": src.name,
        "kind": "rgb",
        "num_classes": len(classes),
        "class_names": classes,
        "image_shape": [3, max_h, max_w],
        "fixed_size": len(set(shapes)) == 1,
        "mean": mean,
        "std": std,
        "train_count": len(kept["train"]),
        "test_count": len(kept["test"]),
        "train_per_class": counts["train"],
        "test_per_class": counts["test"],
        "skipped": skipped,
        "source": {"path": str(src.resolve()), "fingerprint": fingerprint,
                   "splits": {"train": "train", "test": "val"}},
        "params": params,
        "files": records,
        "prepare_command": _command(src, out, max_res, jpeg_quality, strict),
    })
    return {**meta, "status": "written", "reason": reason}


def _command(src: Path, out: Path, max_res: int | None, jpeg_quality: int | None, strict: bool) -> str:
    parts = ["bvit-sweep data prepare image-folder", f"--src {src}", f"--out {out}"]
    if max_res is not None:
        parts.append(f"--max-res {max_res}")
    parts.append("--raw" if jpeg_quality is None else f"--jpeg-quality {jpeg_quality}")
    if strict:
        parts.append("--strict")
    return " ".join(parts)

