"""The device paths, checked on the CPU (GPU-NOTES items 1-6, 8, 9): which device a trial trains on, where
reduced tensors live, what the spec refuses, how often the host waits for the device. CUDA is faked where
a test needs it to look present; what only a GPU can prove is listed in the README ("GPU-NOTES").
"""
import math
import os
import threading
from types import SimpleNamespace

import pytest
import torch
import yaml

import bvit.engine as engine
from bvit.config import TrialConfig
from bvit.engine import TrainingError, epoch_totals, fit, train_one_epoch
from bvit.models.factory import build_model
from bvit.trial import run_trial
from orchestrator import trainable
from orchestrator.envelope import TRIAL_KEY, TrialEnvelope
from orchestrator.spec import Resources, SpecError, load_spec


def _envelope(cfg: TrialConfig, tmp_path, **resources) -> dict:
    env = TrialEnvelope(trial_id="0123456789", config=cfg, resolved=cfg, resources=Resources(**resources),
                        max_failures=0, sweep_dir=str(tmp_path))
    return {TRIAL_KEY: env.to_tune()}


def _small_trial(fmnist_dir, **over) -> TrialConfig:
    return TrialConfig.model_validate({
        "model": {"width": 16, "steps": 1, "heads": 2},
        "data": {"path": str(fmnist_dir), "train_subset": 256, "batch_size": 128, "eval_batch_size": 2500,
                 "num_workers": 1, "augment": "none"},
        "optim": {"epochs": 1, "warmup_epochs": 0.5}, **over})


