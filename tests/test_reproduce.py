"""The committed results are what their spec and code give: a trial of results/width, trained again here, gives
its trials.csv row bit for bit -- on the CPU type and software run.json says it was computed on (README's
reproducibility contract). Elsewhere the test says why it cannot hold and skips."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bvit.trial import run_trial
from orchestrator.provenance import machine_provenance
from orchestrator.spec import expand_trials, load_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "width"
# What decides the float kernels a trial runs (oneDNN and MKL pick them by ISA) and the numbers they give.
SAME = ("cpu_model", "cpu_isa", "torch_onednn", "torch_mkl", "torch_threads")


def _differences(recorded: dict, here: dict) -> list[str]:
    out = [f"{k}: {recorded.get(k)!r} there, {here.get(k)!r} here" for k in SAME if recorded.get(k) != here.get(k)]
    if recorded.get("versions", {}).get("torch") != here["versions"]["torch"]:
        out.append(f"torch {recorded.get('versions', {}).get('torch')} there, {here['versions']['torch']} here")
    return out


@pytest.mark.slow  # about a minute of training on the 2-core CPU
def test_the_cheapest_committed_width_trial_trains_to_its_committed_numbers_bit_for_bit(fmnist_dir):
    run = json.loads((RESULTS / "run.json").read_text())
    machines = run.get("trial_machines") or []
    assert machines, "results/width/run.json records no trial machine: rerun `make sweep` to record provenance"
    with open(RESULTS / "trials.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    trials = {t.id: t for t in expand_trials(load_spec(ROOT / "sweeps" / "width.yaml"))}
    assert set(rows) == set(trials), "results/width is not the committed spec's sweep"
    tid = min(rows, key=lambda t: (int(rows[t]["flops_per_image"]), int(rows[t]["params"]), t))
    machine = next(m for m in machines if tid in m.get("trials", [tid]))
    here = machine_provenance(with_torch=True)
    if differences := _differences(machine, here):
        pytest.skip(f"results/width was computed elsewhere ({'; '.join(differences)}): bit-identity holds only on "
                    "the same CPU type and software")

    cfg = trials[tid].config.model_copy(update={"data": trials[tid].config.data.model_copy(update={"path": str(fmnist_dir)})})
    out = run_trial(cfg, trial_id=tid)
    row = rows[tid]
    assert out["trial_id"] == tid
    # The CSV holds Python's shortest repr of each float: equal strings are equal bits.
    assert repr(float(out["train_loss"])) == repr(float(row["final_train_loss"]))
    assert repr(float(out["test_loss"])) == repr(float(row["final_test_loss"]))
    assert float(out["test_top1"]) == float(row["final_test_top1"])
