"""The scheduling logic at cluster scale, simulated: Ray's own multi-node test cluster with fake GPUs, a
2,000-trial grid with fractional GPUs, each trial sleeping its planned time scaled down, launched through the
real `launch()` (its callbacks, MLflow, records, results and frontier). (4 nodes x 2 fake GPUs, 0.5 GPU per trial: 16 at once). Checks that the GPUs are packed as `plan`
predicts (makespan within 10 % of the plan's estimate on the same slots) and that the launcher's CPU per
trial stays flat from the first trials to the last. Prints both figures. `make test-slow` (~15 min here).
"""
import dataclasses
import json
import os
import resource
import time

import cloudpickle
import pytest
import ray
from ray import tune

NODES, GPUS_PER_NODE, CPUS_PER_NODE = 4, 2, 4  # fake resources: the node's own CPUs are not used
GPUS_PER_TRIAL = 0.5
SLOTS = NODES * int(GPUS_PER_NODE / GPUS_PER_TRIAL)  # 16 trials at once
TRIALS = int(os.environ.get("BVIT_SIM_TRIALS", 2000))  # a multiple of 100 (knobs for trying it smaller)
# Planned seconds scaled to this mean. The launcher handles every trial's start and end (Tune's loop, MLflow,
# records) on one core: SLOTS / MEAN_SLEEP_S trials a second must stay well inside what it can do.
MEAN_SLEEP_S = float(os.environ.get("BVIT_SIM_MEAN_S", 6.0))
# No trial shorter than this: a real one pays seconds of set-up however small its model (process reuse, data
# open, first step), and the grid's smallest models would otherwise ask the launcher for SLOTS / 0.05 s trials
# a second. The plan's packing is computed with the same durations.
FLOOR_S = 3.0
WIDTHS, STEPS, LRS = list(range(8, 88, 8)), list(range(1, 11)), [1e-3 * (1 + i / 20) for i in range(TRIALS // 100)]

pytestmark = pytest.mark.slow


def _simulated(sleep_s: dict[str, float]):
    """A Tune trainable that sleeps its trial's scaled planned time and reports one epoch as a trial does."""

    def trial(config):
        import time as _time

        import ray as _ray
        env = config["trial"]
        started = _time.time()
        _time.sleep(sleep_s[env["trial_id"]])
        m = env["config"]["model"]
        top1 = 50.0 + m["width"] / 4 + m["steps"]  # a made-up but deterministic accuracy
        tune.report({"epoch": 1, "train_loss": 1.0, "test_top1": top1, "best_test_top1": top1, "test_top5": 90.0,
                     "test_loss": 1.0, "lr": env["config"]["optim"]["lr"], "trial_started_at": started,
                     "reported_at": _time.time(), "node_id": _ray.get_runtime_context().get_node_id(),
                     "retries": 0})

    return trial


class _CpuPerTrial(tune.Callback):
    """The launcher's CPU seconds (this process) at each trial's completion."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.samples.append((len(self.samples) + 1, r.ru_utime + r.ru_stime))


def test_thousands_of_trials_with_fractional_gpus_pack_as_planned(tmp_path, monkeypatch, fmnist_dir, capsys):
    import test_cluster_scale
    from ray.cluster_utils import Cluster

    import orchestrator.tuner as tuner_mod
    from orchestrator.launch import launch
    from orchestrator.planning import make_plan
    from orchestrator.records import read_records
    from orchestrator.spec import load_spec

    spec_path = tmp_path / "sim.yaml"
    spec_path.write_text(json.dumps({
        "name": "sim", "storage": str(tmp_path / "runs"),
        "base": {"model": {"width": 8, "steps": 1, "heads": 2},
                 "data": {"path": str(fmnist_dir), "batch_size": 128}, "optim": {"epochs": 1, "warmup_epochs": 0.5}},
        "axes": {"model.width": WIDTHS, "model.steps": STEPS, "optim.lr": LRS},
        "resources": {"cpus": 1, "gpus": GPUS_PER_TRIAL},
    }))
    spec = load_spec(spec_path)
    plan = make_plan(spec=spec, bench=False)
    assert len(plan.trials) == TRIALS
    scale = (MEAN_SLEEP_S - FLOOR_S) / (sum(t.seconds for t in plan.trials) / len(plan.trials))
    sleep_s = {t.trial.id: FLOOR_S + t.seconds * scale for t in plan.trials}
    simulated = [dataclasses.replace(t, seconds_per_epoch=sleep_s[t.trial.id] / t.epochs) for t in plan.trials]
    planned = dataclasses.replace(plan, trials=simulated, concurrent=SLOTS).totals()["wall_seconds"]

    cloudpickle.register_pickle_by_value(test_cluster_scale)  # the workers cannot import this test module
    cpu = _CpuPerTrial()
    monkeypatch.setattr(tuner_mod, "tune_trainable", lambda resources, *_, **__: tune.with_resources(
        _simulated(sleep_s), {"cpu": resources.cpus, "gpu": resources.gpus}))
    callbacks = tuner_mod.sweep_callbacks
    monkeypatch.setattr(tuner_mod, "sweep_callbacks", lambda *a, **kw: callbacks(*a, **kw) + [cpu])
    monkeypatch.setattr("orchestrator.launch.sweep_callbacks", tuner_mod.sweep_callbacks, raising=False)
    monkeypatch.chdir(tmp_path)

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(NODES):
            cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        cluster.wait_for_nodes()
        started = time.time()
        result = launch(spec_path=spec_path, address=cluster.address, results_root=tmp_path / "results",
                        verbose=False)
        wall = time.time() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
        cloudpickle.unregister_pickle_by_value(test_cluster_scale)

    assert result.ok and len(result.trials) == TRIALS
    records = read_records(tmp_path / "runs" / "sim")
    starts = [r.last_result["trial_started_at"] for r in records]
    ends = [r.last_result["reported_at"] for r in records]
    makespan = max(ends) - min(starts)
    nodes = {r.last_result["node_id"] for r in records}
    n, cpu_at = len(cpu.samples), dict(cpu.samples)  # CPU seconds at the k-th completion
    q = n // 4  # per trial over the second quarter vs the last (the first holds the launch's own start)
    first, last = (cpu_at[2 * q] - cpu_at[q]) / q, (cpu_at[n] - cpu_at[n - q]) / q
    with capsys.disabled():
        print(f"\n[cluster scale] {NODES} nodes x {GPUS_PER_NODE} GPUs, {GPUS_PER_TRIAL} GPU per trial = {SLOTS} "
              f"slots; {TRIALS:,} trials ({FLOOR_S:.0f} s + planned, mean {MEAN_SLEEP_S:.1f} s): makespan {makespan:.1f} s vs plan {planned:.1f} s "
              f"({makespan / planned:.3f}x); launch wall {wall:.1f} s; launcher CPU per trial {first * 1e3:.1f} ms "
              f"(2nd quarter of the trials) vs {last * 1e3:.1f} ms (last quarter): {last / first:.2f}x; nodes used {len(nodes)}",
              flush=True)
    assert len(nodes) == NODES  # every node's GPUs were used
    assert abs(makespan / planned - 1) <= 0.10, (makespan, planned)
    assert last / first <= 1.5, (first, last)  # flat: no per-trial cost that grows with the trials done
