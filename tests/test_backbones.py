"""Image backbones beyond ResNets: any torchvision classification model by name.

State dicts come from randomly initialised torchvision models saved by the tests themselves; the
"ImageNet" files of the auto mode are such state dicts under the names torchvision gives them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from omnifuse_cli.config import ImageConfig, MethodConfig, ModalitySpec, ModelConfig
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.fitting import load_checkpoint
from omnifuse_cli.engine.modelling import build_model, image_feature_dim, load_image_weights
from omnifuse_cli.engine.runs import CHECKPOINT
from omnifuse_cli.errors import ConfigError, WeightsError
from omnifuse_cli.model.encoders import ImageEncoder
from omnifuse_cli.model.omnifuse import OmniFuse

from .conftest import NUM_CLASSES
from .helpers import assert_ok, assert_user_error, invoke


def image_model(image: ImageConfig) -> OmniFuse:
    """A model with one image modality, randomly initialised."""
    config = ModelConfig(
        (ModalitySpec("us", "image"),), 2, (image_feature_dim(image.backbone),), MethodConfig()
    )
    return build_model(config, image, {})


def trunk_of(model: OmniFuse) -> torch.nn.Module:
    encoder = model.encoders["us"]
    assert isinstance(encoder, ImageEncoder)
    return encoder.backbone


def saved_state(name: str, path: Path, seed: int = 123) -> dict[str, torch.Tensor]:
    """A torchvision model's full state dict (classifier included), saved to ``path``."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_trunk_holds(
    trunk: torch.nn.Module, state: dict[str, torch.Tensor], classifier: str
) -> None:
    """Every weight of ``state`` but the dropped classifier's is in the trunk, unchanged."""
    loaded = trunk.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    assert set(loaded) == set(kept)
    for key, value in kept.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty torch hub folder in place of the machine's cache, for one test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub" / "checkpoints"
    finally:
        torch.hub.set_dir(previous)


@pytest.mark.parametrize(
    ("name", "width", "classifier"),
    [
        ("mobilenet_v2", 1280, "classifier.1"),
        ("densenet121", 1024, "classifier"),
    ],
)
def test_a_weights_file_initialises_the_trunk(
    tmp_path: Path, name: str, width: int, classifier: str
) -> None:
    weights = tmp_path / f"{name}.pth"
    state = saved_state(name, weights)
    image = ImageConfig(backbone=name, image_size=32, weights_path=str(weights))
    model = image_model(image)
    assert image_feature_dim(name) == width
    assert model.encoders["us"].feature_dim == width
    loaded = load_image_weights(model, image)
    assert loaded.description == f"file {weights}" and loaded.source == "file"
    assert loaded.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    trunk = trunk_of(model)
    assert_trunk_holds(trunk, state, classifier)
    feats = model.encoders["us"].forward_features(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, width)


def test_densenet_files_with_torchvision_legacy_key_names(tmp_path: Path) -> None:
    # torchvision's densenet ImageNet files name keys as torchvision < 0.3 did, and predate
    # BatchNorm's num_batches_tracked.
    state = saved_state("densenet121", tmp_path / "new.pth")
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    image = ImageConfig(
        backbone="densenet121", image_size=32, weights_path=str(tmp_path / "legacy.pth")
    )
    model = image_model(image)
    load_image_weights(model, image)
    assert_trunk_holds(trunk_of(model), state, "classifier")


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    weights = tmp_path / "v3.pth"
    saved_state("mobilenet_v3_small", weights)
    image = ImageConfig(backbone="mobilenet_v2", image_size=32, weights_path=str(weights))
    with pytest.raises(WeightsError, match="do not fit mobilenet_v2") as info:
        load_image_weights(image_model(image), image)
    assert "torchvision's mobilenet_v2" in (info.value.hint or "")


