"""The frontier's intervals and verdicts (from the per-seed values), slope.json, the headline, and rebuilding the
frontier from a committed trials.csv through the CLI."""
import csv
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from orchestrator.cells import Design, Factor
from orchestrator.cli import app
from orchestrator.frontier import frontier_table, summarize, transfer_table
from orchestrator.results import COLUMNS
from orchestrator.stats import compare, describe, holm, trend_slope

# what sweeps/width.yaml declares: arch x width x steps, each bViT against the ViT of its cell, slope over width
DESIGN = Design(tuple(Factor((f"model.{c}",), (c,)) for c in ("arch", "width", "steps")),
                compare="model.arch", baseline="vit", trend="model.width")
SPEC = """name: t
axes: {model.arch: [bvit, vit], model.width: [16, 32, 64, 128], model.steps: [2, 4]}
compare: {axis: model.arch, baseline: vit, trend: model.width}
"""

# (arch, width, steps, [top-1 per seed]): at width 64 bViT is clearly below ViT, at width 32 it is not
CELLS = [("bvit", 32, 2, [80.0, 84.0]), ("vit", 32, 2, [81.0, 85.0]),
         ("bvit", 64, 2, [70.0, 70.5, 71.0]), ("vit", 64, 2, [90.0, 90.4, 91.0]),
         ("bvit", 16, 4, [50.0, 53.0]), ("vit", 16, 4, [55.0, 57.0]),
         ("bvit", 16, 2, [60.0, 62.0]), ("vit", 16, 2, [61.0, 64.0])]


def rows(cells=CELLS):
    return [{"trial_id": f"{a}{w}{t}{i}", "status": "TERMINATED", "arch": a, "width": w, "steps": t, "seed": i,
             "params": w * (1 if a == "bvit" else t), "flops_per_image": w * t, "final_test_top1": v}
            for a, w, t, vals in cells for i, v in enumerate(vals)]


def test_cells_carry_the_intervals_stats_computes_from_the_seeds():
    cells = {(c["arch"], c["width"], c["steps"]): c for c in frontier_table(rows(), DESIGN).to_dict("records")}
    for a, w, t, vals in CELLS:
        d = describe(vals)
        assert (cells[a, w, t]["top1_ci_low"], cells[a, w, t]["top1_ci_high"]) == pytest.approx((d["ci_low"], d["ci_high"]))
    cmp = compare(arm=[70.0, 70.5, 71.0], baseline=[90.0, 90.4, 91.0])
    row = cells["bvit", 64, 2]
    assert row["gap_points"] == pytest.approx(cmp["gap"]) and row["recovered_fraction"] == pytest.approx(cmp["recovered"])
    for k in ("gap_ci_low", "gap_ci_high", "recovered_ci_low", "recovered_ci_high", "welch_p"):
        assert row[k] == pytest.approx(cmp[k])
    assert row["verdict"] == "arch bvit below arch vit" and row["baseline"] == "arch vit"
    assert cells["bvit", 32, 2]["verdict"] == "inconclusive (interval includes 0)"
    assert cells["vit", 32, 2]["verdict"] == "" and pd.isna(cells["vit", 32, 2]["baseline"])


