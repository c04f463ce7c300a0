"""The report's clinical sections: calibration (temperature, before/after, reliability diagram),
the operating point, the decision curve and the conformal prediction sets, each read from the
files `evaluate` or `cv` writes for it, and saying what writes a file that is absent."""

from __future__ import annotations

import numpy as np

from omnifuse_cli.report import figures
from omnifuse_cli.report.clinical_inputs import LEGACY
from omnifuse_cli.report.curves import reliability_bins
from omnifuse_cli.report.inputs import ReportInputs
from omnifuse_cli.report.markup import (
    METRIC_LABELS,
    AddFigure,
    ci_range,
    esc,
    metrics_table,
    num,
    signed,
    table,
)

CALIBRATION = ("ece", "brier")
OPERATING_LABELS = {
    "threshold": "threshold (probability of the positive class)",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV (positive predictive value)",
    "npv": "NPV (negative predictive value)",
    "f1": "F1",
}
DECISION_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)  # net benefit shown as numbers at these
NET_BENEFIT = (
    "Net benefit = TP/n - FP/n x pt/(1 - pt) at the threshold probability pt: the "
    "true positives per patient, less the false positives weighted by the odds at pt "
    "(choosing pt says how many unnecessary treatments one necessary treatment is "
    "worth: pt = 0.2 accepts 4). Treat all calls every patient positive; treat none "
    "calls nobody (net benefit 0). The model is of use where its curve lies above "
    "both."
)


def _whose(inputs: ReportInputs) -> str:
    return "cross-validation" if inputs.kind == "cv" else "run"


def _legacy(inputs: ReportInputs) -> str:
    return f'<p class="warn legacy">This {_whose(inputs)} was {esc(LEGACY)}.</p>'


def _not_evaluated(inputs: ReportInputs, what: str, other: str = "") -> str:
    """A file of the clinical reading is absent: say why it may be, and what writes it."""
    clinical = inputs.clinical
    if clinical.folder is None:
        return (
            f'<p class="note">No {esc(what)}: the run has not been evaluated; run '
            f"<code>{esc(clinical.rerun)}</code>.</p>"
        )
    return (
        f'<p class="note">No {esc(what)} in {esc(clinical.folder)} (written by an older '
        f"omnifuse{esc(other)}): <code>{esc(clinical.rerun)}</code>.</p>"
    )


def operating_mark(inputs: ReportInputs) -> figures.OperatingMark | None:
    clinical = inputs.clinical
    frame = clinical.operating
    if frame is None or clinical.positive_class not in inputs.class_names:
        return None
    values = frame.set_index("metric")["value"]
    if not {"sensitivity", "specificity", "threshold"} <= set(values.index):
        return None
    return figures.OperatingMark(
        inputs.class_names.index(str(clinical.positive_class)),
        1.0 - float(values["specificity"]),
        float(values["sensitivity"]),
        float(values["threshold"]),
    )


def _calibration_label(metric: str) -> str:
    for key, name, ideal in (
        ("cal_intercept", "calibration intercept", 0),
        ("cal_slope", "calibration slope", 1),
    ):
        if metric == key:
            return f"{name} (ideal {ideal})"
        if metric.startswith(key + "_"):
            return f"{name}, class {metric[len(key) + 1 :]} vs rest (ideal {ideal})"
    return METRIC_LABELS.get(metric, metric)


