"""The `bvit-sweep` CLI through Typer's CliRunner: validate, plan, exit code 2 with one line per problem."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import format_loc
from orchestrator.spec import LEAVES, MAX_TRIALS, Resources, Scheduler, SweepSpec, Tracking
from orchestrator.spec.schema import MAX_NAME

runner = CliRunner()

VALID = {
    "name": "fuzz",
    "description": "a valid spec that the fuzzer breaks one way at a time",
    "base": {"model": {"width": 32, "heads": 2, "steps": 2}, "data": {"train_subset": 256, "batch_size": 64},
             "optim": {"epochs": 2, "warmup_epochs": 0.5, "lr": 0.001}},
    "axes": {"model.arch": ["bvit", "vit"], "model.steps": [1, 2]},
    "zip": [{"model.width": [32, 64], "model.heads": [2, 4]}],
    "seeds": [0, 1],
    "resources": {"cpus": 1, "gpus": 0, "workers": 1},
    "max_concurrent_trials": 2,
    "scheduler": {"type": "asha", "metric": "test_top1", "mode": "max", "grace_period": 1,
                  "reduction_factor": 2, "max_t": 2},
    "max_failures": 1,
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "fuzz"},
    "storage": "runs",
    "ray_address": None,
    "smoke": {"base": {"optim": {"epochs": 1, "warmup_epochs": 0}}, "axes": {"model.steps": [1]},
              "seeds": [0]},
}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def dump(spec: dict) -> str:
    return yaml.dump(spec, Dumper=yaml.CSafeDumper, sort_keys=False)


def write(tmp_path: Path, spec: dict | str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else dump(spec))
    return path


def assert_invalid(result, path: Path, *expected: str) -> list[str]:
    """Exit 2 through SystemExit, nothing on stdout, each stderr line `file: location: message`."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(re.fullmatch(rf"{re.escape(str(path))}: \S.*?: .+", line) for line in lines), lines
    for fragment in expected:
        assert fragment in result.stderr, (fragment, lines)
    return lines


def _leaf_commands(command=None, path=()):
    """(path, click command) of every command of the app, sub-groups walked."""
    command = command or typer.main.get_command(app)
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return [(path, command)]
    return [leaf for name, sub in subcommands.items() for leaf in _leaf_commands(sub, path + (name,))]


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("validate", "plan", "launch", "status", "frontier", "sync", "ui", "train", "finetune", "analyze",
                 "data", "ray"):
        assert re.search(rf"\b{name}\s", result.output), name


def test_every_command_help_shows_an_example_invocation():
    leaves = _leaf_commands()
    assert len(leaves) == 17  # 10 top-level commands; data: prepare fashion-mnist, image-folder, transfer, verify;
    # ray: up, down, status
    for path, _ in leaves:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert f"Example: bvit-sweep {' '.join(path)}" in " ".join(result.output.split()), path


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and re.fullmatch(r"bvit-sweep \d+\.\d+\.\d+\S*\n", result.stdout)


def test_set_paths_are_the_specs_paths_and_bad_ones_exit_2():
    result = invoke("train", "--set", "model.widht=64", "--set", "width=3", "--set", "nokey")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "--set: model.widht: not a TrialConfig field (did you mean 'model.width'?)",
        "--set: width: not a TrialConfig field (did you mean 'model.width'?)",
        "--set: 'nokey': expected path=value, e.g. model.width=128",
    ]
    result = invoke("train", "--set", "model.width=100", "--set", "model.heads=6")
    assert result.exit_code == 2
    assert result.stderr == "--set: model: width=100 is not divisible by heads=6\n"


