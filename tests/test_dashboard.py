"""The MLflow dashboard as a researcher meets it: `bvit-sweep ui` on a small sweep's store, driven in Debian's
Chromium (its real binary, through Playwright; scripts/setup.sh installs both), plus the store's layout:
one run per trial and one row per cell however often `frontier` and `sync` run.

Screenshots land in the test's tmp dir (runs.png, parent.png, child.png): look at them when this changes.
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

CHROMIUM = Path("/usr/lib/chromium/chromium")  # Debian's ELF; /usr/bin/chromium is a shell wrapper
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fmnist_dir, ray_local):
    """A finished 2-trial sweep (bvit and vit, width 32, 2 steps, 2 epochs) with its local MLflow store."""
    work = tmp_path_factory.mktemp("dash")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        spec = write_spec(work / "dash.yaml", fmnist_dir, name="dash")
        result = launch(spec_path=spec, verbose=False)
    finally:
        os.chdir(cwd)
    assert result.ok
    return work, result


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
    # Children are named for what they are and ranked best first (the saved view's order), parent first.
    best = max(result.trials, key=lambda r: r["final_test_top1"])
    by_trial = {c.data.tags["bvit.trial_id"]: c for c in children}
    assert by_trial[best["trial_id"]].data.tags["bvit.rank"] == "0001"
    assert by_trial[best["trial_id"]].info.run_name == (
        f"arch {best['arch']} · seed 0 · top-1 {best['final_test_top1']:.1f} %")
    assert parent.data.tags["bvit.rank"] == "0000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ui(work: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`bvit-sweep ui` as a user runs it; returns the process and the URL it printed."""
    exe = str(Path(sys.executable).with_name("bvit-sweep"))
    proc = subprocess.Popen([exe, "ui", "runs/dash", "--port", str(port)], cwd=work, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, seen = time.monotonic() + 240, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if m := re.search(r"runs: (http://\S+)", line):
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"`bvit-sweep ui` printed no URL: {''.join(seen)}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_dashboard_in_a_real_browser_shows_the_sweep(sweep, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (scripts/setup.sh does, as root)")
    from playwright.sync_api import expect, sync_playwright

    work, result = sweep
    port = _free_port()
    started = time.monotonic()
    proc, url = _start_ui(work, port)
    print(f"ui answered after {time.monotonic() - started:.1f} s: {url}")
    assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "workflowType=machine_learning" in url
    assert _port_open(port), "the URL was printed before the server answered"
    busy = subprocess.run([str(Path(sys.executable).with_name("bvit-sweep")), "ui", "runs/dash", "--port", str(port)],
                          cwd=work, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "http://" not in busy.stdout
    assert re.fullmatch(rf"port {port} on 127\.0\.0\.1 is in use .*`--port \d+`\n", busy.stderr), busy.stderr
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=FLAGS, headless=True,
                viewport={"width": 2400, "height": 1000})  # ag-grid renders only the columns in view
            page = browser.new_page()
            page.set_default_timeout(60_000)

            # 1. The printed URL: the sweep's runs, parent first, the trials with their axes and top-1.
            page.goto(url)
            parent_link = page.get_by_role("link", name=re.compile(r"^dash · sweep"))
            expect(parent_link).to_be_visible()
            expect(page.get_by_text("3 matching runs")).to_be_visible()  # the runs table, not the GenAI overview
            if page.get_by_text("MLflow Assistant").count():  # MLflow's chat panel may open by itself on localhost
                page.keyboard.press("Escape")  # out of the way if it lets us; the table is checked either way
            expect(page.locator('.ag-header-cell[col-id="metrics.`test_top1`"]')).to_be_visible()
            headers = page.locator(".ag-header-cell").evaluate_all("hs => hs.map(h => h.getAttribute('col-id'))")
            for col in ("model.arch", "seed", "test_top1"):  # the spec's factor, seed, top-1: no column picked by hand
                assert any(col in h for h in headers), (col, headers)
            rows = page.locator(".ag-center-cols-container .ag-row")
            expect(rows).to_have_count(3)
            names = page.locator(".ag-pinned-left-cols-container .ag-row").all_inner_texts()
            assert "dash · sweep" in names[0], names  # the parent on top, then the trials best first
            for r in result.trials:
                name = f"arch {r['arch']} · seed 0 · top-1 {r['final_test_top1']:.1f} %"
                expect(page.get_by_role("link", name=name)).to_be_visible()
            cells = [" ".join(t.split()) for t in rows.all_inner_texts()]
            for r in result.trials:
                assert any(f"{r['final_test_top1']:g}" in c and r["arch"] in c for c in cells), cells
            page.screenshot(path=str(tmp_path / "runs.png"))

            # 2. The parent run: its description holds the frontier table and the rendered frontier plot.
            parent_link.click()
            expect(page.get_by_text("Per cell and arm, seeds averaged")).to_be_attached()
            if page.get_by_text("Show more").count():
                page.get_by_text("Show more").first.click()
            plot = page.locator("img[src*='frontier.png']")
            expect(plot).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 300", arg=plot.element_handle())
            plot.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "parent.png"), full_page=True)

            # 3. A trial's run: its per-epoch test top-1 chart.
            page.go_back()
            best = max(result.trials, key=lambda r: r["final_test_top1"])
            page.get_by_role("link", name=re.compile(rf"^arch {best['arch']} · seed 0")).click()
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_placeholder("Search metric charts").fill("test_top1")
            chart = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
                has=page.get_by_text("test_top1", exact=True))
            expect(chart.locator(".js-plotly-plot")).to_be_visible()
            chart.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "child.png"))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    assert not _port_open(port), "Ctrl-C left the MLflow server running"
    print(f"screenshots: {tmp_path}")


def test_progress_line_shows_a_dash_for_an_unscored_epoch():
    from orchestrator.progress import progress_line

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
