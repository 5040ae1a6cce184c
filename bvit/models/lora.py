"""Low-rank adapters on a Linear, one per recurrent step: the layer that relaxed recursion trains with the block
(`bvit.models.rbvit`) and that parameter-efficient fine-tuning trains alone (`bvit.peft`, Hu et al. 2021).

    qkv = LoRALinear(block.attn.qkv, rank=8, alpha=8, num_adapters=T)   # T (A, B) pairs; qkv.step picks one
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRALinear", "replace_module"]


class LoRALinear(nn.Module):
    """`base(x) + (alpha / rank) * B_s A_s x` with `num_adapters` (A, B) pairs; `base` frozen unless `freeze_base`
    is False (relaxed recursion trains both).

    A: (rank, in) Kaiming-uniform, B: (out, rank) zeros, so a fresh adapter changes nothing. `step`
    selects the adapter (set by the model before each step when there is more than one).
    """

    def __init__(
            self, base: nn.Linear, *, rank: int, alpha: float, num_adapters: int = 1, freeze_base: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        if num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.num_steps = num_adapters
        self.step = 0
        p = base.weight
        self.lora_A = nn.Parameter(torch.empty(num_adapters, rank, base.in_features, device=p.device, dtype=p.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, base.out_features, rank, device=p.device, dtype=p.dtype))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if freeze_base:
            base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[self.step], self.lora_B[self.step]  # (r, in), (out, r)
        return self.base(x) + F.linear(F.linear(x, a), b) * self.scaling  # (..., in) -> (..., out)

    @torch.no_grad()
    def merged(self, adapter: int = 0) -> nn.Linear:
        """A plain Linear computing what this module computes with adapter `adapter`."""
        out = copy.deepcopy(self.base)
        out.weight += self.scaling * (self.lora_B[adapter] @ self.lora_A[adapter])  # (out, r) @ (r, in)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, adapters={self.num_steps}"


def replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put `new` where `root.get_submodule(dotted)` was."""
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
