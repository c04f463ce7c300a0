"""Issue 16, "real hospital data in": DICOM folders, long lab tables, note encodings, patients
with nothing, --threads and --test-ratio 0, through the real command line.

The DICOM files are the real ones the pydicom wheel ships (ultrasound palette, RGB and a 30-frame
JPEG cine, JPEG 2000, RLE, CT, MR, a structured report without pixels, a truncated file), plus a
MONOCHROME1 copy and a file renamed without extension written by the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import Result

from omnifuse_cli.config import parse_modality_options
from omnifuse_cli.data.images import DicomFrame, select_views
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.text import decode_note
from omnifuse_cli.engine.machine import cgroup_cpu_quota, usable_cpus

from .helpers import assert_ok, invoke

pydicom = pytest.importorskip("pydicom")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FAST = [
    "--image-backbone",
    "resnet18",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--no-pretrained-image",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--threads",
    "1",
]
PHI = ("Doe^Jane", "MRN-884-221", "19700101", "ACC-55501")


# Not helpers.flat: this one takes the result and also drops rich's box-drawing characters.
def flat(result: Result) -> str:
    """The output as one line of words: rich's table borders and line breaks removed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", result.output).split())


def ok(result: Result) -> Result:
    assert_ok(result)
    return result


# -- DICOM -------------------------------------------------------------------------------------


def dicom_cohort(root: Path) -> Path:
    """12 patients (2 classes) whose ultrasound column holds DICOM files of every kind, named
    as scanners export them: a folder, a glob, a file without extension, a cine loop."""
    us = root / "us"
    us.mkdir(parents=True)

    def copy(name: str, target: str) -> str:
        (us / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEST_FILES / name, us / target)
        return f"us/{target}"

    mono1 = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    mono1.PhotometricInterpretation = "MONOCHROME1"
    mono1.PatientName, mono1.PatientID = PHI[0], PHI[1]
    mono1.PatientBirthDate, mono1.AccessionNumber = PHI[2], PHI[3]
    mono1.save_as(us / "mono1.dcm")
    copy("SC_rgb_jpeg_dcmtk.dcm", "P9/IMG0001")  # no extension: DICOM by content
    copy("MR_small.dcm", "P10_a.dcm")
    copy("liver_1frame.dcm", "P10_b.dcm")
    cells = [
        copy("examples_palette.dcm", "palette.dcm"),  # ultrasound, PALETTE COLOR
        copy("examples_rgb_color.dcm", "rgb.dcm"),  # ultrasound, RGB
        copy("examples_ybr_color.dcm", "cine.dcm"),  # ultrasound, 30 frames, JPEG YBR
        copy("JPEG2000.dcm", "j2k.dcm"),
        copy("MR_small_RLE.dcm", "rle.dcm"),
        copy("CT_small.dcm", "ct.dcm"),
        "us/mono1.dcm",
        copy("rtdose_1frame.dcm", "dose.dcm"),
        "us/P9/IMG0001",
        "us/P9/",  # a folder
        "us/P10_*.dcm",  # a glob
        copy("test-SR.dcm", "report.dcm"),  # a structured report: no pixels
    ]
    cells[8] = copy("MR_truncated.dcm", "truncated.dcm")
    rng = np.random.default_rng(0)
    rows = []
    for i, cell in enumerate(cells):
        labs = json.dumps([round(float(v), 3) for v in rng.normal(i % 2, 1, 3)])
        rows.append(
            {
                "id": f"P{i:02d}",
                "label": i % 2,
                "labs": labs,
                "us": cell,
                "text": ["benign nodule", "suspicious mass"][i % 2],
            }
        )
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def dicom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dicom_cohort(tmp_path_factory.mktemp("dicom"))


