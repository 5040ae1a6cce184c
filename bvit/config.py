"""One trial's configuration: a frozen, validated pydantic model (data, not code).

Defaults describe a small bViT on Fashion-MNIST that trains in minutes on a 2-core CPU. Every field
carries a one-line description; impossible combinations fail validation naming the field.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bvit.archs import ARCH_OPTIONS, ARCHS, get_arch

__all__ = ["ADDED_FIELDS", "CHECKPOINT_NAME", "FINETUNED_NAME", "PHASES", "ModelConfig", "DataConfig", "OptimConfig", "FinetuneConfig", "FinetuneMethod", "TrialConfig"]

CHECKPOINT_NAME = "checkpoint.pt"  # what `bvit.trial.run_trial` writes into its checkpoint_dir each epoch
FINETUNED_NAME = "finetuned.pt"  # what `bvit.trial.finetune(out=DIR)` writes into DIR
FinetuneMethod = Literal["full", "linear", "bitfit", "lora-shared", "lora-step"]
PHASES = ("phase_start_s", "phase_import_s", "phase_model_s", "phase_data_s", "phase_compile_s",
          "phase_first_step_s", "phase_train_s", "phase_eval_s", "phase_checkpoint_s", "phase_report_s")
"""Where a trial's time goes (seconds, in its records), in the order it is spent: the trial's start (a fresh
process: since its creation; a reused one: since its last trial ended) and imports (set by a sweep's
trainable), model build, data open, FFCV pipeline compile (`bvit.trial`), then per epoch (`bvit.engine.fit`).
`phase_first_step_s` is the first part of `phase_train_s`, not added to it."""


ADDED_FIELDS: dict[str, Any] = {"model.relax_rank": 0}
"""Fields added after trial ids were first committed (results/*/trials.csv), and the value they implicitly had
before; `TrialConfig.trial_id` leaves a field out while it holds that value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # lr: .inf is not a number to train with


class ModelConfig(_Frozen):
    arch: str = Field("bvit", description=f"one of {', '.join(ARCHS)} (bvit.archs): bvit applies one block `steps` "
                                          "times, vit has `steps` distinct blocks, rbvit relaxes bvit's block per step")
    width: int = Field(128, gt=0, description="embedding dimension of every token")
    steps: int = Field(6, ge=1, le=256, description="recurrent steps (bvit) or depth (vit)")
    heads: int = Field(4, ge=1, description="attention heads; width must be divisible by heads")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden size / width")
    patch_size: int = Field(4, ge=1, description="side of a square patch, in pixels")
    img_size: int = Field(28, ge=1, description="side of the (square) input image, in pixels")
    in_chans: int = Field(1, ge=1, description="input channels (1 for Fashion-MNIST, 3 for RGB)")
    num_classes: int = Field(10, ge=2, description="classifier outputs")
    global_pool: Literal["token", "avg"] = Field("token", description="class token or mean of patch tokens")
    step_embed: Literal["none", "learned"] = Field("none", description="bvit, rbvit: learned per-step vector added before each step")
    relax_rank: int = Field(0, ge=0, description="rbvit: rank of each step's low-rank delta on the shared block (0: bvit)")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate (bvit: per step; vit: max of linear schedule)")
    grad_checkpointing: bool = Field(False, description="recompute activations per step in backward to save memory")

    @field_validator("arch")
    @classmethod
    def _registered(cls, arch: str) -> str:
        get_arch(arch)  # an unknown arch lists the registered ones
        return arch

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide img_size={self.img_size}")
        arch = get_arch(self.arch)
        for name in sorted(ARCH_OPTIONS - arch.options):
            if getattr(self, name) != type(self).model_fields[name].default:
                readers = sorted(a.name for a in ARCHS.values() if name in a.options)
                raise ValueError(f"{name} applies to arch {' or '.join(map(repr, readers))} only, not {self.arch!r}")
        return self


class DataConfig(_Frozen):
    path: str = Field("data/fashion-mnist", description="prepared data dir: train.beton, test.beton, meta.json")
    batch_size: int = Field(256, ge=1, description="training batch size per process (global = this x world size)")
    eval_batch_size: int = Field(1024, ge=1, description="evaluation batch size")
    augment: Literal["none", "crop-flip", "rrc-flip"] = Field(
        "crop-flip", description="none; pad-4 random crop + flip (28/32 px); random-resized-crop + flip (ImageNet-style)")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 disables)")
    train_subset: int | None = Field(None, ge=1, description="train on the first N images only (quick runs); None: all")
    num_workers: int = Field(2, ge=1, description="FFCV loader threads")


class OptimConfig(_Frozen):
    epochs: int = Field(10, ge=1, description="training epochs")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    min_lr: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay (not on norms, biases, embeddings)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length, in epochs (fractions allowed)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None disables clipping")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be shorter than epochs={self.epochs}")
        return self


class FinetuneConfig(_Frozen):
    """Fine-tune a pretrained model instead of training from scratch (see `bvit.trial`).

    A trial with this section adapts `checkpoint`'s model to the trial's data (a fresh head for its
    classes) by `method`, under the trial's optim, seed and precision; so `finetune.method` and
    `finetune.rank` can be sweep axes. The architecture comes from the checkpoint.
    """

    checkpoint: str = Field(description="pretrained checkpoint.pt, or the directory holding it")
    method: FinetuneMethod = Field(
        "lora-shared", description="what trains: full, linear (head), bitfit (biases+norms), lora-shared, lora-step")
    rank: int = Field(8, ge=1, description="LoRA rank (lora-* methods; others ignore it)")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: updates are scaled by alpha / rank")

    @model_validator(mode="before")
    @classmethod
    def _lora_only(cls, data: Any) -> Any:
        """rank and alpha mean nothing without LoRA: reset them, so `method x rank` grids hold each non-LoRA
        trial once (one id) instead of once per rank."""
        if isinstance(data, dict) and not str(data.get("method", "lora-shared")).startswith("lora"):
            return {k: v for k, v in data.items() if k not in ("rank", "alpha")}
        return data


class TrialConfig(_Frozen):
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture")
    data: DataConfig = Field(default_factory=DataConfig, description="prepared data and loading")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (CPU and CUDA)")
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, ge=0, description="seeds torch, numpy, python and the data order")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    finetune: FinetuneConfig | None = Field(None, description="fine-tune a pretrained checkpoint instead (None: train from scratch)")

    def _dump(self) -> dict[str, Any]:
        """The config as JSON data; an unset `finetune` is left out (ids of from-scratch trials never change)."""
        return self.model_dump(mode="json", exclude={"finetune"} if self.finetune is None else None)

    def trial_id(self) -> str:
        """Stable 10-hex-digit id of the resolved config: the same trial gets the same id in every run.

        Fields added after results were committed (`ADDED_FIELDS`) are hashed only when they differ from the
        value every earlier trial had, so those trials keep their ids."""
        dump = self._dump()
        for path, old in ADDED_FIELDS.items():
            section, name = path.split(".")
            if dump[section].get(name) == old:
                del dump[section][name]
        blob = json.dumps(dump, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def flat(self) -> dict[str, Any]:
        """Dotted-path view, e.g. {'model.width': 128, ...} (for tables and tracking params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self._dump())
        return out
