"""Self-contained model bundles: safetensors weights + a JSON of primitives.

A bundle folder holds ``model.safetensors`` (the whole state dict, backbones included),
``bundle.json`` (configs, fitted preprocessing, class names, versions) and, for hf text
modalities, ``text_<name>/`` with the tokenizer files and model config. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from omnifuse_cli import __version__
from omnifuse_cli.config import (
    ImageConfig,
    ModelConfig,
    TextConfig,
    from_primitive,
    to_primitive,
)
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.engine.epoch import backbone
from omnifuse_cli.engine.files import temp_file_beside, write_text_atomic
from omnifuse_cli.engine.modelling import build_model, text_backbone_from_folder
from omnifuse_cli.engine.runs import bundle_folder
from omnifuse_cli.errors import BundleError
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse

if TYPE_CHECKING:  # transformers is heavy: imported for annotations only
    from transformers import PreTrainedModel

FORMAT = "omnifuse-bundle"
FORMAT_VERSION = 1


@dataclass
class LoadedBundle:
    model: OmniFuse | BaggedOmniFuse  # a bag: bundle.json's "bag" (--bag-folds)
    preprocessor: Preprocessor
    class_names: list[str]
    meta: dict[str, Any]
    folder: Path | None = None  # where it was loaded from (the ensemble's members live there)


def versions() -> dict[str, str]:
    # Heavy, and loaded nowhere else in this module: only writing a bundle needs them.
    import sklearn
    import torchvision

    return {
        "omnifuse": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def save_bundle(
    folder: Path,
    model: OmniFuse | BaggedOmniFuse,
    preprocessor: Preprocessor,
    *,
    class_names: list[str],
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the bundle into ``folder`` (created/replaced atomically file by file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in (state or model.state_dict()).items()
    }
    tmp = temp_file_beside(folder / "model.safetensors")
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the user's umask allows
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.chmod(tmp, mode)  # safetensors recreates the file 0600
        os.replace(tmp, folder / "model.safetensors")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for name, tokenizer in preprocessor.tokenizers.items():
        text_dir = folder / f"text_{name}"
        if text_dir.exists():
            shutil.rmtree(text_dir)  # an overwritten run may hold another model's files
        tokenizer.save_pretrained(text_dir)
        # a modality with a tokenizer has a Hugging Face text model as its backbone
        cast("PreTrainedModel", backbone(model, name)).config.save_pretrained(text_dir)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": to_primitive(model.config),
        "image_config": to_primitive(preprocessor.image),
        "text_config": to_primitive(preprocessor.text),
        "preprocessor": preprocessor.state(),
        "class_names": class_names,
        "versions": versions(),
        **(extra or {}),
    }
    write_text_atomic(folder / "bundle.json", json.dumps(meta, ensure_ascii=False, indent=1))


def load_bundle(run_or_bundle: Path, device: torch.device | str = "cpu") -> LoadedBundle:
    folder = bundle_folder(run_or_bundle)
    try:
        meta = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{folder / 'bundle.json'} is corrupted: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{folder / 'bundle.json'} is not an omnifuse bundle")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {meta['format_version']} is newer than this omnifuse understands "
            f"({FORMAT_VERSION})",
            hint="upgrade omnifuse: pip install --upgrade omnifuse",
        )
    try:
        config = from_primitive(ModelConfig, meta["model_config"])
        image = from_primitive(ImageConfig, meta["image_config"])
        text = from_primitive(TextConfig, meta["text_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{folder / 'bundle.json'} has an invalid config: {err}") from err
    tokenizers: dict[str, Any] = {}
    backbones: dict[str, torch.nn.Module] = {}
    for spec in config.modalities:
        text_dir = folder / f"text_{spec.name}"
        if spec.kind == "text" and text_dir.is_dir():
            tokenizers[spec.name], backbones[spec.name], _ = text_backbone_from_folder(text_dir)
    bag = meta.get("bag")
    model: OmniFuse | BaggedOmniFuse
    if bag:
        model = BaggedOmniFuse(
            [build_model(config, image, backbones) for _ in range(int(bag["members"]))]
        )
    else:
        model = build_model(config, image, backbones)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(
            f"{folder / 'model.safetensors'} is missing or corrupted: {err}",
            hint="re-run training, or copy the run folder again",
        ) from err
    try:
        if isinstance(model, BaggedOmniFuse):
            model.load_bag_state(state)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BundleError(
            f"{folder / 'model.safetensors'} does not match its bundle.json: "
            f"{str(err).splitlines()[0]}"
        ) from err
    model.to(device).eval()
    preprocessor = Preprocessor.from_state(
        config.modalities, image, text, meta["preprocessor"], tokenizers
    )
    return LoadedBundle(model, preprocessor, list(meta["class_names"]), meta, folder)
