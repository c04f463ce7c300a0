"""The report page: one self-contained HTML file (CSS inline, figures embedded as base64 PNG) and
the figures as PNG and PDF in a folder beside it."""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from omnifuse_cli import __version__
from omnifuse_cli.engine.files import write_text_atomic
from omnifuse_cli.report import figures
from omnifuse_cli.report.curves import pr_curves, reliability_bins, roc_curves
from omnifuse_cli.report.inputs import (
    LEGACY,
    SMALL_SUBGROUP,
    ReportInputs,
    group_order,
    load_inputs,
)
from omnifuse_cli.report.tripod import checklist

if TYPE_CHECKING:  # figures.py imports matplotlib; here it is only a type
    from matplotlib.figure import Figure

# _sections' ``add``: renders a figure (None: none to show) and returns its HTML.
AddFigure = Callable[["Figure | None", str, str, str], str]

METRIC_LABELS = {
    "acc": "accuracy",
    "macro_f1": "macro-F1",
    "balanced_acc": "balanced accuracy",
    "auroc": "AUROC (OvR macro)",
    "auprc": "AUPRC (OvR macro)",
    "loss": "log loss",
    "ece": "calibration error (ECE)",
    "brier": "Brier score",
}
DISCRIMINATION = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss")
CALIBRATION = ("ece", "brier")
OPERATING_LABELS = {
    "threshold": "threshold (probability of the positive class)",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV (positive predictive value)",
    "npv": "NPV (negative predictive value)",
    "f1": "F1",
}
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
DECISION_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)  # net benefit shown as numbers at these
NET_BENEFIT = (
    "Net benefit = TP/n - FP/n x pt/(1 - pt) at the threshold probability pt: the "
    "true positives per patient, less the false positives weighted by the odds at pt "
    "(choosing pt says how many unnecessary treatments one necessary treatment is "
    "worth: pt = 0.2 accepts 4). Treat all calls every patient positive; treat none "
    "calls nobody (net benefit 0). The model is of use where its curve lies above "
    "both."
)
FIGURE_NAMES = (
    "classes",
    "missing",
    "discrimination",
    "confusion",
    "calibration",
    "decision",
    "subgroups",
    "training",
    "weights",
    "patterns",
    "forest",
)  # every file stem
BAND_RESAMPLES = 200  # bootstrap resamples for the ROC/PR bands (the metrics' CIs have more)
PNG_DPI = 130
PX_PER_INCH = 84  # figures appear a little smaller than their print size
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fff;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px}
header{border-bottom:1px solid #ccc;margin-bottom:12px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-top:8px}
h3{font-size:15px}
nav a{margin-right:14px;color:#333}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
.note{background:#f7f7f7;border-left:3px solid #999;padding:6px 10px;font-size:13px}
.author{color:#888;font-style:italic}.meta{color:#555;font-size:13px}
.warn{background:#fff4e5;border-left:3px solid #e08a00;padding:6px 10px;font-size:13px}
"""


@dataclass
class RenderedFigure:
    name: str  # file stem
    title: str
    caption: str
    png: bytes
    pdf: bytes
    width_in: float  # the figure's width, for its size on the page


@dataclass
class ReportResult:
    html: Path
    figures_dir: Path
    figures: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)


def _num(value: object) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)  # type: ignore[arg-type]  # what float() refuses is caught
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "n/a" if not np.isfinite(number) else f"{number:.3f}"


def _interval(low: object, high: object) -> str:
    return "" if _num(low) == "n/a" else f"{_num(low)} – {_num(high)}"


def _e(text: object) -> str:
    return html.escape(str(text))


def _render(fig: Figure, name: str, title: str, caption: str) -> RenderedFigure:
    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=PNG_DPI)
    fig.savefig(pdf, format="pdf")
    return RenderedFigure(
        name, title, caption, png.getvalue(), pdf.getvalue(), float(fig.get_size_inches()[0])
    )


def _figure_html(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{fig.name}"><img alt="{_e(fig.title)}" '
        f'style="width:{round(fig.width_in * PX_PER_INCH)}px" '
        f'src="data:image/png;base64,{data}"><figcaption><b>{_e(fig.title)}.</b> '
        f"{_e(fig.caption)}</figcaption></figure>"
    )


def _table(
    table_id: str,
    header: list[str],
    rows: list[tuple[str, list[str]]],
    numeric_from: int = 1,
    text: tuple[int, ...] = (),
) -> str:
    """rows: (data-key, cells); cells are already escaped HTML. Cells from ``numeric_from`` on
    are right-aligned numbers, except the columns in ``text``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for key, cells in rows:
        tds = "".join(
            f'<td class="num">{c}</td>' if k >= numeric_from and k not in text else f"<td>{c}</td>"
            for k, c in enumerate(cells)
        )
        body.append(f'<tr data-key="{_e(key)}">{tds}</tr>')
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


def _metrics_table(table_id: str, frame: pd.DataFrame, keys: tuple[str, ...], cv: bool) -> str:
    header = ["metric", "value", "95% CI (bootstrap)"] + (["folds: mean ± SD"] if cv else [])
    rows = []
    ordered = frame.set_index("metric").reindex([k for k in keys if k in set(frame["metric"])])
    for _, row in ordered.reset_index().iterrows():
        cells = [
            _e(METRIC_LABELS.get(row["metric"], row["metric"])),
            _num(row["value"]),
            _interval(row.get("ci_low"), row.get("ci_high")),
        ]
        if cv:
            cells.append(f"{_num(row['fold_mean'])} ± {_num(row['fold_sd'])}")
        rows.append((str(row["metric"]), cells))
    return _table(table_id, header, rows)


def build_report(source: Path, out: Path | None = None) -> ReportResult:
    """Read a run or cv folder and write the page and its figures (nothing is written when the
    folder is not a run or cv output)."""
    t0 = time.perf_counter()
    inputs = load_inputs(Path(source))
    html_path = Path(out) if out is not None else Path(source) / "report.html"
    figures_dir = html_path.with_name(f"{html_path.stem}-figures")
    rendered: dict[str, RenderedFigure] = {}
    sections = _sections(inputs, rendered)
    page = _page(inputs, sections)
    figures_dir.mkdir(parents=True, exist_ok=True)
    for fig in rendered.values():
        (figures_dir / f"{fig.name}.png").write_bytes(fig.png)
        (figures_dir / f"{fig.name}.pdf").write_bytes(fig.pdf)
    for name in set(FIGURE_NAMES) - set(rendered):  # an earlier report's, no longer drawn
        for suffix in (".png", ".pdf"):
            (figures_dir / f"{name}{suffix}").unlink(missing_ok=True)
    write_text_atomic(html_path, page)
    return ReportResult(
        html_path, figures_dir, list(rendered), time.perf_counter() - t0, list(inputs.notes)
    )


def _sections(
    inputs: ReportInputs, rendered: dict[str, RenderedFigure]
) -> list[tuple[str, str, str]]:
    """(id, title, html) of every section; figures are added to ``rendered``."""

    def add(fig: Figure | None, name: str, title: str, caption: str) -> str:
        assert name in FIGURE_NAMES, name
        if fig is None:
            return ""
        rendered[name] = _render(fig, name, title, caption)
        return _figure_html(rendered[name])

    cv = inputs.kind == "cv"
    out = [("cohort", "Cohort", _cohort(inputs, add))]
    scored = inputs.probabilities()
    disc = [
        f'<p class="meta">Computed on {_e(inputs.evaluated_on)}.</p>',
        _metrics_table("metrics-discrimination", inputs.metrics, DISCRIMINATION, cv),
    ]
    if scored is not None:
        y, probs = scored
        mark = _operating_mark(inputs)
        marked = (
            ""
            if mark is None
            else (
                f" The diamond marks the operating point of class {inputs.class_names[mark.cls]} "
                f"(threshold {mark.threshold:.3f}"
                + (", the mean of the folds' thresholds" if cv else "")
                + f"): 1 - specificity {mark.fpr:.3f}, sensitivity {mark.tpr:.3f}."
            )
        )
        disc.append(
            add(
                figures.discrimination(
                    roc_curves(y, probs, n=BAND_RESAMPLES),
                    pr_curves(y, probs, n=BAND_RESAMPLES),
                    inputs.class_names,
                    mark,
                ),
                "discrimination",
                "ROC and precision-recall curves",
                f"One class against the rest, {len(y)} patients; shaded: 95% "
                f"percentile bootstrap band ({BAND_RESAMPLES} resamples of patients)." + marked,
            )
        )
    if inputs.confusion is not None:
        disc.append(
            add(
                figures.confusion(inputs.confusion, inputs.class_names),
                "confusion",
                "Confusion matrix",
                "Rows are true classes; each cell gives the count and the share of its true class.",
            )
        )
        disc.append(
            _table(
                "confusion",
                ["true \\ predicted", *inputs.class_names],
                [
                    (name, [_e(name), *(str(int(v)) for v in row)])
                    for name, row in zip(inputs.class_names, inputs.confusion, strict=True)
                ],
            )
        )
    out.append(("discrimination", "Discrimination", "".join(disc)))
    out.append(("calibration", "Calibration", _calibration(inputs, add)))
    out.append(("operating-point", "Operating point", _operating(inputs)))
    out.append(("decision-curve", "Decision curve", _decision(inputs, add)))
    out.append(("coverage", "Conformal prediction sets", _coverage(inputs)))
    out.append(("subgroups", "Subgroups and fairness", _subgroups(inputs, add)))
    out.append(("training", "Training", _training(inputs, add)))
    out.append(("modalities", "Modalities", _modalities(inputs, add)))
    if cv:
        out.append(("folds", "Folds", _folds(inputs)))
    if inputs.differences is not None and len(inputs.differences):
        out.append(("variants", "Variants", _variants(inputs, add)))
    out.append(("tripod", "TRIPOD+AI checklist", _tripod(inputs)))
    return out


def _signed(value: float) -> str:
    text = "n/a" if not np.isfinite(value) else f"{value:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def _cell(row: pd.Series, metric: str) -> str:
    """A metric with its interval in brackets (none when the interval is undefined)."""
    interval = (
        _interval(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])
        if f"{metric}_ci_low" in row
        else ""
    )
    return _num(row.get(metric)) + (f" ({interval})" if interval else "")


def _whose(inputs: ReportInputs) -> str:
    return "cross-validation" if inputs.kind == "cv" else "run"


def _legacy(inputs: ReportInputs) -> str:
    return f'<p class="warn legacy">This {_whose(inputs)} was {_e(LEGACY)}.</p>'


def _not_evaluated(inputs: ReportInputs, what: str, other: str = "") -> str:
    """A file of the clinical reading is absent: say why it may be, and what writes it."""
    clinical = inputs.clinical
    if clinical.folder is None:
        return (
            f'<p class="note">No {_e(what)}: the run has not been evaluated; run '
            f"<code>{_e(clinical.rerun)}</code>.</p>"
        )
    return (
        f'<p class="note">No {_e(what)} in {_e(clinical.folder)} (written by an older '
        f"omnifuse{_e(other)}): <code>{_e(clinical.rerun)}</code>.</p>"
    )


def _operating_mark(inputs: ReportInputs) -> figures.OperatingMark | None:
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


def _calibration(inputs: ReportInputs, add: AddFigure) -> str:
    cv = inputs.kind == "cv"
    clinical = inputs.clinical
    parts = [_metrics_table("metrics-calibration", inputs.metrics, CALIBRATION, cv)]
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
                        _e(r["fold"]),
                        str(int(r["patients"])),
                        _num(r["temperature"]),
                        *([_num(r["threshold"])] if "threshold" in folds else []),
                    ],
                )
                for _, r in folds.iterrows()
            ]
            parts.append(_table("fold-posthoc", header, rows))
    else:
        state = (
            f"Probabilities are calibrated by temperature scaling: temperature "
            f"<b>{clinical.temperature:.3f}</b>, fitted on the validation split (log loss)."
            if clinical.calibrated
            else "Probabilities are not calibrated (temperature 1)."
        )
        parts.append(f'<p id="temperature">{state}</p>')
    if clinical.posthoc_lines and not clinical.legacy:
        items = "".join(f"<li>{_e(line)}</li>" for line in clinical.posthoc_lines)
        parts.append(
            f'<p>Post-hoc fit of {_e(clinical.posthoc_source)}:</p><ul class="posthoc">{items}</ul>'
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
                        _e(_calibration_label(str(r["metric"]))),
                        _num(r["before"]),
                        _num(r["after"]),
                        _signed(change),
                    ],
                )
            )
        parts.append(
            f'<p class="meta">Before and after calibration, on '
            f"{_e(inputs.evaluated_on)} (calibration.csv).</p>"
        )
        parts.append(
            _table(
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


def _operating(inputs: ReportInputs) -> str:
    clinical = inputs.clinical
    frame = clinical.operating
    cv = inputs.kind == "cv"
    if frame is None or not len(frame):
        if clinical.legacy:
            return _legacy(inputs)
        if clinical.threshold is None:
            lines = "".join(
                f"<li>{_e(line)}</li>"
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
        f"<p>Class <b>{_e(positive)}</b> is called positive when its probability is at "
        f"least <b>{_num(clinical.threshold)}</b> (rule <code>{_e(clinical.rule)}</code>, "
        "chosen on the validation split"
        + (" of each fold; the threshold shown is the mean of the folds'" if cv else "")
        + f"); any other patient gets the most probable other class. On "
        f"{_e(inputs.evaluated_on)}; the ROC figure marks this point.</p>"
    ]
    rows = [
        (
            key,
            [
                _e(label),
                _num(values.loc[key, "value"]),
                _interval(values.loc[key, "ci_low"], values.loc[key, "ci_high"]),
            ],
        )
        for key, label in OPERATING_LABELS.items()
        if key in values.index
    ]
    parts.append(_table("operating-point", ["measure", "value", "95% CI (bootstrap)"], rows))
    if {"tp", "fp", "tn", "fn"} <= set(values.index):
        count = {k: str(int(values.loc[k, "value"])) for k in ("tp", "fp", "tn", "fn")}
        parts.append(
            _table(
                "operating-counts",
                ["", f"true class {positive}", f"true class not {positive}"],
                [
                    (
                        "called-positive",
                        [f"called {_e(positive)}", f"{count['tp']} (TP)", f"{count['fp']} (FP)"],
                    ),
                    (
                        "called-negative",
                        [
                            f"not called {_e(positive)}",
                            f"{count['fn']} (FN)",
                            f"{count['tn']} (TN)",
                        ],
                    ),
                ],
            )
        )
    return "".join(parts)


def _decision(inputs: ReportInputs, add: AddFigure) -> str:
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
                        _e(name),
                        f"{pt:.2f}",
                        _num(r["net_benefit"]),
                        _num(r["treat_all"]),
                        _signed(float(r["net_benefit"]) - best_default),
                    ],
                )
            )
    parts.append(
        _table(
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


def _coverage(inputs: ReportInputs) -> str:
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
            f"split{' of each fold' if inputs.kind == 'cv' else ''} ({_e(modes)}), so that "
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
                        _e(by_names.get(str(r["by"]), r["by"])),
                        _e(r["group"]),
                        str(int(r["n"])),
                        _num(cov) + below,
                        f"{target:.3f}",
                        _num(r["mean_set_size"]),
                        str(int(r["empty_sets"])),
                    ],
                )
            )
        table_id = "coverage" if len(alphas) == 1 else f"coverage-{alpha:g}"
        parts.append(
            _table(
                table_id,
                ["by", "group", "patients", "coverage", "target", "mean set size", "empty sets"],
                rows,
                numeric_from=2,
            )
        )
    return "".join(parts)


