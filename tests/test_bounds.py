"""Specs are bounded before anything is built: an alias bomb, a deep document, /dev/zero, a huge file or list
is refused with one line and exit 2, within a small memory budget (peak RSS of the `bvit-sweep` process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.spec.bounds import MAX_DEPTH, MAX_ENTRIES, MAX_VALUES

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT_KB = 200 * 1024


def _bomb(where: str) -> str:
    """A billion-laughs document (9^9 ~ 3.9e8 strings once expanded) placed under `where`."""
    lines = [f'    l0: &l0 [{", ".join(["lol"] * 9)}]']
    lines += [f'    l{i}: &l{i} [{", ".join([f"*l{i - 1}"] * 9)}]' for i in range(1, 9)]
    body = "\n".join(lines)
    if where == "smoke.base":
        return f"name: b\nsmoke:\n  base:\n{body}\n"
    return f"name: b\n{where}:\n{body.replace('    ', '  ')}\n"


# The child reports its own peak RSS (VmHWM: the high-water mark of this process image since exec). Not
# getrusage: a child's ru_maxrss keeps the forking parent's peak (pytest with torch loaded) across exec.
_CHILD = """
import atexit, re, sys
def peak():
    hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
    sys.stderr.write("PEAK_RSS_KB " + hwm + "\\n")
atexit.register(peak)
from orchestrator.cli import app
app()
"""


def _validate(path: str) -> tuple[int, str, int]:
    """(exit code, stderr without the RSS line, peak RSS in KB) of `bvit-sweep validate PATH` in a fresh
    process."""
    p = subprocess.run([sys.executable, "-c", _CHILD, "validate", path], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    lines = p.stderr.splitlines()
    rss = [int(line.split()[1]) for line in lines if line.startswith("PEAK_RSS_KB ")]
    err = "\n".join(line for line in lines if not line.startswith("PEAK_RSS_KB "))
    return p.returncode, err, rss[0]


@pytest.mark.parametrize("case", ["bomb-smoke.base", "bomb-base", "deep-list", "deep-mapping", "dev-zero",
                                  "2-MiB-file", "long-list"])
def test_unbounded_specs_are_refused_in_one_line_with_little_memory(tmp_path, case):
    path = tmp_path / "spec.yaml"
    if case.startswith("bomb-"):
        path.write_text(_bomb(case.removeprefix("bomb-")))
        expected = f"aliases expand to more than {MAX_VALUES:,} values"
    elif case == "deep-list":
        path.write_text("name: d\nbase: " + "[" * 20_000 + "]" * 20_000 + "\n")
        expected = f"nested more than {MAX_DEPTH} levels deep"
    elif case == "deep-mapping":
        path.write_text("name: d\nbase:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 200)) + " " * 200 + "v\n")
        expected = f"nested more than {MAX_DEPTH} levels deep"
    elif case == "dev-zero":
        path = Path("/dev/zero")
        expected = "larger than 1,024 KiB"
    elif case == "2-MiB-file":
        path.write_text("name: big\n" + "# padding\n" * 210_000)
        expected = "larger than 1,024 KiB"
    else:
        path.write_text("name: s\nseeds: [" + ", ".join(map(str, range(MAX_ENTRIES + 1))) + "]\n")
        expected = f"a list has more than {MAX_ENTRIES:,} entries"
    code, err, rss_kb = _validate(str(path))
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{path}: ") and expected in err, err
    assert rss_kb < RSS_LIMIT_KB, f"peak RSS {rss_kb / 1024:.0f} MB"


def test_the_shipped_specs_are_within_the_bounds():
    from orchestrator.spec import validate_file

    for spec in sorted((ROOT / "sweeps").glob("*.yaml")):
        assert validate_file(path=spec).trials


def test_a_set_value_is_bounded_too(tmp_path):
    from orchestrator.errors import InputError
    from orchestrator.spec.expand import config_with_overrides

    with pytest.raises(InputError, match="nested more than"):
        config_with_overrides({}, ["model.width=" + "[" * 100 + "]" * 100], source="--set")
