"""`omnifuse cv` (issue 9): folds, inner validation, encode-once, pooled out-of-fold results,
paired variants, --refit, Ctrl-C/--resume, bad input; and the train options it shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import typer

from omnifuse_cli.cli.app import app
from omnifuse_cli.cli.train_options import TRAIN_ONLY, train_parameters
from omnifuse_cli.engine.cv import (
    assign_folds,
    inner_split,
    load_cv_request,
    run_cv,
    save_cv_request,
)
from omnifuse_cli.engine.cv import run as crossval
from omnifuse_cli.engine.metrics import (
    bootstrap_ci,
    bootstrap_draws,
    full_metrics,
    paired_bootstrap_diff,
)
from omnifuse_cli.errors import DataError, OmnifuseError, TrainingInterrupted
from omnifuse_cli.settings import DATA_READING, FOLDED, SETTINGS, route
from omnifuse_cli.settings import defaults as train_defaults

from .conftest import CV_ARGS, N_PATIENTS
from .helpers import assert_user_error, invoke

METRICS = ["acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss", "ece", "brier"]


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "pred": str})


# -- the folds --------------------------------------------------------------------------------


def test_folds_are_stratified_and_every_patient_is_tested_once(cv_run: dict[str, Any]) -> None:
    folds = read(cv_run["dir"] / "folds.csv")
    assert len(folds) == N_PATIENTS and sorted(folds["fold"].unique()) == [1, 2, 3]
    for _, part in folds.groupby("fold"):
        assert sorted(part["label"].unique()) == [0, 1, 2]  # every class in every fold
    preds = read(cv_run["dir"] / "predictions.csv")
    for variant in ("base", "nodw"):
        mine = preds[preds["variant"] == variant]
        assert sorted(mine["id"]) == sorted(folds["id"])  # one row per patient
        merged = mine.merge(folds, on="id", suffixes=("", "_assigned"))
        assert (merged["fold"] == merged["fold_assigned"]).all()


def test_the_test_fold_chooses_nothing(cv_run: dict[str, Any]) -> None:
    """Each fold's model learned from and picked its epoch on other folds' patients only, and
    its preprocessing was fitted on its inner training patients."""
    out = cv_run["dir"]
    folds = read(out / "folds.csv")
    ids = folds["id"].tolist()
    test_sets = []
    for variant in ("base", "nodw"):
        for k in (1, 2, 3):
            split = read(out / "folds" / variant / f"rep1-fold{k}" / "split_assignment.csv")
            test = set(split.loc[split["split"] == "test", "id"])
            assert test == set(folds.loc[folds["fold"] == k, "id"])
            learned = set(split.loc[split["split"].isin(["train", "val"]), "id"])
            assert not test & learned and len(test | learned) == N_PATIENTS
            assert (split["split"] == "val").sum() >= 3  # every class can be in validation
            test_sets.append(
                (
                    {ids.index(i) for i in test},
                    {ids.index(i) for i in split.loc[split["split"] == "train", "id"]},
                )
            )
    # build_for_cohort fits the preprocessing: first the frozen encoder's (features only), then
    # one per fold fit in order (base folds 1-3, nodw folds 1-3), then the --refit model.
    fitted = cv_run["fitted"]
    assert len(fitted[0]) == N_PATIENTS and len(fitted) == 1 + 6 + 1
    for (test, train), used in zip(test_sets, fitted[1:7], strict=True):
        assert set(used.tolist()) == train and not test & set(used.tolist())


def test_frozen_backbones_encode_once_for_the_whole_cross_validation(
    cv_run: dict[str, Any],
) -> None:
    assert cv_run["encodes"] == 1  # 6 fold fits and the refit share one encoding


# -- pooled results ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")  # float32 in the CSV
def test_pooled_metrics_are_those_of_the_out_of_fold_predictions(cv_run: dict[str, Any]) -> None:
    out = cv_run["dir"]
    preds = read(out / "predictions.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    folds = pd.read_csv(out / "fold_metrics.csv")
    for variant in ("base", "nodw"):
        mine = preds[preds["variant"] == variant]
        expected = full_metrics(
            mine["label"].to_numpy(), mine[["prob_0", "prob_1", "prob_2"]].to_numpy(), 3
        )
        rows = metrics[metrics["variant"] == variant].set_index("metric")
        assert list(rows.index) == METRICS
        for m in METRICS:
            assert rows.loc[m, "value"] == pytest.approx(expected[m], abs=1e-6), m
            assert rows.loc[m, "ci_low"] <= rows.loc[m, "ci_high"]
            per_fold = folds.loc[folds["variant"] == variant, m]
            assert rows.loc[m, "fold_mean"] == pytest.approx(per_fold.mean())
            assert rows.loc[m, "fold_sd"] == pytest.approx(per_fold.std(ddof=1))
    assert (folds["n"].groupby(folds["variant"]).sum() == N_PATIENTS).all()
    patterns = read(out / "patterns.csv")
    assert patterns.groupby("variant")["n"].sum().tolist() == [N_PATIENTS, N_PATIENTS]
    cm = pd.read_csv(out / "confusion_matrix.csv")
    assert cm[["pred_0", "pred_1", "pred_2"]].to_numpy().sum() == 2 * N_PATIENTS


def test_paired_differences_of_the_variant(cv_run: dict[str, Any]) -> None:
    out = cv_run["dir"]
    metrics = pd.read_csv(out / "metrics.csv").set_index(["variant", "metric"])
    diffs = pd.read_csv(out / "differences.csv").set_index("metric")
    folds = pd.read_csv(out / "fold_metrics.csv")
    for m in METRICS:
        row = diffs.loc[m]
        assert row["variant"] == "nodw"
        assert row["difference"] == pytest.approx(
            metrics.loc[("nodw", m), "value"] - metrics.loc[("base", m), "value"]
        )
        assert row["ci_low"] <= row["ci_high"]
        per_fold = (
            folds.loc[folds["variant"] == "nodw", m].to_numpy()
            - folds.loc[folds["variant"] == "base", m].to_numpy()
        )
        assert row["fold_mean"] == pytest.approx(np.nanmean(per_fold))


def test_cv_prints_the_tables_and_where_the_report_is(cv_run: dict[str, Any]) -> None:
    output = " ".join(cv_run["result"].output.split())
    metrics = pd.read_csv(cv_run["dir"] / "metrics.csv").set_index(["variant", "metric"])
    for header in (
        "base: pooled out-of-fold metrics",
        "nodw: pooled out-of-fold metrics",
        "paired differences from base",
        "by missing pattern",
        "out-of-fold confusion matrix",
    ):
        assert header in output
    assert f"{metrics.loc[('base', 'macro_f1'), 'value']:.3f}" in output
    assert f"omnifuse report {cv_run['dir']}" in output
    assert f"--run {cv_run['dir'] / 'final'}" in output


def test_refit_saves_a_model_predict_can_use(
    cv_run: dict[str, Any], tiny_manifest: Path, tmp_path: Path
) -> None:
    final = cv_run["dir"] / "final"
    split = read(final / "split_assignment.csv")
    assert set(split["split"]) == {"train", "val"} and len(split) == N_PATIENTS
    preds = tmp_path / "p.csv"
    result = invoke("predict", tiny_manifest, "--run", final, "--out", preds, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(preds)) == N_PATIENTS


def test_the_request_round_trips(cv_run: dict[str, Any], tmp_path: Path) -> None:
    request = load_cv_request(cv_run["dir"])
    assert [v.name for v in request.all_variants] == ["base", "nodw"]
    assert request.variants[0].method.use_dwfuse is False and request.refit
    copy = tmp_path / "copy"
    copy.mkdir()
    save_cv_request(crossval.dataclasses.replace(request, out_dir=copy))
    assert crossval.dataclasses.replace(load_cv_request(copy), out_dir=request.out_dir) == request


# -- Ctrl-C and --resume ----------------------------------------------------------------------


def _request(manifest: Path, out: Path) -> crossval.CVRequest:
    from .conftest import tiny_request

    base = tiny_request(manifest, out, epochs=2)
    return crossval.CVRequest(
        manifest=manifest,
        num_classes=3,
        out_dir=out,
        base=crossval.Variant("base", base.data, base.method, base.train),
        folds=3,
        bootstrap=20,
    )


def test_ctrl_c_keeps_complete_folds_and_resume_equals_an_uninterrupted_run(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted, uninterrupted = tmp_path / "I", tmp_path / "U"
    real_fit = crossval.fit_model
    calls: list[int] = []

    def fit(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while fold 2 trains
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(crossval, "fit_model", fit)
    with pytest.raises(TrainingInterrupted) as stop:
        run_cv(_request(tiny_manifest, interrupted))
    monkeypatch.undo()
    assert "during base rep 1 fold 2; 1 of 3 fold fits are complete" in stop.value.message
    assert stop.value.hint == f"continue with: omnifuse cv --resume {interrupted}"
    assert (interrupted / "folds/base/rep1-fold1/fold.json").is_file()
    assert not (interrupted / "folds/base/rep1-fold2/fold.json").exists()
    assert not (interrupted / "metrics.csv").exists()

    resumed = invoke("cv", "--resume", interrupted)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {interrupted}" in " ".join(resumed.output.split())
    run_cv(_request(tiny_manifest, uninterrupted))
    for name in ("predictions.csv", "metrics.csv", "fold_metrics.csv", "folds.csv"):
        a, b = pd.read_csv(interrupted / name), pd.read_csv(uninterrupted / name)
        pd.testing.assert_frame_equal(
            a.drop(columns=["seconds"], errors="ignore"),
            b.drop(columns=["seconds"], errors="ignore"),
        )


def test_resume_of_a_folder_that_is_not_a_cv(tmp_path: Path) -> None:
    assert_user_error(invoke("cv", "--resume", tmp_path), "is not a resumable cross-validation")


# -- bad input: exit 2, nothing written -------------------------------------------------------


def _with_column(manifest: Path, tmp_path: Path, values: list[str]) -> Path:
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["site"] = values
    path = tmp_path / "data" / "manifest.csv"
    path.parent.mkdir()
    for sub in ("us", "notes"):
        (path.parent / sub).symlink_to(manifest.parent / sub)
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--folds", "11"], ["--folds 11 is more than class 0 has patients (10)", "--folds 10"]),
        (["--group-col", "ward"], ["--group-col 'ward' is not a column of"]),
        (
            ["--variant", "bad=--no-such-flag"],
            ["--variant bad: --no-such-flag is not a model or training option"],
        ),
        (["--variant", "x=--modality labs=vector"], ["--variant x changes --modality"]),
        (["--variant", "x=--inference-rule nope"], ["--variant x: --inference-rule 'nope'"]),
        (["--variant", "base=--no-tla"], ["--variant base is given more than once"]),
    ],
)
def test_bad_cv_input_is_a_clear_error_and_writes_nothing(
    tiny_manifest: Path, tmp_path: Path, extra: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "out"
    assert_user_error(invoke("cv", tiny_manifest, "--out-dir", out, *CV_ARGS, *extra), *fragments)
    assert not out.exists()


def test_group_column_with_one_group_or_too_few(tiny_manifest: Path, tmp_path: Path) -> None:
    one = _with_column(tiny_manifest, tmp_path, ["A"] * N_PATIENTS)
    out = tmp_path / "out"
    assert_user_error(
        invoke("cv", one, "--out-dir", out, *CV_ARGS, "--group-col", "site"),
        "--group-col 'site' puts all 30 patients in one group",
    )
    labels = np.arange(N_PATIENTS) % 3
    with pytest.raises(DataError, match="has 2 groups; --folds 3 needs at least 3"):
        assign_folds(labels, 3, 1, 0, np.array(["A", "B"] * 15), "site")
    assert not out.exists()


def test_group_column_keeps_each_group_in_one_fold() -> None:
    labels = np.arange(60) % 3
    groups = np.repeat([f"p{i}" for i in range(20)], 3)  # a patient with three rows
    folds = assign_folds(labels, 4, 2, 0, groups)
    for r in range(2):
        for g in set(groups):
            assert len(set(folds[r, groups == g])) == 1
    assert not np.array_equal(folds[0], folds[1])  # a repeat draws new folds
    train, val = inner_split(labels, np.flatnonzero(folds[0] != 1), 0.2, 0, groups)
    assert not set(groups[train]) & set(groups[val])


def test_inner_split_is_stratified_and_disjoint() -> None:
    labels = np.arange(90) % 3
    idx = np.arange(0, 72)
    train, val = inner_split(labels, idx, 0.111, 0)
    assert not set(train) & set(val) and set(train) | set(val) == set(idx)
    assert len(val) == 8 and set(labels[val]) == {0, 1, 2}
    with pytest.raises(DataError, match="class 2 has 1 training patient"):
        inner_split(labels, np.array([0, 1, 2, 3, 4]), 0.4, 0)


# -- metrics used by cv -----------------------------------------------------------------------


def test_paired_bootstrap_and_repeats() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    probs = rng.dirichlet(np.ones(3), 80)
    same = paired_bootstrap_diff(y, probs, probs, 3, n=50, seed=0, names=("acc", "brier"))
    assert same == {"acc": (0.0, 0.0), "brier": (0.0, 0.0)}
    better = probs.copy()
    better[np.arange(80), y] += 1.0
    better /= better.sum(axis=1, keepdims=True)
    diff = paired_bootstrap_diff(y, probs, better, 3, n=100, seed=0, names=("acc",))
    assert diff["acc"][0] > 0  # a clearly better model: the whole interval above zero
    # Two identical repeats score as one; the bootstrap is the same as without repeats.
    stacked = np.stack([probs, probs])
    assert bootstrap_ci(y, stacked, 3, n=30, seed=1) == bootstrap_ci(y, probs, 3, n=30, seed=1)
    draws = bootstrap_draws(y, [probs, better], 3, n=5, seed=0, names=("acc", "auroc"))
    assert draws.shape == (5, 2, 2)


# -- the train options cv shares ---------------------------------------------------------------


def _click_params(command: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


def test_cv_takes_every_train_option() -> None:
    train, cv = _click_params("train"), _click_params("cv")
    shared = set(train) - set(TRAIN_ONLY)
    assert shared <= set(cv), sorted(shared - set(cv))
    for name in shared:
        assert train[name].opts == cv[name].opts and train[name].default == cv[name].default
    for name in train_defaults():
        if name not in FOLDED:  # read by another option's converter
            route(name)  # a KeyError names the option no config field takes


# Non-default values of options that are not numbers or switches (those are made up below).
# A new text option of `train` needs a line here; the test says so.
EXAMPLES: dict[str, list[str]] = {
    "labs_table": ["--labs-table", "labs.csv"],
    "labs_id_col": ["--labs-id-col", "pid"],
    "modality": ["--modality", "a=vector", "--modality", "b=image"],
    "on_bad_file": ["--on-bad-file", "skip"],
    "labs_format": ["--labs-format", "long"],
    "labs_agg": ["--labs-agg", "mean"],
    "encoding": ["--encoding", "gb18030"],
    "on_empty_patient": ["--on-empty-patient", "error"],
    "threads": ["--threads", "3"],
    "device": ["--device", "cpu"],
    "image_backbone": ["--image-backbone", "resnet18"],
    "image_weights": ["--image-weights", "w.pth"],
    "cache_dir": ["--cache-dir", "features"],
    "text_encoder": ["--text-encoder", "hf"],
    "text_model": ["--text-model", "some/model"],
    "inference_rule": ["--inference-rule", "joint"],
    "class_weight": ["--class-weight", "1,2,1"],
    "calibrate": ["--calibrate", "none"],
    "positive_class": ["--positive-class", "2"],
    "threshold": ["--threshold", "sens=0.9"],
    "finetune_image_scope": ["--finetune-image-scope", "layer4"],
    "reliability": ["--reliability", " 0.5 "],
    "joint_input": ["--joint-input", "both"],
    "imputation_loss": ["--imputation-loss", "paper"],
    "ra_layers": ["--ra-layers", "64,16"],
    "select_by": ["--select-by", "auroc"],
    "preset": ["--preset", "fast"],
    "eval_metric": ["--eval-metric", "balanced_accuracy"],
    "time_limit": ["--time-limit", "60"],
    "bag_folds": ["--bag-folds", "3"],
    "epochs": ["--epochs", "5"],
    "batch_size": ["--batch-size", "16"],
    "lr": ["--lr", "0.001"],
    "patience": ["--patience", "2"],
}
COMBINED = [
    ["--freeze-text", "--finetune-text-last-n", "2"],
    ["--finetune-text-last-n", "2"],
    ["--pretrained-image"],
    ["--no-pretrained-image"],
    ["--no-dwfuse", "--inference-rule", "joint"],
    ["--bag-folds", "2", "--ensemble"],
    ["--preset", "best", "--no-ensemble"],
]


def _flag_sets() -> list[list[str]]:
    params = _click_params("train")
    sets: list[list[str]] = [[]]
    missing = []
    for name, default in train_defaults().items():
        param = params[name]
        if name in EXAMPLES:
            sets.append(EXAMPLES[name])
        elif isinstance(default, bool):
            sets.append([param.secondary_opts[0] if default else param.opts[0]])
        elif default is None and getattr(param, "is_flag", False):
            continue  # tri-state switch: in COMBINED
        elif isinstance(default, int):
            sets.append([param.opts[0], str(default + 1)])
        elif isinstance(default, float):
            sets.append([param.opts[0], str(default / 2 if default else 0.5)])
        else:
            missing.append(param.opts[0])
    assert not missing, (
        f"add a non-default example for {', '.join(missing)} to EXAMPLES in "
        "tests/test_cv.py (and check cv builds it like train)"
    )
    return sets + COMBINED


class _Captured(OmnifuseError):
    """Stops a command once it has built its request."""


def _captured(monkeypatch: pytest.MonkeyPatch, target: str, *args: str) -> Any:
    seen: list[Any] = []

    def capture(request: Any, *_: Any, **__: Any) -> None:
        seen.append(request)
        raise _Captured("captured")

    monkeypatch.setattr(target, capture)
    result = invoke(*args)
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    return seen[0] if seen else None


def test_cv_and_its_variants_build_exactly_the_configs_train_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for flags in _flag_sets():
        train = _captured(
            monkeypatch,
            "omnifuse_cli.engine.training.run_training",
            "train",
            "m.csv",
            "--num-classes",
            "3",
            *flags,
        )
        cv = _captured(
            monkeypatch,
            "omnifuse_cli.engine.cv.run_cv",
            "cv",
            "m.csv",
            "--num-classes",
            "3",
            *flags,
        )
        assert (train is None) == (cv is None), flags  # refused by both, or built by both
        if train is None:
            continue
        built = (train.data, train.method, train.train)
        assert (cv.base.data, cv.base.method, cv.base.train) == built, flags
        if not flags or any(f.lstrip("-").replace("-", "_") in DATA_READING for f in flags):
            continue
        quoted = " ".join(f"'{f}'" for f in flags)
        variant = _captured(
            monkeypatch,
            "omnifuse_cli.engine.cv.run_cv",
            "cv",
            "m.csv",
            "--num-classes",
            "3",
            "--variant",
            f"v={quoted}",
        )
        assert (
            variant.variants[0].data,
            variant.variants[0].method,
            variant.variants[0].train,
        ) == built, flags


def test_train_parameters_come_from_settings() -> None:
    names = [p.name for p in train_parameters()]
    assert names == [s.name for s in SETTINGS]
    assert "epochs" in names and "no_imputation" in names
    assert not set(TRAIN_ONLY) & set(names)
    # train and cv offer exactly these, with the declared flags and defaults
    for command in ("train", "cv"):
        params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
        for setting in SETTINGS:
            assert params[setting.name].default == setting.default, (command, setting.name)
            assert setting.flag.split("/")[0] in params[setting.name].opts
