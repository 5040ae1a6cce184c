"""User-facing errors shared by every `bvit-sweep` command: one line per problem, an exit code, no traceback.

A problem is a location (`('axes', 'model.width', 2)`) and a message; rendered against its source file
it reads `sweeps/x.yaml: axes["model.width"][2]: width=100 is not divisible by heads=6`. Code below the
CLI raises `UserError` (or a subclass); `orchestrator.cli.app.command` turns it into those lines on stderr
and the exit code (EXIT_INVALID for bad input, EXIT_FAILED for a run that failed).
"""
from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = [
    "EXIT_FAILED", "EXIT_INVALID", "InputError", "InputWarning", "Loc", "UserError", "did_you_mean",
    "error_message", "field_paths", "format_loc", "problems_from_validation", "render",
]

EXIT_INVALID = 2  # invalid input: the same code click uses for a bad command line
EXIT_FAILED = 1  # the input was fine, the run failed (a sweep with failed trials, a diverged training run)

Loc = tuple[str | int, ...]
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UserError(Exception):
    """An error the user can fix: `lines` (one per problem) and the process exit `code`."""

    def __init__(self, lines: str | Sequence[str], *, code: int = EXIT_INVALID) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.code = code
        super().__init__("\n".join(self.lines))


class InputError(UserError):
    """Invalid input: `problems` as (location, message), rendered as `source: location: message` lines."""

    max_lines = 30  # distinct problems shown before "... and N more"

    def __init__(self, problems: Sequence[tuple[Loc | str, str]], *, source: str = "<input>") -> None:
        self.problems, self.source = list(problems), source
        lines = render(self.problems, source=source)
        if (more := len(lines) - self.max_lines) > 0:
            lines = lines[:self.max_lines] + [f"{source}: ... and {more} more problems"]
        super().__init__(lines, code=EXIT_INVALID)


class InputWarning(UserWarning):
    """A problem with the user's input that does not stop the command (e.g. a duplicated trial)."""


def format_loc(loc: Loc) -> str:
    """`('axes', 'model.width', 2)` -> `axes["model.width"][2]`; `('base', 'optim')` -> `base.optim`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


def render(problems: Iterable[tuple[Loc | str, str]], *, source: str) -> list[str]:
    """`source: location: message` lines (`source: message` for the whole file), each distinct line once."""
    lines = []
    for loc, msg in problems:
        where = loc if isinstance(loc, str) else format_loc(loc)
        lines.append((f"{source}: {where}: {msg}" if where else f"{source}: {msg}").replace("\n", " "))
    return list(dict.fromkeys(lines))


def _clean_message(msg: str) -> str:
    """Drop pydantic's `Value error, ` / `Assertion failed, ` prefixes from a validator's message."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def error_message(err: dict[str, Any], *, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as a message a user can act on, the offending value shown where it helps.

    With the validated `model`, an unknown field gets a did-you-mean from the fields valid at its location.
    """
    kind, msg = err["type"], _clean_message(err["msg"])
    if kind == "extra_forbidden":
        return "unknown field" + _known_fields(model, tuple(err["loc"]))
    if kind == "missing":
        return "required field is missing"
    if kind in ("value_error", "assertion_error") or isinstance(err.get("input"), dict):
        return msg
    shown = repr(err.get("input"))
    return f"{msg} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _known_fields(model: type[BaseModel] | None, loc: Loc) -> str:
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        model = _submodel(field.annotation) if field is not None else None
    return did_you_mean(loc[-1], model.model_fields) if model is not None and isinstance(loc[-1], str) else ""


def did_you_mean(word: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """` (did you mean 'prefix+closest'?)`, else ` (valid: a, b, c)`: a hint to append to an error message."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def field_paths(model: type[BaseModel], prefix: str = "") -> tuple[dict[str, type[BaseModel]], list[str]]:
    """The dotted paths of a nested pydantic model: {section: its model} ('' for `model`), [leaf paths]."""
    sections: dict[str, type[BaseModel]] = {prefix.rstrip("."): model}
    leaves: list[str] = []
    for name, field in model.model_fields.items():
        if (sub := _submodel(field.annotation)) is not None:
            sub_sections, sub_leaves = field_paths(sub, f"{prefix}{name}.")
            sections.update(sub_sections)
            leaves += sub_leaves
        else:
            leaves.append(prefix + name)
    return sections, leaves


def problems_from_validation(
        exc: ValidationError, *, model: type[BaseModel] | None = None, prefix: Loc = (),
) -> list[tuple[Loc, str]]:
    """One `(location, message)` per pydantic error, the location under `prefix` (see `error_message`)."""
    return [(prefix + tuple(err["loc"]), error_message(err, model=model)) for err in exc.errors()]