def test_check_lists_every_undecodable_dicom_with_one_line_reason(dicom_manifest: Path) -> None:
    result = invoke("check", dicom_manifest, "--num-classes", "2")
    assert result.exit_code == 2
    err = result.stderr
    assert "report.dcm is a DICOM without pixel data (Comprehensive SR)" in err
    assert "truncated.dcm is a DICOM" in err
    assert "2 problem(s)" in err
    assert not any(phi in result.output for phi in PHI)


def test_a_dicom_cohort_goes_through_check_train_and_predict(
    dicom_manifest: Path, tmp_path: Path
) -> None:
    checked = flat(
        ok(
            invoke(
                "check",
                dicom_manifest,
                "--num-classes",
                "2",
                "--on-bad-file",
                "skip",
                "--train-ratio",
                "0.5",
                "--val-ratio",
                "0.25",
                "--test-ratio",
                "0.25",
            )
        )
    )
    for fragment in (
        "us files",
        "DICOM JPEG Baseline",
        "PALETTE COLOR",
        "MONOCHROME1",
        "YBR_FULL_422",
        "DICOM RLE Lossless",
        "DICOM JPEG 2000",
        "30",
        "skipped 2 unreadable us image(s)",
    ):
        assert fragment in checked, fragment
    cohort = read_manifest(dicom_manifest, parse_modality_options(None), on_bad_file="skip")
    views = {pid: v for pid, v in zip(cohort.ids, cohort.images["us"], strict=True)}
    assert views["P02"] == [
        DicomFrame(dicom_manifest.parent / "us" / "cine.dcm", k) for k in range(30)
    ]
    assert views["P08"] == []  # the truncated file, skipped
    assert [p.name for p in views["P09"]] == ["IMG0001"]  # the folder
    assert [p.name for p in views["P10"]] == ["P10_a.dcm", "P10_b.dcm"]  # the glob, by name

    run = tmp_path / "run"
    cache = tmp_path / "cache"
    ok(
        invoke(
            "train",
            dicom_manifest,
            "--num-classes",
            "2",
            "--out-dir",
            run,
            *FAST,
            "--on-bad-file",
            "skip",
            "--train-ratio",
            "0.5",
            "--val-ratio",
            "0.25",
            "--test-ratio",
            "0.25",
            "--cache-dir",
            cache,
        )
    )
    out = tmp_path / "pred.csv"
    predicted = ok(
        invoke(
            "predict",
            dicom_manifest,
            "--run",
            run,
            "--out",
            out,
            "--device",
            "cpu",
            "--cache-dir",
            cache,
        )
    )
    frame = pd.read_csv(out)
    assert len(frame) == 12
    # predict scores every readable patient and gives the others their one-line reason
    assert frame["pred"].notna().sum() == 10
    reasons = frame.set_index("id")["reason"]
    assert "report.dcm is a DICOM without pixel data (Comprehensive SR)" in reasons["P11"]
    assert "truncated.dcm is a DICOM" in reasons["P08"]
    # No header value that identifies a person reaches the run folder, the cache or the output.
    written = b"".join(
        p.read_bytes() for folder in (run, cache) for p in folder.rglob("*") if p.is_file()
    )
    for phi in PHI:
        assert phi.encode() not in written and phi not in predicted.output


def test_cine_frames_are_evenly_spaced_views() -> None:
    cine = [DicomFrame(Path("c.dcm"), k) for k in range(30)]
    assert [v.index for v in select_views(cine, 4)] == [0, 10, 19, 29]
    files = [Path(f"{k}.png") for k in range(6)]
    assert select_views(files, 4) == files[:4]  # plain images: the first ones, as before


# -- long lab tables -------------------------------------------------------------------------


