"""The `omnifuse` command line through typer's CliRunner: the whole flow and the error path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from omnifuse_cli import __version__
from omnifuse_cli.data.tables import normalize_id
from omnifuse_cli.errors import ManifestError

from .helpers import assert_ok, assert_user_error, flat, invoke

MODALITIES = ("labs", "us", "text")
PRED_COLUMNS = [
    "id",
    "label",
    "pred",
    "prob_0",
    "prob_1",
    "prob_2",
    "modalities",
    "weight_labs",
    "weight_us",
    "weight_text",
]
TRAIN_ARGS = [
    "--num-classes",
    "3",
    "--epochs",
    "2",
    "--image-backbone",
    "resnet18",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--no-pretrained-image",
]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """make-data -> train -> evaluate -> predict, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    data, run, preds = root / "data", root / "run", root / "predictions.csv"
    out: dict[str, Any] = {"root": root, "data": data, "run": run, "preds": preds}
    out["make_data"] = invoke("make-data", "--out-dir", data, "--n", 45, "--image-size", 48)
    out["train"] = invoke("train", data / "manifest.csv", "--out-dir", run, *TRAIN_ARGS)
    out["evaluate"] = invoke("evaluate", run, "--device", "cpu")
    out["predict"] = invoke(
        "predict", data / "manifest.csv", "--run", run, "--out", preds, "--device", "cpu"
    )
    return out


def test_flow_exit_codes_and_files(flow: dict[str, Any]) -> None:
    for step in ("make_data", "train", "evaluate", "predict"):
        assert_ok(flow[step])
    assert (flow["data"] / "manifest.csv").is_file()
    for name in (
        "metrics.csv",
        "test.csv",
        "confusion_matrix.csv",
        "split.csv",
        "meta.csv",
        "split_assignment.csv",
        "model/bundle.json",
        "model/model.safetensors",
    ):
        assert (flow["run"] / name).is_file(), name
    assert (flow["run"] / "eval" / "test" / "metrics.csv").is_file()
    assert flow["preds"].is_file()
    metrics = pd.read_csv(flow["run"] / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]


def test_train_prints_the_epoch_table_and_test_metrics(flow: dict[str, Any]) -> None:
    output = flat(flow["train"].output)
    for header in ("epoch", "fwd", "bwd", "dwfuse", "tla", "val_loss", "val_acc", "lazy"):
        assert header in output
    assert "test metrics (best checkpoint)" in output
    assert "split train/val/test = " in output
    assert "device cpu" in output
    assert str(flow["run"]) in output


def test_evaluate_reproduces_test_csv(flow: dict[str, Any]) -> None:
    test = pd.read_csv(flow["run"] / "test.csv")
    evaluated = pd.read_csv(flow["run"] / "eval" / "test" / "metrics.csv").set_index("metric")
    assert evaluated.loc["acc", "value"] == pytest.approx(test.loc[0, "test_acc"])
    assert evaluated.loc["macro_f1", "value"] == pytest.approx(test.loc[0, "test_macro_f1"])
    output = flat(flow["evaluate"].output)
    assert "accuracy" in output and "macro-F1" in output
    assert f"{test.loc[0, 'test_acc']:.3f}" in output
    n_test = int(pd.read_csv(flow["run"] / "split.csv").set_index("split").loc["test", "n"])
    assert f"({n_test} patients)" in output


