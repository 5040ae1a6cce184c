"""A sweep's cells and comparisons, from what its spec varies: the one definition every table, plot, run name
and warning uses.

    design = design_of(spec)                    # from the spec: its factors, the compared one, its baseline
    design = design_of_table(trials_df)         # from a trial table alone: the config columns that vary
    bound = design.bind(trials_df)              # columns as the table names them; warnings for what it lacks
    bound.cell_key(row), bound.cell_label(row), bound.arm(row)

A *factor* is an axis or a zip group the spec varies (seeds are replicates, not factors). The *compared*
factor is the one `compare.axis` belongs to (default: `model.arch` when it is varied, against the architecture
registry's baseline); a *cell* is one value of every other factor, and an *arm* one value of the compared
factor. Seeds are averaged within (cell, arm); every arm is compared with its cell's baseline arm. A trial
table names a path by its last part (`model.width` -> `width`) unless that name is taken, by a measured
column or by another varied path; then by the whole path (`optim.epochs`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import InputWarning

__all__ = ["MEASURED", "ID_COLUMNS", "Factor", "Design", "Bound", "column_names", "design_of", "design_of_table",
           "DEFAULT_COMPARE_AXIS"]

ID_COLUMNS = ("trial_id", "seed")  # a trial's identity, not a factor
MEASURED = frozenset({  # what a trial table measures or records about a run: never a factor's name
    "status", "params", "flops_per_image", "trainable_params", "best_test_top1", "best_epoch", "final_test_top1",
    "final_test_top5", "final_test_loss", "final_train_loss", "merged_test_top1", "epochs", "still_improving",
    "wall_s", "node", "retries", "error", "epoch", "train_loss", "test_loss", "test_top1", "test_top5",
})
DEFAULT_COMPARE_AXIS = "model.arch"  # compared, against its registered baseline, when varied and no `compare:`


def column_names(paths: Iterable[str]) -> dict[str, str]:
    """{dotted path: its trial-table column}: the last part of the path, unless a measured column or another
    of `paths` has that name (then the whole path). `seed` stays `seed`."""
    paths = list(dict.fromkeys(paths))
    leaves: dict[str, int] = {}
    for p in paths:
        leaves[p.rsplit(".", 1)[-1]] = leaves.get(p.rsplit(".", 1)[-1], 0) + 1
    out = {}
    for p in paths:
        leaf = p.rsplit(".", 1)[-1]
        out[p] = leaf if leaves[leaf] == 1 and leaf not in MEASURED and leaf not in ("trial_id",) else p
    return out


@dataclass(frozen=True)
class Factor:
    """One thing the sweep varies: an axis, or a zip group (several paths, varied together)."""

    paths: tuple[str, ...]
    columns: tuple[str, ...]  # the trial table's column for each path


@dataclass(frozen=True)
class Design:
    """The sweep's factors (spec order), the compared path and its baseline value, and a trend path."""

    factors: tuple[Factor, ...]
    compare: str | None = None  # dotted path of the compared axis
    baseline: Any = None
    trend: str | None = None  # dotted path: the recovered fraction's slope per doubling of this factor
    arms: tuple[str, ...] = ()  # the compared axis's values as labels show them, where the spec lists them

    def names(self) -> list[tuple[str, str]]:
        """(path, column) of every factor, the compared axis first: how run names and views list a trial."""
        pairs = [(p, c) for f in self.factors for p, c in zip(f.paths, f.columns, strict=True)]
        return sorted(pairs, key=lambda pc: pc[0] != self.compare)

    def column(self, path: str | None) -> str | None:
        for f in self.factors:
            if path in f.paths:
                return f.columns[f.paths.index(path)]
        return None

    def bind(self, table: Any) -> Bound:
        """This design on a trial table (`pandas.DataFrame` or list of dicts): each factor's column, found under
        its name or, in older tables, its whole path (`Bound.rename` renames those). A factor the table has no
        column for is pooled, with an `InputWarning` saying so -- never silently."""
        have = set(table.columns if hasattr(table, "columns") else (k for r in table for k in r))
        factors, lost, renames = [], [], {}
        for f in self.factors:
            cols = []
            for path, col in zip(f.paths, f.columns, strict=True):
                found = next((c for c in (col, path, path.rsplit(".", 1)[-1]) if c in have), None)
                if found is None:
                    lost.append(path)
                else:
                    cols.append((path, col))
                    if found != col:
                        renames[found] = col
            if cols:
                factors.append(Factor(tuple(p for p, _ in cols), tuple(c for _, c in cols)))
        if lost:
            warnings.warn(f"the trial table has no column for {', '.join(lost)}, which the sweep varies: its values "
                          "are pooled as if they were seeds; rerun `bvit-sweep status` or `sync` on the sweep to "
                          "rewrite trials.csv", InputWarning, stacklevel=2)
        design = Design(tuple(factors), self.compare, self.baseline, self.trend)
        arm = design.column(self.compare)
        if self.compare is not None and arm is None:
            design = Design(tuple(factors), None, None, None)
        return Bound(design=design, arm_column=design.column(design.compare),
                     trend_column=design.column(design.trend), renames=renames)


