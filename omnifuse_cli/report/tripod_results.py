"""The results items of the TRIPOD+AI checklist (tripod.py): performance with intervals,
calibration before and after, the operating point, subgroups and fairness, as the evaluated
files say them."""

from __future__ import annotations

import math

import numpy as np

from omnifuse_cli.report.clinical_inputs import LEGACY, SMALL_SUBGROUP
from omnifuse_cli.report.inputs import ReportInputs


def fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def subgroup_result(inputs: ReportInputs) -> str:
    frame = inputs.clinical.subgroups
    if frame is None or not len(frame):
        return "Subgroups: none examined (see item 14)."
    columns = ", ".join(dict.fromkeys(frame["column"].astype(str)))
    return (
        f"Subgroups: {len(frame)} subgroups of {columns} with 95% intervals (see Subgroups "
        "and fairness; gaps in item 14)."
    )


def performance(inputs: ReportInputs) -> str:
    rows = inputs.metrics.set_index("metric")
    parts = []
    for key, label in (
        ("macro_f1", "macro-F1"),
        ("auroc", "AUROC"),
        ("acc", "accuracy"),
        ("brier", "Brier"),
        ("ece", "ECE"),
    ):
        if key not in rows.index:
            continue
        row = rows.loc[key]
        interval = (
            ""
            if not np.isfinite(row.get("ci_low", np.nan))
            else f" (95% CI {fmt(row['ci_low'])}-{fmt(row['ci_high'])})"
        )
        parts.append(f"{label} {fmt(row['value'])}{interval}")
    return "; ".join(parts) + f", on {inputs.evaluated_on}."


GAP_METRICS = (
    ("auroc", "AUROC"),
    ("macro_f1", "macro-F1"),
    ("ece", "ECE"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
)


def subgroup_hint(inputs: ReportInputs) -> str:
    return (
        f"`{inputs.clinical.subgroup_command}` (e.g. --subgroup-col sex --subgroup-col "
        "age:q4) reports every metric per subgroup with 95% intervals and the largest gap"
    )


def fairness(inputs: ReportInputs) -> str:
    """Item 14: what the subgroup files say, or which flag writes them."""
    clinical = inputs.clinical
    frame = clinical.subgroups
    if frame is None or not len(frame):
        return (
            f"no subgroup analysis in this output: {subgroup_hint(inputs)}; approaches "
            "and rationale: for the author"
        )
    columns = list(dict.fromkeys(frame["column"].astype(str)))
    groups = "; ".join(
        f"{c}: "
        + ", ".join(
            f"{r['group']} (n={int(r['n'])})"
            for _, r in frame[frame["column"].astype(str) == c].iterrows()
        )
        for c in columns
    )
    text = (
        f"performance examined by subgroup of {', '.join(columns)} ({groups}): every "
        "metric per subgroup with 95% bootstrap intervals (see Subgroups and fairness); no "
        "fairness constraint in training"
    )
    gaps = clinical.gaps
    if gaps is not None and len(gaps):
        found = []
        for column in columns:
            part = gaps[gaps["column"].astype(str) == column].set_index("metric")
            for key, label in GAP_METRICS:
                if key in part.index and np.isfinite(float(part.loc[key, "gap"])):
                    row = part.loc[key]
                    found.append(
                        f"{column} {label} {fmt(float(row['gap']))} (best "
                        f"{row['best_group']}, worst {row['worst_group']})"
                    )
        if found:
            text += "; largest gaps: " + ", ".join(found)
    small = frame[frame["small"].astype(bool)]
    if len(small):
        text += (
            f"; {len(small)} of {len(frame)} subgroups have fewer than {SMALL_SUBGROUP} "
            "patients (imprecise)"
        )
    return text + ". Rationale and mitigation: for the author."


def calibration_result(inputs: ReportInputs) -> str:
    """Calibration before and after the temperature: ECE, slope and intercept."""
    clinical = inputs.clinical
    if clinical.legacy:
        return f"Calibration: {LEGACY}."
    frame = clinical.calibration
    if frame is None or not len(frame):
        return ""
    rows = frame.set_index("metric")

    def change(metric: str) -> str:
        before, after = (float(rows.loc[metric, k]) for k in ("before", "after"))
        return f"{fmt(before)} -> {fmt(after)}"

    parts = []
    if "ece" in rows.index:
        parts.append(f"ECE {change('ece')}")
    for key, label in (("cal_slope", "slope"), ("cal_intercept", "intercept")):
        if key in rows.index:
            parts.append(f"calibration {label} {change(key)}")
        else:
            per = [m for m in rows.index if str(m).startswith(key + "_")]
            if per:
                parts.append(
                    f"calibration {label} (one-vs-rest) "
                    + ", ".join(f"class {m[len(key) + 1 :]} {change(m)}" for m in per)
                )
    how = (
        "each fold's temperature"
        if inputs.kind == "cv"
        else f"temperature {clinical.temperature:.3f}"
        if clinical.calibrated
        else "not calibrated, temperature 1"
    )
    return f"Calibration before -> after ({how}): " + "; ".join(parts) + "."


def operating_result(inputs: ReportInputs) -> str:
    clinical = inputs.clinical
    frame = clinical.operating
    if frame is None or not len(frame):
        return ""
    rows = frame.set_index("metric")
    parts = []
    for key, label in (
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("ppv", "PPV"),
        ("npv", "NPV"),
    ):
        if key in rows.index:
            row = rows.loc[key]
            interval = (
                ""
                if not np.isfinite(float(row["ci_low"]))
                else f" ({fmt(float(row['ci_low']))}-{fmt(float(row['ci_high']))})"
            )
            parts.append(f"{label} {fmt(float(row['value']))}{interval}")
    return (
        f"Operating point (class {clinical.positive_class} positive at probability >= "
        f"{fmt(clinical.threshold or math.nan)}, rule {clinical.rule}): " + ", ".join(parts) + "."
    )
