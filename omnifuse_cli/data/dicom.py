"""DICOM files as images: detection, header facts, and any frame as an 8-bit RGB picture.

PHI never leaves this module. Headers are read with ``specific_tags`` naming only image and
file-structure elements, so identifying elements (names, IDs, dates, accession numbers) are not
even parsed on the normal paths. The whole header is read only by :func:`_clean`, which uses
its text values to withhold any error text that echoes one of them, and for the rare deflated
files, which pydicom decodes only from a complete dataset. Messages and
return values carry transfer syntaxes, SOP classes, photometric interpretations, sizes and
exception types, never header text; pydicom's own warnings and log lines (which can quote
element values) are silenced while it works for us.

pydicom is imported inside the functions that need it, because ``omnifuse --help`` must stay
instant and most runs never see a DICOM file.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from omnifuse_cli.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

EXTRA_HINT = 'pip install "omnifuse[dicom]"'

_PREAMBLE = 128
_MAGIC = b"DICM"
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double, integer pixels

# The only elements the normal paths parse; none of them identifies a person.
_INFO_TAGS = (
    "SOPClassUID",
    "Modality",
    "InstanceNumber",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
)
# Enhanced (multi-frame) objects keep rescale and window per frame in functional groups.
# As tag numbers: pixel_array's specific_tags does not translate keywords.
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared-, PerFrameFunctionalGroupsSequence
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

_GREY = ("MONOCHROME1", "MONOCHROME2")
# What pixel_array(raw=False) returns as RGB: pydicom converts YBR_FULL(_422) itself and the
# JPEG 2000 decoders undo the YBR_ICT/YBR_RCT component transform.
_DECODED_AS_RGB = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

# Value representations that never hold a person's details (codes, numbers) are not checked
# against error text; everything else is (see _clean).
_CODED_VRS = frozenset(
    {
        "CS",
        "AT",
        "FL",
        "FD",
        "SL",
        "SS",
        "SV",
        "UL",
        "US",
        "UV",
        "OB",
        "OW",
        "OF",
        "OD",
        "OL",
        "OV",
        "UN",
        "SQ",
    }
)
_MAX_DETAIL = 200
_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM header says about its image; nothing in it identifies a person."""

    frames: int  # 0 when the file holds no pixel data
    photometric: str  # PhotometricInterpretation, e.g. MONOCHROME2, RGB, YBR_FULL_422; "" if none
    rows: int  # 0 when absent
    columns: int
    transfer_syntax: str  # short name, e.g. "JPEG Baseline", "Explicit VR Little Endian"
    modality: str  # e.g. "US", "CT"; "" when absent
    has_pixels: bool
    sop_class: str  # e.g. "Ultrasound Multi-frame Image", "Comprehensive SR"; "" when absent
    instance_number: int | None


class _Unusable(Exception):
    """Why a file cannot be used, phrased to follow its path; public functions translate it."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def problem(self) -> str:
        return f"{self.reason}: {self.hint}" if self.hint else self.reason

    def error(self, path: Path) -> DataError:
        return DataError(f"{path} {self.reason}", hint=self.hint)


def is_dicom(path: Path) -> bool:
    """True when ``path`` is a DICOM file: 128-byte preamble then ``DICM``, whatever its name.

    Files without the preamble (bare datasets, some old archives) are not recognised: guessing
    them from their first tag is not reliable enough to route a file away from the image reader.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE + len(_MAGIC))
    except OSError:
        return False
    return has_dicom_marker(head)


def has_dicom_marker(head: bytes) -> bool:
    """:func:`is_dicom` on a file's first bytes (or all of them), already read."""
    return head[_PREAMBLE : _PREAMBLE + len(_MAGIC)] == _MAGIC


def dicom_info(path: Path) -> DicomInfo:
    """The header facts of one DICOM file, read without its pixel data.

    Raises DataError when the file is missing, not DICOM or its header cannot be read.
    """
    path = Path(path)
    try:
        with _quiet():
            return _info(*_read_header(path))
    except _Unusable as bad:
        raise bad.error(path) from None


