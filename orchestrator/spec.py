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

Trial order is deterministic: seeds vary slowest (a sweep stopped early has covered the grid with the first
seed), then the axes in file order, then the zip groups; the last varies fastest. `load_spec` checks all
that needs no grid; `expand` resolves and validates every trial and names the axis value behind a problem.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic.functional_validators import field_validator, model_validator

from bvit.config import TrialConfig
from orchestrator.errors import (
    InputError,
    InputWarning,
    Loc,
    did_you_mean,
    error_message,
    field_paths,
    format_loc,
    problems_from_validation,
    read_yaml,
)

__all__ = [
    "METRICS", "MAX_TRIALS", "Resources", "Scheduler", "Smoke", "SpecError", "SweepSpec", "Tracking", "Trial",
    "Validation", "expand", "expand_trials", "load_spec", "validate_file",
]

METRICS = {"test_top1": "max", "test_top5": "max", "test_loss": "min", "train_loss": "min"}  # name -> better
MAX_TRIALS = 100_000

Problem = tuple[Loc | str, str]
Seed = Annotated[int, Field(ge=0)]
Axes = dict[str, list[Any]]


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
        return self


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


class Tracking(_Frozen):
    uri: str | None = Field(None, min_length=1)  # MLflow tracking URI (None: SQLite in the results)
    experiment: str | None = Field(None, min_length=1)  # MLflow experiment (None: the spec's name)


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

    _source: str = PrivateAttr("<spec>")

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_', '-' (it names the sweep's directory)")
        return name

    @model_validator(mode="after")
    def _structure(self) -> SweepSpec:
        raw = {"base": self.base, "axes": self.axes, "zip": self.zip, "smoke": self.smoke.model_dump()}
        if problems := _structure_problems(raw):
            raise SpecError(problems)
        for smoke, where in ((False, ("axes",)), (True, ("smoke",))):
            if (n := math.prod(len(axis.points) for axis in _axes(self, smoke=smoke))) > MAX_TRIALS:
                raise SpecError([(where, f"the grid has {n:,} trials, more than {MAX_TRIALS:,}; split it")])
        return self

    @property
    def source(self) -> str:
        """The file this spec was loaded from (`<spec>` when built in code); error lines start with it."""
        return self._source


# ---- what a dotted path may name ---------------------------------------------------------------------------

_SECTIONS, LEAVES = field_paths(TrialConfig)


def _suggest(path: str, *, nested: bool = False) -> str:
    """` (did you mean 'model.width'?)`, or the fields a path could name. `nested`: suggest a bare name."""
    section, _, leaf = path.rpartition(".")
    if nested:
        return did_you_mean(leaf, _SECTIONS[section].model_fields)
    by_leaf = {p.rpartition(".")[2]: p for p in LEAVES}
    if leaf in by_leaf:
        return f" (did you mean {by_leaf[leaf]!r}?)"
    if section and section in _SECTIONS:
        return did_you_mean(leaf, _SECTIONS[section].model_fields, prefix=f"{section}.")
    if close := difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7):
        return f" (did you mean {by_leaf[close[0]]!r}?)"
    return did_you_mean(section or leaf, TrialConfig.model_fields)


def _path_problem(path: str) -> str | None:
    if path == "seed":
        return "list seeds in the top-level `seeds:`, not as an axis"
    if path in LEAVES:
        return None
    if not path:
        return "empty path: name a TrialConfig field, e.g. model.width"
    if path in _SECTIONS:
        example = next(iter(_SECTIONS[path].model_fields))
        return f"{path!r} is a section, not a field: vary one of its fields, e.g. {path}.{example}"
    return f"not a TrialConfig field{_suggest(path)}"


