"""Bad input found by an adversarial new user: each is one line naming the file or value, exit 2, no traceback."""
import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _one_line(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    (line,) = result.stderr.splitlines()
    for part in expected:
        assert part in line, line
    return line


@pytest.fixture
def data_copy(tmp_path, fmnist_dir) -> Path:
    out = tmp_path / "data"
    shutil.copytree(fmnist_dir, out)
    return out


@pytest.mark.parametrize("field,value,says", [("files", "x", "files should be a mapping of file name"),
                                              ("mean", "abc", "mean should be a list of numbers"),
                                              ("image_shape", [1, 28], "image_shape should be 3 numbers")])
def test_meta_json_with_a_field_of_the_wrong_type(data_copy, field, value, says):
    meta = json.loads((data_copy / "meta.json").read_text())
    meta[field] = value
    (data_copy / "meta.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(app, ["data", "verify", str(data_copy)])
    _one_line(r, str(data_copy / "meta.json"), says)


def test_a_forged_beton_whose_checksum_matches_is_a_data_error(data_copy):
    """FFCV's field descriptions overwritten and meta.json's checksums made to match: it passes verification,
    and opening it is one DataError naming the file (what a trial turns into a failure without retries)."""
    from bvit.config import DataConfig
    from bvit.data.format import DataError, file_digest
    from bvit.data.loaders import make_loaders

    meta = json.loads((data_copy / "meta.json").read_text())
    for name in ("train.beton", "test.beton"):
        data = bytearray((data_copy / name).read_bytes())
        data[24:24 + 2 * 1041] = b"\xff" * (2 * 1041)  # after FFCV's 24-byte header: its field descriptions
        (data_copy / name).write_bytes(bytes(data))
        meta["files"][name]["digest"] = file_digest(data_copy / name)
    (data_copy / "meta.json").write_text(json.dumps(meta))
    assert CliRunner().invoke(app, ["data", "verify", str(data_copy)]).exit_code == 0  # the forgery verifies
    with pytest.raises(DataError, match=rf"^{data_copy / 'train.beton'}: not an FFCV file this project can read"):
        make_loaders(DataConfig(path=str(data_copy), train_subset=256, batch_size=32), img_size=28, seed=0)


def test_data_prepare_never_writes_over_what_is_not_prepared_data(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    r = CliRunner().invoke(app, ["data", "prepare", "fashion-mnist", "--out", str(precious)])
    _one_line(r, f"{precious}: exists and is not a directory")
    assert precious.read_text() == "mine"
    r = CliRunner().invoke(app, ["data", "prepare", "fashion-mnist", "--out", str(tmp_path)])
    _one_line(r, f"{tmp_path}: holds files that are not prepared data (notes.txt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_timing_skips_a_garbage_line_in_launches_jsonl(tmp_path):
    from orchestrator.timing import LAUNCHES, sweep_timing

    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "result.json").write_text(json.dumps(
        {"epoch": 1, "trial_started_at": 100.0, "phase_import_s": 1.0, "reported_at": 110.0}) + "\n")
    (tmp_path / LAUNCHES).write_text('{"started_at": 90.0, "ray_ready_at": 95.0}\ngarbage\n5\n{"started_at": "x"}\n')
    rows, summary = sweep_timing(tmp_path)
    assert summary["launch"]["ray_ready_s"] == 5.0 and summary["launch"]["first_trial_start_s"] == 10.0


def test_frontier_of_a_trials_csv_with_an_unknown_arch_analyses_it_as_its_own_arm(tmp_path):
    """The analysis names no architecture (orchestrator.cells): an arch this version has never heard of is one
    more arm, in its own row, compared with the baseline of its cell -- not a KeyError, not a refusal."""
    import csv as csvlib

    csv = tmp_path / "trials.csv"
    lines = (ROOT / "results" / "width" / "trials.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",bvit,", ",resnet,", 1)
    csv.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["frontier", str(csv)])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "frontier.csv") as f:
        rows = [row for row in csvlib.DictReader(f) if row["arch"] == "resnet"]
    assert len(rows) == 1 and rows[0]["seeds"] == "1" and rows[0]["baseline"] == "arch vit"


@pytest.mark.parametrize("host", ["256.1.1.1", "10.255.255.254"])
def test_ui_on_an_address_that_is_not_this_machines(tmp_path, host):
    r = CliRunner().invoke(app, ["ui", "--host", host, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    _one_line(r, f"--host {host}: not an address")


def test_analyze_checks_the_tracking_server_before_the_analysis(tmp_path, free_port):
    from orchestrator.analyze import check_server
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match=rf"127.0.0.1:{free_port}: cannot reach the MLflow server \(nothing answers"):
        check_server(f"http://127.0.0.1:{free_port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_server(f"http://127.0.0.1:{s.getsockname()[1]}")  # something answers: no error
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a"),
                                 "--tracking-uri", f"http://127.0.0.1:{free_port}"])
    _one_line(r, "cannot reach the MLflow server")


def test_a_ray_other_than_the_one_the_patches_were_written_for_is_one_line(monkeypatch):
    from orchestrator.errors import UserError
    from orchestrator.patches import ALLOW_ENV, check_ray_version

    check_ray_version("2.60.7")  # any 2.60.x
    with pytest.raises(UserError, match=r"^ray 2.61.0 is installed, but bvit-sweep's launcher patches Ray internals "
                                        r"written for ray 2.60.x .*BVIT_SWEEP_UNTESTED_RAY=1"):
        check_ray_version("2.61.0")
    monkeypatch.setenv(ALLOW_ENV, "1")
    check_ray_version("2.61.0")
