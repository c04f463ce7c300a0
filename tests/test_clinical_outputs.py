"""Clinical-grade outputs through the commands users run: the temperature, operating point and
conformal scores a run fits on validation, what evaluate / predict / cv write from them, class
weights, subgroups, and runs trained before any of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import Result

from omnifuse_cli.engine.calibration import fit_temperature
from omnifuse_cli.engine.conformal import ConformalCalibration
from omnifuse_cli.engine.metrics import expected_calibration_error
from omnifuse_cli.engine.posthoc import PostHoc, class_weights, fit_posthoc
from omnifuse_cli.engine.thresholds import choose_threshold, decision_curve, parse_threshold_rule

from .helpers import assert_ok, invoke

N = 320
COMMON = [
    "--modality",
    "labs=vector",
    "--modality",
    "text=text",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--batch-size",
    "32",
    "--seed",
    "0",
]
SPLIT = ["--train-ratio", "0.5", "--val-ratio", "0.25", "--test-ratio", "0.25"]


def ok(*args: object) -> Result:
    result = invoke(*args)
    assert_ok(result)
    return result


def write_binary_cohort(root: Path, n: int = N, seed: int = 0) -> Path:
    """Labs + inline English notes, a 35% positive class with overlapping signal (so a model is
    imperfect and calibration has something to do), plus sex, age and site columns."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    rows = []
    for i in range(n):
        labs = np.round(rng.normal(0.8 * y[i], 1.0, 4), 3).tolist()
        word = rng.choice(
            ["mass irregular", "calcified spiculated"] if y[i] else ["smooth benign", "cyst simple"]
        )
        if rng.random() < 0.3:
            word = rng.choice(["mass irregular", "smooth benign", "cyst simple"])
        rows.append(
            {
                "id": f"P{i:04d}",
                "label": int(y[i]),
                "labs": json.dumps(labs) if rng.random() > 0.1 else "",
                "text": f"ultrasound shows {word} lesion"
                if rng.random() > 0.1
                else ("" if rng.random() > 0.5 else "no comment"),
                "sex": rng.choice(["F", "M"]),
                "age": int(rng.integers(20, 90)),
                "site": rng.choice(["A", "B", "C"], p=[0.6, 0.32, 0.08]),
            }
        )
    frame = pd.DataFrame(rows)
    frame.loc[(frame["labs"] == "") & (frame["text"] == ""), "text"] = "routine visit"
    path = root / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("binary")
    manifest = write_binary_cohort(root)
    run = root / "run"
    ok("train", manifest, "--num-classes", "2", "--out-dir", run, "--epochs", "4", *COMMON, *SPLIT)
    ok(
        "evaluate",
        run,
        "--subgroup-col",
        "sex",
        "--subgroup-col",
        "age:q4",
        "--subgroup-col",
        "site",
        "--bootstrap",
        "100",
        "--threads",
        "1",
    )
    return {"root": root, "manifest": manifest, "run": run, "eval": run / "eval" / "test"}


def _bundle(run: Path) -> dict[str, Any]:
    return json.loads((run / "model" / "bundle.json").read_text(encoding="utf-8"))


