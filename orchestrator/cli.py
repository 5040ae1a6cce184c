"""`bvit-sweep`: the command line. Thin commands; the work happens in keyword-only functions tests can call.

Adding a command: an `Annotated` signature under `@app.command()` and `@reports_errors`, a body that
imports what it needs (so `bvit-sweep --help` does not pay for torch), calls a function and prints. A
`UserError` raised anywhere below prints one `file: field: message` line per problem on stderr and exits
with its code (2 for invalid input), never a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.errors import reports_errors

app = typer.Typer(
    name="bvit-sweep",
    help="Width x step-count sweeps of recurrent-depth Vision Transformers (bViT) vs ViT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)

SpecFile = Annotated[Path, typer.Argument(metavar="SPEC", help="Sweep spec, e.g. `sweeps/width.yaml`.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
Smoke = Annotated[bool, typer.Option("--smoke", help="Apply the spec's `smoke:` overrides.")]
Bench = Annotated[bool, typer.Option(help="Time a ~1 s training benchmark here; off: a stated fixed rate.")]
AllRows = Annotated[bool, typer.Option("--all", help="Show every trial (the table stops at 200 rows).")]


def _print_json(doc: Any) -> None:
    """One JSON document on stdout: indented for a terminal, compact (and much faster) for a pipe."""
    typer.echo(json.dumps(doc, indent=2 if sys.stdout.isatty() else None))


@app.command()
@reports_errors
def validate(spec: SpecFile, json_out: JsonOut = False) -> None:
    """Check a spec (and its smoke variant) without running anything; say how many trials it makes."""
    from orchestrator.spec import validate_file

    result = validate_file(path=spec)
    if json_out:
        _print_json(result.to_dict())
    else:
        typer.echo(result.summary())


@app.command()
@reports_errors
def plan(
        spec: SpecFile,
        smoke: Smoke = False,
        json_out: JsonOut = False,
        bench: Bench = True,
        all_rows: AllRows = False,
) -> None:
    """Every trial with its parameters, GFLOPs per image and estimated time, and the totals."""
    from rich.console import Console

    from orchestrator.plan import make_plan, print_plan
    from orchestrator.spec import load_spec

    result = make_plan(spec=load_spec(spec), smoke=smoke, bench=bench)
    if json_out:
        _print_json(result.to_dict())
    else:
        console = Console()
        if not console.is_terminal:  # piped: no terminal width to fit, keep rows on one line
            console = Console(width=200)
        print_plan(result, console=console, max_rows=None if all_rows else 200)


# ---- running and reading sweeps (orchestrator/commands.py), data, analysis --------------------------------
def _register() -> None:
    from orchestrator import commands
    from orchestrator.analysis_cmd import analyze_command, finetune_command, prepare_transfer_command
    from orchestrator.data_cmd import app as data_app

    for fn in (commands.train, commands.launch, commands.status, commands.frontier, commands.sync, commands.ui):
        app.command(name=fn.__name__)(reports_errors(fn))
    app.command(name="analyze")(reports_errors(analyze_command))
    app.command(name="finetune")(reports_errors(finetune_command))
    data_app.command("transfer")(prepare_transfer_command)
    app.add_typer(data_app, name="data")


_register()
