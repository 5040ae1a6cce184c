""" bViT: a Vision Transformer whose depth is one shared block applied T times.

Paper: "bViT" (arXiv 2605.10661, 2026) -- a 12-step bViT-B matches ViT-B on ImageNet-1K under the
same recipe and FLOPs with ~1/10 of the parameters (8.6 M vs 86.6 M).

Attribute names follow timm's `VisionTransformer` (`patch_embed`, `cls_token`, `pos_embed`, `norm`,
`fc_norm`, `head`), with the single recurrent block stored as `block`, so a bViT's weights map one to
one onto a weight-tied ViT whose `blocks.{i}` are all the same `block` (`bvit_to_vit_state_dict`).

A first-class timm model: TorchScript and torch.fx trace it; `forward_intermediates`, `feature_info` and
`features_only=True` treat each step's hidden state as a feature level; `group_matcher` serves layer-wise
LR decay; `create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))` loads a bvit-sweep
`checkpoint.pt`, a bViT state dict or a timm ViT state dict (`checkpoint_filter_fn`).

Beyond the paper, off by default:
  * `step_embed='learned'`: a per-step vector added to the hidden state before each application
    ("does the block need to know which step it is at?"). Steps past the trained T reuse the last one.
  * per-step activation checkpointing (`set_grad_checkpointing()`, timm's convention).

`bvit.models.factory.build_from_config` builds every arm of a comparison from one `ModelConfig` (bvit.archs);
`bvit.models.rbvit` relaxes the shared block per step.
"""
# No `from __future__ import annotations` here: torch.fx copies forward's annotations into the code it
# generates, and TorchScript cannot script that code when they are strings (test_timm.py, fx + script).
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import LayerNorm, PatchEmbed, get_device_dtype, global_pool_nlc, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    load_state_dict,
    named_apply,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import Block, init_weights_vit_timm
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from bvit.archs import get_arch
from bvit.serialization import read_checkpoint

__all__ = [
    "BViT", "checkpoint_filter_fn", "vit_to_bvit_state_dict",
    "bvit_to_vit_state_dict", "tied_vit_args", "export_tied_vit",
]

_logger = logging.getLogger(__name__)

_POOLS = ("token", "avg", "avgmax", "max", "")


def _eager_step_args(num_steps: Any, skip_steps: Any) -> tuple[int | None, list[int] | None]:
    """`forward`'s step arguments outside TorchScript: any collection of step indices (a set, a range);
    fx placeholders (a trace without `concrete_args`) count as not given, so fx traces the default steps."""
    if isinstance(num_steps, torch.fx.Proxy):
        num_steps = None
    if isinstance(skip_steps, torch.fx.Proxy):
        skip_steps = None
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    return num_steps, None if skip_steps is None else sorted({int(t) for t in skip_steps})


def _take_indices(num_steps: int, indices: int | list[int] | None) -> tuple[list[int], int]:
    """(absolute step indices, the largest): None takes all steps, an int n the last n, a list those steps
    (negative from the end). TorchScript-compatible, like timm's `feature_take_indices`."""
    take: list[int] = []
    if indices is None:
        take = list(range(num_steps))
    elif isinstance(indices, int):
        if indices < 1 or indices > num_steps:
            raise ValueError(f"last-n intermediates: n={indices} is out of range (1 to {num_steps} steps)")
        take = [num_steps - indices + i for i in range(indices)]
    else:
        for i in indices:
            idx = num_steps + i if i < 0 else i
            if idx < 0 or idx >= num_steps:
                raise ValueError(f"step index {i} is out of range for {num_steps} steps")
            take.append(idx)
    if len(take) == 0:
        raise ValueError(f"no intermediates to take from {num_steps} steps")
    return take, max(take)


