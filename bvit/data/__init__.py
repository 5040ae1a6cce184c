"""Data: the prepared on-disk format, one module per source, and the loaders that read it.

    format.py        the `.beton` + `meta.json` layout: `load_metadata`, `DataError`, writing helpers
    fashion_mnist.py Fashion-MNIST from the Debian package
    image_folder.py  class-folder image data sets (ImageNet layout)
    downstream.py    transfer tasks: fmnist-a, fmnist-b, digits
    registry.py      what can be prepared by name (`preparable`, `prepare_known`)
    loaders.py       FFCV train/eval loaders, deterministic in (seed, epoch) (imports torch)

Arrows point one way: sources and loaders import `format`; `registry` imports the sources. This
package imports nothing at import time beyond `format` (numpy only), so callers that only check
a prepared directory stay light.
"""
from __future__ import annotations

from bvit.data.format import DataError, load_metadata

__all__ = ["DataError", "load_metadata"]
