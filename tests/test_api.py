"""The Python API (omnifuse_cli.api): the README's example, DataFrame manifests, the same
settings and results as the CLI, progress callbacks, the scikit-learn estimator and cv."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_val_score

import omnifuse_cli as omnifuse
from omnifuse_cli.cli.train_options import parse_variant
from omnifuse_cli.engine.events import EVENT_KINDS, ProgressEvent
from omnifuse_cli.errors import BundleError, ConfigError
from omnifuse_cli.settings import BY_NAME, as_flags

from .conftest import NUM_CLASSES
from .helpers import assert_ok, invoke

ROOT = Path(__file__).resolve().parent.parent
# The tiny cohort's settings, by flag name (as tests/conftest.tiny_request builds them).
SMALL = {
    "epochs": 2,
    "batch_size": 8,
    "image_backbone": "resnet18",
    "image_size": 32,
    "pretrained_image": False,
    "device": "cpu",
    "tla_min_patients": 1,
    "train_ratio": 0.6,
    "val_ratio": 0.2,
    "test_ratio": 0.2,
    "seed": 0,
}


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = "<!-- the block below is executed by tests/test_api.py -->"
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, "README lost its executed Python example"
    return found.group(1)


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ImageNet weights
    code = readme_example()
    assert len([line for line in code.splitlines() if line and line[0] not in " #"]) <= 5
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    predictions = namespace["predictions"]
    assert isinstance(predictions, pd.DataFrame)
    assert len(predictions) == 120
    probs = predictions[[f"prob_{c}" for c in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "runs" / "api" / "model").is_dir()
    assert 0.0 <= namespace["run"].test_metrics["macro_f1"] <= 1.0


def test_a_dataframe_manifest_predicts_like_its_file(
    trained_run: tuple[Path, Any], tiny_manifest: Path
) -> None:
    run = omnifuse.Run.load(trained_run[0])
    from_file = run.predict(tiny_manifest, device="cpu")
    # Relative image paths (with ';', '|' and Windows separators) and note files, read against
    # base_dir instead of the manifest's folder.
    frame = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    from_frame = run.predict(frame, base_dir=tiny_manifest.parent, device="cpu")
    pd.testing.assert_frame_equal(from_file, from_frame)
    assert from_file["pred"].notna().all()


def test_api_and_cli_build_the_same_run(
    tiny_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[ProgressEvent] = []
    frame = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    run = omnifuse.train(
        frame,
        num_classes=NUM_CLASSES,
        out_dir=tmp_path / "api",
        base_dir=tiny_manifest.parent,
        on_progress=events.append,
        **SMALL,
    )
    assert capsys.readouterr().out == ""  # the API prints nothing
    kinds = {e.kind for e in events}
    assert {"epoch", "batch", "message"} <= kinds <= set(EVENT_KINDS)
    assert sum(e.kind == "epoch" for e in events) == SMALL["epochs"]

    flags = as_flags(SMALL)
    assert_ok(
        invoke(
            "train",
            tiny_manifest,
            "--num-classes",
            NUM_CLASSES,
            "--out-dir",
            tmp_path / "cli",
            *flags,
        )
    )
    api_request = json.loads((tmp_path / "api" / "request.json").read_text())
    cli_request = json.loads((tmp_path / "cli" / "request.json").read_text())
    for part in ("data", "method", "train"):
        assert api_request[part] == cli_request[part], part
    api_yaml = yaml.safe_load((tmp_path / "api" / "config.yaml").read_text())
    cli_yaml = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert api_yaml.pop("manifest").endswith("input_manifest.csv")
    assert Path(cli_yaml.pop("manifest")) == tiny_manifest.resolve()
    assert api_yaml == cli_yaml
    # Same data, settings and seed: the same model.
    cli_predictions = omnifuse.Run.load(tmp_path / "cli").predict(tiny_manifest, device="cpu")
    pd.testing.assert_frame_equal(run.predict(tiny_manifest, device="cpu"), cli_predictions)
    assert run.test_metrics == omnifuse.Run.load(tmp_path / "cli").test_metrics


def test_unknown_settings_and_folders_are_refused(tiny_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'epoch'") as err:
        omnifuse.train(tiny_manifest, num_classes=3, out_dir=tmp_path / "x", epoch=3)
    assert "did you mean epochs" in (err.value.hint or "")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(BundleError):
        omnifuse.Run.load(tmp_path)
    with pytest.raises(ConfigError, match="unknown option"):
        omnifuse.Run(tmp_path).predict(tiny_manifest, devices="cpu")


def test_flags_and_settings_agree() -> None:
    values = {
        "no_tla": True,
        "amp": False,
        "lr": 0.001,
        "ra_layers": "64,16",
        "text_ngrams": 3,
        "pretrained_image": False,
    }
    name, _, given = parse_variant("v=" + " ".join(as_flags(values)))
    assert name == "v" and given == values
    assert set(BY_NAME) >= set(values)


def _cohort(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    omnifuse.make_data(root, n=90, seed=3, ultrasound=False, inline_notes=True)
    frame = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    names = np.array(["benign", "indeterminate", "malignant"])
    return frame.drop(columns=["label"]), names[frame["label"].astype(int).to_numpy()]


def test_the_classifier_is_a_scikit_learn_estimator(tmp_path: Path) -> None:
    X, y = _cohort(tmp_path / "cohort")
    model = omnifuse.OmniFuseClassifier(
        epochs=3, modality=["labs=vector", "text=text"], device="cpu", seed=1
    )
    params = model.get_params()
    assert set(params) == set(BY_NAME) | {"out_dir", "base_dir"}
    assert params["epochs"] == 3 and params["test_ratio"] == 0.0 and params["lr"] is None  # auto
    twin = clone(model).set_params(lr=1e-3)
    assert twin.get_params()["lr"] == 1e-3 and model.get_params()["lr"] is None
    assert "epochs=3" in repr(model)
    with pytest.raises(ConfigError, match="unknown setting 'epoch'") as err:
        omnifuse.OmniFuseClassifier(epoch=3)
    assert "did you mean epochs" in (err.value.hint or "")

    scores = cross_val_score(model, X, y, cv=StratifiedKFold(2, shuffle=True, random_state=0))
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    fitted = model.fit(X, y)
    assert list(fitted.classes_) == ["benign", "indeterminate", "malignant"]
    probs = fitted.predict_proba(X)
    assert probs.shape == (90, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(fitted.predict(X)) <= set(fitted.classes_)
    # Better than chance on the patients it was fitted on (the cohort carries signal).
    assert (fitted.predict(X) == y).mean() > 0.5


def test_cv_takes_variants_as_settings(tiny_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="changes encoding"):
        omnifuse.cv(
            tiny_manifest,
            num_classes=3,
            out_dir=tmp_path / "bad",
            variants={"x": {"encoding": "utf-8"}},
        )
    settings = {k: v for k, v in SMALL.items() if not k.endswith("_ratio")}
    result = omnifuse.cv(
        tiny_manifest,
        num_classes=3,
        out_dir=tmp_path / "cv",
        folds=2,
        bootstrap=0,
        variants={"no-tla": {"no_tla": True}},
        **{**settings, "epochs": 1},
    )
    assert result.variants == ["base", "no-tla"]
    saved = yaml.safe_load((tmp_path / "cv" / "config.yaml").read_text())
    assert saved["variant"] == ["no-tla=--no-tla"] and saved["folds"] == 2
    assert set(result.metrics["variant"]) == {"base", "no-tla"}