def test_predictions_csv(flow: dict[str, Any]) -> None:
    preds = pd.read_csv(flow["preds"], dtype={"id": str, "pred": str}, keep_default_na=False)
    assert list(preds.columns) == [*PRED_COLUMNS, "reason"]  # reason: why a row has no pred
    assert (preds["reason"] == "").all()
    manifest = pd.read_csv(flow["data"] / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(preds) == len(manifest) == 45
    assert preds["id"].tolist() == [normalize_id(i) for i in manifest["id"]]
    assert preds["label"].astype(int).tolist() == manifest["label"].astype(int).tolist()
    probs = preds[["prob_0", "prob_1", "prob_2"]].to_numpy(dtype=float)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert preds["pred"].tolist() == [str(c) for c in probs.argmax(axis=1)]
    columns = [m for m in MODALITIES if m in manifest.columns]
    expected = ["+".join(m for m in columns if row[m].strip()) for _, row in manifest.iterrows()]
    assert preds["modalities"].tolist() == expected
    weights = preds[["weight_labs", "weight_us", "weight_text"]].to_numpy(dtype=float)
    # Observed modalities always count; an imputed slot counts its reliability (0 when
    # imputation has not earned it, method.md Sec. 5.1).
    observed = np.array(
        [[m in str(s).split("+") for m in ("labs", "us", "text")] for s in preds["modalities"]]
    )
    assert ((weights >= 0) & (weights <= 1)).all() and (weights[observed] > 0).all()
    assert "predictions (45 patients, first 20 shown)" in flat(flow["predict"].output)


def test_predict_without_run_uses_the_newest_run(
    flow: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    old = shutil.copytree(flow["run"], runs / "run-old")
    new = shutil.copytree(flow["run"], runs / "run-new")
    now = flow["run"].joinpath("model", "bundle.json").stat().st_mtime
    os.utime(Path(old) / "model" / "bundle.json", (now + 100, now + 100))
    os.utime(Path(new) / "model" / "bundle.json", (now + 200, now + 200))
    monkeypatch.chdir(tmp_path)
    result = invoke("predict", flow["data"] / "manifest.csv", "--device", "cpu")
    assert_ok(result)
    assert "using the newest run" in result.output
    assert str(Path("runs") / "run-new") in result.output
    assert "run-old" not in result.output
    written = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    reference = pd.read_csv(flow["preds"], keep_default_na=False)
    pd.testing.assert_frame_equal(written, reference)


def test_predict_without_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flow: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("predict", flow["data"] / "manifest.csv")
    assert_user_error(result, "no trained run found", "--run")
    assert not (tmp_path / "predictions.csv").exists()


def test_train_with_the_manifest_option_works_like_the_argument(
    flow: dict[str, Any], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = invoke(
        "train", "--manifest", flow["data"] / "manifest.csv", "--out-dir", run, *TRAIN_ARGS
    )
    assert_ok(result)
    # Same data, options and seed: the same split and the same test metrics.
    for name in ("split_assignment.csv", "test.csv", "confusion_matrix.csv"):
        assert (run / name).read_text() == (flow["run"] / name).read_text(), name


# -- errors -----------------------------------------------------------------------------------


def test_nonexistent_manifest(tmp_path: Path) -> None:
    result = invoke("train", tmp_path / "nope.csv", "--out-dir", tmp_path / "run", *TRAIN_ARGS)
    lines = assert_user_error(result, "nope.csv does not exist")
    assert len(lines) <= 2  # the message and its hint
    assert lines[0].startswith("error: manifest")
    assert not (tmp_path / "run").exists()


def test_train_prints_nothing_before_a_user_error(tmp_path: Path) -> None:
    # A bad manifest is found before any training: the user should see the error alone, not
    # an empty epoch table and a stalled progress bar (with the error glued to it in logs).
    result = invoke("train", tmp_path / "nope.csv", "--out-dir", tmp_path / "run", *TRAIN_ARGS)
    assert_user_error(result, "does not exist")
    assert result.stdout.strip() == "", result.stdout


def test_label_out_of_range_for_num_classes(flow: dict[str, Any], tmp_path: Path) -> None:
    args = ["--num-classes", "2", *TRAIN_ARGS[2:]]
    assert TRAIN_ARGS[:2] == ["--num-classes", "3"]
    result = invoke("train", flow["data"] / "manifest.csv", "--out-dir", tmp_path / "run", *args)
    assert_user_error(result, "is outside 0..1 (--num-classes)", "column 'label'")


def test_non_empty_out_dir_without_overwrite(flow: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    result = invoke("train", flow["data"] / "manifest.csv", "--out-dir", out, *TRAIN_ARGS)
    assert_user_error(result, "already exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = invoke("make-data", "--out-dir", out, "--n", 45)
    assert_user_error(result, "already exists and is not empty")


def test_two_different_manifests_or_none(flow: dict[str, Any], tmp_path: Path) -> None:
    manifest = flow["data"] / "manifest.csv"
    result = invoke("train", manifest, "--manifest", tmp_path / "other.csv", *TRAIN_ARGS)
    assert_user_error(result, "two manifests given")
    assert_user_error(invoke("train", *TRAIN_ARGS), "no manifest given")


def test_evaluate_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    assert_user_error(invoke("evaluate", tmp_path / "missing"), "does not exist")
    assert_user_error(invoke("evaluate", tmp_path), "is not an omnifuse run")


def test_bad_option_values_are_user_errors(flow: dict[str, Any], tmp_path: Path) -> None:
    args = [*TRAIN_ARGS, "--train-ratio", "0.9"]
    result = invoke("train", flow["data"] / "manifest.csv", "--out-dir", tmp_path / "r", *args)
    assert_user_error(result, "must be 1")
    result = invoke(
        "train",
        flow["data"] / "manifest.csv",
        "--out-dir",
        tmp_path / "r",
        *TRAIN_ARGS,
        "--modality",
        "ct",
    )
    assert_user_error(result, "is not NAME=KIND")


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = invoke("--debug", "train", tmp_path / "nope.csv", *TRAIN_ARGS)
    assert isinstance(result.exception, ManifestError)
    # The switch does not stick to later commands in the same process.
    result = invoke("evaluate", tmp_path / "missing")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)


# -- small commands ---------------------------------------------------------------------------


def test_version() -> None:
    result = invoke("--version")
    assert_ok(result)
    assert result.output.strip() == f"omnifuse {__version__}"


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert_ok(result)
    for command in ("synth", "make-data", "train", "evaluate", "predict"):
        assert command in result.output


def test_synth_prints_the_loss_columns() -> None:
    result = invoke("synth", "--epochs", 2, "--n", 120)
    assert_ok(result)
    output = result.output
    for header in (
        "epoch",
        "loss",
        "fwd",
        "bwd",
        "dwfuse",
        "tla",
        "val_loss",
        "val_acc",
        "val_F1",
        "lazy",
    ):
        assert header in output
    assert "synthetic cohort: 120 patients" in output
    assert "test metrics" in output
    rows = [
        line.split()
        for line in output.splitlines()
        if line.split()[:1] in (["1"], ["1*"], ["2"], ["2*"])
    ]
    assert [r[0].rstrip("*") for r in rows] == ["1", "2"]
    for row in rows:
        fwd, bwd, dwfuse = (float(v) for v in row[2:5])
        assert fwd > 0 and bwd > 0 and dwfuse > 0


def test_check_audits_a_manifest(tiny_manifest: Path, tmp_path: Path) -> None:
    result = invoke(
        "check",
        tiny_manifest,
        "--num-classes",
        3,
        "--train-ratio",
        0.6,
        "--val-ratio",
        0.2,
        "--test-ratio",
        0.2,
    )
    assert_ok(result)
    assert f"ok: 30 patients, ready for `omnifuse train {tiny_manifest} --num-classes 3`" in flat(
        result.output
    )
    # The suggested command carries the data flags check was given, ready to paste.
    result = invoke(
        "check",
        tiny_manifest,
        "--num-classes",
        3,
        "--modality",
        "labs=vector",
        "--modality",
        "us=image",
        "--modality",
        "text=text",
        "--on-bad-file",
        "skip",
    )
    assert_ok(result)
    assert (
        f"ready for `omnifuse train {tiny_manifest} --num-classes 3 --modality labs=vector "
        "--modality us=image --modality text=text --on-bad-file skip`"
    ) in flat(result.output)
    unlabelled = tmp_path / "m.csv"
    unlabelled.write_text('id,label,labs\n1,,"[1]"\n2,,"[2]"\n', encoding="utf-8")
    result = invoke("check", unlabelled, "--modality", "labs=vector")
    assert result.exit_code == 2
    assert "not trainable: no patient has a label" in flat(result.stderr)
    assert "Traceback" not in result.output
