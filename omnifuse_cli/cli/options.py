"""Options shared by several commands (one definition, one help text): settings of
omnifuse_cli/settings.py as typer options, and the options of commands that read a run."""

from __future__ import annotations

from types import GenericAlias
from typing import Annotated, Any

import typer

from omnifuse_cli.settings import BY_NAME


def setting_option(name: str, panel: str | None = None) -> Any:
    """The typer option of a setting of omnifuse_cli/settings.py (its flag, type, default's
    display and help), listed under ``panel`` in --help."""
    setting = BY_NAME[name]
    # GenericAlias(list, kind) is list[kind], built from a runtime value
    base: Any = GenericAlias(list, setting.kind) if setting.many else setting.kind
    if setting.optional:
        base = base | None
    option = typer.Option(
        setting.flag,
        help=setting.help or None,
        show_default=setting.show_default,
        rich_help_panel=panel,
        min=setting.min,
        max=setting.max,
    )
    return Annotated[base, option]


# Settings that evaluate, predict and check take as well (same flag, type and help).
LabsTable = setting_option("labs_table")
LabsIdCol = setting_option("labs_id_col")
Modality = setting_option("modality")
Device = setting_option("device")
# Scoring's batch is a plain 32 (train's follows the cohort-size rule).
BatchSize = Annotated[
    int,
    typer.Option("--batch-size", help="Patients per batch.", show_default=True, min=1),
]
OnBadFile = setting_option("on_bad_file")
CacheDir = setting_option("cache_dir")
Cache = setting_option("cache")
Encoding = setting_option("encoding")
LabsFormat = setting_option("labs_format")
LabsAgg = setting_option("labs_agg")
OnEmptyPatient = setting_option("on_empty_patient")
Threads = setting_option("threads")


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

# --track / --track-uri of train, cv and tune run (engine/tracking.py).
TrackOption = Annotated[
    str | None,
    typer.Option(
        "--track",
        help="Log settings, per-epoch metrics, final metrics, the report and the model to "
        "mlflow or tensorboard (each an optional extra of omnifuse, named alike).",
        show_default=False,
    ),
]
TrackUriOption = Annotated[
    str | None,
    typer.Option(
        "--track-uri",
        help="MLflow tracking URI (http://..., sqlite:///...) or TensorBoard log dir.",
        show_default="mlflow: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db; tensorboard: "
        "OUT_DIR/tensorboard",
    ),
]
