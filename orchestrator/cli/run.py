"""Training commands without Ray: train one trial, fine-tune a checkpoint, analyse checkpoints.

Thin `Annotated` signatures that hand off to bvit (training) and orchestrator.analyze; bvit's errors
become exit codes through the one policy in orchestrator.cli.app.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from orchestrator.cli.app import JsonOut, command, exit_code
from orchestrator.errors import UserError


@command()
def train(
        spec: Annotated[Path | None, typer.Argument(metavar="[SPEC]", help="Take the base config of this sweep spec.")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set model.width=128 (repeatable).")] = None,
        checkpoint_dir: Annotated[Path | None, typer.Option(help="Write checkpoints here; resume if one exists.")] = None,
        json_out: JsonOut = False,
) -> None:
    """Train one trial without Ray (base config + overrides), with a progress bar.

    `--set` paths are the spec's own dotted paths. Exit 1 when training fails (e.g. the loss diverges).

    Example: `bvit-sweep train sweeps/width.yaml --set model.width=64 --set optim.epochs=3`
    """
    from bvit.data.registry import preparable, prepare_known
    from bvit.trial import history_json
    from bvit.trial import run_trial as run
    from orchestrator.spec import config_with_overrides, load_spec

    base = load_spec(spec).base if spec is not None else {}
    cfg = config_with_overrides(base, set_ or [], source=str(spec) if spec else "--set")
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
        result = run(cfg, report=report, checkpoint_dir=checkpoint_dir, progress=not json_out,
                     trial_id=cfg.trial_id())
    except (FileNotFoundError, ValueError) as e:  # an unreadable finetune.checkpoint
        if cfg.finetune is None or exit_code(e) is not None:
            raise
        raise UserError([f"finetune.checkpoint: {e}"]) from None
    if json_out:
        typer.echo(history_json(result))
    else:
        tuned = f" ({result['trainable_params']:,} trained by {cfg.finetune.method})" if cfg.finetune else ""
        typer.echo(f"trial {result['trial_id']}: final test top-1 {result['test_top1']:.2f} "
                   f"(best {result['best_test_top1']:.2f}), {result['params']:,} parameters{tuned}, "
                   f"{result['flops_per_image'] / 1e6:.1f} MFLOPs per image")


@command(name="analyze")
def analyze(
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
        prune_images: Annotated[int, typer.Option(
            "--prune-images", min=0, help="Test images for step-specific pruning (each head / MLP group off at one "
                                          "step); 0 skips it.")] = 256,
        mlp_groups: Annotated[int | None, typer.Option(
            "--mlp-groups", min=1, help="Pruning: the MLP's hidden units in G equal groups [default: as many as heads].")] = None,
        tracking_uri: Annotated[str | None, typer.Option(
            "--tracking-uri", help="MLflow store of the sweep (default: $MLFLOW_TRACKING_URI); results are logged "
                                   "to each trial's run when one exists.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the analysis as one JSON document.")] = False,
) -> None:
    """Per step: state norms, relative updates, attention entropy and distance, CKA, anytime depth / step skip
    (whole steps), and step-specific pruning (which heads and MLP groups matter at which step).

    Writes analysis.json, importance.json and six PNGs into --out, and logs them to each trial's MLflow run (found by the
    trial id the checkpoint holds) when --tracking-uri or MLFLOW_TRACKING_URI names a store holding one.

    Example: `bvit-sweep analyze runs/width/<bvit-trial> runs/width/<vit-trial> --out analysis/`
    """
    from orchestrator.analyze import check_server, log_analysis, run_analysis
    from orchestrator.tracking import store_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = store_uri(uri) if uri else None  # a bad store is refused before minutes of analysis
    if uri:
        check_server(uri)  # and a server that does not answer
    results = run_analysis(targets=targets, out=out, data=data, max_images=max_images, stats_images=stats_images,
                           extra_steps=extra_steps, prune_images=prune_images, mlp_groups=mlp_groups)
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
        typer.echo(f"{label}: top-1 {r['full']['test_top1']:.2f} %; step skip: skipping step {best['skipped'] + 1} "
                   f"costs most ({best['drop']:.2f} points); anytime depth: top-1 by steps used {anytime}")
        if (rho := r.get("importance", {}).get("mean_rank_correlation")) is not None:
            typer.echo(f"{label}: step-specific pruning: mean rank correlation of the steps' component importance "
                       f"{rho:.2f} (1: the block does the same work at every step)")
    typer.echo(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in sorted(out.glob('*.png')))}")


Method = Literal["full", "linear", "bitfit", "lora-shared", "lora-step"]


@command(name="finetune")
def finetune(
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

    A missing --data directory named after a downstream task (fmnist-a, fmnist-b, digits) is prepared first.
    Unset options take the defaults a `finetune:` trial of a sweep has (the trial config's fields).

    Example: `bvit-sweep finetune runs/pre/<trial>/checkpoint_000004 --method lora-shared --rank 8 --data data/fmnist-b`
    """
    from bvit.data.downstream import TASKS, prepare_task
    from bvit.trial import finetune as run

    try:
        if not data.exists() and data.name in TASKS:
            typer.echo(f"preparing downstream task {data.name!r} into {data}", err=True)
            prepare_task(data.name, out=data)
        result = run(
            checkpoint=checkpoint, method=method, data=data, rank=rank, alpha=alpha, epochs=epochs, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, train_subset=train_subset, seed=seed, out=out,
            report=lambda r: typer.echo(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}, "
                                        f"test top-1 {r['test_top1']:.2f} %", err=True))
    except (FileNotFoundError, ValueError) as e:  # an unreadable checkpoint (bvit's own errors: the policy)
        if exit_code(e) is not None:
            raise
        raise UserError(str(e)) from e
    if json_out:
        typer.echo(json.dumps(result))
        return
    merged = f" (merged: {result['merged_test_top1']:.2f} %)" if "merged_test_top1" in result else ""
    typer.echo(f"{method}: {result['trainable_params']:,} trainable of {result['total_params']:,} parameters "
               f"({100 * result['trainable_fraction']:.2f} %); test top-1 {result['test_top1']:.2f} %{merged}")