class BViT(nn.Module):
    """Recurrent-depth ViT: patch embed -> [cls] + pos embed -> one `Block` x num_steps -> norm -> head."""

    def __init__(
            self,
            *,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Literal["token", "avg", "avgmax", "max", ""] = "token",
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
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if step_embed not in ("none", "learned"):
            raise ValueError(f"step_embed must be 'none' or 'learned', got {step_embed!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_steps = num_steps  # steps a forward runs by default (the trained T; pruning lowers it)
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim, **dd) * .02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.norm_pre = nn.Identity()
        # One drop-path rate for the one block (a ViT spreads 0..rate linearly over its depth).
        self.block = Block(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate, proj_drop=drop_rate, drop_path=drop_path_rate, **dd,
        )
        self.step_embed = nn.Parameter(torch.zeros(num_steps, 1, embed_dim, **dd)) if step_embed == "learned" else None
        self.num_step_embeds = num_steps if step_embed == "learned" else 0  # fixed at T: pruning keeps them
        use_fc_norm = global_pool in ("avg", "avgmax", "max")
        self.norm = LayerNorm(embed_dim, **dd) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # timm's feature levels: one per step, the hidden state after it (all at patch resolution).
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module="block", num_chs=embed_dim, reduction=reduction, step=t) for t in range(num_steps)]
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
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): embeddings, then the shared block (with the step
        embeddings and the final norm, as a ViT's last block takes the norm), then the head."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed|^norm_pre",
            blocks=[(r"^block\.|^step_embed", (0,)), (r"^norm\.", (99999,))],
        )

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
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, N, D)
        return self.norm_pre(self._pos_embed(x))  # (B, N + prefix, D)

    def _steps_to_run(self, num_steps: int | None, skip_steps: list[int] | None) -> tuple[int, list[int]]:
        """(steps, skipped step indices): `num_steps` defaults to `self.num_steps`, `skip_steps` to none.

        Eager calls may pass any collection of step indices; TorchScript takes a list (`_eager_step_args`).
        """
        if not torch.jit.is_scripting():
            num_steps, skip_steps = _eager_step_args(num_steps, skip_steps)
        steps = self.num_steps
        if num_steps is not None:
            steps = num_steps
        skip: list[int] = []
        if skip_steps is not None:
            skip = skip_steps
        return steps, skip

    def _step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.step_embed is not None:
            x = x + self.step_embed[min(t, self.num_step_embeds - 1)]
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._apply_block, x, t, use_reentrant=False)
        return self._apply_block(x, t)

    def _apply_block(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The shared block at step `t` (bViT's is the same at every step; a relaxed one reads `t`)."""
        return self.block(x)

    def _run_steps(
            self, x: torch.Tensor, steps: int, skip: list[int], take: list[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Steps 0..steps-1 (a skipped step leaves the state as it is); also the states after the steps in `take`."""
        states: list[torch.Tensor] = []
        for t in range(steps):
            if t not in skip:
                x = self._step(x, t)
            if t in take:
                states.append(x)
        return x, states

    def forward_features(
            self,
            x: torch.Tensor,
            num_steps: int | None = None,
            skip_steps: list[int] | None = None,
            return_states: bool = False,
    ) -> torch.Tensor:
        """Embed, apply the shared block `num_steps` times (default: the trained T), then norm.

        `skip_steps`: step indices (0-based) whose application is skipped (step-specific pruning).
        `return_states` (eager only): return (features, [h0 (embedding), h1, ..., hT]), each state (B, N, D)
        before the final norm; a skipped step repeats the previous state.
        """
        steps, skip = self._steps_to_run(num_steps, skip_steps)
        x = self._embed(x)
        no_states: list[int] = []
        if not torch.jit.is_scripting() and isinstance(return_states, bool) and return_states:
            h, states = self._run_steps(x, steps, skip, list(range(steps)))
            return self.norm(h), [x] + states
        x, _ = self._run_steps(x, steps, skip, no_states)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            num_steps: int | None = None,
            skip_steps: list[int] | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API, where intermediate i is the hidden state after step i (as timm's ViT returns
        the output of block i).

        indices: the last n steps if an int, all if None, else those steps (negative from the end).
        norm: apply the final norm to each intermediate. stop_early: stop after the last step asked for.
        output_fmt: 'NCHW' (patch tokens as a (B, D, H, W) map) or 'NLC' (B, N, D).
        return_prefix_tokens (eager only): each intermediate as (patch tokens, class token).
        num_steps, skip_steps: as in `forward_features`; indices count the steps actually run.
        Returns (final features, intermediates), or only the intermediates with `intermediates_only`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got '{output_fmt}'")
        steps, skip = self._steps_to_run(num_steps, skip_steps)
        take_indices, max_index = _take_indices(steps, indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        x, intermediates = self._run_steps(x, max_index + 1 if stop_early else steps, skip, take_indices)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Run only the steps the intermediates at `indices` need (the block is shared: nothing is deleted);
        drop the final norm and/or the head. Returns the absolute indices to take."""
        take_indices, max_index = _take_indices(self.num_steps, indices)
        self.num_steps = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)  # (B, N, D) -> (B, D); global_pool='' keeps (B, N, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(
            self, x: torch.Tensor, num_steps: int | None = None, skip_steps: list[int] | None = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, num_steps=num_steps, skip_steps=skip_steps))


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2605.10661", **kwargs,
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


# --- Checkpoints: bvit-sweep training files, bViT and timm ViT state dicts, both directions ---------------

_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _strip_wrappers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys without DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _is_training_checkpoint(obj: Any) -> bool:
    """A `checkpoint.pt` written by bvit-sweep's training: {"model": state dict, "config": TrialConfig, ...}."""
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
            and isinstance(obj["config"].get("model"), dict))


