"""`omnifuse evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, handle_errors
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.cli.progress import pass_progress
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import parse_modality_rates


@handle_errors
@with_config_file
def evaluate(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A run directory written by omnifuse train (or run-dir in --config).",
            show_default=False,
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest", help="External cohort to evaluate instead of the run's test split."
        ),
    ] = None,
    labs_table: options.LabsTable = None,
    labs_id_col: options.LabsIdCol = None,
    labs_format: options.RunLabsFormat = None,
    labs_agg: options.RunLabsAgg = None,
    encoding: options.RunEncoding = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="Where to write the CSVs.",
            show_default="RUN_DIR/eval/<test|manifest>",
        ),
    ] = None,
    drop_modality: Annotated[
        list[str] | None,
        typer.Option(
            "--drop-modality", help="Simulate a missing modality for every patient (repeatable)."
        ),
    ] = None,
    missing_rate: Annotated[
        float,
        typer.Option(
            "--missing-rate",
            help="Hide each present modality with this probability, keeping one "
            "per patient (seeded).",
        ),
    ] = 0.0,
    modality_missing_rate: Annotated[
        list[str] | None,
        typer.Option(
            "--modality-missing-rate",
            metavar="NAME=RATE",
            help="Hide this modality with probability RATE instead of --missing-rate (repeatable): "
            "a deployment site that images fewer patients, e.g. us=0.8.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of --missing-rate and the bootstrap.")
    ] = 42,
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (0 = none)."
        ),
    ] = 1000,
    device: options.Device = "auto",
    batch_size: options.BatchSize = 32,
    cache: options.Cache = True,
    cache_dir: options.CacheDir = None,
    threads: options.Threads = None,
    subgroup_col: options.SubgroupCol = None,
    conformal: options.Conformal = None,
) -> None:
    """Metrics with 95% bootstrap intervals, calibration before/after, the operating point,
    decision curves, conformal coverage, subgroups, per missing pattern, confusion matrix."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import api
    from omnifuse_cli.cli.render import (
        calibration_table,
        confusion_table,
        coverage_summary_table,
        metrics_table,
        operating_point_table,
        patterns_table,
        subgroup_gaps_table,
    )
    from omnifuse_cli.data.text import check_encoding

    if run_dir is None:
        raise ConfigError("no run directory given", hint="omnifuse evaluate RUN_DIR")
    with pass_progress(console) as progress:
        result = api.Run.load(run_dir).evaluate(
            manifest,
            on_progress=lambda event: progress(event.text, event.done, event.total),
            labs_table=labs_table,
            labs_id_col=labs_id_col,
            out_dir=out_dir,
            device=device,
            batch_size=batch_size,
            drop_modalities=tuple(drop_modality or ()),
            missing_rate=missing_rate,
            modality_missing_rates=parse_modality_rates(modality_missing_rate),
            seed=seed,
            bootstrap=bootstrap,
            cache=cache,
            cache_dir=cache_dir,
            threads=threads,
            encoding=encoding and check_encoding(encoding),
            labs_format=labs_format,
            labs_agg=labs_agg,
            subgroup_cols=tuple(subgroup_col or ()),
            conformal=conformal,
        )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(
        metrics_table(result.metrics, f"{result.source} ({result.n} patients)", result.intervals)
    )
    clinical = result.clinical
    if clinical is not None:
        temperature = (
            f"temperature {result.posthoc.temperature:.3f}"
            if result.posthoc and result.posthoc.calibration == "temperature"
            else "not calibrated"
        )
        console.print(calibration_table(clinical.calibration, temperature))
        if clinical.operating_point is not None:
            console.print(operating_point_table(clinical.operating_point))
        if clinical.coverage is not None:
            console.print(coverage_summary_table(clinical.coverage))
        if clinical.gaps is not None:
            console.print(subgroup_gaps_table(clinical.gaps))
    console.print(patterns_table(result.patterns))
    console.print(
        confusion_table(result.confusion, result.class_names, "confusion matrix (rows = true)")
    )
    written = sorted(p.name for p in result.out_dir.glob("*.csv"))
    console.print(f"written to [bold]{result.out_dir}[/] ({', '.join(written)})")
    console.print(f"figures and a paper-ready page: omnifuse report {run_dir}")
