"""Analyse trained checkpoints (the measurements are bvit.analysis') and log them to the trials' MLflow runs.

    results = run_analysis(targets=["runs/width/<trial>", "runs/width/<vit-trial>"], out=Path("analysis"))
    log_analysis(results, out=Path("analysis"), uri="sqlite:///results/width/mlflow/mlflow.db")

`run_analysis` writes `analysis.json` ({label: result}), `importance.json` ({label: step-specific pruning
matrix, labels, rank correlations}) and six PNGs (every model side by side) into `out`; `log_analysis` logs them to each trial's MLflow run, found by the trial id the checkpoint holds
(tag `bvit.trial_id`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

__all__ = ["check_server", "checkpoint_trial_id", "log_analysis", "resolve_checkpoint", "run_analysis"]

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


def checkpoint_trial_id(checkpoint: Path, cfg) -> str:
    """The trial id a checkpoint was written under (its `trial_id` entry: the sweep's id of the config as
    written); a checkpoint from before that entry existed: its config's own id."""
    from bvit.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    tid = ckpt.get("trial_id") if isinstance(ckpt, dict) else None
    return tid if isinstance(tid, str) else cfg.trial_id()


def run_analysis(*, targets: list[str], out: Path, data: Path | None = None, max_images: int | None = None,
                 stats_images: int = 512, extra_steps: int = 3, prune_images: int = 256, mlp_groups: int | None = None,
                 device: str | None = None) -> dict[str, dict[str, Any]]:
    """Analyse every checkpoint in `targets`; write `out/analysis.json`, `out/importance.json` and the plots.
    Returns {label: result}. `prune_images` test images for step-specific pruning (0: skip it), the MLP's hidden
    units in `mlp_groups` groups (default: as many as heads)."""
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
        trial_id = checkpoint_trial_id(path, cfg)
        label = f"{m.arch}-w{m.width}-T{m.steps}-{trial_id}"
        print(f"analysing {label} ({path})", file=sys.stderr)
        try:
            result = analyze(model, loaders.eval, cfg=cfg, device=dev, max_images=max_images, stats_images=stats_images,
                             extra_steps=extra_steps, prune_images=prune_images, mlp_groups=mlp_groups)
        except ValueError as e:  # e.g. MLP hidden units that do not split into --mlp-groups groups
            raise UserError(f"{path}: {e}") from e
        result.update(checkpoint=str(path), sweep_trial_id=trial_id)
        results[label] = result
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(results, indent=1) + "\n")
    if prune_images:
        (out / "importance.json").write_text(json.dumps({k: r["importance"] for k, r in results.items()}, indent=1) + "\n")
    plot_analyses(results, out=out)
    return results


def check_server(uri: str, *, timeout_s: float = 5.0) -> None:
    """A one-line `UserError` (exit 2) when `uri` is an http(s) tracking server that accepts no connection:
    said before minutes of analysis, not after them (MLflow's own client retries for minutes)."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = "nothing answers at that port" if isinstance(e, ConnectionRefusedError) else str(e) or type(e).__name__
        raise UserError(f"--tracking-uri {uri}: cannot reach the MLflow server ({reason}); start it, or leave "
                        "--tracking-uri and MLFLOW_TRACKING_URI unset to write the analysis to --out only") from None


def log_analysis(results: dict[str, dict[str, Any]], *, out: Path, uri: str) -> list[str]:
    """Log out/analysis.json, the plots and per-step metrics to each trial's MLflow run; returns one note each."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    files = [p for p in (out / "analysis.json", out / "importance.json") if p.exists()] + sorted(out.glob("*.png"))
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
        if (rho := r.get("importance", {}).get("mean_rank_correlation")) is not None:
            metrics.append(Metric("analysis_step_rank_correlation", rho, 0, 0))
        client.log_batch(rid, metrics=metrics)
        notes.append(f"{label}: logged to MLflow run {rid}")
    return notes
