"""`omnifuse report` of a tune folder (`omnifuse tune`): the page built from hand-written tune
folders around a real Optuna study in SQLite, its figures, the storage that cannot be opened,
too few trials for importances, which number is which (best trial, refit test, nested
estimate), and the TRIPOD+AI text of the search and of its refit run."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from omnifuse_cli.engine.runs import read_meta, write_meta
from omnifuse_cli.report import build_report
from omnifuse_cli.report.tune_inputs import best_so_far, hide_password, load_tune
from omnifuse_cli.report.tuning import space_text

from .helpers import invoke
from .test_report import Page

STUDY = "tiny-search"
SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": None},
    "epochs": {"type": "int", "low": 2, "high": 10, "log": False, "step": 2},
    "fusion": {"type": "categorical", "choices": ["dwfuse", "mean"]},
}
DISTRIBUTIONS: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "epochs": IntDistribution(2, 10, step=2),
    "fusion": CategoricalDistribution(["dwfuse", "mean"]),
}
TUNE_SECTIONS = ["summary", "numbers", "history", "importance", "slices", "trials", "best"]
TUNE_FIGURES = {"tune_history", "tune_intermediate", "tune_importance", "tune_slices"}
REFIT_KEYS = {
    "tune_dir": "/somewhere/tune",
    "tune_study": STUDY,
    "tune_trials": "8",
    "tune_complete": "6",
    "tune_pruned": "1",
    "tune_metric": "auroc",
    "tune_objective": "validation",
    "tune_folds": "0",
    "tune_sampler": "TPESampler",
    "tune_space": json.dumps(SPACE),
    "tune_best_value": "0.8123",
}


def trial_plan(n_complete: int) -> list[dict[str, Any]]:
    """n_complete complete trials (their AUROC rises with lr), then one pruned and one failed."""
    plan = []
    for k in range(n_complete):
        lr = float(10 ** (-4 + 2 * k / max(n_complete - 1, 1)))
        value = 0.6 + 0.2 * k / max(n_complete - 1, 1) + 0.01 * (k % 2)
        plan.append(
            {
                "params": {
                    "lr": lr,
                    "epochs": 2 + 2 * (k % 5),
                    "fusion": ["dwfuse", "mean"][k % 2],
                },
                "state": TrialState.COMPLETE,
                "value": value,
                "steps": {1: value - 0.1, 2: value},
            }
        )
    if n_complete > 1:
        plan.append(
            {
                "params": {"lr": 2e-4, "epochs": 4, "fusion": "mean"},
                "state": TrialState.PRUNED,
                "value": None,
                "steps": {1: 0.4},
            }
        )
        plan.append(
            {
                "params": {"lr": 5e-3, "epochs": 6, "fusion": "dwfuse"},
                "state": TrialState.FAIL,
                "value": None,
                "steps": {},
            }
        )
    return plan


def write_tune_folder(
    folder: Path,
    *,
    n_complete: int = 6,
    nested: bool = False,
    refit: Path | None = None,
    storage: str | None = None,
) -> Path:
    """A tune folder as `omnifuse tune run` writes it: a real study in folder/study.db and the
    files of the contract. ``storage``: the URL tune.json names (default: the study.db);
    ``refit``: a train run folder copied in as refit/."""
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(storage=url, study_name=STUDY, direction="maximize")
    for step in trial_plan(n_complete):
        study.add_trial(
            optuna.trial.create_trial(
                params=step["params"],
                distributions=DISTRIBUTIONS,
                value=step["value"],
                state=step["state"],
                intermediate_values=step["steps"],
            )
        )
    trials, steps = [], []
    for t in study.get_trials():
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "duration_s": 1.5 + t.number,
                "datetime_start": "2025-01-01T10:00:00",
                "datetime_complete": "2025-01-01T10:01:00",
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                **{f"param_{k}": v for k, v in t.params.items()},
                "error": "out of memory" if t.state == TrialState.FAIL else "",
                "run_dir": f"trials/{t.number:04d}",
            }
        )
        steps += [
            {"number": t.number, "step": s, "value": v}
            for s, v in sorted(t.intermediate_values.items())
        ]
    pd.DataFrame(trials).to_csv(folder / "trials.csv", index=False)
    pd.DataFrame(steps, columns=["number", "step", "value"]).to_csv(
        folder / "intermediate.csv", index=False
    )
    best = study.best_trial
    (folder / "best.json").write_text(
        json.dumps(
            {
                "number": best.number,
                "value": best.value,
                "params": best.params,
                "settings": {**best.params, "image_backbone": "resnet18"},
            }
        ),
        encoding="utf-8",
    )
    (folder / "best.yaml").write_text(
        f"# omnifuse tune: trial {best.number}\nlr: {best.params['lr']}\n"
        f"epochs: {best.params['epochs']}\nfusion: {best.params['fusion']}\n",
        encoding="utf-8",
    )
    complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    write_meta(
        folder,
        {
            "version_omnifuse": "0.1.0",
            "created": "2025-01-01T10:00:00",
            "finished": "2025-01-01T10:09:00",
            "seconds": "540.0",
            "n_complete": complete,
            "n_pruned": pruned,
            "n_failed": len(study.trials) - complete - pruned,
            "best_value": best.value,
            "best_trial": best.number,
            "metric": "auroc",
            "objective": "validation",
        },
    )
    request = {
        "kind": "tune",
        "manifest": "/data/manifest.csv",
        "num_classes": 3,
        "metric": "auroc",
        "direction": "maximize",
        "objective": "validation",
        "folds": 0,
        "trials": 10,
        "study_name": STUDY,
        "storage": storage or url,
        "sampler": "TPESampler",
        "seed": 42,
        "pruner": "MedianPruner",
        "space": SPACE,
        "fixed": {"image_backbone": "resnet18"},
        "n_pool": 360,
        "n_test": 40,
        "nested_cv": 3 if nested else 0,
        "refit": refit is not None,
        "version": "0.1.0",
        "created": "2025-01-01T10:00:00",
    }
    (folder / "tune.json").write_text(json.dumps(request), encoding="utf-8")
    if nested:
        pd.DataFrame(
            {
                "outer_fold": [1, 2, 3],
                "n_train": [240, 240, 240],
                "n_test": [120, 120, 120],
                "best_inner_value": [0.84, 0.82, 0.83],
                "outer_auroc": [0.71, 0.74, 0.69],
                "outer_macro_f1": [0.52, 0.55, 0.5],
                "outer_log_loss": [0.9, 0.85, 0.95],
                "params": [json.dumps({"lr": 0.001, "fusion": "mean"})] * 3,
            }
        ).to_csv(folder / "nested.csv", index=False)
        summary = {
            "folds": 3,
            "metric": "auroc",
            "outer_mean": 0.7133,
            "outer_ci_low": 0.65,
            "outer_ci_high": 0.77,
            "inner_mean": 0.83,
        }
        (folder / "nested.json").write_text(json.dumps(summary), encoding="utf-8")
    if refit is not None:
        shutil.copytree(refit, folder / "refit")
        add_tune_keys(folder / "refit")
    return folder


def add_tune_keys(run: Path) -> None:
    write_meta(run, {**read_meta(run), **REFIT_KEYS})


@pytest.fixture(scope="module")
def refit_run(trained_run: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's run (trained, not evaluated), as a refit run: tune_* keys in meta.csv."""
    run = Path(shutil.copytree(trained_run[0], tmp_path_factory.mktemp("refit") / "run"))
    add_tune_keys(run)
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished search, no refit run, no nested estimate (read-only: copy it to change it)."""
    return write_tune_folder(tmp_path_factory.mktemp("tune") / "tune")


def copy_of(folder: Path, dest: Path, **request: Any) -> Path:
    """A copy of a tune folder, its tune.json's keys changed."""
    shutil.copytree(folder, dest)
    path = dest / "tune.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text(encoding="utf-8")), **request}), encoding="utf-8"
    )
    return dest


