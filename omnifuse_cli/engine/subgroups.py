"""Subgroups: patients split by a column (its values, quantile bands or cut points), the
metrics with bootstrap intervals per subgroup, and the largest gaps between subgroups.

Conventions as in calibration.py: ``y`` holds class indices 0..C-1, ``probs`` is (N, C).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.engine.calibration import calibration_slope_intercept
from omnifuse_cli.engine.metrics import bootstrap_ci, metric_value
from omnifuse_cli.engine.thresholds import operating_point, operating_point_ci
from omnifuse_cli.errors import ConfigError

SMALL_SUBGROUP = 30
MISSING = "missing"
_SUBGROUP_FORMS = "COLUMN, COLUMN:qK (K quantile bands, e.g. age:q4) or COLUMN:a,b (e.g. age:40,65)"
_LOWER_IS_BETTER = frozenset({"brier", "ece", "loss"})
_IDEAL = {"cal_intercept": 0.0, "cal_slope": 1.0}  # best = closest to this


def ordered_values(values: np.ndarray) -> list[Any]:
    """Distinct values, most frequent first (ties: by their text)."""
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i]))
    return [uniq[i] for i in order]


@dataclass(frozen=True)
class SubgroupSpec:
    """A column to split patients by; bands None (categories as they are), "qK" or "a,b,..."."""

    column: str
    bands: str | None = None

    def __str__(self) -> str:
        return self.column if self.bands is None else f"{self.column}:{self.bands}"

    def cut_points(self) -> list[float]:
        """The cut points of a "a,b,..." spec (empty otherwise)."""
        if self.bands is None or self.bands.startswith("q"):
            return []
        return [float(v) for v in self.bands.split(",")]


def parse_subgroup(text: str) -> SubgroupSpec:
    """Parse "sex", "age:q4" or "age:40,65". Only a suffix after the last colon that reads as
    quantile bands or numbers is a band spec; otherwise the whole text is the column name."""
    text = str(text).strip()
    if not text:
        raise ConfigError("empty subgroup", hint=f"use {_SUBGROUP_FORMS}")
    column, sep, suffix = text.rpartition(":")
    if not sep:
        return SubgroupSpec(text)
    bands = re.sub(r"\s+", "", suffix).lower()
    quantile = re.fullmatch(r"q(\d+)", bands)
    looks_numeric = bool(re.fullmatch(r"[-+0-9.,e]*", bands)) and any(ch.isdigit() for ch in bands)
    if not (quantile or looks_numeric or re.fullmatch(r"q[-+0-9.,e]*", bands)):
        return SubgroupSpec(text)  # e.g. a column named "visit:baseline"
    column = column.strip()
    if not column:
        raise ConfigError(f"subgroup {text!r} names no column", hint=f"use {_SUBGROUP_FORMS}")
    if quantile:
        k = int(quantile.group(1))
        if k < 2:
            raise ConfigError(
                f"subgroup {text!r}: quantile bands need K >= 2", hint=f"use {_SUBGROUP_FORMS}"
            )
        return SubgroupSpec(column, f"q{k}")
    try:
        cuts = [float(v) for v in bands.split(",")] if looks_numeric else []
    except ValueError:
        cuts = []
    if not cuts or not all(math.isfinite(c) for c in cuts):
        raise ConfigError(
            f"subgroup {text!r}: cannot read the bands {suffix!r}", hint=f"use {_SUBGROUP_FORMS}"
        )
    if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise ConfigError(
            f"subgroup {text!r}: cut points must increase", hint=f"use {_SUBGROUP_FORMS}"
        )
    return SubgroupSpec(column, ",".join(_fmt(c) for c in cuts))


def _fmt(v: float, digits: int = 6) -> str:
    """A number as short readable text (40.0 -> "40"; others to ``digits`` significant)."""
    v = float(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}"


def band(values: pd.Series, spec: SubgroupSpec) -> pd.Series:
    """Subgroup labels per patient (same index as values); missing values -> "missing".

    Categorical specs give str(value) as an object Series; banded specs give an ordered
    Categorical of labels ("Q1 [18, 42]", ... or "<40", "40-<65", ">=65"), "missing" last."""
    missing = values.isna()
    if spec.bands is None:
        out = values.map(str).astype(object)
        out[missing] = MISSING
        return out
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & ~missing
    if bad.any():
        shown = ", ".join(repr(str(v)) for v in pd.unique(values[bad])[:5])
        raise ConfigError(
            f"subgroup {str(spec)!r}: column {spec.column!r} has values that are "
            f"not numbers ({shown})",
            hint=f"band only numeric columns; use {spec.column!r} alone to group "
            "by its values as they are",
        )
    labels = pd.Series(np.full(len(values), MISSING, dtype=object), index=values.index)
    present = numbers.notna()
    if spec.bands.startswith("q"):
        categories = _quantile_labels(numbers, present, int(spec.bands[1:]), labels)
    else:
        cuts = spec.cut_points()
        edges = [-math.inf, *cuts, math.inf]
        categories = (
            [f"<{_fmt(cuts[0])}"]
            + [f"{_fmt(a)}-<{_fmt(b)}" for a, b in zip(cuts, cuts[1:], strict=False)]
            + [f">={_fmt(cuts[-1])}"]
        )
        cut = pd.cut(numbers[present], edges, right=False, labels=categories)
        labels[present] = cut.astype(str)
    if missing.any():
        categories = [*categories, MISSING]
    return pd.Series(
        pd.Categorical(labels, categories=categories, ordered=True), index=values.index
    )


def _quantile_labels(
    numbers: pd.Series, present: pd.Series, k: int, labels: pd.Series
) -> list[str]:
    """Fill labels[present] with "Qi [min, max]" quantile bands; return the band labels."""
    values = numbers[present]
    if not len(values):
        return []
    if values.nunique() < 2:
        codes = pd.Series(0, index=values.index)
    else:
        codes = pd.qcut(values, k, labels=False, duplicates="drop").astype(int)
    categories = []
    for i, code in enumerate(sorted(codes.unique())):
        inside = codes == code
        low, high = _fmt(values[inside].min(), 4), _fmt(values[inside].max(), 4)
        name = f"Q{i + 1} [{low}, {high}]"
        labels[inside[inside].index] = name
        categories.append(name)
    return categories


def subgroup_table(
    y: np.ndarray,
    probs: np.ndarray,
    groups: pd.Series,
    num_classes: int,
    *,
    column: str,
    n_boot: int,
    seed: int,
    names: Sequence[str] = ("auroc", "macro_f1", "acc", "brier", "ece"),
    op: float | None = None,
) -> pd.DataFrame:
    """Metrics with bootstrap intervals per subgroup (one row per group value).

    Rows follow the categories of a Categorical ``groups`` (band order), else group size
    (largest first). Columns: column, group, n, class_counts ("a/b/c"), each metric with
    _ci_low/_ci_high, cal_intercept and cal_slope (binary only), sensitivity, specificity, ppv
    and npv with intervals at threshold ``op`` (binary only), and small (n < SMALL_SUBGROUP).
    """
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if len(groups) != len(y):
        raise ValueError("groups must hold one value per patient")
    if op is not None and num_classes != 2:
        raise ConfigError("an operating threshold applies to binary tasks only")
    text = groups.astype(object).where(groups.notna(), MISSING).astype(str).to_numpy()
    order = ordered_values(text)
    if isinstance(groups.dtype, pd.CategoricalDtype):  # band order, then anything else by size
        present = set(text)
        first = [str(c) for c in groups.cat.categories if str(c) in present]
        order = first + [v for v in order if v not in first]
    rows = []
    for value in order:
        mask = text == value
        yg, pg = y[mask], probs[mask]
        row: dict[str, Any] = {
            "column": column,
            "group": value,
            "n": int(mask.sum()),
            "class_counts": "/".join(str(int(c)) for c in np.bincount(yg, minlength=num_classes)),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class groups: undefined metrics become NaN
            cis = bootstrap_ci(yg, pg, num_classes, n=n_boot, seed=seed, names=tuple(names))
            for m in names:
                row[m] = _safe_metric(m, yg, pg, num_classes)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = cis.get(m, (math.nan, math.nan))
        if num_classes == 2:
            row["cal_intercept"], row["cal_slope"] = calibration_slope_intercept(yg == 1, pg[:, 1])
            if op is not None:
                point = operating_point(yg == 1, pg[:, 1], op)
                op_cis = operating_point_ci(yg == 1, pg[:, 1], op, n=n_boot, seed=seed)
                for m in ("sensitivity", "specificity", "ppv", "npv"):
                    row[m] = point[m]
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = op_cis.get(m, (math.nan, math.nan))
        row["small"] = row["n"] < SMALL_SUBGROUP
        rows.append(row)
    return pd.DataFrame(rows)


def _safe_metric(name: str, y: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    """metric_value, NaN where it is undefined."""
    try:
        return float(metric_value(name, y, probs, num_classes))
    except ValueError:
        return math.nan


def subgroup_gaps(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Largest between-subgroup difference per (column, metric).

    Compares subgroups with a finite value and n >= SMALL_SUBGROUP; when fewer than two such
    groups exist, all groups with a finite value (includes_small is then True). Best = highest,
    lowest for brier/ece/loss, closest to 0 (1) for cal_intercept (cal_slope). Columns column,
    metric, gap (max - min), best_group, worst_group, groups_compared, includes_small.
    """
    rows = []
    for column, part in table.groupby("column", sort=False):
        for m in metrics:
            if m not in part:
                raise KeyError(f"no metric {m!r} in the subgroup table")
            finite = part[np.isfinite(part[m].astype(float))]
            large = finite[finite["n"] >= SMALL_SUBGROUP]
            used = large if len(large) >= 2 else finite
            row: dict[str, Any] = {
                "column": column,
                "metric": m,
                "gap": math.nan,
                "best_group": None,
                "worst_group": None,
                "groups_compared": len(used),
                "includes_small": bool(len(used) and len(large) < 2),
            }
            if len(used) >= 2:
                values = used[m].astype(float).to_numpy()
                if m in _IDEAL:
                    badness = np.abs(values - _IDEAL[m])
                elif m in _LOWER_IS_BETTER:
                    badness = values
                else:
                    badness = -values
                row["gap"] = float(values.max() - values.min())
                row["best_group"] = used["group"].iloc[int(np.argmin(badness))]
                row["worst_group"] = used["group"].iloc[int(np.argmax(badness))]
            rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "column",
            "metric",
            "gap",
            "best_group",
            "worst_group",
            "groups_compared",
            "includes_small",
        ],
    )
