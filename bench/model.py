"""bViT vs timm ViT at the same width and steps = depth (same FLOPs), side by side in one run.

    python bench/model.py [--width 128 --steps 4 --batch 128 --threads 2 --device cpu]

Prints training and inference images/s of both and their ratio (fp32 and bf16 autocast), peak
activation memory of a training step with and without per-step activation checkpointing and the step
time it costs, and parameter + AdamW-state bytes. Goals (issue 10): bViT/ViT training throughput
>= 1.00; parameter + optimizer memory exactly 1/T of the ViT's block memory; checkpointing <= 0.40 of
the peak activation memory at <= 1.35x the step time. `--device cuda` runs the same measurements on a
GPU (bf16 autocast on the device's type; timings wait for the device).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bvit.models.factory import build_model, count_params


def _models(width: int, steps: int, heads: int):
    kw = dict(width=width, steps=steps, heads=heads, patch_size=4, img_size=28, in_chans=1, num_classes=10)
    return build_model(arch="bvit", **kw), build_model(arch="vit", **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rates(models, x, y, *, train: bool, precision: str, iters: int) -> list[float]:
    """Images/s of each model, median of `iters` timed iterations after 2 warm-up ones; the models take
    turns iteration by iteration, so that a busy machine slows them alike and the ratio stays fair."""
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for i in range(iters + 2):
        for model, opt, t in zip(models, opts, times, strict=True):
            model.train(train)
            _sync(x.device)
            t0 = time.perf_counter()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if train:
                    loss = F.cross_entropy(model(x).float(), y)
                else:
                    with torch.no_grad():
                        model(x)
            if train:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(x.device)
            if i >= 2:
                t.append(time.perf_counter() - t0)
    return [x.shape[0] / sorted(t)[len(t) // 2] for t in times]


def _activation_bytes(model, x, y) -> int:
    """Bytes of the tensors autograd keeps for backward (distinct storages), i.e. activation memory."""
    model.train()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in seen.items() if ptr not in params)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def _step_times(model, x, y, iters: int) -> tuple[float, float]:
    """Median fwd+bwd seconds (plain, per-step checkpointing), the two interleaved iteration by iteration
    so that a busy machine slows both alike; one warm-up iteration each."""
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (iters + 1)):
        ckpt = bool(i % 2)
        model.set_grad_checkpointing(ckpt)
        _sync(x.device)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        _sync(x.device)
        if i >= 2:
            times[ckpt].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(False)
    return tuple(sorted(t)[len(t) // 2] for t in (times[False], times[True]))


def _state_bytes(model) -> int:
    """Parameters + AdamW state (exp_avg, exp_avg_sq, step) after one step, in bytes."""
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    model.zero_grad(set_to_none=True)
    return params + state


def run(width: int = 128, steps: int = 4, heads: int = 8, batch: int = 128, threads: int = 2, iters: int = 5,
        device: str = "cpu") -> list[str]:
    dev = torch.device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bvit, vit = (m.to(dev) for m in _models(width, steps, heads))
    x, y = torch.randn(batch, 1, 28, 28).to(dev), torch.randint(0, 10, (batch,)).to(dev)
    where = f"{threads} threads" if dev.type == "cpu" else str(dev)
    out = [f"## bViT vs ViT (width {width}, steps/depth {steps}, heads {heads}, batch {batch}, {where})", "",
           "| measure | bViT | ViT | bViT/ViT | goal |", "|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        for train in (True, False):
            rb, rv = _rates([bvit, vit], x, y, train=train, precision=precision, iters=iters)
            goal = ">= 1.00" if train else ""
            out.append(f"| {'train' if train else 'inference'} img/s, {precision} | {rb:,.0f} | {rv:,.0f} | "
                       f"{rb / rv:.3f} | {goal} |")
    sb, sv = _state_bytes(bvit), _state_bytes(vit)
    pb, pv = count_params(bvit), count_params(vit)
    out.append(f"| parameters | {pb:,} | {pv:,} | {pb / pv:.4f} | |")
    out.append(f"| parameter + AdamW bytes | {sb:,} | {sv:,} | {sb / sv:.4f} | |")
    block_b = sum(p.numel() for p in bvit.block.parameters())
    block_v = sum(p.numel() for b in vit.blocks for p in b.parameters())
    out.append(f"| block parameters (the recurrent part) | {block_b:,} | {block_v:,} | {block_b / block_v:.4f} | "
               f"exactly 1/T = {1 / steps:.4f} |")
    peak_plain = _activation_bytes(bvit, x, y)
    bvit.set_grad_checkpointing(True)
    peak_ckpt = _activation_bytes(bvit, x, y)
    bvit.set_grad_checkpointing(False)
    t_plain, t_ckpt = _step_times(bvit, x, y, iters)
    out.append(f"| bViT activation bytes kept for backward: checkpointing / plain | {peak_ckpt:,} | {peak_plain:,} | "
               f"{peak_ckpt / peak_plain:.3f} | <= 0.40 |")
    out.append(f"| bViT fwd+bwd seconds: checkpointing / plain | {t_ckpt:.4f} | {t_plain:.4f} | "
               f"{t_ckpt / t_plain:.3f} | <= 1.35 |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = ap.parse_args()
    print("\n".join(run(a.width, a.steps, a.heads, a.batch, a.threads, a.iters, a.device)))


if __name__ == "__main__":
    main()
