"""The run-time commands: launch, status, frontier, sync, ui, train. Registered on the app in cli.py.

Each is a thin Typer signature that hands off to a keyword-only function in launch.py / sweeps.py /
bvit.train; errors surface as `UserError` lines (see errors.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.errors import UserError, problems_from_validation, render

__all__ = ["launch", "status", "frontier", "sync", "ui", "train", "resolve_train_config"]

SweepArg = Annotated[str, typer.Argument(metavar="SWEEP", help="Sweep dir (<storage>/<name>), its spec file, or its name under ./runs.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the spec's, else results/<sweep>/mlflow).")]


def _echo_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console

    from orchestrator.progress import render_table
    console = Console()
    if not console.is_terminal:  # piped or logged: keep whole ids and numbers on one line
        console = Console(width=160)
    console.print(render_table(rows, title=title))


def launch(
        spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Sweep spec, e.g. `sweeps/width.yaml`.")],
        address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, the spec's, else a local Ray).")] = None,
        storage: Annotated[str | None, typer.Option(help="Ray Tune storage root (default: the spec's `storage`).")] = None,
        smoke: Annotated[bool, typer.Option("--smoke", help="Apply the spec's `smoke:` overrides (a separate <name>-smoke sweep).")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep; finished trials are not rerun.")] = False,
        force: Annotated[bool, typer.Option("--force", help="With --resume: accept a spec that changed since the sweep started.")] = False,
        tracking_uri: TrackingUri = None,
        json_out: JsonOut = False,
) -> None:
    """Run a sweep on Ray Tune (local by default), track it in MLflow, write results/SWEEP/."""
    from orchestrator.launch import launch as run

    result = run(spec_path=spec, address=address, storage=storage, smoke=smoke, resume=resume, force=force,
                 tracking_uri=tracking_uri, verbose=not json_out)
    if json_out:
        _echo_json({"sweep_dir": str(result.sweep_dir), "results_dir": str(result.results_dir),
                    "ok": result.ok, "interrupted": result.interrupted, "trials": result.trials})
    else:
        _print_table(result.trials, title=f"{result.sweep_dir.name}: results in {result.results_dir}")
        if result.interrupted:
            typer.echo(f"interrupted: continue with `bvit-sweep launch {spec} --resume`"
                       + (" --smoke" if smoke else ""), err=True)
    if not result.ok:
        raise typer.Exit(130 if result.interrupted else 1)


def status(sweep: SweepArg, json_out: JsonOut = False) -> None:
    """The trial table of a sweep, finished or not (state, epoch, best top-1, node, retries)."""
    from orchestrator.sweeps import resolve_sweep, sweep_status

    s = resolve_sweep(sweep)
    rows = sweep_status(s)
    if json_out:
        _echo_json({"sweep_dir": str(s.dir), "trials": rows})
    else:
        done = sum(r["status"] == "TERMINATED" for r in rows)
        _print_table(rows, title=f"{s.name}: {done}/{len(rows)} trials finished")


def frontier(sweep: SweepArg, tracking_uri: TrackingUri = None, json_out: JsonOut = False) -> None:
    """Accuracy-parameter frontier and recovered fraction; writes results/SWEEP/frontier.* and logs them."""
    from rich.console import Console
    from rich.table import Table

    from orchestrator.sweeps import resolve_sweep, sweep_frontier

    out = sweep_frontier(resolve_sweep(sweep), tracking_uri=tracking_uri)
    if json_out:
        _echo_json(out)
        return
    table = Table(title=f"{out['kind']} ({out['dir']})")
    cols = ["arch", "width", "steps", "params", "seeds", "top1_mean", "top1_std", "on_frontier",
            "recovered_fraction", "gap_points"]
    if out["kind"] == "transfer":
        cols = ["method", "rank", "trainable_params", "trainable_fraction", "seeds", "top1_mean", "top1_std",
                "merged_top1_mean"]
    for c in cols:
        table.add_column(c)
    for cell in out["cells"]:
        table.add_row(*(f"{cell[c]:.3f}" if isinstance(cell[c], float) and cell[c] == cell[c] else
                        ("" if cell[c] is None or cell[c] != cell[c] else str(cell[c])) for c in cols))
    Console().print(table)


def sync(sweep: SweepArg, tracking_uri: TrackingUri = None) -> None:
    """Back-fill MLflow with every epoch Ray recorded (idempotent)."""
    from orchestrator.sweeps import resolve_sweep, sweep_sync

    summary = sweep_sync(resolve_sweep(sweep), tracking_uri=tracking_uri)
    typer.echo(f"{summary['trials']} trials checked, {summary['epochs_logged']} epochs logged")


def ui(
        sweep: Annotated[str | None, typer.Argument(metavar="[SWEEP]", help="Sweep whose store to open (default: the local store under results/).")] = None,
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5000,
        host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")] = "127.0.0.1",
        tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow dashboard for a sweep's store; print the URL of its runs once it answers."""
    from orchestrator.dashboard import open_dashboard
    from orchestrator.sweeps import resolve_sweep, ui_store

    uri, experiment, log_dir = ui_store(resolve_sweep(sweep) if sweep else None, tracking_uri=tracking_uri)
    raise typer.Exit(open_dashboard(uri=uri, experiment=experiment, log_dir=log_dir, host=host, port=port,
                                    echo=typer.echo))


