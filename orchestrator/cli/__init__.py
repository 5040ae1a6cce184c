"""`bvit-sweep`: the command line. Thin commands; the work happens in keyword-only functions tests can call.

One app (`orchestrator.cli.app.app`), one way to add a command: an `Annotated` signature under
`@command()` (or `@command(data_app, name=...)`) whose docstring ends with an example invocation, and a
body that imports what it needs (so `bvit-sweep --help` does not pay for torch), calls a function and
prints. Errors become exit codes by one policy (`orchestrator.cli.app`): 2 bad input, 1 a failed run.

    sweep.py   validate, plan, launch, status, frontier, sync, ui
    run.py     train, finetune, analyze (one process, no Ray)
    data.py    data prepare fashion-mnist | image-folder, data transfer, data verify
"""
from orchestrator.cli import data, run, sweep  # noqa: F401  (registers the commands)
from orchestrator.cli.app import app

__all__ = ["app"]
