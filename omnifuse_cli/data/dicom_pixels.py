"""DICOM pixel data: any frame decoded into an 8-bit RGB picture, and every frame checked.

Only the frame asked for is decoded. Grey images go through their header's LUTs and window,
palette images through their colour LUT; pydicom delivers YBR as RGB. Why a file cannot be
decoded is said from its header (data.dicom) and from the decoder's error, which
data.dicom.clean_error withholds when it echoes any header text: PHI never leaves these two
modules.

pydicom is imported inside the functions that need it, because ``omnifuse --help`` must stay
instant and most runs never see a DICOM file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image

from omnifuse_cli.data.dicom import (
    DicomInfo,
    Unusable,
    clean_error,
    header_info,
    is_deflated,
    quiet,
    read_header,
    require_pydicom,
    unreadable_header,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

EXTRA_HINT = 'pip install "omnifuse[dicom]"'

# Enhanced (multi-frame) objects keep rescale and window per frame in functional groups.
# As tag numbers: pixel_array's specific_tags does not translate keywords.
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared-, PerFrameFunctionalGroupsSequence
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

_GREY = ("MONOCHROME1", "MONOCHROME2")
# What pixel_array(raw=False) returns as RGB: pydicom converts YBR_FULL(_422) itself and the
# JPEG 2000 decoders undo the YBR_ICT/YBR_RCT component transform.
_DECODED_AS_RGB = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


def dicom_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when all of its frames decode.

    Every frame is decoded (one at a time, so memory holds one frame), because truncation and
    codec damage often spare frame 0; frame 0 also goes through :func:`read_frame`'s conversion.
    The other frames skip the colour conversion, which cannot fail but costs more than decoding.
    Raises DataError only when pydicom itself is missing.
    """
    path = Path(path)
    try:
        with quiet():
            _check_all_frames(path)
    except Unusable as bad:
        return bad.problem()
    return None


def read_frame(path: Path, frame: int = 0, *, data: bytes | None = None) -> Image.Image:
    """Frame ``frame`` (from 0) of a DICOM file as an 8-bit RGB image; only it is decoded.

    ``data``: the file's bytes, already read (the feature cache hashes the very bytes that are
    decoded); the file itself is then read again only to explain a failure.

    Grey images go through the modality LUT (rescale slope/intercept), then the header's VOI LUT
    or window (the frame's own, in enhanced objects), else the frame's min..max; MONOCHROME1 is
    inverted so bright means the same as in MONOCHROME2; grey is replicated to three channels.
    PALETTE COLOR goes through its colour LUT; YBR arrives from pydicom already as RGB. Raises
    DataError with the reason :func:`dicom_problem` would give.
    """
    path = Path(path)
    if frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    try:
        with quiet():
            try:
                pixels, header = _decode(path if data is None else io.BytesIO(data), frame)
            except Exception as err:  # noqa: BLE001 - explained from the header just below
                pixels, header = _decode_after_failure(path, frame, err)
            rgb = _to_rgb(pixels, header, frame)
    except Unusable as bad:
        raise bad.error(path) from None
    return Image.fromarray(rgb)  # (rows, columns, 3) uint8 is RGB


def frame_indices(n_frames: int, max_views: int) -> list[int]:
    """Up to ``max_views`` evenly spaced frames of ``n_frames``, first and last included.

    >>> frame_indices(30, 4)
    [0, 10, 19, 29]
    """
    if n_frames < 1 or max_views < 1:
        raise ValueError(f"need n_frames >= 1 and max_views >= 1, got {n_frames}, {max_views}")
    spaced = np.rint(np.linspace(0, n_frames - 1, min(n_frames, max_views)))
    return sorted({int(i) for i in spaced})


# --- decoding --------------------------------------------------------------------------------


def _decode(src: Path | BinaryIO | Dataset, frame: int) -> tuple[np.ndarray, Dataset]:
    """One decoded frame and the header it needs; from a path only that frame's bytes are read."""
    import pydicom

    if isinstance(src, pydicom.Dataset):
        return pydicom.pixels.pixel_array(src, index=frame), src
    header = pydicom.Dataset()
    pixels = pydicom.pixels.pixel_array(
        src, index=frame, ds_out=header, specific_tags=list(_FUNCTIONAL_GROUPS)
    )
    return pixels, header


def _usable_header(path: Path) -> tuple[DicomInfo, Any, Path | Dataset]:
    """Header facts, decoder and pixel source, or Unusable for a reason seen in the header."""
    pydicom = require_pydicom()
    ds, has_pixels = read_header(path)
    info = header_info(ds, has_pixels)
    if not has_pixels:
        of = f" ({info.sop_class})" if info.sop_class else ""
        # A header that ends before its pixel data is silent in pydicom: an image SOP class or
        # image size without pixels is the sign of a truncated copy.
        if info.rows or "Image" in info.sop_class.split():
            of += ", though its header describes an image (truncated?)"
        raise Unusable(f"is a DICOM without pixel data{of}")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise Unusable("is a DICOM without a transfer syntax, so its pixels cannot be decoded")
    compressed = f"is a DICOM compressed with {info.transfer_syntax}"
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise Unusable(
            f"{compressed}, which omnifuse cannot decode (export its frames as PNG or as "
            "uncompressed DICOM)"
        ) from None
    if not decoder.is_available:
        if _extra_would_decode(decoder):
            raise Unusable(f"{compressed}, which needs the optional decoders", EXTRA_HINT)
        raise Unusable(f"{compressed}, for which no decoder is installed")
    if info.photometric not in (*_GREY, "PALETTE COLOR", *_DECODED_AS_RGB):
        raise Unusable(
            f"is a DICOM with photometric interpretation {info.photometric or '(none)'}, "
            "which omnifuse does not read"
        )
    if not is_deflated(ds):
        return info, decoder, path
    # pydicom reads frames straight from a file only when its dataset is not deflated.
    try:
        return info, decoder, pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - the inflated dataset does not parse
        raise unreadable_header(err) from None


