"""The one training loop: optimizer and schedule, one step, one epoch, evaluation, and the epochs around them.

    optimizer, scheduler = build_optimizer(model, cfg, loaders.steps_per_epoch)
    history, best = fit(model, loaders, optimizer, scheduler, cfg=cfg, device=device, report=print)

Training from scratch and fine-tuning (`bvit.trial`) both run `fit`: they differ in how the model is set
up (a fresh model or a pretrained one with `bvit.peft` applied), never in how it is trained. The recipe:
timm's AdamW (no weight decay on norms, biases, embeddings) with a per-step cosine schedule and linear
warm-up, label smoothing, gradient clipping, optional bf16 autocast. After each epoch `on_epoch_end`
(e.g. write a checkpoint) runs before `report(metrics)`, so a caller may persist what was written.

Under `torch.distributed` (one process per rank) the caller passes the DDP-wrapped model as `run_model`;
train loss is all-reduced (on the training device: NCCL reduces CUDA tensors only) and every rank evaluates
the full test set.

The host waits for the device only where it must: the loss is checked for finiteness every
`FINITE_CHECK_EVERY` steps and at the end of the epoch (one read each; a diverged run stops within that
many steps, naming the first step whose loss was not finite), evaluation sums on the device, and an
epoch's img/s is timed after the epoch's last read of the device.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from bvit.config import TrialConfig
from bvit.data.loaders import Loaders, compile_seconds

__all__ = ["FINITE_CHECK_EVERY", "TrainingError", "Report", "seed_everything", "dist_info", "default_device",
           "build_optimizer", "train_step", "train_one_epoch", "evaluate", "epoch_totals", "fit"]

Report = Callable[[dict[str, Any]], None]

FINITE_CHECK_EVERY = 20  # training steps between host reads of the loss (each read waits for the device)


class TrainingError(RuntimeError):
    """A trial cannot go on (diverged loss, a checkpoint written by another config)."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside `torch.distributed`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """This process's GPU (`LOCAL_RANK`, as torchrun sets it) when CUDA is there, else the CPU.

    For callers that know nothing of a reservation (the `train` and `finetune` commands, torchrun). A sweep
    trial does not use it: its trainable passes the device Ray reserved (`orchestrator.trainable`).
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_optimizer(model: nn.Module, cfg: TrialConfig, steps_per_epoch: int):
    """timm AdamW over the trainable parameters (no weight decay on norms, biases, embeddings) + per-step
    cosine with linear warm-up, from `cfg.optim`."""
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
    # target: (B,) int64 class indices, or (B, K) soft targets (mixup)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return loss.detach()


def train_one_epoch(
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        cfg: TrialConfig,
        device: torch.device,
        epoch: int,
        steps_per_epoch: int,
        check_every: int = FINITE_CHECK_EVERY,
) -> tuple[float, int]:
    """Train over `batches` (epoch `epoch`, 1-based); returns (sum of per-image losses, images seen) of this rank.

    The losses are read on the host every `check_every` steps and at the end (not every step: each read
    waits for the device); a non-finite one raises `TrainingError` naming its step.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_seen = 0
    num_updates = (epoch - 1) * steps_per_epoch
    window: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss) since the last check
    for step, (images, target) in enumerate(batches, start=1):
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(model, images, target, optimizer, cfg=cfg, device=device)
        window.append((step, lr, loss))
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.double() * images.shape[0]
        n_seen += images.shape[0]
        if step % check_every == 0:
            _check_finite(window, epoch, cfg.optim.grad_clip)
            window.clear()
    _check_finite(window, epoch, cfg.optim.grad_clip)
    return loss_sum.item(), n_seen


def _check_finite(window: list[tuple[int, float, torch.Tensor]], epoch: int, grad_clip: float | None) -> None:
    """Raise `TrainingError` at the first non-finite loss of `window`: one host read, two if one is found."""
    if not window:
        return
    finite = torch.isfinite(torch.stack([loss for _, _, loss in window]))  # (len(window),)
    if bool(finite.all()):
        return
    step, lr, loss = window[int((~finite).nonzero()[0, 0])]
    advice = (f"lower optim.lr (gradients were already clipped to norm {grad_clip:g})" if grad_clip is not None
              else "lower optim.lr, or set optim.grad_clip (e.g. 1.0)")
    raise TrainingError(f"the loss became non-finite ({loss.item()}) at epoch {epoch}, step {step} (lr {lr:.3g}); "
                        f"{advice}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, cfg: TrialConfig, device: torch.device, **forward_kwargs) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over every batch of `loader`."""
    was_training = model.training
    model.eval()
    # Summed on the device, read once at the end: float64 and int64 sums give the numbers per-batch reads did.
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    n = 0
    for images, labels in loader:
        with _autocast(cfg, device):
            logits = model(images, **forward_kwargs).float()  # (B, K)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        raise TrainingError("the evaluation loader yielded no images")
    loss_sum, correct1, correct5 = sums.tolist()
    return {"test_top1": 100.0 * correct1 / n, "test_top5": 100.0 * correct5 / n, "test_loss": loss_sum / n}


