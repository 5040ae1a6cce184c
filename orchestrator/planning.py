"""What a sweep costs before any compute is spent: exact parameters and FLOPs, estimated time per trial.

Parameters and FLOPs come from the closed-form counts of each arch's registry entry (`bvit.archs`; tested equal
to `count_params` / `count_flops` of the built model for every registered arch), cached per model shape, so a
10,000-trial grid plans in about a second.
Time is an estimate: the training FLOP rate of one small model measured on this machine (or, with
`bench=False` or for GPUs, a stated fixed rate), scaled by each trial's FLOPs.
"""
from __future__ import annotations

import functools
import heapq
import os
import time
from dataclasses import dataclass
from typing import Any

from bvit.archs import get_arch
from bvit.config import ModelConfig, TrialConfig
from orchestrator.cells import Design
from orchestrator.spec import SweepSpec, Trial, expand_trials

__all__ = [
    "Plan", "Rate", "TrialCost", "duration", "few_seed_comparisons", "make_plan", "measure_rate", "model_flops",
    "model_params", "print_plan",
]

# Fixed training FLOP/s, used without a measurement. CPU: a timm ViT (width 128, depth 4, patch 4, 28x28,
# batch 256) trains ~500 img/s fp32 and ~670 bf16 on 2 cores of this project's reference machine
# (ENVIRONMENT.md), i.e. 3 x 84.0 MFLOP x img/s / 2 per core. bf16 needs avx512_bf16 or AMX: on an AVX2-only
# CPU it measured ~7x slower than fp32. GPU: an assumption, about a third of an A100/H100-class dense peak
# (DeiT-B's 300 epochs in 53 h on 8 V100s is ~27 TFLOP/s per V100).
CPU_CORE_FLOPS = {"fp32": 63e9, "bf16": 85e9}
GPU_FLOPS = {"fp32": 40e12, "bf16": 100e12}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (2x forward)

# (train, test) images of the data sets, matched on the last part of data.path.
DATASET_SIZES = {"fashion-mnist": (60_000, 10_000), "cifar100": (50_000, 10_000), "cifar10": (50_000, 10_000),
                 "imagenet": (1_281_167, 50_000), "mnist": (60_000, 10_000)}


_NOT_SHAPE = {"drop_path": 0.0, "grad_checkpointing": False}  # training-time options of one and the same model


def _shape(m: ModelConfig) -> ModelConfig:
    """`m` with its training-time options reset: configs of equal shape have equal counts (and one cache entry)."""
    return m.model_copy(update=_NOT_SHAPE)


@functools.lru_cache(maxsize=4096)
def _counts(shape: ModelConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs per image): the closed forms of the arch's registry entry (`bvit.archs`)."""
    return get_arch(shape.arch).counts(shape)


def model_params(m: ModelConfig) -> int:
    """Parameters of the model `m` describes (a bViT's shared block counted once)."""
    return _counts(_shape(m))[0]


def model_flops(m: ModelConfig) -> int:
    """Forward FLOPs for one image, equal to `bvit.models.count_flops` of the built model."""
    return _counts(_shape(m))[1]


@dataclass(frozen=True)
class Rate:
    """Training FLOP/s of one trial, and where the number comes from."""

    flops_per_s: float
    source: str  # "measured" or "assumed"
    note: str


