"""Reading a manifest (``id,label,<modality columns>``) into a Cohort.

Every format of the seed is accepted: numeric ids zero-padded to 10 digits; vector cells as an
inline JSON list, a ``.npy`` path or a one-row ``.csv`` path (or a separate labs table joined on
id); image cells as one or more paths joined by ``;`` or ``|``; text cells inline or a ``.txt``
path. An empty cell is a missing modality. Paths are relative to the manifest's folder and may use
Windows backslashes. Problems are collected and reported together, naming the row as a spreadsheet
shows it (header = row 1).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, TypedDict, cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import ON_BAD_FILE, ON_EMPTY_PATIENT, DataConfig, ModalitySpec
from omnifuse_cli.data.dicom import is_dicom, order_files
from omnifuse_cli.data.images import View, dicom_views, image_problem
from omnifuse_cli.data.text import AUTO, Decoded, decode_note
from omnifuse_cli.errors import ConfigError, DataError, ManifestError

VSCODE_MARKER = "_vscodecontentref_"
MAX_LISTED = 20
NO_MODALITY = "no modality present"  # the reason of a patient who has nothing to score
# A text cell names a note file only when it looks like a path (one line ending in a folder
# separator or a file extension: '1.2' is a number, not an extension) and that file exists;
# anything else is the note itself.
_PATH_LIKE = re.compile(r"^[^\n]{0,1023}([\\/]|\.[A-Za-z][A-Za-z0-9]{0,4})$")


@dataclass
class NoteStats:
    """How one text modality's notes were read, for `check`."""

    encodings: Counter[str] = field(default_factory=Counter)  # note files per encoding
    guessed: list[str] = field(default_factory=list)  # "path (encoding)" of guessed files
    empty: int = 0  # empty or whitespace-only notes (cells or files): missing text
    path_like: list[str] = field(default_factory=list)  # inline notes that look like a path


@dataclass
class Cohort:
    """Patients, labels and every modality's raw cell values, with the presence mask."""

    source: Path
    ids: list[str]
    labels: np.ndarray | None  # (N,) int64, None when the manifest has no label column
    modalities: tuple[ModalitySpec, ...]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # (N, D) float32, NaN = missing
    vector_columns: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, list[list[View]]] = field(default_factory=dict)  # file or frame
    texts: dict[str, list[str | None]] = field(default_factory=dict)
    present: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))  # (N, M)
    notes: list[str] = field(default_factory=list)  # things the user should hear about
    # Only with read_manifest(keep_bad_rows=True): row index -> why that patient cannot be used.
    bad_rows: dict[int, list[str]] = field(default_factory=dict)
    # Patients left out because they have no modality at all (on_empty_patient="skip"): their
    # ids and labels (-1 = none), recorded in the run's split files as excluded.
    excluded: list[tuple[str, int]] = field(default_factory=list)
    note_stats: dict[str, NoteStats] = field(default_factory=dict)  # text modality -> stats

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def subset(self, index: np.ndarray) -> Cohort:
        idx = np.asarray(index, dtype=np.int64)
        return Cohort(
            source=self.source,
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            modalities=self.modalities,
            vectors={k: v[idx] for k, v in self.vectors.items()},
            vector_columns=self.vector_columns,
            images={k: [v[i] for i in idx] for k, v in self.images.items()},
            texts={k: [v[i] for i in idx] for k, v in self.texts.items()},
            present=self.present[idx],
            notes=list(self.notes),
            excluded=list(self.excluded),
            note_stats=self.note_stats,
        )


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


def _row(i: int) -> int:
    """Spreadsheet row number of data row i (the header is row 1)."""
    return i + 2


def _is_empty(cell: object) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float) and math.isnan(cell):
        return True
    return str(cell).strip() == ""


def resolve_path(cell: str, base: Path) -> Path:
    """A manifest path, relative to the manifest's folder, with Windows separators accepted."""
    text = cell.strip().strip('"').strip("'")
    if "\\" in text:
        text = PureWindowsPath(text).as_posix()
    path = Path(text)
    return path if path.is_absolute() else base / path


def _where(row: int, ids: list[str] | None) -> str:
    """``row 7 (id P0042)``: the spreadsheet row to scroll to and the id to search for."""
    if ids is None or not 0 <= row - 2 < len(ids):
        return f"row {row}"
    pid = ids[row - 2]
    return f"row {row} (id {pid})" if pid else f"row {row} (no id)"


def row_name(index: int, ids: list[str]) -> str:
    """How messages name data row ``index``: ``row 7 (id P0042)``."""
    return _where(_row(index), ids)


class _Problems:
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
        return _as_vector([math.nan if v is None else v for v in values])
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
        return _as_vector(array.tolist())
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    rows = [r for r in frame.itertuples(index=False) if any(str(v).strip() for v in r)]
    if rows and not _numeric_row(rows[0]) and len(rows) == 2:
        rows = rows[1:]  # a header row above the values
    if len(rows) != 1:
        raise ValueError(f"{path.name} must hold one row of numbers, found {len(rows)} rows")
    return _as_vector(list(rows[0]))


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


