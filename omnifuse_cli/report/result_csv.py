"""Reading the CSV files a run or cross-validation writes, for the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

_TEXT = (
    "id",
    "pred",
    "present",
    "modalities",
    "variant",
    "split",
    "phase",
    "lazy_combo",
    "metric",
    "true",
    "label",
    "set",
    "conformal_mode",
)


def read_result_csv(path: Path, text: tuple[str, ...] = ()) -> pd.DataFrame:
    """A result CSV: text columns as written, the others numeric with empty cells as NaN (the
    files write an undefined metric as an empty cell)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        if column in _TEXT or column in text:
            continue
        filled = frame[column] != ""
        numbers = pd.to_numeric(frame[column].where(filled), errors="coerce")
        if int(numbers.notna().sum()) == int(filled.sum()):
            frame[column] = numbers
    return frame