def test_exit_codes_follow_one_policy(tmp_path, fmnist_dir):
    """2 for input that cannot work (here: a data directory that does not exist), 1 for a run that failed."""
    result = invoke("train", "--set", f"data.path={tmp_path / 'nowhere'}", "--json")
    assert result.exit_code == 2 and str(tmp_path / "nowhere") in result.stderr, result.output
    diverge = ["--set", "optim.lr=1e6", "--set", "optim.grad_clip=null", "--set", "optim.min_lr=0",
               "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=0.5"]
    tiny = ["--set", f"data.path={fmnist_dir}", "--set", "data.train_subset=512", "--set", "data.num_workers=1",
            "--set", "model.width=32", "--set", "model.heads=2", "--set", "model.steps=2"]
    result = invoke("train", *tiny, *diverge, "--json")
    assert result.exit_code == 1, result.output
    assert re.search(r"the loss became non-finite \(\S+\) at epoch \d+, step \d+ \(lr \S+\); lower optim.lr, or set "
                     r"optim.grad_clip", result.stderr), result.output
    result = invoke("train", *tiny, "--set", "model.in_chans=3", "--json")  # data that does not fit the model
    assert result.exit_code == 2 and result.stderr == (f"{fmnist_dir}: data has 1 channel(s) and 10 classes but the "
                                                       "model asks for model.in_chans=3, model.num_classes=10\n")


def test_validate_prints_the_trial_counts(tmp_path):
    result = invoke("validate", write(tmp_path, VALID))
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{tmp_path / 'x.yaml'}: valid: 16 trials (seeds 2 x model.arch 2 x "
                             "model.steps 2 x (model.width, model.heads) 2); --smoke: 4 trials\n")


def test_validate_json(tmp_path):
    result = invoke("validate", write(tmp_path, VALID), "--json")
    doc = json.loads(result.stdout)
    assert (doc["valid"], doc["trials"], doc["smoke_trials"], doc["name"]) == (True, 16, 4, "fuzz")
    assert len(set(doc["ids"])) == 16 and all(re.fullmatch(r"[0-9a-f]{10}", i) for i in doc["ids"])


@pytest.mark.parametrize("name", ["smoke", "width", "steps", "imagenet_width"])
def test_validate_every_shipped_sweep(name):
    result = invoke("validate", f"sweeps/{name}.yaml")
    assert result.exit_code == 0 and ": valid: " in result.stdout, result.output


ERRORS = [
    ("unknown key", {"resources": {"cpus": 1, "cpu": 2}},
     ["resources.cpu: unknown field (did you mean 'cpus'?)"]),
    ("unknown base key", {"base": {"model": {"widht": 64}}},
     ["base.model.widht: unknown field (did you mean 'width'?)"]),
    ("wrong type", {"max_failures": "three"}, ["max_failures: Input should be a valid integer"]),
    ("wrong axis value type", {"axes": {"model.steps": [1, "two"]}},
     ['axes["model.steps"][1]: Input should be a valid integer']),
    ("axis names no field", {"axes": {"model.depth": [1]}}, ['axes["model.depth"]: not a TrialConfig field']),
    ("empty axis", {"axes": {"model.steps": []}},
     ['axes["model.steps"]: empty axis: give at least one value']),
    ("width vs heads", {"zip": [{"model.width": [32, 100], "model.heads": [2, 6]}]},
     ['zip[0]["model.width"][1]: width=100 is not divisible by heads=6']),
    ("patch vs image", {"axes": {"model.patch_size": [4, 3]}},
     ['axes["model.patch_size"][1]: patch_size=3 does not divide img_size=28']),
    ("negative resources", {"resources": {"cpus": -2, "gpus": -1}},
     ["resources.cpus: Input should be greater than 0 (got -2)",
      "resources.gpus: Input should be greater than or equal to 0 (got -1)"]),
]


