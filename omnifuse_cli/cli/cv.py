"""`omnifuse cv`: every `train` option (shared through cli/train_options.py) plus the folds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from omnifuse_cli.cli import options
from omnifuse_cli.cli.common import console, handle_errors
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.cli.options import TrackOption, TrackUriOption
from omnifuse_cli.cli.progress import live_progress, say
from omnifuse_cli.cli.train_options import parse_variant, with_train_options
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import build_configs


@handle_errors
@with_config_file
@with_train_options()
def cv(
    manifest: Annotated[
        Path | None,
        typer.Argument(help="manifest.csv with columns id,label,<modalities>.", show_default=False),
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
    folds: Annotated[
        int,
        typer.Option(
            "--folds",
            min=2,
            help="Folds, stratified by label (each class needs at least this many patients).",
        ),
    ] = 5,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            min=1,
            help="Repeat the cross-validation with new folds (seed + repeat - "
            "1); pooled metrics are the mean over repeats.",
        ),
    ] = 1,
    group_col: Annotated[
        str | None,
        typer.Option(
            "--group-col",
            help="Manifest column of a patient or site id: all its rows land in one "
            "fold (and one side of each inner validation split).",
            show_default=False,
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help='NAME="TRAIN FLAGS": also train this variant on the same folds and '
            "report its paired differences from the base model, e.g. --variant "
            'no-imputation="--no-imputation" (repeatable).',
            show_default=False,
        ),
    ] = None,
    variants_file: Annotated[
        Path | None,
        typer.Option(
            "--variants-file",
            help="Variants, one NAME=FLAGS per line (# comments).",
            show_default=False,
        ),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Also train one final model on all patients (an inner validation split "
            "picks its epoch) and save it under OUT_DIR/final for omnifuse predict.",
        ),
    ] = False,
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap",
            min=0,
            help="Bootstrap resamples of patients for the 95% intervals and "
            "paired differences (0 = none).",
        ),
    ] = 1000,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted cross-validation after its last complete "
            "fold (all other settings come from its cv.json).",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="Folder for the results (default: runs/cv-YYYYmmdd-HHMMSS).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Write into a non-empty --out-dir, replacing its files."),
    ] = False,
    subgroup_col: options.SubgroupCol = None,
    conformal: options.Conformal = None,
    track: TrackOption = None,
    track_uri: TrackUriOption = None,
    **train_options: Any,
) -> None:
    """Cross-validate: k folds by patient, pooled out-of-fold metrics with 95% intervals, per-fold
    mean and SD, per missing pattern, and variants compared on the same folds.

    Inside each training fold an inner validation split (--val-ratio / (--train-ratio +
    --val-ratio) of it) picks the epoch; the test fold chooses nothing. Frozen backbones encode
    every image once for the whole cross-validation.
    """
    if resume is None:
        if manifest is None:
            raise ConfigError("no manifest given", hint="omnifuse cv MANIFEST --num-classes C")
        if num_classes is None:
            raise ConfigError(
                "--num-classes is required", hint=f"omnifuse cv {manifest} --num-classes C"
            )
        variants, spelled = {}, {}
        for spec in [*(variant or []), *_read_variants_file(variants_file)]:
            name, flags, given = parse_variant(spec)
            try:  # here too, so the message names the flag as the user wrote it
                build_configs({**train_options, **given})
            except ConfigError as err:
                raise ConfigError(f"--variant {name}: {err.message}", hint=err.hint) from None
            variants[name], spelled[name] = given, flags
    else:
        console.print(f"resuming {resume} (settings from its cv.json)")
    _run(
        resume,
        dict(
            manifest=manifest,
            num_classes=num_classes,
            out_dir=out_dir,
            folds=folds,
            repeats=repeats,
            group_col=group_col,
            variants=variants,
            variant_flags=spelled,
            refit=refit,
            bootstrap=bootstrap,
            overwrite=overwrite,
            subgroup_cols=tuple(subgroup_col or ()),
            conformal=conformal,
            track=track,
            track_uri=track_uri,
            **train_options,
        )
        if resume is None
        else {},
    )


def _read_variants_file(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise ConfigError(f"--variants-file {path} does not exist")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _run(resume: Path | None, settings: dict[str, Any]) -> None:
    """Run (or resume) the cross-validation with a live table of folds; print the summary."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import api
    from omnifuse_cli.cli.render import (
        add_fold_row,
        confusion_table,
        cv_metrics_table,
        differences_table,
        fold_table,
        patterns_table,
    )
    from omnifuse_cli.engine.cv import load_cv_request

    shown = vars(load_cv_request(resume)) if resume is not None else settings
    table = fold_table(
        f"cross-validation of {shown['manifest']}: {shown['folds']} folds"
        + (f" x {shown['repeats']} repeats" if shown["repeats"] > 1 else "")
    )
    live, progress = live_progress(table, console)  # plain timestamped lines without a TTY
    overall = progress.add_task("folds", total=None)
    inner = progress.add_task("preparing", total=None)

    def on_event(event: ProgressEvent) -> None:
        if say(event, console):
            return
        if not live.is_started:
            live.start()
        if event.kind == "encode":
            progress.update(
                inner, description="encoding (once)", completed=event.done, total=event.total
            )
        elif event.kind in ("fold", "refit"):
            progress.update(
                overall, description=event.text, completed=event.done, total=event.total
            )
        elif event.kind == "batch":
            progress.update(inner, description="training", completed=event.done, total=event.total)
        elif event.kind == "epoch" and event.record is not None:
            progress.update(inner, description=f"epoch {event.done}/{event.total}")
        elif event.kind == "fold-done" and event.fold is not None:
            progress.update(overall, completed=event.done, total=event.total)
            add_fold_row(table, event.fold)

    try:
        if resume is not None:
            result = api.resume_cv(resume, on_progress=on_event)
        else:
            result = api.cv(on_progress=on_event, **settings)
    finally:
        progress.update(overall, visible=False)
        progress.update(inner, visible=False)
        live.stop()
    console.print()
    console.print(
        f"{result.n_patients} patients; each fold's epoch picked on an inner "
        "validation split of its training patients; out-of-fold predictions pooled"
    )
    for name in result.variants:
        rows = result.metrics[result.metrics["variant"] == name]
        console.print(cv_metrics_table(rows, f"{name}: pooled out-of-fold metrics"))
    base = result.variants[0]
    console.print(patterns_table(result.patterns[result.patterns["variant"] == base]))
    console.print(
        confusion_table(
            result.confusion[base],
            result.class_names,
            f"{base}: out-of-fold confusion matrix (rows = true)",
        )
    )
    if len(result.variants) > 1:
        console.print(
            differences_table(
                result.differences, f"paired differences from {base} (variant - {base})"
            )
        )
    files = (
        "metrics.csv, fold_metrics.csv, predictions.csv, patterns.csv, "
        "confusion_matrix.csv, folds.csv"
        + (", differences.csv" if len(result.variants) > 1 else "")
    )
    console.print(f"written to [bold]{result.out_dir}[/] ({files})")
    if result.refit_dir is not None:
        console.print(
            f"final model on all patients: {result.refit_dir}  ·  omnifuse predict "
            f"PATIENTS.csv --run {result.refit_dir}"
        )
    console.print(f"figures and a paper-ready page: omnifuse report {result.out_dir}")
