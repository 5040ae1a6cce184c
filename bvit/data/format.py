"""Prepared data sets on disk: FFCV `.beton` files plus a `meta.json` that says what they hold and how to check them.

A prepared directory holds `train.beton`, `test.beton` and `meta.json`; each source module writes one
(`bvit.data.fashion_mnist`, `bvit.data.image_folder`, `bvit.data.downstream`), `bvit.data.loaders` reads it.

Fields of `meta.json` others rely on: `num_classes`, `class_names`, `image_shape` ([C, H, W] of the stored
images; for image folders of mixed sizes the largest H and W, with `fixed_size` false), `mean` and `std`
(per channel, in pixel units 0..255, over the training split), `train_count`, `test_count`. `files`
records each `.beton`'s size and SHA-256 (a sampled digest above 1 GiB); `load_metadata` refuses a
directory whose files disagree with it, so a stale, truncated or swapped `.beton` is never read.

Grey 28x28 sources are stored as `NDArrayField` uint8 (28, 28) + `IntField` label; image folders as
`RGBImageField` + `IntField`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataError", "load_metadata", "META_NAME", "SPLITS", "ArrayDataset", "write_beton", "file_digest",
           "up_to_date", "start_preparation", "finish_preparation", "channel_stats", "keep_torch_threads", "import_ffcv"]

FORMAT_VERSION = 1
META_NAME = "meta.json"
SPLITS = ("train", "test")
_FULL_DIGEST_MAX = 1 << 30
_BETON_HEADER = struct.Struct("<HHIQQ")  # ffcv HeaderType: version, num_fields, page_size, num_samples, alloc_table_ptr


class DataError(Exception):
    """A user-facing data problem; the message names the file and says what to do."""


# ---- checksums and metadata --------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    """SHA-256 of a file; above 1 GiB, of its size, first and last MiB and 256 evenly spaced 64 KiB blocks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_DIGEST_MAX:
            for block in iter(functools.partial(f.read, 1 << 22), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        spaced = np.linspace(1 << 20, size - (2 << 20), 256).astype(np.int64).tolist()
        for offset, length in [(0, 1 << 20), *[(o, 1 << 16) for o in spaced], (size - (1 << 20), 1 << 20)]:
            f.seek(offset)
            h.update(f.read(length))
    return "sampled-sha256:" + h.hexdigest()


def _beton_header_count(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(_BETON_HEADER.size)
    if len(head) < _BETON_HEADER.size:
        return -1, -1
    _, _, _, num_samples, alloc_table_ptr = _BETON_HEADER.unpack(head)
    return num_samples, alloc_table_ptr


@functools.lru_cache(maxsize=64)
def _verified(path: str, size: int, mtime_ns: int, inode: int, digest: str) -> bool:
    return file_digest(Path(path)) == digest


def _check_files(root: Path, meta: dict[str, Any]) -> None:
    redo = meta.get("prepare_command") or "bvit-sweep data prepare ..."
    for split in SPLITS:
        name = f"{split}.beton"
        path, rec = root / name, meta["files"].get(name)
        if rec is None:
            raise DataError(f"{root / META_NAME}: no record of {name}; re-run `{redo}`")
        if not path.is_file():
            raise DataError(f"{path}: missing; re-run `{redo}`")
        st = path.stat()
        if st.st_size != rec["bytes"]:
            what = "truncated" if st.st_size < rec["bytes"] else "larger than recorded"
            raise DataError(f"{path}: {what} ({st.st_size} bytes, meta.json says {rec['bytes']}); "
                            f"the file is damaged or from another preparation -- re-run `{redo}`")
        count, table = _beton_header_count(path)
        if count != meta[f"{split}_count"] or not 0 < table <= st.st_size:
            raise DataError(f"{path}: FFCV header says {count} items, meta.json says {meta[f'{split}_count']}; "
                            f"mismatched files -- re-run `{redo}`")
        if not _verified(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, rec["digest"]):
            raise DataError(f"{path}: content does not match the checksum in meta.json (stale, modified or "
                            f"copied from another preparation); re-run `{redo}`")


_REQUIRED = ("format_version", "dataset", "kind", "num_classes", "class_names", "image_shape", "mean", "std",
             "train_count", "test_count", "files")


def _numbers(n: int | None = None) -> Any:
    return lambda v: isinstance(v, list) and (n is None or len(v) == n) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_FILE_RECORD = {"bytes": _count, "digest": lambda v: isinstance(v, str)}
_TYPES = {  # what each field of meta.json must hold, and how to say it
    "num_classes": (_count, "a whole number"), "train_count": (_count, "a whole number"),
    "test_count": (_count, "a whole number"), "image_shape": (_numbers(3), "3 numbers (channels, height, width)"),
    "mean": (_numbers(), "a list of numbers"), "std": (_numbers(), "a list of numbers"),
    "class_names": (lambda v: isinstance(v, list), "a list"), "kind": (lambda v: isinstance(v, str), "a string"),
    "files": (lambda v: isinstance(v, dict) and all(
        isinstance(r, dict) and all(k in r and ok(r[k]) for k, ok in _FILE_RECORD.items()) for r in v.values()),
        "a mapping of file name -> {bytes, digest}"),
}


def _wrong_types(meta: dict[str, Any]) -> str | None:
    """`field: should be ..., got ...` for the first field of meta.json with the wrong type, else None."""
    for key, (ok, what) in _TYPES.items():
        if not ok(meta[key]):
            return f"{key} should be {what}, got {json.dumps(meta[key])[:60]}"
    return None


def load_metadata(path: Path | str) -> dict[str, Any]:
    """Read `meta.json` of a prepared directory (or the file itself) and verify its `.beton` files.

    Checks that both files exist, have the recorded size and item count, and match the recorded checksum
    (computed once per process per file version). Raises `DataError` naming the offending file otherwise.
    """
    path = Path(path).absolute()  # a relative path is resolved against the cwd: show which one was meant
    root = path.parent if path.name == META_NAME else path
    meta_path = root / META_NAME
    if not root.is_dir():
        raise DataError(f"{root}: prepared data directory not found; create it with "
                        f"`bvit-sweep data prepare fashion-mnist --out {root}` (or `prepare image-folder`)")
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing -- {root} was never prepared or preparation was interrupted; "
                        f"run `bvit-sweep data prepare fashion-mnist --out {root}` (or `prepare image-folder`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({e}); delete {root} and prepare it again") from e
    missing = [k for k in _REQUIRED if k not in meta] if isinstance(meta, dict) else list(_REQUIRED)
    if missing:
        raise DataError(f"{meta_path}: missing field(s) {', '.join(missing)}; delete {root} and prepare it again")
    if wrong := _wrong_types(meta):
        raise DataError(f"{meta_path}: {wrong}; delete {root} and prepare it again")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format version {meta['format_version']}, this code reads {FORMAT_VERSION}; "
                        f"re-run `{meta.get('prepare_command', 'bvit-sweep data prepare ...')}`")
    _check_files(root, meta)
    return meta


