"""The report page: one self-contained HTML file (CSS inline, figures embedded as base64 PNG) and
the figures as PNG and PDF in a folder beside it."""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli import __version__
from omnifuse_cli.report import figures
from omnifuse_cli.report.curves import pr_curves, reliability_bins, roc_curves
from omnifuse_cli.report.inputs import ReportInputs, group_order, load_inputs
from omnifuse_cli.report.tripod import checklist

METRIC_LABELS = {
    "acc": "accuracy", "macro_f1": "macro-F1", "balanced_acc": "balanced accuracy",
    "auroc": "AUROC (OvR macro)", "auprc": "AUPRC (OvR macro)", "loss": "log loss",
    "ece": "calibration error (ECE)", "brier": "Brier score",
}
DISCRIMINATION = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss")
CALIBRATION = ("ece", "brier")
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
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "n/a" if not np.isfinite(number) else f"{number:.3f}"


def _interval(low: object, high: object) -> str:
    return "" if _num(low) == "n/a" else f"{_num(low)} – {_num(high)}"


def _e(text: object) -> str:
    return html.escape(str(text))


def _render(fig, name: str, title: str, caption: str) -> RenderedFigure:  # type: ignore[no-untyped-def]
    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=PNG_DPI)
    fig.savefig(pdf, format="pdf")
    return RenderedFigure(name, title, caption, png.getvalue(), pdf.getvalue(),
                          float(fig.get_size_inches()[0]))


def _figure_html(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{fig.name}"><img alt="{_e(fig.title)}" '
            f'style="width:{round(fig.width_in * PX_PER_INCH)}px" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{_e(fig.title)}.</b> '
            f"{_e(fig.caption)}</figcaption></figure>")


