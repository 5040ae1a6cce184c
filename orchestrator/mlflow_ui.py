"""`mlflow ui` with the sweep's defaults in the browser: the one place where bvit-sweep reaches into MLflow's UI.

MLflow 3.17's web app keeps what decides its pages in the browser's localStorage, not on the server:
  * the layout: `mlflow.workflowType_v1` ("genai" unless set; a `?workflowType=` in the URL wins for that page
    only). Run pages and the experiment's entry from the Experiments list carry no `workflowType`, so they
    open in the GenAI layout ("Evaluation runs", "Evaluations") on a fresh browser. The experiment tag
    `mlflow.experimentKind` is ignored (the feature flag that would read it is compiled in as on);
  * the runs page's columns, sort and charts on a plain visit, F5 and Back:
    `MLflowLocalStorage-1.1-ExperimentPage-["<experiment id>"]-ReactComponentState` ("your saved view"). A
    shared view (`?viewStateShareKey=`) applies only on the first load; its facets then go in the URL and
    MLflow skips the shared view from there on, so F5 and Back fall back to MLflow's default columns;
  * the charts of a run page's "Model metrics" tab: `MLflowLocalStorage-1.1-RunPage-<run id>-model-chartUIState`
    (without it, every metric alphabetically: test_top1 and train_loss come last, below the fold);
  * the Assistant panel: `mlflow.assistant.fab.autoOpenedOnFirstLoad_v1` (false: it opens itself once, on
    a server on localhost).

So `bvit-sweep ui` serves MLflow's own app (its uvicorn, its CLI, its options) with one change: the page
(index.html) starts with a small script that fills those keys where the browser has none yet, from the sweep's
saved view (the experiment tag `mlflow.sharedViewState.bvit-sweep`, orchestrator/tracking.py). What a user
sets in the browser is kept: a key is written when it is absent or when the sweep's default itself changed
since this script last wrote it (a newer view after `frontier`), never merely because the user changed it. `KEYS` below names them; `tests/test_dashboard.py` reads MLflow's bundle and fails when it no longer
holds these names.

    python -m orchestrator.mlflow_ui --backend-store-uri sqlite:///... --host 127.0.0.1 --port 5000 --workers 1
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["MLFLOW_UI_VERSIONS", "KEYS", "seed_script", "experiment_seeds", "main"]  # and `app` (lazy)

MLFLOW_UI_VERSIONS = ("3.17.",)  # the bundles whose localStorage keys were read (see the module docstring)
KEYS = {
    "workflow": "mlflow.workflowType_v1",
    "assistant_opened": "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1",
    "experiment_page": 'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState',
    "run_page": "MLflowLocalStorage-1.1-RunPage-{run_id}-model-chartUIState",
}
RUN_PAGE_CHARTS = ("test_top1", "train_loss")  # first on a trial's "Model metrics" tab; MLflow adds the rest after
MARK = "bvit-sweep.seeded."  # + the localStorage key: what this script last wrote there
VIEW_TAG = "mlflow.sharedViewState.bvit-sweep"  # orchestrator.tracking.VIEW_TAG_PREFIX + VIEW_ID (no Ray import)


def run_page_state() -> str:
    """A trial's "Model metrics" tab: the learning curves of `RUN_PAGE_CHARTS` first, in one section."""
    section = "bvit-sweep-run"
    charts = [{"uuid": f"{section}-{m}", "type": "LINE", "metricSectionId": section, "metricKey": m,
               "selectedMetricKeys": [m], "displayName": m, "deleted": False, "isGenerated": True,
               "runsCountToCompare": 10, "xAxisKey": "step", "selectedXAxisMetricKey": "", "lineSmoothness": 0,
               "scaleType": "linear", "xAxisScaleType": "linear", "range": {}, "yAxisKey": "metric",
               "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True,
               "useGlobalLineSmoothing": True} for m in RUN_PAGE_CHARTS]
    return json.dumps({"isAccordionReordered": True, "autoRefreshEnabled": True, "compareRunCharts": charts,
                       "compareRunSections": [{"uuid": section, "name": "Model metrics", "display": True,
                                               "isReordered": True, "deleted": False, "isGenerated": True}],
                       "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}})


def experiment_seeds(uri: str) -> dict[str, str]:
    """{localStorage key: value}: the runs page state of every experiment of the store with a sweep view, and
    the "Model metrics" tab of each of its trials' runs."""
    from mlflow.tracking import MlflowClient

    client, seeds = MlflowClient(tracking_uri=uri), {}
    for exp in client.search_experiments(max_results=1000):
        if VIEW_TAG not in exp.tags:
            continue
        try:
            seeds[KEYS["experiment_page"].format(experiment_id=exp.experiment_id)] = json.loads(
                exp.tags[VIEW_TAG])["state"]
        except (KeyError, ValueError, TypeError):
            continue
        for run in client.search_runs([exp.experiment_id], filter_string="tags.`bvit.role` = 'trial'",
                                      max_results=5000):
            seeds[KEYS["run_page"].format(run_id=run.info.run_id)] = run_page_state()
    return seeds


def seed_script(seeds: dict[str, str]) -> str:
    """The <script> that fills MLflow's localStorage defaults (see the module docstring) before the app starts."""
    defaults = {KEYS["workflow"]: json.dumps("machine_learning"), KEYS["assistant_opened"]: "true", **seeds}
    body = json.dumps(defaults).replace("</", "<\\/")
    return ("<script>(function(){try{var d=" + body + ",m=" + json.dumps(MARK) + ",s=window.localStorage;"
            "for(var k in d){if(s.getItem(k)===null||s.getItem(m+k)!==d[k]){s.setItem(k,d[k]);"
            "s.setItem(m+k,d[k]);}}}catch(e){}})();</script>")


def _index_html() -> bytes:
    import mlflow.server

    return (Path(mlflow.server.app.static_folder) / "index.html").read_bytes()


class _SeededIndex:
    """ASGI: MLflow's FastAPI app, but its index page (every UI route: the app routes by URL fragment) begins
    with `seed_script` for the store the server serves."""

    def __init__(self, inner, uri: str, prefix: str) -> None:
        self.inner, self.uri, self.paths = inner, uri, {prefix + "/", prefix + "/index.html"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") not in self.paths:
            return await self.inner(scope, receive, send)
        html = _index_html()
        try:
            script = seed_script(experiment_seeds(self.uri)).encode()
        except Exception:  # a store it cannot read: MLflow's page as it is
            script = b""
        html = html.replace(b"<head>", b"<head>" + script, 1)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(html)).encode()),
            (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": html})


def _make_app() -> Any:
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR, STATIC_PREFIX_ENV_VAR
    from mlflow.server.fastapi_app import app as mlflow_app

    return _SeededIndex(mlflow_app, os.environ[BACKEND_STORE_URI_ENV_VAR],
                        os.environ.get(STATIC_PREFIX_ENV_VAR, "").rstrip("/"))


def __getattr__(name: str) -> Any:  # `orchestrator.mlflow_ui:app`, built in uvicorn's process on first access
    if name == "app":
        globals()["app"] = _make_app()
        return globals()["app"]
    raise AttributeError(name)


def check_version() -> None:
    import mlflow

    if not mlflow.__version__.startswith(MLFLOW_UI_VERSIONS):
        raise SystemExit(f"bvit-sweep ui: MLflow {mlflow.__version__} is not one whose web app this was checked "
                         f"against ({', '.join(v + 'x' for v in MLFLOW_UI_VERSIONS)}); run `mlflow ui` directly")


def main(argv: list[str] | None = None) -> None:
    """`mlflow ui ARGS`, its uvicorn serving `orchestrator.mlflow_ui:app` instead of MLflow's app."""
    check_version()
    import mlflow.server
    from mlflow.cli import cli

    build = mlflow.server._build_uvicorn_command

    def ours(uvicorn_opts, host, port, workers, app_name, env_file=None, is_factory=False):
        return build(uvicorn_opts, host, port, workers, f"{__spec__.name}:app", env_file, False)

    mlflow.server._build_uvicorn_command = ours
    cli.main(["ui", *(sys.argv[1:] if argv is None else argv)], prog_name="mlflow")


if __name__ == "__main__":
    main()