def _val_raw(run: Path, manifest: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation patients scored through evaluate (raw = before calibration)."""
    split = pd.read_csv(run / "split_assignment.csv", dtype={"id": str})
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    val = frame[frame["id"].isin(split.loc[split["split"] == "val", "id"])]
    path = root / "val.csv"
    val.to_csv(path, index=False)
    out = root / "val_eval"
    ok("evaluate", run, "--manifest", path, "--out-dir", out, "--bootstrap", "0", "--threads", "1")
    preds = pd.read_csv(out / "predictions.csv")
    return preds["label"].to_numpy(), preds[["raw_prob_0", "raw_prob_1"]].to_numpy()


def test_train_fits_temperature_and_threshold_on_validation(
    binary_run: dict[str, Path], tmp_path: Path
) -> None:
    posthoc = PostHoc.from_bundle(_bundle(binary_run["run"]))
    assert posthoc.calibration == "temperature" and posthoc.positive == 1
    assert posthoc.validation_patients == N // 4
    meta = pd.read_csv(binary_run["run"] / "meta.csv", header=None, index_col=0)[1]
    assert float(meta["temperature"]) == pytest.approx(posthoc.temperature, abs=1e-5)
    assert meta["threshold_rule"] == "youden"
    # Without the linear path the validation predictions are the final model's: the stored
    # temperature is their log-loss optimum and the threshold their Youden point.
    run = tmp_path / "plain"
    ok(
        "train",
        binary_run["manifest"],
        "--num-classes",
        "2",
        "--out-dir",
        run,
        "--epochs",
        "3",
        "--no-linear-path",
        *COMMON,
        *SPLIT,
    )
    posthoc = PostHoc.from_bundle(_bundle(run))
    y, raw = _val_raw(run, binary_run["manifest"], tmp_path)
    assert posthoc.temperature == pytest.approx(fit_temperature(np.log(raw), y), rel=1e-3)
    calibrated = posthoc.probabilities(np.log(raw))
    threshold, met = choose_threshold(y == 1, calibrated[:, 1], parse_threshold_rule("youden"))
    assert met and posthoc.threshold == pytest.approx(threshold, abs=1e-6)


def test_with_a_linear_path_calibration_uses_its_out_of_sample_predictions() -> None:
    """The path is refitted on training + validation patients; calibrating on the refitted
    model's validation predictions (in-sample) made test probabilities overconfident."""
    from omnifuse_cli.config import TrainConfig
    from omnifuse_cli.engine.finishing import fit_finish
    from omnifuse_cli.engine.linear_path import LinearFit

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    logits = np.stack([np.zeros(100), 2.5 * (2 * y - 1) + rng.normal(0, 2.5, 100)], 1)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))

    class Data:
        labels = torch.as_tensor(np.r_[np.zeros(50, dtype=np.int64), y])

    fit = LinearFit(
        C=1.0,
        blend_omnifuse=1.0,
        blend_linear=1.0,
        features=1,
        patients=1,
        val_log_loss_omnifuse=0.0,
        val_log_loss_blend=0.0,
        val_log_probs=log_probs,
        val_index=np.arange(50, 150),
    )
    posthoc = fit_finish(
        None,
        Data(),
        {"val": np.arange(50, 150)},  # type: ignore[arg-type]
        TrainConfig(),
        torch.device("cpu"),
        ["0", "1"],
        fit,
    )
    assert posthoc.temperature == pytest.approx(fit_temperature(log_probs, y), rel=1e-4)
    assert posthoc.validation_patients == 100


def test_evaluate_files_agree_with_hand_computations(binary_run: dict[str, Path]) -> None:
    ev = binary_run["eval"]
    posthoc = PostHoc.from_bundle(_bundle(binary_run["run"]))
    preds = pd.read_csv(
        ev / "predictions.csv", dtype={"id": str, "set": str}, keep_default_na=False
    )
    y = preds["label"].to_numpy()
    probs = preds[["prob_0", "prob_1"]].to_numpy()
    raw = preds[["raw_prob_0", "raw_prob_1"]].to_numpy()
    # Calibrated probabilities are the raw ones at the run's temperature; pred is the threshold.
    np.testing.assert_allclose(probs, posthoc.probabilities(np.log(raw)), atol=1e-6)
    assert (preds["pred"].astype(int) == (probs[:, 1] >= posthoc.threshold)).all()
    calib = pd.read_csv(ev / "calibration.csv").set_index("metric")
    assert calib.loc["ece", "after"] == pytest.approx(expected_calibration_error(y, probs))
    assert calib.loc["ece", "before"] == pytest.approx(expected_calibration_error(y, raw))
    assert {"cal_intercept", "cal_slope", "brier", "loss"} <= set(calib.index)
    op = pd.read_csv(ev / "operating_point.csv").set_index("metric")["value"]
    called = preds["pred"].astype(int) == 1
    tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
    assert op["sensitivity"] == pytest.approx(tp / (y == 1).sum())
    assert op["specificity"] == pytest.approx(((~called) & (y == 0)).sum() / (y == 0).sum())
    assert op["ppv"] == pytest.approx(tp / (tp + fp))
    assert op["threshold"] == pytest.approx(posthoc.threshold)
    ops = pd.read_csv(ev / "operating_point.csv")
    sens = ops[ops["metric"] == "sensitivity"].iloc[0]
    assert sens["ci_low"] <= sens["value"] <= sens["ci_high"]
    curve = pd.read_csv(ev / "decision_curve.csv")
    expected = decision_curve(y == 1, probs[:, 1])
    np.testing.assert_allclose(curve["net_benefit"], expected["net_benefit"])
    at = curve[curve["threshold"] == 0.3].iloc[0]
    n_pos = probs[:, 1] >= 0.3
    hand = ((n_pos & (y == 1)).sum() - (n_pos & (y == 0)).sum() * 0.3 / 0.7) / len(y)
    assert at["net_benefit"] == pytest.approx(hand)
    # Conformal coverage: the share of patients whose set holds their label, by hand.
    cov = pd.read_csv(ev / "coverage.csv", keep_default_na=False)
    held = [str(label) in cell.split("|") for label, cell in zip(y, preds["set"], strict=True)]
    overall = cov[cov["by"] == "all"].iloc[0]
    assert overall["coverage"] == pytest.approx(np.mean(held)) and overall["alpha"] == 0.1
    assert set(cov["by"]) == {"all", "class", "pattern"}


