"""`omnifuse predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, handle_errors


@handle_errors
def predict(
    patients: Annotated[Path, typer.Argument(
        help="CSV in the manifest format (id,<modalities>; label optional).")],
    run: Annotated[Path | None, typer.Option(
        "--run", help="Run directory to use [default: the newest run under ./runs].")] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the predictions CSV.")
                   ] = Path("predictions.csv"),
    labs_table: options.LabsTable = None,
    labs_id_col: options.LabsIdCol = None,
    device: options.Device = "auto",
    batch_size: options.BatchSize = 32,
) -> None:
    """Predict classes for new patients, with each modality's DWFuse weight."""
    from omnifuse_cli.cli.render import predictions_table
    from omnifuse_cli.engine.files import write_csv
    from omnifuse_cli.engine.prediction import PredictRequest, predict_patients
    from omnifuse_cli.engine.runs import find_latest_run

    if run is None:
        run = find_latest_run()
        console.print(f"using the newest run: [bold]{run}[/] (choose another with --run)")
    result = predict_patients(PredictRequest(run_dir=run, patients=patients,
                                             labs_table=labs_table, labs_id_col=labs_id_col,
                                             device=device, batch_size=batch_size))
    write_csv(out, result.frame)
    console.print(predictions_table(result.frame, result.class_names, result.modality_names))
    console.print(f"written to [bold]{out}[/]")
