"""The spec's `search:` section: how a sweep chooses its trials (a full grid, or an Optuna sampler) and what
it optimises.

    search:
      algorithm: tpe                       # grid (the default: every point of axes x zip) | random | tpe | nsga2
      objectives: {test_top1: max, params: min}   # metric -> direction, from the results or static measures
      num_trials: 36                       # trials a sampler may run (a finite space smaller than this: the grid)
      seed: 0                              # the sampler's
      ranges:                              # dotted path -> integer/float range (spec axes stay categorical lists)
        model.width: {low: 8, high: 64, step: 8}
        optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      head_dim: [8, 16]                    # heads = width / head_dim; a point no head dim divides is refused
      reference_point: {test_top1: 0, params: 350000}   # hypervolume's (default: derived and printed)

Field types and ranges are checked here; `search_problems` checks the section against the rest of the spec
(paths, scheduler). An unset section is the grid, exactly as before the section existed.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.spec.paths import Problem, path_problem

__all__ = ["ALGORITHMS", "OBJECTIVES", "STATIC_OBJECTIVES", "Range", "Search", "search_problems"]

ALGORITHMS = ("grid", "random", "tpe", "nsga2")
STATIC_OBJECTIVES = {"params": "min", "flops_per_image": "min"}  # the model's, in closed form (bvit.archs)
OBJECTIVES = {"test_top1": "max", "test_top5": "max", "test_loss": "min", "train_loss": "min", **STATIC_OBJECTIVES}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Frozen):
    """An integer range (both bounds integers, `step` an integer) or a float range; `log` samples its logarithm."""

    low: int | float
    high: int | float
    step: int | float | None = Field(None, gt=0)  # grid of low, low+step, ... <= high (None: continuous)
    log: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} > high={self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs positive bounds (low={self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log: true and step are exclusive (Optuna samples a log range without a step)")
        return self

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int) or self.log)

    @property
    def values(self) -> list[Any] | None:
        """Every value of a finite range (integers, or a float range with a step); None for a continuous one."""
        if self.integer and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.integer and self.log:
            return list(range(int(self.low), int(self.high) + 1))
        if self.step is not None:
            n = math.floor((self.high - self.low) / self.step + 1e-9)
            return [self.low + i * self.step for i in range(n + 1)]
        return None


class Search(_Frozen):
    """How the sweep picks its trials; `grid` (the default) runs every point of the axes as before."""

    algorithm: Literal["grid", "random", "tpe", "nsga2"] = "grid"
    objectives: dict[str, Literal["max", "min"]] = {"test_top1": "max", "params": "min"}  # metric -> direction
    num_trials: int | None = Field(None, ge=1)  # a sampler's budget (required unless algorithm is grid)
    seed: int = Field(0, ge=0)  # the sampler's seed
    ranges: dict[str, Range] = {}  # dotted TrialConfig path -> range (a sampler's dimensions, with the axes)
    head_dim: list[int] | None = Field(None, min_length=1)  # heads = model.width / head_dim (a sampled dimension)
    reference_point: dict[str, float] | None = None  # per objective; None: derived from the space (printed)

    @model_validator(mode="after")
    def _consistent(self) -> Search:
        for metric, direction in self.objectives.items():
            if metric not in OBJECTIVES:
                raise ValueError(f"objective {metric!r}: no trial reports it (objectives: {', '.join(OBJECTIVES)})")
            if direction != OBJECTIVES[metric]:
                raise ValueError(f"objective {metric}: better when {'larger' if OBJECTIVES[metric] == 'max' else 'smaller'}"
                                 f", so its direction is {OBJECTIVES[metric]!r}")
        if not self.objectives:
            raise ValueError("objectives: name at least one (e.g. {test_top1: max, params: min})")
        if self.algorithm != "grid" and self.num_trials is None:
            raise ValueError(f"algorithm {self.algorithm}: set num_trials (the sampler's budget)")
        if self.reference_point is not None and set(self.reference_point) != set(self.objectives):
            raise ValueError(f"reference_point names {', '.join(self.reference_point) or 'nothing'}; it needs one "
                             f"value per objective ({', '.join(self.objectives)})")
        if self.head_dim is not None and any(d < 1 for d in self.head_dim):
            raise ValueError("head_dim: positive integers")
        return self

    @property
    def sampled(self) -> bool:
        return self.algorithm != "grid"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def search_problems(search: Search, *, scheduler_type: str, axes: dict[str, list[Any]], zip_groups: list,
                    seeds: list[int], given: bool) -> list[Problem]:
    """What the `search:` section cannot do with the rest of the spec, one problem a line."""
    problems: list[Problem] = []
    for path in search.ranges:
        if (msg := path_problem(path)) is not None:
            problems.append((("search", "ranges", path), msg))
        elif path in axes:
            problems.append((("search", "ranges", path), "is also an axis; give it one place (a list in axes, "
                             "or a range here)"))
    if search.head_dim is not None and "model.heads" in {*axes, *search.ranges}:
        problems.append((("search", "head_dim"), "sets model.heads from model.width; drop model.heads from "
                         "axes and ranges"))
    if not given:
        return problems
    if (search.ranges or search.head_dim) and zip_groups:
        problems.append((("search",), "zip groups and search dimensions do not mix; use head_dim for heads that "
                         "follow the width"))
    if search.sampled and len(seeds) > 1:
        problems.append((("seeds",), f"a search samples one seed's points; seeds has {len(seeds)} (run one search "
                         "per seed)"))
    if search.sampled and search.multi_objective and scheduler_type != "fifo":
        problems.append((("scheduler", "type"), f"{scheduler_type} stops trials on one metric, but this search has "
                         f"{len(search.objectives)} objectives; use scheduler: {{type: fifo}}"))
    if search.sampled and scheduler_type != "fifo" and next(iter(search.objectives)) in STATIC_OBJECTIVES:
        problems.append((("scheduler", "type"), f"{scheduler_type} needs a trained metric as the objective"))
    if not search.sampled and (search.ranges or search.head_dim) and any(
            r.values is None for r in search.ranges.values()):
        problems.append((("search", "ranges"), "a continuous range (no step) has no grid; give it a step or use "
                         "a sampler (random, tpe, nsga2)"))
    return problems
