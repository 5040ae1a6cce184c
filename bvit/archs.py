"""The architectures a `ModelConfig` can name: one registry entry each, and nothing else knows them.

    arch = get_arch(cfg.model.arch)          # unknown names raise, listing the registered ones
    arch.model, arch.kwargs(cfg.model)       # the timm model and its arguments (bvit.models.build_from_config)
    arch.counts(cfg.model)                   # (parameters, forward FLOPs per image), in closed form
    arch.baseline, arch.options              # the arm it is compared with; the config fields only it reads

An entry is data and arithmetic only (no torch), so `bvit.config` validates `model.arch` against it and the
planner counts a 10,000-trial grid without building a model. Every entry's closed forms are tested equal to
`count_params` / `count_flops` of the model `build_from_config` builds (tests/test_registry.py).

  * `vit`   -- a standard timm `VisionTransformer`, `steps` distinct blocks: the baseline.
  * `bvit`  -- one block applied `steps` times (bvit/models/bvit.py): 1/T of the ViT's block parameters,
               the same FLOPs per image.
  * `rbvit` -- relaxed recursion (Bae et al., "Relaxed Recursive Transformers", arXiv 2410.20672): a bViT
               whose shared block gets a per-step low-rank delta of rank `relax_rank` on its four Linears,
               trained with it (bvit/models/rbvit.py). `relax_rank=0` is bViT; each rank adds
               `steps * (8 * width + 2 * mlp_hidden)` parameters, a dial from bViT towards ViT.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ModelConfig = Any  # a bvit.config.ModelConfig (which imports this module: named here, not imported)

__all__ = ["ARCHS", "ARCH_OPTIONS", "Arch", "RELAXED_LINEARS", "get_arch"]

RELAXED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # what rbvit's per-step deltas adapt


@dataclass(frozen=True, kw_only=True)
class Arch:
    """One architecture: how a `ModelConfig` becomes it, how big it is, and what it is compared with."""

    name: str  # the value of `model.arch`
    label: str  # for tables and plots
    model: str  # the timm model `build_from_config` creates (its kwargs override the variant's)
    kwargs: Callable[[ModelConfig], dict[str, Any]]  # constructor arguments of a config
    counts: Callable[[ModelConfig], tuple[int, int]]  # (parameters, forward FLOPs of one image), closed form
    baseline: str | None  # the arch it is compared with at equal width and steps; None: it is a baseline
    shares: str  # what it shares with the baseline (for documentation and tables)
    options: frozenset[str] = frozenset()  # ModelConfig fields only some archs read, that this one reads


def _common(m: ModelConfig) -> dict[str, Any]:
    return dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=m.num_classes,
                global_pool=m.global_pool, class_token=m.global_pool == "token", embed_dim=m.width,
                num_heads=m.heads, mlp_ratio=m.mlp_ratio, drop_path_rate=m.drop_path)


def _sizes(m: ModelConfig) -> dict[str, int]:
    """The numbers every count is made of: width d, MLP hidden h, patches, tokens (with the class token)."""
    d, h = m.width, int(m.width * m.mlp_ratio)
    patches = (m.img_size // m.patch_size) ** 2
    cls = int(m.global_pool == "token")
    return dict(d=d, h=h, patches=patches, cls=cls, tokens=patches + cls)


def _vit_counts(m: ModelConfig, *, blocks: int) -> tuple[int, int]:
    """A timm ViT with `blocks` distinct blocks, run for `m.steps` block applications."""
    s = _sizes(m)
    d, h, tokens = s["d"], s["h"], s["tokens"]
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)  # 2 norms, qkv, proj, mlp
    embed = (m.in_chans * m.patch_size ** 2 * d + d) + s["cls"] * d + tokens * d  # patch conv, cls, pos
    params = embed + blocks * block + 2 * d + (d * m.num_classes + m.num_classes)  # final norm, head
    # Matmuls only (2 FLOPs per multiply-add), as torch's FlopCounterMode counts them.
    block_flops = 2 * tokens * d * (3 * d + d + 2 * h) + 2 * 2 * tokens * tokens * d  # linears + QK^T and AV
    flops = 2 * s["patches"] * d * m.in_chans * m.patch_size ** 2 + m.steps * block_flops + 2 * d * m.num_classes
    return params, flops


def _bvit_counts(m: ModelConfig) -> tuple[int, int]:
    params, flops = _vit_counts(m, blocks=1)
    return params + (m.steps * m.width if m.step_embed == "learned" else 0), flops


def _rbvit_counts(m: ModelConfig) -> tuple[int, int]:
    """bViT + per step, on each relaxed Linear (in -> out), a rank-r delta B A: r * (in + out) parameters,
    2 * tokens * r * (in + out) FLOPs (x A^T, then B)."""
    params, flops = _bvit_counts(m)
    s = _sizes(m)
    d, h = s["d"], s["h"]
    in_out = (d + 3 * d) + (d + d) + (d + h) + (h + d)  # qkv, proj, fc1, fc2 (RELAXED_LINEARS)
    return params + m.steps * m.relax_rank * in_out, flops + m.steps * 2 * s["tokens"] * m.relax_rank * in_out


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch(name="vit", label="ViT", model="vit_base_patch16_224",
         kwargs=lambda m: dict(_common(m), depth=m.steps),
         counts=lambda m: _vit_counts(m, blocks=m.steps), baseline=None,
         shares="the baseline: `steps` distinct blocks"),
    Arch(name="bvit", label="bViT", model="bvit_base_patch16_224",
         kwargs=lambda m: dict(_common(m), num_steps=m.steps, step_embed=m.step_embed),
         counts=_bvit_counts, baseline="vit", options=frozenset({"step_embed"}),
         shares="everything but the blocks, and the FLOPs per image: one block applied `steps` times"),
    Arch(name="rbvit", label="rbViT", model="rbvit_base_patch16_224",
         kwargs=lambda m: dict(_common(m), num_steps=m.steps, step_embed=m.step_embed, relax_rank=m.relax_rank),
         counts=_rbvit_counts, baseline="vit", options=frozenset({"step_embed", "relax_rank"}),
         shares="everything but the blocks: one block applied `steps` times, plus a rank-`relax_rank` delta per "
                "step on its qkv, proj, fc1 and fc2"),
)}

ARCH_OPTIONS: frozenset[str] = frozenset().union(*(a.options for a in ARCHS.values()))
"""ModelConfig fields that not every arch reads: an arch that does not read one needs it at its default."""


def get_arch(name: str) -> Arch:
    """The registry entry of `name`; a ValueError listing the registered names if there is none."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; registered: {', '.join(sorted(ARCHS))}") from None