def _table(table_id: str, header: list[str], rows: list[tuple[str, list[str]]],
           numeric_from: int = 1) -> str:
    """rows: (data-key, cells); cells are already escaped HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for key, cells in rows:
        tds = "".join(f'<td class="num">{c}</td>' if k >= numeric_from else f"<td>{c}</td>"
                      for k, c in enumerate(cells))
        body.append(f'<tr data-key="{_e(key)}">{tds}</tr>')
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


def _metrics_table(table_id: str, frame: pd.DataFrame, keys: tuple[str, ...],
                   cv: bool) -> str:
    header = ["metric", "value", "95% CI (bootstrap)"] + (["folds: mean ± SD"] if cv else [])
    rows = []
    ordered = frame.set_index("metric").reindex([k for k in keys if k in set(frame["metric"])])
    for _, row in ordered.reset_index().iterrows():
        cells = [_e(METRIC_LABELS.get(row["metric"], row["metric"])), _num(row["value"]),
                 _interval(row.get("ci_low"), row.get("ci_high"))]
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
    from omnifuse_cli.engine.files import write_text_atomic

    for fig in rendered.values():
        (figures_dir / f"{fig.name}.png").write_bytes(fig.png)
        (figures_dir / f"{fig.name}.pdf").write_bytes(fig.pdf)
    write_text_atomic(html_path, page)
    return ReportResult(html_path, figures_dir, list(rendered), time.perf_counter() - t0,
                        list(inputs.notes))


def _sections(inputs: ReportInputs, rendered: dict[str, RenderedFigure]) -> list[tuple[str, str,
                                                                                        str]]:
    """(id, title, html) of every section; figures are added to ``rendered``."""

    def add(fig, name: str, title: str, caption: str) -> str:  # type: ignore[no-untyped-def]
        if fig is None:
            return ""
        rendered[name] = _render(fig, name, title, caption)
        return _figure_html(rendered[name])

    cv = inputs.kind == "cv"
    out = [("cohort", "Cohort", _cohort(inputs, add))]
    scored = inputs.probabilities()
    disc = [f'<p class="meta">Computed on {_e(inputs.evaluated_on)}.</p>',
            _metrics_table("metrics-discrimination", inputs.metrics, DISCRIMINATION, cv)]
    if scored is not None:
        y, probs = scored
        disc.append(add(figures.discrimination(roc_curves(y, probs, n=BAND_RESAMPLES),
                                               pr_curves(y, probs, n=BAND_RESAMPLES),
                                               inputs.class_names),
                        "discrimination", "ROC and precision-recall curves",
                        f"One class against the rest, {len(y)} patients; shaded: 95% "
                        f"percentile bootstrap band ({BAND_RESAMPLES} resamples of patients)."))
    if inputs.confusion is not None:
        disc.append(add(figures.confusion(inputs.confusion, inputs.class_names), "confusion",
                        "Confusion matrix", "Rows are true classes; each cell gives the count "
                        "and the share of its true class."))
        disc.append(_table("confusion", ["true \\ predicted", *inputs.class_names],
                           [(name, [_e(name), *(str(int(v)) for v in row)])
                            for name, row in zip(inputs.class_names, inputs.confusion,
                                                 strict=True)]))
    out.append(("discrimination", "Discrimination", "".join(disc)))
    calib = [_metrics_table("metrics-calibration", inputs.metrics, CALIBRATION, cv)]
    if scored is not None:
        y, probs = scored
        calib.append(add(figures.calibration(reliability_bins(y, probs), probs.max(axis=1)),
                         "calibration", "Reliability diagram",
                         "Patients sorted by the probability of their predicted class into "
                         "10 quantile bins (equal counts; the number of patients is written on "
                         "each point); accuracy against mean probability. ECE uses 10 "
                         "equal-width bins."))
    out.append(("calibration", "Calibration", "".join(calib)))
    out.append(("training", "Training", _training(inputs, add)))
    out.append(("modalities", "Modalities", _modalities(inputs, add)))
    if cv:
        out.append(("folds", "Folds", _folds(inputs)))
    if inputs.differences is not None and len(inputs.differences):
        out.append(("variants", "Variants", _variants(inputs, add)))
    out.append(("tripod", "TRIPOD+AI checklist", _tripod(inputs)))
    return out


def _cohort(inputs: ReportInputs, add) -> str:  # type: ignore[no-untyped-def]
    parts = []
    cohort = inputs.cohort
    n = inputs.meta.get("n_patients", str(len(cohort)) if cohort is not None else "?")
    parts.append(f"<p>{_e(n)} patients, {inputs.num_classes} classes, modalities "
                 f"{_e(', '.join(inputs.modalities))}. Excluded: none (omnifuse never drops "
                 "patients; an unreadable manifest row stops the run)"
                 + (f". Notes: {_e(inputs.meta['notes'])}" if inputs.meta.get("notes") else "")
                 + ".</p>")
    if cohort is None:
        return "".join(parts)
    groups = group_order(cohort["group"])
    rows = []
    for c, name in enumerate(inputs.class_names):
        counts = [int(((cohort["group"].astype(str) == g) & (cohort["label"] == c)).sum())
                  for g in groups]
        rows.append((name, [_e(name), *(str(k) for k in counts), str(sum(counts))]))
    totals = [int((cohort["group"].astype(str) == g).sum()) for g in groups]
    rows.append(("all", ["all", *(str(k) for k in totals), str(sum(totals))]))
    parts.append(_table("class-counts", ["class", *groups, "all"], rows))
    parts.append(add(figures.class_counts(cohort, inputs.class_names, inputs.group_name),
                     "classes", f"Patients per class and {inputs.group_name}",
                     "Stratified by class."))
    known = cohort[cohort["modalities"] != ""]
    if len(known):
        sets = known["modalities"].str.split("+")
        presence = []
        for m in inputs.modalities:
            has = sets.apply(lambda s, m=m: m in s)
            presence.append((m, [_e(m), str(int(has.sum())), f"{has.mean():.0%}"]))
        parts.append(_table("presence", ["modality", "patients", "share"], presence))
        patterns = known["modalities"].value_counts()
        parts.append(add(figures.missing_patterns(patterns, inputs.modalities), "missing",
                         "Missing patterns",
                         f"{len(known)} patients by the set of modalities they have (bars), "
                         "that set (dots) and each modality's presence (left)."))
    return "".join(parts)


def _training(inputs: ReportInputs, add) -> str:  # type: ignore[no-untyped-def]
    if not inputs.curves:
        return '<p class="note">No per-epoch metrics were found.</p>'
    several = len(inputs.curves) > 1
    caption = ("Per epoch: each loss term of the objective (symmetric log scale), validation "
               "metrics, and the modality combination TLA activated in the next epoch"
               + (f"; mean and range over {len(inputs.curves)} folds of the base model."
                  if several else "."))
    best = ""
    if not several:
        frame = inputs.curves["run"]
        if "best" in frame:
            picked = frame[frame["best"] == 1]["epoch"]
            if len(picked):
                best = (f"<p>Best epoch (kept): {int(picked.iloc[-1])} of {len(frame)}, chosen "
                        "on the validation split.</p>")
    return best + add(figures.training(inputs.curves), "training", "Training curves", caption)


def _modalities(inputs: ReportInputs, add) -> str:  # type: ignore[no-untyped-def]
    parts = []
    if inputs.predictions is not None:
        parts.append(add(figures.dwfuse_weights(inputs.predictions, inputs.modalities,
                                                inputs.class_names),
                         "weights", "DWFuse weights",
                         "Each modality's DWFuse weight at the predicted class (for a missing "
                         "modality, its imputed slot's), by true class; boxes span the "
                         "quartiles, whiskers 1.5 IQR."))
    if inputs.patterns is not None and len(inputs.patterns):
        rows = [(str(r["present"]), [_e(r["present"]), str(int(r["n"])), _num(r["acc"]),
                                     _num(r["macro_f1"]), _num(r["auroc"])])
                for _, r in inputs.patterns.iterrows()]
        parts.append(_table("patterns", ["modalities present", "patients", "accuracy",
                                         "macro-F1", "AUROC"], rows))
        parts.append(add(figures.pattern_metrics(inputs.patterns), "patterns",
                         "Metrics by missing pattern", "n/a (a class absent) is drawn as 0."))
    if not parts:
        parts.append('<p class="note">Run omnifuse evaluate on this run for DWFuse weights and '
                     "metrics per missing pattern.</p>")
    return "".join(parts)


def _folds(inputs: ReportInputs) -> str:
    frame = inputs.fold_metrics
    if frame is None or not len(frame):
        return ""
    frame = frame[frame["variant"] == "base"]
    keys = ("acc", "macro_f1", "auroc", "brier")
    rows = [(f"{int(r['repeat'])}-{int(r['fold'])}",
             [str(int(r["repeat"])), str(int(r["fold"])), str(int(r["n"])),
              str(int(r["best_epoch"])), *(_num(r[k]) for k in keys)])
            for _, r in frame.iterrows()]
    return ("<p>Each fold's test patients, scored by the model trained on the other folds.</p>"
            + _table("fold-metrics", ["repeat", "fold", "test patients", "best epoch",
                                      *(METRIC_LABELS[k] for k in keys)], rows, numeric_from=2))


def _variants(inputs: ReportInputs, add) -> str:  # type: ignore[no-untyped-def]
    assert inputs.differences is not None
    flags = "".join(f"<li><b>{_e(name)}</b>: <code>{_e(f)}</code></li>"
                    for name, f in inputs.variants.items())
    parts = [f"<p>Every variant was trained on the same folds as the base model:</p><ul>{flags}"
             "</ul>"]
    if inputs.variant_metrics is not None:
        keys = ("macro_f1", "auroc", "acc", "brier")
        wide = inputs.variant_metrics.pivot(index="variant", columns="metric", values="value")
        order = list(dict.fromkeys(inputs.variant_metrics["variant"]))
        rows = [(v, [_e(v), *(_num(wide.loc[v, k]) for k in keys)]) for v in order]
        parts.append(_table("variant-metrics", ["variant", *(METRIC_LABELS[k] for k in keys)],
                            rows))
    rows = [(f"{r['variant']}:{r['metric']}",
             [_e(r["variant"]), _e(METRIC_LABELS.get(r["metric"], r["metric"])),
              f"{float(r['difference']):+.3f}", _interval(r["ci_low"], r["ci_high"]),
              f"{_num(r['fold_mean'])} ± {_num(r['fold_sd'])}"])
            for _, r in inputs.differences.iterrows()]
    parts.append(_table("differences", ["variant", "metric", "difference (variant - base)",
                                        "95% CI (paired bootstrap)", "folds: mean ± SD"], rows,
                        numeric_from=2))
    parts.append(add(figures.forest(inputs.differences), "forest", "Paired differences",
                     "Pooled out-of-fold metric of each variant minus the base model's; lines: "
                     "95% paired bootstrap intervals (both models scored on the same resampled "
                     "patients)."))
    return "".join(parts)


def _tripod(inputs: ReportInputs) -> str:
    rows = []
    for item in checklist(inputs):
        known = (_e(item.known) if item.known
                 else '<span class="author">for the author</span>')
        rows.append((item.number, [_e(item.number), _e(item.topic), _e(item.asks), known]))
    return ("<p>What this " + ("cross-validation" if inputs.kind == "cv" else "run")
            + " knows, item by item; the rest is for the author.</p>"
            + _table("tripod", ["item", "topic", "asks for", "from this output"], rows,
                     numeric_from=99))


def _page(inputs: ReportInputs, sections: list[tuple[str, str, str]]) -> str:
    kind = "cross-validation" if inputs.kind == "cv" else "training run"
    rows = inputs.metrics.set_index("metric")
    headline = []
    for key in ("macro_f1", "auroc"):
        if key in rows.index:
            row = rows.loc[key]
            interval = _interval(row.get("ci_low"), row.get("ci_high"))
            headline.append(f"{METRIC_LABELS[key]} <b>{_num(row['value'])}</b>"
                            + (f" (95% CI {interval})" if interval else ""))
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in inputs.notes)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>omnifuse report: {_e(inputs.source.name)}</title><style>{CSS}</style></head>"
        f"<body><main><header><h1>omnifuse report: {_e(kind)}</h1>"
        f'<p class="meta">{_e(inputs.source.resolve())} · omnifuse {_e(__version__)} · '
        f"{datetime.now():%Y-%m-%d %H:%M}</p>"
        f"<p>{'; '.join(headline)} on {_e(inputs.evaluated_on)}.</p>"
        f"<nav>{nav}</nav></header>{notes}{body}</main></body></html>"
    )
