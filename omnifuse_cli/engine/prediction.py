"""`omnifuse predict`: class probabilities and DWFuse modality weights for new patients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.data.cohort import NO_MODALITY, Cohort
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.data.tables import row_name
from omnifuse_cli.engine.bagged_run import scorer
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.frozen_features import feature_cache, reuse_frozen_features
from omnifuse_cli.engine.inference import infer, resolve_device
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.errors import BundleError, ConfigError, DataError

# (phase, done, total) of a pass over the patients: "encoding" (frozen backbones), "scoring".
PassProgress = Callable[[str, int, int], None]

MAX_NAMED = 5  # unscored patients named in a warning (all of them are in the reason column)


@dataclass(frozen=True)
class PredictRequest:
    run_dir: Path
    patients: Path
    labs_table: Path | None = None
    labs_id_col: str | None = None
    device: str = "auto"
    batch_size: int = 32
    cache: bool = True  # frozen-backbone features from/to the feature cache
    cache_dir: Path | None = None  # None: the default folder (data/cache.default_cache_dir)
    encoding: str | None = None  # note files: None = the run's --encoding
    labs_format: str | None = None  # None = the run's --labs-format
    labs_agg: str | None = None  # None = the run's --labs-agg
    threads: int | None = None  # torch CPU threads; None = the usable cores
    conformal: float | None = None  # alpha: write each patient's conformal prediction set


@dataclass
class PredictResult:
    run_dir: Path
    frame: pd.DataFrame  # one row per patient of the input, in its order; `reason` last
    class_names: list[str]
    modality_names: list[str]
    n_unscored: int = 0  # patients with an empty prediction (their `reason` says why)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # information (the feature cache used)


def run_reading(
    run_meta: dict[str, Any], request: PredictRequest | Any, preprocessor: Preprocessor
) -> dict[str, Any]:
    """read_manifest's options for new patients of a run: what the request says, else what the
    run was trained with (the id column, how notes and lab tables were read); a lab table is
    read into the run's analytes, in the run's order."""
    vector = next((m.name for m in preprocessor.modalities if m.kind == "vector"), None)
    analytes = None
    if vector is not None and request.labs_table is not None:
        columns = list(preprocessor.vector_stats[vector]["columns"])
        # Columns named labs_0, labs_1, ... came from manifest cells: no analyte names to match.
        if not all(c == f"{vector}_{j}" for j, c in enumerate(columns)):
            analytes = columns
    return {
        "labs_id_col": request.labs_id_col or run_meta.get("labs_id_col") or "id",
        "encoding": request.encoding or run_meta.get("encoding") or "auto",
        "labs_format": request.labs_format or run_meta.get("labs_format") or "auto",
        "labs_agg": request.labs_agg or run_meta.get("labs_agg") or "last",
        "labs_analytes": analytes,
    }


def labs_table_hint(run_meta: dict[str, Any], given: Path | None) -> str | None:
    """When a run learnt its labs from a table and none is given now, say so with the flags:
    the labs of every patient would otherwise silently come from the manifest column only."""
    trained = str(run_meta.get("labs_table") or "")
    if not trained or given is not None:
        return None
    id_col = run_meta.get("labs_id_col") or "id"
    return (
        f"this run was trained with --labs-table {trained} --labs-id-col {id_col}; "
        f"pass --labs-table LABS.csv --labs-id-col {id_col} to give these patients their "
        "labs from a table"
    )


def labs_column_note(labs_hint: str | None, cohort: Cohort) -> str | None:
    """The labs hint, with how many patients have labs from the manifest's column instead."""
    vector = next((m.name for m in cohort.modalities if m.kind == "vector"), None)
    if not labs_hint or vector is None:
        return None
    have = int(cohort.present[:, cohort.names.index(vector)].sum())
    return (
        f"{labs_hint}; without one, {vector} come from the manifest's {vector!r} column "
        f"({have} of {len(cohort)} patients have them)"
    )


def unscored_summary(cohort: Cohort, rows: list[int]) -> str:
    """``row 3 (id X): no modality present; ...`` for the first few unscored rows."""
    named = "; ".join(
        f"{row_name(i, cohort.ids)}: {', '.join(cohort.bad_rows[i])}" for i in rows[:MAX_NAMED]
    )
    more = f"; ... and {len(rows) - MAX_NAMED} more" if len(rows) > MAX_NAMED else ""
    return named + more


