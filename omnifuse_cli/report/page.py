"""The report page: one self-contained HTML file (CSS inline, figures embedded as base64 PNG) and
the figures as PNG and PDF in a folder beside it. Here: the page's skeleton (header, navigation,
sections in order, the discrimination section) and the figures' rendering; the other sections
are built in sections_run.py, sections_clinical.py and sections_subgroups.py, and a tune
folder's in sections_tune.py."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from omnifuse_cli import __version__
from omnifuse_cli.engine.files import write_text_atomic
from omnifuse_cli.report import (
    figures,
    sections_clinical,
    sections_run,
    sections_subgroups,
    sections_tune,
)
from omnifuse_cli.report.curves import pr_curves, roc_curves
from omnifuse_cli.report.inputs import ReportInputs, load_inputs
from omnifuse_cli.report.markup import (
    METRIC_LABELS,
    AddFigure,
    ci_range,
    esc,
    metrics_table,
    num,
    table,
)
from omnifuse_cli.report.tune_inputs import TuneInputs, is_tune_folder, load_tune
from omnifuse_cli.report.tuning import METRIC_WORDS, origin

if TYPE_CHECKING:  # figures.py imports matplotlib; here it is only a type
    from matplotlib.figure import Figure


DISCRIMINATION = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss")
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
    "tune_history",
    "tune_intermediate",
    "tune_importance",
    "tune_slices",
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
pre{background:#f7f7f7;padding:8px 10px;font-size:12px;overflow-x:auto}
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
        f'<figure id="fig-{fig.name}"><img alt="{esc(fig.title)}" '
        f'style="width:{round(fig.width_in * PX_PER_INCH)}px" '
        f'src="data:image/png;base64,{data}"><figcaption><b>{esc(fig.title)}.</b> '
        f"{esc(fig.caption)}</figcaption></figure>"
    )


def build_report(source: Path, out: Path | None = None) -> ReportResult:
    """Read a run, cv or tune folder and write the page and its figures (nothing is written when
    the folder is none of them)."""
    t0 = time.perf_counter()
    html_path = Path(out) if out is not None else Path(source) / "report.html"
    figures_dir = html_path.with_name(f"{html_path.stem}-figures")
    rendered: dict[str, RenderedFigure] = {}
    add = _adder(rendered)
    if is_tune_folder(Path(source)):
        tune = load_tune(Path(source))
        notes = tune.notes
        page = _tune_page(tune, sections_tune.sections(tune, add))
    else:
        inputs = load_inputs(Path(source))
        notes = inputs.notes
        page = _page(inputs, _sections(inputs, add))
    figures_dir.mkdir(parents=True, exist_ok=True)
    for fig in rendered.values():
        (figures_dir / f"{fig.name}.png").write_bytes(fig.png)
        (figures_dir / f"{fig.name}.pdf").write_bytes(fig.pdf)
    for name in set(FIGURE_NAMES) - set(rendered):  # an earlier report's, no longer drawn
        for suffix in (".png", ".pdf"):
            (figures_dir / f"{name}{suffix}").unlink(missing_ok=True)
    write_text_atomic(html_path, page)
    return ReportResult(
        html_path, figures_dir, list(rendered), time.perf_counter() - t0, list(notes)
    )


def _adder(rendered: dict[str, RenderedFigure]) -> AddFigure:
    """The sections' ``add``: renders a figure into ``rendered`` and returns its HTML."""

    def add(fig: Figure | None, name: str, title: str, caption: str) -> str:
        assert name in FIGURE_NAMES, name
        if fig is None:
            return ""
        rendered[name] = _render(fig, name, title, caption)
        return _figure_html(rendered[name])

    return add


