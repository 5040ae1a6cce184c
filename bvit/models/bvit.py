""" bViT: a Vision Transformer whose depth is one shared block applied T times.

Paper: "bViT" (arXiv 2605.10661, 2026) -- a 12-step bViT-B matches ViT-B on ImageNet-1K under the
same recipe and FLOPs with ~1/10 of the parameters (8.6 M vs 86.6 M).

Attribute names follow timm's `VisionTransformer` (`patch_embed`, `cls_token`, `pos_embed`, `norm`,
`fc_norm`, `head`), with the single recurrent block stored as `block`, so a bViT's weights map one to
one onto a weight-tied ViT whose `blocks.{i}` are all the same `block`.

Beyond the paper, off by default:
  * `step_embed='learned'`: a per-step vector added to the hidden state before each application
    ("does the block need to know which step it is at?"). Steps past the trained T reuse the last one.
  * per-step activation checkpointing (`set_grad_checkpointing()`, timm's convention).

`bvit.models.factory.build_model(arch=...)` builds both arms of every comparison from one set of
hyper-parameters.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import LayerNorm, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._manipulate import named_apply
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import Block, init_weights_vit_timm

__all__ = ["BViT"]


class BViT(nn.Module):
    """Recurrent-depth ViT: patch embed -> [cls] + pos embed -> one `Block` x num_steps -> norm -> head."""

    def __init__(
            self,
            *,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Literal["token", "avg"] = "token",
            embed_dim: int = 768,
            num_steps: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            class_token: bool = True,
            step_embed: Literal["none", "learned"] = "none",
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if step_embed not in ("none", "learned"):
            raise ValueError(f"step_embed must be 'none' or 'learned', got {step_embed!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_steps = num_steps
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * .02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.norm_pre = nn.Identity()
        # One drop-path rate for the one block (a ViT spreads 0..rate linearly over its depth).
        self.block = Block(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate, proj_drop=drop_rate, drop_path=drop_path_rate,
        )
        self.step_embed = nn.Parameter(torch.zeros(num_steps, 1, embed_dim)) if step_embed == "learned" else None
        use_fc_norm = global_pool == "avg"
        self.norm = LayerNorm(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(.02) linears and pos embed, tiny-normal class token."""
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "step_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each step's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.step_embed is not None:
            x = x + self.step_embed[min(t, self.num_steps - 1)]
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)

    def forward_features(
            self,
            x: torch.Tensor,
            num_steps: int | None = None,
            skip_steps: Collection[int] = (),
            return_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed, apply the shared block `num_steps` times (default: the trained T), then norm.

        `skip_steps`: step indices (0-based) whose application is skipped (step-specific pruning).
        `return_states`: also return the hidden states [h0 (embedding), h1, ..., hT], each (B, N, D),
        before the final norm; a skipped step repeats the previous state.
        """
        steps = self.num_steps if num_steps is None else num_steps
        if steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {steps}")
        skip = frozenset(skip_steps)
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, N, D)
        x = self.norm_pre(self._pos_embed(x))  # (B, N + prefix, D)
        states = [x] if return_states else None
        for t in range(steps):
            if t not in skip:
                x = self._step(x, t)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        return (x, states) if return_states else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, num_steps: int | None = None, skip_steps: Collection[int] = ()) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, num_steps=num_steps, skip_steps=skip_steps))


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


_FMNIST = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, mean=(0.2860,), std=(0.3530,))
_CIFAR = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
              mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

default_cfgs = generate_default_cfgs({
    "bvit_tiny_patch16_224.untrained": _cfg(),
    "bvit_small_patch16_224.untrained": _cfg(),
    "bvit_base_patch16_224.untrained": _cfg(),
    "bvit_large_patch16_224.untrained": _cfg(),
    "bvit_tiny_patch4_28.untrained": _cfg(**_FMNIST),
    "bvit_small_patch4_28.untrained": _cfg(**_FMNIST),
    "bvit_tiny_patch4_32.untrained": _cfg(**_CIFAR),
    "bvit_small_patch4_32.untrained": _cfg(**_CIFAR),
})


def _create_bvit(variant: str, pretrained: bool = False, **kwargs) -> BViT:
    if pretrained:
        raise RuntimeError(f"{variant}: no pretrained weights are published for bViT; use pretrained=False")
    return build_model_with_cfg(BViT, variant, pretrained, **kwargs)


@register_model
def bvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-Ti/16: one ViT-Ti block (width 192, 3 heads) applied 12 times."""
    model_args = dict(patch_size=16, embed_dim=192, num_steps=12, num_heads=3)
    return _create_bvit("bvit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_small_patch16_224(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-S/16: one ViT-S block (width 384, 6 heads) applied 12 times."""
    model_args = dict(patch_size=16, embed_dim=384, num_steps=12, num_heads=6)
    return _create_bvit("bvit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_base_patch16_224(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-B/16: one ViT-B block (width 768, 12 heads) applied 12 times -- 8.6 M parameters."""
    model_args = dict(patch_size=16, embed_dim=768, num_steps=12, num_heads=12)
    return _create_bvit("bvit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_large_patch16_224(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-L/16: one ViT-L block (width 1024, 16 heads) applied 12 times."""
    model_args = dict(patch_size=16, embed_dim=1024, num_steps=12, num_heads=16)
    return _create_bvit("bvit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_tiny_patch4_28(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-Ti/4 for 28x28 grey images (Fashion-MNIST): width 192, 3 heads, 12 steps, 49 patches."""
    model_args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, num_steps=12, num_heads=3)
    return _create_bvit("bvit_tiny_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_small_patch4_28(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-S/4 for 28x28 grey images (Fashion-MNIST): width 384, 6 heads, 12 steps."""
    model_args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=384, num_steps=12, num_heads=6)
    return _create_bvit("bvit_small_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-Ti/4 for 32x32 RGB images (CIFAR-10): width 192, 3 heads, 12 steps, 64 patches."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, num_steps=12, num_heads=3)
    return _create_bvit("bvit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def bvit_small_patch4_32(pretrained: bool = False, **kwargs) -> BViT:
    """bViT-S/4 for 32x32 RGB images (CIFAR-10): width 384, 6 heads, 12 steps."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=384, num_steps=12, num_heads=6)
    return _create_bvit("bvit_small_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))
