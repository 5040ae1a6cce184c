"""Run one trial: a pure function of one validated `TrialConfig` (no Ray, no MLflow).

    result = run_trial(cfg, report=print, checkpoint_dir="ckpt/")      # train, or fine-tune if cfg.finetune
    result = finetune(checkpoint="runs/t/checkpoint.pt", method="lora-shared", data="data/fmnist-b")

Training and fine-tuning differ only in how the model is set up; both then run `bvit.engine.fit`
under the trial's data, optim, seed and precision.

* **Training** (`cfg.finetune is None`): the model `cfg.model` describes (`bvit.models.factory`). After
  each epoch the checkpoint (model, optimizer, schedule, RNG states, history, config, trial id) is written
  atomically to `checkpoint_dir`, then `report(metrics)` is called. A `checkpoint_dir` that already holds
  a checkpoint resumes from it exactly; data order and augmentation are a function of (seed, epoch), so a
  resumed run retraces the uninterrupted one. Under `torch.distributed` the model is wrapped in DDP,
  each rank reads its shard, and only rank 0 writes checkpoints.
* **Fine-tuning** (`cfg.finetune` set): the architecture and weights come from `cfg.finetune.checkpoint`;
  `bvit.peft` replaces the head for the data's classes and picks what trains. One process; no checkpoint
  is written (a retried trial starts again from the pretrained weights). LoRA methods are also evaluated
  with the adapters merged at the last epoch (`merged_test_top1`).

Defaults have one source: the `TrialConfig` fields. `finetune(...)` (the `bvit-sweep finetune` command)
builds a `TrialConfig` from its arguments, leaving unset ones at those defaults, and runs the same code
as a `finetune:` trial of a sweep.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bvit.checkpoint import (
    load_trained,
    load_training_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bvit.config import CHECKPOINT_NAME, FINETUNED_NAME, DataConfig, FinetuneConfig, OptimConfig, TrialConfig
from bvit.data.format import DataError, load_metadata
from bvit.data.loaders import compile_seconds, make_loaders
from bvit.engine import (
    Report,
    TrainingError,
    build_optimizer,
    default_device,
    dist_info,
    evaluate,
    fit,
    seed_everything,
)
from bvit.models.factory import build_from_config, count_flops, count_params
from bvit.peft import METHODS, Method, apply_peft, merge_lora

__all__ = ["run_trial", "finetune", "finetune_config", "history_json", "TrainingError", "CHECKPOINT_NAME"]


def run_trial(
        cfg: TrialConfig,
        *,
        trial_id: str | None = None,
        report: Report | None = None,
        checkpoint_dir: Path | str | None = None,
        progress: bool = False,
        device: torch.device | None = None,
) -> dict[str, Any]:
    """Train (or, with a `finetune` section, fine-tune) one trial; returns the final metrics plus
    `best_test_top1`, `history` and `trial_id`.

    `trial_id` (default `cfg.trial_id()`) is stored in the checkpoint and returned. `device` is where the
    model and batches live: whoever knows what was reserved passes it (a sweep's trainable: the Ray Train
    worker's device, or CUDA only when the trial reserved GPUs); default `engine.default_device()`.
    """
    trial_id = cfg.trial_id() if trial_id is None else trial_id
    device = default_device() if device is None else torch.device(device)
    _set_up_device(cfg, device)
    if cfg.finetune is not None:
        if dist_info()[1] > 1:
            raise TrainingError("fine-tuning trials run in one process; set resources.workers: 1")
        return _finetune(cfg, trial_id=trial_id, report=report, progress=progress, device=device)[2]
    return _train(cfg, trial_id=trial_id, report=report, checkpoint_dir=checkpoint_dir, progress=progress,
                  device=device)


def _set_up_device(cfg: TrialConfig, device: torch.device) -> None:
    """Per-trial process state, set afresh by every trial (Ray reuses trial processes): the current CUDA
    device, TF32 matmuls for fp32 on CUDA (`matmul_precision` in each record), a fresh `torch.compile` cache."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # "high": fp32 matmuls on TF32 tensor cores (~10 bits of mantissa). "highest" (the default) elsewhere,
    # so CPU runs and a later bf16 trial in the same process compute exactly as before.
    torch.set_float32_matmul_precision("high" if device.type == "cuda" and cfg.precision == "fp32" else "highest")
    if cfg.compile:
        # Each width/steps is a new graph: a reused process would pile up recompiles until dynamo's limit
        # makes it fall back to eager with only a warning.
        torch._dynamo.reset()


def _check_resumable(ckpt: dict[str, Any], cfg: TrialConfig, path: Path) -> None:
    # Anything but the data location and loader threads changes the computation.
    ignore = ("data.path", "data.num_workers")
    saved = {k: v for k, v in TrialConfig.model_validate(ckpt["config"]).flat().items() if k not in ignore}
    now = {k: v for k, v in cfg.flat().items() if k not in ignore}
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
        raise TrainingError(f"{path}: checkpoint was written by a different config (differs in {', '.join(diff)}); "
                            "use another checkpoint_dir or delete it")


def _train(cfg: TrialConfig, *, trial_id: str, report: Report | None, checkpoint_dir: Path | str | None,
           progress: bool, device: torch.device) -> dict[str, Any]:
    rank, world = dist_info()
    seed_everything(cfg.seed)
    meta = load_metadata(cfg.data.path)
    c = meta["image_shape"][0]
    m = cfg.model
    if m.in_chans != c or m.num_classes != meta["num_classes"]:
        raise DataError(
            f"{cfg.data.path}: data has {c} channel(s) and {meta['num_classes']} classes but the model asks for "
            f"model.in_chans={m.in_chans}, model.num_classes={m.num_classes}")

    clock = _Phases()
    model = build_from_config(m)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    static = {"params": count_params(model), "flops_per_image": count_flops(model, m.img_size, m.in_chans),
              "matmul_precision": torch.get_float32_matmul_precision()}
    model.to(device)
    clock.lap("phase_model_s")
    loaders = make_loaders(cfg.data, img_size=m.img_size, seed=cfg.seed, device=device, distributed=world > 1)
    clock.lap("phase_data_s")
    optimizer, scheduler = build_optimizer(model, cfg, loaders.steps_per_epoch)

    start_epoch, history = 1, []
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = load_training_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], device)
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
    clock.lap("phase_model_s")  # optimizer and resumed state: part of setting up the model

    def save(epoch: int, history: list[dict[str, Any]]) -> None:
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(device), "epoch": epoch,
                "history": history, "config": cfg.model_dump(mode="json"), "trial_id": trial_id,
            })

    ddp_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    history, best = fit(model, loaders, optimizer, scheduler, cfg=cfg, device=device, run_model=run_model,
                        start_epoch=start_epoch, history=history, static=static, setup=clock.phases,
                        on_epoch_end=save, report=report, progress=progress)
    final = dict(history[-1]) if history else {}
    final.update(best_test_top1=best if best > -float("inf") else None, history=history, trial_id=trial_id)
    return final


