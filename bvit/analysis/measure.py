"""Measurements (pure: no files, no plots) of what the shared block does at each step: hidden states,
attention, CKA, whole-step skip, anytime depth.

    model, cfg = load_trained("runs/.../checkpoint.pt")      # bvit.checkpoint
    loaders = make_loaders(cfg.data, img_size=cfg.model.img_size, seed=0)
    result = analyze(model, loaders.eval, cfg=cfg, device=torch.device("cpu"))
    plot_analyses({"bvit": result, "vit": vit_result}, out=Path("analysis/"))   # bvit.analysis.plots

Everything runs through the model's own forward: a bViT's `forward_features(return_states=True)`,
`forward(num_steps=k)` and `forward(skip_steps={k})`; for a timm ViT ("per layer") forward hooks record
each block's output, and step skip / truncation run the same forward over a temporarily shortened
`blocks`. Attention probabilities are recomputed from each `Attention`'s input in a forward hook
(softmax(q k^T * scale), the matrix timm's unfused path computes), so the fused kernel stays in use.

Definitions (state t is h_t, t = 0 the embedding, T the last step; shapes (B, N, D)):
  * norm: mean over images and tokens of the token's L2 norm ||h_t[i, n]||.
  * relative update: mean over images of ||h_{t+1} - h_t||_F / ||h_t||_F (tokens x features).
  * attention entropy: per head, -sum_k p log p over keys, mean over images and all queries (nats;
    uniform attention over N tokens gives log N).
  * mean attention distance: per head, patch queries over patch keys (class token excluded, the
    attention renormalised over patches), the expected Euclidean distance in patches on the grid.
  * CKA: linear CKA (Kornblith et al., 2019) between every pair of states, each token of each image a
    row (B * N rows, D features), accumulated exactly over the analysed images.
  * step skip (`step_skip`): test top-1 with the whole of step k skipped (`skip_steps={k}`), for every k.
    Without step embeddings a bViT's steps are interchangeable -- skipping any one is running T-1 steps,
    so every k gives anytime(T-1); it tells steps apart for a ViT, `step_embed='learned'` or per-step
    LoRA. (Not pruning: nothing inside a step is removed.)
  * anytime depth (`anytime`): test top-1 using the first k steps, k = 1..T, then `extra_steps` beyond T
    (a bViT only).
  * step-specific pruning (`importance`, with `prune_images`): bvit.analysis.pruning's steps x components
    matrix (one head or MLP group off at one step only) and the between-step rank correlations.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Attention

from bvit.config import TrialConfig
from bvit.engine import evaluate
from bvit.models.bvit import BViT

__all__ = ["linear_cka", "attention_entropy", "mean_attention_distance", "attention_probs", "state_statistics",
           "depth_curves", "analyze"]


def _centered_gram_cka(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> float:
    return float(xy.square().sum() / (xx.norm() * yy.norm()))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples: x (n, d1), y (n, d2); in [0, 1]."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d1) and (n, d2) with the same n, got {tuple(x.shape)}, {tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return _centered_gram_cka(x.T @ y, x.T @ x, y.T @ y)


def attention_probs(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The attention matrix `attn` computes for input x (B, N, C): (B, heads, N queries, N keys)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-head entropy (nats) of attention rows, mean over images and queries: (B, H, Nq, Nk) -> (H,)."""
    return torch.special.entr(probs.double()).sum(-1).mean(dim=(0, 2))


def _grid_distances(grid_size: Sequence[int], device: torch.device) -> torch.Tensor:
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # (P, 2), row-major like PatchEmbed
    return torch.cdist(coords, coords)  # (P, P), in patches


def mean_attention_distance(probs: torch.Tensor, *, grid_size: Sequence[int], num_prefix_tokens: int) -> torch.Tensor:
    """Per-head attention-weighted distance (in patches) between patch queries and patch keys: -> (H,)."""
    p = probs[:, :, num_prefix_tokens:, num_prefix_tokens:].double()  # (B, H, P, P)
    if p.shape[-1] != grid_size[0] * grid_size[1]:
        raise ValueError(f"{p.shape[-1]} patch tokens do not fill a {grid_size[0]}x{grid_size[1]} grid")
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return (p * _grid_distances(grid_size, p.device)).sum(-1).mean(dim=(0, 2))


def _blocks_of(model: nn.Module) -> int:
    return model.num_steps if isinstance(model, BViT) else len(model.blocks)


