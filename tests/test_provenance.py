"""Runs say what they used: omnifuse's version and the image weights actually loaded (file and
sha256, or random init) in meta.csv and config.yaml, and a warning on the terminal, in meta.csv
and in the report when `--pretrained-image` auto falls back to random weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml

from omnifuse_cli import __version__
from omnifuse_cli.report.page import build_report

from .helpers import assert_ok, invoke

FAST = [
    "--num-classes",
    3,
    "--epochs",
    1,
    "--image-backbone",
    "resnet18",
    "--image-size",
    32,
    "--device",
    "cpu",
    "--tla-min-patients",
    1,
    "--train-ratio",
    0.6,
    "--val-ratio",
    0.2,
    "--test-ratio",
    0.2,
    "--seed",
    0,
]


def meta_of(run: Path) -> dict[str, str]:
    frame = pd.read_csv(run / "meta.csv", dtype=str, keep_default_na=False)
    return dict(zip(frame["key"], frame["value"], strict=True))


def test_a_fallback_to_random_weights_warns_everywhere(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))
    run = tmp_path / "run"
    result = invoke("train", tiny_manifest, "--out-dir", run, *FAST)  # pretrained: auto
    assert_ok(result)
    assert "warning:" in result.stderr and "random init" in result.stderr
    meta = meta_of(run)
    assert meta["image_weights_source"] == "random" and meta["image_weights_sha256"] == ""
    assert "Random image features are far weaker" in meta["warnings"]
    assert meta["version_omnifuse"] == __version__
    config = (run / "config.yaml").read_text(encoding="utf-8")
    assert f"# omnifuse {__version__}; image weights: random init (ImageNet" in config
    assert yaml.safe_load(config)["epochs"] == 1  # still a --config file
    page = build_report(run).html.read_text(encoding="utf-8")
    assert 'class="warn run-warning"' in page and "far weaker" in page


def test_chosen_random_weights_do_not_warn_and_files_are_pinned_by_hash(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    asked = tmp_path / "random"
    result = invoke("train", tiny_manifest, "--out-dir", asked, *FAST, "--no-pretrained-image")
    assert_ok(result)
    assert "warning:" not in result.stderr
    assert meta_of(asked)["warnings"] == ""
    assert "run-warning" not in build_report(asked).html.read_text(encoding="utf-8")

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    pinned = tmp_path / "file"
    result = invoke("train", tiny_manifest, "--out-dir", pinned, *FAST, "--image-weights", weights)
    assert_ok(result)
    meta = meta_of(pinned)
    assert (meta["image_weights_source"], meta["image_weights_sha256"]) == ("file", digest)
    config = (pinned / "config.yaml").read_text(encoding="utf-8")
    assert f"image weights: file {weights} (sha256 {digest})" in config


def test_cv_records_the_fallback_warning_too(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))
    out = tmp_path / "cv"
    result = invoke("cv", tiny_manifest, "--out-dir", out, *FAST, "--folds", 2, "--bootstrap", 0)
    assert_ok(result)
    assert "warning:" in result.stderr and "random init" in result.stderr
    assert "far weaker" in meta_of(out)["warnings"]
    assert "far weaker" in build_report(out).html.read_text(encoding="utf-8")
