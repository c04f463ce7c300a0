"""Shared fixtures: a tiny hand-built three-modality cohort and one small trained run.

The cohort is written by the tests themselves (no generator): 30 patients, 3 classes, labs as
inline JSON, ultrasound as small PNGs (``;``, ``|`` and Windows separators mixed), notes inline
or as ``.txt`` files, and some modalities missing. Every patient has at least one modality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from omnifuse_cli.config import DataConfig, ImageConfig, MethodConfig, TrainConfig
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import TrainResult, run_training

from .helpers import TINY_RUN, assert_ok, invoke

# The models here are tiny: one intra-op thread is as fast, and it keeps the suite quick when
# other processes share the CPU (two spinning OpenMP threads on two busy cores slow it 10x+).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # what train/cv/evaluate/predict's --threads reads

N_PATIENTS = 30
NUM_CLASSES = 3
LABS_DIM = 5
CLASS_WORDS = ("良性结节，边界清楚", "可疑结节，边界模糊", "恶性肿瘤，钙化明显")


def save_png(path: Path, value: float, *, size: int = 40, seed: int = 0) -> Path:
    """A grayscale PNG whose mean brightness is ``value`` (0..1), plus a little noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(value + 0.1 * rng.standard_normal((size, size)), 0.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default feature cache ($OMNIFUSE_CACHE_DIR) of the whole session: never the user's
    ~/.cache. Tests that inspect the cache give their own --cache-dir."""
    folder = tmp_path_factory.mktemp("feature_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNIFUSE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def write_png() -> Callable[..., Path]:
    return save_png


def build_tiny_cohort(root: Path) -> Path:
    """Write manifest.csv, us/*.png and notes/*.txt under ``root``; return the manifest path."""
    rng = np.random.default_rng(0)
    labels = np.arange(N_PATIENTS) % NUM_CLASSES
    lines = ["id,label,labs,us,text"]
    for i, label in enumerate(labels):
        pid = 1001 + i
        # Presence pattern cycles so every combination of modalities occurs.
        has_labs, has_us, has_text = [
            (True, True, True),
            (True, True, True),
            (True, False, True),
            (False, True, True),
            (True, True, False),
            (True, False, False),
            (False, True, False),
            (False, False, True),
        ][i % 8]
        labs = ""
        if has_labs:
            values: list[float | None] = list(np.round(label + rng.normal(0, 0.5, LABS_DIM), 3))
            if i % 5 == 0:
                values[1] = None  # a single missing analyte
            labs = '"' + json.dumps(values).replace('"', '""') + '"'
        us = ""
        if has_us:
            names = [f"us/{pid}_{k}.png" for k in range(1 + i % 2)]
            for k, name in enumerate(names):
                save_png(root / name, 0.2 + 0.3 * label, seed=100 * i + k)
            sep = ";" if i % 3 else "|"
            us = sep.join(n.replace("/", "\\") if i % 4 == 0 else n for n in names)
        text = ""
        if has_text:
            note = f"{CLASS_WORDS[label]}。患者{pid}复查"
            if i % 2:
                note_path = root / "notes" / f"{pid}.txt"
                note_path.parent.mkdir(exist_ok=True)
                note_path.write_text(note, encoding="utf-8")
                text = f"notes/{pid}.txt"
            else:
                text = note
        lines.append(f"{pid},{label},{labs},{us},{text}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def tiny_bert(folder: Path, hidden: int = 32, extra_chars: str = "") -> Path:
    """A 2-layer, 32-wide BERT with a character vocabulary, saved like a hub download."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    chars = sorted({ch for words in CLASS_WORDS for ch in words} | set("患者复查" + extra_chars))
    vocab = folder / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n", encoding="utf-8"
    )
    tokenizer = BertTokenizer(str(vocab))
    config = BertConfig(
        vocab_size=5 + len(chars),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer("良性结节")["input_ids"][1] != tokenizer.unk_token_id
    return folder


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the hand-built cohort's manifest.csv (read-only: copy before changing it)."""
    return build_tiny_cohort(tmp_path_factory.mktemp("tiny_cohort"))


def tiny_request(
    manifest: Path,
    out_dir: Path,
    *,
    epochs: int = 2,
    batch_size: int = 8,
    overwrite: bool = False,
    **data_kwargs: Any,
) -> TrainRequest:
    """A small, fast TrainRequest: resnet18 at 32 px, CPU, 60/20/20 split."""
    image = data_kwargs.pop(
        "image", ImageConfig(backbone="resnet18", image_size=32, pretrained="no")
    )
    return TrainRequest(
        manifest=manifest,
        num_classes=NUM_CLASSES,
        out_dir=out_dir,
        data=DataConfig(image=image, **data_kwargs),
        # 18 training patients: under the default minimum TLA would never pick a combination.
        method=MethodConfig(tla_min_patients=1),
        train=TrainConfig(
            epochs=epochs,
            device="cpu",
            batch_size=batch_size,
            train_ratio=0.6,
            val_ratio=0.2,
            test_ratio=0.2,
            seed=0,
        ),
        overwrite=overwrite,
    )


@pytest.fixture
def make_request() -> Callable[..., TrainRequest]:
    return tiny_request


@pytest.fixture(scope="session")
def trained_run(
    tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult]:
    """One 2-epoch run on the tiny cohort: (run_dir, TrainResult). Treat the folder as read-only."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_training(tiny_request(tiny_manifest, out))
    return out, result


CV_ARGS = ["--num-classes", "3", "--folds", "3", "--epochs", "2", *TINY_RUN, "--bootstrap", "50"]


@pytest.fixture(scope="session")
def cv_run(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`omnifuse cv` of the tiny cohort, once: 3 folds, a variant without DWFuse, --refit.

    Returns the folder ("dir", read-only), the CLI result ("result"), how often frozen features
    were encoded ("encodes") and the patients each model's preprocessing was fitted on
    ("fitted": one index array per build_for_cohort call, in call order)."""
    from omnifuse_cli.engine import frozen_features
    from omnifuse_cli.engine.cv import encoding
    from omnifuse_cli.engine.cv import run as crossval

    out = tmp_path_factory.mktemp("cv") / "cv"
    encodes: list[int] = []
    fitted: list[np.ndarray] = []
    real_cache, real_build = frozen_features.cache_frozen_features, crossval.build_for_cohort

    def cache(*args: Any, **kwargs: Any) -> None:
        encodes.append(1)
        real_cache(*args, **kwargs)

    def build(cohort: Any, train_idx: np.ndarray, request: Any) -> Any:
        fitted.append(np.asarray(train_idx))
        return real_build(cohort, train_idx, request)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frozen_features, "cache_frozen_features", cache)
        patch.setattr(crossval, "build_for_cohort", build)  # each fold's model
        patch.setattr(encoding, "build_for_cohort", build)  # the frozen encoder's
        result = invoke(
            "cv",
            tiny_manifest,
            "--out-dir",
            out,
            *CV_ARGS,
            "--refit",
            "--variant",
            "nodw=--no-dwfuse",
        )
    assert_ok(result)
    return {"dir": out, "result": result, "encodes": len(encodes), "fitted": fitted}


def load_benchmark(name: str, module_name: str) -> ModuleType:
    """benchmarks/<name>.py imported as ``module_name`` (the benchmarks are scripts, not a
    package); registered in sys.modules before it runs, so its dataclasses pickle."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    # The scripts import each other by name (`import common`, `from study import ...`), as
    # running one as `python benchmarks/x.py` allows: its folder must be on sys.path here too.
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
