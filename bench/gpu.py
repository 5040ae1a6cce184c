"""bViT-B/16 vs ViT-B/16 on a GPU, side by side in one run (issue 20); `--tiny` runs the same path on a CPU.

    python bench/gpu.py                     # on the GPU: 224 px, bf16 autocast; writes results/gpu/<date>.md
    python bench/gpu.py --tiny              # CPU check of every code path in about a minute (tiny shapes)
    python bench/gpu.py --budget-s 240      # stop starting new sections after ~240 s (what is done is kept)

Sections, each written to the report as soon as it is measured (a run stopped early keeps what it has):
1. training img/s and MFU, bf16 autocast, eager: bViT and ViT take turns iteration by iteration (as
   bench/model.py), so that anything else on the machine slows both alike; FLOPs from
   torch.utils.flop_counter (forward + backward of one batch, attention as plain matmuls), peak from
   PEAK_BF16 below (the source is named in the report);
2. peak memory of one training step, with and without per-step (per-block) activation checkpointing;
3. the largest batch that trains (bounded doubling, then bisection; OOM caught);
4. FFCV -> GPU vs torch DataLoader img/s on Fashion-MNIST (bench/loader.py's two loaders);
5. torch.compile: compile seconds of each model (cold caches, torch._dynamo.reset() between models),
   then compiled training img/s, the two compiled models taking turns.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before torch is imported: cold, private compile caches, so compile seconds are compile seconds.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bvit-inductor-"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton"))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bvit.models  # noqa: E402,F401  -- registers bvit_* with timm

# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, matched on torch.cuda.get_device_name().
# Source: NVIDIA's H100 datasheet (H100 SXM5: 1,979 TFLOP/s bf16 *with* 2:4 sparsity = 989.4 dense; H100
# PCIe 756 dense) and NVIDIA's H200 product page (H200 SXM: the same 1,979 sparse / 989 dense; H200 NVL
# 835 dense); A100 datasheet: 312 dense. First match wins, so longer names come first.
PEAK_BF16 = [
    ("H200 NVL", 835e12, "NVIDIA H200 NVL datasheet, dense bf16"),
    ("H200", 989.4e12, "NVIDIA H200 SXM datasheet (1,979 TFLOP/s with sparsity), dense bf16"),
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet, dense bf16"),
    ("H100", 989.4e12, "NVIDIA H100 SXM datasheet (1,979 TFLOP/s with sparsity), dense bf16"),
    ("A100", 312e12, "NVIDIA A100 datasheet, dense bf16"),
]

SHAPES = {  # --tiny: the same code on a CPU in about a minute
    "full": dict(img=224, width=None, steps=None, heads=None, batch=128, iters=10, warmup=3, probe_cap=8192,
                 loader_items=300_000, loader_batch=512, loader_workers=8),
    "tiny": dict(img=32, width=64, steps=2, heads=2, batch=8, iters=3, warmup=1, probe_cap=32,
                 loader_items=4_096, loader_batch=256, loader_workers=1),
}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, peak, source in PEAK_BF16:
        if key.lower() in name.lower():
            return peak, f"{name}: {peak / 1e12:,.1f} TFLOP/s ({source})"
    return None, f"{name}: not in bench/gpu.py's PEAK_BF16 table: MFU not computed"


def make_models(shape: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    """bViT-B/16 (timm name bvit_base_patch16_224) and timm's ViT-B/16; --tiny: the same with tiny kwargs."""
    kw: dict[str, Any] = {}
    if shape["width"] is not None:
        kw = dict(img_size=shape["img"], embed_dim=shape["width"], num_heads=shape["heads"])
    torch.manual_seed(0)
    b, v = ("bViT-B/16", "ViT-B/16") if shape["width"] is None else ("bViT-tiny", "ViT-tiny")
    models = {
        b: timm.create_model("bvit_base_patch16_224", **kw, **(
            {"num_steps": shape["steps"]} if shape["steps"] else {})),
        v: timm.create_model("vit_base_patch16_224", pretrained=False, **kw, **(
            {"depth": shape["steps"]} if shape["steps"] else {})),
    }
    return {k: m.to(device).train() for k, m in models.items()}


@contextlib.contextmanager
def plain_attention(model: torch.nn.Module):
    """Attention as explicit matmuls while counting, so every backend's FLOPs are counted alike."""
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attn]
    for m in attn:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, s in zip(attn, saved, strict=True):
            m.fused_attn = s