def _sections(inputs: ReportInputs, add: AddFigure) -> list[tuple[str, str, str]]:
    """(id, title, html) of every section; ``add`` renders the figures."""
    cv = inputs.kind == "cv"
    out = [("cohort", "Cohort", sections_run.cohort(inputs, add))]
    scored = inputs.probabilities()
    disc = [
        f'<p class="meta">Computed on {esc(inputs.evaluated_on)}.</p>',
        metrics_table("metrics-discrimination", inputs.metrics, DISCRIMINATION, cv),
    ]
    if scored is not None:
        y, probs = scored
        mark = sections_clinical.operating_mark(inputs)
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
            table(
                "confusion",
                ["true \\ predicted", *inputs.class_names],
                [
                    (name, [esc(name), *(str(int(v)) for v in row)])
                    for name, row in zip(inputs.class_names, inputs.confusion, strict=True)
                ],
            )
        )
    out.append(("discrimination", "Discrimination", "".join(disc)))
    out.append(("calibration", "Calibration", sections_clinical.calibration(inputs, add)))
    out.append(("operating-point", "Operating point", sections_clinical.operating(inputs)))
    out.append(("decision-curve", "Decision curve", sections_clinical.decision(inputs, add)))
    out.append(("coverage", "Conformal prediction sets", sections_clinical.coverage(inputs)))
    out.append(("subgroups", "Subgroups and fairness", sections_subgroups.subgroups(inputs, add)))
    bag = sections_run.bagging(inputs)
    if bag:
        out.append(("ensemble", "Bagging and ensemble", bag))
    out.append(("training", "Training", sections_run.training(inputs, add)))
    out.append(("modalities", "Modalities", sections_run.modalities(inputs, add)))
    if cv:
        out.append(("folds", "Folds", sections_run.folds(inputs)))
    if inputs.differences is not None and len(inputs.differences):
        out.append(("variants", "Variants", sections_run.variants(inputs, add)))
    out.append(("tripod", "TRIPOD+AI checklist", sections_run.tripod(inputs)))
    return out


def _page(inputs: ReportInputs, sections: list[tuple[str, str, str]]) -> str:
    kind = "cross-validation" if inputs.kind == "cv" else "training run"
    rows = inputs.metrics.set_index("metric")
    headline = []
    for key in ("macro_f1", "auroc"):
        if key in rows.index:
            row = rows.loc[key]
            interval = ci_range(row.get("ci_low"), row.get("ci_high"))
            headline.append(
                f"{METRIC_LABELS[key]} <b>{num(row['value'])}</b>"
                + (f" (95% CI {interval})" if interval else "")
            )
    lead = f"<p>{'; '.join(headline)} on {esc(inputs.evaluated_on)}.</p>"
    if inputs.tuning is not None:
        lead += f'<p class="meta" id="tuned">{esc(origin(inputs.tuning))}</p>'
    warned = [w for w in inputs.meta.get("warnings", "").split(" | ") if w]
    return _document(inputs.source, kind, lead, warned, inputs.notes, sections)


def _tune_page(tune: TuneInputs, sections: list[tuple[str, str, str]]) -> str:
    tuning = tune.tuning
    label = METRIC_WORDS.get(tuning.metric, tuning.metric)
    parts = [
        f"{tuning.trials} trials of study {esc(tuning.study)}; best trial "
        + (
            f"#{tuning.best_number}: {esc(label)} <b>{num(tuning.best_value)}</b> on "
            f"{esc(tuning.scored_on)} (optimistic)"
            if tuning.best_number is not None
            else "none yet"
        )
    ]
    scored = sections_tune.refit_score(tune)
    if scored is not None:
        interval = f" (95% CI {scored[1]})" if scored[1] else ""
        parts.append(f"held-out test {esc(label)} <b>{scored[0]}</b>{interval} (refit)")
    if tuning.nested is not None:
        parts.append(
            f"nested cross-validation {esc(label)} <b>{num(tuning.nested.outer_mean)}</b> "
            f"(95% CI {ci_range(tuning.nested.outer_ci_low, tuning.nested.outer_ci_high)})"
        )
    return _document(
        tune.source, "tuning search", f"<p>{'; '.join(parts)}.</p>", [], tune.notes, sections
    )


def _document(
    source: Path,
    kind: str,
    lead: str,
    warned: list[str],
    notes: list[str],
    sections: list[tuple[str, str, str]],
) -> str:
    """The page around its sections: header (``lead``: the headline's HTML), warnings, notes,
    navigation."""
    notices = "".join(
        f'<p class="warn run-warning"><b>Warning:</b> {esc(w)}</p>' for w in warned
    ) + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>'
        for sid, title, content in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>omnifuse report: {esc(source.name)}</title><style>{CSS}</style></head>"
        f"<body><main><header><h1>omnifuse report: {esc(kind)}</h1>"
        f'<p class="meta">{esc(source.resolve())} · omnifuse {esc(__version__)} · '
        f"{datetime.now():%Y-%m-%d %H:%M}</p>"
        f"{lead}<nav>{nav}</nav></header>{notices}{body}</main></body></html>"
    )
