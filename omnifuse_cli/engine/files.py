"""Writing run files safely: atomic replacement, and never clobbering a user's folder."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotated: run files are named where pandas is not loaded yet
    import pandas as pd

from omnifuse_cli.errors import ConfigError


def temp_file_beside(path: Path) -> Path:
    """Create an empty, uniquely named file next to ``path`` to write and then rename over it.

    Unlike mkstemp's 0o600 it gets the permissions a plain open() would give (0o666 less the
    user's umask, applied by the kernel), so colleagues in the group can read a shared run."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    write_text_atomic(path, buffer.getvalue())


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; a non-empty one is only written into with ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} exists and is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out-dir {out_dir} already exists and is not empty",
            hint="choose another --out-dir, or pass --overwrite to replace its files",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