def _base_problems(tree: Any, *, section: str, loc: Loc) -> list[Problem]:
    if not isinstance(tree, dict):
        what = f"{section} fields" if section else "TrialConfig fields (model, data, optim, ...)"
        return [(loc, f"expected a mapping of {what}, got {type(tree).__name__}")]
    out: list[Problem] = []
    for key, value in tree.items():
        path = f"{section}.{key}" if section else str(key)
        if not isinstance(key, str) or not key:
            out.append((loc + (str(key),), "field names are strings"))
        elif not section and key == "seed":
            out.append((loc + (key,), "list seeds in the top-level `seeds:`"))
        elif "." in key:
            head, _, rest = key.partition(".")
            out.append((loc + (key,), f"write nested fields as mappings: {head}: {{{rest}: ...}}"))
        elif path in _SECTIONS:
            out += _base_problems(value, section=path, loc=loc + (key,))
        elif path not in LEAVES:
            out.append((loc + (key,), f"unknown field{_suggest(path, nested=True)}"))
    return out


def _entries(x: Any) -> Axes:
    """The well-typed entries of an axes mapping (the rest already has a type error)."""
    if not isinstance(x, dict):
        return {}
    return {k: v for k, v in x.items() if isinstance(k, str) and isinstance(v, list)}


def _groups(x: Any) -> list[tuple[int, Axes]]:
    if not isinstance(x, list):
        return []
    return [(g, _entries(group)) for g, group in enumerate(x) if isinstance(group, dict)]


def _axes_problems(axes: Axes, *, loc: Loc) -> list[Problem]:
    out: list[Problem] = []
    for path, values in axes.items():
        if (msg := _path_problem(path)) is not None:
            out.append((loc + (path,), msg))
        elif not values:
            out.append((loc + (path,), "empty axis: give at least one value"))
    return out


def _zip_problems(groups: list[tuple[int, Axes]], *, loc: Loc) -> list[Problem]:
    out: list[Problem] = []
    for g, group in groups:
        if not group:
            out.append((loc + (g,), "empty zip group: give paths with equal-length lists of values"))
        out += _axes_problems(group, loc=loc + (g,))
        lengths = {path: len(values) for path, values in group.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{p}: {n}" for p, n in lengths.items())
            msg = f"the lists of a zip group vary together and need equal lengths, got {detail}"
            out.append((loc + (g,), msg))
    return out


def _clashes(named: list[tuple[str, Loc]]) -> list[Problem]:
    first: dict[str, Loc] = {}
    out: list[Problem] = []
    for path, loc in named:
        if path in first:
            out.append((loc, f"{path} already varies in {format_loc(first[path])}"))
        first.setdefault(path, loc)
    return out


def _named(
        axes: Axes, groups: list[tuple[int, Axes]], *, axes_loc: Loc, zip_loc: Loc,
) -> list[tuple[str, Loc]]:
    """(path, location) of every varied path, axes first."""
    return [(p, axes_loc + (p,)) for p in axes] + [(p, zip_loc + (g, p)) for g, grp in groups for p in grp]


def _structure_problems(data: dict[str, Any]) -> list[Problem]:
    """What field types cannot see: unknown fields in base, axis paths, empty axes, zip lengths, clashes.

    Reads the raw mapping and skips parts of the wrong type (they have a type error already), so that one
    run reports every problem.
    """
    smoke = data.get("smoke") if isinstance(data.get("smoke"), dict) else {}
    axes, groups = _entries(data.get("axes", {})), _groups(data.get("zip", []))
    smoke_axes, smoke_groups = _entries(smoke.get("axes", {})), _groups(smoke.get("zip"))
    out: list[Problem] = []
    for tree, loc in ((data.get("base", {}), ("base",)), (smoke.get("base", {}), ("smoke", "base"))):
        if isinstance(tree, dict):
            out += _base_problems(tree, section="", loc=loc)
    out += _axes_problems(axes, loc=("axes",)) + _zip_problems(groups, loc=("zip",))
    out += _clashes(_named(axes, groups, axes_loc=("axes",), zip_loc=("zip",)))
    out += _axes_problems(smoke_axes, loc=("smoke", "axes"))
    if smoke.get("zip") is not None:
        out += _zip_problems(smoke_groups, loc=("smoke", "zip"))
        named = _named(axes, [], axes_loc=("axes",), zip_loc=())
        named += _named({p: v for p, v in smoke_axes.items() if p not in axes}, smoke_groups,
                        axes_loc=("smoke", "axes"), zip_loc=("smoke", "zip"))
        out += _clashes(named)
    else:
        zipped = {p for _, group in groups for p in group}
        out += [(("smoke", "axes", p), f"{p} varies in a zip group; override the whole group with smoke.zip")
                for p in smoke_axes if p in zipped]
    return out


# ---- expansion ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    """One resolved trial: its config and the values of the paths the sweep varies (seed included)."""

    config: TrialConfig
    axes: dict[str, Any]
    id: str  # config.trial_id(), computed once


@dataclass(frozen=True)
class _Axis:
    paths: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]
    locs: tuple[Loc, ...]  # per path; point i of path j comes from locs[j] + (i,)


