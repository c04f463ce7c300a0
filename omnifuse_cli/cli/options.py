"""Option aliases shared by several commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

LabsTable = Annotated[
    Path | None,
    typer.Option(
        "--labs-table",
        help="One CSV of lab values for all patients (id column + one "
        "column per analyte); replaces the manifest's labs cells.",
    ),
]
LabsIdCol = Annotated[
    str | None,
    typer.Option(
        "--labs-id-col",
        help="Id column of --labs-table.",
        show_default="id; evaluate and predict: the run's",
    ),
]
Modality = Annotated[
    list[str] | None,
    typer.Option(
        "--modality",
        help="Declare a manifest column as a modality, NAME=KIND with KIND "
        "vector, image or text; repeat for each.",
        show_default="labs=vector us=image text=text",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Patients per batch.")]
OnBadFile = Annotated[
    str,
    typer.Option(
        "--on-bad-file",
        help="Unreadable image files (missing, corrupt, truncated, "
        "unsupported): error lists them all; skip drops them and treats the modality "
        "as missing where none are left.",
    ),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Folder of the frozen-feature cache: images and hf notes "
        "encoded once by a frozen backbone, reused by later runs, cv folds, --resume, "
        "evaluate and predict on the same files.",
        show_default="$OMNIFUSE_CACHE_DIR, else ~/.cache/omnifuse/features",
    ),
]
Cache = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache",
        help="Keep frozen-backbone features in the cache folder "
        "and reuse them; --no-cache encodes them again, in memory, for this run only.",
    ),
]
Encoding = Annotated[
    str,
    typer.Option(
        "--encoding",
        help="Encoding of note files (and of the manifest): auto (a BOM "
        "decides, else UTF-8, else UTF-16, Windows-1252 or GB18030 by what the text "
        "looks like; check names every guessed file) or a name such as utf-8, "
        "gb18030, cp1252, latin-1, utf-16.",
    ),
]
LabsFormat = Annotated[
    str,
    typer.Option(
        "--labs-format",
        help="Layout of --labs-table: wide (one row per patient, a "
        "column per analyte), long (one row per measurement: id, analyte, value, "
        "optional time and unit) or auto (from the columns).",
    ),
]
LabsAgg = Annotated[
    str,
    typer.Option(
        "--labs-agg",
        help="Long labs with several values of one analyte for a "
        "patient: last or first (by time, else by row order), mean, min or max.",
    ),
]
OnEmptyPatient = Annotated[
    str,
    typer.Option(
        "--on-empty-patient",
        help="Patients without any modality: skip leaves them "
        "out with a warning (recorded as excluded in split_assignment.csv); error "
        "refuses the manifest.",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads torch may use.",
        show_default="the usable cores (CPU affinity, cgroup limit, OMP_NUM_THREADS)",
    ),
]
RunEncoding = Annotated[
    str | None,
    typer.Option(
        "--encoding",
        help="Encoding of note files (and of the manifest): auto or a "
        "name such as utf-8, gb18030, cp1252.",
        show_default="the run's",
    ),
]
RunLabsFormat = Annotated[
    str | None,
    typer.Option(
        "--labs-format",
        help="Layout of --labs-table: wide, long or auto.",
        show_default="the run's",
    ),
]
RunLabsAgg = Annotated[
    str | None,
    typer.Option(
        "--labs-agg",
        help="Long labs: last, first, mean, min or max of a patient's values of one analyte.",
        show_default="the run's",
    ),
]
SubgroupCol = Annotated[
    list[str] | None,
    typer.Option(
        "--subgroup-col",
        help="A manifest column to report every metric by (sex, "
        "site, scanner; repeatable). A numeric column is banded with COL:q4 "
        "(quartiles) or cut points COL:40,65. Never a model input.",
        show_default=False,
    ),
]
Conformal = Annotated[
    float | None,
    typer.Option(
        "--conformal",
        min=0.0,
        max=1.0,
        help="Split conformal prediction sets at "
        "miscoverage ALPHA (0.1: each set holds the true class for about 90% of "
        "patients), calibrated on the run's validation split.",
        metavar="ALPHA",
        show_default=False,
    ),
]