def measure_rate(*, precision: str = "fp32", threads: int = 1, seconds: float = 0.6) -> float:
    """Training FLOP/s of a ViT (width 128, 2 blocks, 28x28, patch 4, batch 32) on this CPU with `threads`.

    Runs for about `seconds`, at least one step (bf16 on a CPU without bf16 instructions is slow).
    """
    import torch

    from bvit.models.factory import build_model

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model(arch="vit", width=128, steps=2, heads=4, patch_size=4, img_size=28, in_chans=1,
                            num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []  # per step; the first (allocation, kernel choice) is dropped when there are more
        while not times or (sum(times) < seconds and len(times) < 50):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        timed = times[1:] or times
        images_per_s = len(timed) * x.shape[0] / sum(timed)
    finally:
        torch.set_num_threads(saved)
    flops = model_flops(ModelConfig(arch="vit", width=128, steps=2, heads=4))
    return images_per_s * TRAIN_FLOPS_PER_FORWARD * flops


def _rates(spec: SweepSpec, precisions: set[str], *, bench: bool) -> dict[str, Rate]:
    res = spec.resources
    if res.gpus > 0:
        return {p: Rate(GPU_FLOPS[p] * res.gpus, "assumed",
                        f"assumed {GPU_FLOPS[p] / 1e12:.0f} TFLOP/s per GPU ({p}) x {res.gpus:g} GPUs")
                for p in precisions}
    threads = max(1, min(int(res.cpus), os.cpu_count() or 1))
    out = {}
    for p in sorted(precisions):
        if bench:
            rate = measure_rate(precision=p, threads=threads)
            note = (f"measured {rate / 1e9:.0f} GFLOP/s ({p}, {threads} thread(s)) training a small ViT "
                    "here, scaled by each trial's FLOPs")
            out[p] = Rate(rate, "measured", note)
        else:
            rate = CPU_CORE_FLOPS[p] * threads
            note = f"assumed {CPU_CORE_FLOPS[p] / 1e9:.0f} GFLOP/s per CPU core ({p}) x {threads} core(s)"
            out[p] = Rate(rate, "assumed", note)
    return out


def _dataset_size(cfg: TrialConfig) -> tuple[int | None, int | None]:
    name = cfg.data.path.rstrip("/").rsplit("/", 1)[-1].lower()
    train, test = next((size for key, size in DATASET_SIZES.items() if key in name), (None, None))
    if cfg.data.train_subset is not None:
        train = min(cfg.data.train_subset, train) if train else cfg.data.train_subset
    return train, test


@dataclass(frozen=True)
class TrialCost:
    """One trial's exact size and estimated time."""

    trial: Trial
    params: int
    flops: int  # forward FLOPs per image
    epochs: int
    train_images: int | None  # per epoch; None: unknown data set size
    seconds_per_epoch: float | None  # training and evaluation (every eval_every epochs)

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_epoch is None else self.seconds_per_epoch * self.epochs

    def to_dict(self) -> dict[str, Any]:
        m = self.trial.config.model
        return {"id": self.trial.id, "arch": m.arch, "width": m.width, "heads": m.heads, "steps": m.steps,
                "params": self.params, "flops_per_image": self.flops,
                "gflops_per_image": round(self.flops / 1e9, 4), "epochs": self.epochs,
                "train_images": self.train_images, "seconds_per_epoch": self.seconds_per_epoch,
                "seconds": self.seconds, "axes": self.trial.axes}


@dataclass(frozen=True)
class Plan:
    """A sweep's trials with their costs, the rates behind the time estimates, and how many run at once."""

    spec: SweepSpec
    smoke: bool
    trials: list[TrialCost]
    rates: dict[str, Rate]
    concurrent: int | None  # trials at once (None: unknown, e.g. a cluster without max_concurrent_trials)

    def totals(self) -> dict[str, Any]:
        """Trials, distinct models, training FLOPs, summed trial time, and wall time on `concurrent` slots."""
        times = [t.seconds for t in self.trials]
        known = None not in times
        wall = None
        if known and self.concurrent:
            slots = [0.0] * self.concurrent  # each trial starts on the first free slot, in the launch's order
            seconds = {id(c.trial): c.seconds for c in self.trials}
            for t in run_order([c.trial for c in self.trials]):
                heapq.heapreplace(slots, slots[0] + seconds[id(t)])
            wall = max(slots, default=0.0)
        train_flops = sum(TRAIN_FLOPS_PER_FORWARD * t.flops * t.epochs * (t.train_images or 0)
                          for t in self.trials)
        models = {_shape(t.trial.config.model) for t in self.trials}
        return {"trials": len(self.trials), "unique_models": len(models),
                "epochs": sum(t.epochs for t in self.trials), "train_flops": train_flops,
                "seconds": sum(times) if known else None, "concurrent": self.concurrent, "wall_seconds": wall}

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.name, "file": self.spec.source, "smoke": self.smoke,
                "estimate": {p: {"flops_per_s": r.flops_per_s, "source": r.source, "note": r.note}
                             for p, r in self.rates.items()},
                "trials": [t.to_dict() for t in self.trials], "totals": self.totals()}


