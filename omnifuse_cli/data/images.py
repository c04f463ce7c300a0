"""Image reading with the seed's preprocessing: Resize + CenterCrop + ImageNet normalisation.

A view is an image file (PNG, JPEG, ..., or a single-frame DICOM) or one frame of a multi-frame
DICOM (an ultrasound cine loop), named by a DicomFrame.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from omnifuse_cli.data.dicom import dicom_info, has_dicom_marker, is_dicom
from omnifuse_cli.data.dicom_pixels import dicom_problem, frame_indices, read_frame
from omnifuse_cli.data.fingerprints import DIGEST_SIZE, digest_of

# Bump whenever the code that turns a file into pixels changes (decoding, LUTs, windowing,
# colour handling, the transform): cached features of the old code are then never served.
PREPROCESSING_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms  # heavy: loaded only when images are read

    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@dataclass(frozen=True)
class DicomFrame:
    """Frame ``index`` (from 0) of the multi-frame DICOM ``path``. As an os.PathLike it is the
    file, so the feature cache's key sees the file's size and modification time."""

    path: Path
    index: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return f"{self.path} (frame {self.index + 1})"


View = Path | DicomFrame


def dicom_views(path: Path) -> list[View]:
    """A DICOM file's views: the file itself, or each of its frames when it has several."""
    frames = dicom_info(path).frames
    return [DicomFrame(path, k) for k in range(frames)] if frames > 1 else [path]


def select_views(views: Sequence[View], max_views: int) -> list[View]:
    """The views a patient keeps: the first ``max_views`` images of the cell (the seed's rule),
    but evenly spaced ones (first and last included) when frames of a cine loop are among them,
    so a loop is seen across its length rather than in its first fraction of a second."""
    if len(views) <= max_views:
        return list(views)
    if not any(isinstance(v, DicomFrame) for v in views):
        return list(views[:max_views])
    return [views[k] for k in frame_indices(len(views), max_views)]


def load_image(
    view: View, transform: Callable[[Image.Image], torch.Tensor], data: bytes | None = None
) -> torch.Tensor:
    """One view as a normalised (3, S, S) tensor; grayscale is replicated to RGB and DICOM
    pixels go through their header's LUTs and window first (data.dicom_pixels.read_frame).
    ``data``: the view's file, already read; it is then decoded from memory."""
    if isinstance(view, DicomFrame):
        return transform(read_frame(view.path, view.index, data=data))
    if has_dicom_marker(data) if data is not None else is_dicom(view):
        return transform(read_frame(view, 0, data=data))
    with Image.open(view if data is None else io.BytesIO(data)) as img:
        return transform(img.convert("RGB"))


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes completely."""
    if not path.is_file():
        return "does not exist"
    if is_dicom(path):
        return dicom_problem(path)
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: verify() alone misses truncated files
    except UnidentifiedImageError:
        return "is not an image in a supported format (DICOM, png, jpg, bmp, tif, ...)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"is corrupt or truncated ({err})"
    return None


class ImageFiles(Dataset[torch.Tensor]):
    """A flat list of views, streamed (never all held in memory)."""

    def __init__(self, paths: list[View], size: int) -> None:
        self.paths = paths
        self.transform = image_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.transform)


class HashedImageFiles(Dataset[tuple[torch.Tensor, int, torch.Tensor]]):
    """ImageFiles that also hash the file of each view marked in ``hashed`` (the first view of
    each file: a cine loop is hashed once, not once per frame). Such a file is read once, and
    the bytes that are hashed are the bytes that are decoded, so the digest stored with the
    features describes exactly what was encoded. An item is (pixels, the file's length in
    bytes, its data.fingerprints.digest_of), with length -1 and a zero digest for views not hashed.
    """

    def __init__(self, paths: list[View], size: int, hashed: Sequence[bool]) -> None:
        self.paths = paths
        self.transform = image_transform(size)
        self.hashed = hashed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        view = self.paths[i]
        if not self.hashed[i]:
            unhashed = torch.zeros(DIGEST_SIZE, dtype=torch.uint8)
            return load_image(view, self.transform), -1, unhashed
        with open(view, "rb") as handle:
            data = handle.read()
        digest = torch.frombuffer(bytearray(digest_of(data)), dtype=torch.uint8)
        return load_image(view, self.transform, data), len(data), digest
