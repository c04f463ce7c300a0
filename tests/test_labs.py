"""Wide and long lab tables read into one matrix: layouts, aggregation, units, odd values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from omnifuse_cli.config import LABS_AGGS, LABS_FORMATS
from omnifuse_cli.data.labs import read_labs
from omnifuse_cli.errors import ConfigError, ManifestError

NAN = math.nan


def write(folder: Path, text: str, name: str = "labs.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def rows_of(values: np.ndarray) -> list[list[float]]:
    """The matrix as lists, NaN kept (compare with assert_equal, which treats NaN == NaN)."""
    return values.astype(np.float64).tolist()


# -- wide -----------------------------------------------------------------------------------------


def test_wide_table_reads_as_before(tmp_path: Path) -> None:
    path = write(tmp_path, "patient_id,ALT,AST\n0000000007,1,2\n8,3,\nP9,5,6\n")
    table = read_labs(path, id_col="patient_id")
    assert table.layout == "wide"
    assert table.ids == ["0000000007", "0000000008", "P9"]
    assert table.columns == ["ALT", "AST"]  # the table's order, not sorted
    np.testing.assert_equal(rows_of(table.values), [[1, 2], [3, NAN], [5, 6]])
    assert table.values.dtype == np.float32
    assert table.notes == [] and table.units == {} and table.non_numeric == []
    table = read_labs(path, id_col="patient_id", layout="wide")
    ids, values, columns = table.ids, table.values, table.columns
    assert ids == table.ids and columns == table.columns
    np.testing.assert_equal(values, table.values)


def test_wide_keeps_the_table_column_order(tmp_path: Path) -> None:
    path = write(tmp_path, "id,zinc,albumin,ALT\n1,1,2,3\n")
    assert read_labs(path).columns == ["zinc", "albumin", "ALT"]


def test_wide_duplicate_ids_raise(tmp_path: Path) -> None:
    path = write(tmp_path, "id,ALT\n7,1\n0007,2\n8,3\n")
    with pytest.raises(ManifestError, match="has duplicate ids: 0000000007$") as info:
        read_labs(path)
    assert info.value.hint == "keep one row per patient"


def test_wide_without_its_id_column_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "pid,ALT\n1,10\n")
    with pytest.raises(ManifestError, match=r"no id column 'id' \(columns: pid, ALT\)") as info:
        read_labs(path)
    assert info.value.hint is not None and "--labs-id-col" in info.value.hint


def test_wide_unreadable_values_listed_by_row(tmp_path: Path) -> None:
    path = write(tmp_path, "id,ALT,AST\n1,1,x\n2,inf,3\n3,<0.5,4\n")
    with pytest.raises(ManifestError, match=r"unreadable lab values \(3 problem\(s\)\)") as info:
        read_labs(path)
    message = str(info.value)
    assert "row 2 (id 0000000001), column 'AST': 'x' is not a number" in message
    assert "row 3 (id 0000000002), column 'ALT': 'inf' is infinite" in message
    assert "row 4 (id 0000000003), column 'ALT': '<0.5' is not a number" in message


def test_wide_with_only_an_id_column_raises(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no value columns besides 'id'"):
        read_labs(write(tmp_path, "id\n1\n"))


# -- long: detection and columns ----------------------------------------------------------------


LONG = (
    "id,analyte,value,time,unit\n"
    "1,glucose,5.0,2024-01-03 08:00,mmol/L\n"
    "1,glucose,7.0,2024-01-01 08:00,mmol/L\n"
    "1,alt,30,2024-01-02,U/L\n"
    "2,glucose,6.0,2024-01-02,mmol/L\n"
    "1,glucose,4.0,2024-01-02 08:00,\n"
)


def test_long_table_is_detected_and_sorted_by_analyte(tmp_path: Path) -> None:
    table = read_labs(write(tmp_path, LONG))
    assert table.layout == "long" and table.agg == "last"
    assert table.ids == ["0000000001", "0000000002"]
    assert table.columns == ["alt", "glucose"]
    # Patient 1's glucose: last by time is 5.0 (row 2), though row 6 is the last row.
    np.testing.assert_equal(rows_of(table.values), [[30, 5], [NAN, 6]])
    assert table.values.dtype == np.float32
    assert table.units == {"alt": "U/L", "glucose": "mmol/L"}
    assert table.notes == [
        "long lab table: 5 measurement(s) of 2 analyte(s) for 2 patient(s); "
        "1 patient(s) had repeated values (aggregated: last by time)"
    ]


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("last", 5.0),
        ("first", 7.0),
        ("mean", 16 / 3),
        ("min", 4.0),
        ("max", 7.0),
    ],
)
def test_each_aggregation(tmp_path: Path, agg: str, expected: float) -> None:
    table = read_labs(write(tmp_path, LONG), agg=agg)
    assert table.agg == agg
    assert table.values[0, 1] == pytest.approx(expected)
    assert table.values[1, 1] == 6.0  # one value: every aggregation keeps it
    assert f"(aggregated: {agg}" in table.notes[0]


@pytest.mark.parametrize(("agg", "expected"), [("last", 4.0), ("first", 5.0)])
def test_last_and_first_follow_row_order_without_a_time_column(
    tmp_path: Path, agg: str, expected: float
) -> None:
    path = write(tmp_path, "id,test,result\n1,glucose,5\n1,glucose,7\n1,glucose,4\n")
    table = read_labs(path, agg=agg)
    assert table.values.tolist() == [[expected]]
    assert f"aggregated: {agg} by row order" in table.notes[0]


def test_numeric_times_order_last(tmp_path: Path) -> None:
    path = write(tmp_path, "id,lab,value,time\n1,k,3.5,10\n1,k,4.5,2.5\n1,k,4.0,9\n")
    assert read_labs(path).values.tolist() == [[3.5]]
    assert read_labs(path, agg="first").values.tolist() == [[4.5]]


def test_equal_times_keep_row_order(tmp_path: Path) -> None:
    path = write(tmp_path, "id,lab,value,time\n1,k,1,2024-01-01\n1,k,2,2024-01-01\n")
    assert read_labs(path).values.tolist() == [[2.0]]


def test_mimic_style_columns_found_ignoring_case(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "SUBJECT_ID,ITEMID,CHARTTIME,VALUENUM,VALUEUOM\n"
        "10006,50912,2180-03-23 11:51:00,1.1,mg/dL\n"
        "10006,50912,2180-03-22 11:51:00,0.9,mg/dL\n"
        "10011,50868,2180-03-23 11:51:00,14,mEq/L\n",
    )
    table = read_labs(path, id_col="subject_id")
    assert table.layout == "long"
    assert table.ids == ["0000010006", "0000010011"]
    assert table.columns == ["50868", "50912"]
    np.testing.assert_allclose(table.values, [[NAN, 1.1], [14, NAN]], rtol=1e-6)
    assert table.units == {"50868": "mEq/L", "50912": "mg/dL"}


def test_numeric_ids_are_padded_like_manifest_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "id,analyte,value\n7,k,1\n0007,k,2\n7.0,k,3\nP9,k,4\n 12 ,k,5\n")
    table = read_labs(path)
    assert table.ids == ["0000000007", "P9", "0000000012"]  # order of first appearance
    assert table.values[:, 0].tolist() == [3.0, 4.0, 5.0]  # 7, 0007 and 7.0 are one patient


def test_table_with_other_columns_is_wide_unless_forced_long(tmp_path: Path) -> None:
    path = write(tmp_path, "id,test,value,flag\n1,k,1,H\n1,na,140,\n")
    with pytest.raises(ManifestError, match="duplicate ids") as info:
        read_labs(path)
    hint = info.value.hint or ""
    assert "looks like a long table" in hint and "flag" in hint and "--labs-format long" in hint
    table = read_labs(path, layout="long")
    assert table.columns == ["k", "na"] and table.values.tolist() == [[1.0, 140.0]]
    assert table.notes[1] == "ignored column(s) of the long lab table labs.csv: flag"


def test_a_long_table_can_be_forced_wide(tmp_path: Path) -> None:
    path = write(tmp_path, "id,test,value\n1,k,1\n2,na,140\n")
    with pytest.raises(ManifestError, match="unreadable lab values"):
        read_labs(path, layout="wide")


def test_forced_long_without_its_columns_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "id,ALT,AST\n1,1,2\n")
    with pytest.raises(
        ManifestError, match=r"no analyte column for the long layout .*columns: id, ALT, AST"
    ):
        read_labs(path, layout="long")
    path = write(tmp_path, "id,analyte,reading\n1,ALT,2\n")
    with pytest.raises(ManifestError, match="no value column for the long layout") as info:
        read_labs(path, layout="long")
    assert "--labs-format wide" in (info.value.hint or "")


def test_long_without_its_id_column_names_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, "patient,analyte,value\n1,ALT,2\n")
    with pytest.raises(ManifestError, match=r"no id column 'id' \(columns: patient, analyte"):
        read_labs(path, layout="long")


def test_unknown_layout_or_agg_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, LONG)
    assert LABS_FORMATS == ("auto", "wide", "long")
    assert LABS_AGGS == ("last", "first", "mean", "min", "max")
    with pytest.raises(ConfigError, match="--labs-format 'tall' is not supported"):
        read_labs(path, layout="tall")
    with pytest.raises(ConfigError, match="--labs-agg 'median' is not supported"):
        read_labs(path, agg="median")


def test_rows_without_id_or_analyte_raise(tmp_path: Path) -> None:
    with pytest.raises(
        ManifestError,
        match=r"1 measurement\(s\) have no id in column 'id': "
        r"rows 3$",
    ):
        read_labs(write(tmp_path, "id,analyte,value\n1,k,1\n,k,2\n"))
    with pytest.raises(ManifestError, match="have no analyte name in column 'analyte': rows 2, 4"):
        read_labs(write(tmp_path, "id,analyte,value\n1,,1\n1,k,2\n2, ,3\n"))


def test_header_only_long_table_raises(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="has a header but no measurements"):
        read_labs(write(tmp_path, "id,analyte,value\n"), layout="long")


# -- units ----------------------------------------------------------------------------------------


def test_two_units_of_one_analyte_raise_naming_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,analyte,value,unit\n1,glucose,5,mmol/L\n2,glucose,90,mg/dL\n"
        "3,glucose,6,mmol/L\n4,glucose,7,\n5,alt,3,U/L\n",
    )
    with pytest.raises(
        ManifestError,
        match=r"1 analyte\(s\) have more than one unit:\n  "
        r"'glucose' in mmol/L \(2 rows\), mg/dL \(1 row\)$",
    ):
        read_labs(path)


def test_empty_units_are_ignored_and_units_recorded(tmp_path: Path) -> None:
    path = write(tmp_path, "id,analyte,value,units\n1,glucose,5,\n2,glucose,6,mmol/L\n2,alt,1,\n")
    assert read_labs(path).units == {"glucose": "mmol/L"}


# -- values ---------------------------------------------------------------------------------------


def test_non_numeric_values_count_missing_and_are_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,analyte,value\n1,glucose,<0.5\n2,glucose,<0.5\n3,hcg,pos\n"
        "3,glucose,--\n4,glucose,\n4,hcg,inf\n5,glucose,0.7\n",
    )
    table = read_labs(path)
    assert table.columns == ["glucose", "hcg"]
    assert np.isnan(table.values[:4]).all()  # '<0.5' never became 0.5
    assert table.values[4].tolist()[0] == pytest.approx(0.7)
    assert table.non_numeric == [
        ("glucose", "<0.5", 2),
        ("glucose", "--", 1),
        ("hcg", "inf", 1),
        ("hcg", "pos", 1),
    ]
    assert table.notes[1] == (
        "5 non-numeric lab value(s) counted missing: '<0.5' (glucose, 2x, "
        "rows 2, 3), '--' (glucose, 1x, row 5), 'inf' (hcg, 1x, row 7), "
        "'pos' (hcg, 1x, row 4)"
    )


def test_a_non_numeric_last_value_leaves_the_last_number(tmp_path: Path) -> None:
    path = write(tmp_path, "id,analyte,value,time\n1,k,3,1\n1,k,NEG,2\n1,k,,3\n")
    table = read_labs(path)
    assert table.values.tolist() == [[3.0]]
    assert table.non_numeric == [("k", "NEG", 1)]


def test_unreadable_times_are_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,analyte,value,time\n1,k,1,2024-01-01\n1,k,2,yesterday\n2,k,3,soon\n2,k,4,yesterday\n",
    )
    with pytest.raises(
        ManifestError,
        match="2 distinct time.* are neither dates nor numbers: row 3 'yesterday', row 4 'soon'$",
    ):
        read_labs(path)
    # mean/min/max do not need the times
    assert read_labs(path, agg="max").values.tolist() == [[2.0], [4.0]]


def test_empty_times_raise_for_last(tmp_path: Path) -> None:
    path = write(tmp_path, "id,analyte,value,time\n1,k,1,2024-01-01\n1,k,2,\n1,k,,\n")
    with pytest.raises(ManifestError, match=r"1 measurement\(s\) have no time .*: rows 3$"):
        read_labs(path)


def test_mixed_date_formats_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "id,analyte,value,date\n1,k,1,2024-01-02 08:00\n1,k,2,2024-01-03\n"
        "1,k,3,2024-01-01T23:00:00Z\n",
    )
    assert read_labs(path).values.tolist() == [[2.0]]
    assert read_labs(path, agg="first").values.tolist() == [[3.0]]


# -- a forced analyte list ------------------------------------------------------------------------


def test_analytes_force_the_columns_of_a_long_table(tmp_path: Path) -> None:
    table = read_labs(write(tmp_path, LONG), analytes=["sodium", "glucose"])
    assert table.columns == ["sodium", "glucose"]
    np.testing.assert_equal(rows_of(table.values), [[NAN, 5], [NAN, 6]])
    assert table.units == {"glucose": "mmol/L"}
    assert (
        "1 analyte(s) of the run missing from this lab table (empty for every patient): sodium"
    ) in table.notes
    assert "1 analyte(s) in this lab table that the run does not use (ignored): alt" in table.notes
    assert table.notes[0].startswith("long lab table: 4 measurement(s) of 1 analyte(s) for 2")


def test_analytes_force_the_columns_of_a_wide_table(tmp_path: Path) -> None:
    path = write(tmp_path, "id,ALT,junk,AST\n1,1,x,2\n")
    table = read_labs(path, analytes=["AST", "GGT", "ALT"])
    np.testing.assert_equal(rows_of(table.values), [[2, NAN, 1]])  # 'junk' is never read
    assert table.columns == ["AST", "GGT", "ALT"]
    assert any("missing from this lab table" in n and n.endswith(": GGT") for n in table.notes)
    assert any("does not use (ignored): junk" in n for n in table.notes)


def test_ignored_analytes_are_not_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "id,analyte,value,unit\n1,k,1,a\n1,na,2,b\n1,na,3,c\n")
    table = read_labs(path, analytes=["k"])
    assert table.values.tolist() == [[1.0]] and table.units == {"k": "a"}


def test_repeated_forced_analytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names k twice"):
        read_labs(write(tmp_path, LONG), analytes=["k", "x", "k"])


# -- size -----------------------------------------------------------------------------------------


def test_a_200k_row_long_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, patients = 200_000, 5_000
    pid = rng.integers(0, patients, n)
    analyte = rng.integers(0, 16, n)
    value = rng.normal(size=n).round(3).astype(str)
    value[::1000] = "<0.5"
    day = rng.integers(1, 28, n)
    lines = [
        f"{p},a{a:02d},{v},2024-01-{d:02d} {p % 24:02d}:00,u{a}"
        for p, a, v, d in zip(pid, analyte, value, day, strict=True)
    ]
    path = write(tmp_path, "subject_id,test,value,charttime,unit\n" + "\n".join(lines) + "\n")
    table = read_labs(path, id_col="SUBJECT_ID")
    assert table.values.shape == (len(np.unique(pid)), 16)
    assert table.columns == [f"a{a:02d}" for a in range(16)]
    assert table.non_numeric[0][1] == "<0.5" and sum(c for _, _, c in table.non_numeric) == 200
    assert table.notes[0].startswith("long lab table: 200,000 measurement(s) of 16 analyte(s)")