def test_slope_json_headline_and_error_bars(tmp_path):
    s = summarize(rows(), tmp_path, title="t", design=DESIGN)
    assert s.kind == "frontier" and set(s.paths) == {"frontier.csv", "slope.json", "frontier.png", "top1_vs_width.png",
                                                      "recovered.png"}
    want = trend_slope([(w, t, sum(b) / len(b) / (sum(v) / len(v)))
                        for (_, w, t, b), (_, _, _, v) in zip(CELLS[::2], CELLS[1::2], strict=True)], factor="width")
    assert want["df"] == 1 and want["ci_low"] is not None
    for got in (json.loads((tmp_path / "slope.json").read_text()), s.slope):
        assert {k: got[k] for k in ("slope", "ci_low", "ci_high")} == pytest.approx({k: want[k] for k in ("slope", "ci_low", "ci_high")})
        assert got["values"] == [16, 32, 64] and got["verdict"] == want["verdict"]
    assert "arch bvit · width 32 · steps 2 vs arch vit: gap 1.00 points (95 % CI [" in s.headline
    assert "inconclusive (interval includes 0)" in s.headline and "arch bvit below arch vit" in s.headline
    assert f"width slope (recovered fraction per doubling of width): {want['slope']:+.4f}" in s.headline
    one_width = summarize(rows(CELLS[:2]), tmp_path / "one", design=DESIGN)
    assert one_width.slope is None and "slope.json" not in one_width.paths


def test_transfer_cells_compare_each_method_with_full_fine_tuning():
    r = [{"status": "TERMINATED", "arch": "bvit", "width": 64, "steps": 4, "method": m, "rank": k, "params": 100,
          "trainable_params": p, "flops_per_image": 1, "final_test_top1": v}
         for m, k, p, vals in [("full", None, 100, [86.0, 87.0]), ("linear", None, 5, [50.0, 51.0]),
                               ("lora-step", 2, 20, [80.0, 88.0])] for v in vals]
    method = Design((Factor(("finetune.method", "finetune.rank"), ("method", "rank")),), "finetune.method", "full")
    cells = transfer_table(r, method).set_index("method")
    assert cells.loc["linear", "gap_points"] == pytest.approx(36.0)
    assert cells.loc["linear", "verdict"] == "method linear below method full"
    assert cells.loc["lora-step", "verdict"] == "inconclusive (interval includes 0)"
    assert cells.loc["full", "top1_ci_low"] == pytest.approx(describe([86.0, 87.0])["ci_low"])


