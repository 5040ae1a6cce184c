"""The frontier's intervals and verdicts (from the per-seed values), slope.json, the headline, and rebuilding the
frontier from a committed trials.csv through the CLI."""
import csv
import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.frontier import frontier_table, summarize, transfer_table
from orchestrator.results import COLUMNS
from orchestrator.stats import compare, describe, width_slope

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
    cells = {(c["arch"], c["width"], c["steps"]): c for c in frontier_table(rows()).to_dict("records")}
    for a, w, t, vals in CELLS:
        d = describe(vals)
        assert (cells[a, w, t]["top1_ci_low"], cells[a, w, t]["top1_ci_high"]) == pytest.approx((d["ci_low"], d["ci_high"]))
    cmp = compare(bvit=[70.0, 70.5, 71.0], vit=[90.0, 90.4, 91.0])
    row = cells["bvit", 64, 2]
    assert row["gap_points"] == pytest.approx(cmp["gap"]) and row["recovered_fraction"] == pytest.approx(cmp["recovered"])
    for k in ("gap_ci_low", "gap_ci_high", "recovered_ci_low", "recovered_ci_high", "welch_p"):
        assert row[k] == pytest.approx(cmp[k])
    assert row["verdict"] == "bViT below ViT"
    assert cells["bvit", 32, 2]["verdict"] == "inconclusive (interval includes 0)"
    assert cells["vit", 32, 2]["verdict"] == ""


def test_slope_json_headline_and_error_bars(tmp_path):
    s = summarize(rows(), tmp_path, title="t")
    assert s.kind == "frontier" and set(s.paths) == {"frontier.csv", "slope.json", "frontier.png", "steps.png",
                                                      "recovered.png"}
    want = width_slope([{"width": w, "steps": t, "recovered": sum(b) / len(b) / (sum(v) / len(v))}
                        for (_, w, t, b), (_, _, _, v) in zip(CELLS[::2], CELLS[1::2], strict=True)])
    assert want["df"] == 1 and want["ci_low"] is not None
    for got in (json.loads((tmp_path / "slope.json").read_text()), s.slope):
        assert {k: got[k] for k in ("slope", "ci_low", "ci_high")} == pytest.approx({k: want[k] for k in ("slope", "ci_low", "ci_high")})
        assert got["widths"] == [16, 32, 64] and got["verdict"] == want["verdict"]
    assert "width 32, T=2: gap 1.00 points (95 % CI [" in s.headline
    assert "inconclusive (interval includes 0)" in s.headline and "bViT below ViT" in s.headline
    assert f"width slope (recovered fraction per doubling of width): {want['slope']:+.4f}" in s.headline
    one_width = summarize(rows(CELLS[:2]), tmp_path / "one")
    assert one_width.slope is None and "slope.json" not in one_width.paths


def test_transfer_cells_compare_each_method_with_full_fine_tuning():
    r = [{"status": "TERMINATED", "arch": "bvit", "width": 64, "steps": 4, "method": m, "rank": k, "params": 100,
          "trainable_params": p, "flops_per_image": 1, "final_test_top1": v}
         for m, k, p, vals in [("full", None, 100, [86.0, 87.0]), ("linear", None, 5, [50.0, 51.0]),
                               ("lora-step", 2, 20, [80.0, 88.0])] for v in vals]
    cells = transfer_table(r).set_index("method")
    assert cells.loc["linear", "gap_to_full"] == pytest.approx(36.0)
    assert cells.loc["linear", "verdict"] == "below full fine-tuning"
    assert cells.loc["lora-step", "verdict"] == "inconclusive (interval includes 0)"
    assert cells.loc["full", "top1_ci_low"] == pytest.approx(describe([86.0, 87.0])["ci_low"])


def write_trials(path, table):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


def test_frontier_command_rebuilds_from_a_committed_trials_csv(tmp_path):
    write_trials(tmp_path / "trials.csv", rows())
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "frontier" and doc["slope"]["widths"] == [16, 32, 64]
    assert {p.name for p in tmp_path.iterdir()} == {"trials.csv", "frontier.csv", "slope.json", "frontier.png",
                                                     "steps.png", "recovered.png"}
    assert (tmp_path / "frontier.csv").read_text().splitlines()[0].endswith("recovered_ci_high,welch_p,verdict")
    r = CliRunner().invoke(app, ["frontier", str(tmp_path / "trials.csv")])
    assert r.exit_code == 0 and "bViT below ViT" in r.stdout and "width slope" in r.stdout


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("trial_id,arch\nabc,bvit\n", "not a trials table (no column status, width, steps"),
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
