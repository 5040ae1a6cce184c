"""The data every trial reads, made ready once on the launching machine before any trial starts.

    data_paths = prepare_data(configs, cwd=Path.cwd())     # {spec's data.path -> absolute path}

A data dir that is missing or does not verify is prepared when it is one this project builds from local files
(Fashion-MNIST, the fmnist-a/b split, digits: `bvit.data.registry.preparable`), else refused in one line.
Relative paths are resolved against the launching directory and handed to trials as absolute paths; on a
multi-node cluster that path must be on storage every node mounts (e.g. NFS), or prepared on each node first.
"""
from __future__ import annotations

from pathlib import Path

from bvit.config import TrialConfig
from orchestrator.errors import UserError

__all__ = ["prepare_data"]


def prepare_data(trials: list[TrialConfig], *, cwd: Path) -> dict[str, str]:
    """Make sure every data dir the trials read exists and verifies; prepare it if it is one this project
    builds from local files (Fashion-MNIST, the fmnist-a/b split, digits: `bvit.data.registry.preparable`).

    Returns {spec path -> absolute path}. Runs once on the launching machine, before any trial.
    """
    from bvit.data.format import DataError, load_metadata
    from bvit.data.registry import preparable, prepare_known

    resolved: dict[str, str] = {}
    for path in sorted({t.data.path for t in trials}):
        absolute = Path(path) if Path(path).is_absolute() else (cwd / path)
        try:
            load_metadata(absolute)
        except DataError as missing:
            if (name := preparable(absolute)) is None:
                raise UserError([str(missing)]) from missing
            print(f"preparing {name} into {absolute} (once, before the trials start)")
            try:
                prepare_known(absolute)
            except DataError as e:
                raise UserError([str(e)]) from e
        resolved[path] = str(absolute.resolve())
    return resolved