def epoch_totals(loss_sum: float, n_seen: int, *, device: torch.device, world: int) -> torch.Tensor:
    """(loss sum, images) of this rank as a float64 tensor on `device`, summed over ranks when `world` > 1.

    On the training device: NCCL (what Ray Train uses for GPU workers) reduces only CUDA tensors.
    """
    totals = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    return totals


def fit(
        model: nn.Module,
        loaders: Loaders,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        cfg: TrialConfig,
        device: torch.device,
        run_model: nn.Module | None = None,
        start_epoch: int = 1,
        history: list[dict[str, Any]] | None = None,
        static: dict[str, Any] | None = None,
        setup: dict[str, float] | None = None,
        extra_metrics: Callable[[int], dict[str, Any]] | None = None,
        on_epoch_end: Callable[[int, list[dict[str, Any]]], None] | None = None,
        report: Report | None = None,
        progress: bool = False,
) -> tuple[list[dict[str, Any]], float]:
    """Epochs `start_epoch..cfg.optim.epochs`: train, evaluate every `cfg.eval_every` epochs (and after the
    last), record, `on_epoch_end(epoch, history)`, `report(record)`. Returns (history, best test top-1).

    `run_model`: what trains (the DDP and/or compiled wrapper of `model`; default `model`); `model` is
    evaluated. `static`: values added to every record (parameter and FLOP counts). `setup`: the caller's
    one-time phases (`phase_*_s` seconds: model build, data open, pipeline compile), added to the first record
    of this run. `extra_metrics(epoch)`: more values for that epoch's record, computed after evaluation (e.g.
    merged-LoRA accuracy).

    Where each epoch's time went, in its record (seconds; `bvit.config.PHASES` names them): `phase_first_step_s` (first
    record of a run only: epoch start to the end of the first optimizer step, first batch included),
    `phase_train_s`, `phase_eval_s` (evaluation, FFCV compile excluded), `phase_compile_s` (FFCV pipelines
    compiled during the epoch, e.g. the eval loader's on first use), `phase_checkpoint_s` (`on_epoch_end`) and
    `phase_report_s`: the time the *previous* epoch's `report` took (a record cannot hold the time of its own
    report; the last report of a run is not counted).
    """
    rank, world = dist_info()
    run_model = model if run_model is None else run_model
    history = [] if history is None else history
    best = max((r["test_top1"] for r in history if "test_top1" in r), default=-math.inf)
    last_eval: dict[str, float] = history[-1] if history else {}
    epochs = cfg.optim.epochs
    phases, report_s = dict(setup or {}), 0.0
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        batches = loaders.train(epoch)
        if epoch == start_epoch:
            batches = _first_step_timed(batches, t0, phases)
        if progress and rank == 0:
            from tqdm import tqdm
            batches = tqdm(batches, total=loaders.steps_per_epoch, desc=f"epoch {epoch}/{epochs}", leave=False)
        loss_sum, n_seen = train_one_epoch(run_model, batches, optimizer, scheduler, cfg=cfg, device=device,
                                           epoch=epoch, steps_per_epoch=loaders.steps_per_epoch)
        train_seconds = time.perf_counter() - t0  # after the epoch's last read of the device: its work is done
        loss_total, n_total = epoch_totals(loss_sum, n_seen, device=device, world=world).tolist()
        t_eval, compiled = time.perf_counter(), compile_seconds()
        if epoch % cfg.eval_every == 0 or epoch == epochs:
            last_eval = evaluate(model, loaders.eval(), cfg=cfg, device=device)
        best = max(best, last_eval.get("test_top1", -math.inf))
        extra = extra_metrics(epoch) if extra_metrics is not None else {}
        compiled = compile_seconds() - compiled
        phases.update(phase_train_s=train_seconds, phase_eval_s=time.perf_counter() - t_eval - compiled,
                      phase_compile_s=phases.get("phase_compile_s", 0.0) + compiled, phase_report_s=report_s)
        record = {
            "epoch": epoch,
            "train_loss": loss_total / max(n_total, 1.0),
            **{k: last_eval[k] for k in ("test_top1", "test_top5", "test_loss") if k in last_eval},
            **({"best_test_top1": best} if math.isfinite(best) else {}),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": n_total / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
            **(static or {}),
            **extra,
            **phases,
        }
        phases = {}
        history.append(record)
        t_save = time.perf_counter()
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
        record["phase_checkpoint_s"] = time.perf_counter() - t_save  # the saved copy lacks only this key
        if world > 1:
            dist.barrier()
        t_report = time.perf_counter()
        if report is not None:
            report(dict(record))
        report_s = time.perf_counter() - t_report
    return history, best


def _first_step_timed(batches: Iterable, t0: float, phases: dict[str, float]) -> Iterator:
    """`batches`, noting in `phases` when the first optimizer step ended (the second batch is asked for,
    or the epoch ends)."""
    for i, batch in enumerate(batches):
        if i == 1:
            phases["phase_first_step_s"] = time.perf_counter() - t0
        yield batch
    phases.setdefault("phase_first_step_s", time.perf_counter() - t0)