def train_flops_per_image(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, counted by torch.utils.flop_counter on one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with plain_attention(model):
        with FlopCounterMode(display=False) as fwd:
            logits = model(x)
        fwd_flops = fwd.get_total_flops()
        with FlopCounterMode(display=False) as both:
            F.cross_entropy(model(x).float(), y).backward()
        total = both.get_total_flops()
    del logits
    model.zero_grad(set_to_none=True)
    return fwd_flops / x.shape[0], total / x.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, opt, x, y, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _optimizer(model, device: torch.device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def interleaved_rates(models: dict, runners: dict, x, y, device, *, iters: int, warmup: int) -> dict[str, float]:
    """Training img/s of each model (median of `iters` timed steps after `warmup`), taking turns per step."""
    opts = {k: _optimizer(m, device) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + iters):
        for k in models:
            _sync(device)
            t0 = time.perf_counter()
            _step(runners[k], opts[k], x, y, device)
            _sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    return {k: x.shape[0] / sorted(t)[len(t) // 2] for k, t in times.items()}


def step_memory(model, x, y, device: torch.device, *, checkpointing: bool) -> int:
    """Peak bytes of one bf16 training step above the model's resting memory (CUDA: the allocator's peak;
    CPU: bytes of the tensors autograd keeps for backward, as bench/model.py)."""
    model.set_grad_checkpointing(checkpointing)
    try:
        if device.type == "cuda":
            _sync(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            peak = sum(n for ptr, n in seen.items() if ptr not in params)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(False)
    return int(peak)


def fits(model, batch: int, img: int, device: torch.device) -> bool:
    """Does one bf16 training step (forward, backward, AdamW) at `batch` fit in device memory?"""
    opt = _optimizer(model, device)
    try:
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        _step(model, opt, x, y, device)
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        x = y = None  # noqa: F841
        opt.zero_grad(set_to_none=True)
        del opt
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(model, *, start: int, cap: int, img: int, device: torch.device, deadline: float) -> tuple[int, str]:
    """Largest batch that trains: double from `start` until a failure or `cap`, then bisect (to 1/16)."""
    good, bad, b = 0, None, start
    while b <= cap and time.perf_counter() < deadline:
        if fits(model, b, img, device):
            good, b = b, b * 2
        else:
            bad = b
            break
    if good == 0:
        return 0, f"batch {start} did not fit"
    if bad is None:
        return good, f">= {good:,} (the search cap{'' if b > cap else ' / time budget'}; no OOM)"
    step = max(1, good // 16)
    while bad - good > step and time.perf_counter() < deadline:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(model, mid, img, device) else (good, mid)
    return good, f"{good:,} ({bad:,} ran out of memory)"


def loader_rates(data: Path, shape: dict, device: torch.device) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "bench"))
    from loader import ffcv_rate, torch_loader_rate  # bench/loader.py: the CPU benchmark's two loaders

    from bvit.data.format import load_metadata

    meta = load_metadata(data)
    kw = dict(batch_size=shape["loader_batch"], workers=shape["loader_workers"], device=device,
              max_items=shape["loader_items"])
    return {"FFCV (bvit.data)": ffcv_rate(data=data, **kw), "torch DataLoader": torch_loader_rate(meta=meta, **kw)}


def compile_section(models, rates, flops, peak, x, y, device, shape, backend: str) -> tuple[list[str], dict]:
    """Compile seconds and compiled img/s of each model, one at a time (a reset discards compiled code)."""
    names = list(models)
    warm = torch.nn.Linear(8, 8).to(device)  # pays the compiler's one-time start-up before either model
    torch.compile(warm, backend=backend)(torch.randn(2, 8, device=device, requires_grad=True)).sum().backward()
    seconds, crates = {}, {}
    for k, m in models.items():
        torch._dynamo.reset()
        compiled = torch.compile(m, backend=backend)
        opt = _optimizer(m, device)
        _sync(device)
        t0 = time.perf_counter()
        _step(compiled, opt, x, y, device)  # compiles forward and backward
        _sync(device)
        seconds[k] = time.perf_counter() - t0
        crates[k] = interleaved_rates({k: m}, {k: compiled}, x, y, device, iters=shape["iters"],
                                      warmup=shape["warmup"])[k]
        del compiled, opt
    torch._dynamo.reset()
    rows = [f"## 5. torch.compile (backend {backend}, default mode; cold caches, torch._dynamo.reset() before "
            "each model; each model timed right after its compile)", "",
            f"| measure | {names[0]} | {names[1]} | ratio |", "|---|---|---|---|",
            "| compile seconds (first step) | " + " | ".join(f"{seconds[k]:,.1f}" for k in names)
            + f" | {seconds[names[0]] / seconds[names[1]]:.3f} |",
            "| compiled training img/s | " + " | ".join(f"{crates[k]:,.1f}" for k in names)
            + f" | {crates[names[0]] / crates[names[1]]:.3f} |",
            "| compiled / eager img/s | " + " | ".join(f"{crates[k] / rates[k]:.3f}" for k in names) + " | |"]
    if peak:
        cmfu = {k: crates[k] * flops[k][1] / peak for k in names}
        rows.append("| compiled MFU | " + " | ".join(f"{100 * cmfu[k]:.1f} %" for k in names)
                    + f" | {cmfu[names[0]] / cmfu[names[1]]:.3f} |")
    return rows, dict(backend=backend, seconds=seconds, img_per_s=crates)


class Report:
    """The markdown report, rewritten after every section."""

    def __init__(self, path: Path, head: list[str]):
        self.path, self.lines = path, list(head)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {}

    def add(self, lines: list[str]) -> None:
        self.lines += lines + [""]
        print("\n".join(lines), flush=True)
        self.flush()

    def flush(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n")
        self.path.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=float) + "\n")


def _git_sha() -> str:
    """HEAD (BVIT_GIT_SHA where the tree travelled without .git, as on the device machine)."""
    if sha := os.environ.get("BVIT_GIT_SHA"):
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _gflops(n: float) -> str:
    return f"{n / 1e9:,.2f}" if n >= 1e8 else f"{n / 1e9:.2g}"


def _gb(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


def run(*, tiny: bool, out: Path, budget_s: float, data: Path | None, compile_models: bool) -> Path:
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    shape = SHAPES["tiny" if tiny else "full"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif not tiny:
        print("bench/gpu.py: no CUDA device; use --tiny for the CPU check", file=sys.stderr)
    peak, peak_note = peak_flops(device)
    now = dt.datetime.now(dt.UTC)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    suffix = "-tiny" if tiny else ""
    report = Report(out / f"{now:%Y-%m-%d}{suffix}.md", [
        f"# GPU benchmark{' (--tiny: tiny shapes on ' + device.type + ', a code-path check, not a measurement)' if tiny else ''}"
        f" {now:%Y-%m-%d %H:%M} UTC", "",
        f"device: {dev_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); timm {timm.__version__}; "
        f"Python {platform.python_version()}; git {_git_sha()}; command: `python bench/gpu.py"
        f"{' --tiny' if tiny else ''}`", "",
        f"peak: {peak_note}", ""])
    report.data.update(device=dev_name, tiny=tiny, torch=torch.__version__, peak_flops=peak, sections={})

    img, batch = shape["img"], shape["batch"]
    models = make_models(shape, device)
    names = list(models)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    # 1. FLOPs, eager training img/s, MFU
    flops = {k: train_flops_per_image(m, x, y) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    rates = interleaved_rates(models, models, x, y, device, iters=shape["iters"], warmup=shape["warmup"])
    rows = [f"## 1. Training, bf16 autocast, eager ({img} px, batch {batch}, AdamW"
            f"{' fused' if device.type == 'cuda' else ''}; median of {shape['iters']} steps, the models taking turns)", "",
            f"| measure | {names[0]} | {names[1]} | ratio |", "|---|---|---|---|",
            f"| parameters | {params[names[0]]:,} | {params[names[1]]:,} | {params[names[0]] / params[names[1]]:.4f} |",
            "| forward GFLOPs / image (flop_counter) | " + " | ".join(_gflops(flops[k][0]) for k in names)
            + f" | {flops[names[0]][0] / flops[names[1]][0]:.3f} |",
            "| training GFLOPs / image (fwd + bwd) | " + " | ".join(_gflops(flops[k][1]) for k in names)
            + f" | {flops[names[0]][1] / flops[names[1]][1]:.3f} |",
            "| training img/s | " + " | ".join(f"{rates[k]:,.1f}" for k in names)
            + f" | {rates[names[0]] / rates[names[1]]:.3f} |"]
    mfu = {k: rates[k] * flops[k][1] / peak for k in names} if peak else None
    if mfu:
        rows.append("| MFU (training FLOP/s / peak) | " + " | ".join(f"{100 * mfu[k]:.1f} %" for k in names)
                    + f" | {mfu[names[0]] / mfu[names[1]]:.3f} |")
    report.data["sections"]["train"] = dict(batch=batch, img=img, params=params, flops=flops, img_per_s=rates, mfu=mfu)
    report.add(rows)

    # 2. memory with and without per-step checkpointing
    def memory() -> None:
        mem = {k: {c: step_memory(m, x, y, device, checkpointing=c) for c in (False, True)} for k, m in models.items()}
        what = "peak allocator bytes of one training step" if device.type == "cuda" else "activation bytes kept for backward"
        rows = [f"## 2. Memory: {what} (batch {batch}), with and without per-step activation checkpointing", "",
                f"| measure | {names[0]} | {names[1]} | ratio |", "|---|---|---|---|"]
        for c, label in ((False, "plain"), (True, "checkpointing (set_grad_checkpointing)")):
            rows.append(f"| {label} | " + " | ".join(_gb(mem[k][c]) for k in names)
                        + f" | {mem[names[0]][c] / mem[names[1]][c]:.3f} |")
        rows.append("| checkpointing / plain | " + " | ".join(f"{mem[k][True] / mem[k][False]:.3f}" for k in names)
                    + " | |")
        report.data["sections"]["memory"] = {k: {"plain": v[False], "checkpointing": v[True]} for k, v in mem.items()}
        report.add(rows)

    # 3. largest batch that trains
    def largest() -> None:
        sec_deadline = min(deadline, time.perf_counter() + budget_s * 0.2)
        found = {k: largest_batch(m, start=batch, cap=shape["probe_cap"], img=img, device=device,
                                  deadline=sec_deadline) for k, m in models.items()}
        report.data["sections"]["largest_batch"] = {k: v[0] for k, v in found.items()}
        report.add([f"## 3. Largest batch that trains (bf16, plain, {img} px; doubling from {batch}, then bisection)",
                    "", f"| {names[0]} | {names[1]} | ratio |", "|---|---|---|",
                    f"| {found[names[0]][1]} | {found[names[1]][1]} | "
                    f"{found[names[0]][0] / max(found[names[1]][0], 1):.2f} |"])

    # 4. loaders
    def loaders() -> None:
        lr = loader_rates(data, shape, device)
        a, b = list(lr)
        report.data["sections"]["loader"] = lr
        report.add([f"## 4. Loaders: Fashion-MNIST -> {device.type}, batch {shape['loader_batch']}, "
                    f"{shape['loader_workers']} workers, pad-crop + flip (bench/loader.py)", "",
                    f"| {a} img/s | {b} img/s | ratio |", "|---|---|---|",
                    f"| {lr[a]:,.0f} | {lr[b]:,.0f} | {lr[a] / lr[b]:.1f} |"])

    # 5. torch.compile
    backend = "aot_eager" if tiny else "inductor"  # --tiny: dynamo + AOT autograd, no code generation

    def compiled() -> None:
        rows, report.data["sections"]["compile"] = compile_section(models, rates, flops, peak, x, y, device, shape,
                                                                   backend)
        report.add(rows)

    def section(title: str, fn, *, need_s: float = 0.0, skip: str | None = None) -> None:
        """Run one section unless skipped or out of time; a failure is reported, and the next section runs."""
        left = deadline - time.perf_counter()
        if skip is None and left < need_s:
            skip = f"{max(left, 0):.0f} s of the time budget left, {need_s:.0f} s needed"
        if skip is not None:
            report.add([f"## {title}: skipped ({skip})"])
            return
        try:
            fn()
        except Exception as e:  # one broken section must not lose the others
            first = (str(e).strip().splitlines() or [""])[0][:300]
            report.data["sections"][title] = {"error": f"{type(e).__name__}: {e}"[:3000]}
            report.add([f"## {title}: FAILED: {type(e).__name__}: {first}"])
            traceback.print_exc()
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    section("2. Memory", memory)
    section("3. Largest batch", largest, need_s=5)
    no_data = None if data is not None and (data / "meta.json").exists() else "no prepared Fashion-MNIST: --data DIR"
    section("4. Loaders", loaders, need_s=5, skip=no_data)
    section("5. torch.compile", compiled, need_s=20 if tiny else 120,
            skip=None if compile_models else "--no-compile")

    report.add([f"total: {time.perf_counter() - t_start:,.0f} s (budget {budget_s:,.0f} s)"])
    print(f"wrote {report.path}")
    return report.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU check of every code path")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu", help="report directory")
    ap.add_argument("--budget-s", type=float, default=240.0, help="no new section starts after this")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "fashion-mnist", help="prepared Fashion-MNIST")
    ap.add_argument("--no-compile", dest="compile_models", action="store_false")
    a = ap.parse_args()
    run(tiny=a.tiny, out=a.out, budget_s=a.budget_s, data=a.data, compile_models=a.compile_models)


if __name__ == "__main__":
    main()
