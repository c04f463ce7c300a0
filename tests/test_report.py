"""`omnifuse report` (issue 9): the page's structure, its numbers against the result CSVs, the
figure files, bad input, and the page rendered by a real headless browser (Debian's chromium).
The clinical sections (calibration before/after, operating point, decision curve, conformal
coverage, subgroups) are checked against the files `evaluate` and `cv` write for them."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from omnifuse_cli.report import build_report, figures
from omnifuse_cli.report.clinical_inputs import LEGACY, recovered_temperature
from omnifuse_cli.report.curves import pr_curves, reliability_bins, roc_curves

from .helpers import invoke

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_SECTIONS = [
    "cohort",
    "discrimination",
    "calibration",
    "operating-point",
    "decision-curve",
    "coverage",
    "subgroups",
    "training",
    "modalities",
    "tripod",
]
CV_SECTIONS = [*RUN_SECTIONS[:-1], "folds", "variants", "tripod"]
CLINICAL_FILES = (
    "calibration",
    "operating_point",
    "decision_curve",
    "coverage",
    "subgroups",
    "subgroup_gaps",
)
SUBGROUPS = ("--subgroup-col", "sex", "--subgroup-col", "age:q2")


class Page(HTMLParser):
    """Sections, images and tables (id -> data-key -> cell texts) of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.text: dict[str, str] = {}  # section id -> its text, whitespace collapsed
        self.images: list[str] = []
        self.tables: dict[str, dict[str, list[str]]] = {}
        self._table = self._row = None  # type: ignore[assignment]
        self._cell: list[str] | None = None
        self._section: str | None = None
        self.feed(text)
        self.text = {k: " ".join(v.split()) for k, v in self.text.items()}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(str(a.get("id")))
            self._section = str(a.get("id"))
            self.text[self._section] = ""
        elif tag == "img":
            self.images.append(str(a.get("src")))
        elif tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = {}
        elif tag == "tr" and self._table and "data-key" in a:
            self._row = str(a["data-key"])
            self.tables[self._table][self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        elif self._section is not None and tag in (
            "td",
            "th",
            "li",
            "p",
            "h2",
            "h3",
            "tr",
            "figcaption",
        ):
            self.text[self._section] += " "
        if tag == "td" and self._cell is not None and self._table and self._row is not None:
            self.tables[self._table][self._row].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.text[self._section] += data


def num(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


@pytest.fixture(scope="module")
def cv_report(cv_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "cv-report.html"
    result = invoke("report", cv_run["dir"], "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert str(out) in " ".join(result.output.split())
    return out


def set_meta(run: Path, **values: str) -> None:
    """Rewrite keys of a run's meta.csv."""
    frame = pd.read_csv(run / "meta.csv", dtype=str, keep_default_na=False).set_index("key")
    for key, value in values.items():
        frame.loc[key, "value"] = value
    frame.reset_index().to_csv(run / "meta.csv", index=False)


def cohort_with_subgroups(manifest: Path, folder: Path) -> Path:
    """A copy of the tiny cohort whose manifest gains sex and age columns. Its ids are written
    as the run stores them (10 digits): --subgroup-col matches manifest ids as written."""
    root = Path(shutil.copytree(manifest.parent, folder))
    lines = (root / "manifest.csv").read_text(encoding="utf-8").splitlines()
    rows = [lines[0] + ",sex,age"]
    for i, line in enumerate(lines[1:]):
        pid, rest = line.split(",", 1)
        rows.append(f"{pid.zfill(10)},{rest},{'FM'[i % 2]},{30 + 2 * i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "manifest.csv"


def evaluate(run: Path, *extra: str) -> None:
    result = invoke("evaluate", run, "--device", "cpu", "--bootstrap", "50", *extra)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"omnifuse report {run}" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def run_dir(
    trained_run: tuple[Path, Any], tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the conftest's run (3 classes, too few validation patients for a temperature,
    no --positive-class), its manifest with sex and age columns, evaluated by subgroup."""
    folder = tmp_path_factory.mktemp("r")
    run = Path(shutil.copytree(trained_run[0], folder / "run"))
    set_meta(run, manifest=str(cohort_with_subgroups(tiny_manifest, folder / "cohort")))
    evaluate(run, *SUBGROUPS)
    return run


@pytest.fixture(scope="module")
def op_run(
    run_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, Any]]:
    """run_dir as if trained with --positive-class 2 and a fitted temperature (its bundle's
    post-hoc fit edited), evaluated again with --conformal 0.2, reported in-process: (run, page,
    the figures drawn by name)."""
    run = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("op") / "run"))
    bundle = json.loads((run / "model" / "bundle.json").read_text(encoding="utf-8"))
    bundle["posthoc"].update(
        temperature=1.5,
        calibration="temperature",
        positive=2,
        threshold=0.3,
        rule="youden",
        notes=[],
        val_loss_after=0.9,
    )
    (run / "model" / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    set_meta(
        run,
        calibration="temperature",
        temperature="1.5",
        positive_class="2",
        threshold_rule="youden",
        threshold="0.3",
    )
    evaluate(run, *SUBGROUPS, "--conformal", "0.2")
    drawn: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("discrimination", "calibration", "decision_curves", "subgroup_metrics"):
            patch.setattr(figures, name, keeping(drawn, name, getattr(figures, name)))
        page = build_report(run).html
    return run, page, drawn


def keeping(drawn: dict[str, Any], name: str, draw: Any) -> Any:
    """``draw``, keeping the Figure it returns in drawn[name] (to read the data drawn)."""

    def keep(*args: Any, **kwargs: Any) -> Any:
        drawn[name] = draw(*args, **kwargs)
        return drawn[name]

    return keep


def lines_with_gid(fig: Any, gid: str) -> list[Any]:
    return [line for ax in fig.axes for line in ax.lines if line.get_gid() == gid]


def with_ci(value: float, low: float, high: float) -> str:
    """A metric cell of the subgroup tables."""
    return num(value) + ("" if not np.isfinite(low) else f" ({num(low)} – {num(high)})")


def test_cv_report_sections_and_embedded_figures(cv_report: Path) -> None:
    page = Page(cv_report.read_text(encoding="utf-8"))
    assert page.sections == CV_SECTIONS
    folder = cv_report.with_name("cv-report-figures")
    pngs = sorted(folder.glob("*.png"))
    assert {p.stem for p in pngs} == {
        "classes",
        "missing",
        "discrimination",
        "confusion",
        "calibration",
        "decision",
        "training",
        "weights",
        "patterns",
        "forest",
    }
    assert len(page.images) == len(pngs)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")  # self-contained: nothing to fetch
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size[0] > 300
    for png in pngs:
        assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def test_cv_report_numbers_match_the_csvs(cv_run: dict[str, Any], cv_report: Path) -> None:
    page = Page(cv_report.read_text(encoding="utf-8"))
    out = cv_run["dir"]
    metrics = pd.read_csv(out / "metrics.csv")
    base = metrics[metrics["variant"] == "base"].set_index("metric")
    shown = {**page.tables["metrics-discrimination"], **page.tables["metrics-calibration"]}
    assert set(shown) == set(base.index)
    for metric, row in base.iterrows():
        cells = shown[str(metric)]
        assert cells[1] == num(row["value"])
        assert cells[2] == f"{num(row['ci_low'])} – {num(row['ci_high'])}"
        assert cells[3] == f"{num(row['fold_mean'])} ± {num(row['fold_sd'])}"
    diffs = pd.read_csv(out / "differences.csv")
    for _, row in diffs.iterrows():
        cells = page.tables["differences"][f"{row['variant']}:{row['metric']}"]
        assert cells[2] == f"{row['difference']:+.3f}"
        assert cells[3] == f"{num(row['ci_low'])} – {num(row['ci_high'])}"
    patterns = pd.read_csv(out / "patterns.csv", keep_default_na=False)
    for _, row in patterns[patterns["variant"] == "base"].iterrows():
        cells = page.tables["patterns"][row["present"]]
        assert cells[1] == str(row["n"]) and cells[3] == num(float(row["macro_f1"]))
    cm = pd.read_csv(out / "confusion_matrix.csv")
    cm = cm[cm["variant"] == "base"]
    for _, row in cm.iterrows():
        assert page.tables["confusion"][str(row["true"])][1:] == [
            str(row[f"pred_{k}"]) for k in range(3)
        ]
    folds = pd.read_csv(out / "fold_metrics.csv")
    for _, row in folds[folds["variant"] == "base"].iterrows():
        cells = page.tables["fold-metrics"][f"{row['repeat']}-{row['fold']}"]
        assert cells[2] == str(row["n"]) and cells[5] == num(row["macro_f1"])
    counts = page.tables["class-counts"]
    assert counts["all"][-1] == "30" and counts["0"][-1] == "10"


def test_cv_report_clinical_sections(cv_run: dict[str, Any], cv_report: Path) -> None:
    """The pooled out-of-fold files of a cv folder: 3 classes, no --positive-class, no
    --subgroup-col; each fold's inner validation split is too small for a temperature."""
    page = Page(cv_report.read_text(encoding="utf-8"))
    out = cv_run["dir"]
    calibration = pd.read_csv(out / "calibration.csv")
    shown = page.tables["calibration-before-after"]
    for _, row in calibration.iterrows():
        assert shown[row["metric"]][1:3] == [num(row["before"]), num(row["after"])]
    assert page.tables["fold-posthoc"] == {str(k): [str(k), "10", "1.000"] for k in (1, 2, 3)}
    assert "Post-hoc fit of the final model refitted on every patient" in page.text["calibration"]
    assert (
        "No operating point: a 3-class task without --positive-class"
        in page.text["operating-point"]
    )
    assert "omnifuse cv ... --positive-class CLASS" in page.text["operating-point"]
    curve = pd.read_csv(out / "decision_curve.csv")
    decision = page.tables["decision-curve"]
    assert {k.split(":")[0] for k in decision} == {"0", "1", "2"}
    row = curve[(curve["class"] == 1) & np.isclose(curve["threshold"], 0.2)].iloc[0]
    assert decision["1:0.20"][2] == num(row["net_benefit"])
    coverage = pd.read_csv(out / "coverage.csv", keep_default_na=False)
    for _, row in coverage.iterrows():
        cells = page.tables["coverage"][f"{row['by']}:{row['group']}"]
        assert cells[2] == str(row["n"]) and cells[3].startswith(num(row["coverage"]))
    assert "omnifuse cv MANIFEST ... --subgroup-col COL" in page.text["subgroups"]


def test_cv_report_with_an_operating_point_and_subgroups(
    cv_run: dict[str, Any], tmp_path: Path
) -> None:
    """A cv folder's operating_point.csv and subgroup files (written here by hand, with the
    binary-only subgroup columns) reach the page as a run's do."""
    out = Path(shutil.copytree(cv_run["dir"], tmp_path / "cv"))
    rows = [
        ("threshold", 0.41, "", ""),
        ("sensitivity", 0.8, 0.6, 0.95),
        ("specificity", 0.7, 0.5, 0.9),
        ("ppv", 0.55, 0.3, 0.8),
        ("npv", 0.88, 0.7, 1.0),
        ("f1", 0.65, 0.45, 0.8),
        ("tp", 8, "", ""),
        ("fp", 6, "", ""),
        ("tn", 14, "", ""),
        ("fn", 2, "", ""),
    ]
    pd.DataFrame(
        [
            {
                "positive_class": "1",
                "rule": "youden per fold",
                "metric": m,
                "value": v,
                "ci_low": lo,
                "ci_high": hi,
            }
            for m, v, lo, hi in rows
        ]
    ).to_csv(out / "operating_point.csv", index=False)
    metrics = (
        "auroc",
        "macro_f1",
        "acc",
        "brier",
        "ece",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
    )
    groups = []
    for group, n, value, small in (("A", 40, 0.9, False), ("B", 12, 0.8, True)):
        row: dict[str, Any] = {
            "column": "site",
            "group": group,
            "n": n,
            "class_counts": f"{n // 2}/{n - n // 2}",
        }
        for m in metrics:
            row.update({m: value, f"{m}_ci_low": value - 0.1, f"{m}_ci_high": value + 0.05})
        row.update(cal_intercept=0.1, cal_slope=0.9, small=small)
        groups.append(row)
    pd.DataFrame(groups).to_csv(out / "subgroups.csv", index=False)
    pd.DataFrame(
        [
            {
                "column": "site",
                "metric": m,
                "gap": 0.1,
                "best_group": "A",
                "worst_group": "B",
                "groups_compared": 2,
                "includes_small": True,
            }
            for m in metrics
        ]
    ).to_csv(out / "subgroup_gaps.csv", index=False)
    drawn: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            figures, "discrimination", keeping(drawn, "discrimination", figures.discrimination)
        )
        build_report(out, tmp_path / "cv.html")
    page = Page((tmp_path / "cv.html").read_text(encoding="utf-8"))
    assert page.tables["operating-point"]["sensitivity"][1:] == ["0.800", "0.600 – 0.950"]
    assert page.tables["operating-counts"]["called-positive"] == ["called 1", "8 (TP)", "6 (FP)"]
    assert "the threshold shown is the mean of the folds'" in page.text["operating-point"]
    mark = lines_with_gid(drawn["discrimination"], "operating-point")[0]
    assert (mark.get_xdata()[0], mark.get_ydata()[0]) == pytest.approx((0.3, 0.8))
    assert "(threshold 0.410, the mean of the folds' thresholds)" in page.text["discrimination"]
    assert page.tables["subgroups"]["site:A"][2:5] == ["40", "20/20", "0.900 (0.800 – 0.950)"]
    assert page.tables["subgroups"]["site:B"][2] == "12 (under 30)"
    assert page.tables["subgroups-operating"]["site:B"][4:] == ["0.800 (0.700 – 0.850)"] * 4 + [
        "0.100",
        "0.900",
    ]
    assert (
        "Warning: 1 subgroup(s) have fewer than 30 patients: site = B (12)."
        in page.text["subgroups"]
    )
    assert page.tables["subgroup-gaps"]["site:sensitivity"][1:5] == [
        "sensitivity",
        "0.100",
        "A",
        "B",
    ]
    items = page.tables["tripod"]
    assert "site AUROC 0.100 (best A, worst B)" in items["14"][3]
    assert "site sensitivity 0.100 (best A, worst B)" in items["14"][3]
    assert (
        "class 1 is predicted when its probability is at least 0.410 (rule youden per fold"
        in items["15"][3]
    )


def test_tripod_checklist(cv_report: Path) -> None:
    page = Page(cv_report.read_text(encoding="utf-8"))
    items = page.tables["tripod"]
    assert list(items) == [str(k) for k in range(1, 28)]
    assert items["1"][3] == "for the author"
    assert "30 patients" in items["10"][3] and "class 0: 10" in items["10"][3]
    assert "3-fold stratified cross-validation" in items["12"][3]
    assert "imputed" in items["11"][3]
    assert "macro-F1" in items["23"][3] and "95% CI" in items["23"][3]
    assert items["14"][3].startswith(
        "no subgroup analysis in this output: `omnifuse cv MANIFEST ... --subgroup-col COL`"
    )
    assert "Calibration before -> after (each fold's temperature): ECE" in items["23"][3]


def test_run_report_numbers_match_the_evaluation(run_dir: Path) -> None:
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    assert page.sections == RUN_SECTIONS
    metrics = pd.read_csv(run_dir / "eval" / "test" / "metrics.csv").set_index("metric")
    shown = {**page.tables["metrics-discrimination"], **page.tables["metrics-calibration"]}
    for metric, row in metrics.iterrows():
        assert shown[str(metric)][1:3] == [
            num(row["value"]),
            f"{num(row['ci_low'])} – {num(row['ci_high'])}",
        ]
    split = pd.read_csv(run_dir / "split_assignment.csv")
    counts = page.tables["class-counts"]["all"]
    assert counts[-1] == str(len(split))
    assert len(page.images) == len(list((run_dir / "report-figures").glob("*.png"))) == 10
    # As trained: 6 validation patients fit no temperature; 3 classes, no --positive-class.
    calibration = pd.read_csv(run_dir / "eval" / "test" / "calibration.csv")
    assert set(page.tables["calibration-before-after"]) == set(calibration["metric"])
    assert "Probabilities are not calibrated (temperature 1)" in page.text["calibration"]
    assert "not calibrated: the validation split has 6 patient(s)" in page.text["calibration"]
    assert (
        "No operating point: a 3-class task without --positive-class"
        in page.text["operating-point"]
    )
    assert "operating_point" not in page.tables and "operating-counts" not in page.tables
    assert set(pd.read_csv(run_dir / "eval" / "test" / "decision_curve.csv")["class"]) == {
        0,
        1,
        2,
    }  # every class against the rest: three panels
    assert {k.split(":")[0] for k in page.tables["decision-curve"]} == {"0", "1", "2"}
    assert "sex:F" in page.tables["subgroups"] and "age:q2:Q1 [30, 34]" in page.tables["subgroups"]
    assert "subgroups-operating" not in page.tables  # sensitivity etc.: binary tasks only


def test_calibration_before_and_after(op_run: tuple[Path, Path, dict[str, Any]]) -> None:
    run, html, drawn = op_run
    page = Page(html.read_text(encoding="utf-8"))
    assert page.sections == RUN_SECTIONS
    calibration = pd.read_csv(run / "eval" / "test" / "calibration.csv")
    shown = page.tables["calibration-before-after"]
    assert list(shown) == list(calibration["metric"])
    for _, row in calibration.iterrows():
        assert shown[row["metric"]][1:3] == [num(row["before"]), num(row["after"])]
    assert shown["ece"][0] == "calibration error (ECE)"
    assert shown["cal_slope_2"][0] == "calibration slope, class 2 vs rest (ideal 1)"
    assert shown["loss"][1] != shown["loss"][2]  # the temperature changed the probabilities
    text = page.text["calibration"]
    assert "calibrated by temperature scaling: temperature 1.500, fitted on the validation" in text
    assert "temperature 1.500 fitted on 6 validation patients" in text  # PostHoc.describe()
    assert "after (temperature 1.500)" in html.read_text(encoding="utf-8")
    # The reliability diagram: after calibration, the curve before it underneath.
    predictions = pd.read_csv(run / "eval" / "test" / "predictions.csv")
    y = predictions["label"].to_numpy()
    before = lines_with_gid(drawn["calibration"], "before-calibration")
    expected = reliability_bins(y, predictions[[f"raw_prob_{c}" for c in "012"]].to_numpy())
    assert len(before) == 1
    assert np.allclose(before[0].get_xdata(), expected.confidence)
    after = reliability_bins(y, predictions[[f"prob_{c}" for c in "012"]].to_numpy())
    assert not np.allclose(expected.confidence, after.confidence)
    assert "Grey, dotted: the same before calibration." in text


def test_operating_point_table_and_its_mark_on_the_roc(
    op_run: tuple[Path, Path, dict[str, Any]],
) -> None:
    run, html, drawn = op_run
    page = Page(html.read_text(encoding="utf-8"))
    op = pd.read_csv(run / "eval" / "test" / "operating_point.csv").set_index("metric")
    assert set(op["positive_class"]) == {2} and set(op["rule"]) == {"youden"}
    shown = page.tables["operating-point"]
    assert list(shown) == ["threshold", "sensitivity", "specificity", "ppv", "npv", "f1"]
    assert shown["threshold"][1:] == ["0.300", ""]
    for key in list(shown)[1:]:
        row = op.loc[key]
        assert shown[key][1:] == [
            num(row["value"]),
            f"{num(row['ci_low'])} – {num(row['ci_high'])}",
        ]
    counts = {k: int(op.loc[k, "value"]) for k in ("tp", "fp", "tn", "fn")}
    assert page.tables["operating-counts"] == {
        "called-positive": ["called 2", f"{counts['tp']} (TP)", f"{counts['fp']} (FP)"],
        "called-negative": ["not called 2", f"{counts['fn']} (FN)", f"{counts['tn']} (TN)"],
    }
    assert (
        "Class 2 is called positive when its probability is at least 0.300 (rule youden, "
        "chosen on the validation split)"
    ) in page.text["operating-point"]
    # The ROC figure marks (1 - specificity, sensitivity) on class 2's curve, in its colour.
    sens, spec = op.loc["sensitivity", "value"], op.loc["specificity", "value"]
    marks = lines_with_gid(drawn["discrimination"], "operating-point")
    assert len(marks) == 1
    assert (marks[0].get_xdata()[0], marks[0].get_ydata()[0]) == pytest.approx((1 - spec, sens))
    assert marks[0].get_markerfacecolor() == figures.COLORS[2]
    assert (
        f"The diamond marks the operating point of class 2 (threshold 0.300): 1 - "
        f"specificity {1 - spec:.3f}, sensitivity {sens:.3f}."
    ) in page.text["discrimination"]


def test_decision_curve(op_run: tuple[Path, Path, dict[str, Any]]) -> None:
    run, html, drawn = op_run
    page = Page(html.read_text(encoding="utf-8"))
    curve = pd.read_csv(run / "eval" / "test" / "decision_curve.csv")
    assert set(curve["class"]) == {2}  # --positive-class: that class only
    shown = page.tables["decision-curve"]
    assert list(shown) == ["2:0.05", "2:0.10", "2:0.20", "2:0.30", "2:0.50"]
    for key, cells in shown.items():
        row = curve[np.isclose(curve["threshold"], float(key.split(":")[1]))].iloc[0]
        assert cells[2:4] == [num(row["net_benefit"]), num(row["treat_all"])]
    fig = drawn["decision_curves"]
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    labels = [line.get_label() for line in ax.lines]
    assert labels[:3] == ["model", "treat all", "treat none"]
    assert np.allclose(ax.lines[0].get_ydata(), curve["net_benefit"])
    assert ax.lines[3].get_xdata()[0] == pytest.approx(0.3)  # the operating threshold
    prevalence = float(
        (pd.read_csv(run / "eval" / "test" / "predictions.csv")["label"] == 2).mean()
    )
    assert ax.get_ylim() == pytest.approx((-0.05, prevalence * 1.1 + 0.02))
    assert "Net benefit = TP/n - FP/n x pt/(1 - pt)" in page.text["decision-curve"]


def test_conformal_coverage_table(op_run: tuple[Path, Path, dict[str, Any]]) -> None:
    run, html, _ = op_run
    page = Page(html.read_text(encoding="utf-8"))
    coverage = pd.read_csv(run / "eval" / "test" / "coverage.csv", keep_default_na=False)
    assert set(coverage["alpha"]) == {0.2}
    shown = page.tables["coverage"]
    assert {k.split(":")[0] for k in shown} == {"all", "class", "pattern"}
    for _, row in coverage.iterrows():
        cells = shown[f"{row['by']}:{row['group']}"]
        assert cells[2] == str(row["n"]) and cells[3].startswith(num(row["coverage"]))
        assert cells[4:] == ["0.800", num(row["mean_set_size"]), str(row["empty_sets"])]
    assert "at least 80% of patients" in page.text["coverage"]


def test_subgroups_and_fairness(op_run: tuple[Path, Path, dict[str, Any]]) -> None:
    run, html, drawn = op_run
    page = Page(html.read_text(encoding="utf-8"))
    subgroups = pd.read_csv(run / "eval" / "test" / "subgroups.csv", keep_default_na=False)
    assert len(subgroups) == 4 and (subgroups["n"] < 30).all()
    shown = page.tables["subgroups"]
    assert list(shown) == [
        f"{c}:{g}" for c, g in zip(subgroups["column"], subgroups["group"], strict=True)
    ]
    for _, row in subgroups.iterrows():
        cells = shown[f"{row['column']}:{row['group']}"]
        assert cells[:4] == [
            row["column"],
            row["group"],
            f"{row['n']} (under 30)",
            row["class_counts"],
        ]
        assert cells[4:] == [
            with_ci(
                *(
                    float(row[f"{m}{k}"] if row[f"{m}{k}"] != "" else "nan")
                    for k in ("", "_ci_low", "_ci_high")
                )
            )
            for m in ("auroc", "macro_f1", "acc", "brier", "ece")
        ]
    assert (
        "Warning: 4 subgroup(s) have fewer than 30 patients: sex = F (3), sex = M (3)"
        in page.text["subgroups"]
    )
    assert 'class="warn" id="small-subgroups"' in html.read_text(encoding="utf-8")
    gaps = pd.read_csv(run / "eval" / "test" / "subgroup_gaps.csv", keep_default_na=False)
    for _, row in gaps.iterrows():
        cells = page.tables["subgroup-gaps"][f"{row['column']}:{row['metric']}"]
        assert cells[2] == num(float(row["gap"]) if row["gap"] != "" else float("nan"))
        assert cells[5:] == [str(row["groups_compared"]), "includes subgroups under 30 patients"]
    assert len(drawn["subgroup_metrics"].axes) == 2  # AUROC and macro-F1 with intervals


def test_tripod_items_from_the_clinical_files(
    op_run: tuple[Path, Path, dict[str, Any]], run_dir: Path
) -> None:
    run, html, _ = op_run
    items = Page(html.read_text(encoding="utf-8")).tables["tripod"]
    assert list(items) == [str(k) for k in range(1, 28)]
    assert "temperature scaling by log loss (temperature 1.500)" in items["12"][3]
    assert "the operating threshold of class 2 (rule youden)" in items["12"][3]
    fairness = items["14"][3]
    assert fairness.startswith("performance examined by subgroup of sex, age:q2 (sex: F (n=3)")
    gaps = pd.read_csv(run / "eval" / "test" / "subgroup_gaps.csv").set_index(["column", "metric"])
    gap = gaps.loc[("sex", "macro_f1")]
    assert (
        f"sex macro-F1 {gap['gap']:.3f} (best {gap['best_group']}, worst {gap['worst_group']})"
    ) in fairness
    assert "4 of 4 subgroups have fewer than 30 patients" in fairness
    assert "temperature 1.500" in items["15"][3]
    assert (
        "class 2 is predicted when its probability is at least 0.300 (rule youden" in items["15"][3]
    )
    assert "conformal prediction sets with 80% target coverage" in items["15"][3]
    calibration = pd.read_csv(run / "eval" / "test" / "calibration.csv").set_index("metric")
    performance = items["23"][3]
    assert (
        f"ECE {calibration.loc['ece', 'before']:.3f} -> {calibration.loc['ece', 'after']:.3f}"
    ) in performance
    slope = calibration.loc["cal_slope_0"]
    assert (
        f"calibration slope (one-vs-rest) class 0 {slope['before']:.3f} -> {slope['after']:.3f}"
    ) in performance
    assert "calibration intercept (one-vs-rest) class 0" in performance
    op = pd.read_csv(run / "eval" / "test" / "operating_point.csv").set_index("metric")
    assert (
        "Operating point (class 2 positive at probability >= 0.300, rule youden): "
        f"sensitivity {op.loc['sensitivity', 'value']:.3f}"
    ) in performance
    assert "Subgroups: 4 subgroups of sex, age:q2" in performance
    # The run as trained: no temperature, no threshold.
    build_report(run_dir)
    items = Page((run_dir / "report.html").read_text(encoding="utf-8")).tables["tripod"]
    assert "no calibration (temperature 1); no operating threshold" in items["12"][3]
    assert items["15"][3].startswith(
        "a probability per class (not calibrated: temperature 1); "
        "the predicted class is the most probable one"
    )


def test_report_of_a_run_trained_before_calibration(run_dir: Path, tmp_path: Path) -> None:
    """A bundle without "posthoc", evaluated by an omnifuse without the clinical files."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    bundle = json.loads((run / "model" / "bundle.json").read_text(encoding="utf-8"))
    del bundle["posthoc"]
    (run / "model" / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    for name in CLINICAL_FILES:
        (run / "eval" / "test" / f"{name}.csv").unlink(missing_ok=True)
    predictions = pd.read_csv(
        run / "eval" / "test" / "predictions.csv", dtype=str, keep_default_na=False
    )
    predictions.drop(
        columns=[c for c in predictions if c.startswith("raw_prob_") or c == "set"]
    ).to_csv(run / "eval" / "test" / "predictions.csv", index=False)
    meta = pd.read_csv(run / "meta.csv", dtype=str, keep_default_na=False)
    meta[
        ~meta["key"].isin(
            ["calibration", "temperature", "positive_class", "threshold_rule", "threshold"]
        )
    ].to_csv(run / "meta.csv", index=False)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"note: the run was {LEGACY}" in " ".join(result.output.split())
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    assert page.sections == RUN_SECTIONS
    for section in ("calibration", "operating-point"):
        assert f"This run was {LEGACY}." in page.text[section]
    assert "calibration-before-after" not in page.tables and "operating-point" not in page.tables
    assert (
        f"No calibration.csv (before/after calibration) in {run / 'eval' / 'test'} (written "
        f"by an older omnifuse): omnifuse evaluate {run}"
    ) in page.text["calibration"]
    assert "Grey, dotted" not in page.text["calibration"]  # no probabilities before calibration
    assert f"No decision_curve.csv in {run / 'eval' / 'test'}" in page.text["decision-curve"]
    assert "trained before omnifuse stored conformal scores" in page.text["coverage"]
    assert f"omnifuse evaluate {run} --subgroup-col COL" in page.text["subgroups"]
    items = page.tables["tripod"]
    assert LEGACY in items["15"][3] and LEGACY in items["23"][3]
    assert f"omnifuse evaluate {run} --subgroup-col COL" in items["14"][3]
    assert {p.stem for p in (run / "report-figures").glob("*.png")} == {
        "classes",
        "missing",
        "discrimination",
        "confusion",
        "calibration",
        "training",
        "weights",
        "patterns",
    }


def test_report_of_a_run_that_was_not_evaluated(
    trained_run: tuple[Path, Any], tmp_path: Path
) -> None:
    run = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    shutil.rmtree(run / "eval", ignore_errors=True)
    result = invoke("report", run, "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "omnifuse evaluate" in " ".join(result.output.split())
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    test = pd.read_csv(run / "test.csv")
    assert page.tables["metrics-discrimination"]["macro_f1"][1] == num(test.loc[0, "test_macro_f1"])
    assert "fig-discrimination" not in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.sections == RUN_SECTIONS
    for section in ("decision-curve", "coverage"):
        assert f"the run has not been evaluated; run omnifuse evaluate {run}" in page.text[section]
    assert f"omnifuse evaluate {run} --subgroup-col COL" in page.text["subgroups"]


def test_report_draws_without_pyplot(run_dir: Path, tmp_path: Path) -> None:
    loaded = "matplotlib.pyplot" in sys.modules
    build_report(run_dir, tmp_path / "x.html")
    assert loaded or "matplotlib.pyplot" not in sys.modules


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "final", "unfinished"])
def test_report_of_a_folder_that_is_not_a_run_or_cv(
    kind: str, tmp_path: Path, cv_run: dict[str, Any]
) -> None:
    target = tmp_path / "x"
    expected = {
        "missing": "does not exist",
        "empty": "is not an omnifuse run or cross-validation folder",
        "file": "is a file",
        "final": "is the final model of a cross-validation",
        "unfinished": "has not finished",
    }[kind]
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("x", encoding="utf-8")
    elif kind == "final":
        target = Path(shutil.copytree(cv_run["dir"], tmp_path / "cv")) / "final"
    elif kind == "unfinished":
        target.mkdir()
        shutil.copy(cv_run["dir"] / "cv.json", target / "cv.json")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = invoke("report", target)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and expected in " ".join(result.stderr.split())
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_curves_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    roc = roc_curves(y, probs, n=0)
    assert roc[1].y[0] == pytest.approx(1.0) and roc[1].y[-1] == 1.0  # perfectly separated
    pr = pr_curves(y, probs, n=20, seed=0)
    assert np.allclose(pr[1].y, 1.0) and pr[1].positives == 2
    rel = reliability_bins(
        np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]), bins=2
    )
    # confidences 0.9, 0.8, 0.6, 0.7: low bin {0.6, 0.7} (one right), high {0.8, 0.9} (one right)
    assert rel.count.tolist() == [2, 2]
    assert rel.confidence.tolist() == pytest.approx([0.65, 0.85])
    assert rel.accuracy.tolist() == [0.5, 0.5]


def test_recovered_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (50, 3))
    raw = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scaled = np.exp(logits / 1.7) / np.exp(logits / 1.7).sum(axis=1, keepdims=True)
    assert recovered_temperature(raw.astype(np.float32), scaled) == pytest.approx(1.7, rel=1e-5)
    assert recovered_temperature(raw, raw) == pytest.approx(1.0)
    assert np.isnan(recovered_temperature(np.full((4, 2), 0.5), np.full((4, 2), 0.5)))


def test_decision_curve_figure_by_hand() -> None:
    """One panel per class, the y-axis from -0.05 to a little above the largest prevalence."""
    from omnifuse_cli.engine.thresholds import decision_curve

    y = np.array([0, 0, 0, 1, 1, 2, 0, 1, 0, 0])
    score = np.linspace(0.05, 0.95, 10)
    frame = pd.concat([decision_curve(y == k, score).assign(**{"class": str(k)}) for k in range(3)])
    fig = figures.decision_curves(frame, {"1": 0.4})
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 3
    assert panels[0].get_ylim() == pytest.approx((-0.05, 0.6 * 1.1 + 0.02))  # class 0: 6 of 10
    assert [line.get_label() for line in panels[1].lines][-1] == "operating threshold 0.40"
    assert "prevalence 0.30" in panels[1].get_title()


def test_the_clinical_reading_needs_no_torch(op_run: tuple[Path, Path, dict[str, Any]]) -> None:
    run = op_run[0]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from omnifuse_cli.report import clinical_inputs, page\n"
        f"run = Path({str(run)!r})\n"
        "bundle = json.loads((run / 'model' / 'bundle.json').read_text(encoding='utf-8'))\n"
        "c = clinical_inputs.run_clinical(run, bundle, ['0', '1', '2'], run / 'eval' / 'test')\n"
        "assert c.threshold == 0.3 and c.operating is not None and c.subgroups is not None\n"
        "assert 'torch' not in sys.modules, 'the report imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _screenshot(html: Path, png: Path, profile: Path) -> np.ndarray:
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,4000",
            html.resolve().as_uri(),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("OMNIFUSE_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_the_report_renders_its_figures_in_a_headless_browser(
    cv_report: Path, tmp_path: Path
) -> None:
    assert CHROMIUM, "OMNIFUSE_REQUIRE_BROWSER is set but chromium is not on PATH"
    shot = _screenshot(cv_report, tmp_path / "report.png", tmp_path / "profile")
    # The same page without its images: what the figures add is what the browser drew.
    bare = tmp_path / "bare.html"
    text = cv_report.read_text(encoding="utf-8")
    bare.write_text(text.replace('src="data:image/png;base64,', 'data-x="'), encoding="utf-8")
    without = _screenshot(bare, tmp_path / "bare.png", tmp_path / "profile")
    assert shot.std() > 30  # not a blank page

    def colourful(pixels: np.ndarray) -> int:
        return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum())

    assert colourful(shot) > 20_000 and colourful(shot) > 20 * (colourful(without) + 1)
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 500  # plots: lines, bands, bars, text anti-aliasing


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("OMNIFUSE_REQUIRE_BROWSER"),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_the_browser_lays_out_every_section_heading(
    op_run: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The headings chromium lays out (a script in a copy of the page writes the visible h2/h3
    texts into its title; --dump-dom returns the document after scripts ran)."""
    assert CHROMIUM, "OMNIFUSE_REQUIRE_BROWSER is set but chromium is not on PATH"
    probe = tmp_path / "probe.html"
    script = (
        "<script>document.title = JSON.stringify(Array.from(document.querySelectorAll("
        "'h2, h3')).filter(h => h.getBoundingClientRect().height > 0 && getComputedStyle("
        "h).visibility === 'visible').map(h => h.textContent));</script>"
    )
    text = op_run[1].read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probe.resolve().as_uri(),
        ],
        check=True,
        timeout=180,
        capture_output=True,
        text=True,
    ).stdout
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    headings = json.loads(title.replace("&amp;", "&"))
    assert headings == [
        "Cohort",
        "Discrimination",
        "Calibration",
        "Operating point",
        "Decision curve",
        "Conformal prediction sets",
        "Subgroups and fairness",
        "Largest gap between subgroups",
        "Training",
        "Modalities",
        "TRIPOD+AI checklist",
    ]
