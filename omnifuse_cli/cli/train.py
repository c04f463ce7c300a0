"""`omnifuse train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from omnifuse_cli.cli.common import console, handle_errors
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.cli.options import TrackOption, TrackUriOption
from omnifuse_cli.cli.progress import live_progress, say
from omnifuse_cli.cli.train_options import with_train_options
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.errors import ConfigError

_RUNS_HELP = "Run directory for metrics, split and model."
_RUNS_DEFAULT = "runs/run-YYYYmmdd-HHMMSS"


@handle_errors
@with_config_file
@with_train_options(panel=None)
def train(
    manifest: Annotated[
        Path | None,
        typer.Argument(help="manifest.csv with columns id,label,<modalities>.", show_default=False),
    ] = None,
    manifest_opt: Annotated[
        Path | None,
        typer.Option("--manifest", help="Same as the MANIFEST argument (the seed's spelling)."),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(
            "--num-classes",
            min=2,
            help="Number of classes; labels are 0..C-1. Required.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its last complete epoch (all other "
            "settings come from the run).",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help=_RUNS_HELP, show_default=_RUNS_DEFAULT)
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Write into a non-empty --out-dir, replacing its files."),
    ] = False,
    track: TrackOption = None,
    track_uri: TrackUriOption = None,
    **train_options: Any,
) -> None:
    """Train OmniFuse on a manifest: stratified split, best-on-validation model, test metrics."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import api
    from omnifuse_cli.cli.render import (
        add_epoch_row,
        confusion_table,
        epoch_table,
        metrics_table,
        split_summary_table,
    )

    if resume is not None:
        console.print(f"resuming {resume} (settings from its request.json)")
        title = f"resuming {resume}"
    else:
        path = _one_manifest(manifest, manifest_opt)
        if num_classes is None:
            raise ConfigError(
                "--num-classes is required", hint=f"omnifuse train {path} --num-classes C"
            )
        title = f"training on {path}"

    table = epoch_table(title)
    # The live display starts with the first progress event, so input errors (raised before any
    # work starts) print alone, without an empty table above them. Plain lines without a TTY.
    live, progress = live_progress(table, console)
    task = progress.add_task("preparing", total=None)

    def on_event(event: ProgressEvent) -> None:
        if say(event, console):
            return
        if not live.is_started:
            live.start()
        if event.kind == "encode":
            progress.update(
                task, description="encoding (once)", completed=event.done, total=event.total
            )
        elif event.kind == "batch":
            progress.update(task, description="training", completed=event.done, total=event.total)
        elif event.kind == "epoch" and event.record is not None:
            add_epoch_row(table, event.record)

    try:
        if resume is not None:
            run = api.resume(resume, on_progress=on_event)
        else:
            assert num_classes is not None  # a ConfigError above otherwise
            run = api.train(
                path,
                num_classes=num_classes,
                out_dir=out_dir,
                overwrite=overwrite,
                on_progress=on_event,
                track=track,
                track_uri=track_uri,
                **train_options,
            )
    finally:
        progress.update(task, visible=False)
        live.stop()
    result = run.result
    assert result is not None  # train and resume return the training summary
    console.print()
    chosen = (
        result.bag
        if result.bag
        else f"best epoch: {result.best_epoch} (best validation "
        f"{result.select_metric.replace('_', '-')})"
    )
    console.print(
        f"{chosen}; "
        f"split train/val/test = {result.split_counts['train']}/"
        f"{result.split_counts['val']}/{result.split_counts['test']}; "
        f"device {result.device}"
    )
    if result.split_summary is not None:
        console.print(split_summary_table(result.split_summary))
    if result.confusion is None:
        console.print(
            "no internal test split (--test-ratio 0): evaluate an external cohort "
            f"with omnifuse evaluate {result.out_dir} --manifest TEST.csv"
        )
    else:
        console.print(
            metrics_table(result.test, "test metrics (best checkpoint)", first=result.select_metric)
        )
        console.print(
            confusion_table(
                result.confusion, result.class_names, "test confusion matrix (rows = true)"
            )
        )
    console.print(
        f"run saved to [bold]{result.out_dir}[/]  ·  next: omnifuse evaluate "
        f"{result.out_dir}  ·  omnifuse predict PATIENTS.csv --run {result.out_dir}"
    )


def _one_manifest(argument: Path | None, option: Path | None) -> Path:
    if argument is not None and option is not None and argument != option:
        raise ConfigError(f"two manifests given: {argument} and --manifest {option}")
    path = argument or option
    if path is None:
        raise ConfigError("no manifest given", hint="omnifuse train MANIFEST --num-classes C")
    return path
