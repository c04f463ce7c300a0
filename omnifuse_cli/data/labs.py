"""Lab tables in the two layouts hospitals export, read into one matrix and its analyte list.

Wide: one row per patient, an id column and one column per analyte (the seed's labs table).
Long: one row per measurement, with an id, an analyte and a value column and optionally a time and
a unit column, found case-insensitively among common spellings (MIMIC's SUBJECT_ID, ITEMID,
VALUENUM, CHARTTIME, VALUEUOM included). Repeated measurements of one analyte are combined (last,
first, mean, min or max). In a long table, values that are not numbers ("<0.5", "pos", "--") count
as missing and are reported, never guessed into numbers. Exports have millions of rows, so
everything past the column lookup is pandas/numpy group operations, never a loop over rows.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import LABS_AGGS, LABS_FORMATS, LabsAgg, LabsLayout, check_choice
from omnifuse_cli.data.manifest import (
    MAX_LISTED,
    BadValue,
    _as_vector,
    _Problems,
    _row,
    normalize_ids,
    read_table,
)
from omnifuse_cli.errors import ConfigError, ManifestError

_BY_ORDER = ("last", "first")  # the aggregations that need an order (time, else row order)

# Spellings of the long layout's columns, compared after _key(); the first one found wins.
_ANALYTE = (
    "analyte",
    "analytename",
    "test",
    "testname",
    "testcode",
    "item",
    "itemid",
    "itemname",
    "lab",
    "labname",
    "labtest",
    "name",
    "code",
)
_VALUE = ("value", "result", "valuenum", "resultvalue", "numericvalue")
_TIME = (
    "time",
    "charttime",
    "date",
    "datetime",
    "timestamp",
    "collected",
    "collectiontime",
    "collectedat",
    "resulttime",
)
_UNIT = ("unit", "units", "valueuom", "uom")
_ROWS_PER_VALUE = 3  # rows named per non-numeric value in the note
_LONG_SHAPE = "a long lab table has one row per measurement: id, analyte, value[, time][, unit]"


@dataclass(frozen=True)
class LabsTable:
    """A lab table as one row per patient and one column per analyte."""

    source: Path
    ids: list[str]  # normalised like manifest ids (numeric ids zero-padded to 10 digits)
    values: np.ndarray  # (patients, analytes) float32, NaN = missing
    columns: list[str]  # analyte names, in the order of values' columns
    layout: Literal["wide", "long"]  # the layout the file was read as
    agg: LabsAgg  # how repeated values of a long table were combined (wide: as asked, unused)
    units: dict[str, str] = field(default_factory=dict)  # analyte -> its unit, where one is given
    # (analyte, value as written, count) of the values counted missing, most frequent first
    non_numeric: list[tuple[str, str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should hear about

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class _Columns:
    """Which column of the table plays which role (None: not there)."""

    id: str | None
    analyte: str | None
    value: str | None
    time: str | None
    unit: str | None
    other: list[str]  # every column with none of the roles above

    @property
    def looks_long(self) -> bool:
        return self.analyte is not None and self.value is not None

    @property
    def is_long(self) -> bool:
        """The auto-detection rule: analyte and value columns, and nothing else but id, time
        and unit."""
        return self.looks_long and not self.other


def read_labs(
    path: Path | str,
    *,
    id_col: str = "id",
    layout: str = "auto",
    agg: str = "last",
    analytes: Sequence[str] | None = None,
    encoding: str = "auto",
) -> LabsTable:
    """Read a wide or long lab table into one row per patient and one column per analyte.

    Parameters
    ----------
    path : the CSV file.
    id_col : name of the patient id column, matched ignoring case, spaces, '_' and '-'.
    layout : "wide", "long", or "auto": long when the table has an analyte and a value column
        and no other columns besides the id, time and unit; wide otherwise.
    agg : how several values of one analyte for one patient (long layout) are combined: "last"
        or "first" (by time when there is a time column, else by row order), "mean", "min" or
        "max". Only numeric values take part.
    analytes : the output columns, in this order (a trained run's analyte list): analytes the
        table lacks become all-NaN columns, others in the table are ignored; both are noted.

    Raises ManifestError, naming the file, for a table that cannot be read as asked, and
    ConfigError for an unknown layout or agg.
    """
    chosen = _parse_layout(layout)
    how = _parse_agg(agg)
    wanted = _check_analytes(analytes)
    path = Path(path)
    frame = read_table(path, "labs table", encoding)
    found = _find_columns(list(frame.columns), id_col)
    if found.id is None:
        raise ManifestError(
            f"labs table {path} has no id column {id_col!r} (columns: {', '.join(frame.columns)})",
            hint="name the id column with --labs-id-col",
        )
    if chosen == "long" or (chosen == "auto" and found.is_long):
        return _read_long(frame, path, found, how, wanted)
    return _read_wide(frame, path, found, how, wanted)


# -- choices and columns ----------------------------------------------------------------------


def _parse_layout(value: str) -> LabsLayout:
    check_choice(value, LABS_FORMATS, "--labs-format")
    return cast(LabsLayout, value)


def _parse_agg(value: str) -> LabsAgg:
    check_choice(value, LABS_AGGS, "--labs-agg")
    return cast(LabsAgg, value)


def _check_analytes(analytes: Sequence[str] | None) -> list[str] | None:
    if analytes is None:
        return None
    wanted = [str(a) for a in analytes]
    if not wanted:
        raise ConfigError("the list of analytes to read is empty")
    repeated = sorted(pd.Series(wanted)[pd.Series(wanted).duplicated()].unique())
    if repeated:
        raise ConfigError(f"the list of analytes to read names {', '.join(repeated)} twice")
    return wanted


def _key(name: str) -> str:
    """How column names are compared: 'Test Name', 'TEST_NAME' and 'test-name' are one."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _find_columns(columns: list[str], id_col: str) -> _Columns:
    keys = {c: _key(c) for c in columns}
    id_column = (
        id_col if id_col in columns else next((c for c in columns if keys[c] == _key(id_col)), None)
    )
    taken = {id_column}

    def first_of(spellings: tuple[str, ...]) -> str | None:
        for spelling in spellings:
            for column in columns:
                if column not in taken and keys[column] == spelling:
                    taken.add(column)
                    return column
        return None

    analyte, value = first_of(_ANALYTE), first_of(_VALUE)
    time, unit = first_of(_TIME), first_of(_UNIT)
    other = [c for c in columns if c not in taken]
    return _Columns(id_column, analyte, value, time, unit, other)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _rows_listed(rows: np.ndarray) -> str:
    """Data row indices named as a spreadsheet shows them (header = row 1)."""
    shown = ", ".join(str(_row(int(i))) for i in rows[:MAX_LISTED])
    more = len(rows) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _forced_notes(wanted: list[str], table_has: Sequence[str]) -> list[str]:
    """Notes on a forced analyte list: run analytes the table lacks, table analytes not used."""
    present = set(table_has)
    missing = [a for a in wanted if a not in present]
    extra = sorted(set(table_has) - set(wanted))
    notes: list[str] = []
    if missing:
        notes.append(
            f"{len(missing)} analyte(s) of the run missing from this lab table (empty "
            f"for every patient): {_listed(missing)}"
        )
    if extra:
        notes.append(
            f"{len(extra)} analyte(s) in this lab table that the run does not use "
            f"(ignored): {_listed(extra)}"
        )
    return notes


# -- wide ---------------------------------------------------------------------------------------


def _read_wide(
    frame: pd.DataFrame, path: Path, found: _Columns, agg: LabsAgg, wanted: list[str] | None
) -> LabsTable:
    id_column = cast(str, found.id)
    ids = normalize_ids(frame[id_column])
    repeated = pd.Series(ids).duplicated(keep=False).to_numpy()
    if repeated.any():
        dupes = sorted({ids[i] for i in np.flatnonzero(repeated)})
        hint = "keep one row per patient"
        if found.looks_long:
            others = (
                f" but has other columns too ({', '.join(found.other)}), which a long table ignores"
                if found.other
                else ""
            )
            hint += (
                f"; it looks like a long table (columns {found.analyte!r} and "
                f"{found.value!r}){others}: pass --labs-format long to read it as one"
            )
        raise ManifestError(
            f"labs table {path} has duplicate ids: {', '.join(dupes[:MAX_LISTED])}", hint=hint
        )
    table_columns = [c for c in frame.columns if c != id_column]
    if not table_columns:
        raise ManifestError(f"labs table {path} has no value columns besides {id_column!r}")
    columns = table_columns if wanted is None else wanted
    notes = [] if wanted is None else _forced_notes(wanted, table_columns)
    problems = _Problems(path, ids)
    values = np.full((len(frame), len(columns)), np.nan, dtype=np.float32)
    for j, column in enumerate(columns):
        if column in frame.columns:
            values[:, j] = _numeric_column(frame[column], column, problems)
    problems.raise_if_any("unreadable lab values", "lab values must be numbers or empty")
    return LabsTable(
        source=path,
        ids=ids,
        values=values,
        columns=list(columns),
        layout="wide",
        agg=agg,
        notes=notes,
    )


def _numeric_column(cells: pd.Series, column: str, problems: _Problems) -> np.ndarray:
    """One wide-table column as float64, NaN where empty. pandas parses the plain numbers; the
    few cells it cannot (or that are infinite) get the per-value rules and messages."""
    text = cells.str.strip()
    empty = (text == "").to_numpy()
    parsed = np.array(pd.to_numeric(text.where(~empty, None), errors="coerce"), np.float64)
    for i in np.flatnonzero(~empty & ~np.isfinite(parsed)):
        cell = cells.iat[int(i)]
        try:
            parsed[i] = _as_vector([cell])[0]
        except BadValue as err:
            problems.add(_row(int(i)), column, f"{cell!r} {err.detail}")
    parsed[empty] = np.nan
    return parsed


# -- long ---------------------------------------------------------------------------------------


def _read_long(
    frame: pd.DataFrame, path: Path, found: _Columns, agg: LabsAgg, wanted: list[str] | None
) -> LabsTable:
    for role, column, spellings in (
        ("analyte", found.analyte, _ANALYTE),
        ("value", found.value, _VALUE),
    ):
        if column is None:
            raise ManifestError(
                f"labs table {path} has no {role} column for the long layout (looked for "
                f"{', '.join(spellings)}, ignoring case; columns: {', '.join(frame.columns)})",
                hint=f"{_LONG_SHAPE}; rename the column, or read the table as wide with "
                "--labs-format wide",
            )
    id_column, analyte_column = cast(str, found.id), cast(str, found.analyte)
    if len(frame) == 0:
        raise ManifestError(f"labs table {path} has a header but no measurements")
    notes: list[str] = []
    if found.other:
        notes.append(
            f"ignored column(s) of the long lab table {path.name}: {', '.join(found.other)}"
        )
    id_code, id_text = _distinct(frame[id_column])
    name_code, name_text = _distinct(frame[analyte_column])
    _require_filled(id_code, id_text, id_column, "no id", path)
    _require_filled(name_code, name_text, analyte_column, "no analyte name", path)

    # Every patient of the table gets a row, also one whose measurements are all unused.
    patient_of, id_index = pd.factorize(np.array(normalize_ids(pd.Series(id_text)), object))
    patient = patient_of[id_code]
    ids = [str(i) for i in id_index]
    if wanted is None:
        column_of, sorted_names = pd.factorize(name_text, sort=True)
        columns, n_found = [str(a) for a in sorted_names], len(sorted_names)
    else:
        column_of = pd.Index(wanted).get_indexer(pd.Index(name_text))  # -1: not in the run
        columns, n_found = wanted, int((column_of >= 0).sum())
        notes += _forced_notes(wanted, [str(a) for a in name_text])
    analyte_all = column_of[name_code]
    rows = np.flatnonzero(analyte_all >= 0)  # the measurements read
    analyte = analyte_all[rows]

    value_code, value_text = _distinct(frame[found.value])
    numbers = np.array(
        pd.to_numeric(pd.Series(value_text, dtype=object), errors="coerce"), np.float64
    )  # '' -> NaN
    # Not a number, or infinite: missing, and reported.
    unreadable = (value_text != "") & ~np.isfinite(numbers)
    numbers[~np.isfinite(numbers)] = np.nan
    code = value_code[rows]
    value, bad = numbers[code], unreadable[code]
    units = {} if found.unit is None else _units(frame[found.unit], rows, analyte, columns, path)
    non_numeric, note = _non_numeric(value_text[code[bad]], analyte[bad], rows[bad], columns)
    if note:
        notes.append(note)

    by_time = found.time is not None and agg in _BY_ORDER
    order = np.flatnonzero(np.isfinite(value))
    if by_time:
        when = _parse_times(frame[cast(str, found.time)], rows[order], cast(str, found.time), path)
        order = order[np.argsort(when, kind="stable")]  # equal times keep their row order
    width = len(columns)
    key = pd.Series(patient[rows[order]] * width + analyte[order])
    combined = pd.Series(value[order]).groupby(key.to_numpy(), sort=False).agg(agg)
    cell = combined.index.to_numpy(np.int64)
    matrix = np.full((len(ids), len(columns)), np.nan, dtype=np.float32)
    matrix[cell // width, cell % width] = combined.to_numpy(np.float64)

    repeats = key[key.duplicated()].to_numpy()
    how = {
        "last": "last by time" if by_time else "last by row order",
        "first": "first by time" if by_time else "first by row order",
    }.get(agg, agg)
    repeated = (
        f"{len(np.unique(repeats // width)):,} patient(s) had repeated values (aggregated: {how})"
        if len(repeats)
        else "no repeated values"
    )
    notes.insert(
        0,
        f"long lab table: {len(rows):,} measurement(s) of {n_found:,} analyte(s) "
        f"for {len(ids):,} patient(s); {repeated}",
    )
    return LabsTable(
        source=path,
        ids=ids,
        values=matrix,
        columns=list(columns),
        layout="long",
        agg=agg,
        units=units,
        non_numeric=non_numeric,
        notes=notes,
    )


def _distinct(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(code of each row, distinct stripped texts) of a column. Exports repeat their ids,
    analytes, units and values, so stripping and parsing the distinct texts is far cheaper
    than doing it row by row."""
    codes, uniques = pd.factorize(cells.to_numpy(dtype=object))
    stripped = pd.Series(uniques, dtype=object).str.strip().to_numpy(dtype=object)
    merged, texts = pd.factorize(stripped)  # ' 7' and '7' are one
    return merged[codes], np.asarray(texts, dtype=object)


def _require_filled(
    codes: np.ndarray, texts: np.ndarray, column: str, what: str, path: Path
) -> None:
    blank = np.flatnonzero(texts == "")
    empty = np.flatnonzero(codes == blank[0]) if len(blank) else blank
    if len(empty):
        raise ManifestError(
            f"labs table {path}: {len(empty):,} measurement(s) have {what} in column "
            f"{column!r}: rows {_rows_listed(empty)}",
            hint="every measurement needs a patient id and an analyte; fill them in or remove "
            "those rows",
        )


def _units(
    cells: pd.Series, rows: np.ndarray, analyte: np.ndarray, columns: list[str], path: Path
) -> dict[str, str]:
    """The unit of each analyte; an analyte written in two units cannot be one column."""
    unit_code, unit_text = _distinct(cells)
    code = unit_code[rows]
    given = (unit_text != "")[code]
    counts = (
        pd.DataFrame({"analyte": analyte[given], "unit": code[given]})
        .groupby(["analyte", "unit"], sort=True)
        .size()
        .sort_values(ascending=False, kind="stable")
    )
    per_analyte = counts.groupby(level="analyte").size()
    mixed = per_analyte.index[per_analyte.to_numpy() > 1].tolist()
    if mixed:
        lines = []
        for a in sorted(mixed, key=lambda a: columns[a])[:MAX_LISTED]:
            of_a = counts.xs(a, level="analyte")
            lines.append(
                f"{columns[a]!r} in "
                + ", ".join(
                    f"{unit_text[u]} ({n:,} row{'' if n == 1 else 's'})" for u, n in of_a.items()
                )
            )
        more = f"\n  ... and {len(mixed) - MAX_LISTED} more" if len(mixed) > MAX_LISTED else ""
        raise ManifestError(
            f"labs table {path}: {len(mixed)} analyte(s) have more than one unit:\n  "
            + "\n  ".join(lines)
            + more,
            hint="convert each analyte's values to one unit (or give the analytes in other units "
            "their own names), then read the table again",
        )
    return {columns[a]: str(unit_text[u]) for a, u in sorted(counts.index.tolist())}


def _non_numeric(
    text: np.ndarray, analyte: np.ndarray, rows: np.ndarray, columns: list[str]
) -> tuple[list[tuple[str, str, int]], str | None]:
    """(analyte, value, count) of the values counted missing, most frequent first, and the note
    naming the first rows of each."""
    if len(text) == 0:
        return [], None
    frame = pd.DataFrame(
        {"analyte": np.asarray(columns, dtype=object)[analyte], "value": text, "row": rows}
    )
    groups = frame.groupby(["analyte", "value"], sort=True)
    sizes = groups.size().sort_values(ascending=False, kind="stable")
    found = [(str(a), str(v), int(n)) for (a, v), n in sizes.items()]
    first_rows = groups.head(_ROWS_PER_VALUE).groupby(["analyte", "value"])["row"]
    where = {k: ", ".join(str(_row(int(i))) for i in r) for k, r in first_rows}
    shown = ", ".join(
        f"{v!r} ({a}, {n:,}x, row{'s' if n > 1 else ''} {where[(a, v)]}"
        f"{', ...' if n > _ROWS_PER_VALUE else ''})"
        for a, v, n in found[:MAX_LISTED]
    )
    more = len(found) - MAX_LISTED
    extra = f" and {more} more distinct value(s)" if more > 0 else ""
    note = f"{len(text):,} non-numeric lab value(s) counted missing: {shown}{extra}"
    return found, note


def _parse_times(cells: pd.Series, rows: np.ndarray, column: str, path: Path) -> np.ndarray:
    """Sortable times (float64) of the given rows: numbers when the times are numbers, else
    dates (microseconds since 1970, UTC)."""
    hint = (
        "write times as dates (2024-01-31 08:15) or as numbers, or use --labs-agg mean, min "
        "or max, which do not need them"
    )
    text = pd.Series(cells.to_numpy(dtype=object)[rows], dtype=object).str.strip()
    empty = np.flatnonzero((text == "").to_numpy())
    if len(empty):
        raise ManifestError(
            f"labs table {path}: {len(empty):,} measurement(s) have no time in column "
            f"{column!r}, so --labs-agg last/first cannot order them: rows "
            f"{_rows_listed(rows[empty])}",
            hint=hint,
        )
    if len(text) and _is_number(str(text.iat[0])):
        numbers = np.array(pd.to_numeric(text, errors="coerce"), np.float64)
        if np.isfinite(numbers).all():
            return numbers
    stamps = np.zeros(len(text), dtype=np.int64)
    left = np.arange(len(text))
    # The format inferred from the first time, then ISO 8601 of any precision, then one by one
    # (slow, but only for the times the faster passes could not read).
    for fmt in (None, "ISO8601", "mixed"):
        if not len(left):
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "could not infer format"
            got = pd.to_datetime(text.iloc[left], errors="coerce", utc=True, format=fmt)
        ok = got.notna().to_numpy()
        stamps[left[ok]] = got[ok].dt.tz_localize(None).to_numpy("datetime64[us]").astype(np.int64)
        left = left[~ok]
    if len(left):
        distinct = text.iloc[left].drop_duplicates()
        shown = ", ".join(
            f"row {_row(int(rows[i]))} {t!r}" for i, t in distinct.iloc[:MAX_LISTED].items()
        )
        more = len(distinct) - MAX_LISTED
        raise ManifestError(
            f"labs table {path}: {len(distinct):,} distinct time(s) in column {column!r} are "
            f"neither dates nor numbers: {shown}{f' and {more} more' if more > 0 else ''}",
            hint=hint,
        )
    return stamps.astype(np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
