"""Models: `bvit.py` (the timm-style recurrent-depth ViT and its `@register_model` variants) and
`factory.py` (both arms of a comparison from one `ModelConfig`, parameter and FLOP counts).

Importing this package registers the `bvit_*` models with timm.
"""
from __future__ import annotations

from bvit.models.bvit import BViT
from bvit.models.factory import build_from_config, build_model, count_flops, count_params

__all__ = ["BViT", "build_model", "build_from_config", "count_params", "count_flops"]
