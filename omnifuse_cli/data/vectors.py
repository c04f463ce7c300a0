"""A manifest's vector cells, and a labs table joined on id in their place.

A vector cell is an inline JSON list, a ``.npy`` path or a one-row ``.csv`` path. Inline lists
of plain numbers are parsed in blocks by pandas' C reader, which turns a minute of json.loads on
a million cells into seconds; any cell that fast path is unsure of gets the per-cell rules, so
both give the same values and the same messages.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from omnifuse_cli.data.cells import resolve_path
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.tables import Problems, sheet_row
from omnifuse_cli.errors import ManifestError


def parse_vector_cell(cell: str, base: Path) -> np.ndarray:
    """One vector cell: inline JSON list, .npy path or one-row .csv path. Raises ValueError."""
    text = cell.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise ValueError(
                f"{shown!r} is not a JSON list of numbers ({err.msg} at character {err.pos + 1}); "
                "write a missing value as null, and no inf or nan"
            ) from None
        if not isinstance(values, list) or any(isinstance(v, (list, dict)) for v in values):
            raise ValueError("inline vector must be a flat JSON list of numbers")
        return as_vector([math.nan if v is None else v for v in values])
    path = resolve_path(text, base)
    suffix = path.suffix.lower()
    if suffix not in {".npy", ".csv"}:
        raise ValueError(
            f"{text!r} is neither a JSON list like [1.0, 2.5] nor a .npy/.csv file path"
        )
    if not path.exists():
        raise ValueError(f"file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(
                f"{path.name} is not a readable .npy array ({err or 'empty file'}); "
                "pickled object arrays are refused"
            ) from None
        if array.ndim == 2 and 1 in array.shape:
            array = array.reshape(-1)
        if array.ndim != 1:
            raise ValueError(f"{path.name} has shape {array.shape}; a 1-D vector is needed")
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{path.name} has dtype {array.dtype}; numbers are needed")
        return as_vector(array.tolist())
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    rows = [r for r in frame.itertuples(index=False) if any(str(v).strip() for v in r)]
    if rows and not _numeric_row(rows[0]) and len(rows) == 2:
        rows = rows[1:]  # a header row above the values
    if len(rows) != 1:
        raise ValueError(f"{path.name} must hold one row of numbers, found {len(rows)} rows")
    return as_vector(list(rows[0]))


def _numeric_row(row: tuple[Any, ...]) -> bool:
    try:
        [float(v) for v in row if str(v).strip()]
    except ValueError:
        return False
    return True


class BadValue(ValueError):
    """One value of a vector is unusable: ``index`` says which, ``detail`` why."""

    def __init__(self, index: int, value: object, detail: str) -> None:
        shown = "" if detail.startswith("is infinite") else f" ({value!r})"
        super().__init__(f"value {index + 1}{shown} {detail}")
        self.index = index
        self.value = value
        self.detail = detail


def as_vector(values: list[Any]) -> np.ndarray:
    """Values as float32, an empty string as NaN; raises BadValue for a value that is not a
    finite number, and ValueError for no values at all."""
    out = np.empty(len(values), dtype=np.float64)
    for j, v in enumerate(values):
        if isinstance(v, str) and v.strip() == "":
            out[j] = math.nan
            continue
        try:
            out[j] = float(v)
        except (TypeError, ValueError) as err:
            raise BadValue(j, v, "is not a number") from err
    if np.isinf(out).any():
        bad = int(np.flatnonzero(np.isinf(out))[0])
        raise BadValue(bad, values[bad], "is infinite; write an empty value or null for missing")
    if len(out) == 0:
        raise ValueError("empty vector")
    return out.astype(np.float32)


def fill_vectors(
    cohort: Cohort, m_idx: int, cells: pd.Series, base: Path, problems: Problems
) -> None:
    name = cohort.modalities[m_idx].name
    text = cells.str.strip()
    filled = (text != "").to_numpy()
    inline = filled & text.str.startswith("[").to_numpy()
    block_idx = np.flatnonzero(inline)
    block = _parse_inline_block(text.to_numpy()[block_idx])
    if block is None:  # something unusual inline: every cell gets the per-cell rules
        block_idx = block_idx[:0]
        block = np.zeros((0, 0), dtype=np.float32)
    rows: dict[int, np.ndarray] = {}
    per_cell = filled.copy()
    per_cell[block_idx] = False
    for i in np.flatnonzero(per_cell).tolist():
        try:
            rows[i] = parse_vector_cell(cast(str, cells.iat[i]), base)
        except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            problems.add(sheet_row(i), name, str(err))
    lengths = {len(v) for v in rows.values()} | ({block.shape[1]} if len(block_idx) else set())
    if len(lengths) > 1:
        rows.update({int(i): v for i, v in zip(block_idx, block, strict=True)})
        rows = dict(sorted(rows.items()))
        block_idx, block = block_idx[:0], block[:0]
        counts = pd.Series([len(v) for v in rows.values()]).value_counts()
        common = int(counts.index[0])
        for i, v in list(rows.items()):
            if len(v) != common:
                problems.add(
                    sheet_row(i), name, f"vector has {len(v)} values, most rows have {common}"
                )
                del rows[i]  # the other rows stay usable under keep_bad_rows
        lengths = {common}
    dim = lengths.pop() if lengths else 1
    array = np.full((len(cells), dim), np.nan, dtype=np.float32)
    if len(block_idx):
        array[block_idx] = block
        cohort.present[block_idx, m_idx] = True
    for i, v in rows.items():
        array[i] = v
        cohort.present[i, m_idx] = True
    cohort.vectors[name] = array
    cohort.vector_columns[name] = [f"{name}_{j}" for j in range(dim)]


_BLOCK = 200_000  # inline vector cells parsed per pandas call (bounds the temporary copies)


def _byte_table(chars: bytes) -> np.ndarray:
    """Look-up table: table[byte] is True for the given characters (fast per-byte tests)."""
    table = np.zeros(256, dtype=bool)
    table[np.frombuffer(chars, dtype=np.uint8)] = True
    return table


_ALLOWED = _byte_table(b"0123456789eE+-.,nul \t\n")
_DIGIT, _EXP, _SIGN = _byte_table(b"0123456789"), _byte_table(b"eE"), _byte_table(b"+-")


def _parse_inline_block(cells: np.ndarray) -> np.ndarray | None:
    """Inline vector cells (stripped, each starting with '[') parsed by pandas' C reader:
    (k, dim) float32, or None when any cell is not a flat JSON list of numbers and nulls of one
    common length (then the per-cell rules decide, with their messages). A million cells take
    seconds instead of a minute of json.loads and per-value float()."""
    parts: list[np.ndarray] = []
    for start in range(0, len(cells), _BLOCK):
        part = _parse_cells(cells[start : start + _BLOCK])
        if part is None or (parts and part.shape[1] != parts[0].shape[1]):
            return None
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _parse_cells(cells: np.ndarray) -> np.ndarray | None:
    k = len(cells)
    joined = "\n".join(cells.tolist())
    # Exactly one '[' and one ']' per cell, the ']' last: every cell is one flat list.
    if (
        joined.count("[") != k
        or joined.count("]") != k
        or joined.count("]\n") != k - 1
        or not joined.endswith("]")
    ):
        return None
    body = joined.replace("[", "").replace("]", "")
    if body.count("\n") != k - 1 or "\n\n" in body or not _plain_json_numbers(body):
        return None
    try:
        frame = pd.read_csv(
            io.StringIO(body),
            header=None,
            na_values=["null"],
            keep_default_na=False,
            dtype=np.float64,
            skipinitialspace=True,
            skip_blank_lines=False,
        )
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None  # a letter salad, an empty value, more values than the first row has
    values = frame.to_numpy(np.float64)
    if len(values) != k or body.count(",") != k * (values.shape[1] - 1):
        return None  # a row with fewer values (pandas pads those with NaN)
    if np.isinf(values).any():
        return None
    return values.astype(np.float32)


def _plain_json_numbers(body: str) -> bool:
    """True when ``body`` (cells without brackets) holds nothing that json.loads would refuse in
    a list of numbers: checked on the bytes with numpy, since regular expressions with
    look-arounds crawl over a hundred megabytes. pandas refuses the rest (empty values, stray
    letters)."""
    try:
        raw = np.frombuffer(body.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        return False
    if len(raw) == 0 or not _ALLOWED[raw].all():
        return False
    pad = np.full(2, ord(","), dtype=np.uint8)
    b = np.concatenate([pad, raw, pad])
    digit, exp, sign = _DIGIT[b], _EXP[b], _SIGN[b]
    # Each test looks at a byte (index 2 ...) and its neighbours, by slicing the padded arrays.
    cur, here = b[2:-2], slice(2, -2)
    prev, nxt, nxt2, prev2 = slice(1, -3), slice(3, -1), slice(4, None), slice(0, -4)
    bad = (cur == ord("+")) & ~exp[prev]  # '+' only in an exponent
    bad |= (cur == ord(".")) & ~(digit[prev] & digit[nxt])  # digits on both sides of a '.'
    bad |= exp[here] & ~digit[prev]
    bad |= exp[here] & ~(digit[nxt] | (sign[nxt] & digit[nxt2]))
    bad |= sign[here] & ~digit[nxt]
    # A leading zero of an integer part ('01', '-01'), not of an exponent ('1e-05').
    bad |= (
        (cur == ord("0"))
        & digit[nxt]
        & ~digit[prev]
        & (b[prev] != ord("."))
        & ~exp[prev]
        & ~(sign[prev] & exp[prev2])
    )
    return not bad.any()


def fill_from_table(
    cohort: Cohort,
    m_idx: int,
    table_ids: list[str],
    values: np.ndarray,
    columns: list[str],
    source: Path | None,
) -> None:
    """The vector modality ``m_idx`` from a labs table's rows, matched on id; patients the table
    lacks have it missing."""
    name = cohort.modalities[m_idx].name
    array = np.full((len(cohort), len(columns)), np.nan, dtype=np.float32)
    position = pd.Index(table_ids).get_indexer(cohort.ids)  # -1: not in the table
    found = position >= 0
    array[found] = values[position[found]]
    cohort.present[found, m_idx] = True
    matched = int(found.sum())
    if matched == 0:
        raise ManifestError(
            f"labs table {source} matches none of the {len(cohort)} manifest ids",
            hint="check --labs-id-col and that ids are written the same way (numeric ids are "
            "zero-padded to 10 digits on both sides)",
        )
    if matched < len(cohort):
        cohort.notes.append(
            f"labs table matched {matched} of {len(cohort)} manifest ids; the other "
            f"{len(cohort) - matched} patients are treated as missing {name}"
        )
    cohort.vectors[name] = array
    cohort.vector_columns[name] = list(columns)
