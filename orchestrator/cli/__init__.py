"""`bvit-sweep`: the command line. Thin commands; the work happens in keyword-only functions tests can call.

One app (`orchestrator.cli.app.app`), one way to add a command: an `Annotated` signature under
`@command()` (or `@command(data_app, name=...)`) whose docstring ends with an example invocation, and a
body that imports what it needs (so `bvit-sweep --help` does not pay for torch), calls a function and
prints. Errors become exit codes by one policy (`orchestrator.cli.app`): 2 bad input, 1 a failed run.

    sweep.py   validate, plan, launch, status, frontier, sync, ui
    run.py     train, finetune, analyze (one process, no Ray)
    data.py    data prepare fashion-mnist | image-folder, data transfer, data verify
    local_ray.py  ray up | down | status (the persistent local Ray)
"""
# Importing a command module registers its commands; this order is the order `--help` lists them in.
from orchestrator.cli import sweep  # noqa: F401

# isort: split
from orchestrator.cli import run  # noqa: F401

# isort: split
from orchestrator.cli import data  # noqa: F401

# isort: split
from orchestrator.cli import local_ray  # noqa: F401
from orchestrator.cli.app import app

__all__ = ["app"]
