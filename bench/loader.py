"""FFCV (bvit.data.loaders) vs torch DataLoader + torchvision, same data, batch, augmentation and workers.

    python bench/loader.py [--data data/fashion-mnist] [--batch-size 256] [--workers 2] [--max-items N]

Both read the same uint8 Fashion-MNIST training images (prepared first if needed: seconds) in random
order and produce normalised float32 (B, 1, 28, 28) batches with pad-4 random crop + horizontal flip,
on the device (CUDA when present). The DataLoader applies torchvision.transforms.v2 per image in worker
processes (the usual recipe); FFCV reads and decodes in numba threads and augments whole batches. Rates
exclude the first batch (worker start-up) and FFCV's warm-up batches (numba compilation). The last line is
the training consumption of the default bViT (width 128, 6 steps, patch 4) for scale.
Goal: FFCV >= 10x the DataLoader and well above the model's consumption (never the bottleneck).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bvit.config import DataConfig, ModelConfig
from bvit.data.fashion_mnist import prepare_fashion_mnist, read_idx
from bvit.data.loaders import make_loaders


def _timed(batches, device: torch.device, max_items: int | None) -> float:
    """Images per second over `batches`, after the first batch."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
        if max_items is not None and n >= max_items:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


class _IdxDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]  # (1, 28, 28) uint8 -> float32


def torch_loader_rate(*, meta: dict, batch_size: int, workers: int, device: torch.device,
                      max_items: int | None) -> float:
    """torchvision v2 per-image transforms in DataLoader worker processes."""
    from torchvision.transforms import v2

    source = Path(meta["source"]["path"])
    images = torch.from_numpy(read_idx(source / "train-images-idx3-ubyte.gz", ndim=3).copy())  # (N, 28, 28) uint8
    labels = torch.from_numpy(read_idx(source / "train-labels-idx1-ubyte.gz", ndim=1).copy()).long()
    transform = v2.Compose([v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32),
                            v2.Normalize(meta["mean"], meta["std"])])
    dataset = _IdxDataset(images.unsqueeze(1), labels, transform)  # (N, 1, 28, 28) uint8
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda")
    return _timed(loader, device, max_items)


def ffcv_rate(*, data: Path, batch_size: int, workers: int, device: torch.device, max_items: int | None) -> float:
    cfg = DataConfig(path=str(data), batch_size=batch_size, augment="crop-flip", num_workers=workers)
    loaders = make_loaders(cfg, img_size=28, seed=0, device=device)
    for step, _ in enumerate(loaders.train(0)):  # numba compiles the pipeline for the first batch
        if step == 3:
            break
    return _timed(loaders.train(1), device, max_items)


def model_rate(*, batch_size: int, device: torch.device, steps: int) -> float:
    """Training images/s of the default bViT (forward, backward, AdamW step) on random inputs."""
    from bvit.models.factory import build_model

    m = ModelConfig()
    model = build_model(arch=m.arch, width=m.width, steps=m.steps, heads=m.heads, patch_size=m.patch_size,
                        img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, m.in_chans, m.img_size, m.img_size, device=device)
    y = torch.randint(0, m.num_classes, (batch_size,), device=device)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"), help="prepared Fashion-MNIST directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes = FFCV threads")
    p.add_argument("--max-items", type=int, default=None, help="stop each timing after N images (default: an epoch)")
    p.add_argument("--model-steps", type=int, default=10, help="timed training steps of the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    meta = prepare_fashion_mnist(out=args.data)
    common = dict(batch_size=args.batch_size, workers=args.workers, device=device, max_items=args.max_items)
    dl = torch_loader_rate(meta=meta, **common)
    ff = ffcv_rate(data=args.data, **common)
    mr = model_rate(batch_size=args.batch_size, device=device, steps=args.model_steps)

    print(f"loader benchmark: Fashion-MNIST train ({meta['train_count']:,} x 28x28 uint8), batch {args.batch_size}, "
          f"{args.workers} workers, pad-4 crop + flip, normalised float32 on {device}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  {'FFCV (bvit.data)':<44}{ff:>12,.0f} img/s")
    print(f"  {'torch DataLoader + torchvision.transforms.v2':<44}{dl:>12,.0f} img/s")
    print(f"  {'ratio FFCV / DataLoader':<44}{ff / dl:>12.1f} x   (goal >= 10x: {'met' if ff >= 10 * dl else 'NOT met'})")
    print(f"  {'bViT default training (w128, 6 steps, bs ' + str(args.batch_size) + ')':<44}{mr:>12,.0f} img/s"
          f"   FFCV supplies {ff / mr:,.0f}x that: {'not the bottleneck' if ff > 2 * mr else 'BOTTLENECK'}")
    return {"ffcv": ff, "dataloader": dl, "ratio": ff / dl, "model": mr}


if __name__ == "__main__":
    main()
