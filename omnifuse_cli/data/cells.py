"""A manifest's image and note cells, and the file paths written in its cells.

Paths are relative to the manifest's folder and may use Windows backslashes. An image cell is one
or more paths joined by ``;`` or ``|``, where a folder or a glob stands for its files in viewing
order and a multi-frame DICOM for each of its frames. A text cell is the note itself, or names a
note file when it looks like a path and that file exists. An empty cell is a missing modality.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path, PureWindowsPath
from typing import cast

import numpy as np
import pandas as pd

from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.data.cohort import Cohort, NoteStats
from omnifuse_cli.data.dicom import is_dicom, order_files
from omnifuse_cli.data.images import View, dicom_views, image_problem
from omnifuse_cli.data.tables import MAX_LISTED, Problems, row_name, sheet_row
from omnifuse_cli.data.text import Decoded, decode_note
from omnifuse_cli.errors import DataError

# A text cell names a note file only when it looks like a path (one line ending in a folder
# separator or a file extension: '1.2' is a number, not an extension) and that file exists;
# anything else is the note itself.
_PATH_LIKE = re.compile(r"^[^\n]{0,1023}([\\/]|\.[A-Za-z][A-Za-z0-9]{0,4})$")
_GLOB_CHARS = ("*", "?", "[")


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


def fill_images(
    cohort: Cohort,
    m_idx: int,
    cells: list[str],
    base: Path,
    problems: Problems,
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
                    problems.add(sheet_row(i), name, f"image {p} {problem}")
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


def fill_texts(
    cohort: Cohort, m_idx: int, cells: pd.Series, base: Path, problems: Problems, encoding: str
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
            problems.add(sheet_row(i), name, str(err))
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


def _read_note_file(path: Path, encoding: str) -> Decoded:
    try:
        return decode_note(path.read_bytes(), encoding)
    except ValueError as err:
        raise ValueError(f"note file {path} {err}") from None