def test_subgroups_cover_every_test_patient(binary_run: dict[str, Path]) -> None:
    ev = binary_run["eval"]
    table = pd.read_csv(ev / "subgroups.csv", keep_default_na=False)
    n_test = len(pd.read_csv(ev / "predictions.csv"))
    for column in ("sex", "age:q4", "site"):
        assert table.loc[table["column"] == column, "n"].sum() == n_test
    assert len(table[table["column"] == "age:q4"]) == 4
    small = table[table["column"] == "site"].set_index("group")
    assert bool(small.loc["C", "small"])  # 8% of 80 test patients
    gaps = pd.read_csv(ev / "subgroup_gaps.csv")
    assert {"auroc", "sensitivity"} <= set(gaps["metric"])
    result = invoke(
        "evaluate",
        binary_run["run"],
        "--subgroup-col",
        "site",
        "--bootstrap",
        "0",
        "--threads",
        "1",
        "--out-dir",
        binary_run["root"] / "site",
    )
    assert result.exit_code == 0
    assert "site = C has" in result.output and "under 30" in result.output


def test_subgroup_errors_name_the_column(binary_run: dict[str, Path]) -> None:
    result = invoke(
        "evaluate",
        binary_run["run"],
        "--subgroup-col",
        "ethnicity",
        "--bootstrap",
        "0",
        "--threads",
        "1",
    )
    assert result.exit_code == 2 and "ethnicity" in result.output
    result = invoke(
        "evaluate",
        binary_run["run"],
        "--subgroup-col",
        "sex:q4",
        "--bootstrap",
        "0",
        "--threads",
        "1",
    )
    assert result.exit_code == 2 and "sex" in result.output


def test_predict_writes_decisions_and_conformal_sets(binary_run: dict[str, Path]) -> None:
    out = binary_run["root"] / "pred.csv"
    ok(
        "predict",
        binary_run["manifest"],
        "--run",
        binary_run["run"],
        "--out",
        out,
        "--conformal",
        "0.2",
        "--threads",
        "1",
    )
    preds = pd.read_csv(out, dtype={"set": str}, keep_default_na=False)
    posthoc = PostHoc.from_bundle(_bundle(binary_run["run"]))
    assert (preds["pred"].astype(int) == (preds["prob_1"] >= posthoc.threshold)).all()
    assert posthoc.conformal is not None
    q = posthoc.conformal.quantiles(0.2)
    expect = [
        "|".join(str(c) for c in (0, 1) if 1 - row[c] <= q[c])
        for row in preds[["prob_0", "prob_1"]].to_numpy()
    ]
    assert preds["set"].tolist() == expect
    plain = binary_run["root"] / "plain.csv"
    ok(
        "predict",
        binary_run["manifest"],
        "--run",
        binary_run["run"],
        "--out",
        plain,
        "--threads",
        "1",
    )
    assert "set" not in pd.read_csv(plain).columns


def test_a_run_from_before_posthoc_still_evaluates_and_predicts(
    binary_run: dict[str, Path], tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(binary_run["run"], old, ignore=shutil.ignore_patterns("eval"))
    meta = _bundle(old)
    del meta["posthoc"]
    (old / "model" / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    result = ok("evaluate", old, "--bootstrap", "0", "--threads", "1")
    assert "trained before calibration" in result.output
    preds = pd.read_csv(old / "eval" / "test" / "predictions.csv")
    probs = preds[["prob_0", "prob_1"]].to_numpy()
    np.testing.assert_allclose(probs, preds[["raw_prob_0", "raw_prob_1"]].to_numpy(), atol=1e-6)
    assert (preds["pred"] == probs.argmax(1)).all()
    assert not (old / "eval" / "test" / "operating_point.csv").exists()
    result = invoke(
        "predict",
        binary_run["manifest"],
        "--run",
        old,
        "--out",
        tmp_path / "p.csv",
        "--conformal",
        "0.1",
        "--threads",
        "1",
    )
    assert result.exit_code == 2 and "no conformal calibration" in result.output
    ok("report", old)


def test_calibrate_none_and_other_rules(tmp_path: Path) -> None:
    manifest = write_binary_cohort(tmp_path, n=200, seed=1)
    run = tmp_path / "run"
    ok(
        "train",
        manifest,
        "--num-classes",
        "2",
        "--out-dir",
        run,
        "--epochs",
        "2",
        "--calibrate",
        "none",
        "--threshold",
        "sens=0.9",
        "--class-weight",
        "balanced",
        *COMMON,
        *SPLIT,
    )
    posthoc = PostHoc.from_bundle(_bundle(run))
    assert posthoc.temperature == 1.0 and posthoc.calibration == "none"
    assert posthoc.rule == "sens=0.9" and posthoc.threshold is not None


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--positive-class", "7"], "--positive-class '7'"),
        (["--threshold", "sens=1.5"], "--threshold"),
        (["--threshold", "median"], "youden"),
        (["--class-weight", "1,2,3"], "3 weight(s) for 2 classes"),
        (["--class-weight", "heavy"], "--class-weight"),
        (["--calibrate", "platt"], "--calibrate"),
    ],
)
def test_bad_clinical_options_are_refused_before_training(
    tmp_path: Path, flags: list[str], words: str
) -> None:
    manifest = write_binary_cohort(tmp_path, n=60)
    result = invoke(
        "train",
        manifest,
        "--num-classes",
        "2",
        "--out-dir",
        tmp_path / "r",
        "--epochs",
        "1",
        *COMMON,
        *flags,
    )
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (tmp_path / "r" / "model").exists()


