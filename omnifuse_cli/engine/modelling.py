"""Building the model: encoders per modality kind, pretrained weights, text backbones."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from omnifuse_cli.config import ImageConfig, ModelConfig
from omnifuse_cli.errors import WeightsError
from omnifuse_cli.model.encoders import (
    HFTextEncoder,
    ImageEncoder,
    SimpleTextEncoder,
    VectorEncoder,
    image_trunk,
    trunk_state,
)
from omnifuse_cli.model.omnifuse import OmniFuse


@functools.cache
def image_feature_dim(backbone: str) -> int:
    """Width of the backbone's features, read from a trunk built for the purpose: the model
    config holds it before the model exists (cached, as each build initialises every weight)."""
    # The throwaway build must not draw from the seeded stream: the real model's initial weights
    # would then depend on whether an earlier call filled the cache (a resumed run in the same
    # process would rebuild different frozen backbones).
    with torch.random.fork_rng(devices=[]):
        return image_trunk(backbone)[1]


def build_model(
    config: ModelConfig, image: ImageConfig, text_backbones: dict[str, nn.Module]
) -> OmniFuse:
    """The full model, randomly initialised (image trunks included; see load_image_weights)."""
    d, p = config.method.embed_dim, config.method.dropout
    encoders: dict[str, nn.Module] = {}
    for spec, dim in zip(config.modalities, config.input_dims, strict=True):
        if spec.kind == "vector":
            encoders[spec.name] = VectorEncoder(in_dim=dim, embed_dim=d, dropout=p)
        elif spec.kind == "image":
            trunk, feature_dim = image_trunk(image.backbone)
            encoders[spec.name] = ImageEncoder(
                trunk=trunk, feature_dim=feature_dim, embed_dim=d, dropout=p
            )
        elif spec.name in text_backbones:
            encoders[spec.name] = HFTextEncoder(
                backbone=text_backbones[spec.name], hidden_size=dim, embed_dim=d, dropout=p
            )
        else:
            encoders[spec.name] = SimpleTextEncoder(vocab_size=dim, embed_dim=d, dropout=p)
    return OmniFuse(config, encoders)


@dataclass(frozen=True)
class ImageWeights:
    """What initialised the image trunks, as a run records it (meta.csv, config.yaml, report)."""

    description: str  # one line for people: "ImageNet ... (cached PATH)", "random init (...)"
    source: Literal["imagenet", "file", "random", "none"]
    path: str = ""  # the weights file loaded
    sha256: str = ""  # of that file: which weights exactly, whatever the file is called
    # --pretrained-image auto found no ImageNet weights and the run starts from random ones:
    # features far weaker than the user probably expects, so the run warns.
    fallback: bool = False

    def meta(self) -> dict[str, str]:
        return {
            "image_weights": self.description,
            "image_weights_source": self.source,
            "image_weights_sha256": self.sha256,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_image_weights(model: OmniFuse, image: ImageConfig) -> ImageWeights:
    """Initialise every image trunk as asked; returns what was loaded."""
    trunks = [e.backbone for e in model.encoders.values() if isinstance(e, ImageEncoder)]
    if not trunks:
        return ImageWeights("none (no image modality)", "none")
    state: dict[str, Any] | None
    if image.weights_path:
        path = Path(image.weights_path)
        state, source = _state_from_file(path), f"file {image.weights_path}"
        kind: Literal["imagenet", "file"] = "file"
    elif image.pretrained == "no":
        return ImageWeights("random init (--no-pretrained-image)", "random")
    else:
        state, source, found = _imagenet_state(image.backbone, download=image.pretrained == "yes")
        if state is None:
            return ImageWeights(source, "random", fallback=True)
        path, kind = found, "imagenet"
    mapped = trunk_state(trunks[0], state)  # every image modality has the same backbone
    for trunk in trunks:
        try:
            trunk.load_state_dict(mapped, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise WeightsError(
                f"image weights from {source} do not fit {image.backbone}: {first}",
                hint=f"pass a state dict of torchvision's {image.backbone} (same model, same "
                f"depth as --image-backbone {image.backbone})",
            ) from err
    return ImageWeights(source, kind, str(path.resolve()), file_sha256(path))


def _state_from_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(
            f"--image-weights {path} does not exist",
            hint="give the path of a saved torchvision model state dict (.pth)",
        )
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable or unsafe file is the user's to replace
        raise WeightsError(
            f"--image-weights {path} could not be read as a state dict: {err}",
            hint="save it with torch.save(model.state_dict(), path); pickled models are refused",
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--image-weights {path} holds no tensor state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _imagenet_state(backbone: str, *, download: bool) -> tuple[dict[str, Any] | None, str, Path]:
    """(state or None, description, the file in the torch cache)."""
    import torchvision  # heavy: loaded only when an image backbone is built

    available = torchvision.models.get_model_weights(backbone)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    # DEFAULT first, then every other entry: an offline machine may hold an older file (the
    # DEFAULT of mobilenet_v2 is IMAGENET1K_V2, but IMAGENET1K_V1's file is the common one).
    for candidate in (available.DEFAULT, *(w for w in available if w is not available.DEFAULT)):
        cached = folder / Path(candidate.url).name
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
            return state, f"ImageNet {candidate} (cached {cached})", cached
    weights = available.DEFAULT
    if not download:
        return (
            None,
            f"random init (ImageNet weights for {backbone} not in {folder}; pass "
            "--pretrained-image to download them or --image-weights PATH)",
            folder,
        )
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # network errors come in many types; all mean "not available"
        raise WeightsError(
            f"could not download ImageNet weights for {backbone}: {err}",
            hint=f"offline? copy the file {Path(weights.url).name} to {folder}, pass "
            "--image-weights PATH to a local state dict, or use --no-pretrained-image",
        ) from err
    # torchvision keeps the download in the same cache folder, where it is hashed like a cached one.
    return state, f"ImageNet {weights} (downloaded)", folder / Path(weights.url).name


def load_text_backbone(name: str) -> tuple[Any, nn.Module, int]:
    """Tokenizer, AutoModel and hidden size from a local folder or a hub name (cached)."""
    try:  # transformers is heavy: loaded only for --text-encoder hf
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise WeightsError("--text-encoder hf needs the transformers package") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise WeightsError(
            f"could not load text model {name!r}: {str(err).splitlines()[0]}",
            hint="offline machines need --text-model PATH to a folder saved with "
            "save_pretrained (config, weights, tokenizer files), or use --text-encoder simple",
        ) from err
    return tokenizer, model, int(model.config.hidden_size)


def text_backbone_from_folder(folder: Path) -> tuple[Any, nn.Module, int]:
    """Rebuild a bundle's text model skeleton (weights come from the bundle's state dict)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy: hf text models only

    config = AutoConfig.from_pretrained(folder)
    model = AutoModel.from_config(config)
    return AutoTokenizer.from_pretrained(folder), model, int(config.hidden_size)