def test_auto_weights_find_any_cached_imagenet_file(hub_dir: Path) -> None:
    image = ImageConfig(backbone="mobilenet_v2", image_size=32)
    model = image_model(image)
    described = load_image_weights(model, image).description
    assert described.startswith("random init") and "mobilenet_v2" in described

    enum = torchvision.models.MobileNet_V2_Weights
    assert enum.DEFAULT is enum.IMAGENET1K_V2  # so the file below is not DEFAULT's
    v1 = hub_dir / "mobilenet_v2-b0353104.pth"
    assert Path(enum.IMAGENET1K_V1.url).name == v1.name
    state = saved_state("mobilenet_v2", v1, seed=1)
    described = load_image_weights(model, image).description
    assert described == f"ImageNet MobileNet_V2_Weights.IMAGENET1K_V1 (cached {v1})"
    assert_trunk_holds(trunk_of(model), state, "classifier.1")

    default = saved_state("mobilenet_v2", hub_dir / Path(enum.DEFAULT.url).name, seed=2)
    assert (
        "IMAGENET1K_V2" in load_image_weights(model, image).description
    )  # DEFAULT wins when both exist
    assert_trunk_holds(trunk_of(model), default, "classifier.1")


def test_unknown_backbones_list_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="--image-backbone 'mobilenetv2'") as info:
        ImageConfig(backbone="mobilenetv2")
    hint = info.value.hint or ""
    for name in (
        "resnet34",
        "mobilenet_v2",
        "densenet121",
        "efficientnet_b0",
        "convnext_tiny",
        "mobilenet_v3_large",
    ):
        assert name in hint
    assert "googlenet" not in hint  # auxiliary heads: not a trunk here
    with pytest.raises(ConfigError):
        ImageConfig(backbone="squeezenet1_1")  # no Linear classifier to drop


def test_finetune_scopes_of_a_features_model() -> None:
    model = image_model(ImageConfig(backbone="convnext_tiny", image_size=32))
    encoder = model.encoders["us"]
    assert isinstance(encoder, ImageEncoder)

    def trainable() -> set[str]:
        return {
            n.split(".")[0] + "." + n.split(".")[1]
            for n, p in encoder.backbone.named_parameters()
            if p.requires_grad
        }

    encoder.set_trainable_scope("layer4")  # the last stage of features, and the final LayerNorm
    assert trainable() == {"features.7", "classifier.0"}
    encoder.set_trainable_scope("layer3+")
    assert trainable() == {"features.6", "features.7", "classifier.0"}
    encoder.set_trainable_scope("none")
    assert trainable() == set()
    encoder.set_trainable_scope("all")
    assert all(p.requires_grad for p in encoder.backbone.parameters())


def test_train_and_predict_with_mobilenet_v2(tiny_manifest: Path, tmp_path: Path) -> None:
    weights = tmp_path / "mobilenet_v2.pth"
    state = saved_state("mobilenet_v2", weights)
    run, preds = tmp_path / "run", tmp_path / "predictions.csv"
    assert_ok(
        invoke(
            "train",
            tiny_manifest,
            "--out-dir",
            run,
            "--num-classes",
            NUM_CLASSES,
            "--epochs",
            2,
            "--warmup-epochs",
            1,
            "--finetune-image-scope",
            "layer4",
            "--image-backbone",
            "mobilenet_v2",
            "--image-size",
            32,
            "--image-weights",
            weights,
            "--device",
            "cpu",
            "--train-ratio",
            0.6,
            "--val-ratio",
            0.2,
            "--test-ratio",
            0.2,
            "--batch-size",
            8,
        )
    )
    assert_ok(invoke("predict", tiny_manifest, "--run", run, "--out", preds, "--device", "cpu"))
    assert len(pd.read_csv(preds)) == 30

    # The bundle is rebuilt from its config and loaded strictly, under torchvision's key names.
    bundle = load_bundle(run)
    assert bundle.model.config.input_dims[1] == 1280
    trunk = trunk_of(bundle.model).state_dict()
    assert torch.equal(trunk["features.0.0.weight"], state["features.0.0.weight"])
    # The checkpoint holds epoch 2, which fine-tuned features.18 only (layer4).
    last = load_checkpoint(run / CHECKPOINT)["model"]
    prefix = "encoders.us.backbone."
    assert torch.equal(
        last[f"{prefix}features.17.conv.0.0.weight"], state["features.17.conv.0.0.weight"]
    )
    assert not torch.equal(last[f"{prefix}features.18.0.weight"], state["features.18.0.weight"])


def test_an_unknown_backbone_fails_before_the_run_starts(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    result = invoke(
        "train",
        tiny_manifest,
        "--out-dir",
        tmp_path / "run",
        "--num-classes",
        NUM_CLASSES,
        "--image-backbone",
        "resnet-18",
        "--device",
        "cpu",
    )
    assert_user_error(result, "--image-backbone 'resnet-18'", "resnet18")
    assert not (tmp_path / "run").exists()
