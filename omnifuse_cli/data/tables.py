"""CSV tables (a manifest, a labs table) read as strings, their patient ids written one way,
and their rows named in messages.

Rows are named as a spreadsheet shows them (header = row 1), with the patient's id where it is
known, and the problems of a whole table are collected so the user sees all of them at once.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from omnifuse_cli.data.text import AUTO, decode_note
from omnifuse_cli.errors import ManifestError

VSCODE_MARKER = "_vscodecontentref_"
MAX_LISTED = 20


def normalize_id(raw: object) -> str:
    """Numeric ids are zero-padded to 10 digits (as the seed does); others are kept stripped."""
    text = str(raw).strip()
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    return text.zfill(10) if text.isdigit() else text


def normalize_ids(values: pd.Series) -> list[str]:
    """normalize_id over a column; ids already written as 10 digits (make-data's, and most
    exports) skip the full rules, which keeps a million rows well under a second."""
    return [
        v if len(v) == 10 and v.isdigit() else normalize_id(v) for v in values.astype(str).tolist()
    ]


def sheet_row(i: int) -> int:
    """Spreadsheet row number of data row i (the header is row 1)."""
    return i + 2


def _where(row: int, ids: list[str] | None) -> str:
    """``row 7 (id P0042)``: the spreadsheet row to scroll to and the id to search for."""
    if ids is None or not 0 <= row - 2 < len(ids):
        return f"row {row}"
    pid = ids[row - 2]
    return f"row {row} (id {pid})" if pid else f"row {row} (no id)"


def row_name(index: int, ids: list[str]) -> str:
    """How messages name data row ``index``: ``row 7 (id P0042)``."""
    return _where(sheet_row(index), ids)


class Problems:
    """Collects per-row problems so the user sees all of them in one message."""

    def __init__(self, source: Path, ids: list[str] | None = None) -> None:
        self.source = source
        self.ids = ids  # normalised ids of the data rows, to name each row by its id as well
        self.items: list[str] = []
        self.by_index: dict[int, list[str]] = {}  # data row index -> its problems (no id)

    def add(self, row: int, column: str, message: str) -> None:
        self.items.append(f"{_where(row, self.ids)}, column {column!r}: {message}")
        self.by_index.setdefault(row - 2, []).append(f"row {row}, column {column!r}: {message}")

    def raise_if_any(self, title: str, hint: str) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_LISTED])
        more = len(self.items) - MAX_LISTED
        extra = f"\n  ... and {more} more" if more > 0 else ""
        raise ManifestError(
            f"{self.source}: {title} ({len(self.items)} problem(s)):\n  {shown}{extra}", hint=hint
        )


def read_table(path: Path, what: str, encoding: str = AUTO) -> pd.DataFrame:
    """A CSV read as strings, with a clear error for files that are not CSV. ``auto``: UTF-8
    (a BOM is fine), else the encoding decode_note finds for the whole file."""
    if VSCODE_MARKER in str(path):
        raise ManifestError(
            f"{path} is a VS Code link, not a file path",
            hint="VS Code copies clickable links as http://_vscodecontentref_/...; type the real "
            "path instead, e.g. data_synth_raw/manifest.csv",
        )
    if not path.exists():
        raise ManifestError(f"{what} {path} does not exist", hint="check the path and try again")
    if path.is_dir():
        raise ManifestError(f"{what} {path} is a folder, not a CSV file")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    wide = head.startswith((b"\xff\xfe", b"\xfe\xff")) or encoding.startswith(("utf-16", "utf-32"))
    if b"\x00" in head and not wide:
        raise ManifestError(f"{what} {path} is a binary file, not a CSV")
    options: dict[str, Any] = {"dtype": str, "keep_default_na": False, "skipinitialspace": True}
    frame: pd.DataFrame
    try:
        if encoding == AUTO:
            try:
                frame = pd.read_csv(path, encoding="utf-8-sig", **options)
            except UnicodeDecodeError:
                # Not UTF-8: the whole file decides its encoding (UTF-16 exports, Windows-1252,
                # GB18030), as for a note file.
                try:
                    text = decode_note(path.read_bytes()).text
                except ValueError as err:
                    raise ManifestError(f"{what} {path} {err}") from None
                frame = pd.read_csv(io.StringIO(text), **options)
        else:
            frame = pd.read_csv(path, encoding=encoding, **options)
    except pd.errors.EmptyDataError as err:
        raise ManifestError(f"{what} {path} is empty", hint="it needs a header row") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"{what} {path} is not a readable CSV: {err}",
            hint="name its encoding with --encoding"
            if isinstance(err, UnicodeDecodeError)
            else None,
        ) from err
    frame.columns = [str(c).strip().lstrip("\ufeff") for c in frame.columns]
    return frame
