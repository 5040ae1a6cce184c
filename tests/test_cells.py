"""Every factor a spec varies is analysed as itself: cells and comparisons come from the spec (orchestrator.cells),
in frontier.csv, the headline, the run names, the progress table and the plan's warning."""
import csv
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _sweep_helpers import write_spec
from typer.testing import CliRunner

from orchestrator.cells import Design, Factor, column_names, design_of, design_of_table
from orchestrator.cli import app
from orchestrator.errors import InputWarning
from orchestrator.frontier import frontier_table, summarize
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def spec_file(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_column_names_are_the_last_part_unless_taken():
    assert column_names(["model.width", "model.mlp_ratio", "optim.lr"]) == {
        "model.width": "width", "model.mlp_ratio": "mlp_ratio", "optim.lr": "lr"}
    # `epochs` is a measured column and two paths end in `rank`: both keep their whole path
    assert column_names(["optim.epochs", "finetune.rank", "model.rank"]) == {
        "optim.epochs": "optim.epochs", "finetune.rank": "finetune.rank", "model.rank": "model.rank"}


def test_a_cell_is_every_varied_factor_but_seeds_and_the_compared_one(tmp_path):
    spec = load_spec(spec_file(tmp_path, """name: d
axes: {model.step_embed: [none, learned], optim.lr: [0.001, 0.002]}
zip: [{model.width: [32, 64], model.heads: [2, 4]}]
seeds: [0, 1, 2]
compare: {axis: model.step_embed, baseline: none}
"""))
    d = design_of(spec)
    assert [f.paths for f in d.factors] == [("model.step_embed",), ("optim.lr",), ("model.width", "model.heads")]
    bound = d.bind([{"step_embed": "none", "lr": 0.001, "width": 32, "heads": 2}])
    assert bound.arm_column == "step_embed" and bound.cell_columns == ["lr", "width", "heads"]
    row = {"step_embed": "learned", "lr": 0.002, "width": 64, "heads": 4}
    assert bound.label(row) == "step_embed learned · lr 0.002 · width 64 · heads 4"
    assert not bound.is_baseline(row) and bound.is_baseline({**row, "step_embed": "none"})
    assert bound.cell_key(row) == bound.cell_key({**row, "step_embed": "none", "width": 64.0})  # a CSV's 64.0
    # no compare and no architecture axis: per-cell statistics, nothing compared
    plain = design_of(load_spec(spec_file(tmp_path, "name: p\naxes: {model.mlp_ratio: [2.0, 4.0]}\n")))
    assert plain.compare is None and [f.columns for f in plain.factors] == [("mlp_ratio",)]


@pytest.mark.parametrize("compare, message", [
    ("{axis: model.width, baseline: 32}", "s.yaml: compare.axis: 'model.width' is not a varied axis of this sweep "
                                          "(varied: model.step_embed)"),
    ("{axis: model.step_embed, baseline: fixed}", "s.yaml: compare.baseline: 'fixed' is not a value of "
                                                  "model.step_embed (its values: none, learned)"),
    ("{axis: model.step_embed, baseline: none, trend: model.step_embed}", "compare.trend: 'model.step_embed' is "
                                                                          "not a varied axis other than"),
])
def test_a_compare_the_spec_cannot_hold_is_one_line_and_exit_2(tmp_path, compare, message):
    path = spec_file(tmp_path, f"name: c\naxes: {{model.step_embed: [none, learned]}}\ncompare: {compare}\n")
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_step_embed_results_rebuild_into_one_row_per_arm_with_their_own_params(tmp_path):
    """The committed step-embed sweep: two arms (6 seeds pooled before), each with its own parameter count and
    the gap's interval, computed by the tool from trials.csv and the spec's `compare`."""
    for name in ("trials.csv", "curves.csv", "spec.yaml"):
        shutil.copy(REPO / "results" / "step-embed" / name, tmp_path / name)
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv"), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["step_embed"]: row for row in read_csv(tmp_path / "frontier.csv")}
    assert set(rows) == {"none", "learned"}
    assert (rows["none"]["params"], rows["learned"]["params"]) == ("55114", "55370")  # + 4 steps x width 64
    assert rows["none"]["seeds"] == rows["learned"]["seeds"] == "3"
    learned = rows["learned"]
    assert learned["baseline"] == "step_embed none" and float(learned["gap_ci_low"]) < float(learned["gap_ci_high"])
    assert rows["none"]["gap_points"] == ""  # the baseline is compared with nothing


def test_a_factor_the_table_cannot_place_is_a_warning_never_a_silent_pool():
    rows = [{"trial_id": f"{e}{s}", "status": "TERMINATED", "seed": s, "params": p, "flops_per_image": 1,
             "final_test_top1": 80.0 + s} for s in range(3) for e, p in (("a", 100), ("b", 120))]
    design = Design((Factor(("model.step_embed",), ("step_embed",)),))
    with pytest.warns(InputWarning, match="no column for model.step_embed, which the sweep varies"):
        design.bind(rows)
    with pytest.warns(InputWarning, match="built models of 100 and 120 parameters"):
        cells = frontier_table(rows)  # nothing tells the two models apart: one pooled row, and it says so
    assert len(cells) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        rows = [{**r, "step_embed": "none" if r["params"] == 100 else "learned"} for r in rows]
        assert len(frontier_table(rows, design_of_table(rows))) == 2


def test_relaxed_arms_each_meet_the_baseline_of_their_cell(tmp_path):
    """Three architectures and a zip group: each non-baseline arm is compared with the baseline in its cell."""
    rows = [{"trial_id": f"{a}{r}{s}", "status": "TERMINATED", "arch": a, "relax_rank": r, "seed": s,
             "params": 1000 + 10 * r + (500 if a == "vit" else 0), "flops_per_image": 5,
             "final_test_top1": top1 + s} for a, r, top1 in (("bvit", 0, 70), ("rbvit", 2, 72), ("rbvit", 8, 74),
                                                             ("vit", 0, 75)) for s in range(3)]
    design = Design((Factor(("model.arch", "model.relax_rank"), ("arch", "relax_rank")),), "model.arch", "vit")
    s = summarize(rows, tmp_path, design=design)
    got = {(c["arch"], c["relax_rank"]): c for c in s.cells.to_dict("records")}
    assert got["rbvit", 8]["gap_points"] == pytest.approx(1.0) and got["bvit", 0]["gap_points"] == pytest.approx(5.0)
    assert pd.isna(got["vit", 0]["baseline"]) and got["rbvit", 2]["baseline"] == "arch vit"
    assert "arch rbvit · relax_rank 8 vs arch vit: gap 1.00 points" in s.headline


def test_a_swept_mlp_ratio_gets_its_own_rows_names_and_column(workdir, fmnist_dir):
    """End to end through `launch`: a bViT-only spec varying model.mlp_ratio (no compared axis) gives one frontier
    row per value with an `mlp_ratio` column, its own parameter count, and run names that say which value."""
    from mlflow.tracking import MlflowClient

    from orchestrator.launch import launch

    spec = write_spec(workdir / "mlp.yaml", fmnist_dir, name="mlp", epochs=1,
                      axes={"model.mlp_ratio": [1.0, 2.0]})
    result = launch(spec_path=spec, verbose=False)
    assert result.ok
    out = workdir / "results" / "mlp"
    trials = read_csv(out / "trials.csv")
    assert sorted(t["mlp_ratio"] for t in trials) == ["1.0", "2.0"]
    rows = {r["mlp_ratio"]: r for r in read_csv(out / "frontier.csv")}
    assert set(rows) == {"1", "2"} and rows["1"]["params"] != rows["2"]["params"]  # values as every label shows them
    by_ratio = {t["mlp_ratio"][0]: t for t in trials}
    assert all(rows[k]["params"] == by_ratio[k]["params"] for k in rows)
    assert rows["1"]["recovered_fraction"] == rows["1"]["baseline"] == ""  # nothing compared: no gaps
    assert yaml.safe_load((out / "spec.yaml").read_text())["axes"] == {"model.mlp_ratio": [1.0, 2.0]}
    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    names = sorted(r.info.run_name for r in client.search_runs([client.get_experiment_by_name("mlp").experiment_id])
                   if r.data.tags.get("bvit.role") == "trial")
    assert [n.split(" · top-1")[0] for n in names] == ["mlp_ratio 1 · seed 0", "mlp_ratio 2 · seed 0"]
    # the same rows from the sweep directory (`bvit-sweep frontier runs/mlp`), the factor's column kept
    (out / "frontier.csv").unlink()
    r = CliRunner().invoke(app, ["frontier", str(workdir / "runs" / "mlp"), "--json"])
    assert r.exit_code == 0, r.output
    assert {r["mlp_ratio"] for r in read_csv(out / "frontier.csv")} == {"1", "2"}
    r = CliRunner().invoke(app, ["status", str(workdir / "runs" / "mlp")])
    assert r.exit_code == 0 and "mlp_ratio" in r.stdout, r.output
