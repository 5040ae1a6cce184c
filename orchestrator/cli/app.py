"""The one Typer app, its `data` group, the one way to register a command, and the one exit-code policy.

    @command()                          # or @command(data_app, name="verify")
    def validate(spec: SpecFile) -> None:
        \"\"\"What it does.  Example: `bvit-sweep validate sweeps/width.yaml`\"\"\"

Exit codes, for every command alike: 0 done; 2 bad input (an invalid spec, bad flags, a missing, damaged
or hostile file, data that does not fit the model); 1 a run that failed (a sweep whose trials failed, a
training run that diverged); 130 interrupted. A problem prints as one line per problem on stderr, never
a traceback. `InputWarning`s print as `warning: ...` lines on stderr, each distinct message once.
"""
from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError

from orchestrator.errors import (
    EXIT_FAILED,
    EXIT_INVALID,
    InputWarning,
    UserError,
    problems_from_validation,
    render,
)

__all__ = ["JsonOut", "app", "command", "data_app", "exit_code", "prepare_app", "print_json", "ray_app"]

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="bvit-sweep",
    help="Width x step-count sweeps of recurrent-depth Vision Transformers (bViT) vs ViT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(help="Prepare and check FFCV data sets.", no_args_is_help=True, rich_markup_mode="markdown")
prepare_app = typer.Typer(help="Write train.beton, test.beton and meta.json into --out.", no_args_is_help=True,
                          rich_markup_mode="markdown")
ray_app = typer.Typer(help="A persistent local Ray that launches attach to (no Ray start per launch).",
                      no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(data_app, name="data")
app.add_typer(ray_app, name="ray")
data_app.add_typer(prepare_app, name="prepare")

JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]

# bvit's errors by class name (importing them here would import torch into `bvit-sweep --help`).
_BAD_INPUT = {"CheckpointError", "DataError"}  # damaged, hostile or missing files; data that does not match
_FAILED_RUN = {"TrainingError"}  # the input was valid, the run failed (e.g. the loss diverged)


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error a user can act on, or None for a bug (which keeps its traceback)."""
    if isinstance(e, UserError):
        return e.code
    if isinstance(e, ValidationError):
        return EXIT_INVALID
    names = {c.__name__ for c in type(e).__mro__ if c.__module__.split(".")[0] == "bvit"}
    if names & _BAD_INPUT:
        return EXIT_INVALID
    if names & _FAILED_RUN:
        return EXIT_FAILED
    return None


def _lines(e: BaseException) -> list[str]:
    if isinstance(e, UserError):
        return e.lines
    if isinstance(e, ValidationError):
        return render(problems_from_validation(e), source=e.title)
    return [str(e)]


def _reporting(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputWarning)
            previous, shown = warnings.showwarning, set()

            def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
                if issubclass(category, InputWarning):
                    if str(message) not in shown:  # once per command, however often the input is read
                        shown.add(str(message))
                        typer.echo(f"warning: {message}", err=True)
                else:
                    previous(message, category, *rest, **kw)

            warnings.showwarning = show
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if (code := exit_code(e)) is None:
                    raise
                for line in _lines(e):
                    typer.echo(line, err=True)
                raise typer.Exit(code) from None

    return wrapper


def command(group: typer.Typer = app, *, name: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a command on `group` (default: the top-level app) under the exit-code policy."""
    def register(fn: Callable[P, R]) -> Callable[P, R]:
        wrapped = _reporting(fn)
        group.command(name=name)(wrapped)
        return wrapped

    return register


def print_json(doc: Any) -> None:
    """One JSON document on stdout: indented for a terminal, compact (and much faster) for a pipe."""
    typer.echo(json.dumps(doc, indent=2 if sys.stdout.isatty() else None, default=str))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"bvit-sweep {version('bvit-sweep')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            import bvit
            typer.echo(f"bvit-sweep {bvit.__version__}")
        raise typer.Exit()


@app.callback()
def main(
        version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = False,
) -> None:
    """Width x step-count sweeps of recurrent-depth Vision Transformers (bViT) vs ViT.

    Example: `bvit-sweep launch sweeps/width.yaml --smoke`
    """