def resolve_train_config(spec_path: Path | None, overrides: list[str]):
    """The spec's base config (or the defaults) with `key=value` overrides (values parsed as YAML)."""
    import yaml
    from pydantic import ValidationError

    from bvit.config import TrialConfig

    tree: dict[str, Any] = {}
    source = str(spec_path) if spec_path else "--set"
    if spec_path is not None:
        from orchestrator.spec import load_spec
        tree = json.loads(json.dumps(load_spec(spec_path).base))
    from orchestrator.errors import field_paths

    valid = set(field_paths(TrialConfig)[1])  # every leaf, optional sections (finetune.*) included
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append((("--set",), f"{item!r}: expected key=value, e.g. model.width=128"))
            continue
        if key not in valid:
            problems.append((("--set", key), f"unknown field; valid: {', '.join(sorted(valid))}"))
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if problems:
        raise UserError(render(problems, source="--set"))
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(render(problems_from_validation(e), source=source)) from None


def train(
        spec: Annotated[Path | None, typer.Argument(metavar="[SPEC]", help="Take the base config of this sweep spec.")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set model.width=128 (repeatable).")] = None,
        checkpoint_dir: Annotated[Path | None, typer.Option(help="Write checkpoints here; resume if one exists.")] = None,
        json_out: JsonOut = False,
) -> None:
    """Train one trial without Ray (base config + overrides), with a progress bar."""
    from bvit.checkpoint import CheckpointError
    from bvit.datasets import DataError
    from bvit.train import TrainingError, history_json
    from bvit.train import train as run
    from bvit.transfer import preparable, prepare_known

    cfg = resolve_train_config(spec, set_ or [])
    if not Path(cfg.data.path).exists() and (name := preparable(cfg.data.path)) is not None:
        typer.echo(f"preparing {name} into {cfg.data.path}", err=True)
        prepare_known(cfg.data.path)

    def report(m: dict[str, Any]) -> None:
        if not json_out:
            typer.echo(f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}  test top-1 {m.get('test_top1', float('nan')):.2f}"
                       f"  top-5 {m.get('test_top5', float('nan')):.2f}  {m['images_per_s']:.0f} img/s  "
                       f"{m['epoch_seconds']:.1f} s")

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        result = run(cfg, report=report, checkpoint_dir=checkpoint_dir, progress=not json_out)
    except CheckpointError as e:  # bad input: a damaged, foreign or hostile checkpoint file
        raise UserError([str(e)]) from None
    except (DataError, TrainingError) as e:
        raise UserError([str(e)], code=1) from None
    except (FileNotFoundError, ValueError) as e:  # an unreadable finetune.checkpoint
        if cfg.finetune is None:
            raise
        raise UserError([f"finetune.checkpoint: {e}"]) from None
    if json_out:
        typer.echo(history_json(result))
    else:
        tuned = f" ({result['trainable_params']:,} trained by {cfg.finetune.method})" if cfg.finetune else ""
        typer.echo(f"trial {result['trial_id']}: final test top-1 {result['test_top1']:.2f} "
                   f"(best {result['best_test_top1']:.2f}), {result['params']:,} parameters{tuned}, "
                   f"{result['flops_per_image'] / 1e6:.1f} MFLOPs per image")
