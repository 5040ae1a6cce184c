"""Fine-tune a pretrained bViT (or ViT) on a downstream task with one of the `bvit.peft` methods.

    result = finetune(checkpoint="runs/t/checkpoint.pt", method="lora-shared", data="data/fmnist-b", rank=8)
    result["trainable_params"], result["test_top1"]

The architecture and weights come from the checkpoint; the head is replaced for the downstream classes.
Training reuses `bvit.train`'s recipe (timm AdamW over the trainable parameters only, per-step cosine
with warm-up, label smoothing, clipping) and loaders, so a fine-tuning run reads like a training run.
LoRA methods are also evaluated after merging the adapters (`merged_test_top1`), the form used for
inference.

As a sweep axis, a trial carries a `finetune` section (`bvit.config.FinetuneConfig`: checkpoint, method,
rank, alpha) next to its data and optim sections; `bvit.train.train(cfg)` then runs `finetune_trial(cfg)`
with the trial's data, optim, seed and precision.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bvit.analysis import build_from_config, load_trained
from bvit.checkpoint import read_checkpoint
from bvit.config import DataConfig, OptimConfig, TrialConfig
from bvit.data import load_metadata, make_loaders
from bvit.model import count_flops, count_params
from bvit.peft import METHODS, Method, apply_peft, lora_modules, merge_lora
from bvit.train import TrainingError, build_optimizer, evaluate, train_step

__all__ = ["finetune", "finetune_trial", "finetune_model", "load_finetuned", "FINETUNED_NAME"]

FINETUNED_NAME = "finetuned.pt"
Report = Callable[[dict[str, Any]], None]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def finetune_model(
        model: nn.Module,
        cfg: TrialConfig,
        *,
        method: Method,
        rank: int = 8,
        alpha: float = 16.0,
        report: Report | None = None,
        device: torch.device | None = None,
) -> dict[str, Any]:
    """Adapt `model` (pretrained, modified in place) by `method` and train it on `cfg.data` under `cfg.optim`.

    Returns the final metrics, `trainable_params`, `total_params`, `best_test_top1`, `history`, and for
    LoRA methods `merged_test_top1` / `merged_params` (the adapters folded into the weights).
    """
    device = device or _device()
    torch.manual_seed(cfg.seed)
    meta = load_metadata(cfg.data.path)
    c, h, w = meta["image_shape"]
    embed = model.patch_embed
    if (c, h, w) != (embed.proj.in_channels, *embed.img_size):
        raise TrainingError(f"{cfg.data.path}: images are {c}x{h}x{w} but the pretrained model reads "
                            f"{embed.proj.in_channels}x{embed.img_size[0]}x{embed.img_size[1]}; prepare the "
                            "downstream data at the pretraining resolution and channels")
    apply_peft(model, method=method, num_classes=meta["num_classes"], rank=rank, alpha=alpha)
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    flops = count_flops(model, h, c)
    model.to(device)

    loaders = make_loaders(cfg.data, img_size=h, seed=cfg.seed, device=device)
    optimizer, scheduler = build_optimizer(model, cfg, loaders.steps_per_epoch)
    history: list[dict[str, Any]] = []
    best, updates = -math.inf, 0
    for epoch in range(1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum, seen = 0.0, 0
        for images, target in loaders.train(epoch):
            loss = train_step(model, images, target, optimizer, cfg=cfg, device=device)
            if not torch.isfinite(loss):
                raise TrainingError(f"fine-tuning loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            updates += 1
            scheduler.step_update(num_updates=updates)
            loss_sum += loss.item() * images.shape[0]
            seen += images.shape[0]
        metrics = evaluate(model, loaders.eval(), cfg=cfg, device=device)
        best = max(best, metrics["test_top1"])
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), **metrics, "best_test_top1": best,
                  "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds, "images_per_s": seen / seconds,
                  "params": total, "trainable_params": trainable, "flops_per_image": flops}
        if epoch == cfg.optim.epochs and method.startswith("lora"):  # the inference form: adapters merged
            merged = merge_lora(copy.deepcopy(model))
            record["merged_test_top1"] = evaluate(merged, loaders.eval(), cfg=cfg, device=device)["test_top1"]
            record["merged_params"] = count_params(merged)
        history.append(record)
        if report is not None:
            report(dict(record))

    result = {**history[-1], "method": method, "trainable_params": trainable, "total_params": total,
              "trainable_fraction": trainable / total, "num_classes": meta["num_classes"], "history": history}
    if method.startswith("lora"):
        result["rank"], result["alpha"] = rank, alpha
    return result


def _downstream_config(pretrained: TrialConfig, *, data: str, epochs: int, lr: float, weight_decay: float,
                       batch_size: int, train_subset: int | None, seed: int) -> TrialConfig:
    optim = OptimConfig(epochs=epochs, lr=lr, min_lr=lr / 100, weight_decay=weight_decay,
                        warmup_epochs=min(1.0, epochs / 5), label_smoothing=pretrained.optim.label_smoothing,
                        grad_clip=pretrained.optim.grad_clip)
    loader = DataConfig(path=data, batch_size=batch_size, eval_batch_size=pretrained.data.eval_batch_size,
                        augment="none", train_subset=train_subset, num_workers=pretrained.data.num_workers)
    return pretrained.model_copy(update={"data": loader, "optim": optim, "seed": seed, "compile": False})


def finetune(
        *,
        checkpoint: str | Path,
        method: Method,
        data: str | Path,
        rank: int = 8,
        alpha: float = 16.0,
        epochs: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        train_subset: int | None = None,
        seed: int = 0,
        out: str | Path | None = None,
        report: Report | None = None,
        device: torch.device | None = None,
) -> dict[str, Any]:
    """Fine-tune the model in `checkpoint` on the prepared directory `data` (see `bvit.transfer`).

    No augmentation; label smoothing, clipping, precision and loader threads follow the pretraining run.
    With `out`, the adapted weights (unmerged) and the result go to `out/finetuned.pt`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    model, pretrained = load_trained(checkpoint)
    cfg = _downstream_config(pretrained, data=str(data), epochs=epochs, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size, train_subset=train_subset, seed=seed)
    result = finetune_model(model, cfg, method=method, rank=rank, alpha=alpha, report=report, device=device)
    result.update(checkpoint=str(checkpoint), data=str(data), pretrained_trial_id=pretrained.trial_id())
    if out is not None:
        path = Path(out) / FINETUNED_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        k = result["num_classes"]
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_classes": k})})
        torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "result": result,
                    "peft": {"method": method, "rank": rank, "alpha": alpha, "num_classes": k}},
                   path)
        result["saved"] = str(path)
    return result