def _as_vector(values: list[Any]) -> np.ndarray:
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


def _read_note_file(path: Path, encoding: str) -> Decoded:
    try:
        return decode_note(path.read_bytes(), encoding)
    except ValueError as err:
        raise ValueError(f"note file {path} {err}") from None


_GLOB_CHARS = ("*", "?", "[")


def split_image_cell(cell: str, base: Path) -> list[Path]:
    """Image paths of a cell: paths joined by ';' or '|'; a folder (``us/P0042/``) or a glob
    (``us/P0042_*.dcm``) stands for its files in viewing order (data.dicom.order_files: DICOMs
    by instance number when they all have one, else by name). A folder or glob that matches no
    file stays as written, so the check reports it."""
    parts = [p.strip() for p in cell.replace("|", ";").split(";")]
    paths: list[Path] = []
    for part in filter(None, parts):
        path = resolve_path(part, base)
        if any(c in part for c in _GLOB_CHARS) and not path.exists():
            found = sorted(p for p in path.parent.glob(path.name) if _visible_file(p))
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if _visible_file(p))
        else:
            paths.append(path)
            continue
        paths.extend(order_files(found) if found else [path])
    return paths


def absolute_paths(
    frame: pd.DataFrame, modalities: tuple[ModalitySpec, ...], base: Path
) -> pd.DataFrame:
    """A manifest table (as read from a DataFrame rather than a file) with every relative file
    reference made absolute against ``base``, by the rules the reader applies to a manifest's own
    folder: image cells part by part (folders and globs stay folders and globs), vector cells
    that are not inline lists, and note cells that name an existing file. Written to any folder,
    it then reads as if it sat in ``base``."""
    out = frame.copy()
    base = Path(base).absolute()

    def image_cell(cell: object) -> object:
        if _is_empty(cell):
            return cell
        parts = [p.strip() for p in str(cell).replace("|", ";").split(";")]
        return ";".join(str(resolve_path(p, base)) for p in parts if p)

    def vector_cell(cell: object) -> object:
        if _is_empty(cell) or str(cell).strip().startswith("["):
            return cell
        return str(resolve_path(str(cell), base))

    def text_cell(cell: object) -> object:
        if _is_empty(cell) or not _PATH_LIKE.match(str(cell).strip()):
            return cell
        path = resolve_path(str(cell), base)
        return str(path) if path.is_file() else cell

    rewrite = {"image": image_cell, "vector": vector_cell, "text": text_cell}
    for spec in modalities:
        if spec.name in out.columns:
            out[spec.name] = out[spec.name].map(rewrite[spec.kind])
    return out


def _visible_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


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
        # Here, not at the top: data.labs builds on this module's readers.
        from omnifuse_cli.data.labs import read_labs

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
    problems = _Problems(path, ids)
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
                    _row(i),
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
            _fill_from_table(cohort, m_idx, *table_vectors, labs_table)
        elif spec.kind == "vector":
            _fill_vectors(cohort, m_idx, frame[spec.name], base, problems)
        elif spec.kind == "image":
            _fill_images(
                cohort, m_idx, frame[spec.name].tolist(), base, problems, check_files, on_bad_file
            )
        else:
            _fill_texts(cohort, m_idx, frame[spec.name], base, problems, encoding)
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


def _keep_bad_rows(cohort: Cohort, problems: _Problems) -> None:
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


def _check_ids(ids: list[str], problems: _Problems) -> None:
    """Empty and repeated ids (after zero-padding), found with pandas rather than a row loop."""
    series = pd.Series(ids, dtype=object)
    for i in np.flatnonzero((series == "").to_numpy()).tolist():
        problems.add(_row(i), "id", "empty id")
    repeated = (series.duplicated() & (series != "")).to_numpy()
    if repeated.any():
        codes, _ = pd.factorize(series)
        first = np.unique(codes, return_index=True)[1]  # codes number ids by first appearance
        for i in np.flatnonzero(repeated).tolist():
            problems.add(
                _row(i),
                "id",
                f"duplicate id {ids[i]!r} (first at row {_row(int(first[codes[i]]))})",
            )


def _read_labels(
    frame: pd.DataFrame,
    problems: _Problems,
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
    problems: _Problems,
    required: bool,
    num_classes: int | None,
) -> None:
    if text == "":
        if required:
            problems.add(_row(i), "label", "empty label")
        return
    try:
        value = float(text)
        if not value.is_integer():
            raise ValueError
    except ValueError:
        problems.add(_row(i), "label", f"{text!r} is not an integer class index")
        return
    if num_classes is not None and not 0 <= value < num_classes:
        problems.add(
            _row(i), "label", f"{int(value)} is outside 0..{num_classes - 1} (--num-classes)"
        )
        return
    labels[i] = int(value)