def calibration(inputs: ReportInputs, add: AddFigure) -> str:
    cv = inputs.kind == "cv"
    clinical = inputs.clinical
    parts = [metrics_table("metrics-calibration", inputs.metrics, CALIBRATION, cv)]
    if clinical.legacy:
        parts.append(_legacy(inputs))
    elif cv:
        folds = clinical.fold_posthoc
        threshold = (
            " and its operating threshold" if folds is not None and "threshold" in folds else ""
        )
        parts.append(
            "<p>Each fold fits its own temperature (1 when its inner validation split "
            f"is too small, or with --calibrate none){threshold} on its inner "
            "validation split and applies it to its test patients; the pooled "
            "out-of-fold probabilities on this page are after calibration. "
            + (
                "Temperatures recovered from predictions.csv (probabilities before and "
                "after calibration):"
                if folds is not None
                else ""
            )
            + "</p>"
        )
        if folds is not None:
            header = ["fold", "test patients", "temperature"]
            if "threshold" in folds:
                header.append("threshold")
            rows = [
                (
                    str(r["fold"]),
                    [
                        esc(r["fold"]),
                        str(int(r["patients"])),
                        num(r["temperature"]),
                        *([num(r["threshold"])] if "threshold" in folds else []),
                    ],
                )
                for _, r in folds.iterrows()
            ]
            parts.append(table("fold-posthoc", header, rows))
    else:
        state = (
            f"Probabilities are calibrated by temperature scaling: temperature "
            f"<b>{clinical.temperature:.3f}</b>, fitted on the validation split (log loss)."
            if clinical.calibrated
            else "Probabilities are not calibrated (temperature 1)."
        )
        parts.append(f'<p id="temperature">{state}</p>')
    if clinical.posthoc_lines and not clinical.legacy:
        items = "".join(f"<li>{esc(line)}</li>" for line in clinical.posthoc_lines)
        parts.append(
            f"<p>Post-hoc fit of {esc(clinical.posthoc_source)}:</p>"
            f'<ul class="posthoc">{items}</ul>'
        )
    frame = clinical.calibration
    if frame is not None:
        after = (
            "each fold's temperature"
            if cv
            else f"temperature {clinical.temperature:.3f}"
            if clinical.temperature
            else ""
        )
        rows = []
        for _, r in frame.iterrows():
            change = float(r["after"]) - float(r["before"])
            rows.append(
                (
                    str(r["metric"]),
                    [
                        esc(_calibration_label(str(r["metric"]))),
                        num(r["before"]),
                        num(r["after"]),
                        signed(change),
                    ],
                )
            )
        parts.append(
            f'<p class="meta">Before and after calibration, on '
            f"{esc(inputs.evaluated_on)} (calibration.csv).</p>"
        )
        parts.append(
            table(
                "calibration-before-after",
                [
                    "metric",
                    "before calibration",
                    f"after ({after})" if after else "after calibration",
                    "change",
                ],
                rows,
            )
        )
    else:
        parts.append(_not_evaluated(inputs, "calibration.csv (before/after calibration)"))
    scored = inputs.probabilities()
    if scored is not None:
        y, probs = scored
        raw = inputs.raw_probabilities()
        before = reliability_bins(y, raw) if raw is not None else None
        same = raw is not None and np.allclose(raw, probs, atol=1e-6)
        caption = (
            "Patients sorted by the probability of their predicted class into 10 "
            "quantile bins (equal counts; the number of patients is written on each "
            "point); accuracy against mean probability"
            + (", after calibration" if raw is not None else "")
            + ". ECE uses 10 equal-width bins."
        )
        if raw is not None:
            caption += " Grey, dotted: the same before calibration" + (
                " (it coincides: temperature 1)." if same else "."
            )
        parts.append(
            add(
                figures.calibration(
                    reliability_bins(y, probs),
                    probs.max(axis=1),
                    before,
                    "after calibration" if raw is not None else "model",
                ),
                "calibration",
                "Reliability diagram",
                caption,
            )
        )
    return "".join(parts)


def operating(inputs: ReportInputs) -> str:
    clinical = inputs.clinical
    frame = clinical.operating
    cv = inputs.kind == "cv"
    if frame is None or not len(frame):
        if clinical.legacy:
            return _legacy(inputs)
        if clinical.threshold is None:
            lines = "".join(
                f"<li>{esc(line)}</li>"
                for line in clinical.posthoc_lines
                if "operating" in line or "threshold" in line
            )
            train = "omnifuse cv" if cv else "omnifuse train"
            return (
                "<p>No operating point: "
                + (
                    f"a {inputs.num_classes}-class task without --positive-class"
                    if inputs.num_classes > 2
                    else "none was fitted"
                )
                + "; the predicted class is the most probable one. "
                f"<code>{train} ... --positive-class CLASS --threshold RULE</code> fits one "
                "(binary tasks get one for their second class).</p>"
                + (f"<ul>{lines}</ul>" if lines else "")
            )
        return _not_evaluated(
            inputs,
            "operating_point.csv",
            ", or the evaluated patients lack positives or negatives of "
            f"class {clinical.positive_class}",
        )
    values = frame.set_index("metric")
    positive = clinical.positive_class
    parts = [
        f"<p>Class <b>{esc(positive)}</b> is called positive when its probability is at "
        f"least <b>{num(clinical.threshold)}</b> (rule <code>{esc(clinical.rule)}</code>, "
        "chosen on the validation split"
        + (" of each fold; the threshold shown is the mean of the folds'" if cv else "")
        + f"); any other patient gets the most probable other class. On "
        f"{esc(inputs.evaluated_on)}; the ROC figure marks this point.</p>"
    ]
    rows = [
        (
            key,
            [
                esc(label),
                num(values.loc[key, "value"]),
                ci_range(values.loc[key, "ci_low"], values.loc[key, "ci_high"]),
            ],
        )
        for key, label in OPERATING_LABELS.items()
        if key in values.index
    ]
    parts.append(table("operating-point", ["measure", "value", "95% CI (bootstrap)"], rows))
    if {"tp", "fp", "tn", "fn"} <= set(values.index):
        count = {k: str(int(values.loc[k, "value"])) for k in ("tp", "fp", "tn", "fn")}
        parts.append(
            table(
                "operating-counts",
                ["", f"true class {positive}", f"true class not {positive}"],
                [
                    (
                        "called-positive",
                        [f"called {esc(positive)}", f"{count['tp']} (TP)", f"{count['fp']} (FP)"],
                    ),
                    (
                        "called-negative",
                        [
                            f"not called {esc(positive)}",
                            f"{count['fn']} (FN)",
                            f"{count['tn']} (TN)",
                        ],
                    ),
                ],
            )
        )
    return "".join(parts)


