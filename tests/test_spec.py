"""Sweep specs: the shipped sweeps, expansion order and ids, duplicates, error attribution, exact counts."""
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from bvit.config import ModelConfig, TrialConfig
from bvit.models.factory import build_model, count_flops, count_params
from orchestrator.errors import InputWarning
from orchestrator.lock import lock_path, sweep_lock
from orchestrator.planning import CPU_CORE_FLOPS, make_plan, model_flops, model_params
from orchestrator.spec import SpecError, SweepSpec, expand, expand_trials, load_spec
from orchestrator.sweep_dir import sweep_dir_for

SWEEPS = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))


def write(tmp_path: Path, spec: dict | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def problems(path: Path, *, smoke: bool = False) -> list[str]:
    with pytest.raises(SpecError) as info:
        expand_trials(load_spec(path), smoke=smoke)
    return info.value.lines


def test_every_shipped_sweep_is_found():
    assert {p.name for p in SWEEPS} >= {"smoke.yaml", "width.yaml", "steps.yaml", "imagenet_width.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_validates_and_expands_to_its_header_counts(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for field in ("Command:", "Hypothesis:", "Cost:"):
        assert f"# {field}" in header, f"{path.name}: header lacks {field}"
    assert f"bvit-sweep launch sweeps/{path.name}" in header
    counts = re.search(r"^# trials: (\d+) \(smoke: (\d+)\)$", header, re.M)
    assert counts, f"{path.name}: header lacks a '# trials: N (smoke: M)' line"
    spec = load_spec(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # a shipped sweep has no duplicate trials
        if "search" in spec.model_fields_set:  # a search: its budget (orchestrator.strategy)
            from orchestrator.strategy import strategy_for

            assert strategy_for(spec).total == int(counts[1])
            assert strategy_for(spec, smoke=True).total == int(counts[2])
        else:
            assert len(expand(spec)) == int(counts[1])
            assert len(expand(spec, smoke=True)) == int(counts[2])


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_a_spec_round_trips_through_its_dump(path):
    spec = load_spec(path)
    again = SweepSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again.model_dump() == spec.model_dump()
    assert [t.id for t in expand_trials(again)] == [t.id for t in expand_trials(spec)]


def test_width_sweep_is_the_fashion_mnist_grid_with_divisible_heads():
    trials = expand_trials(load_spec(Path("sweeps/width.yaml")))
    assert {t.config.data.path for t in trials} == {"data/fashion-mnist"}
    assert {t.config.model.arch for t in trials} == {"bvit", "vit"}
    assert all(t.config.model.width % t.config.model.heads == 0 for t in trials)
    assert {t.config.model.width // t.config.model.heads for t in trials} == {8, 16}  # head dims in the header
    assert len({t.config.model.width for t in trials}) >= 3
    assert len({t.config.model.steps for t in trials}) >= 2


def test_imagenet_sweep_plans_the_paper_models_exactly():
    plan = make_plan(spec=load_spec(Path("sweeps/imagenet_width.yaml")), bench=False)
    params = {(t.trial.config.model.arch, t.trial.config.model.width): t.params for t in plan.trials}
    assert params[("bvit", 768)] == 8_601_064 and params[("vit", 768)] == 86_567_656  # bViT-B, ViT-B
    assert params[("vit", 384)] == 22_050_664 and params[("bvit", 1024)] == 14_613_480
    assert {(t.trial.config.model.img_size, t.trial.config.precision) for t in plan.trials} == {(224, "bf16")}
    assert {r.source for r in plan.rates.values()} == {"assumed"}  # GPUs: never measured on this CPU


def test_order_is_seeds_slowest_then_axes_in_file_order_then_zip(tmp_path):
    path = write(tmp_path, {"name": "o", "axes": {"model.arch": ["bvit", "vit"], "model.steps": [1, 2]},
                            "zip": [{"model.width": [32, 64], "model.heads": [2, 4]}], "seeds": [3, 5]})
    trials = expand_trials(load_spec(path))
    key = [(t.config.seed, t.config.model.arch, t.config.model.steps, t.config.model.width,
            t.config.model.heads) for t in trials]
    assert key[:3] == [(3, "bvit", 1, 32, 2), (3, "bvit", 1, 64, 4), (3, "bvit", 2, 32, 2)]
    assert key == sorted(key, key=lambda k: (k[0], k[1], k[2], k[3]))
    assert len(key) == 16 and trials[0].axes == {"seed": 3, "model.arch": "bvit", "model.steps": 1,
                                                 "model.width": 32, "model.heads": 2}


def test_base_merges_over_defaults_and_axes_over_base(tmp_path):
    path = write(tmp_path, {"name": "m", "base": {"model": {"width": 96, "heads": 6}, "optim": {"lr": 0.002}},
                            "axes": {"optim.lr": [0.004]}})
    (cfg,) = expand(load_spec(path))
    defaults = TrialConfig()
    assert (cfg.model.width, cfg.model.heads, cfg.optim.lr) == (96, 6, 0.004)
    assert cfg.model.steps == defaults.model.steps and cfg.data == defaults.data


def test_ids_are_stable_across_loads_and_differ_across_seeds(tmp_path):
    ids = [[t.id for t in expand_trials(load_spec(Path("sweeps/width.yaml")))] for _ in range(2)]
    seeds = load_spec(Path("sweeps/width.yaml")).seeds
    assert ids[0] == ids[1] and len(set(ids[0])) == 12 * len(seeds)  # 3 widths x 2 steps x 2 archs per seed
    trials = expand_trials(load_spec(Path("sweeps/width.yaml")))
    assert all(t.id == t.config.trial_id() for t in trials)
    by_seed = {}
    for t in trials:
        by_seed.setdefault(t.config.model_copy(update={"seed": 0}).trial_id(), set()).add(t.id)
    assert all(len(group) == len(seeds) for group in by_seed.values())  # same config, one id per seed
    # a written-out equivalent spec (other key order, defaults spelled out) gives the same ids
    spec = yaml.safe_load(Path("sweeps/width.yaml").read_text())
    spec["base"]["model"] = dict(reversed(list({**spec["base"]["model"], "mlp_ratio": 4.0}.items())))
    assert [t.id for t in expand_trials(load_spec(write(tmp_path, spec)))] == ids[0]


def test_ids_follow_trial_id_even_if_its_definition_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(TrialConfig, "trial_id", lambda self: f"s{self.seed}-w{self.model.width}")
    trials = expand_trials(load_spec(write(tmp_path, {"name": "f", "axes": {"model.width": [32, 64]}})))
    assert [t.id for t in trials] == ["s0-w32", "s0-w64"]


def test_duplicates_collapse_with_a_warning_naming_the_id(tmp_path):
    path = write(tmp_path, {"name": "d", "axes": {"model.width": [64, 128, 64]}})
    expected = r'axes\["model.width"\]\[2\] gives the same trial as axes\["model.width"\]\[0\]'
    with pytest.warns(InputWarning, match=expected) as record:
        trials = expand_trials(load_spec(path))
    assert [t.config.model.width for t in trials] == [64, 128]
    assert len(record) == 1 and f"(id {trials[0].id})" in str(record[0].message)


def test_smoke_overrides_shrink_the_grid(tmp_path):
    path = write(tmp_path, {"name": "s", "base": {"optim": {"epochs": 8}},
                            "axes": {"model.arch": ["bvit", "vit"], "model.steps": [4, 8]},
                            "zip": [{"model.width": [64, 128], "model.heads": [4, 8]}], "seeds": [0, 1],
                            "smoke": {"base": {"optim": {"epochs": 1, "warmup_epochs": 0},
                                               "data": {"train_subset": 256}},
                                      "axes": {"model.steps": [1]},
                                      "zip": [{"model.width": [32], "model.heads": [2]}], "seeds": [0]}})
    spec = load_spec(path)
    assert len(expand(spec)) == 16
    smoke = expand(spec, smoke=True)
    got = [(c.model.arch, c.model.steps, c.model.width, c.optim.epochs, c.data.train_subset) for c in smoke]
    assert got == [("bvit", 1, 32, 1, 256), ("vit", 1, 32, 1, 256)]


@pytest.mark.parametrize("spec,expected", [
    ({"axes": {"model.width": [96, 192, 100]}, "base": {"model": {"heads": 6}}},
     'axes["model.width"][2]: width=100 is not divisible by heads=6'),
    ({"axes": {"model.patch_size": [4, 5]}},
     'axes["model.patch_size"][1]: patch_size=5 does not divide img_size=28'),
    ({"base": {"model": {"heads": 6}}}, "base.model.heads: width=128 is not divisible by heads=6"),
    ({"axes": {"model.width": [64, -8]}}, 'axes["model.width"][1]: Input should be greater than 0 (got -8)'),
    ({"zip": [{"model.width": [64, 100], "model.heads": [4, 3]}]},
     'zip[0]["model.width"][1]: width=100 is not divisible by heads=3'),
    ({"axes": {"model.arch": ["vit"]}, "base": {"model": {"step_embed": "learned"}}},
     'axes["model.arch"][0]: step_embed applies to arch \'bvit\' or \'rbvit\' only, not \'vit\''),
    ({"base": {"optim": {"epochs": 2}}, "smoke": {"axes": {"optim.warmup_epochs": [3]}}}, None),
])
def test_trial_errors_name_the_axis_value_or_base_entry_behind_them(tmp_path, spec, expected):
    path = write(tmp_path, {"name": "e", **spec})
    if expected is None:  # valid as a sweep, invalid only under --smoke
        assert expand(load_spec(path))
        assert problems(path, smoke=True) == [
            f'{path}: smoke.axes["optim.warmup_epochs"][0]: warmup_epochs=3.0 must be shorter than epochs=2']
        return
    assert problems(path) == [f"{path}: {expected}"]


def test_the_same_problem_in_many_trials_is_one_line(tmp_path):
    path = write(tmp_path, {"name": "e", "base": {"model": {"heads": 6}},
                            "axes": {"model.arch": ["bvit", "vit"], "model.width": [96, 100],
                                     "model.steps": [1, 2, 3]}})
    assert problems(path) == [f'{path}: axes["model.width"][1]: width=100 is not divisible by heads=6']


def test_structural_problems_are_all_reported_at_once(tmp_path):
    path = write(tmp_path, {"name": "e", "base": {"model": {"widht": 64}, "seed": 3},
                            "axes": {"width": [64], "model.steps": [], "model": [1]},
                            "zip": [{"model.heads": [2, 4], "model.mlp_ratio": [2.0]}],
                            "resources": {"cpus": -1}})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.lines == [
        f"{path}: resources.cpus: Input should be greater than 0 (got -1)",
        f"{path}: base.model.widht: unknown field (did you mean 'width'?)",
        f"{path}: base.seed: list seeds in the top-level `seeds:`",
        f"{path}: axes.width: not a TrialConfig field (did you mean 'model.width'?)",
        f'{path}: axes["model.steps"]: empty axis: give at least one value',
        f"{path}: axes.model: 'model' is a section, not a field: vary one of its fields, e.g. model.arch",
        f"{path}: zip[0]: the lists of a zip group vary together and need equal lengths, got model.heads: 2, "
        "model.mlp_ratio: 1",
    ]


def test_scheduler_resources_name_and_grid_size_rules(tmp_path):
    assert SweepSpec(name="a", scheduler={"metric": "test_loss"}).scheduler.mode == "min"
    for bad, match in [({"scheduler": {"metric": "test_loss", "mode": "max"}}, "mode must be 'min'"),
                       ({"scheduler": {"grace_period": 2}}, "grace_period applies to type 'asha' only"),
                       ({"scheduler": {"type": "asha", "grace_period": 5, "max_t": 3}}, "exceeds max_t=3"),
                       ({"resources": {"gpus": 2}}, "each worker drives one GPU"),
                       ({"resources": {"gpus": -0.5}}, "greater than or equal to 0"),
                       ({"name": "a/b"}, "names the sweep's directory"),
                       ({"name": ".."}, "names the sweep's directory"),
                       ({"name": "w" * 244}, "is 244 characters, more than 243")]:
        with pytest.raises(Exception, match=match):
            SweepSpec(**{"name": "a", **bad})
    SweepSpec(name="a", resources={"gpus": 8, "workers": 8, "cpus": 0.5})
    longest = SweepSpec(name="w" * 243)  # its smoke sweep's lock file, `.<name>-smoke.lock`, is 255 bytes
    with sweep_lock(sweep_dir_for(longest, str(tmp_path), smoke=True)):
        assert lock_path(sweep_dir_for(longest, str(tmp_path), smoke=True)).exists()
    big = {f"optim.{k}": list(range(1, 60)) for k in ("epochs", "lr", "weight_decay")}
    with pytest.raises(SpecError, match="the grid has 205,379 trials, more than 100,000"):
        SweepSpec(name="a", axes=big)
    million = {f"optim.{k}": list(range(1, 101)) for k in ("epochs", "lr", "weight_decay")}
    with pytest.raises(SpecError, match="the grid has 1,000,000 trials"):  # counted, not expanded
        SweepSpec(name="a", axes=million)


def test_unsafe_yaml_and_duplicate_keys_are_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert problems_at_load(path) == [
        f"{path}: line 1, column 7: YAML error: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' (only plain YAML is allowed: no Python object "
        "tags)"]
    assert not marker.exists()
    path = write(tmp_path, "name: a\naxes: {model.width: [32]}\nname: b\n")
    assert problems_at_load(path) == [
        f"{path}: line 3, column 1: YAML error: duplicate key 'name' (first given on line 1)"]


def problems_at_load(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.lines


MODELS = [
    dict(arch="bvit", width=64, heads=4, steps=3),
    dict(arch="vit", width=64, heads=4, steps=3),
    dict(arch="bvit", width=48, heads=3, steps=2, global_pool="avg", step_embed="learned", mlp_ratio=2.5),
    dict(arch="vit", width=48, heads=3, steps=2, global_pool="avg", mlp_ratio=3.3, patch_size=2, img_size=32,
         in_chans=3, num_classes=100),
    dict(arch="bvit", width=96, heads=6, steps=5, patch_size=7, in_chans=3, num_classes=5),
    dict(arch="vit", width=32, heads=2, steps=1, patch_size=16, img_size=224, in_chans=3, num_classes=1000),
]


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_closed_form_params_and_flops_equal_the_built_model(kw):
    m = ModelConfig(**kw)
    model = build_model(arch=m.arch, width=m.width, steps=m.steps, heads=m.heads, patch_size=m.patch_size,
                        img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes,
                        mlp_ratio=m.mlp_ratio, global_pool=m.global_pool, step_embed=m.step_embed)
    assert model_params(m) == count_params(model)
    assert model_flops(m) == count_flops(model, m.img_size, m.in_chans)


def test_plan_times_follow_the_stated_rate_and_totals_add_up(tmp_path):
    path = write(tmp_path, {"name": "p", "base": {"data": {"train_subset": 5000}, "optim": {"epochs": 3}},
                            "axes": {"model.arch": ["bvit", "vit"], "model.steps": [2, 4]}, "seeds": [0, 1],
                            "resources": {"cpus": 1}, "max_concurrent_trials": 2})
    plan = make_plan(spec=load_spec(path), bench=False)
    t = plan.trials[0]
    assert t.train_images == 5000 and t.epochs == 3
    assert t.seconds_per_epoch == pytest.approx((3 * 5000 + 10_000) * t.flops / CPU_CORE_FLOPS["fp32"])
    totals = plan.totals()
    assert totals["trials"] == 8 and totals["unique_models"] == 4 and totals["epochs"] == 24
    assert totals["seconds"] == pytest.approx(sum(x.seconds for x in plan.trials))
    assert totals["train_flops"] == sum(3 * x.flops * 5000 * 3 for x in plan.trials)
    assert totals["concurrent"] == 2 and totals["seconds"] / 2 <= totals["wall_seconds"] < totals["seconds"]


def test_plan_of_a_10000_trial_grid_finishes(tmp_path):
    n = 10
    axes = {"model.width": [16 * (i + 1) for i in range(n)], "model.steps": list(range(1, n + 1)),
            "optim.lr": [1e-4 * (i + 1) for i in range(n)]}
    spec = {"name": "big", "base": {"model": {"heads": 2}}, "axes": axes, "seeds": list(range(n))}
    path = write(tmp_path, spec)
    plan = make_plan(spec=load_spec(path), bench=False)
    assert plan.totals()["trials"] == 10_000 and plan.totals()["unique_models"] == 100
    assert len({t.trial.id for t in plan.trials}) == 10_000
    assert all(t.trial.id == t.trial.config.trial_id() for t in plan.trials[::97])  # the fast ids are the ids


def test_committed_results_name_the_trials_their_spec_expands_to():
    """results/width/ came from sweeps/width.yaml: the same trial ids (an id change would orphan the results
    and break `launch --resume` of every existing sweep)."""
    import csv

    with open("results/width/trials.csv") as f:
        committed = [row["trial_id"] for row in csv.DictReader(f)]
    assert committed == [t.id for t in expand_trials(load_spec(Path("sweeps/width.yaml")))]


def test_envelope_keeps_the_spec_id_while_paths_resolve_and_crosses_ray_as_data(tmp_path):
    from orchestrator.envelope import TRIAL_KEY, TrialEnvelope, build_envelopes

    spec = load_spec(Path("sweeps/width.yaml"))
    trials = expand_trials(spec)[:2]
    absolute = str((tmp_path / "data" / "fashion-mnist").resolve())
    envelopes = build_envelopes(spec, trials, data_paths={"data/fashion-mnist": absolute}, pretrained={},
                                sweep_dir=tmp_path / "runs" / "width")
    for trial, env in zip(trials, envelopes, strict=True):
        assert env.trial_id == trial.id == env.config.trial_id() != env.resolved.trial_id()
        assert (env.config.data.path, env.resolved.data.path) == ("data/fashion-mnist", absolute)
        assert env.resolved.model_copy(update={"data": env.config.data}) == env.config  # only the path moved
        assert env.train_storage == str(tmp_path / "runs" / "width" / "train")
        tune_config = {TRIAL_KEY: env.to_tune()}
        assert json.loads(json.dumps(tune_config)) == tune_config  # plain JSON data: params.json, experiment state
        assert TrialEnvelope.of(tune_config) == env and TrialEnvelope.of(tune_config) is TrialEnvelope.of(tune_config)


def test_envelope_reads_a_trial_of_a_sweep_launched_before_it():
    from orchestrator.envelope import TrialEnvelope

    cfg = TrialConfig.model_validate({"model": {"width": 32, "heads": 2}, "data": {"path": "/abs/fmnist"}})
    run = {"trial_id": "0123456789", "trial": cfg.model_dump(mode="json"), "workers": 1, "cpus": 2.0, "gpus": 0.0,
           "torch_threads": 2, "max_failures": 1, "train_storage": "/s/runs/width/train"}
    env = TrialEnvelope.of({"run": run})
    assert (env.trial_id, env.resolved, env.resources.cpus, env.max_failures, env.sweep_dir) == (
        "0123456789", cfg, 2.0, 1, "/s/runs/width")