@pytest.mark.parametrize("kind,change,expected", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_invalid_spec_exits_2_with_one_line_per_problem(tmp_path, command, kind, change, expected):
    path = write(tmp_path, {**VALID, **change})
    result = invoke(command, path, "--no-bench") if command == "plan" else invoke(command, path)
    lines = assert_invalid(result, path, *expected)
    assert len(lines) == len(expected)


def test_yaml_syntax_error_and_missing_file_exit_2(tmp_path):
    path = write(tmp_path, "name: x\naxes:\n  model.width: [32, 64\n")
    assert_invalid(invoke("validate", path), path, "line 4, column 1: YAML error: expected ',' or ']'")
    missing = tmp_path / "nope.yaml"
    result = invoke("plan", missing)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"{missing}: no such file\n"


def test_duplicate_trials_warn_on_stderr_and_still_validate(tmp_path):
    path = write(tmp_path, {"name": "d", "axes": {"model.width": [64, 64]}})
    result = invoke("validate", path)
    assert result.exit_code == 0 and "valid: 1 trials" in result.stdout
    expected = (rf'warning: {re.escape(str(path))}: axes\["model.width"\]\[1\] gives the same trial as '
                rf'axes\["model.width"\]\[0\] \(id [0-9a-f]{{10}}\); it runs once\n')
    assert re.fullmatch(expected, result.stderr), result.stderr


def test_plan_table_shows_every_trial_and_the_totals(tmp_path):
    result = invoke("plan", write(tmp_path, VALID), "--no-bench")
    assert result.exit_code == 0, result.output
    doc = json.loads(invoke("validate", tmp_path / "x.yaml", "--json").stdout)
    assert all(i in result.stdout for i in doc["ids"])
    assert "total: 16 trials (8 distinct models)" in result.stdout
    assert "assumed 63 GFLOP/s per CPU core (fp32)" in result.stdout


def test_plan_json_totals_are_the_sums_of_the_trials(tmp_path):
    doc = json.loads(invoke("plan", write(tmp_path, VALID), "--json", "--no-bench").stdout)
    trials, totals = doc["trials"], doc["totals"]
    assert totals["trials"] == len(trials) == 16 and totals["unique_models"] == 8
    assert totals["epochs"] == sum(t["epochs"] for t in trials) == 32
    assert totals["seconds"] == pytest.approx(sum(t["seconds"] for t in trials))
    assert totals["train_flops"] == sum(3 * t["flops_per_image"] * t["epochs"] * t["train_images"]
                                        for t in trials)
    assert totals["concurrent"] == 2 and totals["wall_seconds"] >= totals["seconds"] / 2
    first = trials[0]
    assert [first[k] for k in ("arch", "width", "heads", "steps", "train_images")] == ["bvit", 32, 2, 1, 256]
    assert first["axes"] == {"seed": 0, "model.arch": "bvit", "model.steps": 1, "model.width": 32,
                             "model.heads": 2}
    assert doc["estimate"]["fp32"]["source"] == "assumed"
    smoke = json.loads(invoke("plan", tmp_path / "x.yaml", "--json", "--no-bench", "--smoke").stdout)
    assert smoke["smoke"] is True and smoke["totals"]["trials"] == 4
    assert {t["epochs"] for t in smoke["trials"]} == {1}


def test_plan_warns_when_a_bvit_vit_comparison_has_fewer_than_three_seeds(tmp_path):
    result = invoke("plan", write(tmp_path, VALID), "--no-bench", "--json")  # seeds [0, 1]: 4 comparisons
    assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["trials"] == 16
    assert result.stderr == ("warning: 4 of 4 comparisons with arch vit have 2 seeds per arm: comparisons with fewer "
                             "than 3 seeds cannot carry an interval worth reading; set seeds: [0, 1, 2]\n")
    assert invoke("plan", write(tmp_path, {**VALID, "seeds": [0, 1, 2]}), "--no-bench").stderr == ""
    one_arm = {**VALID, "axes": {"model.arch": ["bvit"], "model.steps": [1, 2]}}  # nothing compared: no warning
    assert invoke("plan", write(tmp_path, one_arm), "--no-bench").stderr == ""


def test_a_sweep_starts_seed_by_seed_costliest_first_and_the_plan_schedules_that_order(tmp_path):
    """Longest first within each seed (a sweep stopped early has still covered its first seeds): one long
    trial last would run alone while the other slot idles. The plan's wall estimate follows the same order."""
    from orchestrator.planning import make_plan, relative_cost, run_order
    from orchestrator.spec import expand_trials, load_spec

    spec = load_spec(write(tmp_path, {**VALID, "seeds": [3, 1]}))
    trials = expand_trials(spec)
    order = run_order(trials)
    assert sorted(t.id for t in order) == sorted(t.id for t in trials)
    assert [t.config.seed for t in order] == [3] * 8 + [1] * 8  # the spec's seed order, not sorted
    for seed in (3, 1):
        costs = [relative_cost(t.config) for t in order if t.config.seed == seed]
        assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    plan = make_plan(spec=spec, bench=False)
    seconds = {c.trial.id: c.seconds for c in plan.trials}
    slots = [0.0] * plan.concurrent  # each trial on the first free slot, in the launch's order
    for t in order:
        slots[slots.index(min(slots))] += seconds[t.id]
    assert plan.totals()["wall_seconds"] == pytest.approx(max(slots))


def test_plan_marks_unknown_data_sizes_and_caps_epochs_at_asha_max_t(tmp_path):
    path = write(tmp_path, {"name": "u", "base": {"data": {"path": "data/mystery"}, "optim": {"epochs": 9}},
                            "scheduler": {"type": "asha", "max_t": 4}})
    table = invoke("plan", path, "--no-bench").stdout
    assert "note: '?': unknown data set size for data.path data/mystery; set data.train_subset" in table
    assert "note: ASHA stops trials early" in table
    doc = json.loads(invoke("plan", path, "--no-bench", "--json").stdout)
    assert doc["trials"][0]["epochs"] == 4 and doc["trials"][0]["seconds"] is None
    assert doc["totals"]["seconds"] is None and doc["totals"]["wall_seconds"] is None


def test_plan_measures_this_machine_by_default_and_times_follow_the_rate(tmp_path):
    doc = json.loads(invoke("plan", write(tmp_path, VALID), "--json").stdout)
    rate = doc["estimate"]["fp32"]
    assert rate["source"] == "measured" and f"measured {rate['flops_per_s'] / 1e9:.0f} GFLOP/s" in rate["note"]
    first = doc["trials"][0]  # 256 training images (3 passes of FLOPs each), the 10,000 test images once
    expected = (3 * 256 + 10_000) * first["flops_per_image"] / rate["flops_per_s"]
    assert first["seconds_per_epoch"] == pytest.approx(expected)


# ---- fuzzing: >= 1,000 malformed specs, each one exit 2 and a field-path message --------------------------

TYPED_LEAVES = {  # location -> a strategy of values that are invalid there
    ("name",): st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.none(), st.just("no/slash"),
                         st.sampled_from([".", "..", "-x", "a b"]),
                         st.text(alphabet="abcxyz019._-", min_size=MAX_NAME + 1, max_size=400).map(lambda s: "n" + s)),
    ("seeds",): st.one_of(st.integers(), st.just([]), st.text(min_size=1).map(lambda s: {"x": s})),
    ("seeds", 1): st.one_of(st.integers(max_value=-1), st.just("zero"), st.floats(0.1, 0.9)),
    ("resources", "cpus"): st.one_of(st.floats(max_value=0, allow_nan=False), st.just("many"), st.just([1])),
    ("resources", "gpus"): st.one_of(st.floats(max_value=-0.01, allow_nan=False), st.just("one")),
    ("resources", "workers"): st.one_of(st.integers(max_value=0), st.floats(1.1, 1.9), st.just("two")),
    ("max_concurrent_trials",): st.one_of(st.integers(max_value=0), st.just("all"), st.floats(1.1, 1.9)),
    ("max_failures",): st.one_of(st.integers(max_value=-1), st.just("none"), st.just({"n": 1})),
    ("scheduler", "type"): st.text(min_size=1, max_size=8).filter(lambda s: s not in ("fifo", "asha")),
    ("scheduler", "metric"): st.sampled_from(["accuracy", "top1", "loss", "val_top1"]),
    ("scheduler", "reduction_factor"): st.floats(max_value=1, allow_nan=False, allow_infinity=False),
    ("storage",): st.one_of(st.just(""), st.integers(), st.lists(st.text(), max_size=2)),
    ("base", "data", "batch_size"): st.one_of(st.integers(max_value=0), st.just("big"), st.floats(1.1, 1.9)),
    ("base", "data", "augment"): st.sampled_from(["flip", "randaugment", "", "none!"]),
    ("base", "optim", "lr"): st.one_of(st.floats(max_value=0, allow_nan=False), st.just("fast")),
    ("base", "model", "mlp_ratio"): st.one_of(st.floats(max_value=0, allow_nan=False), st.just([4])),
    ("axes", "model.steps", 0): st.one_of(st.integers(max_value=0), st.integers(257, 10_000), st.just("one")),
    ("axes", "model.arch", 1): st.text(max_size=6).filter(lambda s: s not in ("bvit", "vit")),
}
MAPPINGS = {(): SweepSpec, ("resources",): None, ("scheduler",): None, ("tracking",): None, ("smoke",): None,
            ("base",): None, ("base", "model"): None, ("base", "data"): None, ("base", "optim"): None}