def _group(group: Axes, loc: Loc) -> _Axis:
    paths = tuple(group)
    return _Axis(paths, tuple(zip(*group.values(), strict=True)), tuple(loc + (p,) for p in paths))


def _axes(spec: SweepSpec, *, smoke: bool) -> list[_Axis]:
    s = spec.smoke if smoke else Smoke()
    seeds, seeds_loc = (s.seeds, ("smoke", "seeds")) if s.seeds is not None else (spec.seeds, ("seeds",))
    out = [_Axis(("seed",), tuple((x,) for x in seeds), (seeds_loc,))]
    for path, values in {**spec.axes, **s.axes}.items():
        out.append(_group({path: values}, ("smoke", "axes") if path in s.axes else ("axes",)))
    groups, loc = (s.zip, ("smoke", "zip")) if s.zip is not None else (spec.zip, ("zip",))
    out += [_group(group, loc + (g,)) for g, group in enumerate(groups)]
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        nested = k in _SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if nested else v
    return out


def _assign(tree: dict[str, Any], path: str, value: Any) -> None:
    *sections, leaf = path.split(".")
    for key in sections:
        tree[key] = tree = dict(tree.get(key) or {})
    tree[leaf] = value


def _leaf_locs(tree: dict[str, Any], *, loc: Loc, section: str = "") -> dict[str, Loc]:
    out: dict[str, Loc] = {}
    for key, value in tree.items():
        path = f"{section}.{key}" if section else key
        if path in _SECTIONS and isinstance(value, dict):
            out.update(_leaf_locs(value, loc=loc + (key,), section=path))
        else:
            out[path] = loc + (key,)
    return out


def _blame(err: dict[str, Any], sources: dict[str, Loc], varied: set[str]) -> Loc:
    """The spec location behind a TrialConfig error: the axis value or base entry that set the field.

    A field error goes to whoever set that field. A cross-field error (e.g. `width=100 is not divisible by
    heads=6`) goes to the field its message names first, preferring a varied one over a base entry.
    """
    loc, msg = tuple(err["loc"]), err["msg"]
    for k in range(len(loc), 0, -1):
        path = ".".join(str(p) for p in loc[:k])
        if path in sources:
            return sources[path] + loc[k:]
    prefix = ".".join(str(p) for p in loc)
    inside = [p for p in sources if not prefix or p.startswith(prefix + ".")]

    def mention(path: str) -> int:
        found = re.search(rf"\b{re.escape(path.rsplit('.', 1)[-1])}\b", msg)
        return found.start() if found else -1

    named = sorted((p for p in inside if mention(p) >= 0), key=mention)
    for pool in ([p for p in named if p in varied], named, [p for p in inside if p in varied]):
        if pool:
            return sources[pool[0]]
    return ("base",) + loc


_json = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode  # as TrialConfig.trial_id serialises
_FIELDS = {name: _json(name) for name in sorted(TrialConfig.model_fields)}  # field -> its JSON key, sorted
_TOP_SECTIONS = [s for s in _SECTIONS if s and "." not in s]  # model, data, optim, finetune
_DEFAULT_SECTIONS = [s for s in _TOP_SECTIONS if TrialConfig.model_fields[s].default_factory is not None]


