"""Train one trial: a pure function of one validated `TrialConfig` (no Ray, no MLflow).

    metrics = train(cfg, report=print, checkpoint_dir="ckpt/")

Both arms (bvit, vit) go through `bvit.model.build_model` under the same recipe: timm's AdamW and
cosine schedule (per-step, with linear warm-up), label smoothing, gradient clipping, optional bf16
autocast and torch.compile. After each epoch `report(metrics)` is called -- after the epoch's checkpoint
is written atomically, so a caller may persist it. A `checkpoint_dir` that already holds a checkpoint
resumes from it exactly (model, optimizer, schedule, RNG states); data order and augmentation are a
function of (seed, epoch), so a resumed run retraces the uninterrupted one.

Under `torch.distributed` (one process per rank) the model is wrapped in DDP, each rank reads its
shard, train loss is all-reduced, every rank evaluates the full test set, and only rank 0 writes
checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from bvit.checkpoint import CheckpointError, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from bvit.config import CHECKPOINT_NAME, TrialConfig
from bvit.data import load_metadata, make_loaders
from bvit.model import build_model, count_flops, count_params

__all__ = ["train", "TrainingError", "build_optimizer", "train_step", "evaluate", "CHECKPOINT_NAME"]

Report = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """A trial cannot go on (diverged loss, incompatible checkpoint, data/config mismatch)."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_optimizer(model: nn.Module, cfg: TrialConfig, steps_per_epoch: int):
    """timm AdamW (no weight decay on norms, biases, embeddings) + per-step cosine with warm-up."""
    o = cfg.optim
    optimizer = create_optimizer_v2(model, opt="adamw", lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    total = o.epochs * steps_per_epoch
    warmup = round(o.warmup_epochs * steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=o.min_lr, warmup_t=warmup,
        warmup_lr_init=o.min_lr, warmup_prefix=True, t_in_epochs=False,
    )
    return optimizer, scheduler


def _autocast(cfg: TrialConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # target: (B,) int64 class indices, or (B, K) soft targets (mixup)
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def train_step(
        model: nn.Module,
        images: torch.Tensor,
        target: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        cfg: TrialConfig,
        device: torch.device,
) -> torch.Tensor:
    """One optimizer step; returns the (detached) loss. Gradients are averaged across DDP ranks."""
    with _autocast(cfg, device):
        logits = model(images)  # (B, C, H, W) -> (B, K)
    loss = _loss(logits, target, cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, cfg: TrialConfig, device: torch.device, **forward_kwargs) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over every batch of `loader`."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    for images, labels in loader:
        with _autocast(cfg, device):
            logits = model(images, **forward_kwargs).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        raise TrainingError("the evaluation loader yielded no images")
    return {"test_top1": 100.0 * correct1 / n, "test_top5": 100.0 * correct5 / n, "test_loss": loss_sum / n}


def load_checkpoint(checkpoint_dir: Path | str) -> dict[str, Any] | None:
    """The checkpoint in `checkpoint_dir` (read as data only), or None when there is none."""
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


def _check_resumable(ckpt: dict[str, Any], cfg: TrialConfig, path: Path) -> None:
    # Anything but the data location and loader threads changes the computation.
    ignore = ("data.path", "data.num_workers")
    saved = {k: v for k, v in TrialConfig.model_validate(ckpt["config"]).flat().items() if k not in ignore}
    now = {k: v for k, v in cfg.flat().items() if k not in ignore}
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
        raise TrainingError(f"{path}: checkpoint was written by a different config (differs in {', '.join(diff)}); "
                            "use another checkpoint_dir or delete it")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def train(
        cfg: TrialConfig,
        *,
        report: Report | None = None,
        checkpoint_dir: Path | str | None = None,
        progress: bool = False,
        trial_id: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; returns the final metrics plus `best_test_top1` and `history`.

    `trial_id` (default `cfg.trial_id()`) is stored in each checkpoint and returned: a sweep passes the id
    of the config as written in its spec, before paths were resolved.

    A trial with a `finetune` section fine-tunes its pretrained checkpoint instead (`bvit.finetune`,
    one process, no checkpoint written).
    """
    rank, world = _dist_info()
    if cfg.finetune is not None:
        if world > 1:
            raise TrainingError("fine-tuning trials run in one process; set resources.workers: 1")
        from bvit.finetune import finetune_trial  # bvit.finetune builds on this module
        result = finetune_trial(cfg, report=report)
        return {**result, "trial_id": trial_id or result["trial_id"]}
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _seed_everything(cfg.seed)

    meta = load_metadata(cfg.data.path)
    c, h, w = meta["image_shape"]
    m = cfg.model
    if m.in_chans != c or m.num_classes != meta["num_classes"]:
        raise TrainingError(
            f"{cfg.data.path}: data has {c} channel(s) and {meta['num_classes']} classes but the model asks for "
            f"model.in_chans={m.in_chans}, model.num_classes={m.num_classes}")

    model = build_model(
        arch=m.arch, width=m.width, steps=m.steps, heads=m.heads, patch_size=m.patch_size, img_size=m.img_size,
        in_chans=m.in_chans, num_classes=m.num_classes, mlp_ratio=m.mlp_ratio, global_pool=m.global_pool,
        step_embed=m.step_embed, drop_path_rate=m.drop_path,
    )
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    n_params = count_params(model)
    flops = count_flops(model, m.img_size, m.in_chans)
    model.to(device)

    loaders = make_loaders(cfg.data, img_size=m.img_size, seed=cfg.seed, device=device, distributed=world > 1)
    steps_per_epoch = loaders.steps_per_epoch
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch)

    start_epoch, history, best = 1, [], -math.inf
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], device)
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        best = max((r["test_top1"] for r in history), default=-math.inf)

    ddp_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    last_eval: dict[str, float] = history[-1] if history else {}

    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        run_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_seen = 0
        batches = loaders.train(epoch)
        if progress and rank == 0:
            from tqdm import tqdm
            batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.optim.epochs}", leave=False)
        num_updates = (epoch - 1) * steps_per_epoch
        for step, (images, target) in enumerate(batches, start=1):
            loss = train_step(run_model, images, target, optimizer, cfg=cfg, device=device)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step} "
                                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower optim.lr or enable optim.grad_clip")
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            loss_sum += loss.double() * images.shape[0]
            n_seen += images.shape[0]
        train_seconds = time.perf_counter() - t0
        totals = torch.tensor([loss_sum.item(), float(n_seen)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        if epoch % cfg.eval_every == 0 or epoch == cfg.optim.epochs:
            last_eval = evaluate(model, loaders.eval(), cfg=cfg, device=device)
        best = max(best, last_eval.get("test_top1", -math.inf))
        record = {
            "epoch": epoch,
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            **{k: last_eval[k] for k in ("test_top1", "test_top5", "test_loss") if k in last_eval},
            **({"best_test_top1": best} if math.isfinite(best) else {}),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": totals[1].item() / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
            "params": n_params,
            "flops_per_image": flops,
        }
        history.append(record)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(device), "epoch": epoch,
                "history": history, "config": cfg.model_dump(mode="json"), "trial_id": trial_id or cfg.trial_id(),
            })
        if world > 1:
            dist.barrier()
        if report is not None:
            report(dict(record))

    final = dict(history[-1]) if history else {}
    final.update(best_test_top1=best if math.isfinite(best) else None, history=history, trial_id=trial_id or cfg.trial_id())
    return final


def history_json(result: dict[str, Any]) -> str:
    """The result as one line of JSON (what `bvit-sweep train --json` prints last)."""
    return json.dumps(result, separators=(",", ":"), default=float)
