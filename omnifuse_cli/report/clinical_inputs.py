"""The clinical reading a report shows: the files engine/outputs.py writes beside the evaluated
predictions (calibration, operating point, decision curve, conformal coverage, subgroups) and the
post-hoc fit (temperature, threshold) behind them, of a run or of a cross-validation's folds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.engine import runs
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.report.result_csv import read_result_csv

SMALL_SUBGROUP = 30  # engine.subgroups': fewer patients make a subgroup's metrics imprecise


@dataclass
class Clinical:
    """The clinical reading of the evaluated predictions (engine/outputs.py writes the files)
    and the post-hoc fit behind them; each table is None when its file is absent."""

    folder: Path | None = None  # where the files were looked for (None: nothing evaluated)
    calibration: pd.DataFrame | None = None  # metric, before, after
    operating: pd.DataFrame | None = None  # positive_class, rule, metric, value, ci_low, ci_high
    decision: pd.DataFrame | None = None  # class, threshold, net_benefit, treat_all, ...
    coverage: pd.DataFrame | None = None  # alpha, mode, by, group, n, coverage, ...
    subgroups: pd.DataFrame | None = None  # column, group, n, class_counts, metrics, small
    gaps: pd.DataFrame | None = None  # column, metric, gap, best_group, worst_group, ...
    legacy: bool = False  # the model predates calibration and operating points
    calibrated: bool = False  # a temperature was fitted (run) / asked for (cv)
    temperature: float | None = None  # the run's (None for cv: one per fold)
    posthoc_lines: list[str] = field(default_factory=list)  # PostHoc.describe()
    posthoc_source: str = ""  # whose post-hoc fit posthoc_lines describe, in words
    positive_class: str | None = None  # the operating point's positive class
    threshold: float | None = None
    rule: str | None = None
    fold_posthoc: pd.DataFrame | None = None  # cv: fold, patients, temperature, threshold
    rerun: str = ""  # the command that writes the files (evaluate again / cv again)
    subgroup_command: str = ""  # the command that writes subgroups.csv

    @property
    def evaluated(self) -> bool:
        return self.calibration is not None


LEGACY = (
    "trained before calibration: probabilities are uncalibrated (temperature 1), no operating point"
)
CLINICAL_FILES = {
    "calibration": "calibration.csv",
    "operating": "operating_point.csv",
    "decision": "decision_curve.csv",
    "coverage": "coverage.csv",
    "subgroups": "subgroups.csv",
    "gaps": "subgroup_gaps.csv",
}
_CLINICAL_TEXT = (
    "class",
    "group",
    "column",
    "by",
    "mode",
    "rule",
    "positive_class",
    "best_group",
    "worst_group",
    "class_counts",
    "small",
    "includes_small",
)


def _read_clinical(folder: Path, clinical: Clinical) -> None:
    """The clinical files in ``folder`` (engine/outputs.py), each left None when absent."""
    clinical.folder = folder
    for attr, name in CLINICAL_FILES.items():
        if (folder / name).is_file():
            setattr(clinical, attr, read_result_csv(folder / name, _CLINICAL_TEXT))
    for frame, column in ((clinical.subgroups, "small"), (clinical.gaps, "includes_small")):
        if frame is None:
            continue
        if column in frame:
            frame[column] = frame[column].astype(str).str.lower().isin(("true", "1"))
        elif column == "small":
            frame[column] = frame["n"] < SMALL_SUBGROUP
    if clinical.operating is not None and len(clinical.operating):
        first = clinical.operating.iloc[0]
        clinical.positive_class = str(first["positive_class"])
        clinical.rule = str(first["rule"])
        values = clinical.operating.set_index("metric")["value"]
        if "threshold" in values.index:
            clinical.threshold = float(values["threshold"])


def _posthoc(bundle: dict[str, Any]) -> PostHoc:
    """PostHoc of a bundle's meta (engine.posthoc imports no torch)."""
    return PostHoc.from_bundle(bundle)


def run_clinical(
    source: Path, bundle: dict[str, Any], class_names: list[str], eval_dir: Path | None
) -> Clinical:
    posthoc = _posthoc(bundle)
    clinical = Clinical(
        legacy=posthoc.legacy,
        calibrated=posthoc.calibration == "temperature",
        temperature=float(posthoc.temperature),
        posthoc_lines=posthoc.describe(),
        posthoc_source="the run's model (fitted on its validation split)",
        rerun=f"omnifuse evaluate {source}",
        subgroup_command=f"omnifuse evaluate {source} --subgroup-col COL",
    )
    if posthoc.positive is not None and posthoc.positive < len(class_names):
        clinical.positive_class = class_names[posthoc.positive]
    clinical.threshold, clinical.rule = posthoc.threshold, posthoc.rule
    if eval_dir is not None:
        _read_clinical(eval_dir, clinical)
    return clinical


def cv_clinical(
    source: Path, meta: dict[str, str], predictions: pd.DataFrame, class_names: list[str]
) -> Clinical:
    """The pooled clinical files of a cv folder, each fold's temperature and threshold, and the
    --refit model's post-hoc fit."""
    raw = [f"raw_prob_{c}" for c in class_names]
    has_raw = set(raw) <= set(predictions.columns)
    clinical = Clinical(
        legacy=not has_raw and not (source / "calibration.csv").is_file(),
        calibrated=meta.get("calibrate", "") == "temperature",  # refined by the folds below
        rerun="omnifuse cv again with this omnifuse (the files are written when it finishes)",
        subgroup_command="omnifuse cv MANIFEST ... --subgroup-col COL",
    )
    _read_clinical(source, clinical)
    rows = []
    for fold, part in predictions.groupby("fold", sort=True):
        labelled = part[part["label"].astype(str) != ""]
        row: dict[str, object] = {"fold": str(fold), "patients": len(part)}
        if has_raw:
            row["temperature"] = recovered_temperature(
                labelled[raw].to_numpy(dtype=float),
                labelled[[f"prob_{c}" for c in class_names]].to_numpy(dtype=float),
            )
        if "threshold" in part:
            values = pd.to_numeric(part["threshold"], errors="coerce").dropna()
            row["threshold"] = float(values.iloc[0]) if len(values) else math.nan
        rows.append(row)
    if has_raw and rows:
        clinical.fold_posthoc = pd.DataFrame(rows)
        temperatures = clinical.fold_posthoc["temperature"].to_numpy(dtype=float)
        clinical.calibrated = bool((np.abs(temperatures - 1.0) > 1e-3).any())
    final = source / runs.FINAL_DIR / runs.BUNDLE_DIR / "bundle.json"
    if final.is_file():
        posthoc = _posthoc(json.loads(final.read_text(encoding="utf-8")))
        clinical.posthoc_lines = posthoc.describe()
        clinical.posthoc_source = (
            "the final model refitted on every patient (--refit; its validation split)"
        )
    return clinical


def recovered_temperature(raw: np.ndarray, calibrated: np.ndarray) -> float:
    """The temperature T with calibrated = softmax(log(raw) / T), recovered by least squares on
    the centred log-probabilities of every patient (a cv fold's temperature is not stored; its
    predictions before and after calibration are). NaN when the probabilities say nothing (all
    uniform)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = np.log(raw), np.log(calibrated)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a = a[keep] - a[keep].mean(axis=1, keepdims=True)
    b = b[keep] - b[keep].mean(axis=1, keepdims=True)
    product = float((a * b).sum())
    return float((a * a).sum() / product) if product > 1e-12 else math.nan
