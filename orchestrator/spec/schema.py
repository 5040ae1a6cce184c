"""The sweep spec's shape: frozen pydantic models, unknown keys refused (`extra="forbid"`).

A `SweepSpec` is a base `TrialConfig` (partial, merged over its defaults) plus the axes it varies and
how Ray Tune runs the trials. Field types are checked here; what a dotted path may name is checked by
`orchestrator.spec.paths`, and every trial of the grid by `orchestrator.spec.expand`.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from pydantic.functional_validators import field_validator, model_validator

from orchestrator.errors import InputError
from orchestrator.spec.paths import Axes, Problem, structure_problems
from orchestrator.spec.search import Search, search_problems

__all__ = ["METRICS", "MAX_NAME", "MAX_TRIALS", "Compare", "Convergence", "Resources", "Scheduler", "Smoke", "SpecError", "SweepSpec", "Tracking",
           "grid_factors"]

METRICS = {"test_top1": "max", "test_top5": "max", "test_loss": "min", "train_loss": "min"}  # name -> better
MAX_TRIALS = 100_000
MAX_NAME = 255 - len(".-smoke.lock")  # file names are <= 255 bytes; the name is ASCII (one byte a character)

Seed = Annotated[int, Field(ge=0)]


class SpecError(InputError):
    """An invalid spec: one `file: field: message` line per problem; exit code 2."""

    def __init__(self, problems: list[Problem], *, source: str = "<spec>") -> None:
        super().__init__(problems, source=source)

    def with_source(self, source: str) -> SpecError:
        return SpecError(self.problems, source=source)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Frozen):
    """What Ray reserves for each trial."""

    cpus: float = Field(1.0, gt=0)  # CPUs (fractions allowed)
    gpus: float = Field(0.0, ge=0)  # GPUs (fractions share one GPU between trials)
    workers: int = Field(1, ge=1)  # data-parallel workers; > 1 runs the trial as a Ray Train TorchTrainer

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> Resources:
        if self.gpus > self.workers:
            raise ValueError(f"gpus={self.gpus:g} > workers={self.workers}: each worker drives one GPU; "
                             f"set workers: {math.ceil(self.gpus)} for data parallelism")
        if self.workers > 1 and 0 < self.gpus < self.workers:
            raise ValueError(f"gpus={self.gpus:g} with workers={self.workers} gives each data-parallel worker "
                             f"{self.gpus / self.workers:g} of a GPU, so ranks would share a GPU (NCCL refuses "
                             f"two ranks on one device); set gpus: {self.workers} (one GPU per worker) or "
                             "gpus: 0 (CPU workers), or workers: 1 to share a GPU between trials")
        return self

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per training process: the trial's CPUs shared by its workers."""
        return max(1, int(self.cpus // self.workers))


class Scheduler(_Frozen):
    """Which trials run to the end: all of them (fifo), or the best after each rung (ASHA)."""

    type: Literal["fifo", "asha"] = "fifo"
    metric: Literal["test_top1", "test_top5", "test_loss", "train_loss"] = "test_top1"  # what ranks trials
    mode: Literal["max", "min"] = "max"  # default: the metric's own direction (METRICS)
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial runs before it can be stopped
    reduction_factor: float = Field(3.0, gt=1)  # asha: 1/reduction_factor of the trials go on at each rung
    max_t: int | None = Field(None, ge=1)  # asha: epochs of the last rung (None: the trials' epochs)

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" not in data and data.get("metric") in METRICS:
            return {**data, "mode": METRICS[data["metric"]]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Scheduler:
        if self.mode != (better := METRICS[self.metric]):
            raise ValueError(f"{self.metric} is better when {'larger' if better == 'max' else 'smaller'}: "
                             f"mode must be {better!r}")
        asha_only = [f for f in ("grace_period", "reduction_factor", "max_t")
                     if getattr(self, f) != type(self).model_fields[f].default]
        if self.type == "fifo" and asha_only:
            raise ValueError(f"{', '.join(asha_only)} applies to type 'asha' only")
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period={self.grace_period} exceeds max_t={self.max_t}")
        return self


class Convergence(_Frozen):
    """When a trial counts as still improving at its end (trials.csv's `still_improving`): its `metric` got
    better, between the last two epochs it was recorded at, by more than `min_gain` of its value per epoch."""

    metric: Literal["train_loss", "test_loss", "test_top1", "test_top5"] = "train_loss"  # test_*: scored epochs only
    min_gain: float = 0.01  # relative gain per epoch (0.01: the loss fell by more than 1 % in the last epoch)

    @field_validator("min_gain")
    @classmethod
    def _a_fraction(cls, gain: float) -> float:
        if not 0 <= gain < 1:
            hint = f"; for {gain:g} % write {gain / 100:g}" if 1 <= gain <= 100 else ""
            raise ValueError(f"min_gain={gain:g}: a relative gain per epoch, a fraction in [0, 1) "
                             f"(0.01: 1 % better than the epoch before){hint}")
        return gain


class Compare(_Frozen):
    """What the sweep's analysis compares (orchestrator.cells): each value of `axis` against `baseline`, within
    every cell of the other varied axes. Unset, a sweep that varies `model.arch` compares each architecture
    with its registered baseline; a sweep that varies neither gets per-cell statistics and no gaps."""

    axis: str = Field(min_length=1)  # a varied dotted path, e.g. model.step_embed
    baseline: str | int | float | bool | None  # one of that axis's values, e.g. none
    trend: str | None = Field(None, min_length=1)  # a varied numeric path: the recovered fraction's slope per doubling


class Tracking(_Frozen):
    uri: str | None = Field(None, min_length=1)  # MLflow tracking URI (None: SQLite in the results)
    experiment: str | None = Field(None, min_length=1)  # MLflow experiment (None: the spec's name)
    system_metrics_s: float = Field(10.0, ge=0)  # seconds between a trial's system-metric samples (0: none)


class Smoke(_Frozen):
    """What `--smoke` changes (big_vision's `runlocal`): a few tiny trials of the same sweep."""

    base: dict[str, Any] = {}  # partial TrialConfig merged over `base`
    axes: Axes = {}  # replaces these axes' values (a new path adds an axis)
    zip: list[Axes] | None = None  # replaces every zip group
    seeds: list[Seed] | None = Field(None, min_length=1)  # replaces `seeds`


class SweepSpec(_Frozen):
    """A sweep as data: a base trial config, the axes it varies, and how Ray Tune runs the trials."""

    name: str  # the sweep's directory under `storage` and its default MLflow experiment
    description: str = ""  # one paragraph: what the sweep tests
    base: dict[str, Any] = {}  # partial TrialConfig merged over its defaults
    axes: Axes = {}  # dotted TrialConfig path -> values; the grid is their product, in file order
    zip: list[Axes] = []  # groups of dotted paths -> equal-length lists that vary together
    seeds: list[Seed] = Field([0], min_length=1)  # one trial per seed per grid point
    resources: Resources = Field(default_factory=Resources)  # per trial
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the resources allow
    scheduler: Scheduler = Field(default_factory=Scheduler)
    max_failures: int = Field(0, ge=0)  # retries of a failed trial, from its last checkpoint
    tracking: Tracking = Field(default_factory=Tracking)
    storage: str = Field("runs", min_length=1)  # Ray Tune storage (path or URI); the sweep: storage/name
    ray_address: str | None = Field(None, min_length=1)  # Ray cluster to join (None: start a local one)
    smoke: Smoke = Field(default_factory=Smoke)  # what `--smoke` changes
    convergence: Convergence = Field(default_factory=Convergence)  # when a trial counts as still improving
    compare: Compare | None = None  # what the analysis compares (None: model.arch's arms when it is varied)
    search: Search = Field(default_factory=Search)  # how trials are chosen (orchestrator.spec.search; grid default)

    _source: str = PrivateAttr("<spec>")

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_', '-' (it names the sweep's directory)")
        if len(name) > MAX_NAME:
            raise ValueError(f"{name[:20]}... is {len(name)} characters, more than {MAX_NAME} (the sweep's lock file "
                             f"`.<name>-smoke.lock` must fit a 255-byte file name); shorten it")
        return name

    @model_validator(mode="after")
    def _structure(self) -> SweepSpec:
        raw = {"base": self.base, "axes": self.axes, "zip": self.zip, "smoke": self.smoke.model_dump()}
        if problems := structure_problems(raw):
            raise SpecError(problems)
        for smoke, where in ((False, ("axes",)), (True, ("smoke",))):
            if (n := math.prod(size for _, size in grid_factors(self, smoke=smoke))) > MAX_TRIALS:
                raise SpecError([(where, f"the grid has {n:,} trials, more than {MAX_TRIALS:,}; split it")])
        if self.compare is not None and (problems := _compare_problems(self.compare, varied_values(self))):
            raise SpecError(problems)
        if problems := search_problems(self.search, scheduler_type=self.scheduler.type, axes=self.axes,
                                       zip_groups=self.zip, seeds=self.seeds, given="search" in self.model_fields_set):
            raise SpecError(problems)
        return self

    @property
    def source(self) -> str:
        """The file this spec was loaded from (`<spec>` when built in code); error lines start with it."""
        return self._source


def varied_values(spec: SweepSpec, *, smoke: bool = False) -> dict[str, list[Any]]:
    """{dotted path: its values} of every axis and zip-group path that takes two values or more (seeds aside)."""
    s = spec.smoke if smoke else Smoke()
    out = {path: list(values) for path, values in {**spec.axes, **s.axes}.items()}
    for group in s.zip if s.zip is not None else spec.zip:
        out.update({path: list(values) for path, values in group.items()})
    return {path: values for path, values in out.items() if len({repr(v) for v in values}) > 1}


def _compare_problems(compare: Compare, varied: dict[str, list[Any]]) -> list[Problem]:
    names = ", ".join(varied) or "none"
    if compare.axis not in varied:
        return [(("compare", "axis"), f"{compare.axis!r} is not a varied axis of this sweep (varied: {names}); "
                 "compare names an axis or zip-group path with two values or more")]
    problems: list[Problem] = []
    if compare.baseline not in varied[compare.axis]:
        problems.append((("compare", "baseline"), f"{compare.baseline!r} is not a value of {compare.axis} "
                         f"(its values: {', '.join(map(str, varied[compare.axis]))})"))
    if compare.trend is not None:
        values = varied.get(compare.trend)
        if values is None or compare.trend == compare.axis:
            problems.append((("compare", "trend"), f"{compare.trend!r} is not a varied axis other than "
                             f"{compare.axis} (varied: {names})"))
        elif not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
            problems.append((("compare", "trend"), f"{compare.trend}: a trend needs positive numbers "
                             f"(its values: {', '.join(map(str, values))})"))
    return problems


def grid_factors(spec: SweepSpec, *, smoke: bool) -> list[tuple[str, int]]:
    """(name, size) of each factor of the trial count: seeds, each axis, each zip group (`(a, b)`)."""
    s = spec.smoke if smoke else Smoke()
    out = [("seeds", len(s.seeds if s.seeds is not None else spec.seeds))]
    out += [(path, len(values)) for path, values in {**spec.axes, **s.axes}.items()]
    for group in s.zip if s.zip is not None else spec.zip:
        paths = list(group)
        name = paths[0] if len(paths) == 1 else f"({', '.join(paths)})"
        out.append((name, len(next(iter(group.values()), []))))
    return out
