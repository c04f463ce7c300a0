"""Image reading with the seed's preprocessing: Resize + CenterCrop + ImageNet normalisation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(size: int):  # type: ignore[no-untyped-def]
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_image(path: Path, transform) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One image as a normalised (3, S, S) tensor; grayscale ultrasound is replicated to RGB."""
    from PIL import Image

    with Image.open(path) as img:
        return transform(img.convert("RGB"))


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes completely."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: verify() alone misses truncated files
    except UnidentifiedImageError:
        return "is not an image in a supported format (png, jpg, bmp, tif, ...)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"is corrupt or truncated ({err})"
    return None


class ImageFiles(Dataset):
    """A flat list of image paths, streamed (never all held in memory)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = paths
        self.transform = image_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.transform)
