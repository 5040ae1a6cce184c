"""Convergence, reported: each trial's learning curve (curves.csv), whether it was still improving at its end
(trials.csv's still_improving, by the spec's `convergence`), and the spec's checks on that setting."""
import csv

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.curves import epoch_curve, still_improving
from orchestrator.results import TrialTable, write_results
from orchestrator.spec import Convergence, SweepSpec


def curve(*losses, top1=None):
    """Epochs 1.. with these train losses (and test top-1 per epoch, None: not scored)."""
    top1 = top1 or [None] * len(losses)
    return [{"epoch": e, "train_loss": v, "test_top1": t} for e, (v, t) in enumerate(zip(losses, top1, strict=True), 1)]


def test_epoch_curve_keeps_one_record_per_epoch_and_test_scores_only_where_scored():
    records = [{"epoch": 1, "train_loss": 2.0},                      # eval_every=2: not scored
               {"epoch": 2, "train_loss": 1.5, "test_top1": 50.0},
               {"epoch": 2, "train_loss": 1.4, "test_top1": 55.0},   # epoch 2 again after a restart: the last counts
               {"epoch": 3, "train_loss": 1.2, "test_top1": 55.0},   # fit repeats epoch 2's score: not a measurement
               {"epoch": float("nan"), "failed": "diverged"}]
    got = epoch_curve(records, eval_every=2, epochs=4)
    assert [(r["epoch"], r["train_loss"], r["test_top1"]) for r in got] == [(1, 2.0, None), (2, 1.4, 55.0), (3, 1.2, None)]
    assert epoch_curve(records, eval_every=2, epochs=3)[-1]["test_top1"] == 55.0  # the last epoch is always scored


@pytest.mark.parametrize("points, convergence, expected", [
    (curve(1.2, 1.0, 0.985), Convergence(), True),                   # 1.5 % in the last epoch > 1 %
    (curve(1.2, 1.0, 0.995), Convergence(), False),                  # 0.5 % <= 1 %
    (curve(1.2, 1.0, 0.985), Convergence(min_gain=0.02), False),     # 1.5 % <= 2 %
    (curve(1.2, 1.0, 1.05), Convergence(min_gain=0.0), False),       # got worse: not improving
    (curve(1.0), Convergence(), None),                               # one epoch: nothing to compare
    # test top-1 is better when larger; scored at epochs 2 and 4 only: 80 -> 81.5 is 1.875 % over 2 epochs
    (curve(1, 1, 1, 1, top1=[None, 80.0, None, 81.5]), Convergence(metric="test_top1"), False),
    (curve(1, 1, 1, 1, top1=[None, 80.0, None, 82.0]), Convergence(metric="test_top1"), True),  # 1.25 % / epoch
    (curve(1, 1, top1=[None, 80.0]), Convergence(metric="test_top1"), None),
])
def test_still_improving_compares_the_last_two_recorded_epochs_with_the_threshold(points, convergence, expected):
    assert still_improving(points, convergence) is expected


def test_write_results_writes_the_curves_and_the_flag_beside_the_trial_table(tmp_path):
    cell = {"arch": "bvit", "width": 32, "steps": 2, "heads": 2}
    rows = [{"trial_id": f"t{seed}", "status": "TERMINATED", **cell, "seed": seed, "optim.lr": 0.001, "params": 10,
             "final_test_top1": 50.0, "epochs": 2, "still_improving": seed == 0, "error": ""} for seed in (0, 1)]
    history = [{"epoch": 1, "train_loss": 2.0, "node_ip": "10.0.0.2"},  # then its node died: epoch 2 on another
               {"epoch": 2, "train_loss": 1.0, "test_top1": 50.0, "node_ip": "10.0.0.3"}]
    table = TrialTable(rows, curves={"t0": epoch_curve(history, epochs=2),
                                     "t1": []})  # a trial with no epoch yet has no lines
    write_results(table, spec=SweepSpec(name="t"), command="bvit-sweep launch t.yaml", results_dir=tmp_path,
                  sweep_dir=tmp_path / "runs", sha="abc")
    with open(tmp_path / "curves.csv") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == ["trial_id", "arch", "width", "steps", "heads", "seed", "optim.lr", "epoch", "train_loss",
                              "test_loss", "test_top1", "test_top5", "node"]
    assert [(r["trial_id"], r["epoch"], r["train_loss"], r["test_top1"], r["node"]) for r in lines] == [
        ("t0", "1", "2.0", "", "10.0.0.2"), ("t0", "2", "1.0", "50.0", "10.0.0.3")]
    with open(tmp_path / "trials.csv") as f:
        assert [r["still_improving"] for r in csv.DictReader(f)] == ["True", "False"]
    # the threshold behind the flag is in the results folder, even when the spec left it at its default
    assert yaml.safe_load((tmp_path / "spec.yaml").read_text())["convergence"] == {"metric": "train_loss", "min_gain": 0.01}
    write_results(rows, spec=SweepSpec(name="t"), command="c", results_dir=tmp_path / "plain", sweep_dir=tmp_path, sha="a")
    assert not (tmp_path / "plain" / "curves.csv").exists()  # plain rows: no curves known, none invented


