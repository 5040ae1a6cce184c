"""How a sweep chooses its trials: the one object the launch asks for the Tuner's `param_space`, `search_alg` and
`num_samples`, for the Tuner of a resumed sweep, and for the trials and search results at the end (issue #27).
Two strategies, one interface (`Strategy`):

    strategy = strategy_for(spec, smoke=False)
    GridStrategy     every point, pre-expanded: one `tune.grid_search` over the trials' envelopes (as before)
    OptunaStrategy   `num_trials` points chosen by an Optuna sampler (random, tpe, nsga2) through Ray Tune's
                     `OptunaSearch`, wrapped in `PointSearcher`, which turns each sampled point into a trial

A sampled point becomes a trial exactly as a grid point does: the spec's base with the point's values written at
their dotted paths (`heads = width / head_dim` when `search.head_dim` is set), validated as a `TrialConfig`, its
id that config's hash (`TrialConfig.trial_id`), so MLflow runs and checkpoints line up as for grids. A point that
does not build (a width no head dim divides) is refused and the sampler asked again; a point already run is
re-sampled too, its earlier result told to the sampler. Both are counted in `<sweep_dir>/search.json`.
"""
from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import tune
from ray.tune.search import Searcher

from bvit.config import TrialConfig
from orchestrator.envelope import TRIAL_KEY, TrialEnvelope, resolve_config
from orchestrator.errors import InputWarning, error_message
from orchestrator.pareto import default_reference_point, static_measures, write_search_results
from orchestrator.spec import SweepSpec, Trial, expand_trials
from orchestrator.spec.paths import assign, merge
from orchestrator.spec.search import STATIC_OBJECTIVES, Range

__all__ = ["GridStrategy", "OptunaStrategy", "PointSearcher", "SEARCH_STATE", "Space", "Strategy", "describe_search",
           "static_measures", "strategy_for"]

SEARCH_STATE = "search.json"  # in the sweep dir: points issued, refused and re-sampled
MAX_ATTEMPTS = 1000  # samples per trial before a sampler that keeps proposing refused or run points is stopped
REPEATS = 25  # refused or already-issued proposals in a row before an unvisited point is enqueued