@pytest.fixture(scope="module")
def full(refit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Page]:
    """A finished search with a refit run and a nested estimate, reported through the CLI (with
    optuna's experimental warnings as errors, and no pyplot)."""
    folder = write_tune_folder(
        tmp_path_factory.mktemp("tune") / "tune", nested=True, refit=refit_run
    )
    loaded = "matplotlib.pyplot" in sys.modules
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        result = invoke("report", folder)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert loaded or "matplotlib.pyplot" not in sys.modules
    return folder, Page((folder / "report.html").read_text(encoding="utf-8"))


def images(html: str) -> dict[str, bytes]:
    """figure id -> the PNG embedded in it."""
    out = {}
    for chunk in html.split('<figure id="fig-')[1:]:
        name = chunk.split('"', 1)[0]
        data = chunk.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
        out[name] = base64.b64decode(data)
    return out


def test_tune_report_sections_summary_and_figures(full: tuple[Path, Page]) -> None:
    folder, page = full
    assert page.sections == [*TUNE_SECTIONS, "refit", "nested", "tripod"]
    summary = page.tables["tune-summary"]
    assert summary["study"] == ["study", STUDY]
    assert summary["trials"][1] == "8 of 10 asked: 6 complete, 1 pruned, 1 failed"
    assert summary["best trial"][1] == "#5: AUROC 0.810"
    assert summary["objective"][1] == "AUROC, maximised, on an inner validation split"
    assert "360 searched over; 40 held out" in summary["patients"][1]
    html = (folder / "report.html").read_text(encoding="utf-8")
    embedded = images(html)
    assert set(embedded) == TUNE_FIGURES
    for name in TUNE_FIGURES:
        png = (folder / "report-figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and png == embedded[name]
        assert (folder / "report-figures" / f"{name}.pdf").is_file()
    trials = page.tables["trials"]
    assert list(trials) == [str(k) for k in range(8)]
    assert trials["5"][0] == "5 (best)" and "<b>5 (best)</b>" in html
    assert [row[0] for key, row in trials.items() if key != "5"] == [
        "0",
        "1",
        "2",
        "3",
        "4",
        "6",
        "7",
    ]
    assert trials["6"][1:3] == ["PRUNED", "n/a"] and trials["7"][-1] == "out of memory"
    assert "lr: " in page.text["best"] and "fusion: mean" in page.text["best"]
    assert '<p class="note">' not in html.split("<section")[0]  # nothing to warn about


def test_which_number_is_which(full: tuple[Path, Page]) -> None:
    folder, page = full
    numbers = page.tables["tune-numbers"]
    assert list(numbers) == ["best", "nested", "nested-inner", "refit"]
    assert numbers["best"][1:3] == ["AUROC", "0.810"]
    assert numbers["best"][5].startswith("optimistic: the best of 6 complete trials")
    assert numbers["nested"][2:4] == ["0.713", "0.650 – 0.770"]
    assert numbers["nested-inner"][2] == "0.830"
    test = pd.read_csv(folder / "refit" / "test.csv")
    assert numbers["refit"][1] == "AUROC (OvR macro)"
    assert numbers["refit"][2] == f"{float(test['test_auroc'].iloc[0]):.3f}"
    assert numbers["refit"][5].startswith("honest")
    assert "The honest numbers are the ones below it" in page.text["numbers"]
    nested = page.tables["nested"]
    assert list(nested) == ["1", "2", "3"] and nested["2"][4] == "0.740"
    refit = page.tables["refit-metrics"]
    assert refit["auroc"][1] == numbers["refit"][2]


def test_tripod_of_the_search(full: tuple[Path, Page]) -> None:
    _, page = full
    items = page.tables["tripod"]
    assert list(items) == [str(k) for k in range(1, 28)]
    text = items["12"][3]
    assert (
        "settings chosen by omnifuse tune: 8 trials (6 complete, 1 pruned, 1 failed or "
        "unfinished) of a TPESampler search over lr in [0.0001, 0.01] (log), epochs in [2, 10] "
        "(step 2), fusion in {dwfuse, mean}, objective AUROC on an inner validation split of "
        "the 360 training patients only; the 40 test patients were never seen by the search"
    ) in text
    assert "Nested cross-validation (3 outer folds" in text and "AUROC 0.713" in text
    assert "OmniFuse (embedding" in text  # the refit run's model, described as for any run
    assert "What this tuning search and its refit run knows" in page.text["tripod"]


def test_refit_run_report_says_where_its_settings_came_from(
    refit_run: Path, tmp_path: Path
) -> None:
    html = build_report(refit_run, tmp_path / "refit.html").html.read_text(encoding="utf-8")
    page = Page(html)
    assert 'id="tuned"' in html
    header = html.split("<nav>")[0]
    assert (
        f"Settings from omnifuse tune (study {STUDY}, 8 trials, best validation score AUROC "
        "0.812; folder /somewhere/tune)"
    ) in header
    text = page.tables["tripod"]["12"][3]
    # The refit run's pool: its training and validation patients (18 + 6 of 30).
    assert "omnifuse tune: 8 trials (6 complete, 1 pruned" in text
    assert "objective AUROC on an inner validation split of the 24 training patients only" in text
    assert "the 6 test patients were never seen by the search" in text


def test_plain_run_checklist_does_not_mention_tuning(
    trained_run: tuple[Path, Any], tmp_path: Path
) -> None:
    html = build_report(trained_run[0], tmp_path / "plain.html").html.read_text(encoding="utf-8")
    items = Page(html).tables["tripod"]
    known = " ".join(row[3] for row in items.values())
    assert "omnifuse tune" not in known and "trials" not in known and "search" not in known
    assert 'id="tuned"' not in html and "Settings from omnifuse tune" not in html
    assert "Validation: one stratified split" in items["12"][3]
    assert "). Measures: accuracy" in items["12"][3]  # nothing between validation and measures


@pytest.mark.parametrize(
    "storage",
    [
        "sqlite:///{tmp}/elsewhere.db",  # a copied folder: the path is gone
        "postgresql://omni:s3cret@127.0.0.1:1/studies",  # a server that cannot be reached
    ],
)
def test_storage_that_cannot_be_opened(storage: str, base: Path, tmp_path: Path) -> None:
    url = storage.format(tmp=tmp_path)
    folder = copy_of(base, tmp_path / "tune", storage=url, objective="cv", folds=5)
    (folder / "study.db").unlink()  # no local copy to fall back on
    result = build_report(folder)
    html = result.html.read_text(encoding="utf-8")
    page = Page(html)
    assert page.sections == [*TUNE_SECTIONS, "tripod"]
    assert set(result.figures) == TUNE_FIGURES - {"tune_importance"}
    assert any("figures and tables come from trials.csv" in n for n in result.notes)
    assert "figures and tables come from trials.csv" in html
    assert "No parameter importances: the study's storage could not be opened" in html
    assert not (tmp_path / "elsewhere.db").exists()  # no empty database created
    assert "s3cret" not in html
    if url.startswith("postgresql"):
        assert (
            page.tables["tune-summary"]["storage"][1] == "postgresql://omni:***@127.0.0.1:1/studies"
        )
    # Without a refit run, the checklist says what it knows: the search, no model.
    items = page.tables["tripod"]
    assert "omnifuse tune: 8 trials" in items["12"][3]
    assert "objective AUROC on 5-fold cross-validation of the 360 training" in items["12"][3]
    assert items["23"][3].startswith("no model was trained from the chosen settings")
    assert "There is no honest estimate here" in page.text["numbers"]


def test_one_complete_trial_has_no_importances(tmp_path: Path) -> None:
    folder = write_tune_folder(tmp_path / "tune", n_complete=1)
    result = build_report(folder)
    assert "tune_importance" not in result.figures
    assert {"tune_history", "tune_slices"} <= set(result.figures)
    note = "parameter importances need at least 2 complete trials that differ in a setting"
    assert any(n.startswith(note) and "(1 complete here)" in n for n in result.notes)
    page = Page(result.html.read_text(encoding="utf-8"))
    assert "No parameter importances: too few complete trials" in page.text["importance"]
    assert page.tables["tune-summary"]["trials"][1].startswith("1 of 10 asked: 1 complete")


def test_copied_folder_opens_its_own_study_and_draws_the_slices(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnifuse_cli.report import figures_tune

    drawn: dict[str, Any] = {}
    for name in ("history", "slices"):
        real = getattr(figures_tune, name)

        def keep(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            drawn[_name] = _real(*args, **kwargs)
            return drawn[_name]

        monkeypatch.setattr(figures_tune, name, keep)
    folder = copy_of(base, tmp_path / "tune", storage="sqlite:////gone/tune/study.db")
    result = build_report(folder)
    assert "tune_importance" in result.figures
    assert any("/gone/tune/study.db is not on this machine" in n for n in result.notes)
    axes = [ax for ax in drawn["slices"].axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["lr", "epochs", "fusion"]
    assert [ax.get_xscale() for ax in axes] == ["log", "linear", "linear"]
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["dwfuse", "mean"]
    (line,) = [ln for ln in drawn["history"].axes[0].lines if ln.get_gid() == "best-so-far"]
    assert list(np.round(line.get_ydata(), 2)) == [0.6, 0.65, 0.68, 0.73, 0.76, 0.81]


def test_unfinished_search(base: Path, tmp_path: Path) -> None:
    folder = copy_of(base, tmp_path / "tune")
    (folder / "meta.csv").unlink()
    notes = load_tune(folder).notes
    assert (
        notes[0] == "the search has not finished (no meta.csv): this page shows the 8 trials so far"
    )
    (folder / "trials.csv").unlink()
    outcome = invoke("report", folder)
    assert outcome.exit_code == 2 and "has no trials yet" in " ".join(outcome.stderr.split())
    assert not (folder / "report.html").exists()


def test_helpers_by_hand() -> None:
    assert list(best_so_far(np.array([0.5, np.nan, 0.4, 0.7]), True)) == [0.5, 0.5, 0.5, 0.7]
    low = best_so_far(np.array([np.nan, 0.9, 1.2, 0.8]), False)
    assert np.isnan(low[0]) and list(low[1:]) == [0.9, 0.9, 0.8]
    assert hide_password("postgresql://u:pw@host:5432/db") == "postgresql://u:***@host:5432/db"
    assert hide_password("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert space_text({"a": {"type": "int", "low": 1, "high": 4, "log": False, "step": None}}) == (
        "a in [1, 4]"
    )