class _Resolver:
    """Trial trees to (TrialConfig, id), each distinct section (model, data, optim) validated and serialised
    once: a 10,000-trial grid has a few dozen of them, and this is most of `plan`'s time."""

    def __init__(self) -> None:
        self.sections: dict[tuple[str, str], tuple[BaseModel, str] | list[dict[str, Any]]] = {}
        self.scalars: dict[tuple[type, Any], str] = {}  # top-level field value -> its JSON
        self.fast_ids: bool | None = None  # None: not yet checked against TrialConfig.trial_id

    def __call__(self, tree: dict[str, Any]) -> tuple[TrialConfig, str] | list[dict[str, Any]]:
        """The config and its id, or pydantic's errors (locations from the trial's root)."""
        parts: dict[str, Any] = {}
        fragments: dict[str, str] = {}  # section -> its JSON, as trial_id serialises it
        errors: list[dict[str, Any]] = []
        for name, value in {**{s: {} for s in _DEFAULT_SECTIONS}, **tree}.items():
            if not (name in _TOP_SECTIONS and isinstance(value, dict)):
                parts[name] = value
                continue
            key = (name, repr(value))
            if key not in self.sections:
                try:
                    section = _SECTIONS[name].model_validate(value)
                    self.sections[key] = (section, _json(section.model_dump(mode="json")))
                except ValidationError as e:
                    self.sections[key] = [{**err, "loc": (name, *err["loc"])} for err in e.errors()]
            if isinstance(entry := self.sections[key], list):
                errors += entry
            else:
                parts[name], fragments[name] = entry
        if errors:
            return errors
        try:
            config = TrialConfig.model_validate(parts)
        except ValidationError as e:
            return e.errors()
        return config, self._id(config, fragments)

    def _id(self, config: TrialConfig, fragments: dict[str, str]) -> str:
        """`config.trial_id()`, hashed from the cached section JSON; checked against it on the first trial."""
        if self.fast_ids is False:
            return config.trial_id()
        blob = ",".join(f"{key}:{fragments[k] if k in fragments else self._scalar(getattr(config, k))}"
                        for k, key in _FIELDS.items() if not (k == "finetune" and config.finetune is None))
        fast = hashlib.sha256(f"{{{blob}}}".encode()).hexdigest()[:10]
        if self.fast_ids is None:
            self.fast_ids = fast == config.trial_id()
        return fast if self.fast_ids else config.trial_id()

    def _scalar(self, value: Any) -> str:
        key = (type(value), value)  # the type too: True == 1, but their JSON differs
        if key not in self.scalars:
            self.scalars[key] = _json(value)
        return self.scalars[key]


