"""Search (issue #27): the `search:` spec section, the grid path left exactly as it was, Optuna samplers that
issue buildable points under their config-hash ids, hypervolume, and a search resumed after SIGKILL."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.envelope import TrialEnvelope, build_envelopes
from orchestrator.errors import InputWarning
from orchestrator.pareto import hypervolume, hypervolume_history, pareto_mask
from orchestrator.spec import expand_trials, load_spec
from orchestrator.strategy import GridStrategy, OptunaStrategy, Space, strategy_for

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Computed before search existed (the width ids were results/width/trials.csv's, when sweeps/width.yaml trained
# 10 epochs scored every 2; `_spec` rebuilds that spec): the grid's trial ids and envelopes must not move.
GRID_IDS = {
    ("width", False): ["eaf48dd663", "dbc9603f8a", "7181e0c661", "57eec98dca", "bd0d97eeb4", "89bb338ba1",
                       "ba3e228cf2", "626c885e2f", "31d9b08e78", "72282cf9f6", "6f7a31dcd3", "831395fcfb",
                       "125e865f2a", "dc8171ccad", "d5cde1b1bc", "1dee0f0fd5", "24f120a743", "6d57aa52f5",
                       "01d4103812", "9bdb32bc7d", "9c77e381c8", "a61f4308dc", "4e05391fa4", "c82e105614",
                       "dab2e196d2", "b30b6a3377", "d40d06c23c", "8ca59b6cf9", "fe0646ae68", "a23acba267",
                       "5a299b475f", "c7c3e10645", "05095e782b", "ed96d4f858", "622cbd456a", "d850674aad"],
    ("width", True): ["6898bdf36f", "032d72ca9f"],
    ("smoke", False): ["6c07a90658", "81fdce4b96", "6cbc2129d0", "6a28aa86c8"],
    ("smoke", True): ["82f5f94166", "b05ad10276"],
}
ENVELOPES_SHA = {("width", False): "e8434596133f5286", ("width", True): "7391a501118d389c",
                 ("smoke", False): "7db817541828597d", ("smoke", True): "e1f4f7e0a8fed54d"}


def _spec(name: str, tmp_path: Path):
    """sweeps/<name>.yaml as these ids were computed from: width.yaml with its 10 epochs scored every 2 (it
    trains 20 scored every 4 since 3cdf812, a change of the spec, not of how a grid becomes trials)."""
    if name != "width":
        return load_spec(ROOT / "sweeps" / f"{name}.yaml")
    doc = yaml.safe_load((ROOT / "sweeps" / "width.yaml").read_text())
    doc["base"]["optim"]["epochs"], doc["base"]["eval_every"] = 10, 2
    (tmp_path / "width.yaml").write_text(yaml.safe_dump(doc))
    return load_spec(tmp_path / "width.yaml")


@pytest.mark.parametrize("name,smoke", list(GRID_IDS))
def test_grid_trials_and_envelopes_are_unchanged(name, smoke, tmp_path):
    spec = _spec(name, tmp_path)
    strategy = strategy_for(spec, smoke=smoke)
    assert isinstance(strategy, GridStrategy) and strategy.num_samples == 1
    assert [t.id for t in strategy.trials] == GRID_IDS[name, smoke]
    envs = build_envelopes(spec, strategy.trials, data_paths={t.config.data.path: "/data/fm" for t in strategy.trials},
                           pretrained={}, sweep_dir=Path("/runs/x"))
    blob = json.dumps([e.to_tune() for e in envs], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == ENVELOPES_SHA[name, smoke]
    assert list(strategy.param_space(envs)) == ["trial"] and strategy.search_alg() is None


def test_search_space_is_the_committed_grid_with_the_same_ids():
    grid = {t.id for t in expand_trials(load_spec(ROOT / "sweeps" / "search-grid.yaml"))}
    for alg in ("random", "tpe", "nsga2"):
        spec = load_spec(ROOT / "sweeps" / f"search-{alg}.yaml")
        trials, refused = Space.of(spec).enumerate()
        assert {t.id for t in trials} == grid and len(grid) == 96
        assert refused == 32  # widths 8, 24, 40, 56 with head dim 16, x 2 archs x 4 steps
        assert isinstance(strategy_for(spec), OptunaStrategy)


def _search_spec(tmp_path: Path, **search) -> Path:
    spec = {"name": "s", "base": {"model": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}},
            "axes": {"model.arch": ["bvit", "vit"], "model.steps": [1, 2]},
            "search": {"algorithm": "tpe", "num_trials": 6, "ranges": {"model.width": {"low": 8, "high": 32, "step": 8}},
                       "head_dim": [8, 16], **search}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("search,message", [
    ({"ranges": {"model.width": {"low": 64, "high": 8, "step": 8}}}, "low=64 > high=8"),
    ({"ranges": {"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}}, "log: true needs positive bounds"),
    ({"objectives": {"val_acc": "max"}}, "objective 'val_acc': no trial reports it"),
    ({"objectives": {"params": "max"}}, "its direction is 'min'"),
    ({"num_trials": None}, "set num_trials"),
])
def test_bad_search_sections_are_one_line_and_exit_2(tmp_path, search, message):
    result = runner.invoke(app, ["validate", str(_search_spec(tmp_path, **search))])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_multi_objective_search_with_asha_is_refused(tmp_path):
    path = _search_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["scheduler"] = {"type": "asha"}
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "use scheduler: {type: fifo}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_budget_that_covers_a_finite_space_warns_and_runs_the_grid(tmp_path):
    spec = load_spec(_search_spec(tmp_path, num_trials=100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = strategy_for(spec)
    assert isinstance(strategy, GridStrategy)
    assert len(strategy.trials) == 2 * 2 * 6  # widths 8..32 with head dims 8 (4) and 16 (16, 32): 6, x arch x steps
    assert any(issubclass(w.category, InputWarning) and "running the grid" in str(w.message) for w in caught)


def _drive(searcher, n: int, score) -> list[str]:
    """Ask the searcher for up to n trials, completing each with `score(model)`; the config ids issued."""
    ids = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        if not isinstance(config, dict):
            break
        env = TrialEnvelope.of(config)
        ids.append(env.trial_id)
        searcher.on_trial_complete(f"t{i}", {"test_top1": score(env.config.model)})
    return ids


@pytest.mark.parametrize("algorithm", ["random", "tpe", "nsga2"])
def test_sampler_issues_num_trials_distinct_buildable_points_with_config_hash_ids(tmp_path, algorithm):
    spec = load_spec(_search_spec(tmp_path, algorithm=algorithm, num_trials=10))
    strategy = strategy_for(spec)
    assert isinstance(strategy, OptunaStrategy) and strategy.num_samples == 10
    space_ids = {t.id for t in Space.of(spec).enumerate()[0]}
    searcher = strategy.search_alg(data_paths={"data/fashion-mnist": "/abs/fm"}, sweep_dir=tmp_path / "sweep")
    ids = _drive(searcher, 20, lambda m: 50 + m.width + m.steps)
    assert len(ids) == 10 and len(set(ids)) == 10 and set(ids) <= space_ids  # each a grid point, by the same hash
    state = json.loads((tmp_path / "sweep" / "search.json").read_text())
    assert state["issued"] == ids and state["finished"] == 10
    again = strategy_for(spec).search_alg(data_paths={"data/fashion-mnist": "/abs/fm"}, sweep_dir=tmp_path / "b")
    assert _drive(again, 20, lambda m: 50 + m.width + m.steps) == ids  # the sampler's seed fixes the search


def test_restored_searcher_continues_its_history_without_repeating_a_point(tmp_path):
    spec = load_spec(_search_spec(tmp_path, num_trials=12))
    searcher = strategy_for(spec).search_alg(data_paths={"data/fashion-mnist": "/abs/fm"}, sweep_dir=tmp_path)
    first = _drive(searcher, 5, lambda m: m.width)
    searcher.save(str(tmp_path / "state.pkl"))
    restored = strategy_for(spec).search_alg(data_paths={"data/fashion-mnist": "/abs/fm"}, sweep_dir=tmp_path)
    restored.restore(str(tmp_path / "state.pkl"))
    assert len(restored.inner._ot_study.trials) >= 5  # the sampler's history came back
    rest = []
    for i in range(5, 30):
        config = restored.suggest(f"t{i}")
        if not isinstance(config, dict):
            break
        rest.append(TrialEnvelope.of(config).trial_id)
        restored.on_trial_complete(f"t{i}", {"test_top1": 1.0})
    assert len(first) + len(rest) == 12 and len(set(first) | set(rest)) == 12


def test_hypervolume_of_a_known_front():
    # (top-1 max, params min) against reference (0, 10): rectangles 8x(10-2) + 5x(2-1) overlap-free = 64 + 5 ... by hand:
    # points (8, 2) and (9, 5): area = 8*(10-2) + (9-8)*(10-5) = 64 + 5 = 69
    values = np.array([[8.0, 2.0], [9.0, 5.0], [7.0, 6.0]])
    directions = ["max", "min"]
    assert hypervolume(values, directions, [0.0, 10.0]) == pytest.approx(69.0)
    assert pareto_mask(values, directions).tolist() == [True, True, False]
    assert hypervolume_history(values, directions, [0.0, 10.0]) == pytest.approx([64.0, 69.0, 69.0])
    assert hypervolume(np.array([[5.0, 20.0]]), directions, [0.0, 10.0]) == 0.0  # beyond the reference: nothing


@pytest.mark.slow
def test_sigkilled_search_resumes_to_exactly_num_trials_without_duplicate_mlflow_runs(workdir, fmnist_dir):
    from mlflow.tracking import MlflowClient

    spec = {"name": "ks", "base": {"model": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10},
                                   "data": {"path": str(fmnist_dir), "train_subset": 256, "batch_size": 64,
                                            "num_workers": 1},
                                   "optim": {"epochs": 2, "warmup_epochs": 0.5}},
            "axes": {"model.arch": ["bvit", "vit"], "model.steps": [1, 2]}, "resources": {"cpus": 1},
            "max_concurrent_trials": 1,
            "search": {"algorithm": "tpe", "num_trials": 4, "seed": 0,
                       "ranges": {"model.width": {"low": 8, "high": 32, "step": 8}}, "head_dim": [8]}}
    path = workdir / "ks.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = f"from orchestrator.launch import launch; launch(spec_path={str(path)!r}, verbose=False)"
    log = open(workdir / "launcher.log", "w")  # noqa: SIM115  (read back when the launcher fails)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = workdir / "runs" / "ks" / "search.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["finished"] >= 1):
        time.sleep(1)
    assert state.exists(), "no trial finished within 5 minutes:\n" + (workdir / "launcher.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["finished"] < 4, "the search ended before the kill; nothing to resume"
    time.sleep(2)
    from orchestrator.launch import launch

    result = launch(spec_path=path, resume=True, verbose=False)
    assert result.ok and len(result.trials) == 4 and len({r["trial_id"] for r in result.trials}) == 4
    with open(workdir / "results" / "ks" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (workdir / "results" / "ks" / "hypervolume.csv").exists()
    state = json.loads(state.read_text())  # the searcher's own count survived the kill and Tune's sync
    assert sorted(state["issued"]) == sorted(r["trial_id"] for r in result.trials) and state["finished"] == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'ks' / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ks")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`bvit.role` = 'trial'")
    ids = [r.data.tags["bvit.trial_id"] for r in runs]
    assert sorted(ids) == sorted(r["trial_id"] for r in result.trials)  # one MLflow run per trial, none twice
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`bvit.role` = 'parent'")[0]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "hypervolume")] == [1, 2, 3, 4]