def dicom_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when all of its frames decode.

    Every frame is decoded (one at a time, so memory holds one frame), because truncation and
    codec damage often spare frame 0; frame 0 also goes through :func:`read_frame`'s conversion.
    The other frames skip the colour conversion, which cannot fail but costs more than decoding.
    Raises DataError only when pydicom itself is missing.
    """
    path = Path(path)
    try:
        with _quiet():
            _check_all_frames(path)
    except _Unusable as bad:
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
        with _quiet():
            try:
                pixels, header = _decode(path if data is None else io.BytesIO(data), frame)
            except Exception as err:  # noqa: BLE001 - explained from the header just below
                pixels, header = _decode_after_failure(path, frame, err)
            rgb = _to_rgb(pixels, header, frame)
    except _Unusable as bad:
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


def order_files(paths: Iterable[Path]) -> list[Path]:
    """A folder's files in viewing order: DICOMs first, then the other files by name.

    DICOMs are ordered by InstanceNumber when every one of them has it (ties by name), else by
    name: series exported with meaningless file names are still numbered in their headers.
    """
    dicoms: list[Path] = []
    others: list[Path] = []
    for p in map(Path, paths):
        (dicoms if is_dicom(p) else others).append(p)
    others.sort(key=_name_key)
    numbers = {p: _instance_number(p) for p in dicoms}
    if all(n is not None for n in numbers.values()):
        dicoms.sort(key=lambda p: (numbers[p], *_name_key(p)))
    else:
        dicoms.sort(key=_name_key)
    return dicoms + others


def describe(path: Path) -> dict[str, str | int]:
    """Format, photometric interpretation (PIL mode for ordinary images), frames and size.

    For ``check`` reports on DICOM and ordinary images alike; size is ``"rows x columns"``.
    Raises DataError when the file cannot be opened as either.
    """
    path = Path(path)
    if is_dicom(path):
        info = dicom_info(path)
        return {
            "format": f"DICOM {info.transfer_syntax}",
            "photometric": info.photometric or "-",
            "frames": info.frames,
            "size": f"{info.rows} x {info.columns}" if info.has_pixels else "-",
        }
    try:
        with Image.open(path) as img:
            return {
                "format": img.format or "unknown",
                "photometric": img.mode,
                "frames": int(getattr(img, "n_frames", 1)),
                "size": f"{img.height} x {img.width}",
            }
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} is neither DICOM nor a readable image ({err})") from None


# --- reading headers -------------------------------------------------------------------------


def _require_pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise DataError(
            "reading DICOM files needs pydicom, which is not installed", hint="pip install pydicom"
        ) from None
    if int(pydicom.__version__.split(".")[0]) < 3:
        raise DataError(
            f"reading DICOM files needs pydicom 3 or newer (found {pydicom.__version__})",
            hint='pip install -U "pydicom>=3"',
        )
    return pydicom


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log lines: some quote element values, which may be PHI."""
    log = logging.getLogger("pydicom")  # its modules log to children of this one
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _read_header(path: Path) -> tuple[Dataset, bool]:
    """The non-identifying header elements, and whether pixel data follows them."""
    if not path.is_file():
        raise _Unusable("does not exist")
    if not is_dicom(path):
        raise _Unusable("is not a DICOM file (no DICM marker after the 128-byte preamble)")
    pydicom = _require_pydicom()
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(_INFO_TAGS))
            has_pixels = _at_pixel_data(f, ds)
        if _is_deflated(ds):
            # The dataset was inflated in memory, so the file position says nothing: look.
            full = pydicom.dcmread(path, specific_tags=sorted(_PIXEL_TAGS), defer_size=1024)
            has_pixels = any(tag in full for tag in _PIXEL_TAGS)
    except Exception as err:  # noqa: BLE001 - any parse failure means an unusable header
        raise _unreadable_header(err) from None
    return ds, has_pixels


def _unreadable_header(err: Exception) -> _Unusable:
    # The header did not parse, so its values are unknown and cannot be checked against the
    # message: name the exception type only.
    return _Unusable(f"is a DICOM whose header could not be read ({type(err).__name__})")


def _at_pixel_data(f: Any, ds: Dataset) -> bool:
    """True when ``f`` stands at a pixel data element (stop_before_pixels rewinds to its tag)."""
    head = f.read(4)
    if len(head) < 4:
        return False
    order = ">" if ds.original_encoding[1] is False else "<"
    group, element = np.frombuffer(head, dtype=f"{order}u2")
    return (int(group) << 16 | int(element)) in _PIXEL_TAGS