@dataclass(frozen=True)
class Bound:
    """A `Design` bound to a table's columns: what groups, labels and compares its rows."""

    design: Design
    arm_column: str | None
    trend_column: str | None
    renames: dict[str, str]  # {the table's column: the design's name} where an older table named it by its path

    def rename(self, table: Any) -> Any:
        """`table` (a DataFrame) with its factor columns under the design's names."""
        return table.rename(columns=self.renames) if self.renames else table

    @property
    def columns(self) -> list[str]:
        """Every factor's columns, in spec order: one table row per distinct value of these (seeds averaged)."""
        return [c for f in self.design.factors for c in f.columns]

    @property
    def cell_columns(self) -> list[str]:
        """The columns that make a cell: every factor's but the compared one's (its whole zip group)."""
        compared = self._compared_factor()
        return [c for f in self.design.factors if f is not compared for c in f.columns]

    @property
    def arm_columns(self) -> list[str]:
        """The compared factor's columns (the compared path first), or none."""
        f = self._compared_factor()
        if f is None:
            return []
        return [self.arm_column] + [c for c in f.columns if c != self.arm_column]

    def tied(self, column: str | None) -> list[str]:
        """The columns of the factor `column` belongs to (its zip group), `column` included."""
        return next((list(f.columns) for f in self.design.factors if column in f.columns), [])

    def _compared_factor(self) -> Factor | None:
        return next((f for f in self.design.factors if self.arm_column in f.columns), None)

    @property
    def baseline(self) -> Any:
        return self.design.baseline

    def is_baseline(self, row: Mapping[str, Any]) -> bool:
        return self.arm_column is not None and same(row.get(self.arm_column), self.design.baseline)

    def cell_key(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """A hashable key of the row's cell (values as text, so a CSV's 64 and a spec's 64 agree)."""
        return tuple(text(row.get(c)) for c in self.cell_columns)

    def cell_label(self, row: Mapping[str, Any], sep: str = " · ") -> str:
        """`width 64 · heads 4 · steps 4`: the row's cell in words ('all trials' when nothing but the arm varies)."""
        return sep.join(f"{c} {text(row.get(c))}" for c in self.cell_columns if text(row.get(c))) or "all trials"

    def arm(self, row: Mapping[str, Any]) -> str:
        """`arch bvit` (or `method lora-step · rank 8` for a zip group): the row's arm; '' without a comparison."""
        return " · ".join(f"{c} {text(row.get(c))}" for c in self.arm_columns if text(row.get(c)))

    def baseline_label(self) -> str:
        return f"{self.arm_column} {text(self.design.baseline)}" if self.arm_column else ""

    def label(self, row: Mapping[str, Any]) -> str:
        """The arm and the cell, e.g. `arch bvit · width 64 · heads 4 · steps 4`."""
        return " · ".join(p for p in (self.arm(row), self.cell_label(row) if self.cell_columns else "") if p) \
            or "all trials"


def text(value: Any) -> str:
    """A factor's value as text, the same for a CSV's `64`/`64.0`/`'none'` and a spec's 64/'none'; blank for
    missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def same(a: Any, b: Any) -> bool:
    return text(a) == text(b)


def _default_baseline(values: list[Any]) -> Any:
    """The architecture registry's baseline (bvit.archs) of the varied architectures: the one every compared
    architecture names, when it is among the values; None otherwise (then nothing is compared)."""
    from bvit.archs import ARCHS

    bases = {ARCHS[text(v)].baseline for v in values if text(v) in ARCHS and ARCHS[text(v)].baseline is not None}
    base = bases.pop() if len(bases) == 1 else None
    return base if base is not None and any(same(base, v) for v in values) else None


def design_of(spec: Any, *, smoke: bool = False) -> Design:
    """The design of a `SweepSpec` (its `--smoke` variant with `smoke=True`): its varied factors in file
    order, the compared axis (`spec.compare`, else `model.arch` when varied) and its baseline."""
    from orchestrator.spec.expand import axes_of
    from orchestrator.spec.schema import varied_values

    varied = varied_values(spec, smoke=smoke)
    groups = [axis.paths for axis in axes_of(spec, smoke=smoke) if axis.paths != ("seed",)]
    groups = [tuple(p for p in paths if p in varied) for paths in groups]
    groups = [g for g in groups if g]
    names = column_names(p for g in groups for p in g)
    factors = tuple(Factor(g, tuple(names[p] for p in g)) for g in groups)
    compare = spec.compare
    if compare is not None and compare.axis in varied:
        return Design(factors, compare.axis, compare.baseline, compare.trend if compare.trend in varied else None,
                      arms=tuple(text(v) for v in varied[compare.axis]))
    if compare is None and DEFAULT_COMPARE_AXIS in varied:
        base = _default_baseline(varied[DEFAULT_COMPARE_AXIS])
        if base is not None:
            return Design(factors, DEFAULT_COMPARE_AXIS, base, arms=tuple(text(v) for v in varied[DEFAULT_COMPARE_AXIS]))
    return Design(factors)


def design_of_table(table: Any, *, compare: str | None = None, baseline: Any = None) -> Design:
    """A design read from a trial table alone (no spec at hand): every column that is neither measured nor a
    trial's identity and takes two values or more is a factor (a zip group's columns become one factor each,
    which groups the same cells). `compare` (a column or dotted path) and `baseline` as in a spec; unset, the
    architecture column is compared with its registered baseline when it varies."""
    import pandas as pd

    df = pd.DataFrame(table)
    cols = [c for c in df.columns if c not in MEASURED and c not in ID_COLUMNS
            and df[c].map(text).nunique(dropna=False) > 1]
    factors = tuple(Factor((c,), (c,)) for c in cols)
    if compare is not None:
        col = next((c for c in (compare, compare.rsplit(".", 1)[-1]) if c in cols), None)
        if col is None:
            raise ValueError(f"--compare {compare}: not a column that varies in the table (varying: "
                             f"{', '.join(cols) or 'none'})")
        if not (df[col].map(text) == text(baseline)).any():
            raise ValueError(f"--compare {compare}={baseline}: no trial has {col} = {baseline} "
                             f"(its values: {', '.join(sorted(set(df[col].map(text))))})")
        return Design(factors, col, baseline)
    arch = column_names([DEFAULT_COMPARE_AXIS])[DEFAULT_COMPARE_AXIS]
    if arch in cols:
        base = _default_baseline(sorted(set(df[arch].map(text))))
        if base is not None:
            return Design(factors, arch, base)
    return Design(factors)