@pytest.fixture
def cuda_visible(monkeypatch):
    """torch says a GPU is there (this machine has none: anything that really used it would fail)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test: the trainable may blank it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    # torch's optimizers ask too, then query the device's stream: with no driver to answer, say "none" there
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)


# ---- items 2, 3: the trainable passes the device its reservation gives ----------------------------------

def test_a_gpus_0_trial_trains_on_the_cpu_even_when_cuda_is_available(fmnist_dir, tmp_path, monkeypatch,
                                                                     cuda_visible):
    assert engine.default_device() == torch.device("cuda", 0)  # what a trial used to pick by itself
    reported = []
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint: reported.append(metrics))
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node", runtime_env={}))
    cfg = _small_trial(fmnist_dir)
    trainable.run_trial(_envelope(cfg, tmp_path, cpus=1, gpus=0))  # the real trial, on a "GPU host"
    assert [r["epoch"] for r in reported] == [1]
    assert reported[0]["matmul_precision"] == "highest"  # CPU: fp32 matmuls as before (no TF32 setting)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # and no GPU it did not reserve is visible to it


def test_the_trainable_asks_for_cuda_only_when_the_trial_reserved_gpus(tmp_path, monkeypatch, cuda_visible):
    seen = []
    monkeypatch.setattr("bvit.trial.run_trial", lambda cfg, **kw: seen.append(kw["device"]))
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    for gpus, expected in ((0, "cpu"), (0.25, "cuda"), (1, "cuda")):
        trainable.run_trial(_envelope(TrialConfig(), tmp_path, gpus=gpus))
        assert seen[-1] == torch.device(expected), gpus


def test_a_ray_train_worker_trains_on_the_device_ray_train_gives_it(tmp_path, monkeypatch, cuda_visible):
    import ray.train
    import ray.train.torch

    seen = []
    assigned = torch.device("cuda", 3)  # e.g. the 4th GPU of the node, which Ray gave this worker
    monkeypatch.setattr("bvit.trial.run_trial", lambda cfg, **kw: seen.append(kw["device"]))
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 1))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: assigned)
    trainable._worker_loop({**_envelope(TrialConfig(), tmp_path, cpus=2, gpus=2, workers=2), "fault": None})
    assert seen == [assigned]


@pytest.mark.parametrize("resources,ok", [
    ({"workers": 2, "gpus": 0.5}, False), ({"workers": 2, "gpus": 1}, False), ({"workers": 4, "gpus": 3}, False),
    ({"workers": 2, "gpus": 2}, True), ({"workers": 2, "gpus": 0}, True), ({"workers": 1, "gpus": 0.25}, True),
])
def test_the_spec_refuses_data_parallel_workers_that_would_share_a_gpu(tmp_path, resources, ok):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "resources": resources}))
    if ok:
        assert load_spec(path).resources == Resources(**resources)
        return
    with pytest.raises(SpecError) as e:
        load_spec(path)
    w, g = resources["workers"], resources["gpus"]
    assert f"gpus={g:g} with workers={w} gives each data-parallel worker {g / w:g} of a GPU" in str(e.value)
    assert f"set gpus: {w} (one GPU per worker) or gpus: 0 (CPU workers)" in str(e.value)


# ---- item 1: the epoch totals are reduced on the training device ----------------------------------------

def test_epoch_totals_are_created_on_the_training_device_for_all_reduce(monkeypatch):
    reduced = []
    monkeypatch.setattr(engine.dist, "all_reduce", lambda t: reduced.append((t.device, t.dtype, tuple(t.shape))))
    meta = torch.device("meta")  # a device that is not the CPU: as a CUDA device would be under NCCL
    totals = epoch_totals(12.5, 8, device=meta, world=2)
    assert totals.device == meta and reduced == [(meta, torch.float64, (2,))]
    assert epoch_totals(12.5, 8, device=torch.device("cpu"), world=1).tolist() == [12.5, 8.0]
    assert len(reduced) == 1  # one process: nothing to reduce


class _Loaders:
    """`bvit.data.loaders.Loaders` over fixed in-memory batches."""

    def __init__(self, batches, eval_batches):
        self._batches, self._eval, self.steps_per_epoch = batches, eval_batches, len(batches)

    def train(self, epoch):
        return iter(self._batches)

    def eval(self):
        return iter(self._eval)


class _NoSchedule:
    def step_update(self, num_updates):
        pass


def _batches(n: int, *, nan_at: int | None = None, b: int = 4):
    g = torch.Generator().manual_seed(0)
    out = [(torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]
    if nan_at is not None:
        out[nan_at - 1][0][0, 0, 0, 0] = float("nan")
    return out


def _tiny_setup():
    torch.manual_seed(0)
    model = build_model(arch="bvit", width=16, steps=1, heads=2, patch_size=4, img_size=28, in_chans=1, num_classes=10)
    cfg = TrialConfig.model_validate({"optim": {"grad_clip": None, "epochs": 1, "warmup_epochs": 0}})
    return model, torch.optim.SGD(model.parameters(), lr=0.1), cfg  # SGD: reads no tensor on the host itself


def test_fit_under_two_ranks_reduces_the_totals_once_per_epoch_on_its_device(monkeypatch):
    model, opt, cfg = _tiny_setup()
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 2})})
    device = torch.device("cpu")
    one_rank, _ = fit(model, _Loaders(_batches(5), _batches(2)), opt, _NoSchedule(), cfg=cfg, device=device)
    reduced = []

    def all_reduce(t):  # the other rank saw the same: the sums double, the mean loss stays
        reduced.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(engine, "dist_info", lambda: (0, 2))
    monkeypatch.setattr(engine.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(engine.dist, "barrier", lambda: None)
    model, opt, _ = _tiny_setup()
    two_ranks, _ = fit(model, _Loaders(_batches(5), _batches(2)), opt, _NoSchedule(), cfg=cfg, device=device)
    assert reduced == [device, device]  # once per epoch, on the training device
    assert [r["train_loss"] for r in two_ranks] == [r["train_loss"] for r in one_rank]


# ---- item 5: no host read of the loss every step; divergence still stops the run, named exactly -------

class _HostReads:
    """Counts every read of a tensor's value by the host (each one waits for the device on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **kw):
                if threading.current_thread() is threading.main_thread():
                    self.count += 1
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_an_epoch_reads_the_loss_every_n_steps_not_every_step(monkeypatch):
    model, opt, cfg = _tiny_setup()
    steps = 45
    batches = _batches(steps)
    reads = _HostReads(monkeypatch)
    loss_sum, n = train_one_epoch(model, batches, opt, _NoSchedule(), cfg=cfg, device=torch.device("cpu"),
                                  epoch=1, steps_per_epoch=steps)
    monkeypatch.undo()
    # a check at steps 20 and 40 and one at the end, plus the epoch's loss sum: 4 reads, not 46
    assert reads.count == steps // engine.FINITE_CHECK_EVERY + 2 == 4
    assert math.isfinite(loss_sum) and n == 4 * steps


