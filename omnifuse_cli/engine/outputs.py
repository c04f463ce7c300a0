"""The clinical reading of a set of predictions: calibration before and after, the operating
point with intervals, decision curves, conformal coverage and subgroups.

``evaluate`` computes them on its patients, ``cv`` on the pooled out-of-fold predictions (each
fold's own calibration, threshold and conformal sets); both write the same files, which the
report reads:

calibration.csv       metric, before, after (ECE, Brier, log loss, calibration intercept/slope)
operating_point.csv   metric, value, ci_low, ci_high (threshold, sensitivity, specificity, PPV,
                      NPV, F1, the counts) and the rule; binary or --positive-class only
decision_curve.csv    class, threshold, net_benefit, treat_all, treat_none, tp, fp, n
coverage.csv          alpha, mode, by, group, n, coverage, mean_set_size, empty_sets
subgroups.csv         one row per subgroup of each --subgroup-col with every metric, its 95%
                      interval and patient counts; subgroup_gaps.csv the largest gap per metric
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.data.tables import normalize_ids, read_table
from omnifuse_cli.engine.calibration import calibration_summary
from omnifuse_cli.engine.conformal import ConformalCalibration, coverage_table
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.subgroups import (
    SMALL_SUBGROUP,
    band,
    parse_subgroup,
    subgroup_gaps,
    subgroup_table,
)
from omnifuse_cli.engine.thresholds import decision_curve, operating_point, operating_point_ci
from omnifuse_cli.errors import DataError

DEFAULT_ALPHA = 0.1  # conformal miscoverage evaluate reports when none is asked for
SUBGROUP_METRICS = ("auroc", "macro_f1", "acc", "brier", "ece")
OP_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")


@dataclass
class ClinicalOutputs:
    calibration: pd.DataFrame
    operating_point: pd.DataFrame | None = None
    decision_curve: pd.DataFrame | None = None
    coverage: pd.DataFrame | None = None
    subgroups: pd.DataFrame | None = None
    gaps: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, out_dir: Path) -> None:
        write_csv(out_dir / "calibration.csv", self.calibration)
        for name, frame in (
            ("operating_point", self.operating_point),
            ("decision_curve", self.decision_curve),
            ("coverage", self.coverage),
            ("subgroups", self.subgroups),
            ("subgroup_gaps", self.gaps),
        ):
            path = out_dir / f"{name}.csv"
            if frame is not None:
                write_csv(path, frame)
            else:
                path.unlink(missing_ok=True)  # a rerun without it must not leave a stale file


def calibration_frame(
    y: np.ndarray, raw: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """Calibration metrics before (raw) and after (the run's temperature) on the same patients."""
    c = len(class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = calibration_summary(y, raw, c, class_names)
        after = calibration_summary(y, probs, c, class_names)
    return pd.DataFrame(
        {"metric": list(after), "before": [before[k] for k in after], "after": list(after.values())}
    )


def operating_frame(
    y_pos: np.ndarray,
    called: np.ndarray,
    threshold: float,
    *,
    rule: str,
    positive: str,
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """Sensitivity, specificity, PPV, NPV and F1 of the decisions ``called`` (bool: positive),
    with percentile bootstrap intervals over patients. ``threshold`` is reported as given (a
    cv folder's is the mean of its folds' thresholds)."""
    score = called.astype(np.float64)
    point = operating_point(y_pos, score, 0.5)
    ci = operating_point_ci(y_pos, score, 0.5, n=n_boot, seed=seed)
    rows = [{"metric": "threshold", "value": threshold, "ci_low": math.nan, "ci_high": math.nan}]
    rows += [
        {
            "metric": m,
            "value": point[m],
            "ci_low": ci.get(m, (math.nan,))[0],
            "ci_high": ci.get(m, (math.nan, math.nan))[1],
        }
        for m in OP_METRICS
    ]
    rows += [
        {"metric": m, "value": point[m], "ci_low": math.nan, "ci_high": math.nan}
        for m in ("tp", "fp", "tn", "fn")
    ]
    frame = pd.DataFrame(rows)
    frame.insert(0, "rule", rule)
    frame.insert(0, "positive_class", positive)
    return frame


def decision_frame(
    y: np.ndarray, probs: np.ndarray, class_names: list[str], positive: int | None
) -> pd.DataFrame:
    """Net benefit of the positive class (binary, --positive-class), else of each class one
    against the rest."""
    classes = [positive] if positive is not None else list(range(len(class_names)))
    frames = []
    for k in classes:
        curve = decision_curve(y == k, probs[:, k])
        curve.insert(0, "class", class_names[k])
        frames.append(curve)
    return pd.concat(frames, ignore_index=True)


def pattern_labels(present: np.ndarray, names: list[str]) -> np.ndarray:
    return np.array(["+".join(n for n, p in zip(names, row, strict=True) if p) for row in present])


def coverage_frame(
    y: np.ndarray,
    sets: np.ndarray,
    present: np.ndarray,
    names: list[str],
    class_names: list[str],
    alpha: float,
    mode: str,
) -> pd.DataFrame:
    frame = coverage_table(y, sets, {"pattern": pattern_labels(present, names)}, class_names)
    frame.insert(0, "mode", mode)
    frame.insert(0, "alpha", alpha)
    return frame


def read_subgroups(manifest: Path, specs: tuple[str, ...], ids: list[str]) -> dict[str, pd.Series]:
    """Each --subgroup-col's band per patient of ``ids`` (manifest order by id)."""
    if not specs:
        return {}
    frame = read_table(Path(manifest), "manifest")
    frame.columns = [str(c).strip() for c in frame.columns]
    id_col = next((c for c in frame.columns if c.lower() == "id"), None)
    out: dict[str, pd.Series] = {}
    for text in specs:
        spec = parse_subgroup(text)
        if spec.column not in frame.columns:
            raise DataError(
                f"--subgroup-col {spec.column!r} is not a column of {manifest}",
                hint=f"its columns: {', '.join(frame.columns)}",
            )
        if spec.column.lower() in ("id", "label"):
            raise DataError(
                f"--subgroup-col {spec.column!r}: subgroups of the {spec.column} "
                "column mean nothing",
                hint="name a column such as sex, age or site",
            )
        values = frame[spec.column]
        if id_col is not None:
            values = pd.Series(values.to_numpy(), index=normalize_ids(frame[id_col]))
            values = values[~values.index.duplicated()].reindex(ids)
        else:
            values = values.iloc[: len(ids)]
        values = values.replace("", np.nan).reset_index(drop=True)
        out[text] = band(values, spec)
    return out


def clinical_outputs(
    y: np.ndarray,
    raw: np.ndarray,
    probs: np.ndarray,
    pred: np.ndarray,
    *,
    class_names: list[str],
    positive: int | None,
    threshold: float | None,
    rule: str | None,
    present: np.ndarray,
    names: list[str],
    sets: np.ndarray | None,
    alpha: float | None,
    conformal_mode: str = "",
    subgroups: dict[str, pd.Series] | None = None,
    n_boot: int = 1000,
    seed: int = 42,
) -> ClinicalOutputs:
    """Every clinical output of one set of predictions (see the module docstring).

    raw/probs: (N, C) before and after calibration; pred: the decisions; sets: conformal sets
    at ``alpha`` (None: no coverage); subgroups: column -> band of each patient."""
    c = len(class_names)
    out = ClinicalOutputs(calibration=calibration_frame(y, raw, probs, class_names))
    if positive is not None and threshold is not None and len(np.unique(y == positive)) == 2:
        out.operating_point = operating_frame(
            y == positive,
            pred == positive,
            threshold,
            rule=rule or "",
            positive=class_names[positive],
            n_boot=n_boot,
            seed=seed,
        )
    if len(np.unique(y)) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.decision_curve = decision_frame(y, probs, class_names, positive)
    if sets is not None and alpha is not None:
        out.coverage = coverage_frame(y, sets, present, names, class_names, alpha, conformal_mode)
    if subgroups:
        tables = []
        op = threshold if (c == 2 and positive == 1 and threshold is not None) else None
        for column, groups in subgroups.items():
            tables.append(
                subgroup_table(
                    y,
                    probs,
                    groups,
                    c,
                    column=column,
                    n_boot=n_boot,
                    seed=seed,
                    names=SUBGROUP_METRICS,
                    op=op,
                )
            )
        out.subgroups = pd.concat(tables, ignore_index=True)
        out.gaps = subgroup_gaps(
            out.subgroups,
            [m for m in (*SUBGROUP_METRICS, *OP_METRICS) if m in out.subgroups.columns],
        )
        small = out.subgroups[out.subgroups["n"] < SMALL_SUBGROUP]
        for _, row in small.iterrows():
            out.notes.append(
                f"subgroup {row['column']} = {row['group']} has {int(row['n'])} "
                f"patient(s) (under {SMALL_SUBGROUP}): its metrics are imprecise"
            )
    return out


def conformal_sets(
    calibration: ConformalCalibration | None, probs: np.ndarray, alpha: float | None
) -> tuple[np.ndarray | None, str]:
    """(sets, mode) at ``alpha``; (None, "") without a calibration or an alpha."""
    if calibration is None or alpha is None:
        return None, ""
    return calibration.sets(probs, alpha), calibration.mode(alpha)
