"""FFCV loaders for training and evaluation, deterministic in (seed, epoch).

    loaders = make_loaders(cfg.data, img_size=28, seed=0, device="cuda")
    for epoch in range(1, epochs + 1):
        for images, target in loaders.train(epoch):   # images (B, C, H, W) float32, target (B,) int64
            ...
    for images, labels in loaders.eval(): ...         # every test image exactly once, in file order

FFCV reads and decodes (and, on a GPU, copies to the device inside its pipeline with `ToDevice`); all
randomness happens afterwards in torch, drawn from `numpy.random.default_rng([seed, epoch, rank, step])`.
FFCV 1.0.2's own random ops (RandomHorizontalFlip, RandomTranslate, RandomResizedCrop, mixup) draw from
numba's unseeded per-thread generators, so two runs with the same seed differ -- checked here: a
seeded Loader with RandomHorizontalFlip gave different batches on two passes. Likewise FFCV's RANDOM order
uses `seed + epoch` (seed 0 epoch 2 == seed 1 epoch 1), so the order here is a permutation drawn from
`default_rng([seed, epoch])`: the batches of epoch e are the same whether or not earlier epochs ran, in a
fresh loader or an old one.

Augmentation (`DataConfig.augment`):
- "none": the stored image (image folders: the centre square resized to `img_size`).
- "crop-flip": zero-pad by max(4, img_size/8) px (4 at 28 and 32 px), random crop back, horizontal flip (p=0.5).
- "rrc-flip": random-resized crop (scale 0.08..1, aspect 3/4..4/3, bilinear) + flip. Image folders are
  first decoded to their centre square at img_size/0.875 px (256 for 224), and the crop is taken from it.
Eval uses the centre square (image folders with "rrc-flip": the central 87.5 %, as in ImageNet practice).

Mixup (`DataConfig.mixup` = alpha > 0): one lam ~ Beta(alpha, alpha) per batch, each image mixed with the
batch reversed; the train target is then soft: (B, num_classes) float32, rows summing to 1 (what
`F.cross_entropy` accepts as class probabilities). Without mixup the target is (B,) int64.

Images are normalised with the data set's per-channel mean/std (pixel units, from meta.json). Training
drops the last incomplete batch. `train_subset=N` uses the first N items of train.beton (Fashion-MNIST's
file order is already class-mixed; image folders are stored in a fixed shuffled order). With
`distributed=True` under an initialised `torch.distributed`, each rank reads its own shard of every
epoch's permutation (padded by wrapping, as `DistributedSampler`); evaluation stays whole on each rank.
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bvit.config import DataConfig
from bvit.data.format import DataError, import_ffcv, keep_torch_threads, load_metadata

__all__ = ["DataError", "Loaders", "make_loaders", "load_metadata", "epoch_order", "pad_crop_flip",
           "random_resized_crop_flip", "mixup", "compile_seconds"]

EVAL_CROP_RATIO = 0.875  # ImageNet: resize 256, centre crop 224


def epoch_order(indices: np.ndarray, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """One epoch's training order: a permutation of `indices` from (seed, epoch); rank's shard of it."""
    perm = np.random.default_rng([seed, epoch]).permutation(indices)
    if world == 1:
        return perm
    per_rank = math.ceil(len(perm) / world)
    padded = np.resize(perm, per_rank * world)  # wraps around, like DistributedSampler's padding
    return padded[rank::world]


# ---- batch augmentation (torch, seeded) --------------------------------------------------------------

def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: to CUDA from pinned memory without blocking the host (a pageable copy
    waits for the device); on the CPU the array itself."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pad_crop_flip(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Zero-pad by `pad`, crop back at a random offset, flip half the images horizontally."""
    b, c, h, w = x.shape
    oy = _to_device(rng.integers(0, 2 * pad + 1, b), x.device)
    ox = _to_device(rng.integers(0, 2 * pad + 1, b), x.device)
    flip = _to_device(rng.random(b) < 0.5, x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    padded = F.pad(x, (pad, pad, pad, pad)).view(b, c, -1)  # (B, C, (H+2p) * (W+2p))
    return padded.gather(2, flat).view(b, c, h, w)  # one gather: ~2x faster than multi-dim indexing


def random_resized_crop_flip(x: torch.Tensor, size: int, rng: np.random.Generator, *,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (10 tries, then the whole image) + horizontal flip, batched, bilinear."""
    b = x.shape[0]
    area = rng.uniform(*scale, (10, b))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (10, b)))
    cw, ch = np.sqrt(area * aspect), np.sqrt(area / aspect)  # crop width, height as fractions of the side
    ok = (cw <= 1) & (ch <= 1)
    first = ok.argmax(0)
    cw = np.where(ok.any(0), cw[first, np.arange(b)], 1.0)
    ch = np.where(ok.any(0), ch[first, np.arange(b)], 1.0)
    cx = rng.random(b) * (1 - cw) + cw / 2
    cy = rng.random(b) * (1 - ch) + ch / 2
    sign = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    theta = np.zeros((b, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = sign * cw, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch, 2 * cy - 1
    grid = F.affine_grid(_to_device(theta, x.device), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, size, size)


def mixup(x: torch.Tensor, y: torch.Tensor, *, alpha: float, num_classes: int,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch reversed; returns images and soft targets (B, num_classes)."""
    lam = float(rng.beta(alpha, alpha))
    target = F.one_hot(y, num_classes).float()  # (B,) -> (B, K)
    return lam * x + (1 - lam) * x.flip(0), lam * target + (1 - lam) * target.flip(0)


# ---- loaders ------------------------------------------------------------------------------------------

@functools.cache
def _epoch_loader_class() -> type:
    import_ffcv()
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class DeviceEpochIterator(EpochIterator):
        """FFCV's pass thread, on the loader's GPU: FFCV 1.0.2 never sets the thread's current device
        (FFCV issue #356), so on rank > 0 its copies and events would open a context on GPU 0."""

        def run(self) -> None:
            if self.loader.device.type == "cuda":
                torch.cuda.set_device(self.loader.device)
            super().run()

    class EpochLoader(Loader):
        """FFCV Loader told its order, batch size and drop-last before each pass (`start`).

        FFCV reads all three only when a pass starts, and its numba-compiled pipeline does not depend
        on them, so one compiled Loader serves every order and batch size.
        """

        iterator_class = DeviceEpochIterator

        def __init__(self, *args: Any, device: torch.device, **kwargs: Any):
            self.order, self.device = None, device
            super().__init__(*args, **kwargs)

        def __iter__(self) -> Iterator:  # FFCV 1.0.2's Loader.__iter__, with the pass thread above
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return self.iterator_class(self, selected_order)

        def next_traversal_order(self) -> np.ndarray:
            return self.indices if self.order is None else self.order

        def __len__(self) -> int:  # FFCV's counts the order drawn at construction, not the current one
            n = len(self.next_traversal_order())
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

        def start(self, order: np.ndarray, *, batch_size: int, drop_last: bool) -> Iterator:
            self.order, self.batch_size, self.drop_last = order, batch_size, drop_last
            with keep_torch_threads():
                return iter(self)  # takes the order and sizes now: later calls do not affect this pass

    return EpochLoader


_COMPILED = {"seconds": 0.0}  # this process's time spent building (compiling) FFCV loaders


def compile_seconds() -> float:
    """Seconds this process has spent so far building FFCV loaders (numba-compiling their pipelines); a
    loader already built (same file version and pipeline) is reused and costs nothing."""
    return _COMPILED["seconds"]


@functools.lru_cache(maxsize=8)
def _loader(fname: str, file_id: tuple, *, num_workers: int, kind: str, decode_size: int, crop_ratio: float,
            device: torch.device) -> Any:
    """One FFCV Loader per file version and pipeline per process: building one compiles its pipeline
    with numba (seconds), so trials and tests in the same process share it (one pass at a time)."""
    import_ffcv()
    from ffcv.loader import OrderOption

    t0 = time.perf_counter()
    try:
        with keep_torch_threads():
            loader = _epoch_loader_class()(
                fname, device=device, batch_size=1, num_workers=num_workers, os_cache=True,
                order=OrderOption.SEQUENTIAL, distributed=False, batches_ahead=3,
                pipelines=_pipelines(kind, decode_size=decode_size, crop_ratio=crop_ratio, device=device))
    except (UnicodeDecodeError, KeyError, IndexError, ValueError, TypeError, struct.error) as e:
        # FFCV reads the file's header and field descriptions as it finds them: a forged or foreign file
        # (whose checksum meta.json was made to match) fails deep inside it
        raise DataError(f"{fname}: not an FFCV file this project can read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'bad header'}); prepare the data again") from None
    _COMPILED["seconds"] += time.perf_counter() - t0
    return loader


class _Batches:
    """One pass over a loader: iterable once, with a length."""

    def __init__(self, batches: Iterator, length: int):
        self._batches, self._length = batches, length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches

    def __len__(self) -> int:
        return self._length


class Loaders:
    """Train and eval loaders over one prepared directory; see the module docstring for what they yield."""

    def __init__(self, *, meta: dict[str, Any], cfg: DataConfig, img_size: int, seed: int, device: torch.device,
                 rank: int, world: int, train_loader: Any, eval_loader: Callable[[], Any], train_indices: np.ndarray):
        self.meta, self.cfg, self.img_size, self.seed = meta, cfg, img_size, seed
        self.device, self.rank, self.world = device, rank, world
        # The eval loader is built on first use: compiling its pipeline costs seconds that would otherwise
        # delay the first optimizer step.
        self._train, self._make_eval, self._eval, self._train_indices = train_loader, eval_loader, None, train_indices
        self.steps_per_epoch = math.ceil(len(train_indices) / world) // cfg.batch_size
        self.eval_steps = math.ceil(meta["test_count"] / cfg.eval_batch_size)
        self.train_items = self.steps_per_epoch * cfg.batch_size  # per rank and epoch, after drop-last
        c = meta["image_shape"][0]
        mean = torch.tensor(meta["mean"], dtype=torch.float64).view(1, c, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float64).view(1, c, 1, 1)
        self._scale = (1 / std).to(device, torch.float32)  # (x - mean) / std as one in-place x * scale + shift
        self._shift = (-mean / std).to(device, torch.float32)

    def train(self, epoch: int) -> _Batches:
        """The batches of `epoch` (any int >= 0): the same for the same (seed, epoch), in any process."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        order = epoch_order(self._train_indices, seed=self.seed, epoch=epoch, rank=self.rank, world=self.world)
        batches = self._train.start(order, batch_size=self.cfg.batch_size, drop_last=True)
        return _Batches(self._train_batches(batches, epoch), self.steps_per_epoch)

    def eval(self) -> _Batches:
        """Every test image once, in file order, centre-cropped and normalised; labels (B,) int64."""
        order = np.arange(self.meta["test_count"], dtype=np.uint64)
        if self._eval is None:
            with keep_torch_threads():
                self._eval = self._make_eval()
        batches = self._eval.start(order, batch_size=self.cfg.eval_batch_size, drop_last=False)
        return _Batches(self._eval_batches(batches), self.eval_steps)

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator | None = None):
        x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # -> (B, C, H, W) uint8
        augment = self.cfg.augment if rng is not None else "none"
        if augment == "crop-flip":
            x = pad_crop_flip(x, max(4, round(self.img_size / 8)), rng)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if augment == "rrc-flip":
            x = random_resized_crop_flip(x, self.img_size, rng)  # (B, C, S, S) -> (B, C, img_size, img_size)
        x = x.mul_(self._scale).add_(self._shift)
        return x, labels.view(-1).to(torch.int64, copy=True)  # copy: FFCV reuses its label buffers

    def _train_batches(self, batches: Iterator, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels) in enumerate(batches):
            rng = np.random.default_rng([self.seed, epoch, self.rank, step])
            with self._batch_threads():
                x, y = self._prepare(images, labels, rng)
                if self.cfg.mixup > 0:
                    x, y = mixup(x, y, alpha=self.cfg.mixup, num_classes=self.meta["num_classes"], rng=rng)
            yield x, y

    def _eval_batches(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in batches:
            with self._batch_threads():
                x, y = self._prepare(images, labels)
            yield x, y

    @contextlib.contextmanager
    def _batch_threads(self) -> Iterator[None]:
        """On CPU, one torch thread for the per-batch ops (not across `yield`: the caller keeps its own).

        They are small (~2 ms for 256 images) and share the cores with FFCV's numba threads; with
        several OpenMP threads on a busy 2-core machine they ran 10-80x slower.
        """
        if self.device.type != "cpu":
            yield
            return
        with keep_torch_threads():
            torch.set_num_threads(1)
            yield


def _pipelines(kind: str, *, decode_size: int, crop_ratio: float, device: torch.device) -> dict:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, NDArrayDecoder
    from ffcv.transforms import ToDevice, ToTensor

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    if kind == "ndarray":
        decoder = NDArrayDecoder()
    else:
        decoder = CenterCropRGBImageDecoder((decode_size, decode_size), ratio=crop_ratio)
    # Only torch ops after ToTensor: a numba op after a torch op hangs FFCV 1.0.2's Loader constructor.
    return {"image": [decoder, ToTensor(), *to_device], "label": [IntDecoder(), ToTensor(), *to_device]}


def make_loaders(cfg: DataConfig, *, img_size: int, seed: int, device: torch.device | str = "cpu",
                 distributed: bool = False) -> Loaders:
    """Verified train/eval loaders for `cfg.path` at `img_size` px; see the module docstring."""
    with keep_torch_threads():
        return _make_loaders(cfg, img_size=img_size, seed=seed, device=torch.device(device), distributed=distributed)


def _make_loaders(cfg: DataConfig, *, img_size: int, seed: int, device: torch.device, distributed: bool) -> Loaders:
    import numba

    meta = load_metadata(cfg.path)
    _, h, w = meta["image_shape"]
    if meta["kind"] == "ndarray" and (h, w) != (img_size, img_size):
        raise DataError(f"{Path(cfg.path) / 'meta.json'}: images are {h}x{w} px but model.img_size={img_size}; "
                        f"set model.img_size={h} (this data set is used at its stored size)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if (
        distributed and dist.is_available() and dist.is_initialized()) else (0, 1)
    n = meta["train_count"]
    if cfg.train_subset is not None and cfg.train_subset > n:
        raise DataError(f"data.train_subset={cfg.train_subset} exceeds the {n} training items in {cfg.path}")
    indices = np.arange(cfg.train_subset or n, dtype=np.uint64)
    per_rank = math.ceil(len(indices) / world)
    if per_rank < cfg.batch_size:
        raise DataError(f"data.batch_size={cfg.batch_size} exceeds the {per_rank} training items per process "
                        f"({len(indices)} over {world} process(es)); training drops incomplete batches")

    rrc = cfg.augment == "rrc-flip"
    common = dict(num_workers=min(cfg.num_workers, numba.config.NUMBA_NUM_THREADS), kind=meta["kind"], device=device)
    train_loader = _loader(*_file_id(cfg.path, "train"), crop_ratio=1.0,
                           decode_size=round(img_size / EVAL_CROP_RATIO) if rrc else img_size, **common)
    eval_loader = functools.partial(_loader, *_file_id(cfg.path, "test"), decode_size=img_size,
                                    crop_ratio=EVAL_CROP_RATIO if rrc else 1.0, **common)
    return Loaders(meta=meta, cfg=cfg, img_size=img_size, seed=seed, device=device, rank=rank, world=world,
                   train_loader=train_loader, eval_loader=eval_loader, train_indices=indices)


def _file_id(root: str | Path, split: str) -> tuple[str, tuple[int, int, int]]:
    path = (Path(root) / f"{split}.beton").resolve()
    st = path.stat()
    return str(path), (st.st_ino, st.st_size, st.st_mtime_ns)
