"""DICOM files: detection, header facts, viewing order, and error text cleared of PHI.

PHI never leaves this module and data/dicom_pixels.py (which decodes the pixels). Headers are
read with ``specific_tags`` naming only image and file-structure elements, so identifying
elements (names, IDs, dates, accession numbers) are not even parsed on the normal paths. The
whole header is read only by :func:`clean_error`, which uses its text values to withhold any
error text that echoes one of them, and for the rare deflated files, which pydicom decodes only
from a complete dataset. Messages and return values carry transfer syntaxes, SOP classes,
photometric interpretations, sizes and exception types, never header text; pydicom's own
warnings and log lines (which can quote element values) are silenced (:func:`quiet`) while it
works for us.

pydicom is imported inside the functions that need it, because ``omnifuse --help`` must stay
instant and most runs never see a DICOM file.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from omnifuse_cli.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

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

# Value representations that never hold a person's details (codes, numbers) are not checked
# against error text; everything else is (see clean_error).
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


class Unusable(Exception):
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
        with quiet():
            return header_info(*read_header(path))
    except Unusable as bad:
        raise bad.error(path) from None


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


def require_pydicom() -> Any:
    """The pydicom module (3 or newer), or a DataError saying how to install it."""
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
def quiet() -> Iterator[None]:
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


def read_header(path: Path) -> tuple[Dataset, bool]:
    """The non-identifying header elements, and whether pixel data follows them."""
    if not path.is_file():
        raise Unusable("does not exist")
    if not is_dicom(path):
        raise Unusable("is not a DICOM file (no DICM marker after the 128-byte preamble)")
    pydicom = require_pydicom()
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(_INFO_TAGS))
            has_pixels = _at_pixel_data(f, ds)
        if is_deflated(ds):
            # The dataset was inflated in memory, so the file position says nothing: look.
            full = pydicom.dcmread(path, specific_tags=sorted(_PIXEL_TAGS), defer_size=1024)
            has_pixels = any(tag in full for tag in _PIXEL_TAGS)
    except Exception as err:  # noqa: BLE001 - any parse failure means an unusable header
        raise unreadable_header(err) from None
    return ds, has_pixels


def unreadable_header(err: Exception) -> Unusable:
    # The header did not parse, so its values are unknown and cannot be checked against the
    # message: name the exception type only.
    return Unusable(f"is a DICOM whose header could not be read ({type(err).__name__})")


def _at_pixel_data(f: Any, ds: Dataset) -> bool:
    """True when ``f`` stands at a pixel data element (stop_before_pixels rewinds to its tag)."""
    head = f.read(4)
    if len(head) < 4:
        return False
    order = ">" if ds.original_encoding[1] is False else "<"
    group, element = np.frombuffer(head, dtype=f"{order}u2")
    return (int(group) << 16 | int(element)) in _PIXEL_TAGS


def is_deflated(ds: Dataset) -> bool:
    """True for the deflated transfer syntax, whose dataset pydicom inflates in memory."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return bool(ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def header_info(ds: Dataset, has_pixels: bool) -> DicomInfo:
    """The facts of a header that read_header returned."""
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
        with quiet():
            return header_info(*read_header(path)).instance_number
    except Unusable:
        return None


def _name_key(path: Path) -> tuple[str, str]:
    return (path.name, str(path))


# --- error text without PHI --------------------------------------------------------------------


def clean_error(path: Path, err: Exception) -> str:
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
