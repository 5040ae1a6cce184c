""" rbViT: relaxed recursion -- a bViT whose shared block gets a per-step low-rank delta, trained with it.

Paper: "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA" (Bae et al.,
arXiv 2410.20672): a recursive model's tied layers each get their own LoRA module, so the rank r is a dial
between full sharing (r = 0: bViT) and distinct layers (a ViT's T blocks). There the deltas start from an SVD of
the pretrained layers' differences; here everything trains from scratch, so each delta starts at zero (LoRA's
B = 0) and the model at initialisation computes exactly the bViT with the same base weights.

At step t the shared block's `attn.qkv`, `attn.proj`, `mlp.fc1` and `mlp.fc2` compute `W x + B_t A_t x`
(`bvit.models.lora.LoRALinear`, scale 1, base weights trainable): T * r * sum(in + out) parameters more than the
bViT (`bvit.archs`). Norms, biases and the embeddings stay shared. Anytime inference and step skipping work as
in bViT: steps past the trained T use the last step's delta (as `step_embed` does), and a skipped step's delta
is skipped with it (step t always uses delta t).
"""
# No `from __future__ import annotations` (see bvit/models/bvit.py: torch.fx + TorchScript).
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from bvit.archs import RELAXED_LINEARS
from bvit.models.bvit import _CIFAR, _FMNIST, BViT, _cfg, _create_bvit, checkpoint_filter_fn
from bvit.models.lora import LoRALinear, replace_module

__all__ = ["RBViT", "rbvit_checkpoint_filter_fn"]


class RBViT(BViT):
    """A BViT whose shared block carries, per step, a trainable rank-`relax_rank` delta on its four Linears."""

    def __init__(self, *, relax_rank: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if relax_rank < 0:
            raise ValueError(f"relax_rank must be >= 0, got {relax_rank}")
        self.relax_rank = relax_rank
        self.num_relaxed = self.num_steps if relax_rank else 0  # fixed at T: anytime inference and pruning keep them
        for name in RELAXED_LINEARS if relax_rank else ():
            base = self.block.get_submodule(name)
            delta = LoRALinear(base, rank=relax_rank, alpha=relax_rank, num_adapters=self.num_steps, freeze_base=False)
            replace_module(self.block, name, delta)

    def _apply_block(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The shared block with step `t`'s deltas (the last one past the trained T)."""
        if hasattr(self.block.attn.qkv, "step"):  # relax_rank > 0 (static under TorchScript)
            s = min(t, self.num_relaxed - 1)
            self.block.attn.qkv.step = s
            self.block.attn.proj.step = s
            self.block.mlp.fc1.step = s
            self.block.mlp.fc2.step = s
        return self.block(x)


def rbvit_checkpoint_filter_fn(
        state_dict: dict[str, Any], model: RBViT, vit_block: int | str = 0,
) -> dict[str, torch.Tensor]:
    """Weights for `model` from an rbViT, a bViT or a timm ViT (`checkpoint_filter_fn`): a bViT's or ViT's block
    becomes the base of the relaxed block, its deltas start at their initialisation (zero: that bViT exactly)."""
    state_dict = checkpoint_filter_fn(state_dict, model, vit_block=vit_block)
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        head, dot, leaf = k.rpartition(".")
        based = f"{head}.base.{leaf}"
        out[based if k not in own and based in own else k] = v
    return {**{k: v for k, v in own.items() if ".lora_" in k and k not in out}, **out}


def _create_rbvit(variant: str, pretrained: bool = False, **kwargs: Any) -> RBViT:
    return _create_bvit(variant, pretrained, model_cls=RBViT, filter_fn=rbvit_checkpoint_filter_fn, **kwargs)


_PAPER = dict(paper_ids="arXiv:2605.10661,arXiv:2410.20672")

default_cfgs = generate_default_cfgs({
    "rbvit_tiny_patch16_224.untrained": _cfg(**_PAPER),
    "rbvit_small_patch16_224.untrained": _cfg(**_PAPER),
    "rbvit_base_patch16_224.untrained": _cfg(**_PAPER),
    "rbvit_large_patch16_224.untrained": _cfg(**_PAPER),
    "rbvit_tiny_patch4_28.untrained": _cfg(**_FMNIST, **_PAPER),
    "rbvit_small_patch4_28.untrained": _cfg(**_FMNIST, **_PAPER),
    "rbvit_tiny_patch4_32.untrained": _cfg(**_CIFAR, **_PAPER),
    "rbvit_small_patch4_32.untrained": _cfg(**_CIFAR, **_PAPER),
})


@register_model
def rbvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-Ti/16: bViT-Ti/16 (width 192, 3 heads, 12 steps) with a rank-8 delta per step."""
    model_args = dict(patch_size=16, embed_dim=192, num_steps=12, num_heads=3, relax_rank=8)
    return _create_rbvit("rbvit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_small_patch16_224(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-S/16: bViT-S/16 (width 384, 6 heads, 12 steps) with a rank-8 delta per step."""
    model_args = dict(patch_size=16, embed_dim=384, num_steps=12, num_heads=6, relax_rank=8)
    return _create_rbvit("rbvit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_base_patch16_224(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-B/16: bViT-B/16 (width 768, 12 heads, 12 steps) with a rank-8 delta per step."""
    model_args = dict(patch_size=16, embed_dim=768, num_steps=12, num_heads=12, relax_rank=8)
    return _create_rbvit("rbvit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_large_patch16_224(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-L/16: bViT-L/16 (width 1024, 16 heads, 12 steps) with a rank-8 delta per step."""
    model_args = dict(patch_size=16, embed_dim=1024, num_steps=12, num_heads=16, relax_rank=8)
    return _create_rbvit("rbvit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_tiny_patch4_28(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-Ti/4 for 28x28 grey images (Fashion-MNIST): bViT-Ti/4 with a rank-8 delta per step."""
    model_args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, num_steps=12,
                      num_heads=3, relax_rank=8)
    return _create_rbvit("rbvit_tiny_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_small_patch4_28(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-S/4 for 28x28 grey images (Fashion-MNIST): bViT-S/4 with a rank-8 delta per step."""
    model_args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=384, num_steps=12,
                      num_heads=6, relax_rank=8)
    return _create_rbvit("rbvit_small_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-Ti/4 for 32x32 RGB images (CIFAR-10): bViT-Ti/4 with a rank-8 delta per step."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, num_steps=12,
                      num_heads=3, relax_rank=8)
    return _create_rbvit("rbvit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def rbvit_small_patch4_32(pretrained: bool = False, **kwargs) -> RBViT:
    """rbViT-S/4 for 32x32 RGB images (CIFAR-10): bViT-S/4 with a rank-8 delta per step."""
    model_args = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=384, num_steps=12,
                      num_heads=6, relax_rank=8)
    return _create_rbvit("rbvit_small_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))