def write_trials(path, table, columns=COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


def test_frontier_command_rebuilds_from_a_committed_trials_csv(tmp_path):
    before = [c for c in COLUMNS if c != "still_improving"]  # results from before convergence was reported
    write_trials(tmp_path / "trials.csv", rows(), before)
    (tmp_path / "spec.yaml").write_text(SPEC)
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "frontier" and doc["slope"]["values"] == [16, 32, 64]
    assert doc["factors"] == ["arch", "width", "steps"]
    assert {p.name for p in tmp_path.iterdir()} == {"trials.csv", "spec.yaml", "frontier.csv", "slope.json", "frontier.png",
                                                     "top1_vs_width.png", "recovered.png"}  # no curves.csv: no curves.png
    assert (tmp_path / "frontier.csv").read_text().splitlines()[0].endswith("recovered_ci_high,welch_p,welch_p_holm,verdict")
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv")])
    assert r.exit_code == 0 and "arch bvit below arch vit" in r.stdout and "width slope" in r.stdout
    assert "convergence not recorded (the trial table has no still_improving column)" in r.stdout
    write_trials(tmp_path / "trials.csv", rows())  # the column, blank: no trial ran two epochs
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv")])
    assert r.exit_code == 0 and "convergence unknown: no finished trial recorded two epochs to compare" in r.stdout


def flagged(still):
    """rows() with `still_improving` from {(arch, width, steps): [flag per seed]} (False where not given)."""
    out = rows()
    for r in out:
        r["still_improving"] = still.get((r["arch"], r["width"], r["steps"]), [False] * 3)[r["seed"]]
    return out


def test_cells_count_the_seeds_still_improving_and_the_headline_says_accuracies_are_not_converged(tmp_path):
    s = summarize(flagged({("bvit", 64, 2): [True, True, False], ("vit", 16, 4): [None, True]}), tmp_path, design=DESIGN)
    cells = s.cells.set_index(["arch", "width", "steps"])["still_improving"]
    assert cells["bvit", 64, 2] == 2 and cells["vit", 16, 4] == 1 and cells["vit", 64, 2] == 0
    assert s.headline.splitlines()[0] == (
        "3 of 17 trials were still improving at the end: accuracies are not converged (arch bvit · width 64 · steps 2: "
        "2 of 3; arch vit · width 16 · steps 4: 1 of 1; 1 more without two recorded epochs)")
    with open(tmp_path / "frontier.csv") as f:
        assert {(r["arch"], r["width"], r["steps"]): r["still_improving"] for r in csv.DictReader(f)}["bvit", "64", "2"] == "2"
    assert summarize(flagged({}), tmp_path, design=DESIGN).headline.splitlines()[0] == (
        "none of the 18 trials was still improving at the end")


def test_holm_adjusts_the_tables_comparisons_together_and_the_verdict_says_when_only_before(tmp_path):
    more = CELLS + [("bvit", 128, 2, [70.0, 71.0, 72.0]), ("vit", 128, 2, [73.0, 74.0, 75.0])]  # Welch p 0.021
    cells = {(c["arch"], c["width"], c["steps"]): c
             for c in summarize(rows(more), tmp_path, design=DESIGN).cells.to_dict("records")}
    pairs = [(w, t) for a, w, t, _ in more if a == "bvit"]
    p = [cells["bvit", w, t]["welch_p"] for w, t in pairs]
    assert [cells["bvit", w, t]["welch_p_holm"] for w, t in pairs] == pytest.approx(holm(p))
    # the smallest p times 5, the next (width 128's) times 4: 0.021 x 4 = 0.085, no longer below 0.05
    assert cells["bvit", 64, 2]["welch_p_holm"] == pytest.approx(5 * cells["bvit", 64, 2]["welch_p"])
    assert cells["bvit", 128, 2]["welch_p"] < 0.05 < cells["bvit", 128, 2]["welch_p_holm"] == pytest.approx(
        4 * cells["bvit", 128, 2]["welch_p"])
    assert cells["bvit", 64, 2]["verdict"] == "arch bvit below arch vit"
    assert cells["bvit", 128, 2]["verdict"] == (
        "arch bvit below arch vit before correction only (Holm-adjusted p 0.0852 over 5 comparisons)")
    assert cells["bvit", 32, 2]["verdict"] == "inconclusive (interval includes 0)"


def test_frontier_command_uses_a_committed_curves_csv_when_there_is_one(tmp_path):
    table = flagged({("bvit", 64, 2): [True, False, False]})
    write_trials(tmp_path / "trials.csv", table)
    with open(tmp_path / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "arch", "width", "steps", "seed", "epoch", "train_loss", "test_loss", "test_top1"])
        w.writerows([r["trial_id"], r["arch"], r["width"], r["steps"], r["seed"], e, 2.0 / e, "", r["final_test_top1"] * e / 2]
                    for r in table for e in (1, 2))
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert str(tmp_path / "curves.png") in doc["files"] and (tmp_path / "curves.png").stat().st_size > 10_000
    assert doc["headline"].startswith("1 of 18 trials were still improving at the end: accuracies are not converged")
    assert {(c["arch"], c["width"], c["steps"]): c["still_improving"] for c in doc["cells"]}["bvit", "64", "2"] == 1
    (tmp_path / "curves.csv").write_text("epoch\n1\n")
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv")])
    assert r.exit_code == 2 and r.stderr.strip() == f"{tmp_path / 'curves.csv'}: not a curves table (no column trial_id, train_loss)"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("trial_id,arch\nabc,bvit\n", "not a trials table (no column status, params, flops_per_image"),
    ('a,"b\n1,2\n', "not a readable CSV"),
    (",".join(COLUMNS) + "\n", "no finished trials"),
])
def test_frontier_command_bad_trials_csv_gives_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "trials.csv"
    if content is not None:
        path.write_text(content)
    r = CliRunner().invoke(app, ["frontier", str(path)])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and str(path) in r.stderr
