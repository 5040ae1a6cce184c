"""Reading a spec file: YAML as data (safe loaders only, no key given twice), then the schema's checks.

    spec = load_spec("sweeps/width.yaml")     # SpecError: one `file: field: message` line per problem
    checked = validate_file(path=...)         # the spec and its trials, normal and --smoke
    snapshot, spec = read_snapshot(sweep_dir) # the spec a sweep was launched with (its bvit_sweep.json)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import InputError, UserError, problems_from_validation
from orchestrator.spec.bounds import check_bounds, read_bounded
from orchestrator.spec.expand import Trial, expand_trials
from orchestrator.spec.paths import structure_problems
from orchestrator.spec.schema import SpecError, SweepSpec, grid_factors

__all__ = ["SNAPSHOT", "Validation", "load_spec", "read_snapshot", "read_yaml", "validate_file"]

SNAPSHOT = "bvit_sweep.json"  # in the sweep directory: the spec it was launched with, for status and resume


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no Python object tags) that also rejects a key given twice in one mapping."""


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same in libyaml's C parser: ~10x faster, with terser error messages."""


def _unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                msg = f"duplicate key {key!r} (first given on line {seen[key] + 1})"
                raise yaml.constructor.ConstructorError(None, None, msg, key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:  # unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=deep)


for _loader in (_Loader, _FastLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data, loaded safely (plain YAML only, no key given twice in one mapping).

    Raises `InputError` with one line: `file: no such file`, `file: line 3, column 7: YAML error: ...`, ...;
    a document past `bounds`' limits (bytes, depth, entries, expanded aliases) is refused before it is built.
    """
    source = str(path)
    text = read_bounded(path)
    check_bounds(text, source=source)  # before any node is built: size, depth, entries, expanded aliases
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 -- a safe loader
    except yaml.YAMLError:
        pass  # read it again in pure Python, whose messages say more (e.g. which character)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a safe loader
    except RecursionError:  # not past check_bounds' depth: a safety net only
        raise InputError([((), "nested too deeply to read")], source=source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line, column = mark.line, mark.column
        else:  # a ReaderError (a control character) knows only its offset
            before = text[:getattr(e, "position", 0)]
            line, column = before.count("\n"), len(before) - (before.rfind("\n") + 1)
        where = f"line {line + 1}, column {column + 1}"
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        if "could not determine a constructor for the tag" in problem:
            problem += " (only plain YAML is allowed: no Python object tags)"
        if context := getattr(e, "context", None):
            problem += f" ({context})"
        raise InputError([(where, f"YAML error: {problem}")], source=source) from None


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
        problems = problems_from_validation(e, model=SweepSpec) + structure_problems(data)
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
        return " x ".join(f"{name} {size}" for name, size in grid_factors(self.spec, smoke=False))

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


def read_snapshot(sweep_dir: Path) -> tuple[dict[str, Any], SweepSpec]:
    """The sweep's `bvit_sweep.json` (the spec it was launched with, its trial ids) and that spec; a one-line
    `UserError` naming the file when it is damaged."""
    path = sweep_dir / SNAPSHOT
    try:
        snapshot = json.loads(path.read_text())
        return snapshot, SweepSpec.model_validate(snapshot["spec"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSON, encoding, pydantic: ValueErrors
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError([f"{path}: damaged ({what}); it records the spec the sweep was launched with: remove it "
                         "and run `bvit-sweep launch SPEC --resume --force` to record the spec again"]) from None
