"""bViT: recurrent-depth Vision Transformers -- the science half of bvit-sweep (no Ray, no MLflow).

`import bvit.models` (or touching `bvit.BViT`, `bvit.build_model`, ...) registers the `bvit_*` models
with timm. The package itself imports lazily, so the CLI and the config/spec code start without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BViT", "build_model", "count_flops", "count_params"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # PEP 562: torch and timm load on first use
    if name in __all__:
        return getattr(importlib.import_module("bvit.models"), name)
    raise AttributeError(f"module 'bvit' has no attribute {name!r}")
