"""A long lab table (one row per measurement: id, analyte, value[, time][, unit]) reshaped into
one row per patient and one column per analyte, repeated measurements combined.

Exports have millions of rows, so everything is pandas/numpy group operations on the distinct
texts of each column, never a loop over rows. Values that are not numbers count as missing and
are reported, never guessed into numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import LabsAgg
from omnifuse_cli.data.labs_table import (
    ANALYTE,
    VALUE,
    LabColumns,
    LabsTable,
    forced_notes,
    rows_listed,
)
from omnifuse_cli.data.tables import MAX_LISTED, normalize_ids, sheet_row
from omnifuse_cli.errors import ManifestError

_BY_ORDER = ("last", "first")  # the aggregations that need an order (time, else row order)
_ROWS_PER_VALUE = 3  # rows named per non-numeric value in the note
_LONG_SHAPE = "a long lab table has one row per measurement: id, analyte, value[, time][, unit]"


def read_long(
    frame: pd.DataFrame, path: Path, found: LabColumns, agg: LabsAgg, wanted: list[str] | None
) -> LabsTable:
    """The long table ``frame`` (columns as ``found``) as one row per patient, ``agg``
    combining repeated values; ``wanted``: the output columns (a run's analytes)."""
    for role, column, spellings in (
        ("analyte", found.analyte, ANALYTE),
        ("value", found.value, VALUE),
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
        notes += forced_notes(wanted, [str(a) for a in name_text])
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
            f"{column!r}: rows {rows_listed(empty)}",
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
    where = {k: ", ".join(str(sheet_row(int(i))) for i in r) for k, r in first_rows}
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
            f"{rows_listed(rows[empty])}",
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
            f"row {sheet_row(int(rows[i]))} {t!r}" for i, t in distinct.iloc[:MAX_LISTED].items()
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
