"""The sweep's runs page in MLflow 3.17, as data: its columns, order, grouping and charts, all from what the spec
varies.

The state is MLflow's own runs-page state (search facets + UI state; the shape its "saved views" and the
browser's saved view hold). `orchestrator/tracking.py` stores it on the experiment (the saved view
`bvit-sweep`); `orchestrator/mlflow_ui.py` makes it the browser's default for the experiment. The chart
view opens on one section, "Sweep", before MLflow's own per-metric charts:
  * parallel coordinates: every varied axis (orchestrator.cells' design) -> final_test_top1;
  * a scatter of parameter count against final_test_top1 (points coloured by the compared arm: each child
    run's `mlflow.runColor`);
  * learning curves of test_top1 and train_loss per epoch.
The table is sorted by final test top-1, best first ("Sort: final_test_top1"), with the sweep's parent run pinned
above the trials. A second view, `cells_view_state`, groups the trials by cell (one value of every varied axis)
with their seeds averaged, in the table and in every chart (MLflow's "Group by", aggregate: average).
"""
from __future__ import annotations

from typing import Any

from orchestrator.cells import Design

__all__ = ["FINAL_METRIC", "SECTION", "view_state", "cells_view_state", "sweep_charts", "arm_colors"]

FINAL_METRIC = "final_test_top1"  # one point per finished trial, at its last epoch
SECTION = "bvit-sweep"  # the charts section's id
# A palette that reads on white and stays apart for colour-blind readers (Okabe-Ito, without yellow).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000")


def _factors(design: Design | None) -> list[str]:
    return [path for path, _ in (design.names() if design else [])]


def _card(uuid: str, kind: str, name: str, **fields: Any) -> dict[str, Any]:
    return {"uuid": uuid, "type": kind, "displayName": name, "metricSectionId": SECTION, "deleted": False,
            "isGenerated": False, "runsCountToCompare": 500, **fields}


def _line(metric: str) -> dict[str, Any]:
    return _card(f"{SECTION}-{metric}", "LINE", metric, metricKey=metric, selectedMetricKeys=[metric],
                 xAxisKey="step", selectedXAxisMetricKey="", xAxisScaleType="linear", scaleType="linear",
                 lineSmoothness=0, range={}, yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                 useGlobalXaxisKey=False, useGlobalLineSmoothing=False)


def sweep_charts(design: Design | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(charts, sections) of the chart view: the "Sweep" section first (see the module docstring)."""
    charts = [
        _card(f"{SECTION}-parallel", "PARALLEL", "Parallel Coordinates", selectedParams=_factors(design),
              selectedMetrics=[FINAL_METRIC], showAllRuns=True),
        _card(f"{SECTION}-scatter", "SCATTER", f"params vs {FINAL_METRIC}",
              xaxis={"key": "params", "type": "PARAM"}, yaxis={"key": FINAL_METRIC, "type": "METRIC"}),
        _line("test_top1"),
        _line("train_loss"),
    ]
    sections = [{"uuid": SECTION, "name": "Sweep", "display": True, "isReordered": True, "deleted": False,
                 "isGenerated": False}]
    return charts, sections


def view_state(design: Design | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """The runs page as the sweep's question needs it: its factors, seed and final test top-1 as columns (in
    that order), the trials best first (by `final_test_top1`, a label a person reads) under the parent
    (`parent_run_id`, pinned: MLflow lists pinned runs first whatever the order), every run in the charts."""
    params = _factors(design) + ["seed"]
    columns = ([f"params.`{k}`" for k in params] + [f"metrics.`{k}`" for k in (FINAL_METRIC, "best_test_top1")]
               + ["params.`params`"])
    charts, sections = sweep_charts(design)
    return {
        "selectedColumns": columns, "columnOrder": columns,
        "orderByKey": f"metrics.`{FINAL_METRIC}`", "orderByAsc": False, "searchFilter": "",
        "runsPinned": [parent_run_id] if parent_run_id else [],
        "runsHiddenMode": "SHOW_ALL", "compareRunCharts": charts, "compareRunSections": sections,
        "isAccordionReordered": True,
    }


def cells_view_state(design: Design | None = None) -> dict[str, Any]:
    """`view_state` grouped by cell: a row per value of every varied axis, its trials' metrics averaged over seeds
    (the table's group rows; the charts' lines and points, with the seeds' min-max band), groups expanded."""
    state = view_state(design)
    state.update(groupBy={"aggregateFunction": "average",
                          "groupByKeys": [{"mode": "param", "groupByData": p} for p in _factors(design)]},
                 groupsExpanded={}, useGroupedValuesInCharts=True, runsPinned=[])
    return state


def arm_colors(values: list[Any]) -> dict[str, str]:
    """{arm value as text: colour}: the compared arm's values in sorted order, a colour each."""
    keys = sorted({str(v) for v in values})
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
