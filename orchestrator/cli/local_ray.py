"""`bvit-sweep ray up | down | status`: the persistent local Ray (thin; the work is in orchestrator.local_ray)."""
from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.app import JsonOut, command, print_json, ray_app


@command(ray_app, name="up")
def up(
        num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs the head offers trials (default: all).")] = None,
        json_out: JsonOut = False,
) -> None:
    """Start a Ray head on 127.0.0.1 that outlives launches; `launch` attaches to it when given no address.

    Example: `bvit-sweep ray up`
    """
    from orchestrator.local_ray import head_file, start_head

    head = start_head(num_cpus)
    if json_out:
        print_json(head)
        return
    verb = "already running" if head.get("already_running") else f"started in {head['start_s']:.1f} s"
    typer.echo(f"persistent local Ray {verb} at {head['address']} ({head['num_cpus']} CPUs; recorded in "
               f"{head_file()}); launches with no --address attach to it; stop it with `bvit-sweep ray down`")


@command(ray_app, name="down")
def down() -> None:
    """Stop the persistent local Ray (only it: any other Ray on this machine is left alone).

    Example: `bvit-sweep ray down`
    """
    from orchestrator.local_ray import stop_head

    n = stop_head()
    typer.echo(f"stopped the persistent local Ray ({n} processes)" if n else "no persistent local Ray was running")


@command(ray_app, name="status")
def status(json_out: JsonOut = False) -> None:
    """Say whether the persistent local Ray runs, where, and whether a launch from here attaches to it.

    Example: `bvit-sweep ray status`
    """
    from orchestrator.local_ray import attachable_head

    head, why = attachable_head()
    if json_out:
        print_json({"running": head is not None or why is not None, "head": head, "not_attached_because": why})
    elif head is not None:
        typer.echo(f"persistent local Ray at {head['address']} ({head['num_cpus']} CPUs): launches attach to it")
    else:
        typer.echo(why or "no persistent local Ray (start one with `bvit-sweep ray up`)")