def decision(inputs: ReportInputs, add: AddFigure) -> str:
    clinical = inputs.clinical
    frame = clinical.decision
    if frame is None or not len(frame):
        return _not_evaluated(
            inputs, "decision_curve.csv", ", or the evaluated patients are all of one class"
        )
    classes = list(dict.fromkeys(frame["class"].astype(str)))
    thresholds = (
        {str(clinical.positive_class): float(clinical.threshold)}
        if clinical.positive_class is not None and clinical.threshold is not None
        else {}
    )
    which = (
        f"class {classes[0]}, the positive class"
        if len(classes) == 1
        else "each class against the rest"
    )
    parts = [
        add(
            figures.decision_curves(frame, thresholds),
            "decision",
            "Decision curve",
            f"{NET_BENEFIT} Shown for {which}, on {inputs.evaluated_on}; y-axis from "
            "-0.05 to a little above the prevalence; dotted: the operating threshold.",
        )
    ]
    rows = []
    for name in classes:
        part = frame[frame["class"].astype(str) == name]
        for pt in DECISION_THRESHOLDS:
            hit = part[np.isclose(part["threshold"].astype(float), pt)]
            if not len(hit):
                continue
            r = hit.iloc[0]
            best_default = max(float(r["treat_all"]), float(r["treat_none"]))
            rows.append(
                (
                    f"{name}:{pt:.2f}",
                    [
                        esc(name),
                        f"{pt:.2f}",
                        num(r["net_benefit"]),
                        num(r["treat_all"]),
                        signed(float(r["net_benefit"]) - best_default),
                    ],
                )
            )
    parts.append(
        table(
            "decision-curve",
            [
                "class",
                "threshold probability",
                "net benefit (model)",
                "treat all",
                "model - best of treat all / none",
            ],
            rows,
        )
    )
    return "".join(parts)


def coverage(inputs: ReportInputs) -> str:
    clinical = inputs.clinical
    frame = clinical.coverage
    if frame is None or not len(frame):
        if clinical.legacy:
            return (
                '<p class="note">No conformal prediction sets: the model was trained before '
                "omnifuse stored conformal scores (train it again for them).</p>"
            )
        return _not_evaluated(
            inputs,
            "coverage.csv (conformal prediction sets)",
            ", or the model has no conformal scores",
        )
    parts = []
    alphas = list(dict.fromkeys(frame["alpha"].astype(float)))
    for alpha in alphas:
        part = frame[frame["alpha"].astype(float) == alpha]
        target = 1.0 - alpha
        modes = "/".join(dict.fromkeys(part["mode"].astype(str))) or "marginal"
        parts.append(
            f"<p>Split conformal prediction sets (LAC) at alpha = {alpha:g}: each patient gets "
            f"the set of classes whose probability clears a cut-off fitted on the validation "
            f"split{' of each fold' if inputs.kind == 'cv' else ''} ({esc(modes)}), so that "
            f"the set holds the true class for at least <b>{target:.0%}</b> of patients. "
            "Coverage is shown overall, by true class and by missing pattern; a small group "
            "can fall below the target by chance.</p>"
        )
        by_names = {"all": "all patients", "class": "true class", "pattern": "missing pattern"}
        rows = []
        for _, r in part.iterrows():
            cov = float(r["coverage"])
            below = " (below target)" if np.isfinite(cov) and cov < target - 1e-9 else ""
            rows.append(
                (
                    f"{r['by']}:{r['group']}",
                    [
                        esc(by_names.get(str(r["by"]), r["by"])),
                        esc(r["group"]),
                        str(int(r["n"])),
                        num(cov) + below,
                        f"{target:.3f}",
                        num(r["mean_set_size"]),
                        str(int(r["empty_sets"])),
                    ],
                )
            )
        table_id = "coverage" if len(alphas) == 1 else f"coverage-{alpha:g}"
        parts.append(
            table(
                table_id,
                ["by", "group", "patients", "coverage", "target", "mean set size", "empty sets"],
                rows,
                numeric_from=2,
            )
        )
    return "".join(parts)
