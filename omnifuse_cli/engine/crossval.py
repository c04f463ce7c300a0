"""`omnifuse cv`: stratified k-fold cross-validation by patient, pooled out-of-fold results, and
variants of the model compared on the same folds.

Design (nothing in a test fold chooses anything):
- Folds are stratified by label (StratifiedKFold), or by label within groups (StratifiedGroupKFold
  with ``group_col``: every row of a patient or site lands in one fold); ``repeats`` draws new
  folds with seed + repeat - 1. The assignment is saved in folds.csv before any training.
- Inside each training fold an inner validation split (stratified, a share of
  val_ratio / (train_ratio + val_ratio) of the fold's training patients) picks the epoch, exactly
  as `train`'s validation split does. Lab normalisation, the text vocabulary and the image feature
  standardisation are fitted on the inner training patients only (build_for_cohort and fit_model,
  the code `train` runs).
- Frozen backbones encode every view once for the whole cross-validation: the backbone is built
  once per image/text setting (seeded with the base seed) and each fold's model gets a copy of
  its weights and the cached features. Fine-tuning variants re-read images after warm-up as
  `train` does.
- Fold k of repeat r trains with seed + 1000 (r - 1) + k; the final --refit model with the seed.
- After every fold its predictions and epochs are on disk (folds/<variant>/rep<r>-fold<k>/), so
  Ctrl-C loses at most the fold in progress and --resume continues from the next one.
- Pooled results read those files back: metrics of the out-of-fold predictions (the mean over
  repeats) with percentile bootstrap intervals over patients, per-fold mean and SD, metrics per
  missing pattern, the confusion matrix (summed over repeats) and, for each variant, paired
  differences from the base model: the same bootstrap resamples score both models.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli.config import (
    DataConfig,
    MethodConfig,
    TrainConfig,
    to_primitive,
)
from omnifuse_cli.data.cache import FeatureArray
from omnifuse_cli.data.manifest import (
    Cohort,
    check_trainable,
    read_manifest,
    read_table,
    reading_options,
)
from omnifuse_cli.data.prepared import PreparedCohort, Preprocessor
from omnifuse_cli.data.splits import training_patients
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.bundle import BUNDLE_DIR, save_bundle, versions
from omnifuse_cli.engine.clinical import parse_subgroup
from omnifuse_cli.engine.evaluation import pattern_table
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import prepare_out_dir, write_csv, write_text_atomic
from omnifuse_cli.engine.inference import (
    cache_frozen_features,
    feature_cache,
    resolve_device,
)
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.metrics import (
    bootstrap_draws,
    confusion,
    full_metrics,
    percentile_interval,
)
from omnifuse_cli.engine.outputs import (
    DEFAULT_ALPHA,
    ClinicalOutputs,
    clinical_outputs,
    conformal_sets,
    read_subgroups,
)
from omnifuse_cli.engine.posthoc import KEY as POSTHOC
from omnifuse_cli.engine.posthoc import PostHoc, positive_index
from omnifuse_cli.engine.prediction import prediction_frame
from omnifuse_cli.engine.training import (
    CONFIG_YAML,
    TrainRequest,
    build_for_cohort,
    fit_finish,
    fit_linear,
    fit_model,
    infer_all,
    posthoc_meta,
    split_assignment,
)
from omnifuse_cli.errors import BundleError, ConfigError, DataError, TrainingInterrupted
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.omnifuse import OmniFuse

CV_FILE = "cv.json"  # the request (for --resume); also what marks a folder as cv output
BASE = "base"
FOLDS_DIR = "folds"
FOLD_DONE = "fold.json"  # written last: a fold with this file is complete
FINAL_DIR = "final"
REFIT_DONE = "refit.json"
ENCODING = "encoding.json"  # image weights used and encoding time, kept across --resume
METRICS = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss", "ece", "brier")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")


@dataclass(frozen=True)
class Variant:
    """One model setting trained on every fold."""

    name: str
    data: DataConfig
    method: MethodConfig
    train: TrainConfig
    flags: str = ""  # the train flags that make it, as the user wrote them (empty for base)


@dataclass(frozen=True)
class CVRequest:
    manifest: Path
    num_classes: int
    out_dir: Path
    base: Variant
    variants: tuple[Variant, ...] = ()
    folds: int = 5
    repeats: int = 1
    group_col: str | None = None
    refit: bool = False
    bootstrap: int = 1000  # resamples for the 95% intervals (0 = none)
    overwrite: bool = False
    subgroup_cols: tuple[str, ...] = ()  # --subgroup-col: metrics per subgroup, pooled
    conformal: float = DEFAULT_ALPHA  # each fold's conformal sets at this alpha (coverage.csv)
    # The CLI's resolved settings as YAML, saved as config.yaml (the --config format); None
    # writes none.
    config_yaml: str | None = None

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.conformal < 1.0:
            raise ConfigError(f"--conformal must be in (0, 1), got {self.conformal}")
        for spec in self.subgroup_cols:
            parse_subgroup(spec)
        names = [v.name for v in self.all_variants]
        for name in names[1:]:
            if not _NAME_RE.match(name):
                raise ConfigError(
                    f"--variant name {name!r} is not usable as a folder name",
                    hint="use letters, digits, '-', '_', '.', '+'",
                )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"--variant {', '.join(dupes)} is given more than once"
                + (f" ({BASE!r} is the model without variant flags)" if BASE in dupes else "")
            )
        for v in self.variants:
            if _reading(v.data) != _reading(self.base.data):
                raise ConfigError(
                    f"--variant {v.name} reads the data differently from the base "
                    "model; variants are compared on the same patients"
                )

    @property
    def all_variants(self) -> tuple[Variant, ...]:
        return (self.base, *self.variants)


def _reading(data: DataConfig) -> tuple:
    """What decides which patients and values are read (the manifest's reading options)."""
    return (data.modalities, *reading_options(data).items())


@dataclass
class FoldResult:
    variant: str
    repeat: int
    fold: int
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int
    metrics: dict[str, float]  # on the fold's test patients
    seconds: float
    resumed: bool = False  # read from an earlier, interrupted invocation

    @property
    def label(self) -> str:
        return f"{self.variant} rep {self.repeat} fold {self.fold}"


@dataclass
class CVResult:
    out_dir: Path
    n_patients: int
    class_names: list[str]
    variants: list[str]
    metrics: pd.DataFrame  # variant, metric, value, ci_low, ci_high, fold_mean, fold_sd
    patterns: pd.DataFrame  # variant, present, n, acc, macro_f1, auroc
    confusion: dict[str, np.ndarray]  # per variant, rows = true class (summed over repeats)
    differences: pd.DataFrame  # variant, metric, difference, ci_low, ci_high, fold_mean, fold_sd
    folds: list[FoldResult]
    encode_seconds: float
    seconds: float
    refit_dir: Path | None
    notes: list[str] = field(default_factory=list)


# -- folds ------------------------------------------------------------------------------------


def read_groups(manifest: Path, column: str, n: int) -> np.ndarray:
    """The group of every manifest row (in manifest order), checked to make folds."""
    frame = read_table(Path(manifest), "manifest")
    if column not in frame.columns:
        raise DataError(
            f"--group-col {column!r} is not a column of {manifest} "
            f"(columns: {', '.join(frame.columns)})",
            hint="name the column that holds each row's patient or site",
        )
    values = frame[column].astype(str).str.strip()
    empty = np.flatnonzero((values == "").to_numpy())
    if len(empty):
        rows = ", ".join(str(i + 2) for i in empty[:20])
        raise DataError(
            f"--group-col {column!r} is empty on {len(empty)} row(s) of {manifest} (rows {rows})",
            hint="give every row its group",
        )
    if values.nunique() < 2:
        raise DataError(
            f"--group-col {column!r} puts all {n} patients in one group ({values.iloc[0]!r})",
            hint="cross-validation by group needs at least as many groups as folds",
        )
    assert len(values) == n
    return values.to_numpy(dtype=object)


def assign_folds(
    labels: np.ndarray,
    folds: int,
    repeats: int,
    seed: int,
    groups: np.ndarray | None = None,
    group_col: str = "",
) -> np.ndarray:
    """Fold number (1..folds) of every patient in every repeat: (repeats, N)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    if folds > counts[smallest]:
        raise DataError(
            f"--folds {folds} is more than class {smallest} has patients ({counts[smallest]}): "
            "every fold needs each class",
            hint=f"use --folds {max(2, int(counts[smallest]))} or fewer, or add patients to "
            f"class {smallest}",
        )
    if groups is not None and len(set(groups)) < folds:
        raise DataError(
            f"--group-col {group_col!r} has {len(set(groups))} groups; --folds "
            f"{folds} needs at least {folds}",
            hint=f"use --folds {len(set(groups))} or fewer",
        )
    out = np.zeros((repeats, len(labels)), dtype=np.int64)
    index = np.arange(len(labels))
    for r in range(repeats):
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
            parts = splitter.split(index, labels)
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
            parts = splitter.split(index, labels, groups)
        for k, (_, test) in enumerate(parts, start=1):
            out[r, test] = k
    return out


def assign_folds_labelled(
    labels: np.ndarray,
    folds: int,
    repeats: int,
    seed: int,
    groups: np.ndarray | None = None,
    group_col: str = "",
) -> np.ndarray:
    """assign_folds over the labelled patients; unlabeled ones (label -1) get fold 0: they
    join every training fold and are never tested. The labelled patients' folds are those
    the cohort would get without the unlabeled ones."""
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == len(labels):
        return assign_folds(labels, folds, repeats, seed, groups, group_col)
    out = np.zeros((repeats, len(labels)), dtype=np.int64)
    out[:, labelled] = assign_folds(
        labels[labelled],
        folds,
        repeats,
        seed,
        None if groups is None else groups[labelled],
        group_col,
    )
    return out


def inner_split(
    labels: np.ndarray,
    idx: np.ndarray,
    share: float,
    seed: int,
    groups: np.ndarray | None = None,
    where: str = "a training fold",
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) patients of a training fold; validation stratified by label (and
    whole groups with ``groups``)."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    y = labels[idx]
    if groups is not None:
        g = groups[idx]
        splits = min(max(2, int(round(1 / share))), len(set(g)))
        if splits < 2:
            raise DataError(
                f"{where}: its training patients form one group; no validation split is possible",
                hint="use fewer --folds",
            )
        splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
        train_pos, val_pos = next(splitter.split(idx, y, g))
        return np.sort(idx[train_pos]), np.sort(idx[val_pos])
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        c = int(classes[np.argmin(counts)])
        raise DataError(
            f"{where}: class {c} has {counts.min()} training patient(s); the inner "
            "validation split needs at least 2 per class",
            hint=f"use fewer --folds, or add patients to class {c}",
        )
    n_val = max(len(classes), int(round(share * len(idx))))
    n_val = min(n_val, len(idx) - len(classes))
    train, val = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val)


def _val_share(cfg: TrainConfig) -> float:
    return cfg.val_ratio / (cfg.train_ratio + cfg.val_ratio)


def fold_seed(cfg: TrainConfig, repeat: int, fold: int) -> int:
    return cfg.seed + 1000 * (repeat - 1) + fold


def fold_dir(out_dir: Path, variant: str, repeat: int, fold: int) -> Path:
    return Path(out_dir) / FOLDS_DIR / variant / f"rep{repeat}-fold{fold}"


# -- request files ----------------------------------------------------------------------------


def save_cv_request(request: CVRequest) -> None:
    if request.config_yaml is not None:
        write_text_atomic(Path(request.out_dir) / CONFIG_YAML, request.config_yaml)
    raw = to_primitive(request)
    del raw["config_yaml"]
    raw["manifest"] = str(Path(request.manifest).resolve())
    for part in (raw["base"], *raw["variants"]):
        if part["data"]["labs_table"]:
            part["data"]["labs_table"] = str(Path(part["data"]["labs_table"]).resolve())
    raw["out_dir"] = str(request.out_dir)
    raw["kind"] = "omnifuse-cv"
    write_text_atomic(
        Path(request.out_dir) / CV_FILE, json.dumps(raw, ensure_ascii=False, indent=1, default=str)
    )


def from_primitive(cls: type, raw: Any) -> Any:
    """Rebuild a (nested, frozen) config dataclass saved with to_primitive: lists become the
    tuples the field types name, dicts the dataclasses."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name])
    return cls(**values)


def _coerce(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_primitive(hint, value)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is tuple and isinstance(value, list):
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (
                dataclasses.is_dataclass(arg) or typing.get_origin(arg) is tuple
            ):
                return _coerce(arg, value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value


def load_cv_request(out_dir: Path) -> CVRequest:
    path = Path(out_dir) / CV_FILE
    if not path.is_file():
        raise BundleError(
            f"{out_dir} is not a resumable cross-validation (no {CV_FILE})",
            hint="pass the folder that `omnifuse cv --out-dir` wrote",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("kind", None)
        raw["out_dir"] = str(out_dir)
        raw["overwrite"] = True
        return from_primitive(CVRequest, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path} is damaged: {err}") from err


# -- training ---------------------------------------------------------------------------------


def _backbone_names(model: OmniFuse) -> list[str]:
    return [n for n, e in model.encoders.items() if isinstance(e, (ImageEncoder, HFTextEncoder))]


def _train_request(
    request: CVRequest, variant: Variant, cfg: TrainConfig | None = None
) -> TrainRequest:
    return TrainRequest(
        manifest=request.manifest,
        num_classes=request.num_classes,
        out_dir=request.out_dir,
        data=variant.data,
        method=variant.method,
        train=cfg or variant.train,
    )


@dataclass
class _Encoded:
    """Frozen backbones' weights and the features they gave, shared by every fold."""

    states: dict[str, dict[str, torch.Tensor]]
    image_cache: dict[str, FeatureArray]  # memory-mapped from the feature cache, or in memory
    image_dims: dict[str, int]
    text_cache: dict[str, FeatureArray]
    weights: str
    seconds: float


def _encoding_key(variant: Variant) -> str:
    text = to_primitive(variant.data.text) if variant.data.text.encoder == "hf" else None
    return json.dumps([to_primitive(variant.data.image), text], sort_keys=True)


def _encode(
    cohort: Cohort, request: CVRequest, variant: Variant, device: torch.device, emit: EventFn
) -> _Encoded:
    cfg = variant.train
    torch.manual_seed(request.base.train.seed)
    model, pre, weights = build_for_cohort(
        cohort, np.arange(len(cohort)), _train_request(request, variant)
    )
    names = _backbone_names(model)
    if not names:
        return _Encoded({}, {}, {}, {}, weights, 0.0)
    emit(
        ProgressEvent(
            "message", text="encoding images/notes once for every fold with the frozen backbones"
        )
    )
    data = pre.prepare(cohort)
    model.to(device)
    t0 = time.perf_counter()
    cache_frozen_features(
        model,
        data,
        names,
        device=device,
        batch_size=cfg.encode_batch_size,
        amp=cfg.amp,
        progress=lambda d, t: emit(ProgressEvent("encode", d, t)),
        num_workers=cfg.num_workers,
        cache=feature_cache(cfg.cache_dir, cfg.cache),
        notify=lambda text: emit(ProgressEvent("message", text=text)),
    )
    states = {
        n: {
            k: v.detach().to("cpu", copy=True)
            for k, v in model.encoders[n].backbone.state_dict().items()
        }
        for n in names
    }
    return _Encoded(
        states,
        dict(data.image_cache),
        dict(data.image_feature_dims),
        dict(data.text_cache),
        weights,
        time.perf_counter() - t0,
    )


def _fit(
    cohort: Cohort,
    request: CVRequest,
    variant: Variant,
    enc: _Encoded,
    cfg: TrainConfig,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    device: torch.device,
    emit: EventFn,
    out: Path,
    unlabeled: np.ndarray | None = None,
) -> tuple[OmniFuse, Preprocessor, PreparedCohort, int, PostHoc]:
    """`train`'s model building, epoch loop and post-hoc fit (temperature, operating point,
    conformal scores on the inner validation split) on given patients, with the shared
    features; ``unlabeled`` patients join the training patients (training.fit_model)."""
    splits = {"train": train_idx, "val": val_idx}
    if unlabeled is not None and len(unlabeled):
        splits["unlabeled"] = unlabeled
    torch.manual_seed(cfg.seed)
    model, pre, _ = build_for_cohort(
        cohort, training_patients(splits), _train_request(request, variant, cfg)
    )
    data = pre.prepare(cohort)
    for name, state in enc.states.items():
        backbone = model.encoders[name].backbone
        backbone.load_state_dict(state)
        backbone.requires_grad_(False)
    data.image_cache.update(enc.image_cache)
    data.image_feature_dims.update(enc.image_dims)
    data.text_cache.update(enc.text_cache)
    model.to(device)

    def on_epoch(rows: list[dict[str, Any]]) -> None:
        write_csv(out / "metrics.csv", pd.DataFrame(rows))

    records, best_epoch, best_state = fit_model(
        model, data, splits, cfg, request.num_classes, emit, on_epoch=on_epoch
    )
    model.load_state_dict(best_state)
    linear = fit_linear(model, data, splits, cfg, device)
    posthoc = fit_finish(
        model, data, splits, cfg, device, [str(c) for c in range(request.num_classes)], linear
    )
    return model, pre, data, best_epoch, posthoc


@dataclass
class _Plan:
    variant: Variant
    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray  # patients without a label: they join every training fold


def _plan(
    request: CVRequest, labels: np.ndarray, assignment: np.ndarray, groups: np.ndarray | None
) -> list[_Plan]:
    """Every fold fit, inner splits included, computed before anything is written (so a fold
    too small for its validation split is an error up front)."""
    plans = []
    for variant in request.all_variants:
        share = _val_share(variant.train)
        for r in range(1, request.repeats + 1):
            for k in range(1, request.folds + 1):
                test = np.flatnonzero(assignment[r - 1] == k)
                rest = np.flatnonzero((assignment[r - 1] != k) & (assignment[r - 1] > 0))
                where = f"fold {k}" + (f" of repeat {r}" if request.repeats > 1 else "")
                train, val = inner_split(
                    labels, rest, share, fold_seed(variant.train, r, k), groups, where
                )
                plans.append(
                    _Plan(variant, r, k, train, val, test, np.flatnonzero(assignment[r - 1] == 0))
                )
    return plans


def run_cv(
    request: CVRequest, on_event: EventFn | None = None, *, resume: bool = False
) -> CVResult:
    """Cross-validate (resume=True: continue after the last complete fold).

    Under torchrun every fold fit trains with DDP on all processes (engine/training.py); rank 0
    alone writes files and pools the results, and the other ranks get its summary."""
    with distributed.session(resolve_device(request.base.train.device)) as device:
        return _run_cv(request, on_event or (lambda event: None), device, resume)


def _run_cv(request: CVRequest, emit: EventFn, device: torch.device, resume: bool) -> CVResult:
    t_start = time.perf_counter()
    base = request.base
    if device.type == "cpu" or base.train.threads:
        set_threads(base.train.threads)
    main = distributed.is_main()
    with distributed.together("reading the data"):
        cohort = read_manifest(
            request.manifest,
            base.data.modalities,
            num_classes=request.num_classes,
            allow_unlabeled=True,
            **reading_options(base.data),
        )
        check_trainable(cohort, request.num_classes)
        assert cohort.labels is not None
        labels = cohort.labels
        groups = (
            read_groups(request.manifest, request.group_col, len(cohort))
            if request.group_col
            else None
        )
        assignment = assign_folds_labelled(
            labels, request.folds, request.repeats, base.train.seed, groups, request.group_col or ""
        )
        plans = _plan(request, labels, assignment, groups)
        for plan in plans:
            distributed.check_world_fits(len(plan.train), plan.variant.train.batch_size)
        digests = cv_digests(request) if distributed.active() else {}
    distributed.check_same_data(digests)
    folds_frame = _folds_frame(cohort, assignment, groups)
    out_dir = Path(request.out_dir)
    with distributed.together("preparing the cv folder"):
        if main:
            _prepare_cv_dir(request, resume, folds_frame)
    for note in cohort.notes:
        emit(ProgressEvent("message", text=note))

    class_names = [str(c) for c in range(request.num_classes)]
    total = len(plans) + int(request.refit)
    results: list[FoldResult] = []
    encoded: dict[str, _Encoded] = {}
    current = ""
    try:
        for i, plan in enumerate(plans):
            out = fold_dir(out_dir, plan.variant.name, plan.repeat, plan.fold)
            current = f"{plan.variant.name} rep {plan.repeat} fold {plan.fold}"
            saved = distributed.broadcast_object(
                _read_fold(out) if main and (out / FOLD_DONE).is_file() else None
            )
            if saved is not None:
                results.append(saved)
                emit(ProgressEvent("fold-done", i + 1, total, fold=saved))
                continue
            emit(ProgressEvent("fold", i, total, text=current))
            enc = _encoded_for(encoded, cohort, request, plan.variant, device, emit)
            cfg = dataclasses.replace(
                plan.variant.train, seed=fold_seed(plan.variant.train, plan.repeat, plan.fold)
            )
            t0 = time.perf_counter()
            model, _, data, best_epoch, posthoc = _fit(
                cohort,
                request,
                plan.variant,
                enc,
                cfg,
                plan.train,
                plan.val,
                device,
                emit,
                out,
                plan.unlabeled,
            )
            inference = infer_all(
                model, data, plan.test, device=device, batch_size=cfg.batch_size, amp=cfg.amp
            )
            raw = np.exp(inference.log_probs)
            probs = posthoc.probabilities(inference.log_probs)
            pred = posthoc.decide(probs)
            y = labels[inference.index]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a small fold may miss a class: metrics say n/a
                metrics = full_metrics(y, probs, request.num_classes, pred)
            result = FoldResult(
                plan.variant.name,
                plan.repeat,
                plan.fold,
                len(plan.train),
                len(plan.val),
                len(plan.test),
                best_epoch,
                metrics,
                time.perf_counter() - t0,
            )
            if main:
                sets, mode = conformal_sets(posthoc.conformal, probs, request.conformal)
                frame = prediction_frame(
                    [cohort.ids[j] for j in inference.index],
                    y,
                    probs,
                    cohort.present[inference.index],
                    cohort.names,
                    class_names,
                    inference.weights,
                    pred=pred,
                    sets=sets,
                    raw=raw,
                )
                if posthoc.threshold is not None:
                    frame["threshold"] = posthoc.threshold
                if sets is not None:
                    frame["conformal_mode"] = mode
                for position, (key, value) in enumerate(
                    (("variant", plan.variant.name), ("repeat", plan.repeat), ("fold", plan.fold))
                ):
                    frame.insert(position, key, value)
                write_csv(out / "predictions.csv", frame)
                _write_split(
                    out,
                    cohort,
                    {
                        "train": plan.train,
                        "val": plan.val,
                        "test": plan.test,
                        "unlabeled": plan.unlabeled,
                    },
                )
                write_text_atomic(out / FOLD_DONE, json.dumps(dataclasses.asdict(result), indent=1))
            results.append(result)
            emit(ProgressEvent("fold-done", i + 1, total, fold=result))
        current = "the summary"
        summary = distributed.broadcast_object(
            summarise(request, labelled_only(cohort)) if main else None
        )
        refit_dir = None
        if request.refit:
            current = "the final --refit model"
            refit_dir = _refit(cohort, request, groups, encoded, device, emit, total)
    except (KeyboardInterrupt, TrainingInterrupted):
        done = sum(
            1
            for p in plans
            if (fold_dir(out_dir, p.variant.name, p.repeat, p.fold) / FOLD_DONE).is_file()
        )
        stop = TrainingInterrupted(
            f"cross-validation stopped during {current}; {done} of {len(plans)} fold fits are "
            f"complete and saved in {out_dir}",
            hint=f"continue with: omnifuse cv --resume {out_dir}",
        )
        stop.all_ranks = True  # type: ignore[attr-defined]  # every rank got the Ctrl-C
        raise stop from None
    encoding = distributed.broadcast_object(_encoding_record(out_dir, encoded) if main else None)
    encode_seconds = encoding["encode_seconds"]
    seconds = time.perf_counter() - t_start
    weights = encoding["image_weights"]
    if main:
        _write_meta(out_dir, request, cohort, device, weights, encode_seconds, seconds)
    distributed.barrier()  # no rank reports success before the last file is written
    return CVResult(
        out_dir=out_dir,
        n_patients=len(cohort),
        class_names=class_names,
        variants=[v.name for v in request.all_variants],
        metrics=summary["metrics"],
        patterns=summary["patterns"],
        confusion=summary["confusion"],
        differences=summary["differences"],
        folds=results,
        encode_seconds=encode_seconds,
        seconds=seconds,
        refit_dir=refit_dir,
        notes=list(cohort.notes),
    )


def labelled_only(cohort: Cohort) -> Cohort:
    """The labelled patients (the pooled results and every metric are theirs)."""
    assert cohort.labels is not None
    if (cohort.labels >= 0).all():
        return cohort
    return cohort.subset(np.flatnonzero(cohort.labels >= 0))


def cv_digests(request: CVRequest) -> dict[str, str]:
    """What every torchrun process must agree on (see training.data_digests)."""
    settings = to_primitive(request)
    for key in ("manifest", "out_dir", "overwrite", "config_yaml"):
        settings.pop(key, None)
    for variant in (settings["base"], *settings["variants"]):
        variant["data"].pop("labs_table", None)
    return distributed.digests(request.manifest, request.base.data.labs_table, settings)


def _prepare_cv_dir(request: CVRequest, resume: bool, folds_frame: pd.DataFrame) -> None:
    out_dir = Path(request.out_dir)
    if resume:
        saved = out_dir / "folds.csv"
        if saved.is_file():
            before = pd.read_csv(saved, dtype=str, keep_default_na=False)
            now = pd.read_csv(_as_csv(folds_frame), dtype=str, keep_default_na=False)
            if not before.equals(now):
                raise BundleError(
                    f"the folds of {request.manifest} are no longer those of "
                    f"{out_dir} (the manifest changed since)",
                    hint="start a new cross-validation with another --out-dir",
                )
    else:
        prepare_out_dir(out_dir, request.overwrite)
        save_cv_request(request)
    write_csv(out_dir / "folds.csv", folds_frame)


def _encoded_for(
    cache: dict[str, _Encoded],
    cohort: Cohort,
    request: CVRequest,
    variant: Variant,
    device: torch.device,
    emit: EventFn,
) -> _Encoded:
    key = _encoding_key(variant)
    if key not in cache:
        cache[key] = _encode(cohort, request, variant, device, emit)
    return cache[key]


def _encoding_record(out_dir: Path, encoded: dict[str, _Encoded]) -> dict[str, Any]:
    """What the encoding used and cost; an invocation that encoded nothing (every fold already
    done) keeps the record of the one that did."""
    path = out_dir / ENCODING
    if not encoded and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    record = {
        "image_weights": next(iter(encoded.values())).weights if encoded else "",
        "encode_seconds": round(sum(e.seconds for e in encoded.values()), 3),
    }
    write_text_atomic(path, json.dumps(record))
    return record


def _as_csv(frame: pd.DataFrame) -> Any:
    import io

    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    buffer.seek(0)
    return buffer


def _folds_frame(cohort: Cohort, assignment: np.ndarray, groups: np.ndarray | None) -> pd.DataFrame:
    assert cohort.labels is not None
    patterns = [
        "+".join(n for n, p in zip(cohort.names, row, strict=True) if p) for row in cohort.present
    ]
    frames = []
    for r, folds in enumerate(assignment, start=1):
        frame = pd.DataFrame({"id": cohort.ids, "label": cohort.labels})
        if groups is not None:
            frame["group"] = groups
        frame["repeat"] = r
        frame["fold"] = folds
        frame["modalities"] = patterns
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _write_split(out: Path, cohort: Cohort, parts: dict[str, np.ndarray]) -> None:
    """Which patients a model learned from (train), picked its epoch with (val) and was scored
    on (test): the audit trail that the test fold chose nothing."""
    write_csv(out / "split_assignment.csv", split_assignment(cohort, parts))


def _read_fold(out: Path) -> FoldResult:
    raw = json.loads((out / FOLD_DONE).read_text(encoding="utf-8"))
    return FoldResult(**{**raw, "resumed": True})


def _refit(
    cohort: Cohort,
    request: CVRequest,
    groups: np.ndarray | None,
    encoded: dict[str, _Encoded],
    device: torch.device,
    emit: EventFn,
    total: int,
) -> Path:
    """The base model trained on every patient (an inner validation split picks the epoch),
    saved as a run folder for `omnifuse predict`."""
    out = Path(request.out_dir) / FINAL_DIR
    if distributed.broadcast_object((out / REFIT_DONE).is_file()):
        emit(ProgressEvent("refit", total, total, text="final model (already trained)"))
        return out
    assert cohort.labels is not None
    base = request.base
    emit(ProgressEvent("refit", total - 1, total, text="final model on all patients"))
    unlabeled = np.flatnonzero(cohort.labels < 0)
    train_idx, val_idx = inner_split(
        cohort.labels,
        np.flatnonzero(cohort.labels >= 0),
        _val_share(base.train),
        base.train.seed,
        groups,
        "the final model",
    )
    enc = _encoded_for(encoded, cohort, request, base, device, emit)
    model, pre, _, best_epoch, posthoc = _fit(
        cohort, request, base, enc, base.train, train_idx, val_idx, device, emit, out, unlabeled
    )
    if not distributed.is_main():
        return out
    _write_split(out, cohort, {"train": train_idx, "val": val_idx, "unlabeled": unlabeled})
    meta = _meta(request, cohort, device, enc.weights)
    meta.update(
        {
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "n_test": 0,
            "n_unlabeled": len(unlabeled),
            "best_epoch": best_epoch,
            **posthoc_meta(posthoc),
        }
    )
    save_bundle(
        out / BUNDLE_DIR,
        model,
        pre,
        class_names=[str(c) for c in range(request.num_classes)],
        extra={"best_epoch": best_epoch, "run": meta, POSTHOC: posthoc.to_dict()},
    )
    _write_key_values(out / "meta.csv", meta)
    write_text_atomic(
        out / REFIT_DONE,
        json.dumps({"best_epoch": best_epoch, "n_train": len(train_idx), "n_val": len(val_idx)}),
    )
    emit(ProgressEvent("refit", total, total, text="final model saved"))
    return out


# -- pooled results ---------------------------------------------------------------------------


def read_oof(out_dir: Path, request: CVRequest) -> pd.DataFrame:
    """Every fold's test predictions: one row per variant, repeat and patient."""
    frames = []
    for variant in request.all_variants:
        for r in range(1, request.repeats + 1):
            for k in range(1, request.folds + 1):
                path = fold_dir(out_dir, variant.name, r, k) / "predictions.csv"
                frames.append(
                    pd.read_csv(path, dtype={"id": str, "pred": str}, keep_default_na=False)
                )
    return pd.concat(frames, ignore_index=True)


def summarise(request: CVRequest, cohort: Cohort) -> dict[str, Any]:
    """Pooled and per-fold metrics, patterns, confusion matrices and paired differences, from
    the fold files; written to the cv folder."""
    assert cohort.labels is not None
    out_dir = Path(request.out_dir)
    c = request.num_classes
    y = cohort.labels
    oof = read_oof(out_dir, request)
    position = {pid: i for i, pid in enumerate(cohort.ids)}
    prob_cols = [f"prob_{k}" for k in range(c)]
    names = [v.name for v in request.all_variants]
    pooled: dict[str, np.ndarray] = {}  # variant -> (R, N, C)
    decided: dict[str, np.ndarray] = {}  # variant -> (R, N): each fold model's decisions
    for name in names:
        probs = np.zeros((request.repeats, len(y), c))
        preds = np.zeros((request.repeats, len(y)), dtype=np.int64)
        part = oof[oof["variant"] == name]
        for r in range(1, request.repeats + 1):
            rows = part[part["repeat"] == r]
            idx = rows["id"].map(position).to_numpy()
            probs[r - 1, idx] = rows[prob_cols].to_numpy(dtype=float)
            preds[r - 1, idx] = rows["pred"].astype(int).to_numpy()
        pooled[name] = probs
        decided[name] = preds
    order = pd.DataFrame(
        {
            "v": oof["variant"].map({n: i for i, n in enumerate(names)}),
            "r": oof["repeat"],
            "p": oof["id"].map(position),
        }
    )
    write_csv(out_dir / "predictions.csv", oof.loc[order.sort_values(["v", "r", "p"]).index])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folds and patterns may miss a class: metrics say n/a
        values = {}
        for n in names:
            per_repeat = [
                full_metrics(y, p, c, d) for p, d in zip(pooled[n], decided[n], strict=True)
            ]
            values[n] = {m: float(np.mean([v[m] for v in per_repeat])) for m in METRICS}
        fold_rows = []
        for n in names:
            for r in range(1, request.repeats + 1):
                for k in range(1, request.folds + 1):
                    part = oof[(oof["variant"] == n) & (oof["repeat"] == r) & (oof["fold"] == k)]
                    yk = part["label"].to_numpy(dtype=np.int64)
                    m = full_metrics(
                        yk,
                        part[prob_cols].to_numpy(dtype=float),
                        c,
                        part["pred"].astype(int).to_numpy(),
                    )
                    done = json.loads((fold_dir(out_dir, n, r, k) / FOLD_DONE).read_text())
                    fold_rows.append(
                        {
                            "variant": n,
                            "repeat": r,
                            "fold": k,
                            "n": len(part),
                            **{key: m[key] for key in METRICS},
                            "best_epoch": done["best_epoch"],
                            "seconds": round(done["seconds"], 3),
                        }
                    )
        fold_metrics = pd.DataFrame(fold_rows)
        draws = (
            bootstrap_draws(
                y,
                [pooled[n] for n in names],
                c,
                n=request.bootstrap,
                seed=request.base.train.seed,
                names=METRICS,
                preds=[decided[n] for n in names],
            )
            if request.bootstrap > 0
            else None
        )
        metric_rows, diff_rows, pattern_frames = [], [], []
        confusions: dict[str, np.ndarray] = {}
        for s, n in enumerate(names):
            mine = fold_metrics[fold_metrics["variant"] == n]
            for j, m in enumerate(METRICS):
                low, high = (
                    percentile_interval(draws[:, s, j]) if draws is not None else (np.nan, np.nan)
                )
                metric_rows.append(
                    {
                        "variant": n,
                        "metric": m,
                        "value": values[n][m],
                        "ci_low": low,
                        "ci_high": high,
                        "fold_mean": float(mine[m].mean()),
                        "fold_sd": _sd(mine[m].to_numpy(dtype=float)),
                    }
                )
                if s == 0:
                    continue
                base_folds = fold_metrics[fold_metrics["variant"] == names[0]]
                per_fold = mine[m].to_numpy(dtype=float) - base_folds[m].to_numpy(dtype=float)
                low, high = (
                    percentile_interval(draws[:, s, j] - draws[:, 0, j])
                    if draws is not None
                    else (np.nan, np.nan)
                )
                diff_rows.append(
                    {
                        "variant": n,
                        "metric": m,
                        "difference": values[n][m] - values[names[0]][m],
                        "ci_low": low,
                        "ci_high": high,
                        "fold_mean": float(np.nanmean(per_fold)),
                        "fold_sd": _sd(per_fold),
                    }
                )
            y_all = np.tile(y, request.repeats)
            probs_all = pooled[n].reshape(-1, c)
            patterns = pattern_table(
                np.tile(cohort.present, (request.repeats, 1)),
                cohort.names,
                y_all,
                probs_all,
                c,
                decided[n].reshape(-1),
            )
            patterns["n"] = patterns["n"] // request.repeats
            patterns.insert(0, "variant", n)
            pattern_frames.append(patterns)
            confusions[n] = sum(confusion(y, d, c) for d in decided[n])
    metrics = pd.DataFrame(metric_rows)
    differences = pd.DataFrame(
        diff_rows,
        columns=["variant", "metric", "difference", "ci_low", "ci_high", "fold_mean", "fold_sd"],
    )
    patterns_all = pd.concat(pattern_frames, ignore_index=True)
    write_csv(out_dir / "metrics.csv", metrics)
    write_csv(out_dir / "fold_metrics.csv", fold_metrics)
    write_csv(out_dir / "patterns.csv", patterns_all)
    cm_frames = []
    for n, cm in confusions.items():
        frame = pd.DataFrame(cm, columns=[f"pred_{k}" for k in range(c)])
        frame.insert(0, "true", [str(k) for k in range(c)])
        frame.insert(0, "variant", n)
        cm_frames.append(frame)
    write_csv(out_dir / "confusion_matrix.csv", pd.concat(cm_frames, ignore_index=True))
    if len(names) > 1:
        write_csv(out_dir / "differences.csv", differences)
    pooled_clinical(request, cohort, oof).write(out_dir)
    return {
        "metrics": metrics,
        "fold_metrics": fold_metrics,
        "patterns": patterns_all,
        "confusion": confusions,
        "differences": differences,
    }


def pooled_clinical(request: CVRequest, cohort: Cohort, oof: pd.DataFrame) -> ClinicalOutputs:
    """Calibration, operating point, decision curves, coverage and subgroups of the base
    model's pooled out-of-fold predictions (first repeat: every patient once), each fold with
    its own temperature, threshold and conformal sets."""
    assert cohort.labels is not None
    c = request.num_classes
    names = [str(k) for k in range(c)]
    part = oof[(oof["variant"] == BASE) & (oof["repeat"] == 1)]
    position = {pid: i for i, pid in enumerate(cohort.ids)}
    idx = part["id"].map(position).to_numpy()
    y = cohort.labels[idx]
    probs = part[[f"prob_{k}" for k in names]].to_numpy(dtype=float)
    raw_cols = [f"raw_prob_{k}" for k in names]
    raw = part[raw_cols].to_numpy(dtype=float) if set(raw_cols) <= set(part.columns) else probs
    pred = part["pred"].astype(int).to_numpy()
    threshold = positive = None
    if "threshold" in part.columns and part["threshold"].astype(str).str.strip().ne("").all():
        threshold = float(part["threshold"].astype(float).mean())
        positive = positive_index(request.base.train, names)
    sets = None
    mode = ""
    if "set" in part.columns:
        sets = np.array([[k in str(cell).split("|") for k in names] for cell in part["set"]])
        mode = "/".join(sorted(set(part["conformal_mode"].astype(str))))
    return clinical_outputs(
        y,
        raw,
        probs,
        pred,
        class_names=names,
        positive=positive,
        threshold=threshold,
        rule=request.base.train.threshold + " per fold (threshold: mean of the folds')",
        present=cohort.present[idx],
        names=cohort.names,
        sets=sets,
        alpha=request.conformal if sets is not None else None,
        conformal_mode=mode,
        subgroups=read_subgroups(
            request.manifest, request.subgroup_cols, part["id"].astype(str).tolist()
        ),
        n_boot=request.bootstrap,
        seed=request.base.train.seed,
    )


def _sd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")


# -- meta -------------------------------------------------------------------------------------


def _meta(request: CVRequest, cohort: Cohort, device: torch.device, weights: str) -> dict[str, Any]:
    base = request.base
    data = base.data
    return {
        "manifest": str(Path(request.manifest).resolve()),
        "labs_table": str(Path(data.labs_table).resolve()) if data.labs_table else "",
        "labs_id_col": data.labs_id_col,
        "labs_format": data.labs_format,
        "labs_agg": data.labs_agg,
        "encoding": data.encoding,
        "num_classes": request.num_classes,
        "modalities": ",".join(f"{m.name}={m.kind}" for m in data.modalities),
        "n_patients": len(cohort),
        "n_unlabeled": int((cohort.labels < 0).sum()) if cohort.labels is not None else 0,
        "validation": f"{request.folds}-fold stratified cross-validation"
        + (f" grouped by {request.group_col}" if request.group_col else "")
        + (f", {request.repeats} repeats" if request.repeats > 1 else "")
        + f"; inner validation share {_val_share(base.train):.3f} of each training fold",
        "folds": request.folds,
        "repeats": request.repeats,
        "group_col": request.group_col or "",
        "variants": "; ".join(f"{v.name}: {v.flags}" for v in request.variants),
        "bootstrap": request.bootstrap,
        "device": str(device),
        "image_weights": weights,
        **{f"image_{k}": v for k, v in to_primitive(data.image).items()},
        **{f"text_{k}": v for k, v in to_primitive(data.text).items()},
        **to_primitive(base.method),
        **to_primitive(base.train),
        "notes": " | ".join(cohort.notes),
        **{f"version_{k}": v for k, v in versions().items()},
    }


def _write_key_values(path: Path, values: dict[str, Any]) -> None:
    write_csv(path, pd.DataFrame({"key": list(values), "value": [str(v) for v in values.values()]}))


def _write_meta(
    out_dir: Path,
    request: CVRequest,
    cohort: Cohort,
    device: torch.device,
    weights: str,
    encode_seconds: float,
    seconds: float,
) -> None:
    meta = _meta(request, cohort, device, weights)
    meta.update({"encode_seconds": round(encode_seconds, 3), "seconds": round(seconds, 3)})
    _write_key_values(out_dir / "meta.csv", meta)
