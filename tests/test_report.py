"""`omnifuse report` (issue 9): the page's structure, its numbers against the result CSVs, the
figure files, bad input, and the page rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
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
from typer.testing import CliRunner, Result

from omnifuse_cli.cli.app import app
from omnifuse_cli.report import build_report
from omnifuse_cli.report.curves import pr_curves, reliability_bins, roc_curves

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_SECTIONS = ["cohort", "discrimination", "calibration", "training", "modalities", "tripod"]
CV_SECTIONS = [*RUN_SECTIONS[:-1], "folds", "variants", "tripod"]


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


class Page(HTMLParser):
    """Sections, images and tables (id -> data-key -> cell texts) of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tables: dict[str, dict[str, list[str]]] = {}
        self._table = self._row = None  # type: ignore[assignment]
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(str(a.get("id")))
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


def num(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


@pytest.fixture(scope="module")
def cv_report(cv_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "cv-report.html"
    result = invoke("report", cv_run["dir"], "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert str(out) in " ".join(result.output.split())
    return out


@pytest.fixture(scope="module")
def run_dir(trained_run: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the conftest's run, evaluated (so its test predictions are on disk)."""
    run = Path(shutil.copytree(trained_run[0], tmp_path_factory.mktemp("r") / "run"))
    result = invoke("evaluate", run, "--device", "cpu", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert f"omnifuse report {run}" in " ".join(result.output.split())
    return run


def test_cv_report_sections_and_embedded_figures(cv_report: Path) -> None:
    page = Page(cv_report.read_text(encoding="utf-8"))
    assert page.sections == CV_SECTIONS
    folder = cv_report.with_name("cv-report-figures")
    pngs = sorted(folder.glob("*.png"))
    assert {p.stem for p in pngs} == {"classes", "missing", "discrimination", "confusion",
                                      "calibration", "training", "weights", "patterns",
                                      "forest"}
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
            str(row[f"pred_{k}"]) for k in range(3)]
    folds = pd.read_csv(out / "fold_metrics.csv")
    for _, row in folds[folds["variant"] == "base"].iterrows():
        cells = page.tables["fold-metrics"][f"{row['repeat']}-{row['fold']}"]
        assert cells[2] == str(row["n"]) and cells[5] == num(row["macro_f1"])
    counts = page.tables["class-counts"]
    assert counts["all"][-1] == "30" and counts["0"][-1] == "10"


def test_tripod_checklist(cv_report: Path) -> None:
    page = Page(cv_report.read_text(encoding="utf-8"))
    items = page.tables["tripod"]
    assert list(items) == [str(k) for k in range(1, 28)]
    assert items["1"][3] == "for the author"
    assert "30 patients" in items["10"][3] and "class 0: 10" in items["10"][3]
    assert "3-fold stratified cross-validation" in items["12"][3]
    assert "imputed" in items["11"][3]
    assert "macro-F1" in items["23"][3] and "95% CI" in items["23"][3]


def test_run_report_numbers_match_the_evaluation(run_dir: Path) -> None:
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    page = Page((run_dir / "report.html").read_text(encoding="utf-8"))
    assert page.sections == RUN_SECTIONS
    metrics = pd.read_csv(run_dir / "eval" / "test" / "metrics.csv").set_index("metric")
    shown = {**page.tables["metrics-discrimination"], **page.tables["metrics-calibration"]}
    for metric, row in metrics.iterrows():
        assert shown[str(metric)][1:3] == [num(row["value"]),
                                          f"{num(row['ci_low'])} – {num(row['ci_high'])}"]
    split = pd.read_csv(run_dir / "split_assignment.csv")
    counts = page.tables["class-counts"]["all"]
    assert counts[-1] == str(len(split))
    assert len(page.images) == len(list((run_dir / "report-figures").glob("*.png"))) == 8


def test_report_of_a_run_that_was_not_evaluated(trained_run: tuple[Path, Any],
                                                tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    shutil.rmtree(run / "eval", ignore_errors=True)
    result = invoke("report", run, "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "omnifuse evaluate" in " ".join(result.output.split())
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    test = pd.read_csv(run / "test.csv")
    assert page.tables["metrics-discrimination"]["macro_f1"][1] == num(
        test.loc[0, "test_macro_f1"])
    assert "fig-discrimination" not in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_report_draws_without_pyplot(run_dir: Path, tmp_path: Path) -> None:
    loaded = "matplotlib.pyplot" in sys.modules
    build_report(run_dir, tmp_path / "x.html")
    assert loaded or "matplotlib.pyplot" not in sys.modules


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "final", "unfinished"])
def test_report_of_a_folder_that_is_not_a_run_or_cv(kind: str, tmp_path: Path,
                                                    cv_run: dict[str, Any]) -> None:
    target = tmp_path / "x"
    expected = {"missing": "does not exist", "empty": "is not an omnifuse run or "
                "cross-validation folder", "file": "is a file",
                "final": "is the final model of a cross-validation",
                "unfinished": "has not finished"}[kind]
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
    rel = reliability_bins(np.array([0, 1, 1, 0]), np.array(
        [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]), bins=2)
    # confidences 0.9, 0.8, 0.6, 0.7: low bin {0.6, 0.7} (one right), high {0.8, 0.9} (one right)
    assert rel.count.tolist() == [2, 2]
    assert rel.confidence.tolist() == pytest.approx([0.65, 0.85])
    assert rel.accuracy.tolist() == [0.5, 0.5]


def _screenshot(html: Path, png: Path, profile: Path) -> np.ndarray:
    assert CHROMIUM is not None
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--screenshot={png}",
                    "--window-size=1200,4000", html.resolve().as_uri()],
                   check=True, timeout=180, capture_output=True)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("OMNIFUSE_REQUIRE_BROWSER"),
                    reason="chromium is not installed (apt-get install chromium)")
def test_the_report_renders_its_figures_in_a_headless_browser(cv_report: Path,
                                                              tmp_path: Path) -> None:
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
