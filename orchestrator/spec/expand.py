"""Grid expansion: a spec's trials, resolved and validated, each problem blamed on the spec entry behind it.

Trial order is deterministic: seeds vary slowest (a sweep stopped early has covered the grid with the first
seed), then the axes in file order, then the zip groups; the last varies fastest. Each trial's id is
`TrialConfig.trial_id()` of its config as written in the spec, computed here once.
"""
from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from bvit.config import TrialConfig
from orchestrator.errors import (
    InputError,
    InputWarning,
    Loc,
    error_message,
    format_loc,
    problems_from_validation,
)
from orchestrator.spec.bounds import check_bounds
from orchestrator.spec.paths import Axes, Problem, assign, leaf_locs, merge, path_problem
from orchestrator.spec.schema import Smoke, SpecError, SweepSpec

__all__ = ["Trial", "axes_of", "config_with_overrides", "expand", "expand_trials"]


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


def axes_of(spec: SweepSpec, *, smoke: bool) -> list[_Axis]:
    """The grid's factors, slowest first: seeds, each axis in file order, each zip group."""
    s = spec.smoke if smoke else Smoke()
    seeds, seeds_loc = (s.seeds, ("smoke", "seeds")) if s.seeds is not None else (spec.seeds, ("seeds",))
    out = [_Axis(("seed",), tuple((x,) for x in seeds), (seeds_loc,))]
    for path, values in {**spec.axes, **s.axes}.items():
        out.append(_group({path: values}, ("smoke", "axes") if path in s.axes else ("axes",)))
    groups, loc = (s.zip, ("smoke", "zip")) if s.zip is not None else (spec.zip, ("zip",))
    out += [_group(group, loc + (g,)) for g, group in enumerate(groups)]
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


def expand_trials(spec: SweepSpec, *, smoke: bool = False) -> list[Trial]:
    """Every trial of the sweep, validated, in deterministic order; duplicates collapse (an `InputWarning`).

    Raises `SpecError` naming, for each problem, the axis value or base entry behind it.
    """
    base = merge(spec.base, spec.smoke.base) if smoke else spec.base
    base_sources = leaf_locs(spec.base, loc=("base",))
    if smoke:
        base_sources.update(leaf_locs(spec.smoke.base, loc=("smoke", "base")))
    axes = axes_of(spec, smoke=smoke)
    varied = {p for axis in axes for p in axis.paths}
    trials: dict[str, tuple[Trial, tuple[int, ...]]] = {}
    duplicates: list[tuple[str, str, str]] = []  # (id, where the repeat comes from, where the first does)
    problems: list[Problem] = []
    for index in itertools.product(*(range(len(axis.points)) for axis in axes)):
        tree, values = dict(base), {}
        for axis, i in zip(axes, index, strict=True):
            for path, value in zip(axis.paths, axis.points[i], strict=True):
                assign(tree, path, value)
                values[path] = value
        try:
            config = TrialConfig.model_validate(tree)
        except ValidationError as e:
            sources = dict(base_sources)
            for axis, i in zip(axes, index, strict=True):
                sources.update({p: loc + (i,) for p, loc in zip(axis.paths, axis.locs, strict=True)})
            problems += [(_blame(err, sources, varied), error_message(err)) for err in e.errors()]
            continue
        trial = Trial(config, values, config.trial_id())  # the one place a sweep computes an id
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




def config_with_overrides(base: dict[str, Any], overrides: list[str], *, source: str) -> TrialConfig:
    """`base` (a partial TrialConfig) with `path=value` overrides, values parsed as YAML, each written by
    `assign` as a spec's axes are. `InputError` lines name the override or the field behind a problem."""
    tree = merge({}, base)
    problems: list[Problem] = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            problems.append(((), f"{item!r}: expected path=value, e.g. model.width=128"))
        elif path != "seed" and (msg := path_problem(path)) is not None:
            problems.append((path, msg))
        else:
            check_bounds(raw, source=f"--set {path}")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            assign(tree, path, value)
    if problems:
        raise InputError(problems, source="--set")
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as e:
        raise InputError(problems_from_validation(e, model=TrialConfig), source=source) from None
