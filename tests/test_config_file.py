"""`--config FILE.yaml` (issue 11 item 1): settings from files, command-line precedence, clear
errors, the run's saved config.yaml repeating it exactly, and `omnifuse config init|show`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from omnifuse_cli.engine.cv import save_cv_request
from omnifuse_cli.engine.training import TrainResult
from omnifuse_cli.errors import OmnifuseError

from .helpers import assert_user_error, invoke

# Small and fast: resnet18 at 32 px from random weights on the CPU, a 60/20/20 split.
TINY = {
    "num-classes": 3,
    "epochs": 2,
    "batch-size": 8,
    "image-backbone": "resnet18",
    "image-size": 32,
    "pretrained-image": False,
    "device": "cpu",
    "train-ratio": 0.6,
    "val-ratio": 0.2,
    "test-ratio": 0.2,
    "seed": 0,
    "tla-min-patients": 1,
}


def write_yaml(path: Path, values: dict[str, Any] | str) -> Path:
    path.write_text(values if isinstance(values, str) else yaml.safe_dump(values), encoding="utf-8")
    return path


class _Captured(OmnifuseError):
    """Stops a command once it has built its request."""


def captured(monkeypatch: pytest.MonkeyPatch, target: str, *args: object) -> Any:
    """The request `omnifuse ARGS` hands to ``target`` (the engine is not run)."""
    seen: list[Any] = []

    def capture(request: Any, *_: Any, **__: Any) -> None:
        seen.append(request)
        raise _Captured("captured")

    with monkeypatch.context() as patch:
        patch.setattr(target, capture)
        result = invoke(*args)
    assert seen, result.output
    return seen[0]


TRAIN = "omnifuse_cli.engine.training.run_training"
CV = "omnifuse_cli.engine.cv.run_cv"


def test_saved_config_repeats_the_run_bit_for_bit(tiny_manifest: Path, tmp_path: Path) -> None:
    study = write_yaml(
        tmp_path / "study.yaml",
        {**TINY, "manifest": str(tiny_manifest), "lr": "1e-3", "no_backward": True},
    )
    first, again = tmp_path / "first", tmp_path / "again"
    result = invoke("train", "--config", study, "--out-dir", first)
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = yaml.safe_load((first / "config.yaml").read_text(encoding="utf-8"))
    assert saved["manifest"] == str(tiny_manifest.resolve())
    assert saved["lr"] == 1e-3 and saved["no-backward"] is True and saved["epochs"] == 2
    assert "out-dir" not in saved and "overwrite" not in saved
    assert (first / "request.json").is_file()  # kept beside it, for --resume

    # From another folder: the saved paths are absolute.
    result = invoke("train", "--config", first / "config.yaml", "--out-dir", again)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    timing = ["seconds"]
    one, two = (pd.read_csv(d / "metrics.csv").drop(columns=timing) for d in (first, again))
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert (first / "test.csv").read_text() == (again / "test.csv").read_text()
    weights = [load_file(d / "model" / "model.safetensors") for d in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_a_flag_wins_over_the_file_even_at_its_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    study = write_yaml(
        tmp_path / "s.yaml",
        {
            "num_classes": 3,
            "epochs": 5,
            "amp": False,
            "batch_size": 16,
            "lr": "2e-4",
            "modality": ["a=vector", "b=image"],
        },
    )
    request = captured(
        monkeypatch, TRAIN, "train", "m.csv", "--config", study, "--epochs", "30", "--amp"
    )  # both train's defaults
    assert request.train.epochs == 30 and request.train.amp is True
    assert request.train.batch_size == 16 and request.train.lr == 2e-4  # from the file
    assert [m.name for m in request.data.modalities] == ["a", "b"]
    assert request.num_classes == 3 and request.manifest == Path("m.csv")


def test_several_files_merge_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = write_yaml(tmp_path / "base.yaml", {"num-classes": 3, "epochs": 5, "seed": 7})
    local = write_yaml(tmp_path / "local.yaml", {"epochs": 9, "device": "cpu"})
    request = captured(monkeypatch, TRAIN, "train", "m.csv", "--config", base, "--config", local)
    assert (request.train.epochs, request.train.seed, request.train.device) == (9, 7, "cpu")


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path: Path) -> None:
    study = write_yaml(tmp_path / "s.yaml", {"num-classes": 3, "bach-size": 8})
    assert_user_error(
        invoke("train", "m.csv", "--config", study, "--out-dir", tmp_path / "r"),
        "unknown key 'bach-size' for omnifuse train",
        "did you mean batch-size?",
    )
    assert not (tmp_path / "r").exists()
    # A train setting is not an evaluate setting.
    other = write_yaml(tmp_path / "e.yaml", {"epochs": 3})
    assert_user_error(
        invoke("evaluate", "run", "--config", other), "unknown key 'epochs' for omnifuse evaluate"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: ten", "epochs must be a whole number, not 'ten'"),
        ("epochs: 2.5", "epochs must be a whole number, not 2.5"),
        ("epochs: 0", "epochs must be at least 1, not 0"),
        ("lr: fast", "lr must be a finite number, not 'fast'"),
        ("amp: 1", "amp must be true or false, not 1"),
        ("batch-size: [8, 16]", "batch-size takes one value, not a list"),
        ("image-size: null", "image-size needs a value"),
        ("epochs: 2\nepochs: 3", "epochs is given twice"),
        ("epochs: 2\nEpochs 3", "is not valid YAML"),
        ("- epochs", "must be a mapping of settings"),
        ("resume: runs/x", "resume cannot come from a config file"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    study = write_yaml(tmp_path / "s.yaml", text + "\n")
    assert_user_error(invoke("train", "m.csv", "--num-classes", "3", "--config", study), message)


def test_missing_file_and_config_with_resume(tmp_path: Path) -> None:
    assert_user_error(
        invoke("train", "m.csv", "--config", tmp_path / "nope.yaml"), "nope.yaml does not exist"
    )
    study = write_yaml(tmp_path / "s.yaml", {"epochs": 3})
    assert_user_error(
        invoke("train", "--resume", tmp_path, "--config", study), "--config and --resume together"
    )


@pytest.mark.parametrize("command", ["train", "cv", "evaluate", "predict"])
def test_config_init_template_is_accepted_unchanged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    path = tmp_path / f"{command}.yaml"
    result = invoke("config", "init", path, "--command", command)
    assert result.exit_code == 0, result.output
    text = path.read_text(encoding="utf-8")
    assert "# -- " in text and "# Patients per batch." in text
    if command in ("evaluate", "predict"):
        assert "batch-size: 32" in text
    if command in ("train", "cv"):
        # null: the cohort-size rule chooses (README "Presets")
        assert "batch-size: null" in text and "auto: 32, larger past 20,000" in text
        assert "lr: null" in text and "# num-classes: 3" in text  # needed: commented out
        assert "# -- method --" in text and "no-imputation: false" in text
        engine = TRAIN if command == "train" else CV
        plain = captured(monkeypatch, engine, command, "m.csv", "--num-classes", "3")
        templated = captured(
            monkeypatch, engine, command, "m.csv", "--num-classes", "3", "--config", path
        )
        if command == "cv":
            plain, templated = plain.base, templated.base
        assert (templated.data, templated.method, templated.train) == (
            plain.data,
            plain.method,
            plain.train,
        )
    # printing and refusing to overwrite
    assert invoke("config", "init", "--command", command).stdout == text
    assert_user_error(invoke("config", "init", path, "--command", command), "already exists")


def test_evaluate_and_predict_take_their_settings_from_a_file(
    trained_run: tuple[Path, TrainResult], tiny_manifest: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    out = tmp_path / "eval"
    settings = write_yaml(
        tmp_path / "eval.yaml",
        {
            "run-dir": str(run_dir),
            "bootstrap": 0,
            "device": "cpu",
            "out_dir": str(out),
            "drop-modality": "us",
        },
    )
    result = invoke("evaluate", "--config", settings)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "metrics.csv").is_file()
    predictions = pd.read_csv(out / "predictions.csv", dtype={"id": str})
    assert not predictions["modalities"].str.contains("us").any()  # dropped, from the file

    written = tmp_path / "p.csv"
    settings = write_yaml(
        tmp_path / "predict.yaml",
        {
            "patients": str(tiny_manifest),
            "run": str(run_dir),
            "out": str(tmp_path / "unused.csv"),
            "device": "cpu",
            "batch-size": 4,
        },
    )
    result = invoke("predict", "--config", settings, "--out", written)  # the flag wins
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert written.is_file() and not (tmp_path / "unused.csv").exists()
    assert len(pd.read_csv(written)) == 30

    assert_user_error(
        invoke("predict", "--config", write_yaml(tmp_path / "x.yaml", {})), "no patients file given"
    )


def test_cv_takes_a_config_and_saves_one_that_repeats_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    variants = tmp_path / "variants.txt"
    variants.write_text("nodw=--no-dwfuse\n", encoding="utf-8")
    study = write_yaml(
        tmp_path / "cv.yaml",
        {
            "manifest": "m.csv",
            "num-classes": 3,
            "folds": 3,
            "bootstrap": 0,
            "epochs": 4,
            "variant": ["lr=--lr 1e-3"],
            "variants-file": str(variants),
            "out-dir": "unused",
        },
    )
    request = captured(monkeypatch, CV, "cv", "--config", study, "--out-dir", tmp_path / "cv")
    assert (request.folds, request.bootstrap, request.base.train.epochs) == (3, 0, 4)
    assert [v.name for v in request.variants] == ["lr", "nodw"]
    assert request.out_dir == tmp_path / "cv"

    save_cv_request(request)  # what run_cv writes first
    saved = yaml.safe_load((tmp_path / "cv" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["variant"] == ["lr=--lr 1e-3", "nodw=--no-dwfuse"]
    assert "variants-file" not in saved and "out-dir" not in saved
    again = captured(
        monkeypatch,
        CV,
        "cv",
        "--config",
        tmp_path / "cv" / "config.yaml",
        "--out-dir",
        tmp_path / "cv",
    )
    assert again.manifest == Path("m.csv").resolve()
    assert (again.base, again.variants, again.folds, again.bootstrap) == (
        request.base,
        request.variants,
        request.folds,
        request.bootstrap,
    )


def test_config_show_prints_a_runs_settings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 3\n", encoding="utf-8")
    result = invoke("config", "show", run)
    assert result.exit_code == 0 and result.stdout == "epochs: 3\n"
    assert_user_error(invoke("config", "show", tmp_path), "has no config.yaml")
