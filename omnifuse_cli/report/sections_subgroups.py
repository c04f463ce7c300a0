"""The report's subgroup section: every metric per subgroup with its interval, small subgroups
flagged, and the largest gap between subgroups (subgroups.csv and subgroup_gaps.csv)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from omnifuse_cli.report import figures
from omnifuse_cli.report.clinical_inputs import SMALL_SUBGROUP
from omnifuse_cli.report.inputs import ReportInputs
from omnifuse_cli.report.markup import AddFigure, ci_range, esc, num, table

SUBGROUP_LABELS = {
    "auroc": "AUROC",
    "macro_f1": "macro-F1",
    "acc": "accuracy",
    "brier": "Brier",
    "ece": "ECE",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "cal_intercept": "calibration intercept",
    "cal_slope": "calibration slope",
}


def _cell(row: pd.Series, metric: str) -> str:
    """A metric with its interval in brackets (none when the interval is undefined)."""
    interval = (
        ci_range(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])
        if f"{metric}_ci_low" in row
        else ""
    )
    return num(row.get(metric)) + (f" ({interval})" if interval else "")


def subgroups(inputs: ReportInputs, add: AddFigure) -> str:
    clinical = inputs.clinical
    frame = clinical.subgroups
    if frame is None or not len(frame):
        where = "" if clinical.folder is None else f" in {clinical.folder}"
        return (
            f'<p class="note" id="no-subgroups">No subgroup analysis{esc(where)}: '
            f"<code>{esc(clinical.subgroup_command)}</code> (e.g. <code>--subgroup-col sex "
            "--subgroup-col age:q4</code>) writes subgroups.csv and subgroup_gaps.csv: "
            "every metric per subgroup with 95% intervals, and the largest gap.</p>"
        )
    parts = []
    small = frame[frame["small"].astype(bool)]
    if len(small):
        named = ", ".join(
            f"{r['column']} = {r['group']} ({int(r['n'])})" for _, r in small.iterrows()
        )
        parts.append(
            f'<p class="warn" id="small-subgroups"><b>Warning:</b> {len(small)} '
            f"subgroup(s) have fewer than {SMALL_SUBGROUP} patients: {esc(named)}. "
            "Their metrics are imprecise and their intervals wide; a gap involving them "
            "is weak evidence either way.</p>"
        )
    parts.append(
        f'<p class="meta">On {esc(inputs.evaluated_on)}; each metric with its 95% '
        "percentile bootstrap interval. Class counts in class order "
        f"({'/'.join(esc(c) for c in inputs.class_names)}).</p>"
    )
    main = [m for m in ("auroc", "macro_f1", "acc", "brier", "ece") if m in frame]
    extra = [
        m
        for m in ("sensitivity", "specificity", "ppv", "npv", "cal_intercept", "cal_slope")
        if m in frame
    ]

    def rows_of(metrics: list[str]) -> list[tuple[str, list[str]]]:
        rows = []
        for _, r in frame.iterrows():
            n = str(int(r["n"])) + (f" (under {SMALL_SUBGROUP})" if bool(r["small"]) else "")
            rows.append(
                (
                    f"{r['column']}:{r['group']}",
                    [
                        esc(r["column"]),
                        esc(r["group"]),
                        n,
                        esc(r.get("class_counts", "")),
                        *(_cell(r, m) for m in metrics),
                    ],
                )
            )
        return rows

    head = ["subgroup of", "group", "patients", "class counts"]
    parts.append(
        table("subgroups", head + [SUBGROUP_LABELS[m] for m in main], rows_of(main), numeric_from=2)
    )
    if extra:
        said = []
        if set(extra) & {"sensitivity", "specificity", "ppv", "npv"}:
            said.append(
                "at the operating point"
                + (
                    f" (class {esc(clinical.positive_class)} positive at {num(clinical.threshold)})"
                    if clinical.threshold is not None
                    else ""
                )
            )
        if set(extra) & {"cal_intercept", "cal_slope"}:
            said.append("the calibration intercept (ideal 0) and slope (ideal 1)")
        parts.append(f"<p>By subgroup, {', and '.join(said)}:</p>")
        parts.append(
            table(
                "subgroups-operating",
                head + [SUBGROUP_LABELS[m] for m in extra],
                rows_of(extra),
                numeric_from=2,
            )
        )
    overall = dict(
        zip(inputs.metrics["metric"], inputs.metrics["value"].astype(float), strict=True)
    )
    parts.append(
        add(
            figures.subgroup_metrics(frame, overall=overall),
            "subgroups",
            "Metrics by subgroup",
            "Each subgroup's AUROC and macro-F1 with 95% bootstrap intervals; hollow: "
            f"fewer than {SMALL_SUBGROUP} patients; dashed: all evaluated patients.",
        )
    )
    gaps = clinical.gaps
    if gaps is not None and len(gaps):
        rows = []
        for _, r in gaps.iterrows():
            gap = float(r["gap"])
            note = "includes subgroups under 30 patients" if bool(r["includes_small"]) else ""
            rows.append(
                (
                    f"{r['column']}:{r['metric']}",
                    [
                        esc(r["column"]),
                        esc(SUBGROUP_LABELS.get(str(r["metric"]), r["metric"])),
                        num(gap),
                        esc(r["best_group"]) if np.isfinite(gap) else "",
                        esc(r["worst_group"]) if np.isfinite(gap) else "",
                        str(int(r["groups_compared"])),
                        note,
                    ],
                )
            )
        parts.append(
            "<h3>Largest gap between subgroups</h3><p>Per column and metric: the "
            f"subgroups of {SMALL_SUBGROUP} or more patients are compared when at least "
            "two exist, otherwise every subgroup (noted). Best = highest (lowest for "
            "Brier and ECE; nearest 0 and 1 for the calibration intercept and "
            "slope).</p>"
        )
        parts.append(
            table(
                "subgroup-gaps",
                [
                    "subgroup of",
                    "metric",
                    "gap (best - worst)",
                    "best group",
                    "worst group",
                    "groups compared",
                    "note",
                ],
                rows,
                numeric_from=2,
                text=(3, 4, 6),
            )
        )
    else:
        parts.append('<p class="note">No subgroup_gaps.csv beside subgroups.csv.</p>')
    return "".join(parts)