def predict_patients(
    request: PredictRequest, progress: PassProgress | None = None
) -> PredictResult:
    """Score every patient that can be scored; the others keep their row, with a reason."""
    device = resolve_device(request.device)
    if device.type == "cpu" or request.threads:
        set_threads(request.threads)
    bundle = load_bundle(request.run_dir, device)
    config = bundle.model.config
    run_meta = bundle.meta.get("run", {})
    posthoc = PostHoc.from_bundle(bundle.meta)
    if request.conformal is not None:
        if not 0.0 < request.conformal < 1.0:
            raise ConfigError(
                f"--conformal must be in (0, 1), got {request.conformal}",
                hint="e.g. --conformal 0.1 for sets that cover 90% of patients",
            )
        if posthoc.conformal is None:
            raise BundleError(
                f"{request.run_dir} has no conformal calibration (it was trained "
                "before conformal sets, or without a validation split)",
                hint="train the run again to use --conformal",
            )
    cohort = read_manifest(
        Path(request.patients),
        config.modalities,
        labs_table=request.labs_table,
        require_labels=False,
        num_classes=config.num_classes,
        keep_bad_rows=True,
        keep_empty_rows=True,
        **run_reading(run_meta, request, bundle.preprocessor),
    )
    labs_hint = labs_table_hint(run_meta, request.labs_table)
    names = [m.name for m in config.modalities]
    bad = sorted(cohort.bad_rows)
    reasons = [""] * len(cohort)
    for i in bad:
        why = "; ".join(cohort.bad_rows[i])
        if labs_hint and cohort.bad_rows[i] == [NO_MODALITY]:
            why += f" ({labs_hint})"
        reasons[i] = why
    labs_note = labs_column_note(labs_hint, cohort)
    warnings = [labs_note] if labs_note else []
    if len(bad) == len(cohort):
        raise DataError(
            f"{request.patients}: none of the {len(cohort)} patient(s) can be scored: "
            f"{unscored_summary(cohort, bad)}",
            hint=labs_hint or "give each patient at least one readable modality",
        )
    if bad:
        warnings.append(
            f"{len(bad)} of {len(cohort)} patient(s) could not be scored and have an "
            f"empty prediction (see the reason column): "
            f"{unscored_summary(cohort, bad)}"
        )
    ok = np.setdiff1d(np.arange(len(cohort)), np.array(bad, dtype=np.int64))
    scored = cohort.subset(ok)
    bundle.preprocessor.check_compatible(scored)
    data = bundle.preprocessor.prepare(scored)
    notes: list[str] = list(cohort.notes)
    reuse_frozen_features(
        bundle.model,
        data,
        np.arange(len(data)),
        device=device,
        batch_size=request.batch_size,
        cache=feature_cache(request.cache_dir, request.cache),
        notify=notes.append,
        progress=phase(progress, "encoding"),
    )
    result = infer(
        bundle.model,
        data,
        np.arange(len(scored)),
        device=device,
        batch_size=request.batch_size,
        progress=phase(progress, "scoring"),
    )
    rows = ok[result.index]
    notes.extend(posthoc.describe())
    probs = np.full((len(cohort), len(bundle.class_names)), np.nan, dtype=np.float64)
    log_probs = scorer(bundle).log_probs(scored.subset(result.index), result.log_probs)
    probs[rows] = posthoc.probabilities(log_probs)
    pred = np.zeros(len(cohort), dtype=np.int64)
    pred[rows] = posthoc.decide(probs[rows])
    sets = None
    if request.conformal is not None:
        assert posthoc.conformal is not None
        sets = np.zeros(probs.shape, dtype=bool)
        sets[rows] = posthoc.conformal.sets(probs[rows], request.conformal)
        notes.append(
            f"conformal sets at alpha {request.conformal:g} "
            f"({posthoc.conformal.mode(request.conformal)}, calibrated on "
            f"{len(posthoc.conformal.scores)} validation patients): each set holds "
            f"the true class for about {1 - request.conformal:.0%} of patients"
        )
    weights = None
    if result.weights is not None:
        weights = np.full((len(cohort), *result.weights.shape[1:]), np.nan)
        weights[rows] = result.weights
    frame = prediction_frame(
        cohort.ids,
        cohort.labels,
        probs,
        cohort.present,
        names,
        bundle.class_names,
        weights,
        pred=pred,
        sets=sets,
    )
    frame["reason"] = reasons
    return PredictResult(
        Path(request.run_dir),
        frame,
        bundle.class_names,
        names,
        n_unscored=len(bad),
        warnings=warnings,
        notes=notes,
    )


def prediction_frame(
    ids: list[str],
    labels: np.ndarray | None,
    probs: np.ndarray,
    present: np.ndarray,
    names: list[str],
    class_names: list[str],
    weights: np.ndarray | None,
    *,
    pred: np.ndarray | None = None,
    sets: np.ndarray | None = None,
    raw: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per patient: id, label (if known), pred, prob_<class>, modalities present and
    weight_<modality>, each modality's DWFuse weight at the predicted class (predictions.csv of
    predict, evaluate and cv). ``pred``: the decisions at the run's operating point (default:
    the most probable class); ``sets``: (N, C) conformal prediction sets, written as ``set``
    (the classes joined by "|"); ``raw``: the probabilities before calibration, written as
    ``raw_prob_<class>`` (evaluate and cv, for the report). A row of NaN probabilities (a
    patient predict could not score) gets an empty pred and empty probabilities and weights."""
    scored = ~np.isnan(probs).any(axis=1)
    if pred is None:
        pred = np.nan_to_num(probs, nan=-1.0).argmax(1)
    pred = np.where(scored, pred, 0)
    frame = pd.DataFrame({"id": ids})
    if labels is not None:
        # Object column: an empty cell for unlabeled patients, integers (not 1.0) for the rest.
        frame["label"] = pd.Series([int(v) if v >= 0 else None for v in labels], dtype=object)
    frame["pred"] = [class_names[c] if ok else None for c, ok in zip(pred, scored, strict=True)]
    for c, cname in enumerate(class_names):
        frame[f"prob_{cname}"] = probs[:, c]
    if raw is not None:
        for c, cname in enumerate(class_names):
            frame[f"raw_prob_{cname}"] = raw[:, c]
    if sets is not None:
        frame["set"] = [
            "|".join(n for n, keep in zip(class_names, row, strict=True) if keep) if ok else None
            for row, ok in zip(sets, scored, strict=True)
        ]
    frame["modalities"] = [
        "+".join(n for n, p in zip(names, row, strict=True) if p) for row in present
    ]
    if weights is not None:
        # w_m at the predicted class: how much each modality's own head counts for this patient.
        at_pred = np.take_along_axis(weights, pred[:, None, None], axis=2)[:, :, 0]
        for m, name in enumerate(names):
            frame[f"weight_{name}"] = at_pred[:, m]
    return frame


def phase(progress: PassProgress | None, name: str) -> Callable[[int, int], None] | None:
    """The engine's (done, total) callbacks, named for the command's progress display."""
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)
