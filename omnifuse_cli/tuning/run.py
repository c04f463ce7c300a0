"""`omnifuse tune run`: search training settings with Optuna, on patients the test never sees.

The manifest's test patients (``--test-ratio`` and ``--seed``, exactly the split `omnifuse
train` makes) are set aside first; every trial trains on the rest (the pool) through the Python
API, scored on the pool's inner validation split (``folds=0``) or by K-fold cross-validation of
the pool (pooled out-of-fold score), while Optuna's MedianPruner stops trials whose per-epoch
validation score trails the median of earlier trials at the same epoch (under cv: the first
fold's epochs). The frozen-feature cache makes every trial after the first reuse the encoded
images of its backbone and size. At the end: the trials table, the best settings as a --config
file, and with ``refit`` the best settings trained with `omnifuse train`'s own split and scored
once on the held-out test patients.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnifuse_cli import api
from omnifuse_cli.engine import tracking
from omnifuse_cli.engine.events import EventFn, ProgressEvent, TrialSummary
from omnifuse_cli.engine.files import prepare_out_dir
from omnifuse_cli.engine.runs import CHECKPOINT, read_key_values, write_meta
from omnifuse_cli.errors import ConfigError, OmnifuseError, TrainingInterrupted
from omnifuse_cli.settings import defaults
from omnifuse_cli.tuning import study as studies
from omnifuse_cli.tuning.outputs import TuneResult, write_outputs
from omnifuse_cli.tuning.request import (
    BEST_JSON,
    BEST_YAML,
    INTERMEDIATE_CSV,
    METRIC_SOURCES,
    NESTED_CSV,
    REFIT_DIR,
    TRIALS_CSV,
    TRIALS_DIR,
    Pool,
    TuneRequest,
    load_tune_json,
    save_tune_json,
    split_pool,
)

if TYPE_CHECKING:  # only for annotations: optuna is imported when a study opens
    import optuna


class TuneInterrupted(TrainingInterrupted):
    """Ctrl-C during a tune: the study keeps every finished trial; the interrupted one is
    queued again."""


PRUNE_STARTUP_TRIALS = 5  # MedianPruner: no pruning before this many trials finished ...
PRUNE_WARMUP_EPOCHS = 5  # ... or before this epoch (early epochs are noisy)
TPE_STARTUP_TRIALS = 10  # random sampling first, then TPE
WAIT_SECONDS = 5.0  # how often a process without trials checks the others' running ones


def run_tune(
    request: TuneRequest,
    on_progress: EventFn | None = None,
    *,
    track: str | None = None,
    track_uri: str | None = None,
) -> TuneResult:
    """Run the study's trials (joining the study when another process has started it), then
    write the outputs; rerunning the same command after an interruption completes the study.
    ``track``: the search as one tracked run (MLflow or TensorBoard) with a child per trial."""
    t0 = time.perf_counter()
    _prepare_folder(request)
    made = request.configs()  # every fixed setting checked before anything runs
    pool = split_pool(request, made)
    save_tune_json(request, pool.n_pool, pool.n_test)
    rdb = studies.open_storage(request.storage_url)
    study, created = studies.open_study(
        rdb,
        request.name,
        direction=request.direction,
        trials=request.trials,
        signature=request.signature(),
    )
    studies.fail_stale(study)
    params = {
        **request.trial_settings(),
        "tune_trials": request.trials,
        "tune_metric": request.metric,
        "tune_folds": request.folds,
        "tune_space": json.dumps(request.space.as_dict()),
    }
    with tracking.tracked(
        track,
        track_uri,
        run_name=request.name,
        out_dir=request.out_dir,
        params=params,
        tags={"omnifuse.command": "tune", "omnifuse.manifest": str(request.manifest)},
        on_progress=on_progress,
    ) as (tracker, emit):
        emit(
            ProgressEvent(
                "message",
                text=f"study {request.name!r} ({'new' if created else 'joined'}) in "
                f"{request.storage_url}: {pool.n_pool} patients searched, {pool.n_test} test "
                f"patients set aside; objective {request.metric} on {request.objective}",
            )
        )
        ran = 0
        waiting_said = False
        while True:
            trial_id = studies.claim(study, rdb)
            if trial_id is not None:
                _run_trial(request, pool, study, trial_id, emit, tracker)
                ran += 1
                continue
            running = studies.counts(study)["running"]
            if not running:
                break
            # Other processes' trials: wait, so every process ends with the whole study (the
            # tables, the refit); a dead process's trial is queued again after GRACE_SECONDS.
            if not waiting_said:
                emit(
                    ProgressEvent(
                        "message",
                        text=f"waiting for {running} trial(s) running in other processes",
                    )
                )
                waiting_said = True
            _wait(request)
            studies.fail_stale(study)
        result = write_outputs(request, study, ran, time.perf_counter() - t0)
        if request.refit:
            _refit(request, result, emit)
        if request.nested_cv:
            from omnifuse_cli.tuning.nested import run_nested  # a cycle: nested runs run_tune

            run_nested(request, pool, result, emit)
        result.seconds = time.perf_counter() - t0
        if tracker is not None:
            _log_search(tracker, result)
    return result


def _wait(request: TuneRequest) -> None:
    try:
        time.sleep(WAIT_SECONDS)
    except KeyboardInterrupt:
        raise TuneInterrupted(
            "tune interrupted while other processes' trials were running",
            hint=f"rerun the same command to collect the study's results ({request.out_dir})",
        ) from None


def _log_search(tracker: tracking.Tracker, result: TuneResult) -> None:
    from omnifuse_cli.report import build_report  # matplotlib: only when a search is tracked

    scores = {f"refit_test_{k}": v for k, v in result.refit_test.items()}
    if result.best_value is not None:
        scores["best_value"] = result.best_value
    if result.nested_summary:
        scores["nested_outer_mean"] = float(result.nested_summary["outer_mean"])
    page = build_report(result.out_dir)
    names = (TRIALS_CSV, INTERMEDIATE_CSV, BEST_JSON, BEST_YAML, NESTED_CSV, REFIT_DIR)
    files = [page.html, page.figures_dir, *(result.out_dir / name for name in names)]
    tracking.log_results(tracker, scores, files)


def _prepare_folder(request: TuneRequest) -> None:
    """A new folder, or the same search again (resume, or another process's folder)."""
    saved = load_tune_json(request.out_dir)
    if saved and not request.overwrite:
        mine = {
            "manifest": str(request.manifest.absolute()),
            "num_classes": request.num_classes,
            "metric": request.metric,
            "folds": request.folds,
            "space": request.space.as_dict(),
        }
        for key, value in mine.items():
            if json.dumps(saved.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
                raise ConfigError(
                    f"{request.out_dir} holds a tune with another {key} "
                    f"({saved.get(key)!r} there, {value!r} now)",
                    hint="rerun with the same manifest, metric, folds and space to continue it, "
                    "or give --overwrite or another --out-dir",
                )
        return
    if request.overwrite and request.storage is not None:
        _delete_study(request)
    prepare_out_dir(request.out_dir, request.overwrite)
    if request.overwrite:
        for child in request.out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


def _delete_study(request: TuneRequest) -> None:
    import optuna  # only when a study is opened

    try:
        optuna.delete_study(study_name=request.name, storage=request.storage_url)
    except KeyError:  # no such study: nothing to delete
        pass


def _use_sampler(request: TuneRequest, study: optuna.Study, number: int) -> None:
    """This trial's sampler and pruner on the process's study object (one object per process:
    its storage cache knows the trials this process has listed or queued). The sampler is
    seeded by the trial's number: one process reruns a study identically, and processes sharing
    it never draw the same random start (constant_liar keeps TPE off the running trials'
    points)."""
    import optuna  # only when a study is opened

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=request.seed * 100_003 + number,
            n_startup_trials=TPE_STARTUP_TRIALS,
            constant_liar=True,
        )
    study.pruner = (
        optuna.pruners.MedianPruner(
            # steps are 1-based epochs; Optuna prunes from step n_warmup_steps on
            n_startup_trials=PRUNE_STARTUP_TRIALS,
            n_warmup_steps=PRUNE_WARMUP_EPOCHS + 1,
        )
        if request.pruning
        else optuna.pruners.NopPruner()
    )


def _run_trial(
    request: TuneRequest,
    pool: Pool,
    study: optuna.Study,
    trial_id: int,
    emit: EventFn,
    tracker: tracking.Tracker | None,
) -> None:
    import optuna  # only when a study is opened

    storage = studies.storage_of(study)
    number = storage.get_trial_number_from_id(trial_id)
    _use_sampler(request, study, number)
    trial = optuna.Trial(study, trial_id)
    settings = request.space.suggest(trial)
    settings = {**request.trial_settings(), **settings}
    folder = request.out_dir / TRIALS_DIR / f"{number:04d}"
    trial.set_user_attr("run_dir", str(folder.absolute()))
    trial.set_user_attr("settings", json.dumps(_non_default(settings), default=str))
    params = dict(trial.params)
    emit(ProgressEvent("trial", number, request.trials, text=_describe(params)))
    child = tracker.child(f"trial-{number}") if tracker is not None else None
    if child is not None:
        child.log_params(settings)
    watch = _both(emit, child.on_event) if child is not None else emit
    t0 = time.perf_counter()
    state, value, error = "COMPLETE", float("nan"), ""
    with studies.heartbeat(storage, trial_id):
        try:
            value = _objective(request, pool, trial, settings, folder, watch)
        except optuna.TrialPruned as pruned:
            state, error = "PRUNED", str(pruned)
        except (KeyboardInterrupt, TrainingInterrupted):  # Ctrl-C: this trial runs again
            studies.requeue(study, number, params)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if child is not None:
                child.finish("KILLED")
            raise TuneInterrupted(
                f"tune interrupted during trial {number}; it will run again",
                hint=f"rerun the same command to complete the study ({request.out_dir})",
            ) from None
        except OmnifuseError as err:  # this trial's settings cannot train (a reason, not a bug)
            state, error = "FAIL", err.message
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if child is not None:
                child.finish("FAILED")
            raise
        finally:
            _slim(folder)
    if state == "COMPLETE" and not math.isfinite(value):
        state, error = "FAIL", f"the objective is {value}"
    if error:
        trial.set_user_attr("error", error)
    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    if child is not None:
        child.set_tags({"omnifuse.trial_state": state})
        child.log_metrics({"objective": value})
        child.finish("FAILED" if state == "FAIL" else "FINISHED")
    emit(
        ProgressEvent(
            "trial-done",
            number,
            request.trials,
            text=error,
            trial=TrialSummary(number, state, value, params, time.perf_counter() - t0),
        )
    )


def _objective(
    request: TuneRequest,
    pool: Pool,
    trial: optuna.Trial,
    settings: dict[str, Any],
    folder: Path,
    emit: EventFn,
) -> float:
    field_name, table_name, _, _ = METRIC_SOURCES[request.metric]
    report = _pruning_reporter(request, trial, field_name, emit)
    if request.folds:
        result = api.cv(
            pool.manifest,
            num_classes=request.num_classes,
            out_dir=folder,
            folds=request.folds,
            bootstrap=0,
            overwrite=True,
            on_progress=report,
            **settings,
        )
        rows = result.metrics[
            (result.metrics["variant"] == result.variants[0])
            & (result.metrics["metric"] == table_name)
        ]
        return float(rows["value"].iloc[0])
    run = api.train(
        pool.manifest,
        num_classes=request.num_classes,
        out_dir=folder,
        overwrite=True,
        on_progress=report,
        **{
            **settings,
            "train_ratio": pool.train_ratio,
            "val_ratio": pool.val_ratio,
            "test_ratio": 0.0,
        },
    )
    assert run.result is not None
    best = next(r for r in run.result.records if r.epoch == run.result.best_epoch)
    return float(getattr(best, field_name))


def _pruning_reporter(
    request: TuneRequest, trial: optuna.Trial, field_name: str, emit: EventFn
) -> EventFn:
    """An on_progress callback: every epoch's validation score goes to the pruner (under cv,
    the first fold's epochs); a trial trailing the median stops here, by raising TrialPruned."""
    import optuna  # only when a study is opened

    folds_started = 0

    def report(event: ProgressEvent) -> None:
        nonlocal folds_started
        if event.kind == "fold":
            folds_started += 1
        if event.kind in ("encode", "warning", "epoch", "fold", "fold-done"):
            emit(event)  # the CLI shows encoding and warnings; a trial's tracker the epochs
        if event.kind != "epoch" or event.record is None or folds_started > 1:
            return
        value = float(getattr(event.record, field_name))
        if not math.isfinite(value):
            return
        trial.report(value, event.record.epoch)
        if request.pruning and trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned at epoch {event.record.epoch}: validation {request.metric} "
                f"{value:.4f} trails the median of earlier trials"
            )

    return report


