"""Every arm of every comparison from one `ModelConfig`, and how big it is.

    model = build_from_config(cfg.model)          # the registry entry of cfg.model.arch (bvit.archs), via timm
    model = build_model(arch="vit", width=64, steps=4, heads=2)   # the same, from ModelConfig fields
    count_params(model), count_flops(model, img_size=28, in_chans=1)

`build_from_config` is the one place a `ModelConfig` becomes a model: `timm.create_model` of the arch's
registered model with the arguments its entry derives from the config. `vit` (a timm `VisionTransformer` of
depth `steps`), `bvit` and `rbvit` of the same width, heads, MLP ratio and patching run the same number of
block applications, so their FLOPs per image agree (rbvit adds its low-rank deltas).
"""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn

import bvit.models.bvit  # noqa: F401  (registers bvit_* with timm)
import bvit.models.rbvit  # noqa: F401  (registers rbvit_* with timm)
from bvit.archs import get_arch
from bvit.config import ModelConfig

__all__ = ["build_model", "build_from_config", "count_params", "count_flops"]


def build_from_config(m: ModelConfig) -> nn.Module:
    """The (untrained) model a `ModelConfig` describes: the one place a config becomes constructor arguments."""
    arch = get_arch(m.arch)
    return timm.create_model(arch.model, **arch.kwargs(m))


def build_model(**fields: Any) -> nn.Module:
    """`build_from_config(ModelConfig(**fields))`: e.g. `build_model(arch="vit", width=64, steps=4, heads=2)`;
    fields left out take `ModelConfig`'s defaults (28x28 grey images, patch 4, 10 classes)."""
    return build_from_config(ModelConfig(**fields))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int, in_chans: int) -> int:
    """FLOPs of one forward pass of one image, measured by `torch.utils.flop_counter.FlopCounterMode`.

    Attention runs unfused while counting (timm's `fused_attn` off), so its two matmuls are counted
    explicitly; the fused kernel on CPU is not visible to the counter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attn]
    was_training = model.training
    p = next(model.parameters())
    try:
        for m in attn:
            m.fused_attn = False
        model.eval()
        x = torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        for m, s in zip(attn, saved, strict=True):
            m.fused_attn = s
        model.train(was_training)

