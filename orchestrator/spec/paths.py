"""What a dotted path in a spec may name, every structural problem of a spec, and the path assignment.

`axes`, `zip`, `smoke` and `bvit-sweep train --set` name TrialConfig fields by dotted path
(`model.width`); `assign` writes a value at such a path, the one way a spec (and `--set`) sets a field.
`structure_problems` reads a raw spec mapping and reports, in one run, everything field types cannot see.
"""
from __future__ import annotations

import difflib
from typing import Any

from bvit.config import TrialConfig
from orchestrator.errors import Loc, did_you_mean, field_paths, format_loc

__all__ = ["Axes", "LEAVES", "SECTIONS", "Problem", "assign", "leaf_locs", "merge", "path_problem",
           "structure_problems"]

Problem = tuple[Loc | str, str]
Axes = dict[str, list[Any]]

SECTIONS, LEAVES = field_paths(TrialConfig)  # {"": TrialConfig, "model": ModelConfig, ...}, ["model.arch", ...]

def _suggest(path: str, *, nested: bool = False) -> str:
    """` (did you mean 'model.width'?)`, or the fields a path could name. `nested`: suggest a bare name."""
    section, _, leaf = path.rpartition(".")
    if nested:
        return did_you_mean(leaf, SECTIONS[section].model_fields)
    by_leaf = {p.rpartition(".")[2]: p for p in LEAVES}
    if leaf in by_leaf:
        return f" (did you mean {by_leaf[leaf]!r}?)"
    if section and section in SECTIONS:
        return did_you_mean(leaf, SECTIONS[section].model_fields, prefix=f"{section}.")
    if close := difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7):
        return f" (did you mean {by_leaf[close[0]]!r}?)"
    return did_you_mean(section or leaf, TrialConfig.model_fields)


def path_problem(path: str) -> str | None:
    if path == "seed":
        return "list seeds in the top-level `seeds:`, not as an axis"
    if path in LEAVES:
        return None
    if not path:
        return "empty path: name a TrialConfig field, e.g. model.width"
    if path in SECTIONS:
        example = next(iter(SECTIONS[path].model_fields))
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
        elif path in SECTIONS:
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
        if (msg := path_problem(path)) is not None:
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


def structure_problems(data: dict[str, Any]) -> list[Problem]:
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



def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b` over `a`, section by section (a partial TrialConfig over another)."""
    out = dict(a)
    for k, v in b.items():
        nested = k in SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge(out[k], v) if nested else v
    return out


def assign(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set the field at dotted `path` in a partial TrialConfig tree (copying each section it enters)."""
    *sections, leaf = path.split(".")
    for key in sections:
        tree[key] = tree = dict(tree.get(key) or {})
    tree[leaf] = value


def leaf_locs(tree: dict[str, Any], *, loc: Loc, section: str = "") -> dict[str, Loc]:
    """{dotted path -> its location in the spec} for every field a partial TrialConfig tree sets."""
    out: dict[str, Loc] = {}
    for key, value in tree.items():
        path = f"{section}.{key}" if section else key
        if path in SECTIONS and isinstance(value, dict):
            out.update(leaf_locs(value, loc=loc + (key,), section=path))
        else:
            out[path] = loc + (key,)
    return out