@pytest.mark.parametrize("nan_at", [7, 43])
def test_a_diverged_loss_stops_the_epoch_within_n_steps_naming_the_first_bad_step(nan_at):
    model, opt, cfg = _tiny_setup()
    steps = 45
    consumed = []

    def batches():
        for i, batch in enumerate(_batches(steps, nan_at=nan_at), start=1):
            consumed.append(i)
            yield batch

    with pytest.raises(TrainingError, match=rf"^the loss became non-finite \(nan\) at epoch 3, step {nan_at} "
                                            r"\(lr 0.1\); lower optim.lr"):
        train_one_epoch(model, batches(), opt, _NoSchedule(), cfg=cfg, device=torch.device("cpu"), epoch=3,
                        steps_per_epoch=steps)
    assert len(consumed) == min(steps, math.ceil(nan_at / engine.FINITE_CHECK_EVERY) * engine.FINITE_CHECK_EVERY)


# ---- items 8, 9: per-trial process state: TF32 for fp32 on CUDA, a fresh torch.compile cache ----------

def test_tf32_for_fp32_on_cuda_only_and_the_current_device_is_set(monkeypatch):
    from bvit.trial import _set_up_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    before = torch.get_float32_matmul_precision()
    try:
        _set_up_device(TrialConfig(), torch.device("cuda", 1))
        assert torch.get_float32_matmul_precision() == "high" and current == [torch.device("cuda", 1)]
        _set_up_device(TrialConfig(precision="bf16"), torch.device("cuda", 1))
        assert torch.get_float32_matmul_precision() == "highest"
        _set_up_device(TrialConfig(), torch.device("cpu"))  # a later CPU trial in the same process
        assert torch.get_float32_matmul_precision() == "highest" and len(current) == 2
    finally:
        torch.set_float32_matmul_precision(before)


def test_dynamo_is_reset_once_per_compiled_trial(fmnist_dir, monkeypatch):
    resets, compiled = [], []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)  # eager: the count is the point
    run_trial(_small_trial(fmnist_dir, compile=True), device=torch.device("cpu"))
    assert (len(resets), len(compiled)) == (1, 1)
    run_trial(_small_trial(fmnist_dir, compile=True, seed=1), device=torch.device("cpu"))
    assert (len(resets), len(compiled)) == (2, 2)
    run_trial(_small_trial(fmnist_dir), device=torch.device("cpu"))
    assert (len(resets), len(compiled)) == (2, 2)


# ---- item 6: FFCV's pass thread runs on the loader's GPU -------------------------------------------------

def test_ffcv_pass_thread_sets_the_loaders_cuda_device_before_it_runs(monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    from bvit.data.loaders import _epoch_loader_class

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(EpochIterator, "run", lambda self: calls.append(("run", None)))
    it_class = _epoch_loader_class().iterator_class
    for device, expected in ((torch.device("cuda", 1), [("set_device", torch.device("cuda", 1)), ("run", None)]),
                             (torch.device("cpu"), [("run", None)])):
        calls.clear()
        it = object.__new__(it_class)  # the thread's body alone: no FFCV file, no thread
        it.loader, it.closed, it.terminate_event = SimpleNamespace(device=device), True, threading.Event()
        it.run()
        assert calls == expected


# ---- the embedded Ray's preloading workers --------------------------------------------------------------

_PRELOAD_ASKS_CUDA = """
import glob, json, sys, torch
if sys.argv[1] == "gpu-host":  # the NVIDIA driver's device files are there
    real_glob = glob.glob
    glob.glob = lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else real_glob(pattern)
asked = []
def ask(name, value):
    def f(*a, **k):
        asked.append(name)
        return value
    return f
torch._C._cuda_getDeviceCount = ask("_cuda_getDeviceCount", 1)
torch.cuda.is_available = ask("is_available", True)
torch.cuda.device_count = ask("device_count", 1)
torch.cuda.init = ask("init", None)
torch.cuda._lazy_init = ask("_lazy_init", None)
import orchestrator.preload
print(json.dumps({"asked": asked, "initialized": torch.cuda.is_initialized(), "ffcv": "ffcv" in sys.modules}))
"""


@pytest.mark.parametrize("host, asked, ffcv", [("gpu-host", [], False), ("cpu-host", ["is_available"], True)])
def test_a_preloading_worker_never_asks_cuda_before_ray_gives_it_its_gpus(host, asked, ffcv):
    """The embedded Ray's workers import `orchestrator.preload` as they start, before Ray sets the
    CUDA_VISIBLE_DEVICES of the trial they will run (and before a `gpus: 0` trial blanks it): CUDA reads that
    variable once, when first asked, so the preload must not ask -- not even for a device count. FFCV asks at
    import: it is preloaded only on a machine with no NVIDIA device files (where the answer fixes nothing)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PRELOAD_ASKS_CUDA, host], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"asked": asked, "initialized": False, "ffcv": ffcv}
