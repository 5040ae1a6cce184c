"""Sweep commands: validate and plan a spec, launch it, and read a sweep back (status, frontier, sync, ui).

Thin `Annotated` signatures that hand off to keyword-only functions (orchestrator.spec, .planning,
.launch, .sweep_dir); heavy imports stay inside the bodies, so `bvit-sweep --help` starts without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import JsonOut, command, print_json
from orchestrator.errors import EXIT_FAILED

SpecFile = Annotated[Path, typer.Argument(metavar="SPEC", help="Sweep spec, e.g. `sweeps/width.yaml`.")]
SweepArg = Annotated[str, typer.Argument(metavar="SWEEP", help="Sweep dir (<storage>/<name>), its spec file, or its name under ./runs.")]
Smoke = Annotated[bool, typer.Option("--smoke", help="Apply the spec's `smoke:` overrides.")]
Bench = Annotated[bool, typer.Option(help="Time a ~1 s training benchmark here; off: a stated fixed rate.")]
AllRows = Annotated[bool, typer.Option("--all", help="Show every trial (the table stops at 200 rows).")]
TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the spec's, else results/<sweep>/mlflow).")]


def _console(width: int):
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)  # piped: keep rows on one line


def _print_table(rows: list[dict[str, Any]], title: str, max_rows: int | None = None) -> None:
    from orchestrator.tables import render_table

    _console(160).print(render_table(rows, title=title, max_rows=max_rows))


@command()
def validate(spec: SpecFile, json_out: JsonOut = False) -> None:
    """Check a spec (and its smoke variant) without running anything; say how many trials it makes. A `storage` URI
    (s3://bucket/prefix) must open and its bucket answer.

    Example: `bvit-sweep validate sweeps/width.yaml`
    """
    from orchestrator.errors import UserError
    from orchestrator.spec import validate_file
    from orchestrator.storage import storage_problems

    result = validate_file(path=spec)
    if problems := storage_problems(result.spec.storage, source=result.spec.source):  # a URI: opened and reached
        raise UserError(problems)
    if json_out:
        print_json(result.to_dict())
    else:
        if "search" in result.spec.model_fields_set:  # a search: its space, budget and reference point
            from orchestrator.strategy import describe_search

            typer.echo(f"{result.spec.source}: valid; {describe_search(result.spec)}")
        else:
            typer.echo(result.summary())


@command()
def plan(
        spec: SpecFile,
        smoke: Smoke = False,
        json_out: JsonOut = False,
        bench: Bench = True,
        all_rows: AllRows = False,
) -> None:
    """Every trial with its id, parameters, GFLOPs per image and estimated time, and the totals.

    Example: `bvit-sweep plan sweeps/width.yaml --no-bench --json`
    """
    from orchestrator.cells import design_of
    from orchestrator.planning import few_seed_comparisons, make_plan, print_plan
    from orchestrator.spec import load_spec

    loaded = load_spec(spec)
    searched = "search" in loaded.model_fields_set  # plan a search's whole space, then state its budget
    if searched:
        from orchestrator.strategy import Space, describe_search

        found = Space.of(loaded, smoke=smoke).enumerate()
    result = make_plan(spec=loaded, smoke=smoke, bench=bench, trials=found[0] if searched and found else None)
    if warning := few_seed_comparisons([t.trial for t in result.trials], design_of(result.spec, smoke=smoke)):
        typer.echo(f"warning: {warning}", err=True)
    if json_out:
        print_json(result.to_dict())
    else:
        print_plan(result, console=_console(200), max_rows=None if all_rows else 200)
    if searched:
        typer.echo(describe_search(loaded, smoke=smoke, seconds=[t.seconds for t in result.trials],
                                   concurrent=result.concurrent), err=json_out)


@command()
def launch(
        spec: SpecFile,
        address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, the spec's, else the persistent local Ray of `bvit-sweep ray up` when it runs, else an embedded local Ray; `local`: embedded).")] = None,
        storage: Annotated[str | None, typer.Option(help="Ray Tune storage root: a folder or a URI such as s3://bucket/prefix (default: the spec's `storage`).")] = None,
        smoke: Annotated[bool, typer.Option("--smoke", help="Apply the spec's `smoke:` overrides (a separate <name>-smoke sweep).")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep; finished trials are not rerun.")] = False,
        force: Annotated[bool, typer.Option("--force", help="With --resume: accept a spec that changed since the sweep started.")] = False,
        trust_state: Annotated[bool, typer.Option("--trust-state", help="With --resume: restore Ray Tune's pickled state even though this user's key did not sign it (a sweep directory from elsewhere: its pickles can run code).")] = False,
        tracking_uri: TrackingUri = None,
        json_out: JsonOut = False,
) -> None:
    """Run a sweep on Ray Tune (local by default), track it in MLflow, write results/SWEEP/.

    Exit 1 when a trial failed (after its retries), 130 when interrupted.

    Example: `bvit-sweep launch sweeps/width.yaml --smoke`
    """
    from orchestrator.launch import launch as run

    result = run(spec_path=spec, address=address, storage=storage, smoke=smoke, resume=resume, force=force,
                 trust_state=trust_state, tracking_uri=tracking_uri, verbose=not json_out)
    if json_out:
        print_json({"sweep_dir": str(result.sweep_dir), "results_dir": str(result.results_dir),
                    "ok": result.ok, "interrupted": result.interrupted, "trials": result.trials})
    else:
        _print_table(result.trials, title=f"{result.sweep_dir.name}: results in {result.results_dir}", max_rows=200)
        if result.interrupted:
            typer.echo(f"interrupted: continue with `bvit-sweep launch {spec} --resume`"
                       + (" --smoke" if smoke else ""), err=True)
    if not result.ok:
        raise typer.Exit(130 if result.interrupted else EXIT_FAILED)


@command()
def status(
        sweep: SweepArg,
        json_out: JsonOut = False,
        timing: Annotated[bool, typer.Option("--timing", help="Where the time went: each phase per trial and summed, and the launch timeline.")] = False,
        all_rows: Annotated[bool, typer.Option("--all", help="Show every trial (past 200 rows the table keeps the unfinished ones and the first finished).")] = False,
) -> None:
    """The trial table of a sweep, finished or not (state, epoch, best top-1, node, retries).

    Example: `bvit-sweep status runs/width --json`, `bvit-sweep status runs/width --timing`
    """
    from orchestrator.sweep_dir import resolve_sweep, sweep_status

    s = resolve_sweep(sweep)
    if timing:
        _print_timing(s, json_out)
        return
    rows = sweep_status(s)
    if json_out:
        print_json({"sweep_dir": str(s.dir), "trials": rows})
    else:
        done = sum(r["status"] == "TERMINATED" for r in rows)
        _print_table(rows, title=f"{s.name}: {done}/{len(rows)} trials finished", max_rows=None if all_rows else 200)


def _print_timing(s, json_out: bool = False) -> None:
    from rich.table import Table

    from bvit.config import PHASES
    from orchestrator.timing import sweep_timing

    rows, summary = sweep_timing(s.dir)
    if json_out:
        print_json({"sweep_dir": str(s.dir), "rows": rows, **summary})
        return
    short = [p.removeprefix("phase_").removesuffix("_s") for p in PHASES]
    table = Table(title=f"{s.name}: where {summary['trials']} trials spent their time (seconds)")
    for c in ["trial", "fresh process", *short]:
        table.add_column(c, justify="left" if c == "trial" else "right")
    for r in rows:
        table.add_row(r["trial_id"], "yes" if r["fresh_process"] else "reused", *(f"{r[p]:.2f}" for p in PHASES))
    total = summary["accounted_s"] or 1.0
    table.add_row("[b]all trials[/b]", f"{summary['fresh_processes']} fresh",
                  *(f"{v:.1f}" for v in summary["phases"].values()))
    table.add_row("share", "", *("" if p == "phase_first_step_s" else f"{v / total:.0%}"
                                 for p, v in summary["phases"].items()))
    _console(200).print(table)
    lines = []
    if "launch" in summary:
        t = summary["launch"]
        lines.append(f"latest launch: Ray ready after {t['ray_ready_s']:.1f} s, first trial started at "
                     f"{t['first_trial_start_s']:.1f} s, first optimizer step at {t['first_step_s']:.1f} s")
    if "span_s" in summary:
        lines.append(f"trials ran over {summary['span_s']:.0f} s; phases account for {summary['accounted_s']:.0f} s "
                     "of trial time (first_step is part of train)")
    typer.echo("\n".join(lines))


@command()
def frontier(
        sweep: Annotated[str, typer.Argument(metavar="SWEEP_OR_TRIALS_CSV", help="Sweep dir (<storage>/<name>), its spec file, its name under ./runs, or a committed results/<sweep>/trials.csv.")],
        tracking_uri: TrackingUri = None,
        json_out: JsonOut = False,
) -> None:
    """Accuracy-parameter frontier and recovered fraction with 95 % intervals; writes results/SWEEP/frontier.*,
    slope.json and logs them. Given a trials.csv, rewrites those files beside it (no Ray, no MLflow).

    Example: `bvit-sweep frontier runs/width` or `bvit-sweep frontier results/width/trials.csv`
    """
    from rich.table import Table

    from orchestrator.sweep_dir import rebuild_frontier, resolve_sweep, sweep_frontier

    if sweep.endswith(".csv"):
        out = rebuild_frontier(Path(sweep))
    else:
        out = sweep_frontier(resolve_sweep(sweep), tracking_uri=tracking_uri)
    if json_out:
        print_json(out)
        return
    table = Table(title=f"{out['kind']} ({out['dir']})")
    cols = [*out["factors"], "params", "seeds", "top1_mean", "top1_ci_low", "top1_ci_high", "on_frontier",
            "recovered_fraction", "gap_points", "gap_ci_low", "gap_ci_high", "verdict"]
    if out["kind"] == "transfer":
        cols = [*out["factors"], "trainable_params", "trainable_fraction", "seeds", "top1_mean", "top1_ci_low",
                "top1_ci_high", "merged_top1_mean", "gap_points", "gap_ci_low", "gap_ci_high", "verdict"]
    for c in cols:
        table.add_column(c)
    for cell in out["cells"]:
        table.add_row(*(f"{cell[c]:.3f}" if isinstance(cell[c], float) and cell[c] == cell[c] else
                        ("" if cell[c] is None or cell[c] != cell[c] else str(cell[c])) for c in cols))
    _console(220).print(table)
    typer.echo(out["headline"])


@command()
def sync(sweep: SweepArg, tracking_uri: TrackingUri = None) -> None:
    """Back-fill MLflow with every epoch Ray recorded (idempotent).

    Example: `bvit-sweep sync runs/width --tracking-uri http://127.0.0.1:5000`
    """
    from orchestrator.sweep_dir import resolve_sweep, sweep_sync

    summary = sweep_sync(resolve_sweep(sweep), tracking_uri=tracking_uri)
    typer.echo(f"{summary['trials']} trials checked, {summary['epochs_logged']} epochs logged")


@command()
def ui(
        sweep: Annotated[str | None, typer.Argument(metavar="[SWEEP]", help="Sweep whose store to open (default: the local store under results/).")] = None,
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5000,
        host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")] = "127.0.0.1",
        tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow dashboard for a sweep's store; print the URL of its runs once it answers.

    Example: `bvit-sweep ui runs/width --port 5000`
    """
    from orchestrator.dashboard import open_dashboard
    from orchestrator.sweep_dir import resolve_sweep, ui_store

    uri, experiment, log_dir = ui_store(resolve_sweep(sweep) if sweep else None, tracking_uri=tracking_uri)
    raise typer.Exit(open_dashboard(uri=uri, experiment=experiment, log_dir=log_dir, host=host, port=port,
                                    echo=typer.echo))