def _is_deflated(ds: Dataset) -> bool:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return bool(ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def _info(ds: Dataset, has_pixels: bool) -> DicomInfo:
    sop = ds.get("SOPClassUID")
    return DicomInfo(
        frames=max(_int(ds, "NumberOfFrames") or 1, 1) if has_pixels else 0,
        photometric=str(ds.get("PhotometricInterpretation") or "").strip(),
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        transfer_syntax=_syntax_name(ds.file_meta.get("TransferSyntaxUID")),
        modality=str(ds.get("Modality") or "").strip(),
        has_pixels=has_pixels,
        sop_class=re.sub(r" Storage$", "", sop.name) if sop else "",
        instance_number=_int(ds, "InstanceNumber"),
    )


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _syntax_name(syntax: Any) -> str:
    """A transfer syntax's short name: "JPEG Baseline", "JPEG 2000 Lossless", "RLE Lossless"."""
    if not syntax:
        return "(no transfer syntax)"
    name = str(syntax.name).replace(" (Lossless Only)", " Lossless")
    name = re.sub(r"\s*\(.*\)", "", name.replace(" Image Compression", ""))
    return name.split(",")[0].strip()


def _instance_number(path: Path) -> int | None:
    try:
        with _quiet():
            return _info(*_read_header(path)).instance_number
    except _Unusable:
        return None


def _name_key(path: Path) -> tuple[str, str]:
    return (path.name, str(path))


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
    """Header facts, decoder and pixel source, or _Unusable for a reason seen in the header."""
    pydicom = _require_pydicom()
    ds, has_pixels = _read_header(path)
    info = _info(ds, has_pixels)
    if not has_pixels:
        of = f" ({info.sop_class})" if info.sop_class else ""
        # A header that ends before its pixel data is silent in pydicom: an image SOP class or
        # image size without pixels is the sign of a truncated copy.
        if info.rows or "Image" in info.sop_class.split():
            of += ", though its header describes an image (truncated?)"
        raise _Unusable(f"is a DICOM without pixel data{of}")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise _Unusable("is a DICOM without a transfer syntax, so its pixels cannot be decoded")
    compressed = f"is a DICOM compressed with {info.transfer_syntax}"
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise _Unusable(
            f"{compressed}, which omnifuse cannot decode (export its frames as PNG or as "
            "uncompressed DICOM)"
        ) from None
    if not decoder.is_available:
        if _extra_would_decode(decoder):
            raise _Unusable(f"{compressed}, which needs the optional decoders", EXTRA_HINT)
        raise _Unusable(f"{compressed}, for which no decoder is installed")
    if info.photometric not in (*_GREY, "PALETTE COLOR", *_DECODED_AS_RGB):
        raise _Unusable(
            f"is a DICOM with photometric interpretation {info.photometric or '(none)'}, "
            "which omnifuse does not read"
        )
    if not _is_deflated(ds):
        return info, decoder, path
    # pydicom reads frames straight from a file only when its dataset is not deflated.
    try:
        return info, decoder, pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - the inflated dataset does not parse
        raise _unreadable_header(err) from None


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
    """Why read_frame's direct decode failed (as _Unusable), or the frame from a deflated file."""
    info, decoder, src = _usable_header(path)
    if frame >= info.frames:
        raise _Unusable(
            f"has {info.frames} frame(s); frame index {frame} is out of range "
            f"(0..{info.frames - 1})"
        )
    if not isinstance(src, Path):
        try:
            return _decode(src, frame)
        except Exception as again:  # noqa: BLE001 - reported like the first failure
            err = again
    raise _decode_failure(path, err, frame, info.frames, decoder)


def _decode_failure(path: Path, err: Exception, frame: int, frames: int, decoder: Any) -> _Unusable:
    at = f"at frame {frame + 1} of {frames}: " if frames > 1 else ""
    reason = f"is a DICOM whose pixel data could not be decoded ({at}{_clean(path, err)})"
    if _extra_would_decode(decoder):
        # An installed fallback (Pillow) failed where the optional decoders may succeed.
        return _Unusable(f"{reason}; the optional decoders may read it", EXTRA_HINT)
    return _Unusable(reason)


def _extra_would_decode(decoder: Any) -> bool:
    """True when pylibjpeg (what the ``dicom`` extra installs) decodes this syntax but is absent."""
    return any(dep.startswith("pylibjpeg ") for dep in decoder.missing_dependencies)


def _clean(path: Path, err: Exception) -> str:
    """The exception as one short line, or only its type if it echoes any header text value."""
    import pydicom

    kind = type(err).__name__
    text = str(err).replace(_ALL_PLUGINS_FAILED, "")
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    if not text:
        return kind
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        lowered = text.lower()
        # Whole words only: a view label such as "PLA" must not hide "misplaced marker".
        echoed = any(
            re.search(rf"(?<![0-9a-z]){re.escape(v.lower())}(?![0-9a-z])", lowered)
            for v in set(_text_values(ds))
            if len(v) >= 3
        )
    except Exception:  # noqa: BLE001 - header values unknown: do not risk echoing one
        echoed = True
    if echoed:
        return kind
    return f"{kind}: {text[: _MAX_DETAIL - 3]}..." if len(text) > _MAX_DETAIL else f"{kind}: {text}"


def _text_values(ds: Dataset) -> Iterator[str]:
    """Every free-text value in ``ds`` (nested ones too), and each component of a name."""
    from pydicom.uid import UID

    for elem in ds.iterall():
        if elem.VR in _CODED_VRS or elem.tag >> 16 == 0x0028 or elem.value is None:
            continue
        for value in elem.value if elem.VM > 1 else [elem.value]:
            text = str(value).strip()
            if not text or (elem.VR == "UI" and UID(text).is_valid and UID(text).name != text):
                continue  # empty, or a registered UID (transfer syntax, SOP class): not PHI
            yield text
            if elem.VR == "PN":
                yield from (part for part in re.split(r"[\^=\s]+", text) if part)


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
    raise _Unusable(
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
