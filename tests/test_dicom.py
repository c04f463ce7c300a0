"""DICOM reading on the real files shipped inside the pydicom wheel (never downloaded).

Files that only the optional ``dicom`` extra (pylibjpeg) decodes are checked both ways: decoded
when the extra is installed, otherwise reported with the install hint. The "extra missing" case
is also run for real in a child interpreter in which the decoder packages cannot be imported.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.tag import Tag  # noqa: E402
from pydicom.uid import JPEGLSLossless  # noqa: E402

from omnifuse_cli.data.dicom import describe, dicom_info, is_dicom, order_files  # noqa: E402
from omnifuse_cli.data.dicom_pixels import (  # noqa: E402
    EXTRA_HINT,
    dicom_problem,
    frame_indices,
    read_frame,
)
from omnifuse_cli.errors import DataError  # noqa: E402

TEST_FILES = Path(pydicom.data.__file__).with_name("test_files")
HAVE_EXTRA = get_decoder(JPEGLSLossless).is_available
# Decoded only by pylibjpeg: JPEG-LS, JPEG Lossless, 12-bit JPEG Extended (Pillow refuses it).
NEEDS_EXTRA = ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPGExtended.dcm"]
IMAGES = [
    "CT_small.dcm",  # CT, rescale slope/intercept, no window
    "MR_small.dcm",  # MR with a window
    "MR_small_RLE.dcm",  # RLE Lossless, pydicom's own decoder
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless (Pillow or the extra)
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "examples_palette.dcm",  # US PALETTE COLOR
    "examples_rgb_color.dcm",  # US RGB
    "examples_ybr_color.dcm",  # US 30-frame JPEG Baseline cine, YBR_FULL_422
    "examples_jpeg2k.dcm",  # US JPEG 2000, YBR_RCT
    "ExplVR_BigEnd.dcm",  # US RGB, big endian
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline, YBR_FULL_422
    "SC_ybr_full_422_uncompressed.dcm",
    "rtdose.dcm",  # 15 frames of 32-bit dose
    "liver_1frame.dcm",  # 1-bit segmentation
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
]
PHI = ("Doe^Jane", "Doe", "Jane", "MRN123456", "19800101", "ACC98765")


def shipped(name: str) -> Path:
    path = TEST_FILES / name
    assert path.is_file(), f"{name} is not in this pydicom wheel"
    return path


def rgb(path: Path, frame: int = 0) -> np.ndarray:
    img = read_frame(path, frame)
    assert img.mode == "RGB"
    return np.asarray(img)


def modified(tmp_path: Path, name: str, out: str, **values: object) -> Path:
    """A copy of a shipped file with some elements set (None deletes one)."""
    ds = pydicom.dcmread(shipped(name))
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / out
    ds.save_as(path)
    return path


def stored(path: Path) -> np.ndarray:
    return pydicom.pixels.pixel_array(path).astype(np.float64)


def test_is_dicom_by_content_not_by_name(tmp_path: Path) -> None:
    renamed = tmp_path / "IM0001"
    renamed.write_bytes(shipped("CT_small.dcm").read_bytes())
    png = tmp_path / "scan.dcm"
    Image.new("L", (4, 4)).save(png, format="PNG")
    assert is_dicom(shipped("CT_small.dcm"))
    assert is_dicom(renamed)
    assert not is_dicom(png)
    assert not is_dicom(tmp_path / "missing.dcm")
    assert not is_dicom(tmp_path)


@pytest.mark.parametrize("name", IMAGES + NEEDS_EXTRA)
def test_shipped_images_decode_to_rgb_of_the_header_size(name: str) -> None:
    path = shipped(name)
    if name in NEEDS_EXTRA and not HAVE_EXTRA:
        assert EXTRA_HINT in str(dicom_problem(path))
        with pytest.raises(DataError) as err:
            read_frame(path)
        assert err.value.hint == EXTRA_HINT
        return
    assert dicom_problem(path) is None
    info = dicom_info(path)
    img = read_frame(path, info.frames - 1)
    assert (img.mode, img.size) == ("RGB", (info.columns, info.rows))
    assert np.asarray(img).dtype == np.uint8


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path, name: str) -> None:
    inverted = modified(tmp_path, name, "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    normal = rgb(shipped(name))
    assert normal.max() > normal.min()
    np.testing.assert_array_equal(rgb(inverted), 255 - normal)


def test_rescale_then_window_as_computed(tmp_path: Path) -> None:
    values = stored(shipped("CT_small.dcm"))
    center, width = float(np.median(values)) * 2, float(np.ptp(values))
    for slope, intercept in [(1.0, 0.0), (2.0, -100.0)]:
        path = modified(
            tmp_path,
            "CT_small.dcm",
            f"s{slope}.dcm",
            RescaleSlope=slope,
            RescaleIntercept=intercept,
            WindowCenter=center,
            WindowWidth=width,
        )
        # PS3.3 C.11.2.1.2.1, LINEAR: the window maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2]
        low = center - 0.5 - (width - 1) / 2
        scaled = (values * slope + intercept - low) / (width - 1)
        expected = np.clip(scaled, 0, 1) * 255
        got = rgb(path)[:, :, 0].astype(np.float64)
        assert np.abs(got - expected).max() <= 1.0
        assert 0 < (expected % 255 != 0).mean()  # part of the image lies inside the window


def test_without_a_window_the_frame_spans_0_to_255() -> None:
    assert "WindowWidth" not in pydicom.dcmread(shipped("CT_small.dcm"), stop_before_pixels=True)
    pixels = rgb(shipped("CT_small.dcm"))
    assert (pixels.min(), pixels.max()) == (0, 255)


def test_a_narrow_window_saturates(tmp_path: Path) -> None:
    center = float(np.median(stored(shipped("MR_small.dcm"))))
    path = modified(tmp_path, "MR_small.dcm", "narrow.dcm", WindowCenter=center, WindowWidth=1)
    assert set(np.unique(rgb(path))) == {0, 255}


def test_a_voi_lut_maps_the_stored_values(tmp_path: Path) -> None:
    values = stored(shipped("MR_small.dcm"))
    low, high, step = int(values.min()), int(values.max()), int(np.median(values))
    lut = Dataset()
    lut.add_new(0x00283002, "US", [high - low + 1, low, 16])  # LUT Descriptor
    lut.add_new(0x00283006, "US", [0 if v < step else 4095 for v in range(low, high + 1)])
    path = modified(tmp_path, "MR_small.dcm", "voi.dcm", VOILUTSequence=[lut])
    np.testing.assert_array_equal(rgb(path)[:, :, 0], np.where(values < step, 0, 255))


def test_the_window_of_an_enhanced_object_comes_from_its_functional_groups(
    tmp_path: Path,
) -> None:
    center = float(np.median(stored(shipped("MR_small.dcm"))))
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = center, 1
    group = Dataset()
    group.FrameVOILUTSequence = [voi]
    path = modified(
        tmp_path,
        "MR_small.dcm",
        "enhanced.dcm",
        WindowCenter=None,
        WindowWidth=None,
        SharedFunctionalGroupsSequence=[group],
    )
    assert set(np.unique(rgb(path))) == {0, 255}


def test_palette_colour_becomes_rgb_with_distinct_channels() -> None:
    pixels = rgb(shipped("examples_palette.dcm"))
    assert dicom_info(shipped("examples_palette.dcm")).photometric == "PALETTE COLOR"
    assert not np.array_equal(pixels[:, :, 0], pixels[:, :, 1])
    assert not np.array_equal(pixels[:, :, 1], pixels[:, :, 2])


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG, YBR_FULL_422
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG kept in RGB
    ],
)
def test_ybr_colours_match_the_uncompressed_rgb_image(name: str) -> None:
    reference = rgb(shipped("SC_rgb_rle.dcm")).astype(np.float64)
    # Converting twice, or not at all, is off by about 90 on average; JPEG loss is below 3.
    assert np.abs(rgb(shipped(name)) - reference).mean() < 5


def test_cine_frames_are_counted_from_the_header_and_read_one_by_one() -> None:
    path = shipped("examples_ybr_color.dcm")
    info = dicom_info(path)
    assert (info.frames, info.modality, info.transfer_syntax) == (30, "US", "JPEG Baseline")
    assert (info.sop_class, info.photometric) == ("Ultrasound Multi-frame Image", "YBR_FULL_422")
    views = [rgb(path, k) for k in frame_indices(info.frames, 4)]
    assert len(views) == 4
    assert np.abs(views[0].astype(int) - views[-1]).mean() > 1
    with pytest.raises(DataError, match=r"has 30 frame\(s\); frame index 30 is out of range"):
        read_frame(path, 30)


@pytest.mark.parametrize(
    ("n_frames", "max_views", "expected"),
    [(30, 4, [0, 10, 19, 29]), (30, 2, [0, 29]), (30, 1, [0]), (3, 8, [0, 1, 2]), (1, 4, [0])],
)
def test_frame_indices_are_evenly_spaced(n_frames: int, max_views: int, expected: list) -> None:
    assert frame_indices(n_frames, max_views) == expected


def test_frame_indices_reject_nothing_to_choose() -> None:
    with pytest.raises(ValueError):
        frame_indices(0, 4)


def test_a_structured_report_has_no_pixel_data() -> None:
    path = shipped("test-SR.dcm")
    assert dicom_problem(path) == "is a DICOM without pixel data (Comprehensive SR)"
    info = dicom_info(path)
    assert (info.has_pixels, info.frames, info.modality) == (False, 0, "SR")
    with pytest.raises(DataError, match="without pixel data"):
        read_frame(path)
    assert describe(path) == {
        "format": "DICOM Explicit VR Little Endian",
        "photometric": "-",
        "frames": 0,
        "size": "-",
    }


def test_truncated_copies_give_a_one_line_reason(tmp_path: Path) -> None:
    cine = tmp_path / "cine"
    data = shipped("examples_ybr_color.dcm").read_bytes()
    cine.write_bytes(data[: int(len(data) * 0.6)])
    problem = str(dicom_problem(cine))
    assert problem.startswith("is a DICOM whose pixel data could not be decoded (at frame ")
    assert "\n" not in problem
    rgb(cine, 0)  # the first frames survive, which is why dicom_problem decodes them all
    with pytest.raises(DataError, match="could not be decoded"):
        read_frame(cine, 29)

    image, header = tmp_path / "image.dcm", tmp_path / "header.dcm"
    data = shipped("MR_small.dcm").read_bytes()
    image.write_bytes(data[: int(len(data) * 0.8)])
    header.write_bytes(data[:600])
    assert str(dicom_problem(image)).startswith("is a DICOM whose pixel data could not be decoded")
    assert dicom_problem(header) == (
        "is a DICOM without pixel data (MR Image), though its header describes an image "
        "(truncated?)"
    )


def _phi_files(tmp_path: Path) -> dict[str, Path]:
    def with_phi(name: str) -> Dataset:
        ds = pydicom.dcmread(shipped(name))
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "MRN123456"
        ds.PatientBirthDate = "19800101"
        ds.AccessionNumber = "ACC98765"
        return ds

    files = {}
    ds = with_phi("MR_small.dcm")
    files["intact"] = ds
    ds = with_phi("MR_small.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    files["short pixels"] = ds
    ds = with_phi("MR_small.dcm")
    del ds.PixelData
    files["no pixels"] = ds
    ds = with_phi("MR_small.dcm")
    # An invalid Number of Frames that repeats the patient ID: pydicom's error quotes it.
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 9, b"MRN123456", 0, False, True)
    files["echoing error"] = ds
    ds = with_phi("SC_rgb_jpeg_dcmtk.dcm")
    ds.PixelData = encapsulate([b"Doe^Jane MRN123456 19800101 ACC98765 " * 4])
    files["bad jpeg"] = ds
    paths = {}
    for label, ds in files.items():
        paths[label] = tmp_path / f"{label}.dcm"
        ds.save_as(paths[label])
    return paths


def test_no_identifying_header_value_reaches_any_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    paths = _phi_files(tmp_path)
    with pytest.raises(ValueError, match="MRN123456"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.pixels.pixel_array(paths["echoing error"])  # what would leak unsanitised
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    said: list[str] = []
    for label, path in paths.items():
        problem = dicom_problem(path)
        assert (problem is None) == (label == "intact"), label
        said += [str(problem), repr(dicom_info(path)), str(describe(path))]
        said.append(str(order_files([path])))
        try:
            said.append(repr(read_frame(path).size))
        except DataError as error:
            said += [str(error), str(error.hint)]
    captured = capfd.readouterr()
    said += [captured.out, captured.err, caplog.text]
    leaks = [
        (value, text)
        for text in said
        for value in PHI
        if re.search(rf"(?<![a-z0-9]){re.escape(value)}(?![a-z0-9])", text, re.IGNORECASE)
    ]
    assert not leaks


def test_a_missing_decoder_names_the_extra(tmp_path: Path) -> None:
    """Run in a child interpreter in which pylibjpeg and the other plugins cannot be imported,
    so pydicom's own availability checks see them missing (no monkeypatching of pydicom)."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls"):
            sys.modules[name] = None  # import of these now raises ImportError
        from pathlib import Path
        from omnifuse_cli.data.dicom_pixels import dicom_problem, read_frame
        from omnifuse_cli.errors import DataError
        for arg in sys.argv[1:]:
            print(dicom_problem(Path(arg)))
            try:
                read_frame(Path(arg))
            except DataError as err:
                print(err.hint)
        """
    )
    names = ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm"]
    run = subprocess.run(
        [sys.executable, "-c", script, *(str(shipped(n)) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        check=True,
    )
    assert run.stdout.splitlines() == [
        f"is a DICOM compressed with JPEG-LS Lossless, which needs the optional decoders: "
        f"{EXTRA_HINT}",
        EXTRA_HINT,
        f"is a DICOM compressed with JPEG Lossless, which needs the optional decoders: "
        f"{EXTRA_HINT}",
        EXTRA_HINT,
    ]


def test_order_files_by_instance_number_then_others_by_name(tmp_path: Path) -> None:
    a = modified(tmp_path, "MR_small.dcm", "a", InstanceNumber=3)
    b = modified(tmp_path, "MR_small.dcm", "b", InstanceNumber=1)
    c = modified(tmp_path, "MR_small.dcm", "c", InstanceNumber=2)
    png = tmp_path / "0.png"
    Image.new("L", (4, 4)).save(png)
    assert order_files([a, png, b, c]) == [b, c, a, png]
    unnumbered = modified(tmp_path, "MR_small.dcm", "d", InstanceNumber=None)
    assert order_files([c, unnumbered, a, b]) == [a, b, c, unnumbered]


def test_describe_dicom_and_ordinary_images(tmp_path: Path) -> None:
    png = tmp_path / "us.png"
    Image.new("L", (30, 20)).save(png)
    assert describe(png) == {"format": "PNG", "photometric": "L", "frames": 1, "size": "20 x 30"}
    assert describe(shipped("examples_ybr_color.dcm")) == {
        "format": "DICOM JPEG Baseline",
        "photometric": "YBR_FULL_422",
        "frames": 30,
        "size": "240 x 320",
    }
    assert describe(shipped("MR_small_jp2klossless.dcm"))["format"] == "DICOM JPEG 2000 Lossless"
    assert describe(shipped("MR_small_RLE.dcm"))["format"] == "DICOM RLE Lossless"


def test_without_pydicom_a_data_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert is_dicom(shipped("CT_small.dcm"))  # detection needs no pydicom
    with pytest.raises(DataError, match="needs pydicom") as err:
        dicom_info(shipped("CT_small.dcm"))
    assert err.value.hint == "pip install pydicom"