def test_convergence_defaults_and_bad_settings_are_one_line_each(tmp_path):
    assert SweepSpec(name="a").convergence == Convergence(metric="train_loss", min_gain=0.01)
    path = tmp_path / "s.yaml"
    for bad, message in [({"min_gain": 5}, "convergence.min_gain: min_gain=5: a relative gain per epoch, a fraction in "
                                           "[0, 1) (0.01: 1 % better than the epoch before); for 5 % write 0.05"),
                         ({"min_gain": -0.1}, "convergence.min_gain: min_gain=-0.1: a relative gain per epoch"),
                         ({"metric": "accuracy"}, "convergence.metric: "),
                         ({"min_gian": 0.1}, "convergence.min_gian: ")]:
        path.write_text(yaml.safe_dump({"name": "a", "convergence": bad}))
        r = CliRunner().invoke(app, ["validate", str(path)])
        assert r.exit_code == 2, r.output
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and f"{path}: {message}" in r.stderr


def _grid_curves(cells: int):
    """Two epochs of one trial per cell, cell i ending at top-1 50 + i / 10."""
    import pandas as pd

    return pd.DataFrame([{"trial_id": f"t{i}", "lr": i, "epoch": e, "train_loss": 2.0 / e,
                          "test_top1": 40 + e * (5 + i / 20)} for i in range(cells) for e in (1, 2)])


def test_curves_of_a_thousand_cell_grid_draw_the_best_panels_and_say_so(tmp_path):
    """A panel per cell broke past ~170 cells (matplotlib refuses an image 2^16 px wide): a large grid's
    curves.png has `MAX_PANELS` panels, those of the best cells, and its title says it."""
    from PIL import Image

    from orchestrator.curves import MAX_PANELS, plot_curves

    titles = []
    import matplotlib.figure

    real = matplotlib.figure.Figure.suptitle

    def spy(self, t, **kw):
        titles.append(t)
        return real(self, t, **kw)

    matplotlib.figure.Figure.suptitle = spy
    try:
        big = plot_curves(_grid_curves(1000), tmp_path / "big.png", panel=lambda r: f"lr {r['lr']}", line=lambda r: "")
        few = plot_curves(_grid_curves(3), tmp_path / "few.png", panel=lambda r: f"lr {r['lr']}", line=lambda r: "")
    finally:
        matplotlib.figure.Figure.suptitle = real
    assert Image.open(big).width == Image.open(few).width * MAX_PANELS // 3
    assert f"best {MAX_PANELS} of 1000 cells by final test top-1" in titles[0]
    assert "best" not in titles[1]


def test_best_groups_keeps_the_highest_scores_in_their_order_and_unscored_last():
    import math

    from orchestrator.curves import best_groups

    groups = [(k, None) for k in "abcde"]
    scores = {"a": 3.0, "b": math.nan, "c": 9.0, "d": 1.0, "e": 7.0}
    kept, note = best_groups(groups, scores, limit=3)
    assert [k for k, _ in kept] == ["a", "c", "e"] and note == "best 3 of 5"
    assert best_groups(groups, {"b": 1.0}, limit=1)[0] == [("b", None)]  # unscored keys rank last
    assert best_groups(groups, scores, limit=5) == (groups, "")
