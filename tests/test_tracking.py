"""Run tracking (engine/tracking.py): what a run's progress events, settings, scores and files
become in MLflow and in TensorBoard, read back with each backend's own reader; run status from
the context manager; the missing-extra errors; and that importing the module loads neither."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import environment_variables
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from omnifuse_cli import __version__
from omnifuse_cli.engine.cv import FoldResult
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.engine.fitting import EpochRecord
from omnifuse_cli.engine.tracking import TRACK_KINDS, open_tracker, param_text
from omnifuse_cli.errors import ConfigError, TrainingInterrupted

# Every number an epoch's row holds but its epoch and best flag; "tla_labs+us" loses its "+",
# which MLflow refuses in a name.
EPOCH_METRICS = {
    "train_loss",
    "val_loss",
    "val_acc",
    "val_macro_f1",
    "val_auroc",
    "loss_ce",
    "loss_cra",
    "tla_labs_us",
    "reliability_us",
    "seconds",
}
AUROCS = (0.6, 0.7, 0.65)


def record(epoch: int, auroc: float) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        phase="frozen",
        train_loss=1.0 / epoch,
        losses={"ce": 0.5 / epoch, "cra": 0.25},
        val_loss=0.9 / epoch,
        val_acc=0.5,
        val_macro_f1=0.4,
        val_auroc=auroc,
        lazy_combo="labs+us",
        tla_distances={"labs+us": 0.2 * epoch},
        seconds=0.125,
        is_best=epoch == 2,
        reliability={"us": 0.75},
    )


def epoch_event(epoch: int, auroc: float) -> ProgressEvent:
    return ProgressEvent("epoch", epoch, 3, record=record(epoch, auroc))


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A folder tracking URI: MLflow 3.18 writes to one only with MLFLOW_ALLOW_FILE_STORE."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_run_holds_params_epoch_curves_final_scores_and_files(
    file_store: str, tmp_path: Path
) -> None:
    bundle = tmp_path / "run" / "bundle"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "model.json").write_text("{}")
    (bundle / "sub" / "weights.bin").write_bytes(b"\0")
    table = tmp_path / "run" / "metrics.csv"
    table.write_text("metric,value\nauroc,0.8\n")

    tracker = open_tracker("mlflow", uri=file_store, run_name="tiny", out_dir=tmp_path / "run")
    tracker.log_params(
        {"epochs": 3, "lr": 0.001, "pretrained": None, "views": ["us", "ct"], "note": "x" * 7000}
    )
    for epoch, auroc in enumerate(AUROCS, start=1):
        tracker.on_event(epoch_event(epoch, auroc))
    tracker.on_event(ProgressEvent("message", text="not a metric"))
    tracker.on_event(ProgressEvent("batch", 1, 4))
    tracker.log_metrics({"test_auroc": 0.8, "test_brier": math.nan, "test_ece": math.inf})
    tracker.log_artifacts([bundle, table])
    tracker.set_tags({"omnifuse.command": "train"})
    trial = tracker.child("trial-0")
    trial.log_metrics({"val_auroc": 0.5}, step=1)
    trial.finish()
    tracker.finish()
    tracker.finish("FAILED")  # a second finish changes nothing

    client = MlflowClient(tracking_uri=file_store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    params = dict(run.data.params)
    note = params.pop("note")
    assert params == {"epochs": "3", "lr": "0.001", "pretrained": "None", "views": "us,ct"}
    assert len(note) <= 6000 and note.startswith("xxx") and note.endswith("...")
    assert set(run.data.metrics) == EPOCH_METRICS | {"test_auroc"}
    assert history(client, tracker.run_id, "val_auroc") == list(enumerate(AUROCS, start=1))
    assert history(client, tracker.run_id, "tla_labs_us") == [(e, 0.2 * e) for e in (1, 2, 3)]
    assert history(client, tracker.run_id, "test_auroc") == [(0, 0.8)]
    assert sorted(f.path for f in client.list_artifacts(tracker.run_id)) == [
        "bundle",
        "metrics.csv",
    ]
    assert sorted(f.path for f in client.list_artifacts(tracker.run_id, "bundle")) == [
        "bundle/model.json",
        "bundle/sub",
    ]
    tags = run.data.tags
    assert tags["mlflow.runName"] == "tiny"
    assert tags["omnifuse.version"] == __version__
    assert tags["omnifuse.out_dir"] == str(tmp_path / "run")
    assert tags["omnifuse.command"] == "train"
    assert tracker.run_id in tracker.where and file_store in tracker.where

    child = client.get_run(trial.run_id)
    assert child.data.tags["mlflow.parentRunId"] == tracker.run_id
    assert child.data.tags["mlflow.runName"] == "trial-0"
    assert child.info.experiment_id == run.info.experiment_id
    assert child.info.status == "FINISHED"
    assert history(client, trial.run_id, "val_auroc") == [(1, 0.5)]


# SQLAlchemy 2.1 deprecates a loader strategy MLflow's database store still declares.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.store.tracking.sqlalchemy_store")
def test_mlflow_default_is_a_sqlite_database_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    table = tmp_path / "metrics.csv"
    table.write_text("auroc\n0.8\n")
    with open_tracker("mlflow", uri=None, run_name="tiny", out_dir=tmp_path / "run") as tracker:
        tracker.on_event(epoch_event(1, 0.6))
        tracker.log_artifacts([table])
    database = tmp_path / "mlflow.db"
    assert database.is_file()
    uri = f"sqlite:///{database.as_posix()}"
    assert tracker.where.startswith(uri)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert history(client, tracker.run_id, "val_auroc") == [(1, 0.6)]
    # MLflow's default artifact root, absolute at the experiment's creation: ./mlruns
    assert list(tmp_path.glob(f"mlruns/*/{tracker.run_id}/artifacts/metrics.csv"))


def test_mlflow_without_a_uri_follows_mlflow_tracking_uri(
    file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", file_store)
    with open_tracker("mlflow", uri=None, run_name="tiny", out_dir=tmp_path) as tracker:
        tracker.log_metrics({"test_auroc": 0.8})
    assert not (tmp_path / "mlflow.db").exists()
    assert MlflowClient(file_store).get_run(tracker.run_id).data.metrics == {"test_auroc": 0.8}


def test_mlflow_file_store_without_opt_in_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip(f"MLflow {mlflow.__version__} still writes file stores unasked")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(ConfigError, match="no longer tracks to a folder") as caught:
        open_tracker("mlflow", uri=uri, run_name="tiny", out_dir=tmp_path)
    assert caught.value.hint is not None and "sqlite:///" in caught.value.hint
    assert "MLFLOW_ALLOW_FILE_STORE=true" in caught.value.hint


def test_mlflow_experiment_created_meanwhile_by_another_process_is_used(
    file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = MlflowClient.get_experiment_by_name
    looks: list[str] = []

    def racing(self: MlflowClient, name: str) -> object:
        looks.append(name)
        if len(looks) == 1:  # not there yet; another process creates it before we do
            MlflowClient(file_store).create_experiment(name)
            return None
        return real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racing)
    tracker = open_tracker(
        "mlflow", uri=file_store, run_name="tiny", out_dir=tmp_path, experiment="shared"
    )
    tracker.finish()
    monkeypatch.undo()
    client = MlflowClient(file_store)
    shared = client.get_experiment_by_name("shared")
    assert shared is not None and looks == ["shared", "shared"]
    assert client.get_run(tracker.run_id).info.experiment_id == shared.experiment_id


def test_mlflow_deleted_experiment_is_a_config_error(file_store: str, tmp_path: Path) -> None:
    client = MlflowClient(file_store)
    experiment_id = client.create_experiment("omnifuse")
    client.delete_experiment(experiment_id)
    with pytest.raises(ConfigError, match="'omnifuse' was deleted") as caught:
        open_tracker("mlflow", uri=file_store, run_name="tiny", out_dir=tmp_path)
    assert caught.value.hint is not None and experiment_id in caught.value.hint


def test_cv_folds_get_their_own_curves_and_one_chart_per_fold_score(
    file_store: str, tmp_path: Path
) -> None:
    curves = {1: (0.6, 0.62), 2: (0.7, 0.75)}
    scores = {1: 0.61, 2: 0.74}
    tracker = open_tracker("mlflow", uri=file_store, run_name="cv", out_dir=tmp_path)
    # As cv/run.py emits them: `fold` carries the number of folds before it, `fold-done` the
    # number done with it; the final --refit model trains after a `refit` event.
    for done in (0, 1):
        n = done + 1
        tracker.on_event(ProgressEvent("fold", done, 3, text=f"base rep 1 fold {n}"))
        for epoch, auroc in enumerate(curves[n], start=1):
            tracker.on_event(epoch_event(epoch, auroc))
        result = FoldResult("base", 1, n, 12, 4, 6, 2, {"auroc": scores[n], "ece": math.nan}, 1.5)
        tracker.on_event(ProgressEvent("fold-done", n, 3, fold=result))
    tracker.on_event(ProgressEvent("refit", 2, 3, text="final model on all patients"))
    tracker.on_event(epoch_event(1, 0.9))
    tracker.finish()

    client = MlflowClient(file_store)
    run_id = tracker.run_id
    assert history(client, run_id, "fold1/val_auroc") == [(1, 0.6), (2, 0.62)]
    assert history(client, run_id, "fold2/val_auroc") == [(1, 0.7), (2, 0.75)]
    assert history(client, run_id, "refit/val_auroc") == [(1, 0.9)]
    assert history(client, run_id, "fold_auroc") == [(1, 0.61), (2, 0.74)]
    assert history(client, run_id, "fold_best_epoch") == [(1, 2.0), (2, 2.0)]
    metrics = set(client.get_run(run_id).data.metrics)
    assert "val_auroc" not in metrics and "fold_ece" not in metrics
    assert {f"fold2/{name}" for name in EPOCH_METRICS} <= metrics


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (RuntimeError("boom"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (TrainingInterrupted("stopped after epoch 1"), "KILLED"),
    ],
)
def test_context_manager_finishes_the_run_with_its_status(
    file_store: str, tmp_path: Path, error: BaseException | None, status: str
) -> None:
    raises = pytest.raises(type(error)) if error is not None else contextlib.nullcontext()
    with raises:
        with open_tracker("mlflow", uri=file_store, run_name="r", out_dir=tmp_path) as tracker:
            assert MlflowClient(file_store).get_run(tracker.run_id).info.status == "RUNNING"
            if error is not None:
                raise error
    tracker.finish("FAILED")  # already finished: no change
    assert MlflowClient(file_store).get_run(tracker.run_id).info.status == status


def _hparams(accumulator: EventAccumulator) -> plugin_data_pb2.HParamsPluginData:
    content = accumulator.PluginTagToContent("hparams")
    return plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])


def _text(accumulator: EventAccumulator, tag: str) -> str:
    value: bytes = accumulator.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0]
    return value.decode()


def test_tensorboard_log_dir_holds_curves_settings_files_and_hparams(tmp_path: Path) -> None:
    table = tmp_path / "run" / "metrics.csv"
    table.parent.mkdir()
    table.write_text("auroc\n0.8\n")
    tracker = open_tracker("tensorboard", uri=None, run_name="tiny", out_dir=tmp_path / "run")
    log_dir = tmp_path / "run" / "tensorboard"
    assert tracker.where == tracker.run_id == str(log_dir)
    tracker.log_params({"lr": 0.001, "views": ["us", "ct"], "pretrained": None, "amp": True})
    for epoch, auroc in enumerate(AUROCS, start=1):
        tracker.on_event(epoch_event(epoch, auroc))
    tracker.log_metrics({"test_auroc": 0.8, "test_brier": math.nan})
    tracker.log_artifacts([table])
    trial = tracker.child("trial-0")
    trial.log_metrics({"val_auroc": 0.5}, step=1)
    trial.finish()
    tracker.finish()
    tracker.finish()

    # One run folder and the child's: no timestamped folder from add_hparams.
    assert sorted(p.name for p in log_dir.iterdir() if p.is_dir()) == ["trial-0"]
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert scalars == {
        *(n.replace("tla_labs_us", "tla_labs+us") for n in EPOCH_METRICS),
        "test_auroc",
    }
    curve = accumulator.Scalars("val_auroc")
    assert [e.step for e in curve] == [1, 2, 3]
    assert [e.value for e in curve] == pytest.approx(AUROCS)  # stored as float32
    assert [e.value for e in accumulator.Scalars("test_auroc")] == pytest.approx([0.8])
    assert "| lr | 0.001 |" in _text(accumulator, "settings")
    assert "| views | us,ct |" in _text(accumulator, "settings")
    assert str(table.resolve()) in _text(accumulator, "artifacts")
    assert f"| omnifuse.version | {__version__} |" in _text(accumulator, "tags")

    start = _hparams(accumulator).session_start_info.hparams
    assert start["lr"].number_value == pytest.approx(0.001)
    assert start["views"].string_value == "us,ct"
    assert start["pretrained"].string_value == "None"
    assert start["status"].string_value == "FINISHED"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        accumulator.PluginTagToContent("hparams")["_hparams_/experiment"]
    ).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["test_auroc"]

    child = EventAccumulator(str(log_dir / "trial-0"))
    child.Reload()
    assert [(e.step, e.value) for e in child.Scalars("val_auroc")] == [(1, 0.5)]
    assert _hparams(child).session_start_info.hparams["status"].string_value == "FINISHED"


def test_tensorboard_uri_is_the_log_dir_and_failure_is_recorded(tmp_path: Path) -> None:
    log_dir = tmp_path / "elsewhere"
    with pytest.raises(RuntimeError):
        with open_tracker("tensorboard", uri=str(log_dir), run_name="r", out_dir=tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / "tensorboard").exists()
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    assert _hparams(accumulator).session_start_info.hparams["status"].string_value == "FAILED"


@pytest.mark.parametrize(
    ("kind", "module", "name", "extra"),
    [
        ("mlflow", "mlflow", "MLflow", "mlflow"),
        ("tensorboard", "torch.utils.tensorboard", "TensorBoard", "tensorboard"),
    ],
)
def test_missing_extra_is_a_config_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, module: str, name: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: import fails
    with pytest.raises(
        ConfigError, match=f"--track {kind} needs {name}, which is not installed"
    ) as caught:
        open_tracker(kind, uri=str(tmp_path / "t"), run_name="r", out_dir=tmp_path)
    assert caught.value.hint == f"pip install 'omnifuse[{extra}]'"


def test_unknown_kind_is_a_config_error_naming_the_choices(tmp_path: Path) -> None:
    assert TRACK_KINDS == ("mlflow", "tensorboard")
    with pytest.raises(
        ConfigError, match="unknown tracker 'wandb': choose one of mlflow, tensorboard"
    ):
        open_tracker("wandb", uri=None, run_name="r", out_dir=tmp_path)


def test_param_text() -> None:
    assert param_text(None) == "None"
    assert param_text(["us", "ct"]) == "us,ct"
    assert param_text((1, 2.5, None)) == "1,2.5,None"
    assert param_text(Path("runs") / "a") == os.path.join("runs", "a")
    assert param_text(False) == "False"


def test_importing_the_module_loads_no_tracking_library() -> None:
    names = ["omnifuse_cli.engine.tracking", "mlflow", "tensorboard", "torch.utils.tensorboard"]
    code = (
        "import sys\n"
        "import omnifuse_cli.engine.tracking\n"
        f"print(*(n for n in {names!r} if n in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["omnifuse_cli.engine.tracking"]