def _finetune(cfg: TrialConfig, *, trial_id: str, report: Report | None, progress: bool,
              device: torch.device) -> tuple[nn.Module, TrialConfig, dict[str, Any]]:
    """(the adapted model, the pretrained model's config, the result) of fine-tuning under `cfg`."""
    ft = cfg.finetune
    clock = _Phases()
    model, pretrained = load_trained(ft.checkpoint)
    seed_everything(cfg.seed)
    meta = load_metadata(cfg.data.path)
    c, h, w = meta["image_shape"]
    embed = model.patch_embed
    if (c, h, w) != (embed.proj.in_channels, *embed.img_size):
        raise DataError(f"{cfg.data.path}: images are {c}x{h}x{w} but the pretrained model reads "
                            f"{embed.proj.in_channels}x{embed.img_size[0]}x{embed.img_size[1]}; prepare the "
                            "downstream data at the pretraining resolution and channels")
    apply_peft(model, method=ft.method, num_classes=meta["num_classes"], rank=ft.rank, alpha=ft.alpha)
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    static = {"params": total, "trainable_params": trainable, "flops_per_image": count_flops(model, h, c),
              "matmul_precision": torch.get_float32_matmul_precision()}
    model.to(device)
    clock.lap("phase_model_s")
    loaders = make_loaders(cfg.data, img_size=h, seed=cfg.seed, device=device)
    clock.lap("phase_data_s")
    optimizer, scheduler = build_optimizer(model, cfg, loaders.steps_per_epoch)
    clock.lap("phase_model_s")
    lora = ft.method.startswith("lora")

    def merged(epoch: int) -> dict[str, Any]:
        if epoch != cfg.optim.epochs or not lora:
            return {}
        inference = merge_lora(copy.deepcopy(model))  # the inference form: adapters folded into the weights
        return {"merged_test_top1": evaluate(inference, loaders.eval(), cfg=cfg, device=device)["test_top1"],
                "merged_params": count_params(inference)}

    history, _ = fit(model, loaders, optimizer, scheduler, cfg=cfg, device=device, static=static,
                     setup=clock.phases, extra_metrics=merged, report=report, progress=progress)
    result = {**history[-1], "method": ft.method, "trainable_params": trainable, "total_params": total,
              "trainable_fraction": trainable / total, "num_classes": meta["num_classes"], "history": history,
              "trial_id": trial_id, "pretrained_trial_id": pretrained.trial_id(),
              "checkpoint": str(ft.checkpoint), "data": str(cfg.data.path)}
    if lora:
        result["rank"], result["alpha"] = ft.rank, ft.alpha
    return model, pretrained, result