def _states(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[h0, h1, ..., hL]: the embedding and the state after each step (bViT) or block (ViT), each (B, N, D)."""
    if isinstance(model, BViT):
        return model.forward_features(x, return_states=True)[1]
    states: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: states.append(out)) for m in (model.norm_pre, *model.blocks)]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return states


Batches = Iterable | Callable[[], Iterable]


class _Limited:
    """Re-iterable view of the first `limit` images of `source`: a re-iterable of (images, labels) such as a
    torch DataLoader, or a callable returning one pass (e.g. `bvit.data.loaders.Loaders.eval`)."""

    def __init__(self, source: Batches, limit: int | None, device: torch.device) -> None:
        self.source, self.limit, self.device = source, limit, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for images, labels in self.source() if callable(self.source) else self.source:
            if self.limit is not None:
                if seen >= self.limit:
                    continue  # drain: an FFCV pass abandoned midway leaves its reader thread spinning
                images, labels = images[: self.limit - seen], labels[: self.limit - seen]
            seen += labels.shape[0]
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


@torch.no_grad()
def state_statistics(model: nn.Module, loader: Batches, *, max_images: int | None = 512,
                     device: torch.device | None = None) -> dict[str, Any]:
    """Norms, relative updates, per-head attention entropy / distance and the CKA matrix over `loader`."""
    device = device or next(model.parameters()).device
    model.eval()
    grid = tuple(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_attention(attn: Attention, args: tuple, _out: torch.Tensor) -> None:
        p = attention_probs(attn, args[0])
        calls.append((attention_entropy(p), mean_attention_distance(p, grid_size=grid, num_prefix_tokens=prefix)))

    hooks = [m.register_forward_hook(on_attention) for m in model.modules() if isinstance(m, Attention)]
    totals: dict[Any, torch.Tensor] = {}

    def add(key: Any, value: torch.Tensor) -> None:
        totals[key] = totals[key] + value if key in totals else value

    images = tokens = 0
    try:
        for x, _ in _Limited(loader, max_images, device):
            calls.clear()
            states = _states(model, x)
            b, n, _ = states[0].shape
            flat = [s.reshape(b * n, -1).double() for s in states]  # (B * N, D) per state
            add("norm", torch.stack([f.norm(dim=-1).sum() for f in flat]))  # (L + 1,)
            add("rel", torch.stack([((h1 - h0).flatten(1).norm(dim=1) / h0.flatten(1).norm(dim=1)).double().sum()
                                    for h0, h1 in zip(states, states[1:], strict=False)]))  # (L,)
            add("entropy", torch.stack([e for e, _ in calls]) * b)  # (L, H)
            add("distance", torch.stack([d for _, d in calls]) * b)  # (L, H)
            for i, f in enumerate(flat):
                add(("sum", i), f.sum(0))  # (D,)
                for j in range(i, len(flat)):
                    add((i, j), f.T @ flat[j])  # (D, D)
            images += b
            tokens += b * n
    finally:
        for h in hooks:
            h.remove()
    if images == 0:
        raise ValueError("the loader yielded no images to analyse")

    def centered(i: int, j: int) -> torch.Tensor:
        return totals[(i, j)] - torch.outer(totals[("sum", i)], totals[("sum", j)]) / tokens  # (D, D)

    size = len(states)
    cka = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i, size):
            cka[i][j] = cka[j][i] = _centered_gram_cka(centered(i, j), centered(i, i), centered(j, j))
    return {
        "images": images,
        "norm": (totals["norm"] / tokens).tolist(),
        "relative_update": (totals["rel"] / images).tolist(),
        "attention_entropy": (totals["entropy"] / images).tolist(),
        "attention_distance": (totals["distance"] / images).tolist(),
        "max_entropy": math.log(tokens // images),
        "cka": cka,
    }


@contextmanager
def _vit_blocks(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run a timm ViT with only the blocks `keep` (in order) for the duration of the context."""
    saved = model.blocks
    model.blocks = nn.Sequential(*[saved[i] for i in keep])
    try:
        yield
    finally:
        model.blocks = saved


def depth_curves(model: nn.Module, loader: Batches, *, cfg: TrialConfig, device: torch.device,
                 max_images: int | None = None, extra_steps: int = 3) -> dict[str, Any]:
    """Test metrics of the full model, with each single whole step skipped, and with only the first k steps.

    A ViT is evaluated with block k removed / truncated to k blocks (no extrapolation past its depth).
    """
    data = _Limited(loader, max_images, device)
    depth = _blocks_of(model)
    is_bvit = isinstance(model, BViT)

    def run(**kwargs: Any) -> dict[str, float]:
        if is_bvit:
            return evaluate(model, data, cfg=cfg, device=device, **kwargs)
        keep = [i for i in range(kwargs.get("num_steps", depth)) if i not in kwargs.get("skip_steps", ())]
        with _vit_blocks(model, keep):
            return evaluate(model, data, cfg=cfg, device=device)

    full = run()
    step_skip = [{"skipped": k, **run(skip_steps=(k,))} for k in range(depth)]
    for row in step_skip:
        row["drop"] = full["test_top1"] - row["test_top1"]
    last = depth + (extra_steps if is_bvit else 0)
    anytime = [{"steps": k, "extrapolated": k > depth, **run(num_steps=k)} for k in range(1, last + 1)]
    return {"full": full, "step_skip": step_skip, "anytime": anytime}


def analyze(model: nn.Module, loader: Batches, *, cfg: TrialConfig, device: torch.device,
            max_images: int | None = None, stats_images: int = 512, extra_steps: int = 3,
            prune_images: int | None = None, mlp_groups: int | None = None) -> dict[str, Any]:
    """Every per-step measurement of one trained model, as a JSON-ready dict (see the module docstring).

    `loader`: the test set, re-iterable (a DataLoader) or a callable giving one pass (`Loaders.eval`); `max_images` limits the accuracy curves,
    `stats_images` the state / attention / CKA statistics. `prune_images` (None: skipped): step-specific
    pruning (`bvit.analysis.pruning.component_importance`, `mlp_groups` MLP groups) on that many images, as
    `importance`.
    """
    model.to(device).eval()
    m = cfg.model
    out = {
        "arch": m.arch, "width": m.width, "steps": _blocks_of(model), "heads": m.heads, "trial_id": cfg.trial_id(),
        **state_statistics(model, loader, max_images=stats_images, device=device),
        **depth_curves(model, loader, cfg=cfg, device=device, max_images=max_images, extra_steps=extra_steps),
    }
    if prune_images:
        from bvit.analysis.pruning import component_importance

        out["importance"] = component_importance(model, _Limited(loader, None, device), mlp_groups=mlp_groups,
                                                 max_images=prune_images, device=device)
    return out