def vit_to_bvit_state_dict(
        state_dict: dict[str, torch.Tensor], *, vit_block: int | str = 0,
) -> dict[str, torch.Tensor]:
    """A bViT state dict from a timm ViT's: everything but the blocks as it is; `block.*` from the ViT's blocks.

    `vit_block` is the rule, an initialisation researchers may sweep: a block index (default 0, the first;
    negative counts from the end) or "mean", the element-wise mean of all blocks.

    One block by default, because a block's weights only work together: the order of its attention heads
    and MLP hidden units is arbitrary and differs from block to block (each was initialised on its own), so
    averaging unit i across blocks averages unrelated units into a block that is none of the trained ones
    (its weights partly cancel). Block 0 in particular: at step 1 the shared block reads the patch
    embedding that block 0 was trained to read, so the bViT's first step is exactly the ViT's first layer.
    Either way this starts fine-tuning; a bViT made from a ViT is not that ViT.
    """
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = _VIT_BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[k[m.end():]] = v
        else:
            out[k] = v
    if not blocks:
        raise ValueError("not a timm ViT state dict: it has no 'blocks.{i}.*' weights")
    depth = max(blocks) + 1
    if isinstance(vit_block, str) and vit_block.lstrip("-").isdigit():
        vit_block = int(vit_block)  # a sweep axis read from YAML or a command line
    if vit_block == "mean":
        chosen = list(range(depth))
    elif isinstance(vit_block, int) and not isinstance(vit_block, bool) and -depth <= vit_block < depth:
        chosen = [vit_block % depth]
    else:
        raise ValueError(f"vit_block must be a block index in [{-depth}, {depth}) or 'mean', got {vit_block!r}")
    missing = [i for i in range(depth) if blocks.get(i, {}).keys() != blocks[chosen[0]].keys()]
    if missing:
        raise ValueError(f"ViT blocks {missing} do not have the same weights as block {chosen[0]}")
    for name, first in blocks[chosen[0]].items():
        if len(chosen) == 1:
            out[f"block.{name}"] = first
        else:
            mean = torch.stack([blocks[i][name].float() for i in chosen]).mean(dim=0)
            out[f"block.{name}"] = mean.to(first.dtype)
    return out


def bvit_to_vit_state_dict(state_dict: dict[str, torch.Tensor], *, depth: int) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict with `depth` blocks, each the bViT's `block` (weight tied: the
    same tensors, so `torch.save` stores the block once). A ViT of that depth computes the bViT's T=depth
    forward exactly."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if "step_embed" in state_dict:
        raise ValueError("this bViT has learned step embeddings (step_embed='learned'), which a timm "
                         "VisionTransformer has no place for; only step_embed='none' exports")
    block = {k.removeprefix("block."): v for k, v in state_dict.items() if k.startswith("block.")}
    if not block:
        raise ValueError("not a bViT state dict: it has no 'block.*' weights")
    out = {k: v for k, v in state_dict.items() if not k.startswith("block.")}
    for i in range(depth):
        out.update({f"blocks.{i}.{name}": v for name, v in block.items()})
    return out


def tied_vit_args(model: BViT, *, depth: int | None = None) -> dict[str, Any]:
    """`VisionTransformer` (or `timm.create_model("vit_...")`) keyword arguments for the weight-tied ViT that
    computes `model` (default depth: its `num_steps`)."""
    if model.step_embed is not None:
        raise ValueError("a bViT with learned step embeddings has no timm VisionTransformer equivalent")
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    return dict(
        img_size=tuple(model.patch_embed.img_size), patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.in_chans, num_classes=model.num_classes, global_pool=model.global_pool,
        class_token=model.cls_token is not None, embed_dim=model.embed_dim, depth=depth or model.num_steps,
        num_heads=model.block.attn.num_heads, mlp_ratio=model.block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=model.block.attn.qkv.bias is not None,
        final_norm=has_fc_norm or not isinstance(model.norm, nn.Identity), fc_norm=has_fc_norm,
    )


def export_tied_vit(
        model: BViT, path: str | Path, *, depth: int | None = None, vit_name: str = "vit_base_patch16_224",
) -> dict[str, Any]:
    """Write `model` as a weight-tied timm ViT state dict to `path`; return the `timm.create_model` arguments
    that load it with plain timm (no code from this project):

        vit = timm.create_model(**export_tied_vit(bvit, "vit.pth"))   # identical logits at depth = num_steps
    """
    args = tied_vit_args(model, depth=depth)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bvit_to_vit_state_dict(model.state_dict(), depth=args["depth"]), path)
    overlay: dict[str, Any] = dict(
        file=str(path), num_classes=model.num_classes, input_size=(model.in_chans, *model.patch_embed.img_size))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    overlay.update({k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in cfg})
    return dict(model_name=vit_name, pretrained=True, pretrained_cfg_overlay=overlay, **args)


