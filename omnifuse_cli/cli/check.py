"""`omnifuse check`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, err_console, handle_errors
from omnifuse_cli.config import DataConfig, TrainConfig, parse_modality_options


@handle_errors
def check(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv to validate.")],
    num_classes: Annotated[
        int | None,
        typer.Option(
            "--num-classes",
            min=2,
            help="Check labels against 0..C-1.",
            show_default="from the data",
        ),
    ] = None,
    labs_table: options.LabsTable = None,
    labs_id_col: options.LabsIdCol = None,
    modality: options.Modality = None,
    on_bad_file: options.OnBadFile = "error",
    labs_format: options.LabsFormat = "auto",
    labs_agg: options.LabsAgg = "last",
    encoding: options.Encoding = "auto",
    on_empty_patient: options.OnEmptyPatient = "skip",
    train_ratio: Annotated[float, typer.Option("--train-ratio")] = 0.8,
    val_ratio: Annotated[float, typer.Option("--val-ratio")] = 0.1,
    test_ratio: Annotated[float, typer.Option("--test-ratio", help="0: no test split.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 42,
) -> None:
    """Validate a manifest without training and print a data audit (exit 0 when trainable)."""
    # Here, not at the top: these load numpy, pandas and torch, which `omnifuse --help` must not.
    from omnifuse_cli.cli.render import audit_tables
    from omnifuse_cli.data.text import check_encoding
    from omnifuse_cli.engine.audit import audit_manifest

    data = DataConfig(
        modalities=parse_modality_options(modality),
        labs_table=str(labs_table) if labs_table else None,
        labs_id_col=labs_id_col or "id",
        on_bad_file=on_bad_file,
        labs_format=labs_format,
        labs_agg=labs_agg,
        encoding=check_encoding(encoding),
        on_empty_patient=on_empty_patient,
    )
    split = TrainConfig(
        train_ratio=train_ratio, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed
    )
    report = audit_manifest(manifest, data, num_classes=num_classes, split=split)
    for table in audit_tables(report):
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for name, stats in report.note_stats.items():
        if stats.guessed:
            shown = "; ".join(stats.guessed[:20])
            more = f"; ... and {len(stats.guessed) - 20} more" if len(stats.guessed) > 20 else ""
            console.print(
                f"[yellow]note:[/] the encoding of {len(stats.guessed)} {name} note "
                f"file(s) was guessed (no BOM, not UTF-8); check them or pass "
                f"--encoding: {escape(shown + more)}"
            )
    if not report.trainable:
        for problem in report.problems:
            err_console.print(f"[bold red]not trainable:[/] {problem}")
        raise typer.Exit(code=2)
    given = [
        *(f"--modality {m}" for m in modality or ()),
        *([f"--labs-table {labs_table}"] if labs_table else []),
        *([f"--labs-id-col {labs_id_col}"] if labs_id_col else []),
        *([f"--on-bad-file {on_bad_file}"] if on_bad_file != "error" else []),
        *([f"--labs-format {labs_format}"] if labs_format != "auto" else []),
        *([f"--labs-agg {labs_agg}"] if labs_agg != "last" else []),
        *([f"--encoding {encoding}"] if encoding != "auto" else []),
        *([f"--on-empty-patient {on_empty_patient}"] if on_empty_patient != "skip" else []),
    ]
    command = " ".join(
        [f"omnifuse train {manifest} --num-classes {len(report.label_counts)}", *given]
    )
    if report.n_unlabeled:
        console.print(
            f"[yellow]note:[/] {report.n_unlabeled} patient(s) have an empty label: "
            "unlabeled, they train the imputation and fit the normalisation and "
            "vocabulary, never a label loss, the validation score or a test metric"
        )
    who = (
        f"{report.n_patients - report.n_unlabeled} labelled + {report.n_unlabeled} "
        "unlabeled patients"
        if report.n_unlabeled
        else f"{report.n_patients} patients"
    )
    console.print(f"[green]ok:[/] {who}, ready for `{escape(command)}`")