@dataclass(frozen=True)
class Space:
    """A search's dimensions: the spec's axes (categorical), its ranges and `head_dim`; and how a point builds."""

    base: dict[str, Any]
    categorical: dict[str, list[Any]]
    ranges: dict[str, Range]
    head_dim: tuple[int, ...] | None
    seed: int

    @classmethod
    def of(cls, spec: SweepSpec, *, smoke: bool = False) -> Space:
        s = spec.search
        axes = {**spec.axes, **(spec.smoke.axes if smoke else {})}
        seeds = (spec.smoke.seeds if smoke and spec.smoke.seeds is not None else spec.seeds)
        return cls(base=merge(spec.base, spec.smoke.base) if smoke else dict(spec.base),
                   categorical={p: list(v) for p, v in axes.items()}, ranges=dict(s.ranges),
                   head_dim=tuple(s.head_dim) if s.head_dim else None, seed=seeds[0])

    def finite_values(self) -> dict[str, list[Any]] | None:
        """Every dimension's values, or None when one is continuous."""
        out = dict(self.categorical)
        for path, r in self.ranges.items():
            if (values := r.values) is None:
                return None
            out[path] = values
        if self.head_dim:
            out["head_dim"] = list(self.head_dim)
        return out

    def build(self, point: dict[str, Any]) -> Trial | str:
        """The trial of a point, or why it cannot be built (one line)."""
        tree = merge({}, self.base)
        for path, value in point.items():
            if path != "head_dim":
                assign(tree, path, value)
        if "head_dim" in point:
            width = point.get("model.width", tree.get("model", {}).get("width", TrialConfig().model.width))
            if width % point["head_dim"]:
                return f"model.width={width} is not divisible by head_dim={point['head_dim']}"
            assign(tree, "model.heads", width // point["head_dim"])
        assign(tree, "seed", self.seed)
        try:
            config = TrialConfig.model_validate(tree)
        except ValidationError as e:
            return "; ".join(error_message(err) for err in e.errors())
        return Trial(config, {"seed": self.seed, **point}, config.trial_id())

    def enumerate(self) -> tuple[list[Trial], int] | None:
        """(every buildable point as a trial, in product order; how many points were refused); None when
        the space is continuous."""
        values = self.finite_values()
        if values is None:
            return None
        trials: dict[str, Trial] = {}
        refused = 0
        for combo in itertools.product(*values.values()):
            trial = self.build(dict(zip(values, combo, strict=True)))
            if isinstance(trial, str):
                refused += 1
            else:
                trials.setdefault(trial.id, trial)
        return list(trials.values()), refused

    def sample(self, ot_trial) -> None:
        """Optuna's define-by-run space: ask the trial for each dimension (the point is its params)."""
        for path, values in self.categorical.items():
            ot_trial.suggest_categorical(path, values)
        for path, r in self.ranges.items():
            if r.integer:
                ot_trial.suggest_int(path, int(r.low), int(r.high), step=1 if r.log else int(r.step or 1), log=r.log)
            else:
                ot_trial.suggest_float(path, float(r.low), float(r.high), step=r.step, log=r.log)
        if self.head_dim:
            ot_trial.suggest_categorical("head_dim", list(self.head_dim))


class Strategy:
    """What the launch asks of the way a sweep chooses its trials (`strategy_for` gives the spec's).

        trials, configs, total      the trials known before the launch (a grid's all, a search's none), the configs
                                    the launch checks before Ray starts, and how many trials the sweep runs
        param_space(envelopes)      the new Tuner's param_space (`envelopes`: of `trials`, in run order)
        search_alg(...), num_samples    its search_alg (None: Tune's variant generator over param_space)
        restore(sweep_dir, trainable)   the Tuner of a resumed sweep
        finished_trials(sweep_dir)  the trials of the table written at the end
        write_pareto(table, ...)    a search's own results at the end
    """

    sampled: bool
    num_samples: int
    trials: list[Trial]
    configs: list[TrialConfig]
    total: int
    reports_pareto: bool  # the spec has a `search:` section (its objectives), whatever its algorithm

    def param_space(self, envelopes: list[TrialEnvelope]) -> dict[str, Any]:
        raise NotImplementedError

    def search_alg(self, **context: Any) -> Searcher | None:
        raise NotImplementedError

    def finished_trials(self, sweep_dir: Path) -> list[Trial]:
        raise NotImplementedError

    def restore(self, sweep_dir: Path, *, trainable) -> tune.Tuner:
        """Tune's saved experiment: finished trials kept, unfinished and errored ones resumed from their last
        checkpoint (not restarted); a search's searcher comes back with it (its sampler's history and the points
        it issued: it never exceeds `num_trials`)."""
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  restart_errored=False)

    def write_pareto(self, table: list[dict[str, Any]], *, spec: SweepSpec, sweep_dir: Path, results_dir: Path,
                     uri: str, experiment: str, verbose: bool) -> None:
        """pareto.csv, hypervolume.csv and their plots, MLflow's hypervolume (`orchestrator.pareto`): for a spec
        with a `search:` section; nothing for a plain grid."""
        if self.reports_pareto:
            write_search_results(table, spec=spec, sweep_dir=sweep_dir, results_dir=results_dir, strategy=self,
                                 uri=uri, experiment=experiment, verbose=verbose)


class GridStrategy(Strategy):
    """Every trial, pre-expanded: one `tune.grid_search` over their envelopes (the default, as before)."""

    sampled = False
    num_samples = 1

    def __init__(self, trials: list[Trial], *, reports_pareto: bool = False) -> None:
        self.trials = trials
        self.configs = [t.config for t in trials]
        self.total = len(trials)
        self.reports_pareto = reports_pareto

    def param_space(self, envelopes: list[TrialEnvelope]) -> dict[str, Any]:
        return {TRIAL_KEY: tune.grid_search([env.to_tune() for env in envelopes])}

    def search_alg(self, **context: Any) -> None:
        return None

    def finished_trials(self, sweep_dir: Path) -> list[Trial]:
        return self.trials


