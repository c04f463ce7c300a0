"""`omnifuse tune run` and `omnifuse tune init`: hyperparameter search (omnifuse_cli/tuning)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from omnifuse_cli.cli.common import console, handle_errors, write_or_print
from omnifuse_cli.cli.config_file import with_config_file
from omnifuse_cli.cli.help import epilog, paragraphs
from omnifuse_cli.cli.options import TrackOption, TrackUriOption
from omnifuse_cli.cli.progress import live_progress, say
from omnifuse_cli.cli.train_options import with_train_options
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import BY_NAME

if TYPE_CHECKING:  # only for annotations: tuning/ loads torch
    from omnifuse_cli.tuning.request import TuneMetric

tune_app = typer.Typer(
    help="Hyperparameter search (Optuna) over the training settings, on training patients only.",
    no_args_is_help=True,
    add_completion=False,
)
METRICS = ("auroc", "macro_f1", "log_loss")


@tune_app.command("init", epilog=epilog("tune init"))
@handle_errors
def init(
    path: Annotated[
        Path | None,
        typer.Argument(help="File to write (default: print to the terminal).", show_default=False),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace PATH if it exists.")
    ] = False,
) -> None:
    """Write the default search space, commented, for `omnifuse tune run --space`."""
    from omnifuse_cli.tuning.space import DEFAULT_SPACE_YAML  # yaml: not at `omnifuse --help`

    if write_or_print(path, DEFAULT_SPACE_YAML, overwrite):
        console.print(
            f"search space written to [bold]{path}[/]  ·  next: omnifuse tune run MANIFEST "
            f"--num-classes C --space {path}"
        )


@handle_errors
@with_config_file
@with_train_options()
def run(
    ctx: typer.Context,
    manifest: Annotated[
        Path, typer.Argument(help="manifest.csv with columns id,label,<modalities>.")
    ],
    num_classes: Annotated[
        int, typer.Option("--num-classes", min=2, help="Number of classes. Required.")
    ],
    trials: Annotated[
        int,
        typer.Option(
            "--trials",
            min=1,
            help="Trials the study holds in all (shared by every process that joins it; a "
            "larger number on a rerun adds trials).",
        ),
    ] = 30,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space",
            help="Search space YAML (omnifuse tune init writes the default).",
            show_default="the default space",
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option("--metric", help="Objective: auroc, macro_f1 or log_loss (minimised)."),
    ] = "auroc",
    folds: Annotated[
        int,
        typer.Option(
            "--folds",
            min=0,
            help="0: score a trial on the inner validation split; K: by K-fold cross-validation "
            "of the training patients (pooled out-of-fold score).",
        ),
    ] = 0,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Where the study lives: any SQLAlchemy URL (sqlite:///..., postgresql://...); "
            "processes and machines that give the same --storage and --study-name share it.",
            show_default="sqlite:///OUT_DIR/study.db",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option("--study-name", help="The study's name.", show_default="OUT_DIR's name"),
    ] = None,
    pruning: Annotated[
        bool,
        typer.Option(
            "--pruning/--no-pruning",
            help="Stop a trial whose per-epoch validation score trails the median of earlier "
            "trials (Optuna's MedianPruner).",
        ),
    ] = True,
    sampler_seed: Annotated[
        int | None,
        typer.Option("--sampler-seed", help="Seed of the TPE sampler.", show_default="--seed"),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Train the best settings like omnifuse train (same split: the held-out test "
            "patients scored once) into OUT_DIR/refit.",
        ),
    ] = False,
    nested_cv: Annotated[
        int,
        typer.Option(
            "--nested-cv",
            min=0,
            help="Also estimate the whole tuning procedure: K outer folds, a search inside "
            "each (K times the trials).",
        ),
    ] = 0,
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="The tune folder (rerun to continue it).")
    ] = Path("runs/tune"),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Start again: empty --out-dir and delete the study first."
        ),
    ] = False,
    track: TrackOption = None,
    track_uri: TrackUriOption = None,
    **train_options: Any,
) -> None:
    """Search training settings with Optuna on the manifest's training patients; the test
    patients (the split omnifuse train makes with the same --seed and ratios) are never seen.
    Model and training options given here are fixed for every trial and leave the search.
    Rerun the same command to continue an interrupted search."""
    # Here, not at the top: these load torch and pandas, which `omnifuse --help` must not.
    from omnifuse_cli import tune as run_tune
    from omnifuse_cli.cli.render import metrics_table, trial_table

    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    fixed = _given(ctx, train_options)
    table = trial_table(f"tuning on {manifest}: {trials} trials, {metric}")
    live, progress = live_progress(table, console)
    overall = progress.add_task("trials", total=trials)
    inner = progress.add_task("preparing", total=None)

    finished = 0

    def on_event(event: ProgressEvent) -> None:
        nonlocal finished
        if say(event, console):
            return
        if not live.is_started:
            live.start()
        if event.kind == "encode":
            progress.update(inner, description="encoding", completed=event.done, total=event.total)
        elif event.kind == "trial":
            progress.update(inner, description=f"trial {event.done}: {event.text}")
        elif event.kind == "trial-done" and event.trial is not None:
            finished += 1
            progress.update(overall, completed=finished)
            table.add_row(*_trial_cells(event))
        elif event.kind == "refit":
            progress.update(inner, description=event.text)

    try:
        result = run_tune(
            manifest,
            num_classes=num_classes,
            trials=trials,
            space=space,
            metric=cast("TuneMetric", metric),  # checked above
            folds=folds,
            out_dir=out_dir,
            storage=storage,
            study_name=study_name,
            pruning=pruning,
            sampler_seed=sampler_seed,
            refit=refit,
            nested_cv=nested_cv,
            overwrite=overwrite,
            on_progress=on_event,
            track=track,
            track_uri=track_uri,
            **fixed,
        )
    finally:
        progress.update(overall, visible=False)
        progress.update(inner, visible=False)
        live.stop()
    console.print()
    c = result.counts
    console.print(
        f"study [bold]{result.study_name}[/]: {c['complete']} complete, {c['pruned']} pruned, "
        f"{c['fail']} failed"
        + (f", {c['interrupted']} interrupted and rerun" if c["interrupted"] else "")
        + f"; this process ran {result.ran} in {result.seconds:.0f} s"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.best_number is not None:
        console.print(
            f"best: trial {result.best_number}, {metric} {result.best_value:.4f} on "
            f"{'cross-validation' if folds else 'the validation split'} (optimistic: the best "
            f"of {c['complete']}); settings in {result.out_dir / 'best.yaml'}"
        )
    if result.refit_dir is not None and result.refit_test:
        console.print(
            metrics_table(result.refit_test, f"refit on held-out test patients: {result.refit_dir}")
        )
    if result.nested_summary:
        s = result.nested_summary
        console.print(
            f"nested cv ({s['folds']} outer folds): {metric} {s['outer_mean']:.4f} "
            f"[{s['outer_ci_low']:.4f}, {s['outer_ci_high']:.4f}] on outer folds vs "
            f"{s['inner_mean']:.4f} for the best trials' own scores"
        )
    console.print(
        f"trials.csv, best.yaml in [bold]{result.out_dir}[/]  ·  next: omnifuse train MANIFEST "
        f"--config {result.out_dir / 'best.yaml'}  ·  omnifuse report {result.out_dir}"
    )


def _given(ctx: typer.Context, train_options: dict[str, Any]) -> dict[str, Any]:
    """The model and training options given on the command line (click's record, even when
    equal to the default) or in --config files (those that differ from the default)."""
    out: dict[str, Any] = {}
    for name, value in train_options.items():
        source = getattr(ctx.get_parameter_source(name), "name", "")
        default = BY_NAME[name].default
        if source == "COMMANDLINE" or not _same(value, default):
            out[name] = value
    return out


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, list | tuple) and not value:
        return default is None or default == [] or default == ()
    return bool(value == default)


def _trial_cells(event: ProgressEvent) -> list[str]:
    trial = event.trial
    assert trial is not None
    value = "" if not math.isfinite(trial.value) else f"{trial.value:.4f}"
    params = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )
    return [str(trial.number), trial.state.lower(), value, f"{trial.seconds:.0f}", params]


tune_app.command("run", help=paragraphs(run.__doc__), epilog=epilog("tune run"))(run)
