"""--track on the commands: train, cv and tune run log to MLflow or TensorBoard (the tracker
itself is tested in test_tracking.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .helpers import TINY_RUN, assert_ok, flat, invoke


def _runs(uri: str) -> list:  # type: ignore[type-arg]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("omnifuse")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def test_train_tracked_in_mlflow_holds_settings_curves_scores_report_and_model(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    out = tmp_path / "run"
    result = invoke(
        "train", tiny_manifest, "--num-classes", 3, "--epochs", 3, *TINY_RUN,
        "--out-dir", out, "--track", "mlflow", "--track-uri", uri,
    )  # fmt: skip
    assert_ok(result)
    (run,) = _runs(uri)
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["image_backbone"] == "resnet18"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auroc")] == [1, 2, 3]
    saved = pd.read_csv(out / "test.csv").iloc[0]
    assert run.data.metrics["test_auroc"] == pytest.approx(saved["test_auroc"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report-figures", "model", "metrics.csv", "config.yaml"} <= names
    # The files sit beside the database, not in the folder the command ran from.
    assert list(tmp_path.glob("mlruns/*/*/artifacts/report.html"))
    assert not any(elsewhere.iterdir())


def test_cv_tracked_in_tensorboard_has_one_curve_per_fold(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    result = invoke(
        "cv", tiny_manifest, "--num-classes", 3, "--folds", 2, "--epochs", 2, *TINY_RUN,
        "--bootstrap", 20, "--out-dir", out, "--track", "tensorboard",
    )  # fmt: skip
    assert_ok(result)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"fold1/val_auroc", "fold2/val_auroc", "cv_auroc"} <= tags, tags
    assert [e.step for e in events.Scalars("fold2/val_auroc")] == [1, 2]


def test_tune_tracked_in_mlflow_has_a_child_run_per_trial(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n")
    result = invoke(
        "tune", "run", tiny_manifest, "--num-classes", 3, "--trials", 2, "--space", space,
        "--epochs", 2, *TINY_RUN, "--out-dir", tmp_path / "t", "--track", "mlflow",
        "--track-uri", uri,
    )  # fmt: skip
    assert_ok(result)
    runs = _runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, flat(result.output)
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    best = max(c.data.metrics["objective"] for c in children)
    assert parent.data.metrics["best_value"] == pytest.approx(best)
    assert all("val_auroc" in c.data.metrics for c in children)  # each trial's epochs
    names = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best.yaml", "report.html"} <= names


def test_tracking_without_the_extra_is_a_clear_error(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    result = invoke(
        "train", tiny_manifest, "--num-classes", 3, "--epochs", 1, *TINY_RUN,
        "--out-dir", tmp_path / "r", "--track", "mlflow",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "pip install 'omnifuse[mlflow]'" in result.stderr