class OptunaStrategy(Strategy):
    """`num_trials` points chosen by an Optuna sampler through Ray Tune's `OptunaSearch` (see `PointSearcher`)."""

    sampled = True
    reports_pareto = True

    def __init__(self, spec: SweepSpec, space: Space, *, known: list[Trial] | None, num_trials: int) -> None:
        self.spec, self.space = spec, space
        self.trials: list[Trial] = []  # unknown until sampled
        self.configs = [t.config for t in known] if known else [space.build(_corner(space)).config]
        self.total = self.num_samples = num_trials

    def param_space(self, envelopes: list[TrialEnvelope]) -> dict[str, Any]:
        return {}

    def search_alg(self, *, data_paths: dict[str, str], sweep_dir: Path,
                   data_sources: dict[str, str] | None = None) -> PointSearcher:
        return PointSearcher(space=self.space, spec=self.spec, data_paths=data_paths, sweep_dir=str(sweep_dir),
                             data_sources=data_sources or {},
                             num_trials=self.num_samples)

    def finished_trials(self, sweep_dir: Path) -> list[Trial]:
        """The sampled trials, in the order they were issued (their envelopes in Tune's state)."""
        from orchestrator.results import trial_envelopes

        state = read_search_state(sweep_dir)
        order = {tid: i for i, tid in enumerate(state.get("issued", []))}
        envs = sorted(trial_envelopes(sweep_dir).values(), key=lambda e: order.get(e.trial_id, len(order)))
        return [Trial(e.config, {}, e.trial_id) for e in envs]


def _corner(space: Space) -> dict[str, Any]:
    """The largest point of a continuous space (for memory and data checks before the launch)."""
    point = {p: v[-1] for p, v in space.categorical.items()}
    point.update({p: r.high for p, r in space.ranges.items()})
    if space.head_dim:
        point["head_dim"] = max(space.head_dim)
    return point


def strategy_for(spec: SweepSpec, *, smoke: bool = False) -> Strategy:
    """The spec's strategy: the grid unless `search.algorithm` names a sampler and the space is larger than
    `num_trials` (a finite space that fits the budget is run whole, with a warning)."""
    s = spec.search
    pareto = "search" in spec.model_fields_set  # a grid of a spec with a search section reports its front too
    if not s.sampled and not s.ranges and not s.head_dim:
        return GridStrategy(expand_trials(spec, smoke=smoke), reports_pareto=pareto)  # the grid path, unchanged
    space = Space.of(spec, smoke=smoke)
    found = space.enumerate()
    if not s.sampled:
        return GridStrategy(found[0], reports_pareto=pareto)
    num_trials = min(s.num_trials, 2) if smoke else s.num_trials
    if found is not None and num_trials >= len(found[0]):
        warnings.warn(f"{spec.source}: search.num_trials={num_trials} covers the whole space ({len(found[0])} "
                      "buildable points); running the grid", InputWarning, stacklevel=2)
        return GridStrategy(found[0], reports_pareto=pareto)
    return OptunaStrategy(spec, space, known=found[0] if found else None, num_trials=num_trials)


