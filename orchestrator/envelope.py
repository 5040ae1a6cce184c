"""The one typed object a trial crosses the Ray boundary in, and is read back as everywhere.

    envelopes = build_envelopes(spec, trials, data_paths=..., pretrained=..., sweep_dir=...)
    param_space = {TRIAL_KEY: tune.grid_search([e.to_tune() for e in envelopes])}   # launch
    env = TrialEnvelope.of(trial.config)         # trainable, tracking, results, progress: read back the same way

Built once per trial from the expanded spec. `trial_id` is the id of the config as written in the spec
(`Trial.id`, computed once by `orchestrator.spec.expand`); `resolved` is what the trial runs: data and
checkpoint paths made absolute, and a fine-tuning trial's model taken from its checkpoint. Resolving
paths never changes the id: the id is the spec's, and the same in `plan`, Ray's trial name, MLflow's
`bvit.trial_id` tag and the checkpoint's `trial_id` entry.

It crosses as JSON data (Tune keeps it in params.json and its experiment state, readable and independent
of this code's classes) and is validated back once per trial config object in each process.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from bvit.config import ModelConfig, TrialConfig
from orchestrator.spec import Resources, SweepSpec, Trial

__all__ = ["FAILED_KEY", "TRIAL_KEY", "trial_status", "Pretrained", "TrialEnvelope", "build_envelopes", "resolve_config"]

TRIAL_KEY = "trial"  # the one key of a Tune trial's config: {"trial": TrialEnvelope}
FAILED_KEY = "failed"  # in a trial's last result: the error it failed with for good (not retried)

Pretrained = dict[tuple[str, str], tuple[str, ModelConfig]]  # (spec checkpoint, spec data) -> (file, model)


def trial_status(trial) -> str:
    """Tune's status of a trial, except ERROR for one that ended itself as failed (its last result holds
    `FAILED_KEY`)."""
    return "ERROR" if isinstance((trial.last_result or {}).get(FAILED_KEY), str) else trial.status


class TrialEnvelope(BaseModel):
    """One trial as Ray Tune carries it: its id, its config as written and as run, and how it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trial_id: str  # the spec's id of `config`: Ray's trial name, MLflow's tag, the checkpoint's `trial_id`
    config: TrialConfig  # as written in the spec (relative paths kept): the source of `trial_id`
    resolved: TrialConfig  # what runs: absolute paths; a fine-tuning trial's model is its checkpoint's
    resources: Resources  # per trial: cpus, gpus, workers (> 1: a data-parallel Ray Train trial)
    max_failures: int  # retries of a failed trial, from its last checkpoint (Ray Train's too)
    sweep_dir: str  # <storage>/<name> (a folder or a URI): Tune's state; data-parallel trials keep Ray Train's under train/
    data_source: str | None = None  # URI storage: the data's published copy (orchestrator.data_share), else None

    def on_this_node(self) -> TrialEnvelope:
        """The envelope as a trial on this node runs it: with a published data copy, `resolved`'s data path is the
        folder this node reads (the launcher's when it sees the same files there, else its verified local copy)."""
        if self.data_source is None:
            return self
        from orchestrator.data_share import local_data

        path = local_data(self.data_source, self.resolved.data.path)
        data = self.resolved.data.model_copy(update={"path": path})
        return self.model_copy(update={"resolved": self.resolved.model_copy(update={"data": data})})

    @property
    def train_storage(self) -> str:
        """Where a data-parallel trial's Ray Train run keeps its checkpoints (under a storage URI too)."""
        return f"{self.sweep_dir.rstrip('/')}/train" if "://" in self.sweep_dir else str(Path(self.sweep_dir) / "train")

    def to_tune(self) -> dict[str, Any]:
        """The envelope as JSON data, as Ray Tune carries it (see `of`); without `data_source` when there is none,
        so a sweep on a local storage carries exactly what it did before the field existed."""
        return self.model_dump(mode="json", exclude={"data_source"} if self.data_source is None else None)

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> TrialEnvelope:
        """The envelope in a Tune trial's config (`trial.config`, or what a trainable is called with)."""
        hit = _READ.get(id(config))
        if hit is not None and hit[0] is config:  # the same trial's config again (each epoch's result)
            return hit[1]
        if TRIAL_KEY not in config and "run" in config:
            env = cls._legacy(config["run"])
        else:
            env = config[TRIAL_KEY]
            env = env if isinstance(env, cls) else cls.model_validate(env)
        if len(_READ) >= 100_000:
            _READ.clear()
        _READ[id(config)] = (config, env)
        return env

    @classmethod
    def _legacy(cls, run: Mapping[str, Any]) -> TrialEnvelope:
        """A trial of a sweep launched before the envelope (`{"run": {...}}`): status, sync and resume."""
        cfg = TrialConfig.model_validate(run["trial"])
        resources = Resources(cpus=run.get("cpus", 1.0), gpus=run.get("gpus", 0.0), workers=run.get("workers", 1))
        return cls(trial_id=run["trial_id"], config=cfg, resolved=cfg, resources=resources,
                   max_failures=run.get("max_failures", 0), sweep_dir=str(Path(run["train_storage"]).parent))


_READ: dict[int, tuple[Mapping[str, Any], TrialEnvelope]] = {}  # id(config) -> (config, its envelope)


def resolve_config(cfg: TrialConfig, data_paths: dict[str, str], pretrained: Pretrained) -> TrialConfig:
    """What a trial runs: its data path absolute; a fine-tuning trial's checkpoint absolute and model the
    checkpoint's (with a head for the data's classes)."""
    update: dict[str, Any] = {"data": cfg.data.model_copy(update={"path": data_paths[cfg.data.path]})}
    if cfg.finetune is not None:
        file, update["model"] = pretrained[(cfg.finetune.checkpoint, cfg.data.path)]
        update["finetune"] = cfg.finetune.model_copy(update={"checkpoint": file})
    return cfg.model_copy(update=update)


def build_envelopes(spec: SweepSpec, trials: list[Trial], *, data_paths: dict[str, str], pretrained: Pretrained,
                    sweep_dir: Path | str, data_sources: dict[str, str] | None = None) -> list[TrialEnvelope]:
    """One envelope per expanded trial, in the sweep's order. `data_sources`: {absolute data dir: its published
    copy} when the sweep's storage is a URI (orchestrator.data_share.publish_data)."""
    out = []
    for t in trials:
        resolved = resolve_config(t.config, data_paths, pretrained)
        out.append(TrialEnvelope(trial_id=t.id, config=t.config, resolved=resolved, resources=spec.resources,
                                 max_failures=spec.max_failures, sweep_dir=str(sweep_dir),
                                 data_source=(data_sources or {}).get(resolved.data.path)))
    return out
