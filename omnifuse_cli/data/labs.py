"""Lab tables in the two layouts hospitals export, read into one matrix and its analyte list.

Wide: one row per patient, an id column and one column per analyte (the seed's labs table).
Long: one row per measurement, with an id, an analyte and a value column and optionally a time and
a unit column, found case-insensitively among common spellings (MIMIC's SUBJECT_ID, ITEMID,
VALUENUM, CHARTTIME, VALUEUOM included). Repeated measurements of one analyte are combined (last,
first, mean, min or max). In a long table, values that are not numbers ("<0.5", "pos", "--") count
as missing and are reported, never guessed into numbers. Exports have millions of rows, so
everything past the column lookup is pandas/numpy group operations, never a loop over rows.

This module reads the wide layout; data.labs_long reshapes the long one, and data.labs_table
holds what both share (LabsTable, the column roles and their spellings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import LABS_AGGS, LABS_FORMATS, LabsAgg, LabsLayout, check_choice
from omnifuse_cli.data.labs_long import read_long
from omnifuse_cli.data.labs_table import LabColumns, LabsTable, find_columns, forced_notes
from omnifuse_cli.data.tables import MAX_LISTED, Problems, normalize_ids, read_table, sheet_row
from omnifuse_cli.data.vectors import BadValue, as_vector
from omnifuse_cli.errors import ConfigError, ManifestError


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
    found = find_columns(list(frame.columns), id_col)
    if found.id is None:
        raise ManifestError(
            f"labs table {path} has no id column {id_col!r} (columns: {', '.join(frame.columns)})",
            hint="name the id column with --labs-id-col",
        )
    if chosen == "long" or (chosen == "auto" and found.is_long):
        return read_long(frame, path, found, how, wanted)
    return _read_wide(frame, path, found, how, wanted)


# -- choices ----------------------------------------------------------------------------------


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


# -- wide ---------------------------------------------------------------------------------------


def _read_wide(
    frame: pd.DataFrame, path: Path, found: LabColumns, agg: LabsAgg, wanted: list[str] | None
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
    notes = [] if wanted is None else forced_notes(wanted, table_columns)
    problems = Problems(path, ids)
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


def _numeric_column(cells: pd.Series, column: str, problems: Problems) -> np.ndarray:
    """One wide-table column as float64, NaN where empty. pandas parses the plain numbers; the
    few cells it cannot (or that are infinite) get the per-value rules and messages."""
    text = cells.str.strip()
    empty = (text == "").to_numpy()
    parsed = np.array(pd.to_numeric(text.where(~empty, None), errors="coerce"), np.float64)
    for i in np.flatnonzero(~empty & ~np.isfinite(parsed)):
        cell = cells.iat[int(i)]
        try:
            parsed[i] = as_vector([cell])[0]
        except BadValue as err:
            problems.add(sheet_row(int(i)), column, f"{cell!r} {err.detail}")
    parsed[empty] = np.nan
    return parsed