def test_small_validation_is_not_calibrated_and_says_so(trained_run: Any) -> None:
    run, result = trained_run
    posthoc = PostHoc.from_bundle(_bundle(run))
    assert posthoc.calibration == "none" and posthoc.temperature == 1.0
    assert any("not calibrated" in note for note in posthoc.notes)
    assert posthoc.threshold is None  # three classes, no --positive-class


def test_balanced_class_weights_follow_scikit_learn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    weights = class_weights("balanced", y, 3)
    sk = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(weights / weights[0], sk / sk[0])
    assert np.mean(weights[y]) == pytest.approx(1.0)  # the average patient weighs 1
    explicit = class_weights("1,2,4", y, 3)
    np.testing.assert_allclose(explicit / explicit[0], [1, 2, 4])
    assert class_weights("none", y, 3) is None


def test_class_weight_enters_every_label_loss() -> None:
    from omnifuse_cli.model.fusion import dwfuse_loss

    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(6, 3, 2), -1)
    joint = torch.log_softmax(torch.randn(6, 2), -1)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    w = torch.tensor([1.0, 3.0])[y]
    plain = [
        dwfuse_loss(log_probs[i : i + 1], joint[i : i + 1], y[i : i + 1], alpha=1.0, beta=1.0)[0]
        for i in range(6)
    ]
    weighted, _ = dwfuse_loss(log_probs, joint, y, alpha=1.0, beta=1.0, sample_weight=w)
    assert float(weighted) == pytest.approx(
        float(sum(p * wi for p, wi in zip(plain, w, strict=True)) / 6)
    )


def test_fit_posthoc_one_vs_rest_for_a_chosen_class() -> None:
    from omnifuse_cli.config import TrainConfig

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 3)) * 3
    y = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in logits / 3])
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    posthoc = fit_posthoc(
        log_probs, y, TrainConfig(positive_class="2", threshold="spec=0.9"), ["0", "1", "2"]
    )
    assert posthoc.positive == 2 and posthoc.temperature == pytest.approx(3.0, rel=0.25)
    probs = posthoc.probabilities(log_probs)
    pred = posthoc.decide(probs)
    called = probs[:, 2] >= posthoc.threshold
    assert (pred[called] == 2).all() and (pred[~called] != 2).all()
    assert ((~called) & (y != 2)).sum() / (y != 2).sum() >= 0.9  # the specificity target
    again = PostHoc.from_dict(json.loads(json.dumps(posthoc.to_dict())))
    np.testing.assert_array_equal(again.decide(probs), pred)
    assert isinstance(again.conformal, ConformalCalibration)


def test_cv_pools_the_clinical_outputs(tmp_path: Path) -> None:
    manifest = write_binary_cohort(tmp_path, n=240, seed=2)
    out = tmp_path / "cv"
    ok(
        "cv",
        manifest,
        "--num-classes",
        "2",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--out-dir",
        out,
        "--subgroup-col",
        "sex",
        "--bootstrap",
        "50",
        *COMMON,
        "--train-ratio",
        "0.6",
        "--val-ratio",
        "0.4",
        "--test-ratio",
        "0",
    )
    for name in (
        "calibration",
        "operating_point",
        "decision_curve",
        "coverage",
        "subgroups",
        "subgroup_gaps",
    ):
        assert (out / f"{name}.csv").is_file(), name
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert {"raw_prob_1", "threshold", "set"} <= set(preds.columns)
    op = pd.read_csv(out / "operating_point.csv").set_index("metric")["value"]
    y, called = preds["label"].astype(int), preds["pred"].astype(int) == 1
    assert op["sensitivity"] == pytest.approx((called & (y == 1)).sum() / (y == 1).sum())
    # Each fold decides at its own threshold.
    for _, fold in preds.groupby("fold"):
        t = fold["threshold"].iloc[0]
        assert ((fold["prob_1"] >= t) == (fold["pred"].astype(int) == 1)).all()
    metrics = pd.read_csv(out / "metrics.csv")
    acc = metrics[(metrics["metric"] == "acc")]["value"].iloc[0]
    assert acc == pytest.approx((preds["pred"].astype(int) == y).mean())
