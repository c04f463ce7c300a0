"""Option aliases shared by several commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

LabsTable = Annotated[
    Path | None,
    typer.Option("--labs-table", help="One CSV of lab values for all patients (id column + one "
                 "column per analyte); replaces the manifest's labs cells."),
]
LabsIdCol = Annotated[
    str | None,
    typer.Option("--labs-id-col", help="Id column of --labs-table.",
                 show_default="id; evaluate and predict: the run's"),
]
Modality = Annotated[
    list[str] | None,
    typer.Option("--modality", help="Declare a manifest column as a modality, NAME=KIND with KIND "
                 "vector, image or text; repeat for each.",
                 show_default="labs=vector us=image text=text"),
]
Device = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Patients per batch.")]
OnBadFile = Annotated[
    str,
    typer.Option("--on-bad-file", help="Unreadable image files (missing, corrupt, truncated, "
                 "unsupported): error lists them all; skip drops them and treats the modality "
                 "as missing where none are left."),
]
CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Folder of the frozen-feature cache: images and hf notes "
                 "encoded once by a frozen backbone, reused by later runs, cv folds, --resume, "
                 "evaluate and predict on the same files.",
                 show_default="$OMNIFUSE_CACHE_DIR, else ~/.cache/omnifuse/features"),
]
Cache = Annotated[
    bool,
    typer.Option("--cache/--no-cache", help="Keep frozen-backbone features in the cache folder "
                 "and reuse them; --no-cache encodes them again, in memory, for this run only."),
]
