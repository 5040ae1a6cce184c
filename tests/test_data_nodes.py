"""Data every node can reach: before any trial, a task pinned to each node compares the data files it sees with
the launcher's; a node that sees none (or other ones) is named in one line that says what to do."""
import shutil
import time

import pytest
import ray

from orchestrator import data_prep
from orchestrator.data_prep import check_data_on_nodes, data_fingerprints, node_data_problems
from orchestrator.errors import UserError


def _this_node() -> list[dict]:
    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n["NodeID"] == here]


def test_the_probe_runs_on_the_node_and_names_what_it_cannot_see(ray_local, fmnist_dir, tmp_path):
    """The real Ray task, pinned to this node: the prepared data matches; the same files expected at a path that
    exists here only under another name, or a copy with one file cut short, are reported as such."""
    expected = data_fingerprints([str(fmnist_dir)])
    node = _this_node()
    assert node_data_problems(expected, node) == {}

    renamed = str(tmp_path / "fashion-mnist-elsewhere")  # what the launcher saw, at a path this node lacks
    (bad,) = node_data_problems({renamed: expected[str(fmnist_dir)]}, node).values()
    assert bad == [f"{renamed}/meta.json missing", f"{renamed}/train.beton missing", f"{renamed}/test.beton missing"]

    copy = tmp_path / "copy"
    shutil.copytree(fmnist_dir, copy)
    with open(copy / "test.beton", "r+b") as f:
        f.truncate(1000)
    (bad,) = node_data_problems({str(copy): expected[str(fmnist_dir)]}, node).values()
    size = expected[str(fmnist_dir)]["test.beton"][0]
    assert bad == [f"{copy}/test.beton has 1,000 bytes, the launcher's {size:,}"]


def test_a_node_that_cannot_see_the_data_stops_the_launch_in_one_line_naming_it(ray_local, fmnist_dir, monkeypatch):
    """Two nodes, one of which sees no data (the per-node probe stands in for a second machine): one line
    naming that node and its missing files, and what to do."""
    nodes = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.5", "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.6", "Alive": True, "Resources": {"CPU": 4.0}}]
    monkeypatch.setattr(data_prep, "trial_nodes", lambda **kw: nodes)
    monkeypatch.setattr(data_prep, "node_data_problems", lambda expected, nodes, **kw: {
        "node 10.0.0.6 (bbbbbbbbbbbb)": [f"{d}/{name} missing" for d in expected for name in expected[d]]})
    with pytest.raises(UserError) as e:
        check_data_on_nodes({"data/fashion-mnist": str(fmnist_dir)})
    (line,) = e.value.lines
    assert line.startswith("data.path: 1 node(s) cannot read the data as prepared on the launcher (")
    assert f"node 10.0.0.6 (bbbbbbbbbbbb): {fmnist_dir}/meta.json missing, {fmnist_dir}/train.beton missing" in line
    assert "10.0.0.5" not in line
    assert line.endswith("put data.path on storage every node mounts at the same path (NFS, the cluster's shared "
                         "volume), or run `bvit-sweep data prepare` on each of those nodes to the same path, then "
                         "launch again")


def test_on_one_local_node_the_check_costs_well_under_a_second(ray_local, fmnist_dir):
    """The launcher's own node prepared the data, so a one-node run asks Ray only for its node list; the same check
    with this node probed too (its Ray task) passes."""
    t0 = time.perf_counter()
    check_data_on_nodes({"data/fashion-mnist": str(fmnist_dir)})
    took = time.perf_counter() - t0
    assert took < 0.5, f"{took:.2f} s"
    check_data_on_nodes({"data/fashion-mnist": str(fmnist_dir)}, skip_driver_node=False)
