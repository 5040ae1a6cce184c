"""Parameter-efficient fine-tuning of bViT (and, for comparison, ViT): which parameters train, and LoRA.

    model = apply_peft(model, method="lora-shared", num_classes=5, rank=8, alpha=16)
    ...train...
    merge_lora(model)          # inference: plain Linears again, same logits

Methods (every one replaces the head with a fresh `num_classes` classifier, which always trains):
  * `full`        -- every parameter trains.
  * `linear`      -- only the head (a linear probe of the frozen features).
  * `bitfit`      -- every bias (LayerNorms included) and the head (Ben Zaken et al., 2021).
  * `lora-shared` -- one LoRA (Hu et al., 2021) on the shared block's attn.qkv, attn.proj, mlp.fc1,
                     mlp.fc2; the adapted block is still applied at every step.
  * `lora-step`   -- a separate LoRA per recurrent step on the same four Linears ("relaxed recursion":
                     T adapters, T x the LoRA parameters). On a ViT, one LoRA per layer.

Per-step adapters need to know the step: the model becomes a `StepIndexedBViT`, which only overrides
`BViT._step(x, t)` to tell the block's step-indexed modules `t` before calling the original. Steps
past the trained T use the last adapter (as `step_embed` does).

Merging: `lora-shared` folds back into one plain block (W + alpha/rank * B A), so the merged model has
exactly the pre-trained architecture. `lora-step` merges into T plain blocks, one per step
(`StepBlocks`): the recursion is relaxed for good, and the merged model stores T blocks.
"""
from __future__ import annotations

import copy
from typing import get_args

import torch
import torch.nn as nn

from bvit.config import FinetuneMethod
from bvit.models.bvit import BViT
from bvit.models.lora import LoRALinear, replace_module

__all__ = [
    "METHODS", "Method", "LoRALinear", "StepBlocks", "StepIndexedBViT", "apply_peft", "merge_lora",
    "lora_modules", "LORA_TARGETS",
]

Method = FinetuneMethod  # one list of methods, shared with the trial config's `finetune.method`
METHODS: tuple[str, ...] = get_args(Method)
LORA_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class StepBlocks(nn.Module):
    """One block per step (a merged `lora-step` model): applies `blocks[step]`."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.num_steps = len(blocks)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[self.step](x)


class StepIndexedBViT(BViT):
    """A BViT whose step-indexed modules (per-step LoRA, `StepBlocks`) are told the step before each one."""

    def _step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        for m in self.block.modules():
            if isinstance(m, LoRALinear | StepBlocks) and m.num_steps > 1:
                m.step = min(t, m.num_steps - 1)
        return super()._step(x, t)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("per-step adapters cannot run under activation checkpointing: the recomputation in "
                             "the backward pass would not see the step index; train without grad_checkpointing")
        self.grad_checkpointing = False


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [model.block] if isinstance(model, BViT) else list(model.blocks)


def apply_peft(
        model: nn.Module,
        *,
        method: Method,
        num_classes: int,
        rank: int = 8,
        alpha: float = 16.0,
) -> nn.Module:
    """Prepare `model` (a BViT or timm ViT, modified in place and returned) for fine-tuning by `method`.

    The head is replaced by a fresh `num_classes` classifier; `requires_grad` marks exactly the
    parameters `method` trains (see the module docstring), so `count_params(model, trainable_only=True)`
    is the method's trainable-parameter count.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "lora-shared" and not isinstance(model, BViT):
        raise ValueError("method 'lora-shared' needs a bViT (one shared block); a ViT's layers are distinct -- "
                         "use 'lora-step' (one LoRA per layer)")
    if isinstance(model, StepIndexedBViT) or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already carries adapters; apply_peft expects a freshly loaded model")
    model.reset_classifier(num_classes)
    model.requires_grad_(method == "full")
    if method == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    if method.startswith("lora"):
        per_step = method == "lora-step" and isinstance(model, BViT)
        if per_step:
            if type(model) is not BViT:
                raise ValueError(f"lora-step needs a plain BViT, got {type(model).__name__}")
            model.grad_checkpointing = False
            model.__class__ = StepIndexedBViT
        adapters = model.num_steps if per_step else 1
        for block in _blocks(model):
            for target in LORA_TARGETS:
                base = block.get_submodule(target)
                replace_module(block, target, LoRALinear(base, rank=rank, alpha=alpha, num_adapters=adapters))
    model.get_classifier().requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """Every LoRA wrapper in `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _merge_block(block: nn.Module, adapter: int) -> nn.Module:
    block = copy.deepcopy(block)
    for name, m in list(block.named_modules()):
        if isinstance(m, LoRALinear):
            replace_module(block, name, m.merged(adapter))
    return block


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its Linear, in place; returns `model`. Logits are unchanged (up to rounding).

    One adapter per block: the block keeps its architecture. Per-step adapters (bViT `lora-step`): the
    shared block becomes `StepBlocks` of T merged blocks, one per step.
    """
    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters to merge")
    if isinstance(model, StepIndexedBViT) and any(m.num_steps > 1 for m in lora_modules(model.block)):
        model.block = StepBlocks([_merge_block(model.block, t) for t in range(model.num_steps)])
    elif isinstance(model, BViT):
        model.block = _merge_block(model.block, 0)
    else:
        model.blocks = nn.Sequential(*[_merge_block(b, 0) for b in model.blocks])
    return model
