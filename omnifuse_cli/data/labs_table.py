"""What reading a lab table gives (LabsTable), which of its columns plays which role, and the
notes and row lists both layouts (data.labs: wide, data.labs_long: long) write alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from omnifuse_cli.config import LabsAgg
from omnifuse_cli.data.tables import MAX_LISTED, sheet_row

# Spellings of the long layout's columns, compared after _key(); the first one found wins.
ANALYTE = (
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
VALUE = ("value", "result", "valuenum", "resultvalue", "numericvalue")
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
class LabColumns:
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


def _key(name: str) -> str:
    """How column names are compared: 'Test Name', 'TEST_NAME' and 'test-name' are one."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def find_columns(columns: list[str], id_col: str) -> LabColumns:
    """The role of each column: ``id_col`` (ignoring case, spaces, '_' and '-'), then the
    first spelling found of each long-layout role."""
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

    analyte, value = first_of(ANALYTE), first_of(VALUE)
    time, unit = first_of(_TIME), first_of(_UNIT)
    other = [c for c in columns if c not in taken]
    return LabColumns(id_column, analyte, value, time, unit, other)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def rows_listed(rows: np.ndarray) -> str:
    """Data row indices named as a spreadsheet shows them (header = row 1)."""
    shown = ", ".join(str(sheet_row(int(i))) for i in rows[:MAX_LISTED])
    more = len(rows) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def forced_notes(wanted: list[str], table_has: Sequence[str]) -> list[str]:
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
