"""bViT: recurrent-depth Vision Transformers -- the science half of bvit-sweep (no Ray, no MLflow).

Importing `bvit` registers the `bvit_*` models with timm.
"""
from bvit.model import BViT, build_model, count_flops, count_params

__all__ = ["BViT", "build_model", "count_flops", "count_params"]
__version__ = "0.1.0"