def few_seed_comparisons(trials: list[Trial], design: Design) -> str | None:
    """A warning when some comparison of the design (an arm and its cell's baseline arm, both present) has an
    arm with fewer than stats.MIN_SEEDS seeds; None when every comparison has enough (or there is none)."""
    from orchestrator.stats import MIN_SEEDS

    flats = [t.config.flat() for t in trials]
    rows = [{col: flat.get(path) for path, col in design.names()} for flat in flats]
    bound = design.bind(rows)
    if bound.arm_column is None:
        return None
    seeds: dict[tuple[str, ...], dict[str, int]] = {}
    for row in rows:
        arms = seeds.setdefault(bound.cell_key(row), {})
        arms[bound.arm(row)] = arms.get(bound.arm(row), 0) + 1
    base = bound.arm({bound.arm_column: bound.baseline})
    pairs = [(n, arms[base]) for arms in seeds.values() if base in arms for a, n in arms.items() if a != base]
    few = [p for p in pairs if min(p) < MIN_SEEDS]
    if not few:
        return None
    least = min(min(p) for p in few)
    return (f"{len(few)} of {len(pairs)} comparisons with {bound.baseline_label()} have {least} seed{'s' * (least != 1)} "
            f"per arm: comparisons with fewer than {MIN_SEEDS} seeds cannot carry an interval worth reading; "
            f"set seeds: {list(range(MIN_SEEDS))}")


def relative_cost(cfg: TrialConfig) -> float:
    """A trial's work in forward-FLOP units (training images x 3 + scored test images, times FLOPs per image,
    over its epochs): comparable between the trials of one sweep, whatever the machine's speed."""
    _, flops = _counts(_shape(cfg.model))
    train, test = _dataset_size(cfg)
    per_epoch = TRAIN_FLOPS_PER_FORWARD * (train or 1) + (test or 0) / cfg.eval_every
    return float(per_epoch * flops * cfg.optim.epochs)


def run_order(trials: list[Trial]) -> list[Trial]:
    """The order a sweep starts its trials in: seed by seed as the spec lists them (a sweep stopped early
    has covered the grid with its first seeds), and within a seed the costliest trial first -- longest
    first keeps the slots busy to the end instead of leaving one long trial running alone."""
    seeds = list(dict.fromkeys(t.config.seed for t in trials))
    return sorted(trials, key=lambda t: (seeds.index(t.config.seed), -relative_cost(t.config)))