def describe_search(spec: SweepSpec, *, smoke: bool = False, seconds: list[float | None] | None = None,
                    concurrent: int | None = None) -> str:
    """One line for `validate` and `plan`: the algorithm, the space's size, the budget, the objectives and the
    hypervolume's reference point (the default derived here). `seconds`: estimated time of each point of a
    finite space (`plan`), for the budget's estimated trial and wall time."""
    s, space = spec.search, Space.of(spec, smoke=smoke)
    found = space.enumerate()
    strategy = strategy_for(spec, smoke=smoke)
    size = (f"{len(found[0])} buildable points ({found[1]} refused by their constraints)" if found
            else "a continuous space")
    budget = strategy.total
    objectives = ", ".join(f"{m} {d}" for m, d in s.objectives.items())
    configs = [t.config for t in found[0]] if found else strategy.configs
    if s.reference_point:
        ref = ", ".join(f"{m}={v:g}" for m, v in s.reference_point.items())
    elif any(m not in ("test_top1", "test_top5", *STATIC_OBJECTIVES) for m in s.objectives):
        ref = "derived at the end from the worst loss seen"
    else:
        import numpy as np

        values = default_reference_point(dict(s.objectives), space_configs=configs, observed=np.zeros((1, len(s.objectives))))
        ref = ", ".join(f"{m}={v:g}" for m, v in zip(s.objectives, values, strict=True)) + " (derived)"
    line = (f"search: {s.algorithm if strategy.sampled else 'grid'} over {size}; budget {budget} trials"
            + (f" ({budget / len(found[0]):.0%} of the space)" if found else "")
            + f"; objectives {objectives}; hypervolume reference point {ref}")
    known = [x for x in (seconds or []) if x is not None]
    if known:
        trial_s = budget * sum(known) / len(known)
        line += f"; estimated {trial_s / 60:.1f} min of trial time"
        if concurrent:
            line += f", ~{trial_s / 60 / concurrent:.1f} min wall with {concurrent} at once"
    return line


def design_for(spec: SweepSpec, *, smoke: bool = False):
    """The spec's cells (`orchestrator.cells.design_of`) with a search's ranges and `head_dim` (as model.heads)
    added as factors, so that trials of different sampled widths never pool into one cell. The grid's: as is."""
    import dataclasses

    from orchestrator.cells import Factor, column_names, design_of

    design = design_of(spec, smoke=smoke)
    extra = [*spec.search.ranges, *(["model.heads"] if spec.search.head_dim else [])]
    if not extra:
        return design
    names = column_names([p for f in design.factors for p in f.paths] + extra)
    return dataclasses.replace(design, factors=design.factors + tuple(Factor((p,), (names[p],)) for p in extra))