def _fill_vectors(
    cohort: Cohort, m_idx: int, cells: pd.Series, base: Path, problems: _Problems
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
            problems.add(_row(i), name, str(err))
    lengths = {len(v) for v in rows.values()} | ({block.shape[1]} if len(block_idx) else set())
    if len(lengths) > 1:
        rows.update({int(i): v for i, v in zip(block_idx, block, strict=True)})
        rows = dict(sorted(rows.items()))
        block_idx, block = block_idx[:0], block[:0]
        counts = pd.Series([len(v) for v in rows.values()]).value_counts()
        common = int(counts.index[0])
        for i, v in list(rows.items()):
            if len(v) != common:
                problems.add(_row(i), name, f"vector has {len(v)} values, most rows have {common}")
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


def _fill_from_table(
    cohort: Cohort,
    m_idx: int,
    table_ids: list[str],
    values: np.ndarray,
    columns: list[str],
    source: Path | None,
) -> None:
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


def _fill_images(
    cohort: Cohort,
    m_idx: int,
    cells: list[str],
    base: Path,
    problems: _Problems,
    check_files: bool,
    on_bad_file: str,
) -> None:
    """Each patient's views: files, and every frame of a multi-frame DICOM (prepared.py keeps
    up to --max-us-images of them)."""
    name = cohort.modalities[m_idx].name
    lists: list[list[View]] = []
    skipped: list[str] = []
    for i, cell in enumerate(cells):
        paths = [] if _is_empty(cell) else split_image_cell(cell, base)
        if check_files:
            good = []
            for p in paths:
                problem = _image_problem(p)
                if problem is None:
                    good.append(p)
                elif on_bad_file == "skip":
                    skipped.append(f"{row_name(i, cohort.ids)}: {p} {problem}")
                else:
                    problems.add(_row(i), name, f"image {p} {problem}")
            paths = good if on_bad_file == "skip" else paths
        views: list[View] = []
        for p in paths:
            views.extend(_views(p))
        lists.append(views)
        cohort.present[i, m_idx] = bool(views)
    cohort.images[name] = lists
    if skipped:
        listed = "; ".join(skipped[:MAX_LISTED])
        more = f"; ... and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
        cohort.notes.append(
            f"skipped {len(skipped)} unreadable {name} image(s) "
            f"(--on-bad-file skip): {listed}{more}"
        )


def _image_problem(path: Path) -> str | None:
    """image_problem, with a folder or glob that matched nothing said as such."""
    if any(c in path.name for c in _GLOB_CHARS) and not path.exists():
        return "matches no file"
    if path.is_dir():
        return "is a folder without image files"
    return image_problem(path)


def _views(path: Path) -> list[View]:
    """The views of one usable file (a file whose header cannot be read has its one view, and
    decoding it reports the reason)."""
    if not is_dicom(path):
        return [path]
    try:
        return dicom_views(path)
    except DataError:
        return [path]


def _fill_texts(
    cohort: Cohort, m_idx: int, cells: pd.Series, base: Path, problems: _Problems, encoding: str
) -> None:
    name = cohort.modalities[m_idx].name
    stats = NoteStats()
    text = cells.str.strip()
    filled = (text != "").to_numpy()
    stats.empty = int(((cells != "") & ~filled).sum())  # whitespace only
    # Cells that look like a path (usually all or none) are note files when the file exists.
    candidates = filled & text.str.match(_PATH_LIKE).to_numpy()
    texts: list[str | None] = np.where(filled, text.to_numpy(), np.array(None)).tolist()
    cohort.present[:, m_idx] = filled
    for i in np.flatnonzero(candidates).tolist():
        path = resolve_path(cast(str, text.iat[i]), base)
        if not os.path.isfile(path):
            stats.path_like.append(f"{row_name(i, cohort.ids)}: {text.iat[i]!r}")
            continue
        try:
            decoded = _read_note_file(path, encoding)
        except (ValueError, OSError) as err:
            problems.add(_row(i), name, str(err))
            note = ""
        else:
            stats.encodings[decoded.encoding] += 1
            if decoded.guessed:
                stats.guessed.append(f"{path} ({decoded.encoding})")
            note = decoded.text.strip()
            stats.empty += not note
        texts[i] = note or None
        cohort.present[i, m_idx] = bool(note)
    cohort.texts[name] = texts
    cohort.note_stats[name] = stats
    if stats.path_like:
        cohort.notes.append(
            f"{len(stats.path_like)} {name} cell(s) look like a file path but no such file "
            f"exists, so they are read as the note itself: {'; '.join(stats.path_like[:3])}"
            + (" ..." if len(stats.path_like) > 3 else "")
        )


def check_trainable(cohort: Cohort, num_classes: int) -> None:
    """Labels must cover the classes well enough for a stratified three-way split; unlabeled
    patients (label -1) are allowed beside them."""
    if cohort.labels is None:
        raise DataError("training needs labels", hint="add a 'label' column")
    if not (cohort.labels >= 0).any():
        raise DataError(
            f"none of the {len(cohort)} patients has a label (every label cell is empty)",
            hint="training needs labelled patients; unlabeled ones only join them",
        )
    counts = np.bincount(cohort.labels[cohort.labels >= 0], minlength=num_classes)
    empty = [str(c) for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise DataError(
            f"class(es) {', '.join(empty)} have no patients (label counts: "
            + ", ".join(f"{c}={counts[c]}" for c in range(num_classes))
            + ")",
            hint="check --num-classes: labels must be 0..num_classes-1",
        )