def _concurrent(spec: SweepSpec) -> int | None:
    cap = spec.max_concurrent_trials
    if spec.ray_address is not None or spec.resources.gpus > 0:
        return cap
    here = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slots = max(1, int(here // spec.resources.cpus))
    return min(slots, cap) if cap else slots


def make_plan(*, spec: SweepSpec, smoke: bool = False, bench: bool = True, trials: list[Trial] | None = None) -> Plan:
    """Expand `spec` and cost every trial; `bench=False`: a stated fixed rate, not a ~1 s measurement.
    `trials`: cost these instead (a search's space, `orchestrator.strategy.describe_search`)."""
    trials = expand_trials(spec, smoke=smoke) if trials is None else trials
    rates = _rates(spec, {t.config.precision for t in trials}, bench=bench)
    max_t = spec.scheduler.max_t if spec.scheduler.type == "asha" else None
    costs = []
    for trial in trials:
        cfg = trial.config
        params, flops = _counts(_shape(cfg.model))
        train, test = _dataset_size(cfg)
        per_epoch = None
        if train is not None:
            evals = (test or 0) / cfg.eval_every
            per_epoch = (TRAIN_FLOPS_PER_FORWARD * train + evals) * flops / rates[cfg.precision].flops_per_s
        epochs = min(cfg.optim.epochs, max_t) if max_t else cfg.optim.epochs
        costs.append(TrialCost(trial, params, flops, epochs, train, per_epoch))
    return Plan(spec, smoke, costs, rates, _concurrent(spec))


# ---- the human table ---------------------------------------------------------------------------------------

_SHOWN = ("model.arch", "model.width", "model.heads", "model.steps")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _flops(n: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= size:
            return f"{n / size:,.3g} {unit}"
    return f"{n:,.0f} FLOP"


def duration(seconds: float | None) -> str:
    """`45 s`, `12.3 min`, `3.2 h`, `4.1 d`; `?` when unknown."""
    if seconds is None:
        return "?"
    for unit, size, limit in (("s", 1, 90), ("min", 60, 90 * 60), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit}" if unit == "s" else f"{seconds / size:.1f} {unit}"
    return f"{seconds / 86400:.1f} d"


def print_plan(plan: Plan, *, console: Any, max_rows: int | None = 200) -> None:
    """The plan as a rich table (at most `max_rows` rows; None: all), then its totals and caveats."""
    from rich.markup import escape
    from rich.table import Table

    spec, totals = plan.spec, plan.totals()
    title = f"{spec.name}{' (smoke)' if plan.smoke else ''}: {totals['trials']} trials  [{spec.source}]"
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    for name in ("trial", "arch", "width", "heads", "steps", "other axes", "params", "GFLOPs/img", "epochs",
                 "s/epoch", "time"):
        table.add_column(name, justify="left" if name in ("trial", "arch", "other axes") else "right")
    rows = plan.trials if max_rows is None else plan.trials[:max_rows]
    for t in rows:
        m = t.trial.config.model
        other = " ".join(f"{k}={v}" for k, v in t.trial.axes.items() if k not in _SHOWN)
        per_epoch = "?" if t.seconds_per_epoch is None else f"{t.seconds_per_epoch:,.1f}"
        table.add_row(t.trial.id, m.arch, str(m.width), str(m.heads), str(m.steps), escape(other),
                      _count(t.params), f"{t.flops / 1e9:.3g}", str(t.epochs), per_epoch, duration(t.seconds))
    if len(rows) < len(plan.trials):
        table.add_row("...", f"{len(plan.trials) - len(rows):,} more trials (--all shows every row; --json)")
    console.print(table)

    line = (f"total: {totals['trials']} trials ({totals['unique_models']} distinct models), "
            f"{totals['epochs']:,} epochs, {_flops(totals['train_flops'])} of training; "
            f"estimated {duration(totals['seconds'])} of trial time")
    if spec.resources.gpus and totals["seconds"]:
        line += f" ({totals['seconds'] * spec.resources.gpus / 3600:,.0f} GPU-hours)"
    if totals["wall_seconds"] is not None:
        here = " on this machine" if spec.ray_address is None and spec.resources.gpus == 0 else ""
        wall = duration(totals["wall_seconds"])
        line += f", ~{wall} wall with {totals['concurrent']} trial(s) at once{here}"
    console.print(line, markup=False, highlight=False)
    notes = [r.note for r in plan.rates.values()]
    notes.append("times are estimates: the rate scaled by FLOPs, test-set evaluation included; "
                 "small models run below the rate, so their times are low")
    if spec.scheduler.type == "asha":
        notes.append("ASHA stops trials early: the times assume every trial runs to the end")
    if unknown := sorted({t.trial.config.data.path for t in plan.trials if t.train_images is None}):
        notes.append(f"'?': unknown data set size for data.path {', '.join(unknown)}; set data.train_subset")
    for note in notes:
        console.print(f"note: {note}", style="dim", markup=False, highlight=False)