def test_long_lab_table_trains_and_predicts_the_same_way(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    frame = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    data = Path(shutil.copytree(tiny_manifest.parent, tmp_path / "data"))
    rows = []
    for _, row in frame.iterrows():
        if not row["labs"]:
            continue
        for j, value in enumerate(json.loads(row["labs"])):
            if value is None:
                continue
            # an older, different value first: last-by-time must pick the later one
            rows.append(
                {
                    "patient": row["id"],
                    "test": f"a{j}",
                    "value": "999",
                    "time": "2024-01-01 08:00",
                    "unit": "mg/dL",
                }
            )
            rows.append(
                {
                    "patient": row["id"],
                    "test": f"a{j}",
                    "value": str(value),
                    "time": "2024-01-02 08:00",
                    "unit": "mg/dL",
                }
            )
    rows.append(
        {
            "patient": frame["id"][0],
            "test": "a0",
            "value": "<0.5",
            "time": "2024-01-03 08:00",
            "unit": "mg/dL",
        }
    )
    long = pd.DataFrame(rows).iloc[::-1]  # out of time order
    long.to_csv(data / "labs_long.csv", index=False)
    frame.drop(columns=["labs"]).to_csv(data / "no_labs.csv", index=False)
    checked = flat(
        ok(
            invoke(
                "check",
                data / "no_labs.csv",
                "--labs-table",
                data / "labs_long.csv",
                "--labs-id-col",
                "patient",
            )
        )
    )
    assert "long lab table" in checked and "'<0.5' (a0, 1x" in checked
    run = tmp_path / "run"
    ok(
        invoke(
            "train",
            data / "no_labs.csv",
            "--num-classes",
            "3",
            "--labs-table",
            data / "labs_long.csv",
            "--labs-id-col",
            "patient",
            "--out-dir",
            run,
            *FAST,
            "--train-ratio",
            "0.6",
            "--val-ratio",
            "0.2",
            "--test-ratio",
            "0.2",
        )
    )
    meta = dict(pd.read_csv(run / "meta.csv", dtype=str).values)
    assert (meta["labs_format"], meta["labs_agg"]) == ("auto", "last")
    cohort = read_manifest(
        data / "no_labs.csv",
        parse_modality_options(None),
        labs_table=data / "labs_long.csv",
        labs_id_col="patient",
    )
    wide = read_manifest(tiny_manifest, parse_modality_options(None))
    np.testing.assert_array_equal(cohort.vectors["labs"], wide.vectors["labs"])
    out = tmp_path / "pred.csv"
    ok(
        invoke(
            "predict",
            data / "no_labs.csv",
            "--run",
            run,
            "--out",
            out,
            "--labs-table",
            data / "labs_long.csv",
            "--device",
            "cpu",
        )
    )
    assert pd.read_csv(out)["modalities"].str.contains("labs").sum() == 20


# -- note encodings ----------------------------------------------------------------------------


WESTERN = "Paciente naïve, 38,5 °C, “febril” – señora Müller, Größe 1,80 m; café."
CHINESE = "患者女性，45岁，甲状腺右叶低回声结节，边界不清。"
BATTERY = [
    (WESTERN.encode("utf-8"), WESTERN, False),
    (b"\xef\xbb\xbf" + WESTERN.encode("utf-8"), WESTERN, False),
    (WESTERN.encode("utf-16"), WESTERN, False),  # with BOM
    (WESTERN.encode("utf-16-le"), WESTERN, True),
    (WESTERN.encode("utf-16-be"), WESTERN, True),
    (CHINESE.encode("utf-16"), CHINESE, False),
    (CHINESE.encode("gb18030"), CHINESE, True),
    ("结节".encode("gb18030"), "结节", True),
    (WESTERN.encode("cp1252"), WESTERN, True),
    ("naïve".encode("cp1252"), "naïve", True),  # GB18030 would read 'na飗e'
    ("38°C".encode("cp1252"), "38°C", True),
    ("año".encode("latin-1"), "año", True),
    ("Señora con náuseas, 39°C".encode("latin-1"), "Señora con náuseas, 39°C", True),
]


@pytest.mark.parametrize(("raw", "text", "guessed"), BATTERY)
def test_every_encoding_of_the_battery_decodes_to_the_right_characters(
    raw: bytes, text: str, guessed: bool
) -> None:
    decoded = decode_note(raw)
    assert decoded.text == text and decoded.guessed == guessed


def test_garbage_is_never_decoded_silently() -> None:
    for raw in (b"\xff\xfe\xfa" * 10, bytes(range(0x80, 0xA0)) * 3, b"\x00\x01\x02abc"):
        with pytest.raises(ValueError, match="--encoding"):
            decode_note(raw)
    with pytest.raises(ValueError, match=r"not valid utf-8 text \(byte 0xef"):
        decode_note("naïve".encode("cp1252"), "utf-8")
    assert decode_note(b"\xef\xbb\xbfna\xc3\xafve", "utf-8").text == "naïve"  # BOM dropped


def test_check_lists_encodings_guessed_files_and_empty_notes(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_bytes(WESTERN.encode("cp1252"))
    (notes / "b.txt").write_bytes(CHINESE.encode("gb18030"))
    (notes / "c.txt").write_bytes(WESTERN.encode("utf-16"))
    (notes / "d.txt").write_bytes(b"  \n ")
    (notes / "e.txt").write_bytes(WESTERN.encode("utf-8"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,label,labs,text\n1,0,[1],notes/a.txt\n2,1,[2],notes/b.txt\n"
        "3,0,[3],notes/c.txt\n4,1,[4],notes/d.txt\n5,0,[5],notes/e.txt\n"
        "6,1,[6],see notes/x.txt\n",
        encoding="utf-8",
    )
    modalities = ["--modality", "labs=vector", "--modality", "text=text"]
    out = flat(invoke("check", manifest, *modalities))  # (too few patients to split: exit 2)
    assert "cp1252 file 1" in out and "gb18030 file 1" in out and "utf-16 file 1" in out
    assert "utf-8 file 2" in out and "empty (missing text) 1" in out
    assert "the encoding of 2 text note file(s) was guessed" in out
    assert "a.txt (cp1252)" in out and "b.txt (gb18030)" in out
    assert "look like a file path but no such file exists" in out
    cohort = read_manifest(manifest, parse_modality_options(["labs=vector", "text=text"]))
    assert cohort.texts["text"] == [WESTERN, CHINESE, WESTERN, None, WESTERN, "see notes/x.txt"]
    refused = invoke("check", manifest, *modalities, "--encoding", "utf-8")
    assert refused.exit_code == 2 and "is not valid utf-8 text" in refused.stderr
    unknown = invoke("check", manifest, *modalities, "--encoding", "klingon")
    assert unknown.exit_code == 2 and "'klingon' is not an encoding" in unknown.stderr


# -- machine use ---------------------------------------------------------------------------------


def test_threads_follow_omp_affinity_and_the_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert usable_cpus() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(tmp_path) == 4
    assert cgroup_cpu_quota(tmp_path / "nowhere") is None


def test_test_ratio_0_trains_on_train_and_validation_only(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    out = flat(
        ok(
            invoke(
                "train",
                tiny_manifest,
                "--num-classes",
                "3",
                "--out-dir",
                run,
                *FAST,
                "--train-ratio",
                "0.7",
                "--val-ratio",
                "0.3",
                "--test-ratio",
                "0",
            )
        )
    )
    assert "no internal test split (--test-ratio 0)" in out
    split = pd.read_csv(run / "split_assignment.csv")
    assert set(split["split"]) == {"train", "val"}
    assert not (run / "test.csv").exists()
    refused = invoke("evaluate", run, "--device", "cpu")
    assert refused.exit_code == 2 and "has no test split" in refused.stderr
    assert "--manifest TEST.csv" in refused.stderr
    evaluated = ok(
        invoke("evaluate", run, "--manifest", tiny_manifest, "--device", "cpu", "--bootstrap", "20")
    )
    assert "(30 patients)" in flat(evaluated)
    ok(invoke("report", run))
    assert (run / "report.html").is_file()
