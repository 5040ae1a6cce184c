"""Launch-time checks, before Ray starts: what would otherwise fail inside every trial, minutes later.

    problems = data_problems(configs, data_paths) + resource_problems(spec, local=True) + memory_problems(configs)
    schedule_problems(spec, configs), worker_problems(spec, configs)    # the spec against itself, checked first

Each check returns one line per distinct problem (`source: field: message`); `launch` raises them together as
a `UserError` (exit 2). Fine-tuning trials take their model from the checkpoint (`pretrained.resolve_pretrained`
checks those), so the data check covers training trials only.
"""
from __future__ import annotations

import os
from typing import Any

from bvit.config import TrialConfig
from orchestrator.planning import model_params
from orchestrator.spec import Resources, SweepSpec

__all__ = ["BYTES_PER_PARAM", "DRIVER_CPU", "data_problems", "memory_problems", "resource_problems", "schedule_problems",
           "worker_problems"]

DRIVER_CPU = 0.01  # what the Tune trial that drives a data-parallel trial's workers reserves (Ray refuses 0)
# AdamW training in float32: the weights, their gradients and the two moment buffers, 4 bytes each.
BYTES_PER_PARAM = 4 * 4


def data_problems(configs: list[TrialConfig], data_paths: dict[str, str], *, source: str) -> list[str]:
    """The training trials whose model does not fit their data's meta.json: channels, classes, and the image
    size of data sets used at their stored size (`kind: ndarray`); a train_subset or batch larger than the data."""
    from bvit.data.format import load_metadata

    metas: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for cfg in configs:
        if cfg.finetune is not None:
            continue
        path = cfg.data.path
        meta = metas.setdefault(path, load_metadata(data_paths[path]))
        c, h, w = meta["image_shape"]
        m, where = cfg.model, f"{source}: data.path {path}"
        if m.in_chans != c:
            problems.append(f"{where} holds {c}-channel images but model.in_chans={m.in_chans}; set model.in_chans: {c}")
        if m.num_classes != meta["num_classes"]:
            problems.append(f"{where} has {meta['num_classes']} classes but model.num_classes={m.num_classes}; "
                            f"set model.num_classes: {meta['num_classes']}")
        if meta["kind"] == "ndarray" and (h, w) != (m.img_size, m.img_size):
            problems.append(f"{where} holds {h}x{w} images (used at their stored size) but model.img_size="
                            f"{m.img_size}; set model.img_size: {h}")
        n = meta["train_count"]
        if cfg.data.train_subset is not None and cfg.data.train_subset > n:
            problems.append(f"{where} holds {n} training images but data.train_subset={cfg.data.train_subset}")
        elif cfg.data.batch_size > (cfg.data.train_subset or n):
            problems.append(f"{where}: data.batch_size={cfg.data.batch_size} exceeds the {cfg.data.train_subset or n} "
                            "training images (training drops incomplete batches)")
    return list(dict.fromkeys(problems))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resource_problems(resources: Resources, *, source: str) -> list[str]:
    """What one trial asks for that this machine does not have (for an embedded local Ray only: a cluster
    address may have the resources elsewhere)."""
    problems = []
    cpus = os.cpu_count() or 1
    need = resources.cpus + (DRIVER_CPU if resources.workers > 1 else 0.0)  # a data-parallel trial's own actor too
    if need > cpus:
        also = (f" (its {resources.workers} workers' {resources.cpus:g} plus {DRIVER_CPU:g} for the Tune trial that "
                "drives them)") if resources.workers > 1 else ""
        problems.append(f"{source}: resources.cpus: {need:g} CPUs per trial{also}, but this machine has {cpus}; "
                        "lower it, or pass --address to run on a cluster that has them")
    if resources.gpus > 0 and resources.gpus > (gpus := _local_gpus()):
        problems.append(f"{source}: resources.gpus: {resources.gpus:g} GPUs per trial, but this machine has {gpus}; "
                        "lower it, or pass --address to run on a cluster that has them")
    return problems


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def memory_problems(configs: list[TrialConfig], *, source: str) -> list[str]:
    """Trials whose model alone cannot be trained in this machine's available memory: parameters x 16 bytes
    (float32 weights, gradients and AdamW's two moments), activations not counted: a lower bound."""
    available = _available_bytes()
    biggest = max(configs, key=lambda c: model_params(c.model), default=None)
    if biggest is None:
        return []
    need = model_params(biggest.model) * BYTES_PER_PARAM
    if need <= available:
        return []
    m = biggest.model
    return [f"{source}: model.width={m.width} ({m.arch}, {m.steps} steps): {model_params(m):.3g} parameters need "
            f"at least {need / 2**30:,.1f} GiB to train (weights, gradients, AdamW moments, 4 bytes each), "
            f"but {available / 2**30:,.1f} GiB is available here; use a smaller model.width"]



def schedule_problems(spec: SweepSpec, configs: list[TrialConfig], *, source: str) -> list[str]:
    """ASHA on a test metric compares it every epoch: every trial must score the test set every epoch."""
    if spec.scheduler.type == "asha" and spec.scheduler.metric.startswith("test_"):
        if late := sorted({c.eval_every for c in configs if c.eval_every != 1}):
            return [f"{source}: scheduler.type: asha compares {spec.scheduler.metric} every epoch, "
                    f"but eval_every={late[0]} scores the test set less often; set eval_every: 1"]
    return []


def worker_problems(spec: SweepSpec, configs: list[TrialConfig], *, source: str) -> list[str]:
    """Fine-tuning trials run in one process: no data-parallel workers."""
    if spec.resources.workers > 1 and any(c.finetune is not None for c in configs):
        return [f"{source}: resources.workers: fine-tuning trials run in one process; set workers: 1"]
    return []