def finetune_trial(cfg: TrialConfig, *, report: Report | None = None) -> dict[str, Any]:
    """One sweep trial: fine-tune `cfg.finetune.checkpoint` by its method on `cfg.data`, with `cfg.optim`,
    `cfg.seed` and `cfg.precision`.

    The architecture comes from the checkpoint (the trial's `model` section is not used). A fine-tuning
    trial writes no checkpoint: it is short, and a retried one starts again from the pretrained weights.
    """
    ft = cfg.finetune
    if ft is None:
        raise ValueError("finetune_trial needs the trial's `finetune` section (checkpoint, method, ...)")
    model, pretrained = load_trained(ft.checkpoint)
    run_cfg = pretrained.model_copy(update={"data": cfg.data, "optim": cfg.optim, "seed": cfg.seed,
                                            "precision": cfg.precision, "compile": False})
    result = finetune_model(model, run_cfg, method=ft.method, rank=ft.rank, alpha=ft.alpha, report=report)
    return {**result, "trial_id": cfg.trial_id(), "pretrained_trial_id": pretrained.trial_id()}


def load_finetuned(path: str | Path, *, merge: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A model saved by `finetune(out=...)` (adapters in place, or merged with `merge=True`) and its record."""
    path = Path(path)
    if path.is_dir():
        path = path / FINETUNED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint; `finetune(out=DIR)` writes DIR/{FINETUNED_NAME}")
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or "peft" not in saved:
        raise ValueError(f"{path}: not written by bvit.finetune (no 'peft' record)")
    cfg = TrialConfig.model_validate(saved["config"])
    p = saved["peft"]
    model = build_from_config(cfg.model)
    apply_peft(model, method=p["method"], num_classes=p["num_classes"], rank=p["rank"], alpha=p["alpha"])
    model.load_state_dict(saved["model"])
    if merge and lora_modules(model):
        merge_lora(model)
    return model.eval(), saved["result"]