class _Phases:
    """One-time set-up phases of a run (seconds, summed per name); FFCV compile time is split out of the
    lap it happened in as `phase_compile_s`."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t, self._compiled = time.perf_counter(), compile_seconds()

    def lap(self, name: str) -> None:
        now, compiled = time.perf_counter(), compile_seconds()
        self._add("phase_compile_s", compiled - self._compiled)
        self._add(name, now - self._t - (compiled - self._compiled))
        self._t, self._compiled = now, compiled

    def _add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


def finetune_config(
        *,
        checkpoint: str | Path,
        method: Method,
        data: str | Path,
        rank: int | None = None,
        alpha: float | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | None = None,
        train_subset: int | None = None,
        seed: int = 0,
) -> TrialConfig:
    """The `TrialConfig` of a fine-tuning run: the given values, every other one at the config's default.

    When `epochs` is given and the default warm-up would not fit in it, warm-up is a fifth of the epochs.
    """
    def given(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v is not None}

    optim = given(epochs=epochs, lr=lr, weight_decay=weight_decay)
    default_warmup = OptimConfig.model_fields["warmup_epochs"].default
    if epochs is not None and default_warmup >= epochs:
        optim["warmup_epochs"] = epochs / 5
    if lr is not None:
        optim["min_lr"] = min(lr, OptimConfig.model_fields["min_lr"].default)
    return TrialConfig(
        finetune=FinetuneConfig(checkpoint=str(checkpoint), method=method, **given(rank=rank, alpha=alpha)),
        data=DataConfig(path=str(data), **given(batch_size=batch_size, train_subset=train_subset)),
        optim=OptimConfig(**optim), seed=seed)


def finetune(
        *,
        checkpoint: str | Path,
        method: Method,
        data: str | Path,
        out: str | Path | None = None,
        report: Report | None = None,
        device: torch.device | None = None,
        **options: Any,
) -> dict[str, Any]:
    """Fine-tune the model in `checkpoint` on the prepared directory `data` by `method`.

    `options`: `finetune_config`'s (rank, alpha, epochs, lr, weight_decay, batch_size, train_subset, seed).
    With `out`, the adapted weights (unmerged) and the result go to `out/finetuned.pt`
    (`bvit.checkpoint.load_finetuned` reads it back).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    cfg = finetune_config(checkpoint=checkpoint, method=method, data=data, **options)
    device = default_device() if device is None else torch.device(device)
    _set_up_device(cfg, device)
    model, pretrained, result = _finetune(cfg, trial_id=cfg.trial_id(), report=report, progress=False,
                                          device=device)
    if out is not None:
        path = Path(out) / FINETUNED_NAME
        ft = cfg.finetune
        model_cfg = pretrained.model.model_copy(update={"num_classes": result["num_classes"]})
        save_checkpoint(path, {
            "model": model.state_dict(), "config": cfg.model_copy(update={"model": model_cfg}).model_dump(mode="json"),
            "result": result, "trial_id": result["trial_id"],
            "peft": {"method": ft.method, "rank": ft.rank, "alpha": ft.alpha, "num_classes": result["num_classes"]}})
        result["saved"] = str(path)
    return result


def history_json(result: dict[str, Any]) -> str:
    """The result as one line of JSON (what `bvit-sweep train --json` prints last)."""
    return json.dumps(result, separators=(",", ":"), default=float)
