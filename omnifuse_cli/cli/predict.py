"""`omnifuse predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, err_console, handle_errors
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.cli.progress import pass_progress
from omnifuse_cli.errors import ConfigError


@handle_errors
@with_config_file
def predict(
    patients: Annotated[
        Path | None,
        typer.Argument(
            help="CSV in the manifest format (id,<modalities>; label optional), or patients in "
            "--config.",
            show_default=False,
        ),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run", help="Run directory to use.", show_default="the newest run under ./runs"
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the predictions CSV.")] = Path(
        "predictions.csv"
    ),
    labs_table: options.LabsTable = None,
    labs_id_col: options.LabsIdCol = None,
    labs_format: options.RunLabsFormat = None,
    labs_agg: options.RunLabsAgg = None,
    encoding: options.RunEncoding = None,
    device: options.Device = "auto",
    batch_size: options.BatchSize = 32,
    cache: options.Cache = True,
    cache_dir: options.CacheDir = None,
    threads: options.Threads = None,
    conformal: options.Conformal = None,
) -> None:
    """Predict classes for new patients, with each modality's DWFuse weight."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import api
    from omnifuse_cli.cli.render import predictions_table
    from omnifuse_cli.data.text import check_encoding
    from omnifuse_cli.engine.files import write_csv
    from omnifuse_cli.engine.runs import find_latest_run

    if patients is None:
        raise ConfigError("no patients file given", hint="omnifuse predict PATIENTS.csv --run RUN")
    if run is None:
        run = find_latest_run()
        console.print(f"using the newest run: [bold]{run}[/] (choose another with --run)")
    with pass_progress(console) as progress:
        result = api.Run.load(run).predict_result(
            patients,
            on_progress=lambda event: progress(event.text, event.done, event.total),
            labs_table=labs_table,
            labs_id_col=labs_id_col,
            device=device,
            batch_size=batch_size,
            cache=cache,
            cache_dir=cache_dir,
            threads=threads,
            encoding=encoding and check_encoding(encoding),
            labs_format=labs_format,
            labs_agg=labs_agg,
            conformal=conformal,
        )
    for note in result.notes:
        console.print(f"[dim]·[/] {escape(note)}")
    write_csv(out, result.frame)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    console.print(predictions_table(result.frame, result.class_names, result.modality_names))
    console.print(f"written to [bold]{escape(str(out))}[/]")
