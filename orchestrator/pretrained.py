"""The checkpoints fine-tuning trials start from, found and checked on the launching machine before any trial.

    pretrained = resolve_pretrained(configs, data_paths, cwd=Path.cwd(), source=str(spec_path))

`finetune.checkpoint` names a checkpoint.pt, a directory holding one (`bvit-sweep train --checkpoint-dir`), or a
sweep directory (`<storage>/<name>`): then the last checkpoint of its best finished trial. Every problem (a
missing checkpoint, data at another image size than the one it was pretrained at) is one line, all together.
"""
from __future__ import annotations

from pathlib import Path

from bvit.config import ModelConfig, TrialConfig
from orchestrator.envelope import Pretrained
from orchestrator.errors import UserError
from orchestrator.results import best_checkpoint, collect_trials
from orchestrator.spec.load import SNAPSHOT

__all__ = ["resolve_pretrained"]


def resolve_pretrained(trials: list[TrialConfig], data_paths: dict[str, str], *, cwd: Path,
                       source: str) -> Pretrained:
    """For fine-tuning trials: {(spec checkpoint, spec data path) -> (absolute checkpoint.pt, the model the
    trial runs: the checkpoint's, with a head for the data's classes)}.

    `finetune.checkpoint` names a checkpoint.pt, a directory holding one (`bvit-sweep train --checkpoint-dir`),
    or a sweep directory (`<storage>/<name>`): then the last checkpoint of its best finished trial.

    Checks, before any trial starts, that each checkpoint exists and that the data it is fine-tuned on has
    the image size and channels it was pretrained at. Each checkpoint and data set is read once.
    """
    if all(t.finetune is None for t in trials):
        return {}  # without fine-tuning trials the launcher never imports torch (seconds on a small CPU)
    from bvit.checkpoint import checkpoint_config
    from bvit.data.format import load_metadata

    checkpoints: dict[str, tuple[Path, ModelConfig] | None] = {}
    out: dict[tuple[str, str], tuple[str, ModelConfig]] = {}
    problems: list[str] = []
    for ckpt, data in sorted({(t.finetune.checkpoint, t.data.path) for t in trials if t.finetune is not None}):
        if ckpt not in checkpoints:
            path = Path(ckpt) if Path(ckpt).is_absolute() else cwd / ckpt
            try:
                path = _best_of_sweep(path) if (path / SNAPSHOT).exists() else path
                file, pretrained = checkpoint_config(path)
                checkpoints[ckpt] = (file.resolve(), pretrained.model)
            except (FileNotFoundError, ValueError) as e:
                checkpoints[ckpt] = None
                problems.append(f"{source}: finetune.checkpoint: {e}; pretrain one first: "
                                "`bvit-sweep launch SPEC` (then finetune.checkpoint: <storage>/<name>, the sweep's "
                                "best trial) or `bvit-sweep train SPEC --checkpoint-dir DIR` (then DIR)")
        if checkpoints[ckpt] is None:
            continue
        file, model = checkpoints[ckpt]
        meta = load_metadata(data_paths[data])
        if tuple(meta["image_shape"]) != (model.in_chans, model.img_size, model.img_size):
            c, h, w = meta["image_shape"]
            problems.append(f"{source}: data.path {data} holds {c}x{h}x{w} images but {ckpt} was pretrained on "
                            f"{model.in_chans}x{model.img_size}x{model.img_size}; fine-tune on data prepared at "
                            "that size")
            continue
        out[(ckpt, data)] = (str(file), model.model_copy(update={"num_classes": meta["num_classes"]}))
    if problems:
        raise UserError(problems)
    return out


def _best_of_sweep(sweep_dir: Path) -> Path:
    """The last checkpoint of a sweep's best finished trial (highest final test top-1)."""
    best = best_checkpoint(sweep_dir, collect_trials(sweep_dir))
    if best is None:
        raise FileNotFoundError(f"{sweep_dir}: the sweep has no finished trial with a checkpoint yet")
    print(f"finetune.checkpoint {sweep_dir}: the sweep's best trial {best[0]} ({best[1]})")
    return best[1]
