"""Every manifest format read_manifest accepts, and every error it reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from omnifuse_cli.config import (
    DEFAULT_MODALITIES,
    ImageConfig,
    ModalitySpec,
    TextConfig,
    parse_modality_options,
)
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.data.tables import normalize_id
from omnifuse_cli.data.text import PAD, UNK, encode, encode_many, fit_vocabulary, tokenize
from omnifuse_cli.errors import ConfigError, ManifestError

PngFn = Callable[..., Path]
LABS = parse_modality_options(["labs=vector"])
US = parse_modality_options(["us=image"])
TEXT = parse_modality_options(["text=text"])


def write(folder: Path, text: str, name: str = "manifest.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def labs_of(cohort: Cohort, row: int) -> list[float]:
    return cohort.vectors["labs"][row].tolist()


# -- ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("7", "0000000007"),
        (7, "0000000007"),
        ("0042", "0000000042"),
        ("7.0", "0000000007"),
        (" 123 ", "0000000123"),
        ("12345678901", "12345678901"),
        ("P-007", "P-007"),
        (" abc ", "abc"),
        ("7.5", "7.5"),
    ],
)
def test_normalize_id(raw: object, expected: str) -> None:
    assert normalize_id(raw) == expected


def test_numeric_ids_are_zero_padded_and_others_kept(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n7,0,"[1]"\n0012,1,"[2]"\nabc-1,0,"[3]"\n')
    cohort = read_manifest(path, LABS)
    assert cohort.ids == ["0000000007", "0000000012", "abc-1"]
    assert cohort.labels.tolist() == [0, 1, 0]
    assert cohort.labels.dtype == np.int64


# -- vector cells -----------------------------------------------------------------------------


def test_inline_json_labs_with_null_is_nan_and_masked(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,0,"[1.5, null, 3]"\n2,1,"[2, 4, 6]"\n')
    cohort = read_manifest(path, LABS)
    first = labs_of(cohort, 0)
    assert first[0] == 1.5 and math.isnan(first[1]) and first[2] == 3.0
    assert labs_of(cohort, 1) == [2.0, 4.0, 6.0]
    assert cohort.present[:, 0].tolist() == [True, True]
    assert cohort.vector_columns["labs"] == ["labs_0", "labs_1", "labs_2"]
    # The value mask travels into the model inputs; the NaN never becomes a silent value.
    pre = Preprocessor.fit(cohort, ImageConfig(), TextConfig())
    x, mask = pre.prepare(cohort).vectors["labs"]
    assert mask.tolist() == [[True, False, True], [True, True, True]]
    assert x[0, 1].item() == 0.0
    assert not bool(x.isnan().any())
    # Column 1 has one observed value: mean 4, std 1 (too few values to estimate).
    assert pre.vector_stats["labs"]["mean"] == pytest.approx([1.75, 4.0, 4.5])
    assert pre.vector_stats["labs"]["std"][1] == 1.0


@pytest.mark.parametrize("shape", [(3,), (1, 3), (3, 1)])
def test_npy_path_labs(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "p1.npy", np.array([0.5, 1.5, 2.5]).reshape(shape))
    path = write(tmp_path, "id,label,labs\n1,0,p1.npy\n")
    cohort = read_manifest(path, LABS)
    assert labs_of(cohort, 0) == [0.5, 1.5, 2.5]
    assert cohort.vectors["labs"].dtype == np.float32


def test_npy_of_wrong_shape_is_reported(tmp_path: Path) -> None:
    np.save(tmp_path / "p1.npy", np.ones((2, 3)))
    path = write(tmp_path, "id,label,labs\n1,0,p1.npy\n")
    with pytest.raises(
        ManifestError,
        match=r"row 2 \(id 0000000001\), column 'labs': "
        r"p1\.npy has shape \(2, 3\)",
    ):
        read_manifest(path, LABS)


@pytest.mark.parametrize(
    "content", ["1.0,2.0,3.0\n", "ALT,AST,GGT\n1.0,2.0,3.0\n", "1.0, 2.0 ,3.0\n\n"]
)
def test_one_row_csv_path_labs(tmp_path: Path, content: str) -> None:
    write(tmp_path, content, "labs/p1.csv")
    path = write(tmp_path, "id,label,labs\n1,0,labs/p1.csv\n")
    assert labs_of(read_manifest(path, LABS), 0) == [1.0, 2.0, 3.0]


def test_csv_path_with_empty_value_is_nan(tmp_path: Path) -> None:
    write(tmp_path, "1.0,,3.0\n", "p1.csv")
    path = write(tmp_path, "id,label,labs\n1,0,p1.csv\n")
    values = labs_of(read_manifest(path, LABS), 0)
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 3.0


def test_csv_path_with_two_numeric_rows_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "1,2\n3,4\n", "p1.csv")
    path = write(tmp_path, "id,label,labs\n1,0,p1.csv\n")
    with pytest.raises(ManifestError, match="must hold one row of numbers, found 2 rows"):
        read_manifest(path, LABS)


# -- labs table -------------------------------------------------------------------------------


def test_labs_table_ids_matched_after_zero_padding(tmp_path: Path) -> None:
    table = write(tmp_path, "patient_id,ALT,AST\n0000000007,1,2\n8,3,\nP9,5,6\n", "labs.csv")
    path = write(tmp_path, "id,label,us\n7,0,\n0008,1,\nP9,0,\n")
    cohort = read_manifest(
        path,
        parse_modality_options(["labs=vector", "us=image"]),
        labs_table=table,
        labs_id_col="patient_id",
    )
    assert cohort.vector_columns["labs"] == ["ALT", "AST"]
    assert labs_of(cohort, 0) == [1.0, 2.0]
    assert labs_of(cohort, 1)[0] == 3.0 and math.isnan(labs_of(cohort, 1)[1])
    assert labs_of(cohort, 2) == [5.0, 6.0]
    assert cohort.present.tolist() == [[True, False]] * 3
    assert cohort.notes == []


def test_labs_table_partial_match_adds_note_with_counts(tmp_path: Path) -> None:
    table = write(tmp_path, "id,ALT\n1,10\n2,20\n", "labs.csv")
    path = write(tmp_path, "id,label,text\n1,0,a\n2,1,b\n3,0,c\n4,1,d\n")
    cohort = read_manifest(
        path, parse_modality_options(["labs=vector", "text=text"]), labs_table=table
    )
    assert cohort.present[:, 0].tolist() == [True, True, False, False]
    assert np.isnan(cohort.vectors["labs"][2:]).all()
    assert len(cohort.notes) == 1
    assert "matched 2 of 4" in cohort.notes[0]
    assert "other 2 patients" in cohort.notes[0]


def test_labs_table_matching_no_id_raises(tmp_path: Path) -> None:
    table = write(tmp_path, "id,ALT\n100,10\n200,20\n", "labs.csv")
    path = write(tmp_path, "id,label,text\n1,0,a\n2,1,b\n")
    with pytest.raises(ManifestError, match="matches none of the 2 manifest ids"):
        read_manifest(path, parse_modality_options(["labs=vector", "text=text"]), labs_table=table)


def test_labs_table_without_its_id_column_raises(tmp_path: Path) -> None:
    table = write(tmp_path, "pid,ALT\n1,10\n", "labs.csv")
    path = write(tmp_path, "id,label,text\n1,0,a\n")
    with pytest.raises(ManifestError, match="no id column 'id'.*pid, ALT"):
        read_manifest(path, parse_modality_options(["labs=vector", "text=text"]), labs_table=table)


# -- image cells ------------------------------------------------------------------------------


@pytest.mark.parametrize("sep", [";", "|", " ; ", " | "])
def test_several_image_paths_in_one_cell(tmp_path: Path, write_png: PngFn, sep: str) -> None:
    a = write_png(tmp_path / "us" / "a.png", 0.2)
    b = write_png(tmp_path / "us" / "b.png", 0.8)
    path = write(tmp_path, f"id,label,us\n1,0,us/a.png{sep}us/b.png\n2,1,us/b.png\n")
    cohort = read_manifest(path, US)
    assert cohort.images["us"] == [[a, b], [b]]


def test_paths_are_relative_to_the_manifest_folder(
    tmp_path: Path, write_png: PngFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "site" / "data"
    png = write_png(data / "us" / "a.png", 0.5)
    write(data, "note", "notes/n1.txt")
    write(data, "id,label,us,text\n1,0,us/a.png,notes/n1.txt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cohort = read_manifest(Path("..") / "site" / "data" / "manifest.csv", DEFAULT_MODALITIES[1:])
    assert cohort.images["us"][0][0].resolve() == png.resolve()
    assert cohort.texts["text"] == ["note"]


def test_windows_backslash_paths(tmp_path: Path, write_png: PngFn) -> None:
    png = write_png(tmp_path / "us" / "a.png", 0.5)
    (tmp_path / "labs").mkdir()
    np.save(tmp_path / "labs" / "p.npy", np.array([1.0, 2.0]))
    path = write(tmp_path, "id,label,labs,us\n1,0,labs\\p.npy,us\\a.png\n")
    cohort = read_manifest(path, parse_modality_options(["labs=vector", "us=image"]))
    assert cohort.images["us"] == [[png]]
    assert labs_of(cohort, 0) == [1.0, 2.0]


def test_missing_image_files_all_listed_in_one_error(tmp_path: Path, write_png: PngFn) -> None:
    write_png(tmp_path / "us" / "ok.png", 0.5)
    path = write(
        tmp_path, "id,label,us\n1,0,us/ok.png\n2,1,us/gone1.png\n3,0,us/ok.png;us/gone2.png\n"
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(path, US)
    message = str(info.value)
    assert "(2 problem(s))" in message
    assert "row 3 (id 0000000002), column 'us'" in message and "gone1.png does not exist" in message
    assert "row 4 (id 0000000003), column 'us'" in message and "gone2.png does not exist" in message
    # check_files=False (prediction of patients whose images are elsewhere) does not look.
    assert len(read_manifest(path, US, check_files=False)) == 3


# -- text cells -------------------------------------------------------------------------------


def test_inline_text_and_txt_paths_utf8_and_gb18030(tmp_path: Path) -> None:
    note = "甲状腺结节，边界清楚，TI-RADS 3类"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "u.txt").write_bytes(note.encode("utf-8"))
    gb = note.encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        gb.decode("utf-8")  # the file really is not UTF-8
    (tmp_path / "notes" / "g.txt").write_bytes(gb)
    (tmp_path / "notes" / "b.txt").write_bytes(b"\xef\xbb\xbf" + note.encode("utf-8"))
    path = write(
        tmp_path, f"id,label,text\n1,0,{note}\n2,1,notes/u.txt\n3,0,notes/g.txt\n4,1,notes/b.txt\n"
    )
    cohort = read_manifest(path, TEXT)
    assert cohort.texts["text"] == [note, note, note, note]


def test_a_note_that_looks_like_a_missing_file_is_inline_text_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path, "id,label,text\n1,0,notes/none.txt\n2,1,see report.txt\n")
    cohort = read_manifest(path, TEXT)
    assert cohort.texts["text"] == ["notes/none.txt", "see report.txt"]
    assert cohort.note_stats["text"].path_like == [
        "row 2 (id 0000000001): 'notes/none.txt'",
        "row 3 (id 0000000002): 'see report.txt'",
    ]
    assert any("look like a file path but no such file exists" in n for n in cohort.notes)


# -- presence ---------------------------------------------------------------------------------


def test_empty_cell_is_a_missing_modality(tmp_path: Path, write_png: PngFn) -> None:
    write_png(tmp_path / "a.png", 0.5)
    path = write(
        tmp_path,
        'id,label,labs,us,text\n1,0,"[1, 2]",a.png,hi\n2,1,,a.png,\n3,0,"[3, 4]",,\n4,1,,  ,note\n',
    )
    cohort = read_manifest(path, DEFAULT_MODALITIES)
    assert cohort.present.tolist() == [
        [True, True, True],
        [False, True, False],
        [True, False, False],
        [False, False, True],
    ]
    assert np.isnan(cohort.vectors["labs"][1]).all()
    assert cohort.images["us"][2] == [] and cohort.images["us"][3] == []
    assert cohort.texts["text"] == ["hi", None, None, "note"]
    assert cohort.names == ["labs", "us", "text"]


def test_utf8_bom_at_file_start(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "id,label,text\n5,1,肝功能异常\n".encode())
    cohort = read_manifest(path, TEXT)
    assert cohort.ids == ["0000000005"]
    assert cohort.texts["text"] == ["肝功能异常"]


def test_vscode_link_cell_mentions_vs_code(tmp_path: Path) -> None:
    path = write(tmp_path, "id,label,us\n1,0,http://_vscodecontentref_/3\n")
    with pytest.raises(ManifestError, match=r"row 2 \(id 0000000001\), column 'us'.*VS Code link"):
        read_manifest(path, US)


def test_vscode_link_as_manifest_path_mentions_vs_code() -> None:
    with pytest.raises(ManifestError, match="VS Code link") as info:
        read_manifest(Path("http://_vscodecontentref_/0"), US)
    assert "_vscodecontentref_" in (info.value.hint or "")


# -- custom modalities ------------------------------------------------------------------------


def test_custom_modalities_with_two_image_columns(tmp_path: Path, write_png: PngFn) -> None:
    for name in ("c1", "c2", "m1"):
        write_png(tmp_path / "img" / f"{name}.png", 0.3)
    write(tmp_path, "报告全文", "r2.txt")
    specs = parse_modality_options(
        ["lab=vector", "ct=image", "mri=image", "report=text", "extra=vector"]
    )
    assert [(s.name, s.kind) for s in specs] == [
        ("lab", "vector"),
        ("ct", "image"),
        ("mri", "image"),
        ("report", "text"),
        ("extra", "vector"),
    ]
    path = write(
        tmp_path,
        "id,label,lab,ct,mri,report,extra,unused\n"
        '1,0,"[1, 2, 3]",img/c1.png;img/c2.png,img/m1.png,短报告,"[9]",x\n'
        "2,1,,,img/m1.png,r2.txt,,y\n",
    )
    cohort = read_manifest(path, specs)
    assert cohort.names == ["lab", "ct", "mri", "report", "extra"]
    assert cohort.vectors["lab"].shape == (2, 3)
    assert cohort.vectors["extra"].shape == (2, 1)
    assert [len(p) for p in cohort.images["ct"]] == [2, 0]
    assert [len(p) for p in cohort.images["mri"]] == [1, 1]
    assert cohort.texts["report"] == ["短报告", "报告全文"]
    assert cohort.present.tolist() == [[True] * 5, [False, False, True, True, False]]


def test_parse_modality_options_defaults_and_errors() -> None:
    assert parse_modality_options(None) == DEFAULT_MODALITIES
    assert parse_modality_options([]) == DEFAULT_MODALITIES
    assert parse_modality_options([" ct = IMAGE "]) == (ModalitySpec("ct", "image"),)
    with pytest.raises(ConfigError, match="is not NAME=KIND"):
        parse_modality_options(["ct"])
    with pytest.raises(ConfigError, match="unknown kind 'audio'"):
        parse_modality_options(["voice=audio"])
    with pytest.raises(ConfigError, match="declares ct more than once"):
        parse_modality_options(["ct=image", "ct=text"])
    with pytest.raises(ConfigError, match="not a valid column name"):
        parse_modality_options(["1ct=image"])


# -- errors -----------------------------------------------------------------------------------


def test_missing_modality_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,0,"[1]"\n')
    with pytest.raises(ManifestError, match=r"lacks column\(s\) us, text") as info:
        read_manifest(path, DEFAULT_MODALITIES)
    assert "--modality" in (info.value.hint or "")


def test_missing_id_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'patient,label,labs\n1,0,"[1]"\n')
    with pytest.raises(ManifestError, match="has no 'id' column"):
        read_manifest(path, LABS)


def test_missing_label_column_only_matters_when_labels_are_required(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,labs\n1,"[1]"\n')
    with pytest.raises(ManifestError, match="no 'label' column"):
        read_manifest(path, LABS)
    assert read_manifest(path, LABS, require_labels=False).labels is None


def test_duplicate_id_after_zero_padding(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n7,0,"[1]"\n8,1,"[1]"\n0000000007,1,"[2]"\n')
    with pytest.raises(
        ManifestError,
        match=r"row 4 \(id 0000000007\), column 'id': duplicate id '0000000007' "
        r"\(first at row 2\)",
    ):
        read_manifest(path, LABS)


@pytest.mark.parametrize("bad", ["1.5", "abc", "one"])
def test_non_integer_label(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, f'id,label,labs\n1,0,"[1]"\n2,{bad},"[1]"\n')
    with pytest.raises(
        ManifestError,
        match=rf"row 3 \(id 0000000002\), column 'label': "
        rf"'{bad}' is not an integer",
    ):
        read_manifest(path, LABS)


def test_integer_valued_float_label_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,1.0,"[1]"\n2,2,"[1]"\n')
    assert read_manifest(path, LABS, num_classes=3).labels.tolist() == [1, 2]


def test_label_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,0,"[1]"\n2,2,"[1]"\n3,-1,"[1]"\n')
    with pytest.raises(ManifestError) as info:
        read_manifest(path, LABS, num_classes=2)
    message = str(info.value)
    assert "row 3 (id 0000000002), column 'label': 2 is outside 0..1 (--num-classes)" in message
    assert "row 4 (id 0000000003), column 'label': -1 is outside 0..1" in message


def test_patient_with_no_modality(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs,text\n1,0,"[1]",a\n2,1,,\n3,0,,b\n4,1,, \n')
    modalities = parse_modality_options(["labs=vector", "text=text"])
    with pytest.raises(
        ManifestError,
        match=r"2 patient\(s\) have no modality at all: "
        r"row 3 \(id 0000000002\), row 5 \(id 0000000004\)",
    ):
        read_manifest(path, modalities, on_empty_patient="error")
    cohort = read_manifest(path, modalities)  # the default: left out, with a note
    assert cohort.ids == ["0000000001", "0000000003"]
    assert cohort.labels.tolist() == [0, 0]
    assert cohort.excluded == [("0000000002", 1), ("0000000004", 1)]
    assert cohort.notes == [
        "left out 2 patient(s) with no modality at all (--on-empty-patient "
        "skip): row 3 (id 0000000002), row 5 (id 0000000004)"
    ]
    nothing = write(tmp_path, "id,label,labs,text\n1,0,,\n", "nothing.csv")
    with pytest.raises(ManifestError, match="none of the 1 patients has any modality"):
        read_manifest(nothing, modalities)


def test_keep_bad_rows_marks_each_unusable_patient_and_keeps_the_rest(
    tmp_path: Path, write_png: PngFn
) -> None:
    write_png(tmp_path / "us" / "ok.png", 0.5)
    path = write(
        tmp_path,
        'id,label,labs,us\n1,0,"[1, 2]",us/ok.png\n2,1,,\n'
        '3,0,"[1, 2]",us/gone.png\n4,1,"[1]",\n5,0,,us/ok.png\n',
    )
    modalities = parse_modality_options(["labs=vector", "us=image"])
    with pytest.raises(ManifestError):
        read_manifest(path, modalities)  # train/evaluate: the whole file fails
    cohort = read_manifest(path, modalities, keep_bad_rows=True)
    assert sorted(cohort.bad_rows) == [1, 2, 3]
    assert cohort.bad_rows[1] == ["no modality present"]
    assert cohort.bad_rows[2][0].startswith("row 4, column 'us': image ")
    assert "gone.png does not exist" in cohort.bad_rows[2][0]
    assert cohort.bad_rows[3] == ["row 5, column 'labs': vector has 1 values, most rows have 2"]
    # Unusable rows carry nothing that could be loaded later; the others are intact.
    assert not cohort.present[[1, 2, 3]].any() and cohort.images["us"][2] == []
    assert cohort.present[[0, 4]].tolist() == [[True, True], [False, True]]
    np.testing.assert_array_equal(cohort.vectors["labs"][0], [1, 2])


def test_vectors_of_differing_lengths(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,0,"[1, 2, 3]"\n2,1,"[1, 2]"\n3,0,"[4, 5, 6]"\n')
    with pytest.raises(
        ManifestError,
        match=r"row 3 \(id 0000000002\), column 'labs': vector has 2 values, "
        r"most rows have 3",
    ):
        read_manifest(path, LABS)


@pytest.mark.parametrize("cell", ['"[1, Infinity, 2]"', '"[1, -Infinity]"', "p.csv"])
def test_infinite_lab_value(tmp_path: Path, cell: str) -> None:
    write(tmp_path, "1,inf,2\n", "p.csv")
    path = write(tmp_path, f"id,label,labs\n1,0,{cell}\n")
    with pytest.raises(ManifestError, match="value 2 is infinite"):
        read_manifest(path, LABS)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ('"[1, 2,"', "Expecting value"),
        ("hello", "neither a JSON list"),
        ('"[1, ""x""]"', r"value 2 \('x'\) is not a number"),
        ('"[[1], [2]]"', "flat JSON list"),
        ('"[]"', "empty vector"),
        ("gone.npy", "does not exist"),
    ],
)
def test_unreadable_vector_cells(tmp_path: Path, cell: str, message: str) -> None:
    path = write(tmp_path, f"id,label,labs\n1,0,{cell}\n")
    with pytest.raises(
        ManifestError, match=rf"row 2 \(id 0000000001\), column 'labs': .*{message}"
    ):
        read_manifest(path, LABS)


def test_problems_of_several_kinds_come_in_one_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'id,label,labs\n1,x,"[1]"\n1,0,garbage\n')
    with pytest.raises(ManifestError, match=r"\(3 problem\(s\)\)") as info:
        read_manifest(path, LABS)
    assert info.value.hint is not None


def test_files_that_are_not_manifests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv", LABS)
    with pytest.raises(ManifestError, match="is a folder"):
        read_manifest(tmp_path, LABS)
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(ManifestError, match="binary file"):
        read_manifest(tmp_path / "bin.csv", LABS)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest(tmp_path / "empty.csv", LABS)
    (tmp_path / "gb.csv").write_bytes("id,label,text\n1,0,甲状腺结节\n".encode("gb18030"))
    assert read_manifest(tmp_path / "gb.csv", TEXT).texts["text"] == ["甲状腺结节"]
    with pytest.raises(ManifestError, match="not a readable CSV"):
        read_manifest(tmp_path / "gb.csv", TEXT, encoding="utf-8")
    header_only = write(tmp_path, "id,label,labs\n", "header.csv")
    with pytest.raises(ManifestError, match="has a header but no patients"):
        read_manifest(header_only, LABS)


# -- simple text tokenizer --------------------------------------------------------------------


def test_tokenize_chinese_characters_bigrams_and_latin_words() -> None:
    # ngrams=1: the first version's tokenizer, which bundles trained with it keep
    assert tokenize("甲状腺结节，TI-RADS 4类", ngrams=1) == [
        "甲",
        "状",
        "腺",
        "结",
        "节",
        "甲状",
        "状腺",
        "腺结",
        "结节",
        "ti",
        "rads",
        "4",
        "类",
    ]
    assert tokenize("Size 2cm", ngrams=1) == ["size", "2cm"]
    assert tokenize("，。！") == []
    assert tokenize("") == []
    # the default: word pairs and Chinese character triples as well
    assert tokenize("甲状腺结节，TI-RADS 4类") == [
        "甲",
        "状",
        "腺",
        "结",
        "节",
        "甲状",
        "状腺",
        "腺结",
        "结节",
        "甲状腺",
        "状腺结",
        "腺结节",
        "ti",
        "rads",
        "4",
        "类",
        "ti rads",
        "rads 4",
    ]
    assert tokenize("No acute distress.") == [
        "no",
        "acute",
        "distress",
        "no acute",
        "acute distress",
    ]


def test_sublinear_ngram_tfidf_matches_scikit_learn() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [
        "chest pain, chest pain and fever",
        "no fever no pain",
        "pain in chest",
        "fever fever fever since monday",
        "甲状腺结节 结节 fever",
    ]
    vocab, idf = fit_vocabulary(texts, size=1000, min_freq=2)
    index = {t: i for i, t in enumerate(vocab)}
    reference = TfidfVectorizer(analyzer=lambda t: tokenize(t), sublinear_tf=True, min_df=2)
    matrix = reference.fit_transform(texts).toarray()
    names = list(reference.get_feature_names_out())
    assert sorted(vocab[2:]) == sorted(names)
    for row, text in zip(matrix, texts, strict=True):
        ids, weights = encode(text, index, idf, max_length=100)
        # Unknown n-grams (df 1) share the <unk> slot here; TfidfVectorizer drops them.
        known = {vocab[i]: w for i, w in zip(ids, weights, strict=True) if i != index[UNK]}
        expected = {n: v for n, v in zip(names, row, strict=True) if v}
        scale = np.linalg.norm(list(known.values())) / np.linalg.norm(list(expected.values()))
        assert known.keys() == expected.keys()
        for name, value in expected.items():
            assert known[name] == pytest.approx(value * scale)
    flat_ids, flat_weights, offsets = encode_many(texts, index, idf, 100)
    for k, text in enumerate(texts):
        ids, weights = encode(text, index, idf, max_length=100)
        assert flat_ids[offsets[k] : offsets[k + 1]].tolist() == ids
        np.testing.assert_allclose(flat_weights[offsets[k] : offsets[k + 1]], weights, rtol=1e-6)


def test_fit_vocabulary_is_deterministic_frequency_then_alphabetical() -> None:
    texts = ["b a", "a c", None, "c a", "", "d"]
    vocab, _ = fit_vocabulary(texts, size=10, min_freq=1, ngrams=1)
    assert vocab == [PAD, UNK, "a", "c", "b", "d"]
    assert fit_vocabulary(list(reversed(texts)), size=10, min_freq=1, ngrams=1)[0] == vocab
    assert fit_vocabulary(texts, size=4, min_freq=1, ngrams=1)[0] == [PAD, UNK, "a", "c"]
    assert fit_vocabulary(texts, size=10, min_freq=2, ngrams=1)[0] == [PAD, UNK, "a", "c"]


def test_fit_vocabulary_idf_matches_scikit_learn() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["b a", "a c", "c a", "d a b"]
    vocab, idf = fit_vocabulary(texts, size=10, min_freq=1, ngrams=1)
    reference = TfidfVectorizer(token_pattern=r"\S+").fit(texts)
    expected = dict(zip(reference.get_feature_names_out(), reference.idf_, strict=True))
    assert idf[:2] == [0.0, 1.0]
    for token, value in zip(vocab[2:], idf[2:], strict=True):
        assert value == pytest.approx(expected[token])


def test_encode_maps_unknown_tokens_and_truncates() -> None:
    vocab, idf = fit_vocabulary(["结节 nodule"], size=10, min_freq=1)
    index = {t: i for i, t in enumerate(vocab)}
    ids, weights = encode("结节 cyst 结节", index, idf, max_length=10)
    assert ids == sorted([index["结"], index["节"], index["结节"], index[UNK]])
    assert sum(w * w for w in weights) == pytest.approx(1.0)
    assert encode("结节 cyst", index, idf, max_length=2)[0] == ids[:2]
    assert encode(None, index, idf, max_length=10) == ([], [])


# -- unreadable image files -------------------------------------------------------------------


def bad_images(folder: Path, write_png: PngFn) -> Path:
    good = write_png(folder / "us" / "good.png", 0.5)
    raw = good.read_bytes()
    (folder / "us" / "cut.png").write_bytes(raw[: len(raw) // 2])
    (folder / "us" / "text.png").write_text("not an image", encoding="utf-8")
    return write(
        folder,
        "id,label,us,text\n1,0,us/good.png;us/cut.png,a\n2,1,us/text.png,b\n3,0,us/good.png,c\n",
    )


def test_unreadable_images_are_errors_by_default(tmp_path: Path, write_png: PngFn) -> None:
    path = bad_images(tmp_path, write_png)
    with pytest.raises(ManifestError, match=r"\(2 problem\(s\)\)") as info:
        read_manifest(path, DEFAULT_MODALITIES[1:])
    message = str(info.value)
    assert "row 2 (id 0000000001), column 'us'" in message
    assert "cut.png is corrupt or truncated" in message
    assert "row 3 (id 0000000002), column 'us'" in message and "text.png is not an image" in message


def test_unreadable_images_can_be_skipped(tmp_path: Path, write_png: PngFn) -> None:
    path = bad_images(tmp_path, write_png)
    cohort = read_manifest(path, DEFAULT_MODALITIES[1:], on_bad_file="skip")
    assert [[p.name for p in ps] for ps in cohort.images["us"]] == [["good.png"], [], ["good.png"]]
    assert cohort.present[:, 0].tolist() == [True, False, True]
    assert len(cohort.notes) == 1
    assert cohort.notes[0].startswith("skipped 2 unreadable us image(s)")
    with pytest.raises(ConfigError, match="--on-bad-file must be error or skip"):
        read_manifest(path, DEFAULT_MODALITIES[1:], on_bad_file="ignore")


def test_skipping_every_image_of_an_image_only_patient_is_still_an_error(
    tmp_path: Path, write_png: PngFn
) -> None:
    bad_images(tmp_path, write_png)
    path = write(tmp_path, "id,label,us\n1,0,us/good.png\n2,1,us/text.png\n", "only_us.csv")
    with pytest.raises(ManifestError, match=r"have no modality at all: row 3 \(id 0000000002\)"):
        read_manifest(path, US, on_bad_file="skip", on_empty_patient="error")
    cohort = read_manifest(path, US, on_bad_file="skip")
    assert cohort.ids == ["0000000001"] and cohort.excluded == [("0000000002", 1)]


# -- data audit (`omnifuse check`) ------------------------------------------------------------


def test_audit_of_the_tiny_cohort(tiny_manifest: Path) -> None:
    from omnifuse_cli.config import DataConfig, TrainConfig
    from omnifuse_cli.engine.audit import audit_manifest

    split = TrainConfig(train_ratio=0.6, val_ratio=0.2, test_ratio=0.2)
    report = audit_manifest(tiny_manifest, DataConfig(), num_classes=3, split=split)
    assert report.trainable, report.problems
    assert report.n_patients == 30
    assert report.label_counts == {"0": 10, "1": 10, "2": 10}
    assert report.presence == {"labs": 20, "us": 19, "text": 19}
    assert report.patterns == {
        "labs+us+text": 8,
        "labs+text": 4,
        "us+text": 4,
        "labs+us": 4,
        "labs": 4,
        "us": 3,
        "text": 3,
    }
    assert report.vector_sizes == {"labs": 5}
    n_png = len(list((tiny_manifest.parent / "us").glob("*.png")))
    assert report.images_per_patient["us"]["total"] == n_png == 27
    assert report.images_per_patient["us"]["min"] == 1.0
    assert report.images_per_patient["us"]["max"] == 2.0


def test_audit_reports_what_stops_training(tmp_path: Path) -> None:
    from omnifuse_cli.config import DataConfig
    from omnifuse_cli.engine.audit import audit_manifest

    data = DataConfig(modalities=LABS)
    unlabelled = write(tmp_path, 'id,label,labs\n1,,"[1]"\n2,,"[2]"\n', "a.csv")
    report = audit_manifest(unlabelled, data)
    assert not report.trainable
    assert "no patient has a label" in report.problems[0]
    # Unlabeled patients beside labelled ones are counted, not a problem.
    mixed = write(
        tmp_path,
        "id,label,labs\n" + "".join(f'{i},{"" if i >= 20 else i % 2},"[{i}]"\n' for i in range(30)),
        "m.csv",
    )
    report = audit_manifest(mixed, data)
    assert report.trainable and report.n_unlabeled == 10
    assert report.label_counts == {"0": 10, "1": 10}
    missing_class = write(
        tmp_path, "id,label,labs\n" + "".join(f'{i},{i % 2},"[{i}]"\n' for i in range(20)), "b.csv"
    )
    report = audit_manifest(missing_class, data, num_classes=3)
    assert report.label_counts == {"0": 10, "1": 10, "2": 0}
    assert len(report.problems) == 1 and "class(es) 2 have no patients" in report.problems[0]