def read_search_state(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SEARCH_STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _sampler(algorithm: str, seed: int):
    import optuna

    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class PointSearcher(Searcher):
    """Ray Tune's `OptunaSearch`, asked for points, each turned into a trial envelope (config-hash id).

    A refused point (it does not build) is told to Optuna as failed and the sampler asked again; a point already
    issued is told its earlier result (or pruned while it still runs) and the sampler asked again; both counted.
    A sampler that keeps proposing such points (TPE converged on a small space) is handed an unvisited point.
    After `num_trials` issued points, or when the sampler proposes only refused or run points, it is finished.
    """

    def __init__(self, *, space: Space, spec: SweepSpec, data_paths: dict[str, str], sweep_dir: str,
                 num_trials: int, data_sources: dict[str, str] | None = None) -> None:
        from ray.tune.search.optuna import OptunaSearch

        s = spec.search
        self.objectives = dict(s.objectives)
        metrics, modes = list(self.objectives), list(self.objectives.values())
        super().__init__(metric=metrics[0], mode=modes[0])
        self.space, self.num_trials, self.sweep_dir = space, num_trials, sweep_dir
        self.context = dict(data_paths=data_paths, data_sources=data_sources or {}, resources=spec.resources.model_dump(),
                            max_failures=spec.max_failures)
        multi = len(metrics) > 1
        self.inner = OptunaSearch(space=_DefineByRun(space), metric=metrics if multi else metrics[0],
                                  mode=modes if multi else modes[0], sampler=_sampler(s.algorithm, s.seed))
        self.keys: dict[str, tuple[str, str]] = {}  # tune trial id -> (optuna key, config id)
        self.results: dict[str, dict[str, float] | None] = {}  # config id -> objective values (None: failed)
        self.issued: list[str] = []  # config ids, in the order they were issued
        self._configs: dict[str, Any] = {}  # config id -> its TrialConfig as JSON data
        self.refused = self.resampled = self.enqueued = 0
        self.seed = s.seed

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the objectives are the spec's

    def suggest(self, trial_id: str):
        if trial_id in self.keys:
            return self._envelope(self.keys[trial_id][1])
        if len(self.issued) >= self.num_trials:
            return Searcher.FINISHED
        for attempt in range(MAX_ATTEMPTS):
            key = f"{trial_id}~{len(self.issued)}~{attempt}"
            if attempt and attempt % REPEATS == 0 and not self._enqueue_unvisited(attempt):
                break  # a finite space with every buildable point issued
            point = self.inner.suggest(key)
            trial = self.space.build(point)
            if isinstance(trial, str):
                self.refused += 1
                self.inner.on_trial_complete(key, None, error=True)
                continue
            if trial.id in self._configs:
                self.resampled += 1
                known = self.results.get(trial.id)
                self.inner.on_trial_complete(key, known, error=known is None and trial.id in self.results)
                continue
            self.keys[trial_id] = (key, trial.id)
            self._configs[trial.id] = trial.config.model_dump(mode="json")
            self.issued.append(trial.id)
            self._save_state()
            return self._envelope(trial.id)
        self._save_state()
        return Searcher.FINISHED

    def _enqueue_unvisited(self, attempt: int) -> bool:
        """After REPEATS proposals in a row of refused or issued points (a sampler that has converged on a
        small space), hand Optuna a random buildable point not issued yet as its next trial (`enqueue_trial`, so
        its history stays whole); False when a finite space has none left. A continuous space: True (ask again)."""
        import random

        found = self.space.enumerate()
        if found is None:
            return True
        unvisited = [t for t in found[0] if t.id not in self._configs]
        if not unvisited:
            return False
        pick = random.Random(f"{self.seed}:{len(self.issued)}:{attempt}").choice(unvisited)
        self.inner._ot_study.enqueue_trial({k: v for k, v in pick.axes.items() if k != "seed"})
        self.enqueued += 1
        return True

    def _envelope(self, config_id: str) -> dict[str, Any]:
        cfg = TrialConfig.model_validate(self._configs[config_id])
        c = self.context
        resolved = resolve_config(cfg, c["data_paths"], {})
        env = TrialEnvelope(trial_id=config_id, config=cfg, resolved=resolved, resources=c["resources"],
                            max_failures=c["max_failures"], sweep_dir=self.sweep_dir,
                            data_source=c.get("data_sources", {}).get(resolved.data.path))
        return {TRIAL_KEY: env.to_tune()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.keys:
            return
        key, config_id = self.keys[trial_id]
        if config_id in self.results:
            return
        values = self.objective_values(config_id, result if not error else None)
        self.results[config_id] = values
        self.inner.on_trial_complete(key, values, error=values is None)
        self._save_state()

    def objective_values(self, config_id: str, result: dict | None) -> dict[str, float] | None:
        """The trial's objectives: trained metrics from its last result, static ones from its config."""
        if not result or result.get("failed"):
            return None
        static = static_measures(TrialConfig.model_validate(self._configs[config_id]))
        out = {m: (static[m] if m in STATIC_OBJECTIVES else result.get(m)) for m in self.objectives}
        return None if any(v is None for v in out.values()) else {k: float(v) for k, v in out.items()}

    def _save_state(self, directory: Path | None = None) -> None:
        """search.json in the sweep dir (live), and beside Tune's searcher state when Tune saves it: Tune syncs its
        driver-side copy of the experiment over the sweep dir, so a file written only there would be rolled back."""
        path = Path(directory or self.sweep_dir) / SEARCH_STATE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"num_trials": self.num_trials, "issued": self.issued, "refused": self.refused,
                 "resampled": self.resampled, "enqueued": self.enqueued, "finished": sum(v is not None for v in self.results.values())}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    def save(self, checkpoint_path: str) -> None:
        import pickle  # Tune's own searcher state (this object), never a user's file

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)
        self._save_state(Path(checkpoint_path).parent)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class _DefineByRun:
    """A picklable define-by-run space for `OptunaSearch` (Tune saves the searcher with it)."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, ot_trial) -> None:
        self.space.sample(ot_trial)