VALID_NAMES = {*SweepSpec.model_fields, *Resources.model_fields, *Scheduler.model_fields,
               *Tracking.model_fields, "model", "data", "optim", *(p.rsplit(".", 1)[-1] for p in LEAVES)}


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


def setting(spec: dict, loc: tuple, value) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value
    return spec


@st.composite
def wrong_value(draw):
    loc = draw(st.sampled_from(sorted(TYPED_LEAVES, key=str)))
    return dump(setting(VALID, loc, draw(TYPED_LEAVES[loc]))), format_loc(loc)


@st.composite
def unknown_key(draw):
    where = draw(st.sampled_from(sorted(MAPPINGS, key=str)))
    key = draw(NAMES.filter(lambda k: k not in VALID_NAMES))
    return dump(setting(VALID, where + (key,), draw(st.integers()))), format_loc(where + (key,))


@st.composite
def bad_axis(draw):
    kind = draw(st.sampled_from(["unknown path", "empty", "indivisible", "patch", "zip length", "seed axis",
                                 "too many trials"]))
    spec = copy.deepcopy(VALID)
    if kind == "unknown path":
        paths = st.lists(NAMES, min_size=1, max_size=3).map(".".join)
        path = draw(paths.filter(lambda p: p not in LEAVES and p != "seed"))
        spec["axes"][path] = [1]
        loc = ("axes", path)
    elif kind == "empty":
        path = draw(st.sampled_from(["model.steps", "model.arch", "optim.lr", "data.batch_size"]))
        spec["axes"][path] = []
        loc = ("axes", path)
    elif kind == "indivisible":
        i = draw(st.integers(0, 1))
        heads = spec["zip"][0]["model.heads"][i]
        spec["zip"][0]["model.width"][i] = draw(st.integers(1, 500).filter(lambda w: w % heads))
        loc = ("zip", 0, "model.width", i)
    elif kind == "patch":
        spec["axes"]["model.patch_size"] = [draw(st.integers(1, 40).filter(lambda p: 28 % p))]
        loc = ("axes", "model.patch_size", 0)
    elif kind == "zip length":
        spec["zip"][0]["model.heads"] += draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        loc = ("zip", 0)
    elif kind == "seed axis":
        spec["axes"]["seed"] = [0, 1]
        loc = ("axes", "seed")
    else:  # counted from the list lengths before any trial is built: 16 x n x m > MAX_TRIALS
        n = draw(st.integers(100, 400))
        spec["axes"]["optim.epochs"] = list(range(1, n + 1))
        spec["axes"]["optim.weight_decay"] = [i / 1000 for i in range(MAX_TRIALS // (16 * n) + 1)]
        return dump(spec), "axes: the grid has "
    return dump(spec), format_loc(loc)


@st.composite
def broken_yaml(draw):
    text = dump(VALID)
    lines = text.splitlines()
    kind = draw(st.sampled_from(["unclosed flow", "tab", "python tag", "duplicate key", "unclosed quote"]))
    if kind == "unclosed flow":
        lines.insert(draw(st.integers(0, len(lines))), "extra: [1, 2")
    elif kind == "tab":
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = "\t" + lines[i]
    elif kind == "python tag":
        call = draw(st.sampled_from(["os.system", "subprocess.call"]))
        lines[0] = f'name: !!python/object/apply:{call} ["true"]'
    elif kind == "duplicate key":
        lines.append(draw(st.sampled_from([f"{k}: null" for k in VALID])))
    else:
        lines.insert(draw(st.integers(0, len(lines))), 'description: "never closed')
    return "\n".join(lines) + "\n", "YAML error"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A folder for the fuzzed files; Typer's click command built once (per invoke it costs ~0.1 s)."""
    command = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(typer.testing, "_get_command", lambda _: command)
        yield tmp_path_factory.mktemp("fuzz")


def test_the_fuzzer_starts_from_a_valid_spec(fuzz_dir):
    path = write(fuzz_dir, VALID)
    assert invoke("validate", path).exit_code == 0


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=st.one_of(wrong_value(), unknown_key(), bad_axis(), broken_yaml()))
def test_malformed_specs_exit_2_with_a_field_path_message(fuzz_dir, case):
    text, where = case
    path = write(fuzz_dir, text)
    assert_invalid(invoke("validate", path), path, where)


def test_cli_starts_without_torch_and_bvit_names_load_on_use():
    """`bvit-sweep validate/plan/--help` must not pay for torch + timm (seconds on a small CPU)."""
    code = ("import sys, orchestrator.cli, orchestrator.spec, bvit.config; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'eager torch import'; "
            "import bvit, timm; assert 'bvit_base_patch16_224' not in timm.list_models('bvit*'); "
            "bvit.BViT; assert 'bvit_base_patch16_224' in timm.list_models('bvit*'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


@settings(max_examples=200, deadline=None)
@given(cpus=st.floats(0.01, 4096, allow_nan=False), gpus=st.integers(0, 64))
def test_per_trial_resources_beyond_this_machine_are_one_line_each(cpus, gpus):
    """The launch-time limit for an embedded local Ray: a trial asking for more than the machine has."""
    import os

    from orchestrator.preflight import _local_gpus, resource_problems

    lines = resource_problems(Resources(cpus=cpus, gpus=gpus, workers=max(gpus, 1)), source="x.yaml")
    expected = [f"x.yaml: resources.{kind}: " for kind, over in
                (("cpus", cpus > os.cpu_count()), ("gpus", gpus > _local_gpus())) if over]
    assert [line[:len(e)] for line, e in zip(lines, expected, strict=True)] == expected
    assert all("but this machine has" in line and "pass --address" in line for line in lines)


def test_a_tracking_store_given_as_a_path_is_its_sqlite_uri_or_one_line(tmp_path):
    from orchestrator.tracking import store_uri

    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").touch()
    assert store_uri(str(tmp_path / "mlflow")) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    r = invoke("analyze", str(tmp_path / "ckpt.pt"), "--tracking-uri", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip() == (f"--tracking-uri {tmp_path / 'nowhere'}: not an MLflow store; give a server "
                                "(http://127.0.0.1:5000), a SQLite URI (sqlite:///results/<sweep>/mlflow/mlflow.db) "
                                "or a results/<sweep>/mlflow directory that holds mlflow.db")
