"""Both arms of every comparison from one set of hyper-parameters, and how big they are.

    model = build_from_config(cfg.model)          # a `ModelConfig` -> BViT or timm VisionTransformer
    model = build_model(arch="vit", width=64, steps=4, heads=2, img_size=28, patch_size=4, in_chans=1, num_classes=10)
    count_params(model), count_flops(model, img_size=28, in_chans=1)

`bvit`: one block applied `steps` times (`bvit.models.bvit.BViT`). `vit`: a standard timm
`VisionTransformer` of depth `steps` with otherwise identical hyper-parameters -- the same FLOPs per image.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from bvit.config import ModelConfig
from bvit.models.bvit import BViT

__all__ = ["build_model", "build_from_config", "count_params", "count_flops"]


def build_model(
        *,
        arch: Literal["bvit", "vit"] = "bvit",
        width: int = 192,
        steps: int = 12,
        heads: int = 3,
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        global_pool: Literal["token", "avg"] = "token",
        step_embed: Literal["none", "learned"] = "none",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
) -> nn.Module:
    """Both arms of a comparison from one set of hyper-parameters.

    `bvit`: one block applied `steps` times. `vit`: a timm `VisionTransformer` of depth `steps` with the
    same width, heads, MLP ratio, patching, pooling and head -- the same FLOPs per image.
    """
    common = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        global_pool=global_pool, embed_dim=width, num_heads=heads, mlp_ratio=mlp_ratio,
        class_token=global_pool == "token", drop_rate=drop_rate, drop_path_rate=drop_path_rate,
    )
    if arch == "bvit":
        return BViT(num_steps=steps, step_embed=step_embed, **common)
    if arch == "vit":
        if step_embed != "none":
            raise ValueError("step_embed applies to arch='bvit' only; a ViT's blocks are already distinct")
        return VisionTransformer(depth=steps, **common)
    raise ValueError(f"arch must be 'bvit' or 'vit', got {arch!r}")


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



def build_from_config(m: ModelConfig) -> nn.Module:
    """The (untrained) model a `ModelConfig` describes: the one place a config becomes constructor arguments."""
    return build_model(
        arch=m.arch, width=m.width, steps=m.steps, heads=m.heads, patch_size=m.patch_size, img_size=m.img_size,
        in_chans=m.in_chans, num_classes=m.num_classes, mlp_ratio=m.mlp_ratio, global_pool=m.global_pool,
        step_embed=m.step_embed, drop_path_rate=m.drop_path,
    )
