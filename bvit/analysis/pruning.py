"""Step-specific pruning: which parts of the shared block matter at which step.

    result = component_importance(model, batches, mlp_groups=4)
    result["loss_increase"]        # (steps, components): held-out loss with component c off at step t only
    result["rank_correlation"]     # (steps, steps): Spearman correlation of the steps' importance vectors

For each step t and each component c of the block -- each attention head, and the MLP's hidden units in
`mlp_groups` equal groups -- c is disabled at step t only and the held-out top-1 and cross-entropy are
measured. A head is disabled by zeroing its slice of the attention output before the output projection
(`attn.proj`'s input); an MLP group by zeroing its hidden units before `mlp.fc2`. On a bViT the shared
block is hooked and a step counter gates the mask, so "head h at step t" is exactly that application of
the block; on a timm ViT "step" t is layer t (the reference: distinct layers may do distinct work).

The summary is how much the ranking of components changes between steps: the Spearman correlation of
two steps' importance vectors (loss increase over components). 1.0 everywhere means the block does the
same work at every step; lower values mean step-dependent behaviour ("implicit depth multiplexing").
This differs from skipping a whole step (`forward(skip_steps=...)`, `measure.depth_curves` "step_skip"), which on a bViT without step
embeddings is the same as running one step fewer (anytime depth), and so cannot tell steps apart.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["component_importance", "component_labels", "disabled"]


def _block_units(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules applied once per step: ([shared block], True) for a bViT, (layers, False) for a ViT."""
    if hasattr(model, "block") and hasattr(model, "num_steps"):
        return [model.block], True
    if hasattr(model, "blocks"):
        return list(model.blocks), False
    raise TypeError(f"{type(model).__name__} has neither a shared `block` (bViT) nor `blocks` (timm ViT)")


def _named(unit: nn.Module, suffix: str) -> list[nn.Module]:
    # `attn.proj` / `mlp.fc2` of a block, of every block in a merged per-step `StepBlocks`, or a LoRA wrapper.
    return [m for name, m in unit.named_modules() if name == suffix or name.endswith("." + suffix)
            if not name.endswith(".base")]


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """(steps, heads, MLP hidden units) of the model's block."""
    units, shared = _block_units(model)
    attn = next(m for m in units[0].modules() if hasattr(m, "num_heads") and hasattr(m, "head_dim"))
    fc2 = _named(units[0], "mlp.fc2")[0]
    hidden = fc2.base.in_features if hasattr(fc2, "base") else fc2.in_features
    return (model.num_steps if shared else len(units)), attn.num_heads, hidden


def component_labels(model: nn.Module, *, mlp_groups: int) -> list[str]:
    """`head 0` ... `head H-1`, `mlp 0` ... `mlp G-1`: the columns of the importance matrix."""
    _, heads, _ = _shape(model)
    return [f"head {h}" for h in range(heads)] + [f"mlp {g}" for g in range(mlp_groups)]


@contextmanager
def disabled(model: nn.Module, *, step: int, component: int, mlp_groups: int) -> Iterator[None]:
    """Within the context, component `component` (heads first, then MLP groups) is off at `step` only."""
    steps, heads, hidden = _shape(model)
    if not 0 <= step < steps:
        raise ValueError(f"step must lie in [0, {steps}), got {step}")
    if not 0 <= component < heads + mlp_groups:
        raise ValueError(f"component must lie in [0, {heads + mlp_groups}), got {component}")
    if hidden % mlp_groups:
        raise ValueError(f"{hidden} MLP hidden units do not split into {mlp_groups} equal groups")
    units, shared = _block_units(model)
    unit = units[0] if shared else units[step]
    if component < heads:
        targets, width = _named(unit, "attn.proj"), None
        lo = None
    else:
        targets = _named(unit, "mlp.fc2")
        width = hidden // mlp_groups
        lo = (component - heads) * width
    counter = {"step": -1}

    def count(_m: nn.Module, _args: tuple) -> None:
        counter["step"] += 1

    def mask(_m: nn.Module, args: tuple) -> tuple:
        if shared and counter["step"] != step:
            return args
        x = args[0].clone()  # (B, N, C) heads concatenated, or (B, N, hidden)
        if lo is None:
            head_dim = x.shape[-1] // heads
            x[..., component * head_dim:(component + 1) * head_dim] = 0
        else:
            x[..., lo:lo + width] = 0
        return (x, *args[1:])

    hooks = [m.register_forward_pre_hook(mask) for m in targets]
    if shared:
        hooks.append(model.register_forward_pre_hook(lambda _m, _a: counter.update(step=-1)))
        hooks.append(unit.register_forward_pre_hook(count))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def _score(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    correct, loss, n = 0, 0.0, 0
    for x, y in batches:
        logits = model(x).float()  # (B, K)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.shape[0]
    return 100.0 * correct / n, loss / n


def _spearman(matrix: torch.Tensor) -> list[list[float | None]]:
    from scipy.stats import spearmanr

    rows = matrix.tolist()
    out: list[list[float | None]] = []
    for a in rows:
        line = []
        for b in rows:
            r = spearmanr(a, b).statistic if len(set(a)) > 1 and len(set(b)) > 1 else float("nan")
            line.append(None if r != r else float(r))
        out.append(line)
    return out


@torch.no_grad()
def component_importance(
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        mlp_groups: int | None = None,
        max_images: int | None = 2000,
        device: torch.device | None = None,
) -> dict[str, Any]:
    """The steps x components importance matrix of `model` (a bViT or timm ViT) on held-out `batches`.

    `mlp_groups`: equal groups of MLP hidden units (default: as many as heads). Returns the baseline
    top-1 (%) and loss, `top1_drop` and `loss_increase` as (steps, components) lists, the component
    labels, the between-step Spearman matrix and its mean off-diagonal value (None when undefined).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    data, seen = [], 0
    for x, y in batches:
        if max_images is not None:
            if seen >= max_images:
                continue  # drain: an FFCV pass abandoned midway leaves its reader thread spinning
            x, y = x[: max_images - seen], y[: max_images - seen]
        data.append((x.to(device), y.to(device)))
        seen += y.shape[0]
    if not data:
        raise ValueError("no held-out images to measure component importance on")
    steps, heads, _ = _shape(model)
    groups = heads if mlp_groups is None else mlp_groups
    labels = component_labels(model, mlp_groups=groups)
    base_top1, base_loss = _score(model, data)
    drop = torch.zeros(steps, len(labels), dtype=torch.float64)
    increase = torch.zeros_like(drop)
    try:
        for t in range(steps):
            for c in range(len(labels)):
                with disabled(model, step=t, component=c, mlp_groups=groups):
                    top1, loss = _score(model, data)
                drop[t, c], increase[t, c] = base_top1 - top1, loss - base_loss
    finally:
        model.train(was_training)
    rho = _spearman(increase)
    off = [rho[i][j] for i in range(steps) for j in range(steps) if i != j and rho[i][j] is not None]
    return {
        "images": seen, "steps": steps, "components": labels, "mlp_groups": groups,
        "baseline": {"test_top1": base_top1, "test_loss": base_loss},
        "top1_drop": drop.tolist(), "loss_increase": increase.tolist(),
        "rank_correlation": rho, "mean_rank_correlation": sum(off) / len(off) if off else None,
    }
