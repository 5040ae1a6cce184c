"""Sweep specs: a base trial config plus axes, as data (big_vision's `hyper.product`, written in YAML).

    name: width
    base: {data: {train_subset: 10000}, optim: {epochs: 6}}  # partial TrialConfig, merged over its defaults
    axes:                                     # dotted path -> values; the grid is their product
      model.arch: [bvit, vit]
      model.steps: [4, 8]
    zip:                                      # groups of paths whose equal-length lists vary together
      - {model.width: [32, 64, 128], model.heads: [2, 4, 8]}
    seeds: [0, 1]
    smoke: {base: {optim: {epochs: 1}}, axes: {model.steps: [2]}}  # what `--smoke` shrinks

One job a module: `schema` (the pydantic models), `paths` (what a dotted path may name, structural
problems, path assignment), `expand` (the grid, each trial's id, error blame), `load` (safe YAML, checks).
"""
from orchestrator.spec.expand import Trial, config_with_overrides, expand, expand_trials
from orchestrator.spec.load import Validation, load_spec, read_yaml, validate_file
from orchestrator.spec.paths import LEAVES
from orchestrator.spec.schema import (
    MAX_TRIALS,
    METRICS,
    Convergence,
    Resources,
    Scheduler,
    Smoke,
    SpecError,
    SweepSpec,
    Tracking,
)

__all__ = [
    "LEAVES", "MAX_TRIALS", "METRICS", "Convergence", "Resources", "Scheduler", "Smoke", "SpecError", "SweepSpec", "Tracking",
    "Trial", "Validation", "config_with_overrides", "expand", "expand_trials", "load_spec", "read_yaml",
    "validate_file",
]
