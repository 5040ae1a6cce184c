"""The MLflow dashboard as a researcher meets it: `bvit-sweep ui` on a small sweep's store, driven in Debian's
Chromium (its real binary, through Playwright; scripts/setup.sh installs both), plus the store's layout:
one run per trial and one row per cell however often `frontier` and `sync` run.

Screenshots land in the browser test's tmp dir (screenshots/*.png): look at them when this changes.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sweep_helpers import write_spec
from mlflow.tracking import MlflowClient

from orchestrator.launch import launch
from orchestrator.sweep_dir import resolve_sweep, sweep_frontier, sweep_sync

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/lib/chromium/chromium")  # Debian's ELF; /usr/bin/chromium is a shell wrapper
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _launched(tmp_path_factory, fmnist_dir, name: str, **spec_kw):
    """A finished sweep of `write_spec(..., **spec_kw)` launched in its own directory, with its MLflow store."""
    work = tmp_path_factory.mktemp(name)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = launch(spec_path=write_spec(work / f"{name}.yaml", fmnist_dir, name=name, **spec_kw), verbose=False)
    finally:
        os.chdir(cwd)
    assert result.ok
    return work, result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fmnist_dir, ray_local):
    """A finished 2-trial sweep (bvit and vit, width 32, 2 steps, 2 epochs) with its local MLflow store; system
    metrics sampled every second (the default is 10 s)."""
    return _launched(tmp_path_factory, fmnist_dir, "dash", tracking={"system_metrics_s": 1})


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, fmnist_dir, ray_local):
    """A finished 4-trial sweep over width and steps (bViT, 2 epochs) with its local MLflow store."""
    return _launched(tmp_path_factory, fmnist_dir, "grid", axes={"model.width": [16, 32], "model.steps": [1, 2]})


def _store(work: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{work / 'results' / 'dash' / 'mlflow' / 'mlflow.db'}")
    return client, client.get_experiment_by_name("dash").experiment_id


def test_launch_then_frontier_twice_then_sync_leaves_one_copy_of_everything(sweep, monkeypatch):
    work, result = sweep
    monkeypatch.chdir(work)
    s = resolve_sweep(str(work / "runs" / "dash"))
    for _ in range(2):
        sweep_frontier(s)
    sweep_sync(s)
    client, exp = _store(work)
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("bvit.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("bvit.role") == "trial"]
    assert len(parents) == 1
    assert sorted(c.data.tags["bvit.trial_id"] for c in children) == sorted(r["trial_id"] for r in result.trials)
    parent = parents[0]
    path = client.download_artifacts(parent.info.run_id, "frontier/frontier_table.json", str(work / "dl"))
    table = json.loads(Path(path).read_text())
    cells = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert sorted(c["arch"] for c in cells) == ["bvit", "vit"]  # the one factor the spec varies: one row per arm
    assert [c["baseline"] for c in sorted(cells, key=lambda c: c["arch"])] == ["arch vit", None]
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "frontier/frontier_table.json", "type": "table"}]
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "best_final_test_top1")] == [
        max(r["final_test_top1"] for r in result.trials)]
    # What the parent tells a reader: the answer, the command, the code, the spec and run.json.
    note = parent.data.tags["mlflow.note.content"]
    assert "| arch | params |" in note and "frontier.png" in note and "compared with" in note
    sha = json.loads((work / "results" / "dash" / "run.json").read_text())["git_sha"]
    assert parent.data.tags["mlflow.source.git.commit"] == sha != "unknown"
    assert parent.data.tags["mlflow.source.name"].startswith("bvit-sweep launch")
    assert {"spec.yaml", "run.json", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # Children are named for what they are and carry the final top-1 the saved view orders them by.
    best = max(result.trials, key=lambda r: r["final_test_top1"])
    by_trial = {c.data.tags["bvit.trial_id"]: c for c in children}
    assert by_trial[best["trial_id"]].info.run_name == (
        f"arch {best['arch']} · seed 0 · top-1 {best['final_test_top1']:.1f} %")
    assert by_trial[best["trial_id"]].data.metrics["final_test_top1"] == float(f"{best['final_test_top1']:.5g}")
    # Each trial's system metrics, sampled while it trained, in its own run (its "System metrics" tab).
    for c in children:
        cpu = client.get_metric_history(c.info.run_id, "system/cpu_utilization_percentage")
        memory = client.get_metric_history(c.info.run_id, "system/system_memory_usage_megabytes")
        assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu))), cpu  # one a second, at least 2 s
        assert [m.step for m in memory] == [m.step for m in cpu] and all(m.value > 0 for m in memory)
        assert all(0 <= m.value <= 100 for m in cpu)
        assert c.info.start_time <= min(m.timestamp for m in cpu)  # while the trial ran (the last: as it ended)
        assert max(m.timestamp for m in cpu) <= c.info.end_time + 15_000
        assert c.info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ui(work: Path, port: int, sweep: str = "runs/dash") -> tuple[subprocess.Popen, str, str]:
    """`bvit-sweep ui` as a user runs it (this checkout's code); returns the process, the URL it printed and the
    one it printed below it (the runs grouped by cell)."""
    exe = str(Path(sys.executable).with_name("bvit-sweep"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([exe, "ui", sweep, "--port", str(port)], cwd=work, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, seen = time.monotonic() + 240, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if m := re.search(r"runs: (http://\S+)", line):
            cells = re.fullmatch(r"  by cell, seeds averaged: (http://\S+)\n", proc.stdout.readline())
            assert cells, "`bvit-sweep ui` printed no URL of the runs by cell"
            return proc, m.group(1), cells.group(1)
    proc.kill()
    raise AssertionError(f"`bvit-sweep ui` printed no URL: {''.join(seen)}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_mlflow_bundle_still_keeps_what_bvit_sweep_ui_seeds_where_it_did():
    """orchestrator/mlflow_ui.py fills localStorage keys that MLflow 3.17's web app reads; when an MLflow upgrade
    renames them or stops reading `workflowType` from them, the dashboard silently falls back to the GenAI
    layout and MLflow's own columns: this fails first."""
    import mlflow.server

    from orchestrator.mlflow_ui import KEYS, MLFLOW_UI_VERSIONS, check_version

    check_version()
    bundle = "".join(p.read_text(errors="replace") for p in
                     (Path(mlflow.server.app.static_folder) / "static" / "js").glob("*.js"))
    assert mlflow.__version__.startswith(MLFLOW_UI_VERSIONS)
    # the layout: the URL's workflowType, else localStorage "mlflow.workflowType" (version 1), else GenAI
    assert 'key:"mlflow.workflowType",version:1,initialValue:c' in bundle and "const c=l.GENAI" in bundle
    assert '"mlflow.experimentKind"===e.key' in bundle  # the tag exists, but ...
    assert "Z0:()=>R" in bundle and ",R=()=>!0," in bundle  # ... the flag that makes the layout ignore it is on
    assert "`${e}_v${t}`" in bundle  # localStorage key = name + "_v" + version
    assert KEYS["workflow"] == "mlflow.workflowType" + "_v1"
    assert 'key:"mlflow.assistant.fab.autoOpenedOnFirstLoad",version:1' in bundle
    # saved views: ["MLflowLocalStorage", "1.1", "<component>-<scope>", key].join("-")
    assert 'getStoreForComponent("ExperimentPage",' in bundle and 'reactComponentStateKey="ReactComponentState"' in bundle
    assert '["MLflowLocalStorage",r.version,this.scope,e].join("-")' in bundle and 'r.version="1.1"' in bundle
    assert 'getStoreForComponent("RunPage",t)' in bundle and 'getItem("chartUIState")' in bundle


def test_dashboard_in_a_real_browser_holds_up_past_the_first_screen(grid_sweep, tmp_path):
    """A researcher's path at 1,600 x 1,000: landing, a trial's page, Back, F5, the chart view, the compare page,
    the runs grouped by cell.
    Screenshots of each in the test's tmp dir (landing.png, child.png, back.png, reload.png, charts.png,
    compare.png, cells.png)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (scripts/setup.sh does, as root)")
    from playwright.sync_api import expect, sync_playwright

    from orchestrator.cells import design_of
    from orchestrator.spec import load_spec

    work, result = grid_sweep
    factors = [path for path, _ in design_of(load_spec(work / "grid.yaml")).names()]
    assert sorted(factors) == ["model.steps", "model.width"]  # what the spec varies: nothing below names them
    columns = [f"params.`{f}`" for f in factors] + ["params.`seed`", "metrics.`final_test_top1`"]
    port = _free_port()
    proc, url, cells_url = _start_ui(work, port, "runs/grid")
    assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "workflowType=machine_learning" in url
    assert _port_open(port), "the URL was printed before the server answered"
    busy = subprocess.run([str(Path(sys.executable).with_name("bvit-sweep")), "ui", "runs/grid", "--port", str(port)],
                          cwd=work, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "http://" not in busy.stdout
    assert re.fullmatch(rf"port {port} on 127\.0\.0\.1 is in use .*`--port \d+`\n", busy.stderr), busy.stderr
    shots = tmp_path / "screenshots"
    best = max(result.trials, key=lambda r: r["final_test_top1"])
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=FLAGS, headless=True,
                viewport={"width": 1600, "height": 1000})
            page = browser.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # a busy 2-core machine renders plotly charts in seconds

            def sweep_columns_in_view(what: str) -> None:
                expect(page.get_by_text(f"{len(result.trials) + 1} matching runs")).to_be_visible()
                for col in columns:  # in the viewport, left of anything MLflow adds: ag-grid renders what is in view
                    expect(page.locator(f'.ag-header-cell[col-id="{col}"]'), f"{what}: {col}").to_be_visible()
                for col in ("attributes.`Dataset`", "attributes.`Source`", "attributes.`Models`"):
                    expect(page.locator(f'.ag-header-cell[col-id="{col}"]'), f"{what}: {col}").to_have_count(0)
                names = page.locator(".ag-pinned-left-cols-container .ag-row").all_inner_texts()
                assert "grid · sweep" in names[0] and _name(best) in names[1], (what, names)  # parent, then best first

            # 1. Landing: the sweep's columns, nothing of the Assistant or the shared-view banner in the way,
            #    sorted by what a person reads (the parent pinned above the trials).
            page.goto(url)
            sweep_columns_in_view("landing")
            expect(page.get_by_test_id("sort-select-dropdown")).to_have_text("Sort: final_test_top1")
            expect(page.get_by_text("You're viewing a shared view")).to_have_count(0)
            expect(page.get_by_text("Ask questions about your experiments")).to_have_count(0)  # the Assistant panel
            page.screenshot(path=str(shots / "landing.png"))

            # 2. A trial's page: the model-training layout (breadcrumb "Runs", not "Evaluations"), its description,
            #    the source commit, and test_top1 / train_loss as the first charts, above the fold.
            page.get_by_role("link", name=re.compile("^" + re.escape(_name(best)))).click()
            expect(page.get_by_test_id("experiment-observatory-link-runs")).to_have_text("Runs")
            expect(page.get_by_text("Evaluation runs")).to_have_count(0)
            expect(page.get_by_text(f"seed 0: finished after 2 epochs, final test top-1 {best['final_test_top1']:.2f} %"
                                    )).to_be_visible()
            sha = json.loads((work / "results" / "grid" / "run.json").read_text())["git_sha"]
            expect(page.get_by_text(sha[:7]).first).to_be_visible()
            page.get_by_role("tab", name="Model metrics").click()
            cards = page.get_by_test_id("experiment-view-compare-runs-card")
            for i, metric in enumerate(("test_top1", "train_loss")):
                card = cards.nth(i)
                expect(card.get_by_text(metric, exact=True).first).to_be_visible()
                expect(card.locator(".js-plotly-plot")).to_be_visible()
                box = card.bounding_box()
                assert box["y"] + box["height"] <= 1000, (metric, box)  # above the fold, no scrolling
            page.screenshot(path=str(shots / "child.png"))

            # 3. Back, then F5: the sweep's columns stay.
            page.go_back()
            page.go_back()
            sweep_columns_in_view("Back")
            page.screenshot(path=str(shots / "back.png"))
            page.reload()
            sweep_columns_in_view("F5")
            page.screenshot(path=str(shots / "reload.png"))
            page.get_by_role("link", name=re.compile(r"^grid · sweep")).click()  # the parent: the answer first
            expect(page.get_by_text("Per cell and arm, seeds averaged")).to_be_attached()
            page.go_back()
            sweep_columns_in_view("Back from the parent")

            # 4. The chart view: the sweep's charts first.
            page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
            expect(page.get_by_text(re.compile(r"^Sweep")).first).to_be_visible()  # the section, before MLflow's
            for title in ("Parallel Coordinates", "params vs. final_test_top1", "test_top1", "train_loss"):
                expect(cards.get_by_text(title, exact=True).first, title).to_be_visible()
            parallel = cards.filter(has=page.get_by_text("Parallel Coordinates", exact=True))
            for axis in [*factors, "final_test_top1"]:  # the axes: every varied one, then the final top-1
                expect(parallel.locator("svg text").filter(has_text=re.compile(f"^{re.escape(axis)}$")).first,
                       axis).to_be_attached()
            page.screenshot(path=str(shots / "charts.png"))

            # 5. The compare page of every trial: parallel coordinates over the varied axes to the final top-1.
            page.locator('label:has(input[name="runs-view-mode"][value="TABLE"])').click()
            rows = page.locator(".ag-pinned-left-cols-container .ag-row")
            expect(rows).to_have_count(len(result.trials) + 1)
            for i in range(1, len(result.trials) + 1):
                rows.nth(i).locator("input[type=checkbox]").first.click()
            page.get_by_role("button", name=re.compile("^Compare")).click()
            expect(page.get_by_text(f"Comparing {len(result.trials)} Runs from 1 Experiment")).to_be_visible()
            plot = page.locator(".js-plotly-plot").first
            expect(plot).to_be_visible()
            axes = plot.evaluate("p => Array.from(p.querySelectorAll('.axis-title')).map(t => t.textContent)")
            assert set(factors) | {"test_top1"} <= set(axes), axes  # its metric: test_top1's last value, the final
            finals = sorted(r["final_test_top1"] for r in result.trials)
            ticks = plot.evaluate("p => Array.from(p.querySelectorAll('.axis-extent-top-text, .axis-extent-bottom-text'))"
                                  ".map(t => t.textContent)")
            assert f"{finals[-1]:.5f}" in ticks and f"{finals[0]:.5f}" in ticks, ticks  # its range: the finals'
            page.screenshot(path=str(shots / "compare.png"))

            # 6. The runs by cell, seeds averaged: a group row per cell, labelled with its values.
            page.goto(cells_url)
            groups = page.locator(".ag-pinned-left-cols-container .ag-row")
            for trial in result.trials:
                label = ", ".join(f"{f}: {trial[f.rsplit('.', 1)[-1]]}" for f in factors)
                expect(groups.filter(has_text=label).first, label).to_be_visible()
            expect(page.get_by_test_id("sort-select-dropdown")).to_have_text("Sort: final_test_top1")
            page.screenshot(path=str(shots / "cells.png"))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    assert not _port_open(port), "Ctrl-C left the MLflow server running"
    print(f"screenshots: {shots}")


def _name(trial: dict) -> str:
    return f"steps {trial['steps']} · width {trial['width']} · seed 0 · top-1 {trial['final_test_top1']:.1f} %"


def test_progress_line_shows_a_dash_for_an_unscored_epoch():
    from orchestrator.tables import progress_line

    row = {"trial_id": "abc", "arch": "bvit", "width": 32, "steps": 2, "seed": 0, "epochs": 1, "node": "n"}
    unscored = progress_line(row, {"train_loss": 2.1, "test_top1": float("nan"), "images_per_s": 500}, ["arch", "width"])
    assert unscored.startswith("[abc] arch bvit · width 32 · seed 0 epoch 1: loss 2.100")
    assert "top-1 – (best –)" in unscored and "nan" not in unscored
    assert "top-1 71.23 (best 72.00)" in progress_line(row, {"train_loss": 2.1, "test_top1": 71.234,
                                                            "best_test_top1": 72.0, "images_per_s": 500})


@pytest.mark.parametrize("cells, frontier_drawn", [
    ([("bvit", 32, 15274, 60.0), ("vit", 32, 27978, 55.0)], False),  # one cell on the frontier: a point
    ([("bvit", 32, 15274, 50.0), ("vit", 32, 27978, 55.0)], True),
    ([("bvit", w, p, 40.0 + i) for i, (w, p) in enumerate([(16, 4570), (24, 4800), (32, 15274), (64, 55114)])]
     + [("vit", w, p, 41.0 + i) for i, (w, p) in enumerate([(16, 7850), (20, 8100), (32, 27978), (64, 205066)])],
     True),  # counts close together over two decades: not every one can carry a label
])
def test_frontier_plot_legend_names_only_what_is_drawn_and_ticks_do_not_overlap(tmp_path, monkeypatch, cells,
                                                                                 frontier_drawn):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from orchestrator.cells import design_of_table
    from orchestrator.frontier import frontier_table, write_frontier

    seen = {}
    save = Figure.savefig

    def spy(fig, path, *a, **k):
        if Path(path).name == "frontier.png":
            ax = fig.axes[0]
            fig.canvas.draw()
            seen[Path(path).name] = ([t.get_text() for t in ax.get_legend().get_texts()],
                                     [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()])
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    rows = [{"status": "TERMINATED", "arch": a, "width": w, "steps": 2, "params": p, "flops_per_image": 1,
             "final_test_top1": t} for a, w, p, t in cells]
    bound = design_of_table(rows).bind(rows)  # arch (and width, where it varies) from the table
    write_frontier(frontier_table(rows, bound), bound, tmp_path)
    legend, ticks = seen["frontier.png"]
    assert ("Pareto frontier" in legend) == frontier_drawn and {"arch bvit", "arch vit"} <= set(legend)
    assert ticks and not any(a.overlaps(b) for a, b in zip(ticks, ticks[1:], strict=False))
