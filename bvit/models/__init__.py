"""Models: `bvit.py` (the timm-style recurrent-depth ViT and its `@register_model` variants), `rbvit.py` (its
relaxed form: a per-step low-rank delta on the shared block), `lora.py` (the per-step adapter layer) and
`factory.py` (every arm of a comparison from one `ModelConfig`, through the registry in `bvit.archs`).

Importing this package registers the `bvit_*` and `rbvit_*` models with timm.
"""
from __future__ import annotations

from bvit.models.bvit import BViT
from bvit.models.factory import build_from_config, build_model, count_flops, count_params
from bvit.models.rbvit import RBViT

__all__ = ["BViT", "RBViT", "build_model", "build_from_config", "count_params", "count_flops"]