def _slim(folder: Path) -> None:
    """A trial keeps its metrics and settings, not its weights (the refit makes the model)."""
    if not folder.is_dir():
        return
    for path in folder.rglob(CHECKPOINT):
        path.unlink(missing_ok=True)
    for path in sorted(folder.rglob("model"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _non_default(settings: dict[str, Any]) -> dict[str, Any]:
    base = defaults()
    return {k: v for k, v in settings.items() if k not in base or base[k] != v}


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _refit(request: TuneRequest, result: TuneResult, emit: EventFn) -> None:
    """The best settings trained like `omnifuse train` on the same manifest (its split leaves the
    same test patients out), scored once on them."""
    if result.best_number is None:
        result.notes.append("refit skipped: no trial completed")
        return
    if result.counts["running"] or result.counts["waiting"]:
        result.notes.append(
            f"refit skipped: {result.counts['running'] + result.counts['waiting']} trial(s) "
            "still running in other processes; rerun this command with --refit when they end"
        )
        return
    emit(ProgressEvent("refit", text=f"refit: trial {result.best_number}'s settings"))
    folder = request.out_dir / REFIT_DIR
    run = api.train(
        request.manifest,
        num_classes=request.num_classes,
        out_dir=folder,
        overwrite=True,
        on_progress=_passing(emit),
        **result.best_settings,
    )
    meta = read_key_values(folder / "meta.csv")
    meta.update(tune_meta(request, result))
    write_meta(folder, meta)
    result.refit_dir = folder
    result.refit_test = dict(run.test_metrics)


def _both(first: EventFn, second: EventFn) -> EventFn:
    def both(event: ProgressEvent) -> None:
        second(event)
        first(event)

    return both


def _passing(emit: EventFn) -> Callable[[ProgressEvent], None]:
    """The refit's events a search shows: warnings and encoding progress, not the lines a
    train run prints about itself (the refit folder holds its metrics and settings)."""

    def forward(event: ProgressEvent) -> None:
        if event.kind in ("warning", "encode"):
            emit(event)

    return forward


def tune_meta(request: TuneRequest, result: TuneResult) -> dict[str, str]:
    """The keys a refit run's meta.csv gets: how its settings were chosen (report, TRIPOD)."""
    return {
        "tune_dir": str(request.out_dir.absolute()),
        "tune_study": request.name,
        "tune_trials": str(sum(result.counts[k] for k in ("complete", "pruned", "fail"))),
        "tune_complete": str(result.counts["complete"]),
        "tune_pruned": str(result.counts["pruned"]),
        "tune_metric": request.metric,
        "tune_objective": "cv" if request.folds else "validation",
        "tune_folds": str(request.folds),
        "tune_sampler": "TPESampler",
        "tune_space": json.dumps(request.space.as_dict()),
        "tune_best_value": str(result.best_value),
    }


def sub_request(request: TuneRequest, **changes: Any) -> TuneRequest:
    return replace(request, **changes)