def checkpoint_filter_fn(
        state_dict: dict[str, Any], model: BViT, vit_block: int | str = 0,
) -> dict[str, torch.Tensor]:
    """Weights for `model` from a bvit-sweep training checkpoint, a bViT state dict or a timm ViT state dict.

    timm's own ViT filter runs first (it resamples the position and patch embeddings when the grid or
    the patch size differ, and reads the other ViT layouts timm knows); a ViT's blocks then become the
    shared block by the `vit_block` rule of `vit_to_bvit_state_dict`.
    """
    if _is_training_checkpoint(state_dict):
        state_dict = state_dict["model"]
    state_dict = vit_checkpoint_filter_fn(_strip_wrappers(state_dict), model)
    if any(_VIT_BLOCK.match(k) for k in state_dict):
        state_dict = vit_to_bvit_state_dict(state_dict, vit_block=vit_block)
    return state_dict


def _bvit_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """BViT arguments for a bvit-sweep `ModelConfig` (as saved in a checkpoint's config["model"]), as
    `build_from_config` builds it. A `vit` arm keeps its shapes; its blocks become the shared block. An rbvit
    checkpoint adds its `relax_rank` (only an rbvit_* model takes it)."""
    options = get_arch(model_cfg.get("arch", "bvit")).options
    args = dict(
        embed_dim=model_cfg["width"], num_steps=model_cfg["steps"], num_heads=model_cfg["heads"],
        mlp_ratio=model_cfg["mlp_ratio"], patch_size=model_cfg["patch_size"], img_size=model_cfg["img_size"],
        in_chans=model_cfg["in_chans"], num_classes=model_cfg["num_classes"], global_pool=model_cfg["global_pool"],
        class_token=model_cfg["global_pool"] == "token",
        step_embed=model_cfg.get("step_embed", "none") if "step_embed" in options else "none",
    )
    if model_cfg.get("relax_rank", 0) and "relax_rank" in options:
        args["relax_rank"] = model_cfg["relax_rank"]
    return args


def _read_weights(file: str | Path) -> Any:
    if str(file).endswith(".safetensors"):
        return load_state_dict(str(file))
    return read_checkpoint(file)  # data only, like timm's own loader; refuses pickled code


def _fit_to_weights(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for a model that takes the pretrained weights: a bvit-sweep checkpoint's own architecture
    (its config decides width, steps, heads, patching, classes, pooling, step embedding); for any file, the
    classes and input channels its weights have, so timm adapts the head and the first conv as it does for
    its own models."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if cfg.state_dict is not None:
        weights = cfg.state_dict
    elif cfg.file:
        weights = _read_weights(cfg.file)
    elif cfg.url or cfg.hf_hub_id:
        return kwargs  # timm fetches them
    else:
        raise RuntimeError(
            f"{variant}: no pretrained weights are published for bViT; load your own with "
            "pretrained_cfg_overlay=dict(file=...): a bvit-sweep checkpoint.pt, a bViT or a timm ViT state dict")
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if _is_training_checkpoint(weights):
        arch = _bvit_args(weights["config"]["model"])
        changed = {k: (kwargs[k], v) for k, v in arch.items() if k in kwargs and kwargs[k] != v}
        if changed:
            _logger.info(f"{variant}: the checkpoint's architecture replaces {changed} (given -> checkpoint)")
        kwargs = {**kwargs, **arch}
        overlay.setdefault("input_size", (arch["in_chans"], arch["img_size"], arch["img_size"]))
        weights = weights["model"]
    elif isinstance(weights, dict):
        weights = weights.get("state_dict", weights.get("model", weights))
    weights = _strip_wrappers(weights)
    head, patch = weights.get("head.weight"), weights.get("patch_embed.proj.weight")
    overlay.setdefault("num_classes", int(head.shape[0]) if head is not None else 0)
    if patch is not None and patch.ndim == 4:
        overlay.setdefault("input_size", (int(patch.shape[1]), *cfg.input_size[1:]))
    return {**kwargs, "pretrained_cfg_overlay": overlay}


def _create_bvit(
        variant: str, pretrained: bool = False, *, model_cls: type[BViT] = BViT, filter_fn: Any = None, **kwargs,
) -> BViT:
    """A registered variant of `model_cls` (BViT or a subclass) through timm's `build_model_with_cfg`."""
    vit_block = kwargs.pop("vit_block", 0)  # timm ViT weights: which block becomes the shared one
    if pretrained:
        kwargs = _fit_to_weights(variant, kwargs)
        if "relax_rank" in kwargs and model_cls is BViT:
            raise ValueError(f"{variant}: the checkpoint is a relaxed bViT (arch rbvit, relax_rank="
                             f"{kwargs['relax_rank']}); load it with the rbvit_* model of this name")
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("num_steps", 3)))  # features_only: the last 3 steps
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=partial(filter_fn or checkpoint_filter_fn, vit_block=vit_block),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


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
