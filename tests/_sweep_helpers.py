"""Small sweep specs on the real Fashion-MNIST, for the launcher and tracking tests."""
import json
from pathlib import Path

import yaml

TINY = {
    "model": {"width": 32, "steps": 2, "heads": 2},
    "data": {"train_subset": 1024, "batch_size": 128, "num_workers": 1},
    "optim": {"epochs": 2, "warmup_epochs": 0.5},
}


def write_spec(path: Path, fmnist_dir: Path, *, name="t", epochs=2, axes=None, seeds=(0,), **extra) -> Path:
    base = json.loads(json.dumps(TINY))
    base["data"]["path"] = str(fmnist_dir)
    base["optim"]["epochs"] = epochs
    spec = {"name": name, "base": base, "axes": axes or {"model.arch": ["bvit", "vit"]}, "seeds": list(seeds),
            "resources": {"cpus": 1}, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path