# ---- FFCV --------------------------------------------------------------------------------------------

def import_ffcv() -> None:
    """Import FFCV (the first call in a process; later ones return at once), keeping torch's thread count,
    without FFCV 1.0's import-time numba compile.

    `ffcv.fields.rgb_image` builds `IMAGE_MODES = numba.typed.Dict()` and sets two keys at import: numba
    compiles the typed dict's methods, ~1.8 s of the ~2.2 s `import ffcv` on a small CPU, paid by every
    process that reads or writes data (each sweep trial process). The dict is only ever read from Python
    (the decoders copy its two ints before compiling their code; the writer indexes it), so a plain dict
    behaves the same: while FFCV imports, `numba.typed.Dict` is `dict`, and it is numba's again after.
    """
    if "ffcv" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        with keep_torch_threads():
            import ffcv  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict


# ---- writing -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Importing FFCV, building a Loader and starting an epoch each set torch's intra-op thread count
    (to 1, or to the loader's worker count); run those under this to keep the caller's setting."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def _writer_progress(desc: str, enabled: bool) -> Iterator[None]:
    """FFCV's writer always draws a tqdm bar; label it, or silence it."""
    from tqdm import tqdm

    import_ffcv()
    import ffcv.writer

    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(tqdm, desc=desc, disable=not enabled, leave=False)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def write_beton(path: Path, dataset: Any, fields: dict[str, Any], *, page_size: int = 1 << 21, workers: int = 1,
                progress: bool = False) -> dict[str, Any]:
    """Write `dataset` (indexable, items are tuples in `fields` order) to `path` atomically; returns its record.

    `dataset[i]` must never raise: FFCV's writer waits forever for a worker that died.
    """
    import_ffcv()
    from ffcv.writer import DatasetWriter
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=max(1, min(workers, len(dataset))))
        with _writer_progress(f"write {path.name}", progress):
            writer.from_indexed_dataset(dataset, chunksize=max(1, min(1000, len(dataset) // (4 * workers) or 1)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"bytes": path.stat().st_size, "digest": file_digest(path)}


def ffcv_version() -> str:
    return version("ffcv")


def up_to_date(out: Path, *, source_fingerprint: str, params: dict[str, Any]) -> tuple[dict | None, str]:
    """(metadata, "") when `out` already holds this preparation; else (None, why it must be redone)."""
    if not (out / META_NAME).exists():
        return None, "not prepared yet"
    try:
        meta = load_metadata(out)
    except DataError as e:
        return None, str(e)
    changes = {"source": (meta.get("source", {}).get("fingerprint"), source_fingerprint),
               "options": (meta.get("params"), params), "ffcv version": (meta.get("ffcv_version"), ffcv_version())}
    for what, (old, new) in changes.items():
        if old != new:
            return None, f"{what} changed since the last preparation"
    return meta, ""


def start_preparation(out: Path) -> None:
    """Remove `meta.json` first, so an interrupted preparation leaves a directory `load_metadata` refuses.

    Writes only into a new or empty directory, or one holding nothing but a preparation's files (a
    `DataError` otherwise: `--out` never overwrites what is not prepared data)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; --out names the directory to write the prepared "
                        "data into: pass a new path")
    ours = {META_NAME, *(f"{split}.beton" for split in SPLITS)}
    if out.is_dir() and (other := sorted(p.name for p in out.iterdir()
                                         if p.name not in ours and not p.name.startswith("."))):
        raise DataError(f"{out}: holds files that are not prepared data ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); pass a new or empty directory to --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)


def finish_preparation(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Atomically write `meta.json` (last, after both `.beton` files) and return the metadata."""
    meta = {"format_version": FORMAT_VERSION, **meta, "ffcv_version": ffcv_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = out / f".{META_NAME}.{os.getpid()}.partial"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / META_NAME)
    return meta


def channel_stats(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (pixel units) from float64 sums of x and x**2 over `count` pixels."""
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]



class ArrayDataset:
    """Indexable (image, label) pairs of two arrays, for FFCV's writer."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])
