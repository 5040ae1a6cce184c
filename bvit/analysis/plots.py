"""Plots of `bvit.analysis.measure` results (matplotlib, headless): one PNG per measurement, every model side by side.

    paths = plot_analyses({"bvit": bvit_result, "vit": vit_result}, out=Path("analysis/"))
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_analyses"]


def _figure(ncols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def plot_analyses(results: dict[str, dict[str, Any]], *, out: Path) -> list[Path]:
    """states.png, attention.png, cka.png, step_skip.png, anytime.png (and importance.png when every result has
    an `importance`): every model in `results` side by side."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)

    fig, (a, b) = _figure(2)
    for label, r in results.items():
        a.plot(range(len(r["norm"])), r["norm"], marker="o", label=label)
        b.plot(range(1, len(r["relative_update"]) + 1), r["relative_update"], marker="o", label=label)
    a.set(xlabel="state t (0 = embedding)", ylabel="mean token norm ||h_t||", title="hidden-state norm")
    b.set(xlabel="step t", ylabel="||h_t - h_(t-1)|| / ||h_(t-1)||", title="relative update", yscale="log")
    a.legend(), b.legend()
    save(fig, "states.png")

    fig, (a, b) = _figure(2)
    for i, (label, r) in enumerate(results.items()):
        color = f"C{i}"
        for key, ax in (("attention_entropy", a), ("attention_distance", b)):
            per_head = torch.tensor(r[key])  # (L, H)
            steps = range(1, per_head.shape[0] + 1)
            ax.plot(steps, per_head, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, per_head.mean(1), color=color, marker="o", label=f"{label} (mean of heads)")
    first = next(iter(results.values()))
    a.axhline(first["max_entropy"], color="grey", linestyle=":", label="uniform (log N)")
    a.set(xlabel="step / layer", ylabel="entropy (nats)", title="attention entropy per head")
    b.set(xlabel="step / layer", ylabel="patches", title="mean attention distance per head")
    a.legend(fontsize=8), b.legend(fontsize=8)
    save(fig, "attention.png")

    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(results), width=4.2)
    for ax, (label, r) in zip(axes, results.items(), strict=True):
        im = ax.imshow(r["cka"], vmin=0, vmax=1, cmap="magma", origin="lower")
        ax.set(xlabel="state t (0 = embedding)", ylabel="state t", title=f"linear CKA: {label}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    save(fig, "cka.png")

    fig, (ax,) = _figure(1, width=6)
    for i, (label, r) in enumerate(results.items()):
        ax.plot([p["skipped"] + 1 for p in r["step_skip"]], [p["test_top1"] for p in r["step_skip"]],
                marker="o", color=f"C{i}", label=f"{label}: skip step k")
        ax.axhline(r["full"]["test_top1"], color=f"C{i}", linestyle="--", linewidth=0.8, label=f"{label}: no skip")
    ax.set(xlabel="skipped step / layer k", ylabel="test top-1 (%)", title="anytime depth / step skip (whole step)")
    ax.legend(fontsize=8)
    save(fig, "step_skip.png")

    fig, (ax,) = _figure(1, width=6)
    for i, (label, r) in enumerate(results.items()):
        ax.plot([p["steps"] for p in r["anytime"]], [p["test_top1"] for p in r["anytime"]], marker="o",
                color=f"C{i}", label=label)
        ax.axvline(r["steps"], color=f"C{i}", linestyle=":", linewidth=0.8)
    ax.set(xlabel="steps / layers used k (dotted: trained T)", ylabel="test top-1 (%)", title="anytime inference")
    ax.legend(fontsize=8)
    save(fig, "anytime.png")

    if all("importance" in r for r in results.values()):
        save(importance_figure(results), "importance.png")
    return paths


def importance_figure(results: dict[str, dict[str, Any]]):
    """Per model, two heatmaps of held-out loss increase: steps x heads and steps x MLP groups (one component
    off at one step only), titled with the mean between-step rank correlation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.2 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 2, squeeze=False)
    for row, (label, r) in zip(axes, results.items(), strict=True):
        imp = r["importance"]
        loss = torch.tensor(imp["loss_increase"])  # (steps, heads + groups)
        heads = len(imp["components"]) - imp["mlp_groups"]
        rho = imp["mean_rank_correlation"]
        scale = float(loss.abs().max()) or 1.0
        for ax, part, name in ((row[0], loss[:, :heads], "head"), (row[1], loss[:, heads:], "MLP group")):
            im = ax.imshow(part, cmap="RdBu_r", vmin=-scale, vmax=scale, origin="lower", aspect="auto")
            ax.set(xlabel=name, ylabel="step / layer", xticks=range(part.shape[1]), yticks=range(part.shape[0]),
                   yticklabels=range(1, part.shape[0] + 1))
            corr = "" if rho is None or name != "head" else f", steps' rank corr. {rho:.2f}"
            ax.set_title(f"{label}\nloss increase, one {name} off at one step{corr}", fontsize=8)
        fig.colorbar(im, ax=list(row), shrink=0.8)
    return fig