def expand_trials(spec: SweepSpec, *, smoke: bool = False) -> list[Trial]:
    """Every trial of the sweep, validated, in deterministic order; duplicates collapse (an `InputWarning`).

    Raises `SpecError` naming, for each problem, the axis value or base entry behind it.
    """
    base = _merge(spec.base, spec.smoke.base) if smoke else spec.base
    base_sources = _leaf_locs(spec.base, loc=("base",))
    if smoke:
        base_sources.update(_leaf_locs(spec.smoke.base, loc=("smoke", "base")))
    axes = _axes(spec, smoke=smoke)
    varied = {p for axis in axes for p in axis.paths}
    resolve = _Resolver()
    trials: dict[str, tuple[Trial, tuple[int, ...]]] = {}
    duplicates: list[tuple[str, str, str]] = []  # (id, where the repeat comes from, where the first does)
    problems: list[Problem] = []
    for index in itertools.product(*(range(len(axis.points)) for axis in axes)):
        tree, values = dict(base), {}
        for axis, i in zip(axes, index, strict=True):
            for path, value in zip(axis.paths, axis.points[i], strict=True):
                _assign(tree, path, value)
                values[path] = value
        resolved = resolve(tree)
        if isinstance(resolved, list):
            sources = dict(base_sources)
            for axis, i in zip(axes, index, strict=True):
                sources.update({p: loc + (i,) for p, loc in zip(axis.paths, axis.locs, strict=True)})
            problems += [(_blame(err, sources, varied), error_message(err)) for err in resolved]
            continue
        config, trial_id = resolved
        trial = Trial(config, values, trial_id)
        if trial.id in trials:
            first = trials[trial.id][1]
            differ = [(axis.locs[0] + (i,), axis.locs[0] + (j,))
                      for axis, i, j in zip(axes, index, first, strict=True) if i != j]
            duplicates.append((trial.id, " + ".join(format_loc(a) for a, _ in differ),
                               " + ".join(format_loc(b) for _, b in differ)))
            continue
        trials[trial.id] = (trial, index)
    if problems:
        raise SpecError(problems, source=spec.source)
    for trial_id, again, first in duplicates[:5]:
        warnings.warn(f"{spec.source}: {again} gives the same trial as {first} (id {trial_id}); it runs once",
                      InputWarning, stacklevel=2)
    if len(duplicates) > 5:
        ids = ", ".join(d[0] for d in duplicates[5:10]) + (", ..." if len(duplicates) > 10 else "")
        warnings.warn(f"{spec.source}: {len(duplicates) - 5} more trials repeat earlier ones (ids {ids}); "
                      "each runs once", InputWarning, stacklevel=2)
    return [trial for trial, _ in trials.values()]


def expand(spec: SweepSpec, *, smoke: bool = False) -> list[TrialConfig]:
    """The sweep's trial configs in order (see `expand_trials`); `smoke=True` applies `spec.smoke`."""
    return [t.config for t in expand_trials(spec, smoke=smoke)]


# ---- loading -----------------------------------------------------------------------------------------------

def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec (YAML, loaded safely); `SpecError`: a `file: field: message` per problem.

    Checks all that needs no grid (types, unknown keys, axis paths, zip lengths); `expand` checks the trials.
    """
    source = str(path)
    try:
        data = read_yaml(path)
    except InputError as e:
        raise SpecError(e.problems, source=source) from None
    if data is None:
        raise SpecError([((), "the file is empty; a spec needs at least `name:`")], source=source)
    if not isinstance(data, dict):
        got = type(data).__name__
        raise SpecError([((), f"a spec is a mapping (name, base, axes, ...), got {got}")], source=source)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        problems = problems_from_validation(e, model=SweepSpec) + _structure_problems(data)
        raise SpecError(problems, source=source) from None
    except SpecError as e:
        raise e.with_source(source) from None
    spec._source = source
    return spec


@dataclass(frozen=True)
class Validation:
    """A checked spec file: the spec and its trials, normal and `--smoke`."""

    spec: SweepSpec
    trials: list[Trial]
    smoke_trials: list[Trial]

    def grid(self) -> str:
        """`seeds 2 x model.arch 2 x (model.width, model.heads) 3`: the factors of the trial count."""
        def name(axis: _Axis) -> str:
            if axis.paths == ("seed",):
                return "seeds"
            return axis.paths[0] if len(axis.paths) == 1 else f"({', '.join(axis.paths)})"

        return " x ".join(f"{name(axis)} {len(axis.points)}" for axis in _axes(self.spec, smoke=False))

    def summary(self) -> str:
        return (f"{self.spec.source}: valid: {len(self.trials)} trials ({self.grid()}); "
                f"--smoke: {len(self.smoke_trials)} trials")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.spec.source, "name": self.spec.name, "valid": True, "trials": len(self.trials),
                "smoke_trials": len(self.smoke_trials), "grid": self.grid(),
                "ids": [t.id for t in self.trials], "smoke_ids": [t.id for t in self.smoke_trials]}


def validate_file(*, path: str | Path) -> Validation:
    """Load a spec and expand it both ways, so every problem surfaces as a `SpecError` before any compute."""
    spec = load_spec(path)
    return Validation(spec, expand_trials(spec), expand_trials(spec, smoke=True))