def _check_all_frames(path: Path) -> None:
    from pydicom.pixels import iter_pixels

    info, decoder, src = _usable_header(path)
    frame = 0
    try:
        pixels, header = _decode(src, 0)
        rest = iter_pixels(src, indices=range(1, info.frames), raw=True)
        for frame in range(1, info.frames):
            if next(rest, None) is None:
                raise ValueError(f"only {frame} of {info.frames} frames are present")
    except Exception as err:  # noqa: BLE001 - a decoder may raise anything on damaged data
        raise _decode_failure(path, err, frame, info.frames, decoder) from None
    _to_rgb(pixels, header, 0)


def _decode_after_failure(path: Path, frame: int, err: Exception) -> tuple[np.ndarray, Dataset]:
    """Why read_frame's direct decode failed (as Unusable), or the frame from a deflated file."""
    info, decoder, src = _usable_header(path)
    if frame >= info.frames:
        raise Unusable(
            f"has {info.frames} frame(s); frame index {frame} is out of range "
            f"(0..{info.frames - 1})"
        )
    if not isinstance(src, Path):
        try:
            return _decode(src, frame)
        except Exception as again:  # noqa: BLE001 - reported like the first failure
            err = again
    raise _decode_failure(path, err, frame, info.frames, decoder)


def _decode_failure(path: Path, err: Exception, frame: int, frames: int, decoder: Any) -> Unusable:
    at = f"at frame {frame + 1} of {frames}: " if frames > 1 else ""
    reason = f"is a DICOM whose pixel data could not be decoded ({at}{clean_error(path, err)})"
    if _extra_would_decode(decoder):
        # An installed fallback (Pillow) failed where the optional decoders may succeed.
        return Unusable(f"{reason}; the optional decoders may read it", EXTRA_HINT)
    return Unusable(reason)


def _extra_would_decode(decoder: Any) -> bool:
    """True when pylibjpeg (what the ``dicom`` extra installs) decodes this syntax but is absent."""
    return any(dep.startswith("pylibjpeg ") for dep in decoder.missing_dependencies)


# --- pixels to RGB ---------------------------------------------------------------------------


def _to_rgb(pixels: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """One decoded frame as (rows, columns, 3) uint8."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_uint8(apply_color_lut(pixels, ds), 0.0, float(2**bits - 1))
    if photometric in _DECODED_AS_RGB and pixels.ndim == 3:
        bits = int(ds.get("BitsStored") or pixels.dtype.itemsize * 8)
        if pixels.dtype == np.uint8 and bits == 8:
            return np.ascontiguousarray(pixels)
        return _to_uint8(pixels, 0.0, float(2**bits - 1))
    if photometric in _GREY and pixels.ndim == 2:
        grey = _grey(pixels, _frame_header(ds, frame))
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        return np.repeat(grey[:, :, None], 3, axis=2)
    raise Unusable(
        f"is a DICOM with photometric interpretation {photometric or '(none)'} and frames of "
        f"shape {pixels.shape}, which omnifuse does not read"
    )


def _grey(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT, then the header's VOI LUT or window, else min..max; to uint8."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(pixels, ds)
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        # A VOI LUT is indexed by integers; its own entries bound the output.
        descriptor = voi[0].LUTDescriptor
        first, count = int(descriptor[1]), int(descriptor[0]) or 2**16
        entries = apply_voi(np.arange(first, first + count, dtype=np.int64), ds)
        mapped = apply_voi(np.rint(values).astype(np.int64), ds)
        return _to_uint8(mapped, float(entries.min()), float(entries.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            windowed = apply_windowing(values, ds)
            # Values far outside the window land on its output limits.
            low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
            return _to_uint8(windowed, float(low), float(high))
        except (ValueError, TypeError, IndexError):
            pass  # an unusable window (width < 1, unknown function): min..max shows the image
    finite = np.nan_to_num(np.asarray(values, dtype=np.float64))
    return _to_uint8(finite, float(finite.min()), float(finite.max()))


def _frame_header(ds: Dataset, frame: int) -> Dataset:
    """``ds`` with the frame's rescale and window from functional groups (enhanced objects)."""
    groups = []
    if shared := ds.get("SharedFunctionalGroupsSequence"):
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])  # after shared: a frame's own values win
    macros = [g[m].value[0] for g in groups for m in _FRAME_MACROS if m in g and g[m].value]
    if not macros:
        return ds
    from pydicom.dataset import Dataset

    view = Dataset()
    view.update(ds)
    view.file_meta = ds.file_meta
    for item in macros:
        for elem in item:
            view[elem.tag] = elem
    return view


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) * np.float32(
        255.0 / (high - low)
    )
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
