"""The intervals a sweep's summaries report: right numbers, right coverage, honest verdicts."""
import math

import numpy as np
import pytest
from scipy import stats as st

from orchestrator.stats import compare, corrected_verdict, describe, holm, trend_slope, verdict


def test_describe_matches_the_student_t_interval():
    d = describe([60.0, 62.0, 64.0])
    assert (d["mean"], d["sd"], d["n"]) == (62.0, 2.0, 3)
    half = 4.302652729911275 * 2.0 / math.sqrt(3)  # t(0.975, 2) from tables
    assert d["ci_low"] == pytest.approx(62.0 - half) and d["ci_high"] == pytest.approx(62.0 + half)
    assert describe([70.0]) == {"mean": 70.0, "sd": None, "n": 1, "ci_low": None, "ci_high": None}
    assert describe([float("nan"), 1.0, None])["n"] == 1


def test_gap_is_welchs_interval_and_labels_say_whether_it_excludes_zero():
    far = compare(arm=[50.0, 51.0, 52.0], baseline=[60.0, 61.0, 62.0])
    assert far["gap"] == pytest.approx(10.0) and far["verdict"] == "baseline ahead"
    assert far["gap_ci_low"] > 0 and far["welch_p"] < 0.01
    assert far["recovered"] == pytest.approx(51.0 / 61.0)
    assert far["recovered_ci_low"] < 51.0 / 61.0 < far["recovered_ci_high"] < 1.0
    near = compare(arm=[50.0, 55.0, 60.0], baseline=[52.0, 57.0, 53.0])
    assert near["verdict"] == "inconclusive (interval includes 0)"
    assert near["gap_ci_low"] < 0 < near["gap_ci_high"]
    assert near["recovered_ci_low"] < 1.0 < near["recovered_ci_high"]
    ahead = compare(arm=[70.0, 71.0, 72.0], baseline=[60.0, 61.0, 62.0])
    assert ahead["verdict"] == "arm ahead"
    assert compare(arm=[50.0], baseline=[60.0])["verdict"] == "inconclusive (too few seeds for an interval)"


def test_recovered_fraction_interval_has_its_nominal_coverage():
    rng = np.random.default_rng(0)
    mb, mv, sd, n, runs = 60.0, 66.0, 3.0, 4, 2000
    covered = 0
    for _ in range(runs):
        c = compare(arm=rng.normal(mb, sd, n).tolist(), baseline=rng.normal(mv, sd, n).tolist())
        covered += c["recovered_ci_low"] <= mb / mv <= c["recovered_ci_high"]
    assert 0.93 <= covered / runs <= 0.97  # binomial sd at 2000 runs: 0.5 points


def test_trend_slope_recovers_a_planted_slope_and_its_interval_covers_it():
    exact = [(w, s, 0.8 + 0.05 * math.log2(w / 16) + (0.02 if s == 4 else 0)) for w in (16, 32, 64) for s in (2, 4)]
    r = trend_slope(exact, factor="width")
    assert r["slope"] == pytest.approx(0.05) and r["df"] == 6 - 3
    assert r["ci_low"] == pytest.approx(0.05, abs=1e-9) and r["verdict"] == "supported: a larger width recovers more"
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(500):
        noisy = [(w, g, r + rng.normal(0, 0.02)) for w, g, r in exact]
        s = trend_slope(noisy)
        covered += s["ci_low"] <= 0.05 <= s["ci_high"]
    assert 0.92 <= covered / 500 <= 0.98


def test_trend_slope_is_inconclusive_when_flat_or_underdetermined():
    flat = [(w, 4, 0.9 + d) for w, d in ((16, .01), (32, -.02), (64, .01))]
    assert trend_slope(flat)["verdict"] == "inconclusive (interval includes 0)"
    assert trend_slope([(16, 4, 0.9)])["verdict"].startswith("inconclusive")
    two = trend_slope([(16, 4, 0.9), (32, 4, 0.95)])
    assert two["df"] == 0 and two["ci_low"] is None and two["verdict"].startswith("inconclusive")


def test_verdict_wording():
    assert verdict(0.1, 0.3, above="up", below="down") == "up"
    assert verdict(-0.3, -0.1, above="up", below="down") == "down"
    assert verdict(0.9, 1.1, null=1.0, above="up", below="down") == "inconclusive (interval includes 1)"
    assert st.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)


def test_holm_adjusts_like_the_hand_computed_step_down():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> 0.06 (never below the step before)
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == [] and holm([float("nan")]) == [None]


def test_a_verdict_significant_only_before_correction_says_so():
    # six comparisons, the README's width-64 p-values among them: 0.006 x6 = 0.036 holds, 0.025 x5 = 0.125 does not
    p = holm([0.172, 0.444, 0.566, 0.641, 0.025, 0.006])
    assert p[5] == pytest.approx(0.036) and p[4] == pytest.approx(0.125)
    assert corrected_verdict("bViT below ViT", p[5], m=6) == "bViT below ViT"
    assert corrected_verdict("bViT below ViT", p[4], m=6) == (
        "bViT below ViT before correction only (Holm-adjusted p 0.125 over 6 comparisons)")
    words = "inconclusive (interval includes 0)"
    assert corrected_verdict(words, 1.0, m=6) == words
