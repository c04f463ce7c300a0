"""Reading a manifest (``id,label,<modality columns>``) into a Cohort.

Every format of the seed is accepted: numeric ids zero-padded to 10 digits; vector cells as an
inline JSON list, a ``.npy`` path or a one-row ``.csv`` path (or a separate labs table joined on
id); image cells as one or more paths joined by ``;`` or ``|``; text cells inline or a ``.txt``
path. An empty cell is a missing modality. Paths are relative to the manifest's folder and may use
Windows backslashes. Problems are collected and reported together, naming the row as a spreadsheet
shows it (header = row 1). The cells are parsed by data.vectors and data.cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import ON_BAD_FILE, ON_EMPTY_PATIENT, DataConfig, ModalitySpec
from omnifuse_cli.data.cells import fill_images, fill_texts
from omnifuse_cli.data.cohort import NO_MODALITY, Cohort
from omnifuse_cli.data.labs import read_labs
from omnifuse_cli.data.tables import (
    MAX_LISTED,
    VSCODE_MARKER,
    Problems,
    normalize_ids,
    read_table,
    row_name,
    sheet_row,
)
from omnifuse_cli.data.text import AUTO
from omnifuse_cli.data.vectors import fill_from_table, fill_vectors
from omnifuse_cli.errors import ConfigError, ManifestError


def read_manifest(
    path: Path,
    modalities: tuple[ModalitySpec, ...],
    *,
    labs_table: Path | None = None,
    labs_id_col: str = "id",
    require_labels: bool = True,
    num_classes: int | None = None,
    check_files: bool = True,
    on_bad_file: str = "error",
    keep_bad_rows: bool = False,
    keep_empty_rows: bool = False,
    encoding: str = AUTO,
    on_empty_patient: str = "skip",
    labs_format: str = "auto",
    labs_agg: str = "last",
    labs_analytes: list[str] | None = None,
    allow_unlabeled: bool = False,
) -> Cohort:
    """Parse and validate a manifest. Every problem found is reported in one ManifestError.

    check_files decodes every image; on_bad_file="skip" drops unreadable images instead of
    failing (a patient left without images has that modality missing) and says so in notes.
    keep_bad_rows (predict) records the rows with a problem in ``cohort.bad_rows`` instead of
    failing the whole file; problems of the file itself still raise. keep_empty_rows (predict,
    evaluate) does the same for patients without any modality (reason "no modality present").
    Otherwise patients without any modality are left out with a note (on_empty_patient="skip",
    listed in ``cohort.excluded``) or stop the read ("error"). ``encoding`` reads note files and
    the manifest itself (auto: see data.text.decode_note). ``labs_format``/``labs_agg`` read
    ``labs_table`` (data.labs.read_labs); ``labs_analytes`` forces its columns (a run's).
    allow_unlabeled (train, cv, evaluate): an empty label cell is an unlabeled patient (label
    -1) rather than a problem; a label that is not a class index is still one.
    """
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"--on-bad-file must be error or skip, got {on_bad_file!r}")
    if on_empty_patient not in ON_EMPTY_PATIENT:
        raise ConfigError(f"--on-empty-patient must be skip or error, got {on_empty_patient!r}")
    path = Path(path)
    frame = read_table(path, "manifest", encoding)
    base = path.parent
    if "id" not in frame.columns:
        raise ManifestError(
            f"manifest {path} has no 'id' column (columns: {', '.join(frame.columns)})",
            hint="the header must be id,label,<modality columns>",
        )
    table_vectors: tuple[list[str], np.ndarray, list[str]] | None = None
    table_notes: list[str] = []
    table_modality = next((m.name for m in modalities if m.kind == "vector"), None)
    if labs_table is not None:
        if table_modality is None:
            raise ManifestError("--labs-table was given but no modality is of kind vector")
        table = read_labs(
            Path(labs_table),
            id_col=labs_id_col,
            layout=labs_format,
            agg=labs_agg,
            analytes=labs_analytes,
            encoding=encoding,
        )
        table_vectors = (table.ids, table.values, table.columns)
        table_notes = table.notes
    needed = [m.name for m in modalities if not (m.name == table_modality and table_vectors)]
    missing_cols = [c for c in needed if c not in frame.columns]
    if missing_cols:
        raise ManifestError(
            f"manifest {path} lacks column(s) {', '.join(missing_cols)} "
            f"(columns: {', '.join(frame.columns)})",
            hint="declare the modality columns with --modality NAME=KIND, or add the columns "
            "(an empty cell marks a missing modality)",
        )
    ids = normalize_ids(frame["id"])
    problems = Problems(path, ids)
    _check_ids(ids, problems)

    labels = _read_labels(
        frame,
        problems,
        require_labels and not allow_unlabeled,
        num_classes,
        keep_column=allow_unlabeled,
    )
    for column in frame.columns:
        hits = frame[column].str.contains(VSCODE_MARKER, regex=False).to_numpy()
        for i in np.flatnonzero(hits).tolist():
            cell = cast(str, frame[column].iat[i])  # dtype=str: every cell is a str
            if VSCODE_MARKER in cell:
                problems.add(
                    sheet_row(i),
                    column,
                    f"{cell!r} is a VS Code link, not a file path; paste the real relative path",
                )
    n = len(ids)
    present = np.zeros((n, len(modalities)), dtype=bool)
    cohort = Cohort(
        source=path,
        ids=ids,
        labels=labels,
        modalities=modalities,
        present=present,
        notes=list(table_notes),
    )
    for m_idx, spec in enumerate(modalities):
        if spec.kind == "vector" and spec.name == table_modality and table_vectors is not None:
            fill_from_table(cohort, m_idx, *table_vectors, labs_table)
        elif spec.kind == "vector":
            fill_vectors(cohort, m_idx, frame[spec.name], base, problems)
        elif spec.kind == "image":
            fill_images(
                cohort, m_idx, frame[spec.name].tolist(), base, problems, check_files, on_bad_file
            )
        else:
            fill_texts(cohort, m_idx, frame[spec.name], base, problems, encoding)
    if keep_bad_rows:
        _keep_bad_rows(cohort, problems)
    problems.raise_if_any(
        "the manifest has problems", "fix the listed cells (an empty cell marks a missing modality)"
    )
    none_present = np.flatnonzero(~present.any(axis=1) & ~_bad_mask(cohort))
    if keep_bad_rows or keep_empty_rows:
        for i in none_present:
            cohort.bad_rows[int(i)] = [NO_MODALITY]
    elif len(none_present):
        rows = ", ".join(row_name(int(i), ids) for i in none_present[:MAX_LISTED])
        extra = len(none_present) - MAX_LISTED
        more = f" and {extra} more" if extra > 0 else ""
        if on_empty_patient == "error":
            raise ManifestError(
                f"{path}: {len(none_present)} patient(s) have no modality at all: {rows}{more}",
                hint="give each patient at least one modality, remove those rows, or leave "
                "them out with --on-empty-patient skip",
            )
        if len(none_present) == n:
            raise ManifestError(
                f"{path}: none of the {n} patients has any modality",
                hint="check --modality: the columns it names are all empty",
            )
        keep = np.ones(n, dtype=bool)
        keep[none_present] = False
        excluded = [
            (ids[i], -1 if labels is None else int(labels[i])) for i in none_present.tolist()
        ]
        cohort = cohort.subset(np.flatnonzero(keep))
        cohort.excluded = excluded
        cohort.notes.append(
            f"left out {len(none_present)} patient(s) with no modality at all "
            f"(--on-empty-patient skip): {rows}{more}"
        )
    if n == 0:
        raise ManifestError(f"manifest {path} has a header but no patients")
    return cohort


class ReadingOptions(TypedDict):
    """read_manifest's keyword arguments that a DataConfig decides."""

    labs_table: Path | None
    labs_id_col: str
    on_bad_file: str
    encoding: str
    on_empty_patient: str
    labs_format: str
    labs_agg: str


def reading_options(data: DataConfig) -> ReadingOptions:
    """read_manifest's keyword arguments for a DataConfig (train, cv, check read alike)."""
    return {
        "labs_table": Path(data.labs_table) if data.labs_table else None,
        "labs_id_col": data.labs_id_col,
        "on_bad_file": data.on_bad_file,
        "encoding": data.encoding,
        "on_empty_patient": data.on_empty_patient,
        "labs_format": data.labs_format,
        "labs_agg": data.labs_agg,
    }


def _bad_mask(cohort: Cohort) -> np.ndarray:
    mask = np.zeros(len(cohort), dtype=bool)
    mask[list(cohort.bad_rows)] = True
    return mask


def _keep_bad_rows(cohort: Cohort, problems: Problems) -> None:
    """Move per-row problems into ``cohort.bad_rows`` and blank those rows, so the rest of the
    file can be used and nothing unreadable is ever loaded."""
    for i, reasons in problems.by_index.items():
        cohort.bad_rows[i] = reasons
        cohort.present[i] = False
        for lists in cohort.images.values():
            lists[i] = []
        for texts in cohort.texts.values():
            texts[i] = None
        for array in cohort.vectors.values():
            array[i] = np.nan
    problems.by_index.clear()
    problems.items.clear()


def _check_ids(ids: list[str], problems: Problems) -> None:
    """Empty and repeated ids (after zero-padding), found with pandas rather than a row loop."""
    series = pd.Series(ids, dtype=object)
    for i in np.flatnonzero((series == "").to_numpy()).tolist():
        problems.add(sheet_row(i), "id", "empty id")
    repeated = (series.duplicated() & (series != "")).to_numpy()
    if repeated.any():
        codes, _ = pd.factorize(series)
        first = np.unique(codes, return_index=True)[1]  # codes number ids by first appearance
        for i in np.flatnonzero(repeated).tolist():
            problems.add(
                sheet_row(i),
                "id",
                f"duplicate id {ids[i]!r} (first at row {sheet_row(int(first[codes[i]]))})",
            )


def _read_labels(
    frame: pd.DataFrame,
    problems: Problems,
    required: bool,
    num_classes: int | None,
    keep_column: bool = False,
) -> np.ndarray | None:
    """Class indices, -1 for an empty cell (an unlabeled patient where allowed). None without
    a label column, or (unless ``keep_column``) when no patient has a label."""
    if "label" not in frame.columns:
        if required or keep_column:
            raise ManifestError(
                f"manifest {problems.source} has no 'label' column "
                f"(columns: {', '.join(frame.columns)})",
                hint="training and evaluation need id,label,<modalities>",
            )
        return None
    labels = np.full(len(frame), -1, dtype=np.int64)
    text = frame["label"].astype(str).str.strip()
    empty = (text == "").to_numpy()
    values = pd.to_numeric(text.where(~empty, None), errors="coerce").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        good = ~empty & np.isfinite(values) & (values == np.round(values))
        if num_classes is not None:
            good &= (values >= 0) & (values < num_classes)
    labels[good] = values[good].astype(np.int64)
    # The rest (empty, not a number, out of range) one by one, for the messages.
    for i in np.flatnonzero(~good).tolist():
        _read_label(cast(str, text.iat[i]), i, labels, problems, required, num_classes)
    if not required and not keep_column and (labels < 0).all():
        return None
    return labels


def _read_label(
    text: str,
    i: int,
    labels: np.ndarray,
    problems: Problems,
    required: bool,
    num_classes: int | None,
) -> None:
    if text == "":
        if required:
            problems.add(sheet_row(i), "label", "empty label")
        return
    try:
        value = float(text)
        if not value.is_integer():
            raise ValueError
    except ValueError:
        problems.add(sheet_row(i), "label", f"{text!r} is not an integer class index")
        return
    if num_classes is not None and not 0 <= value < num_classes:
        problems.add(
            sheet_row(i), "label", f"{int(value)} is outside 0..{num_classes - 1} (--num-classes)"
        )
        return
    labels[i] = int(value)
