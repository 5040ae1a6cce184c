"""`bvit-sweep analyze` and `bvit-sweep finetune` (thin; the work is in bvit.analysis and bvit.trial).

    bvit-sweep analyze runs/width/<trial>/checkpoint_000009 runs/width/<vit-trial>/checkpoint_000009 --out analysis/
    bvit-sweep finetune ckpt/checkpoint.pt --method lora-shared --rank 8 --data data/fmnist-b

`analyze` writes `analysis.json` ({label: result}) and five PNGs (every model side by side) into --out,
and logs them to each trial's MLflow run (tag `bvit.trial_id`) when --tracking-uri (or
MLFLOW_TRACKING_URI) names a store holding one. `finetune` prepares a missing --data directory named
after a downstream task (fmnist-a, fmnist-b, digits; see bvit.data.downstream) before training.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from orchestrator.errors import UserError, problems_from_validation, render, reports_errors

__all__ = ["analyze_command", "finetune_command", "prepare_transfer_command", "run_analysis", "resolve_checkpoint",
           "log_analysis"]

_TRIAL_ID = re.compile(r"^[0-9a-f]{10}$")
TAG_TRIAL = "bvit.trial_id"  # orchestrator.tracking.TAG_TRIAL, not imported from there: that module imports Ray


def resolve_checkpoint(target: str) -> Path:
    """The checkpoint file a CHECKPOINT_OR_TRIAL argument names: a checkpoint.pt, its directory, or a Ray
    Tune trial directory (its newest checkpoint_*/checkpoint.pt)."""
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            return path / "checkpoint.pt"
        found = sorted(path.glob("checkpoint_*/checkpoint.pt"))
        if found:
            return found[-1]
        raise UserError(f"{path}: no checkpoint.pt here nor in a checkpoint_*/ subdirectory")
    if _TRIAL_ID.match(target):
        raise UserError(f"{target}: looks like a trial id; pass the trial's checkpoint instead "
                        "(<storage>/<sweep>/<trial dir>/checkpoint_NNNNNN/checkpoint.pt, or the trial directory)")
    raise UserError(f"{path}: no such checkpoint file or directory")


def _trial_id_of(checkpoint: Path, fallback: str) -> str:
    """The sweep's trial id: from a Ray trial's params.json above the checkpoint, else the config's own id.

    (The sweep names a trial by the id of its config as written in the spec, before its data path is made
    absolute; the config saved in the checkpoint has the absolute path, hence a different `trial_id()`.)
    """
    for parent in list(checkpoint.parents)[:3]:
        params = parent / "params.json"
        if params.is_file():
            try:
                doc = json.loads(params.read_text())
            except ValueError:
                continue
            tid = (doc.get("run") or {}).get("trial_id") or doc.get("trial_id")
            if isinstance(tid, str):
                return tid
    return fallback


def run_analysis(*, targets: list[str], out: Path, data: Path | None = None, max_images: int | None = None,
                 stats_images: int = 512, extra_steps: int = 3, device: str | None = None) -> dict[str, dict[str, Any]]:
    """Analyse every checkpoint in `targets`; write `out/analysis.json` and the plots. Returns {label: result}."""
    import torch

    from bvit.analysis.measure import analyze
    from bvit.analysis.plots import plot_analyses
    from bvit.checkpoint import load_trained
    from bvit.data.format import DataError
    from bvit.data.loaders import make_loaders

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        path = resolve_checkpoint(target)
        try:
            model, cfg = load_trained(path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e
        data_cfg = cfg.data.model_copy(update={"path": str(data)}) if data is not None else cfg.data
        try:
            loaders = make_loaders(data_cfg, img_size=cfg.model.img_size, seed=cfg.seed, device=dev)
        except DataError as e:
            hint = "" if data is not None else " (the path recorded in the checkpoint; pass --data DIR)"
            raise UserError(f"{e}{hint}") from e
        if loaders.meta["num_classes"] != cfg.model.num_classes:
            raise UserError(f"{data_cfg.path}: {loaders.meta['num_classes']} classes, but {path} was trained on "
                            f"{cfg.model.num_classes}; pass the --data it was trained on")
        m = cfg.model
        trial_id = _trial_id_of(path, cfg.trial_id())
        label = f"{m.arch}-w{m.width}-T{m.steps}-{trial_id}"
        print(f"analysing {label} ({path})", file=sys.stderr)
        result = analyze(model, loaders.eval, cfg=cfg, device=dev, max_images=max_images,
                         stats_images=stats_images, extra_steps=extra_steps)
        result.update(checkpoint=str(path), sweep_trial_id=trial_id)
        results[label] = result
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_analyses(results, out=out)
    return results


def log_analysis(results: dict[str, dict[str, Any]], *, out: Path, uri: str) -> list[str]:
    """Log out/analysis.json, the plots and per-step metrics to each trial's MLflow run; returns one note each."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    files = [out / "analysis.json", *sorted(out.glob("*.png"))]
    notes = []
    for label, r in results.items():
        tid = r["sweep_trial_id"]
        runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_TRIAL}` = '{tid}'", max_results=1) \
            if experiments else []
        if not runs:
            notes.append(f"{label}: no MLflow run tagged {TAG_TRIAL}={tid} in {uri}; not logged")
            continue
        rid = runs[0].info.run_id
        for f in files:
            client.log_artifact(rid, str(f), artifact_path="analysis")
        metrics = [Metric("analysis_anytime_top1", p["test_top1"], 0, p["steps"]) for p in r["anytime"]]
        metrics += [Metric("analysis_skip_top1", p["test_top1"], 0, p["skipped"] + 1) for p in r["step_skip"]]
        client.log_batch(rid, metrics=metrics)
        notes.append(f"{label}: logged to MLflow run {rid}")
    return notes


@reports_errors
def analyze_command(
        targets: Annotated[list[str], typer.Argument(
            metavar="CHECKPOINT_OR_TRIAL...", show_default=False,
            help="A trial's `checkpoint.pt`, its directory, or a Tune trial directory; give a bViT and a ViT "
                 "to see them side by side.")],
        out: Annotated[Path, typer.Option("--out", help="Directory for analysis.json and the PNG plots.")] = Path(
            "analysis"),
        data: Annotated[Path | None, typer.Option(
            "--data", help="Prepared test data (default: the data.path recorded in the checkpoint).")] = None,
        max_images: Annotated[int | None, typer.Option(
            "--max-images", min=1, help="Accuracy curves on the first N test images only (default: all).")] = None,
        stats_images: Annotated[int, typer.Option(
            "--stats-images", min=1, help="Test images for norms, attention and CKA.")] = 512,
        extra_steps: Annotated[int, typer.Option(
            "--extra-steps", min=0, help="Anytime curve: steps beyond the trained T (bViT only).")] = 3,
        tracking_uri: Annotated[str | None, typer.Option(
            "--tracking-uri", help="MLflow store of the sweep (default: $MLFLOW_TRACKING_URI); results are logged "
                                   "to each trial's run when one exists.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the analysis as one JSON document.")] = False,
) -> None:
    """Per step: state norms, relative updates, attention entropy and distance, CKA, whole-step skip, anytime top-1."""
    results = run_analysis(targets=targets, out=out, data=data, max_images=max_images, stats_images=stats_images,
                           extra_steps=extra_steps)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    notes = log_analysis(results, out=out, uri=uri) if uri else [
        "no --tracking-uri (nor MLFLOW_TRACKING_URI): not logged to MLflow"]
    for note in notes:
        typer.echo(note, err=True)
    if json_out:
        typer.echo(json.dumps(results))
        return
    for label, r in results.items():
        best = max(r["step_skip"], key=lambda p: p["drop"])
        anytime = ", ".join(f"{p['steps']}:{p['test_top1']:.1f}" for p in r["anytime"])
        typer.echo(f"{label}: top-1 {r['full']['test_top1']:.2f} %; skipping step {best['skipped'] + 1} costs most "
                   f"({best['drop']:.2f} points); top-1 by steps used {anytime}")
    typer.echo(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in sorted(out.glob('*.png')))}")


Method = Literal["full", "linear", "bitfit", "lora-shared", "lora-step"]


@reports_errors
def finetune_command(
        checkpoint: Annotated[Path, typer.Argument(
            metavar="CHECKPOINT", show_default=False, help="Pretrained `checkpoint.pt` (or its directory).")],
        method: Annotated[Method, typer.Option(
            "--method", show_default=False, help="Which parameters train: full, linear (head only), bitfit "
                                                 "(biases + head), lora-shared (one LoRA on the shared block), "
                                                 "lora-step (one LoRA per step).")],
        data: Annotated[Path, typer.Option(
            "--data", show_default=False, help="Prepared downstream data; a missing directory named fmnist-a, "
                                               "fmnist-b or digits is prepared first.")],
        rank: Annotated[int | None, typer.Option(
            "--rank", min=1, help="LoRA rank [default: finetune.rank's].")] = None,
        alpha: Annotated[float | None, typer.Option(
            "--alpha", min=0.0, help="LoRA scale: updates x alpha / rank [default: finetune.alpha's].")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="[default: optim.epochs's]")] = None,
        lr: Annotated[float | None, typer.Option(
            "--lr", min=0.0, help="Peak AdamW learning rate [default: optim.lr's].")] = None,
        weight_decay: Annotated[float | None, typer.Option(
            "--weight-decay", min=0.0, help="[default: optim.weight_decay's]")] = None,
        batch_size: Annotated[int | None, typer.Option(
            "--batch-size", min=1, help="[default: data.batch_size's]")] = None,
        train_subset: Annotated[int | None, typer.Option(
            "--train-subset", min=1, help="Fine-tune on the first N training images only.")] = None,
        seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
        out: Annotated[Path | None, typer.Option(
            "--out", help="Save the adapted weights and the result to OUT/finetuned.pt.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Fine-tune a pretrained model on a downstream task; report trainable parameters and test top-1.

    Unset options take the defaults a `finetune:` trial of a sweep has (the trial config's fields).
    """
    from pydantic import ValidationError

    from bvit.data.downstream import TASKS, prepare_task
    from bvit.data.format import DataError
    from bvit.engine import TrainingError
    from bvit.trial import finetune

    try:
        if not data.exists() and data.name in TASKS:
            typer.echo(f"preparing downstream task {data.name!r} into {data}", err=True)
            prepare_task(data.name, out=data)
        result = finetune(
            checkpoint=checkpoint, method=method, data=data, rank=rank, alpha=alpha, epochs=epochs, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, train_subset=train_subset, seed=seed, out=out,
            report=lambda r: typer.echo(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}, "
                                        f"test top-1 {r['test_top1']:.2f} %", err=True))
    except ValidationError as e:
        raise UserError(render(problems_from_validation(e), source="finetune")) from e
    except (DataError, TrainingError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    if json_out:
        typer.echo(json.dumps(result))
        return
    merged = f" (merged: {result['merged_test_top1']:.2f} %)" if "merged_test_top1" in result else ""
    typer.echo(f"{method}: {result['trainable_params']:,} trainable of {result['total_params']:,} parameters "
               f"({100 * result['trainable_fraction']:.2f} %); test top-1 {result['test_top1']:.2f} %{merged}")


@reports_errors
def prepare_transfer_command(
        task: Annotated[Literal["fmnist-a", "fmnist-b", "digits"], typer.Argument(
            show_default=False, help="fmnist-a / fmnist-b: Fashion-MNIST classes 0-4 / 5-9; digits: scikit-learn "
                                     "8x8 digits upsampled to 28x28.")],
        out: Annotated[Path, typer.Option("--out", show_default=False, help="Output directory.")],
        force: Annotated[bool, typer.Option("--force", help="Rewrite even when up to date.")] = False,
) -> None:
    """A downstream (transfer) task as a prepared data directory."""
    from bvit.data.downstream import prepare_task
    from bvit.data.format import DataError

    try:
        meta = prepare_task(task, out=out, force=force)
    except DataError as e:
        raise UserError(str(e)) from e
    typer.echo(f"{out}: {meta['status']}; {meta['train_count']:,} train / {meta['test_count']:,} test, "
               f"{meta['num_classes']} classes ({', '.join(meta['class_names'])})")