def _subgroups(inputs: ReportInputs, add: AddFigure) -> str:
    clinical = inputs.clinical
    frame = clinical.subgroups
    if frame is None or not len(frame):
        where = "" if clinical.folder is None else f" in {clinical.folder}"
        return (
            f'<p class="note" id="no-subgroups">No subgroup analysis{_e(where)}: '
            f"<code>{_e(clinical.subgroup_command)}</code> (e.g. <code>--subgroup-col sex "
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
            f"subgroup(s) have fewer than {SMALL_SUBGROUP} patients: {_e(named)}. "
            "Their metrics are imprecise and their intervals wide; a gap involving them "
            "is weak evidence either way.</p>"
        )
    parts.append(
        f'<p class="meta">On {_e(inputs.evaluated_on)}; each metric with its 95% '
        "percentile bootstrap interval. Class counts in class order "
        f"({'/'.join(_e(c) for c in inputs.class_names)}).</p>"
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
                        _e(r["column"]),
                        _e(r["group"]),
                        n,
                        _e(r.get("class_counts", "")),
                        *(_cell(r, m) for m in metrics),
                    ],
                )
            )
        return rows

    head = ["subgroup of", "group", "patients", "class counts"]
    parts.append(
        _table(
            "subgroups", head + [SUBGROUP_LABELS[m] for m in main], rows_of(main), numeric_from=2
        )
    )
    if extra:
        said = []
        if set(extra) & {"sensitivity", "specificity", "ppv", "npv"}:
            said.append(
                "at the operating point"
                + (
                    f" (class {_e(clinical.positive_class)} positive at {_num(clinical.threshold)})"
                    if clinical.threshold is not None
                    else ""
                )
            )
        if set(extra) & {"cal_intercept", "cal_slope"}:
            said.append("the calibration intercept (ideal 0) and slope (ideal 1)")
        parts.append(f"<p>By subgroup, {', and '.join(said)}:</p>")
        parts.append(
            _table(
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
                        _e(r["column"]),
                        _e(SUBGROUP_LABELS.get(str(r["metric"]), r["metric"])),
                        _num(gap),
                        _e(r["best_group"]) if np.isfinite(gap) else "",
                        _e(r["worst_group"]) if np.isfinite(gap) else "",
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
            _table(
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


def _cohort(inputs: ReportInputs, add: AddFigure) -> str:
    parts = []
    cohort = inputs.cohort
    n = inputs.meta.get("n_patients", str(len(cohort)) if cohort is not None else "?")
    parts.append(
        f"<p>{_e(n)} patients, {inputs.num_classes} classes, modalities "
        f"{_e(', '.join(inputs.modalities))}. Excluded: none (omnifuse never drops "
        "patients; an unreadable manifest row stops the run)"
        + (f". Notes: {_e(inputs.meta['notes'])}" if inputs.meta.get("notes") else "")
        + ".</p>"
    )
    if cohort is None:
        return "".join(parts)
    groups = group_order(cohort["group"])
    rows = []
    for c, name in enumerate(inputs.class_names):
        counts = [
            int(((cohort["group"].astype(str) == g) & (cohort["label"] == c)).sum()) for g in groups
        ]
        rows.append((name, [_e(name), *(str(k) for k in counts), str(sum(counts))]))
    totals = [int((cohort["group"].astype(str) == g).sum()) for g in groups]
    rows.append(("all", ["all", *(str(k) for k in totals), str(sum(totals))]))
    parts.append(_table("class-counts", ["class", *groups, "all"], rows))
    parts.append(
        add(
            figures.class_counts(cohort, inputs.class_names, inputs.group_name),
            "classes",
            f"Patients per class and {inputs.group_name}",
            "Stratified by class.",
        )
    )
    known = cohort[cohort["modalities"] != ""]
    if len(known):
        sets = known["modalities"].str.split("+")
        presence = []
        for m in inputs.modalities:
            has = sets.apply(lambda s, m=m: m in s)
            presence.append((m, [_e(m), str(int(has.sum())), f"{has.mean():.0%}"]))
        parts.append(_table("presence", ["modality", "patients", "share"], presence))
        patterns = known["modalities"].value_counts()
        parts.append(
            add(
                figures.missing_patterns(patterns, inputs.modalities),
                "missing",
                "Missing patterns",
                f"{len(known)} patients by the set of modalities they have (bars), "
                "that set (dots) and each modality's presence (left).",
            )
        )
    return "".join(parts)


def _training(inputs: ReportInputs, add: AddFigure) -> str:
    if not inputs.curves:
        return '<p class="note">No per-epoch metrics were found.</p>'
    several = len(inputs.curves) > 1
    caption = (
        "Per epoch: each loss term of the objective (symmetric log scale), validation "
        "metrics, and the modality combination TLA activated in the next epoch"
        + (
            f"; mean and range over {len(inputs.curves)} folds of the base model."
            if several
            else "."
        )
    )
    best = ""
    if not several:
        frame = inputs.curves["run"]
        if "best" in frame:
            picked = frame[frame["best"] == 1]["epoch"]
            if len(picked):
                best = (
                    f"<p>Best epoch (kept): {int(picked.iloc[-1])} of {len(frame)}, chosen "
                    "on the validation split.</p>"
                )
    return best + add(figures.training(inputs.curves), "training", "Training curves", caption)


def _modalities(inputs: ReportInputs, add: AddFigure) -> str:
    parts = []
    if inputs.predictions is not None:
        parts.append(
            add(
                figures.dwfuse_weights(inputs.predictions, inputs.modalities, inputs.class_names),
                "weights",
                "DWFuse weights",
                "Each modality's DWFuse weight at the predicted class (for a missing "
                "modality, its imputed slot's), by true class; boxes span the "
                "quartiles, whiskers 1.5 IQR.",
            )
        )
    if inputs.patterns is not None and len(inputs.patterns):
        rows = [
            (
                str(r["present"]),
                [
                    _e(r["present"]),
                    str(int(r["n"])),
                    _num(r["acc"]),
                    _num(r["macro_f1"]),
                    _num(r["auroc"]),
                ],
            )
            for _, r in inputs.patterns.iterrows()
        ]
        parts.append(
            _table(
                "patterns",
                ["modalities present", "patients", "accuracy", "macro-F1", "AUROC"],
                rows,
            )
        )
        parts.append(
            add(
                figures.pattern_metrics(inputs.patterns),
                "patterns",
                "Metrics by missing pattern",
                "n/a (a class absent) is drawn as 0.",
            )
        )
    if not parts:
        parts.append(
            '<p class="note">Run omnifuse evaluate on this run for DWFuse weights and '
            "metrics per missing pattern.</p>"
        )
    return "".join(parts)


def _folds(inputs: ReportInputs) -> str:
    frame = inputs.fold_metrics
    if frame is None or not len(frame):
        return ""
    frame = frame[frame["variant"] == "base"]
    keys = ("acc", "macro_f1", "auroc", "brier")
    rows = [
        (
            f"{int(r['repeat'])}-{int(r['fold'])}",
            [
                str(int(r["repeat"])),
                str(int(r["fold"])),
                str(int(r["n"])),
                str(int(r["best_epoch"])),
                *(_num(r[k]) for k in keys),
            ],
        )
        for _, r in frame.iterrows()
    ]
    return (
        "<p>Each fold's test patients, scored by the model trained on the other folds.</p>"
        + _table(
            "fold-metrics",
            ["repeat", "fold", "test patients", "best epoch", *(METRIC_LABELS[k] for k in keys)],
            rows,
            numeric_from=2,
        )
    )


def _variants(inputs: ReportInputs, add: AddFigure) -> str:
    assert inputs.differences is not None
    flags = "".join(
        f"<li><b>{_e(name)}</b>: <code>{_e(f)}</code></li>" for name, f in inputs.variants.items()
    )
    parts = [
        f"<p>Every variant was trained on the same folds as the base model:</p><ul>{flags}</ul>"
    ]
    if inputs.variant_metrics is not None:
        keys = ("macro_f1", "auroc", "acc", "brier")
        wide = inputs.variant_metrics.pivot(index="variant", columns="metric", values="value")
        order = list(dict.fromkeys(inputs.variant_metrics["variant"]))
        rows = [(v, [_e(v), *(_num(wide.loc[v, k]) for k in keys)]) for v in order]
        parts.append(
            _table("variant-metrics", ["variant", *(METRIC_LABELS[k] for k in keys)], rows)
        )
    rows = [
        (
            f"{r['variant']}:{r['metric']}",
            [
                _e(r["variant"]),
                _e(METRIC_LABELS.get(r["metric"], r["metric"])),
                f"{float(r['difference']):+.3f}",
                _interval(r["ci_low"], r["ci_high"]),
                f"{_num(r['fold_mean'])} ± {_num(r['fold_sd'])}",
            ],
        )
        for _, r in inputs.differences.iterrows()
    ]
    parts.append(
        _table(
            "differences",
            [
                "variant",
                "metric",
                "difference (variant - base)",
                "95% CI (paired bootstrap)",
                "folds: mean ± SD",
            ],
            rows,
            numeric_from=2,
        )
    )
    parts.append(
        add(
            figures.forest(inputs.differences),
            "forest",
            "Paired differences",
            "Pooled out-of-fold metric of each variant minus the base model's; lines: "
            "95% paired bootstrap intervals (both models scored on the same resampled "
            "patients).",
        )
    )
    return "".join(parts)


def _tripod(inputs: ReportInputs) -> str:
    rows = []
    for item in checklist(inputs):
        known = _e(item.known) if item.known else '<span class="author">for the author</span>'
        rows.append((item.number, [_e(item.number), _e(item.topic), _e(item.asks), known]))
    return (
        "<p>What this "
        + ("cross-validation" if inputs.kind == "cv" else "run")
        + " knows, item by item; the rest is for the author.</p>"
        + _table("tripod", ["item", "topic", "asks for", "from this output"], rows, numeric_from=99)
    )


def _page(inputs: ReportInputs, sections: list[tuple[str, str, str]]) -> str:
    kind = "cross-validation" if inputs.kind == "cv" else "training run"
    rows = inputs.metrics.set_index("metric")
    headline = []
    for key in ("macro_f1", "auroc"):
        if key in rows.index:
            row = rows.loc[key]
            interval = _interval(row.get("ci_low"), row.get("ci_high"))
            headline.append(
                f"{METRIC_LABELS[key]} <b>{_num(row['value'])}</b>"
                + (f" (95% CI {interval})" if interval else "")
            )
    warned = [w for w in inputs.meta.get("warnings", "").split(" | ") if w]
    notes = "".join(
        f'<p class="warn run-warning"><b>Warning:</b> {_e(w)}</p>' for w in warned
    ) + "".join(f'<p class="note">{_e(n)}</p>' for n in inputs.notes)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>'
        for sid, title, content in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>omnifuse report: {_e(inputs.source.name)}</title><style>{CSS}</style></head>"
        f"<body><main><header><h1>omnifuse report: {_e(kind)}</h1>"
        f'<p class="meta">{_e(inputs.source.resolve())} · omnifuse {_e(__version__)} · '
        f"{datetime.now():%Y-%m-%d %H:%M}</p>"
        f"<p>{'; '.join(headline)} on {_e(inputs.evaluated_on)}.</p>"
        f"<nav>{nav}</nav></header>{notes}{body}</main></body></html>"
    )
