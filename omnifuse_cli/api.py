"""omnifuse's Python API: the front door the command line stands on.

    import omnifuse_cli as omnifuse

    omnifuse.make_data("cohort", n=300, image_size=64)
    run = omnifuse.train("cohort/manifest.csv", num_classes=3, out_dir="runs/demo", epochs=5)
    predictions = run.predict("cohort/manifest.csv")  # a DataFrame, one row per patient

Settings are passed by the names of the command-line flags (``--image-backbone`` ->
``image_backbone``), with the same defaults and meaning; omnifuse_cli.settings.SETTINGS lists
them. A manifest is a path to a manifest CSV or a DataFrame in the same format (relative file
paths in it are read against ``base_dir``, default the current folder). Progress reaches an
optional ``on_progress`` callback as omnifuse_cli.engine.events.ProgressEvent; nothing here
prints. Every command of the CLI is a thin caller of a function here.

``OmniFuseClassifier`` (omnifuse_cli/estimator.py) wraps train and predict as a scikit-learn
estimator; ``omnifuse_cli.tune`` (omnifuse_cli/tuning/) searches the settings. Both stand on this
module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from omnifuse_cli import synthetic
from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.data.cells import absolute_paths
from omnifuse_cli.engine import cv as crossval
from omnifuse_cli.engine import runs, tracking, training
from omnifuse_cli.engine.cv import BASE, CVRequest, CVResult, Variant
from omnifuse_cli.engine.evaluation import EvalRequest, EvalResult, evaluate_run
from omnifuse_cli.engine.events import EventFn, EventKind, ProgressEvent, ignore
from omnifuse_cli.engine.files import prepare_out_dir, write_csv
from omnifuse_cli.engine.outputs import DEFAULT_ALPHA
from omnifuse_cli.engine.prediction import (
    PassProgress,
    PredictRequest,
    PredictResult,
    predict_patients,
)
from omnifuse_cli.engine.runs import BUNDLE_DIR, TrainRequest, bundle_folder, read_meta
from omnifuse_cli.engine.training import TrainResult
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import (
    DATA_READING,
    as_flags,
    build_configs,
    check_names,
    run_config_yaml,
    with_preset,
)
from omnifuse_cli.synthetic import CohortSpec, CohortSummary

ManifestInput = str | os.PathLike[str] | pd.DataFrame
INPUT_MANIFEST = "input_manifest.csv"  # a DataFrame given to train/cv, as the run read it

__all__ = [
    "Run",
    "cv",
    "make_data",
    "resume",
    "resume_cv",
    "train",
]


def _timestamped(prefix: str) -> Path:
    return Path("runs") / datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")


def _manifest_file(
    manifest: ManifestInput,
    modalities: tuple[ModalitySpec, ...],
    folder: Path,
    base_dir: str | os.PathLike[str] | None,
) -> Path:
    """A path as given; a DataFrame written to ``folder`` with its file references absolute."""
    if not isinstance(manifest, pd.DataFrame):
        if base_dir is not None:
            raise ConfigError(
                "base_dir is for a DataFrame manifest; a file's paths are read "
                "against its own folder"
            )
        return Path(manifest)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = folder / INPUT_MANIFEST
    write_csv(path, absolute_paths(manifest, modalities, base))
    return path


def _pass_progress(on_progress: EventFn | None) -> PassProgress | None:
    """The engine's (phase, done, total) passes over patients, as progress events (the phase
    in ``text``: encoding or scoring)."""
    if on_progress is None:
        return None
    callback = on_progress

    def progress(phase: str, done: int, total: int) -> None:
        kind: EventKind = "encode" if phase == "encoding" else "score"
        callback(ProgressEvent(kind, done, total, text=phase))

    return progress


def make_data(
    out_dir: str | os.PathLike[str] = "data_synth_raw",
    *,
    overwrite: bool = False,
    on_progress: EventFn | None = None,
    **spec: Any,
) -> CohortSummary:
    """Write a synthetic cohort (manifest.csv, truth.csv, images, notes) to ``out_dir``.

    ``spec``: the fields of omnifuse_cli.synthetic.CohortSpec (n, seed, num_classes,
    image_size, missing_us, ultrasound, inline_notes, unlabeled, ...). Returns its summary
    (``.manifest`` is the manifest's path)."""
    known = {f.name for f in fields(CohortSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(
            f"make_data: unknown setting(s) {', '.join(unknown)}",
            hint=f"CohortSpec fields: {', '.join(sorted(known))}",
        )
    cohort = CohortSpec(**spec)
    folder = Path(out_dir)
    prepare_out_dir(folder, overwrite)
    emit = on_progress or ignore
    return synthetic.make_cohort(  # looked up here, so tests can watch it
        cohort, folder, progress=lambda done, total: emit(ProgressEvent("write", done, total))
    )


def train(
    manifest: ManifestInput,
    *,
    num_classes: int,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    on_progress: EventFn | None = None,
    track: str | None = None,
    track_uri: str | None = None,
    **settings: Any,
) -> Run:
    """Train OmniFuse on a manifest (stratified split, best epoch on validation, test metrics
    when the test split is not empty) and return the run. ``settings`` by flag name, e.g.
    ``epochs=10, image_backbone="resnet18", no_imputation=True``; unknown names are refused.
    ``track``: "mlflow" or "tensorboard" logs the settings, epochs, test scores, the report and
    the model to ``track_uri`` (engine/tracking.py)."""
    made = build_configs(settings)
    folder = Path(out_dir) if out_dir is not None else _timestamped("run")
    if isinstance(manifest, pd.DataFrame) or track:
        prepare_out_dir(folder, overwrite)
        # checked just now; it holds the manifest written next, or the tracker's log dir
        overwrite = True
    path = _manifest_file(manifest, made.data.modalities, folder, base_dir)
    request = TrainRequest(
        manifest=path,
        num_classes=num_classes,
        out_dir=folder,
        data=made.data,
        method=made.method,
        train=made.train,
        overwrite=overwrite,
        config_yaml=run_config_yaml(
            "train",
            [("manifest", path), ("num-classes", num_classes)],
            with_preset(settings),
        ),
    )
    values = with_preset(settings)
    with tracking.tracked(
        track,
        track_uri,
        run_name=folder.name,
        out_dir=folder,
        params=values,
        tags={"omnifuse.command": "train", "omnifuse.manifest": str(path)},
        on_progress=on_progress,
    ) as (tracker, emit):
        result = training.run_training(request, emit)
        if tracker is not None:
            files = _report_files(result.out_dir, evaluate=bool(result.test))
            tracking.log_results(tracker, {f"test_{k}": v for k, v in result.test.items()}, files)
    return Run(result.out_dir, result)


def _report_files(folder: Path, *, evaluate: bool) -> list[Path]:
    """What a tracked run logs: its report (a run's needs `evaluate` first), the model, the
    settings and the per-epoch metrics."""
    from omnifuse_cli.report import build_report  # matplotlib: only when a run is tracked

    if evaluate:
        evaluate_run(EvalRequest(run_dir=folder), None)
    page = build_report(folder)
    names = (runs.METRICS, runs.CONFIG_YAML, runs.META, BUNDLE_DIR, runs.FINAL_DIR)
    return [page.html, page.figures_dir, *(folder / name for name in names)]


def resume(run_dir: str | os.PathLike[str], *, on_progress: EventFn | None = None) -> Run:
    """Continue an interrupted training run from its last complete epoch (every setting comes
    from the run's request.json)."""
    request = runs.load_train_request(Path(run_dir))
    result = training.run_training(request, on_progress or ignore, resume=True)
    return Run(result.out_dir, result)


def _variant(
    name: str, overrides: Mapping[str, Any], base: Mapping[str, Any], flags: str
) -> Variant:
    check_names(overrides, f"variant {name}")
    fixed = sorted(set(overrides) & set(DATA_READING))
    if fixed:
        raise ConfigError(
            f"variant {name} changes {', '.join(fixed)}: a variant is compared with the base "
            "model on the same patients and values",
            hint="give data settings once, for the base model",
        )
    if not overrides:
        raise ConfigError(
            f"variant {name} changes nothing",
            hint=f'give the settings it changes, e.g. {{"{name}": {{"no_tla": True}}}}',
        )
    try:
        made = build_configs({**base, **overrides})
    except ConfigError as err:
        raise ConfigError(f"variant {name}: {err.message}", hint=err.hint) from None
    return Variant(name, made.data, made.method, made.train, flags)


def cv(
    manifest: ManifestInput,
    *,
    num_classes: int,
    out_dir: str | os.PathLike[str] | None = None,
    folds: int = 5,
    repeats: int = 1,
    group_col: str | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    variant_flags: Mapping[str, str] | None = None,
    refit: bool = False,
    bootstrap: int = 1000,
    subgroup_cols: Sequence[str] = (),
    conformal: float | None = None,
    overwrite: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    on_progress: EventFn | None = None,
    track: str | None = None,
    track_uri: str | None = None,
    **settings: Any,
) -> CVResult:
    """Cross-validate (k folds by patient, ``repeats`` times; pooled out-of-fold metrics with
    intervals). ``variants``: name -> the settings it changes, each compared with the base model
    on the same folds, e.g. ``{"no-imputation": {"no_imputation": True}}``; ``variant_flags``:
    how a variant was spelled on the command line, shown in tables and config.yaml (default: the
    flags that give its settings)."""
    made = build_configs(settings)
    folder = Path(out_dir) if out_dir is not None else _timestamped("cv")
    if isinstance(manifest, pd.DataFrame) or track:
        prepare_out_dir(folder, overwrite)
        overwrite = True  # checked just now; it holds the manifest or the tracker's log dir
    path = _manifest_file(manifest, made.data.modalities, folder, base_dir)
    given = dict(variants or {})
    spelled = {name: " ".join(as_flags(o)) for name, o in given.items()}
    spelled.update(variant_flags or {})
    specs = [f"{name}={spelled[name]}" for name in given]
    own = [
        ("manifest", path),
        ("num-classes", num_classes),
        ("folds", folds),
        ("repeats", repeats),
        ("group-col", group_col),
        ("variant", specs),
        ("refit", refit),
        ("bootstrap", bootstrap),
        ("subgroup-col", list(subgroup_cols)),
        ("conformal", conformal),
    ]
    request = CVRequest(
        manifest=path,
        num_classes=num_classes,
        out_dir=folder,
        base=Variant(BASE, made.data, made.method, made.train),
        variants=tuple(_variant(name, o, settings, spelled[name]) for name, o in given.items()),
        folds=folds,
        repeats=repeats,
        group_col=group_col,
        refit=refit,
        bootstrap=bootstrap,
        overwrite=overwrite,
        subgroup_cols=tuple(subgroup_cols),
        conformal=DEFAULT_ALPHA if conformal is None else conformal,
        config_yaml=run_config_yaml("cv", own, with_preset(settings)),
    )
    with tracking.tracked(
        track,
        track_uri,
        run_name=folder.name,
        out_dir=folder,
        params={**with_preset(settings), "folds": folds, "repeats": repeats},
        tags={"omnifuse.command": "cv", "omnifuse.manifest": str(path)},
        on_progress=on_progress,
    ) as (tracker, emit):
        result = crossval.run_cv(request, emit, resume=False)
        if tracker is not None:
            base = result.metrics[result.metrics["variant"] == result.variants[0]]
            scores = {
                f"cv_{m}": float(v) for m, v in zip(base["metric"], base["value"], strict=True)
            }
            files = [*_report_files(folder, evaluate=False), folder / runs.PREDICTIONS]
            tracking.log_results(tracker, scores, files)
    return result


def resume_cv(out_dir: str | os.PathLike[str], *, on_progress: EventFn | None = None) -> CVResult:
    """Continue an interrupted cross-validation (finished folds are read, not retrained)."""
    return crossval.run_cv(crossval.load_cv_request(Path(out_dir)), on_progress, resume=True)


class Run:
    """A trained run folder: its model, metrics and files. ``Run.load(path)`` opens one that
    exists; ``train`` returns one (with ``result``, the training summary)."""

    def __init__(self, path: str | os.PathLike[str], result: TrainResult | None = None) -> None:
        self.path = Path(path)
        self.result = result

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Run:
        """Open a finished run folder (or its model/ bundle); a BundleError says what is
        missing."""
        folder = bundle_folder(Path(path))
        return cls(folder.parent if folder.name == BUNDLE_DIR else folder)

    @property
    def meta(self) -> dict[str, str]:
        """The run's meta.csv: settings, versions, weights used, split sizes, timings."""
        return read_meta(self.path)

    @property
    def test_metrics(self) -> dict[str, float]:
        """Metrics on the run's internal test split (empty without one)."""
        path = self.path / runs.TEST
        if not path.is_file():
            return {}
        row = pd.read_csv(path).iloc[0]
        return {str(k).removeprefix("test_"): float(v) for k, v in row.items()}

    def _modalities(self) -> tuple[ModalitySpec, ...]:
        """The model's modalities, from its bundle (an interrupted run has no meta.csv)."""
        saved = json.loads((bundle_folder(self.path) / "bundle.json").read_text("utf-8"))
        return tuple(ModalitySpec(**m) for m in saved["model_config"]["modalities"])

    def predict_result(
        self,
        patients: ManifestInput,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        on_progress: EventFn | None = None,
        **options: Any,
    ) -> PredictResult:
        """``predict`` with its warnings and notes (what the CLI prints)."""
        allowed = {f.name for f in fields(PredictRequest)} - {"run_dir", "patients"}
        _check_options(options, allowed, "predict")
        with tempfile.TemporaryDirectory(prefix="omnifuse-") as tmp:
            path = _manifest_file(patients, self._modalities(), Path(tmp), base_dir)
            request = PredictRequest(run_dir=self.path, patients=path, **options)
            return predict_patients(request, _pass_progress(on_progress))

    def predict(
        self,
        patients: ManifestInput,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        on_progress: EventFn | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """One row per patient, in input order: id, pred, prob_<class>, modalities present and
        each modality's DWFuse weight (as predictions.csv). Patients that cannot be scored keep
        their row with empty values and a ``reason``. ``options``: device, batch_size, cache,
        cache_dir, threads, conformal, labs_table, labs_id_col, encoding, labs_format,
        labs_agg."""
        return self.predict_result(
            patients, base_dir=base_dir, on_progress=on_progress, **options
        ).frame

    def evaluate(
        self,
        manifest: ManifestInput | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        on_progress: EventFn | None = None,
        **options: Any,
    ) -> EvalResult:
        """Metrics with 95% intervals, calibration, operating point, missing patterns (and
        subgroups with ``subgroup_cols``) on the run's test split or on ``manifest``; the files
        go to ``out_dir`` (default RUN/eval/<test|manifest stem>). ``options``: the fields of
        omnifuse_cli.engine.evaluation.EvalRequest (drop_modalities, missing_rate, seed,
        bootstrap, device, ...)."""
        allowed = {f.name for f in fields(EvalRequest)} - {"run_dir", "manifest"}
        _check_options(options, allowed, "evaluate")
        request = EvalRequest(run_dir=self.path, **options)
        if manifest is None:
            return evaluate_run(request, _pass_progress(on_progress))
        with tempfile.TemporaryDirectory(prefix="omnifuse-") as tmp:
            path = _manifest_file(manifest, self._modalities(), Path(tmp), base_dir)
            if isinstance(manifest, pd.DataFrame) and request.out_dir is None:
                request = replace(request, out_dir=self.path / "eval" / "dataframe")
            return evaluate_run(replace(request, manifest=path), _pass_progress(on_progress))


def _check_options(options: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"{what}: unknown option(s) {', '.join(unknown)}",
            hint=f"{what} takes {', '.join(sorted(allowed))}",
        )
