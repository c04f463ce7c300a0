"""`omnifuse evaluate`: a trained run on its own test split or on an external cohort."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.tables import row_name
from omnifuse_cli.engine.bagged_run import scorer
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.frozen_features import feature_cache, reuse_frozen_features
from omnifuse_cli.engine.inference import infer, resolve_device
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion,
    full_metrics,
)
from omnifuse_cli.engine.outputs import (
    DEFAULT_ALPHA,
    ClinicalOutputs,
    clinical_outputs,
    conformal_sets,
    read_subgroups,
)
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.engine.prediction import (
    MAX_NAMED,
    PassProgress,
    labs_column_note,
    labs_table_hint,
    phase,
    prediction_frame,
    run_reading,
)
from omnifuse_cli.engine.runs import (
    META,
    METRICS,
    PREDICTIONS,
    SPLIT_ASSIGNMENT,
    read_meta,
    read_split_assignment,
)
from omnifuse_cli.errors import BundleError, ConfigError, DataError


@dataclass(frozen=True)
class EvalRequest:
    run_dir: Path
    manifest: Path | None = None  # external cohort; None = the run's own test split
    labs_table: Path | None = None
    labs_id_col: str | None = None
    out_dir: Path | None = None  # default RUN_DIR/eval/<test|manifest stem>
    device: str = "auto"
    batch_size: int = 32
    drop_modalities: tuple[str, ...] = ()  # hide these modalities for every patient
    missing_rate: float = 0.0  # hide each present modality with this probability (keep one)
    # (modality, rate) pairs overriding missing_rate for those modalities (missingness shift)
    modality_missing_rates: tuple[tuple[str, float], ...] = ()
    seed: int = 42  # for --missing-rate and the bootstrap
    bootstrap: int = 1000  # resamples for the 95% intervals (0 = none)
    cache: bool = True  # frozen-backbone features from/to the feature cache
    cache_dir: Path | None = None  # None: the default folder (data/cache.default_cache_dir)
    encoding: str | None = None  # note files: None = the run's --encoding
    labs_format: str | None = None  # None = the run's --labs-format
    labs_agg: str | None = None  # None = the run's --labs-agg
    threads: int | None = None  # torch CPU threads; None = the usable cores
    subgroup_cols: tuple[str, ...] = ()  # --subgroup-col: COL, COL:q4 or COL:40,65
    conformal: float | None = None  # alpha for the coverage table; None = DEFAULT_ALPHA


@dataclass
class EvalResult:
    source: str
    n: int
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # 95% bootstrap CI of every metric
    confusion: np.ndarray
    class_names: list[str]
    patterns: pd.DataFrame  # one row per missing pattern: present, n, acc, macro_f1, auroc
    out_dir: Path
    notes: list[str]
    clinical: ClinicalOutputs | None = None
    posthoc: PostHoc | None = None


def simulate_missing(
    present: np.ndarray,
    names: list[str],
    drop: tuple[str, ...],
    rate: float,
    seed: int,
    rates: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hide modalities at test time. Returns the new presence mask and the patients left with
    nothing (they cannot be scored and are excluded).

    Each present modality is hidden with probability ``rate``, or ``rates[name]`` for the
    modalities named there (a deployment site that images fewer patients), keeping one per
    patient. One uniform draw per patient and modality from ``seed``: at a higher rate the
    hidden modalities are a superset (nested masks)."""
    unknown = [d for d in (*drop, *(rates or {})) if d not in names]
    if unknown:
        raise ConfigError(
            f"--drop-modality/--modality-missing-rate {', '.join(unknown)} is not "
            "a modality of this model",
            hint=f"the model's modalities: {', '.join(names)}",
        )
    per = np.array([(rates or {}).get(n, rate) for n in names], dtype=np.float64)
    for value in (rate, *per):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--missing-rate must be in [0, 1), got {value:g}")
    out = present.copy()
    for name in drop:
        out[:, names.index(name)] = False
    empty = ~out.any(axis=1)
    if (per > 0).any():
        rng = np.random.default_rng(seed)
        draws = rng.random(out.shape)
        hidden = out & (draws >= per[None, :])
        lost = ~hidden.any(axis=1) & ~empty
        # Keep the present modality with the highest draw for patients who would lose all.
        keep = np.where(out, draws, -1.0).argmax(axis=1)
        hidden[lost, keep[lost]] = True
        out = hidden
    return out, empty


def evaluate_run(request: EvalRequest, progress: PassProgress | None = None) -> EvalResult:
    run_dir = Path(request.run_dir)
    device = resolve_device(request.device)
    if device.type == "cpu" or request.threads:
        set_threads(request.threads)
    bundle = load_bundle(run_dir, device)
    meta = read_meta(run_dir) if (run_dir / META).is_file() else bundle.meta["run"]
    num_classes = bundle.model.config.num_classes
    external = request.manifest is not None
    manifest = (
        Path(request.manifest) if request.manifest is not None else Path(meta.get("manifest", ""))
    )
    if not manifest.is_file():
        raise BundleError(
            f"the run's manifest {manifest} is not on this machine",
            hint="pass --manifest (and --labs-table) to point at the data",
        )
    labs_table = request.labs_table
    if labs_table is None and not external and meta.get("labs_table"):
        labs_table = Path(meta["labs_table"])
    if (
        not external
        and (run_dir / SPLIT_ASSIGNMENT).is_file()
        and not (read_split_assignment(run_dir)["split"] == "test").any()
    ):
        raise ConfigError(
            f"{run_dir} has no test split (it was trained with --test-ratio 0)",
            hint=f"evaluate an external cohort: omnifuse evaluate {run_dir} --manifest TEST.csv",
        )
    cohort = read_manifest(
        manifest,
        bundle.model.config.modalities,
        labs_table=labs_table,
        num_classes=num_classes,
        keep_empty_rows=True,
        allow_unlabeled=True,
        **run_reading(
            meta, dataclasses.replace(request, labs_table=labs_table), bundle.preprocessor
        ),
    )
    bundle.preprocessor.check_compatible(cohort)
    labs_hint = labs_table_hint(meta, labs_table)
    labs_note = labs_column_note(labs_hint, cohort)
    notes: list[str] = [*cohort.notes, *([labs_note] if labs_note else [])]
    if external:
        rows = np.arange(len(cohort))
        source, tag = str(manifest), manifest.stem
    else:
        assignment = read_split_assignment(run_dir)
        test_ids = set(assignment.loc[assignment["split"] == "test", "id"])
        rows = np.array([i for i, pid in enumerate(cohort.ids) if pid in test_ids])
        if len(rows) != len(test_ids):
            raise DataError(
                f"only {len(rows)} of the run's {len(test_ids)} test patients are in {manifest}",
                hint="evaluate the same manifest the run was trained on, or pass --manifest",
            )
        source, tag = f"test split of {run_dir}", "test"
    assert cohort.labels is not None
    unlabeled = rows[cohort.labels[rows] < 0]
    if len(unlabeled):  # nothing to score them against
        notes.append(
            f"{len(unlabeled)} patient(s) have an empty label (unlabeled) and are not "
            "scored; `omnifuse predict` gives their predictions"
        )
        rows = rows[cohort.labels[rows] >= 0]
        if not len(rows):
            raise DataError(
                f"{manifest}: no patient has a label to evaluate against",
                hint="evaluate needs labels; use `omnifuse predict` for unlabeled patients",
            )
    # Patients without any modality cannot be scored by any model: they are left out, loudly,
    # as --drop-modality does; a broken cell is still an error to fix before reporting metrics.
    empty_rows = [int(i) for i in rows if int(i) in cohort.bad_rows]
    if empty_rows:
        named = ", ".join(row_name(i, cohort.ids) for i in empty_rows[:MAX_NAMED])
        more = f" and {len(empty_rows) - MAX_NAMED} more" if len(empty_rows) > MAX_NAMED else ""
        notes.append(
            f"{len(empty_rows)} patient(s) have no modality and are not scored: "
            f"{named}{more}" + (f" ({labs_hint})" if labs_hint else "")
        )
        rows = rows[~np.isin(rows, empty_rows)]
        if not len(rows):
            raise DataError(
                f"{manifest}: no patient has a modality to score",
                hint=labs_hint or "give each patient at least one modality",
            )
    shift = dict(request.modality_missing_rates)
    if request.drop_modalities or request.missing_rate > 0 or shift:
        cohort.present, empty = simulate_missing(
            cohort.present,
            cohort.names,
            request.drop_modalities,
            request.missing_rate,
            request.seed,
            shift,
        )
        if empty[rows].any():
            notes.append(
                f"{int(empty[rows].sum())} patient(s) had only the dropped modalities "
                "and are not scored"
            )
            rows = rows[~empty[rows]]
        if not len(rows):
            raise DataError("no patient keeps a modality after --drop-modality")
        if request.drop_modalities:
            source += f" with {'+'.join(request.drop_modalities)} dropped"
            tag += f"-drop-{'+'.join(request.drop_modalities)}"
        if request.missing_rate or shift:
            each = "".join(f", {n} {r:g}" for n, r in shift.items())
            source += f", missing rate {request.missing_rate:g}{each} (seed {request.seed})"
            tag += (
                f"-missing{request.missing_rate:g}"
                + "".join(f"-{n}{r:g}" for n, r in shift.items())
                + f"-seed{request.seed}"
            )
    data = bundle.preprocessor.prepare(cohort)
    reuse_frozen_features(
        bundle.model,
        data,
        rows,
        device=device,
        batch_size=request.batch_size,
        cache=feature_cache(request.cache_dir, request.cache),
        notify=notes.append,
        progress=phase(progress, "encoding"),
    )
    result = infer(
        bundle.model,
        data,
        rows,
        device=device,
        batch_size=request.batch_size,
        progress=phase(progress, "scoring"),
    )
    log_probs = scorer(bundle).log_probs(cohort.subset(result.index), result.log_probs)
    posthoc = PostHoc.from_bundle(bundle.meta)
    notes.extend(posthoc.describe())
    raw = np.exp(log_probs)
    probs = posthoc.probabilities(log_probs)
    pred = posthoc.decide(probs)
    y = cohort.labels[result.index]
    metrics = full_metrics(y, probs, num_classes, pred)
    intervals = bootstrap_ci(
        y,
        probs,
        num_classes,
        n=request.bootstrap,
        seed=request.seed,
        names=tuple(metrics),
        pred=pred,
    )
    cm = confusion(y, pred, num_classes)
    present = cohort.present[result.index]
    patterns = pattern_table(present, cohort.names, y, probs, num_classes, pred)
    alpha = request.conformal if request.conformal is not None else DEFAULT_ALPHA
    sets, mode = conformal_sets(posthoc.conformal, probs, alpha)
    ids = [cohort.ids[i] for i in result.index]
    clinical = clinical_outputs(
        y,
        raw,
        probs,
        pred,
        class_names=bundle.class_names,
        positive=posthoc.positive,
        threshold=posthoc.threshold,
        rule=posthoc.rule,
        present=present,
        names=cohort.names,
        sets=sets,
        alpha=alpha if sets is not None else None,
        conformal_mode=mode,
        subgroups=read_subgroups(manifest, request.subgroup_cols, ids),
        n_boot=request.bootstrap,
        seed=request.seed,
    )
    notes.extend(clinical.notes)
    out_dir = Path(request.out_dir) if request.out_dir else run_dir / "eval" / tag
    write_csv(
        out_dir / METRICS,
        pd.DataFrame(
            {
                "metric": list(metrics),
                "value": list(metrics.values()),
                "ci_low": [intervals.get(k, (math.nan, math.nan))[0] for k in metrics],
                "ci_high": [intervals.get(k, (math.nan, math.nan))[1] for k in metrics],
            }
        ),
    )
    frame = pd.DataFrame(cm, columns=[f"pred_{c}" for c in bundle.class_names])
    frame.insert(0, "true", bundle.class_names)
    write_csv(out_dir / "confusion_matrix.csv", frame)
    write_csv(out_dir / "patterns.csv", patterns)
    clinical.write(out_dir)
    frame = prediction_frame(
        ids,
        y,
        probs,
        present,
        cohort.names,
        bundle.class_names,
        result.weights,
        pred=pred,
        sets=sets,
        raw=raw,
    )
    write_csv(out_dir / PREDICTIONS, frame)
    return EvalResult(
        source,
        len(rows),
        metrics,
        intervals,
        cm,
        bundle.class_names,
        patterns,
        out_dir,
        notes,
        clinical,
        posthoc,
    )


def pattern_table(
    present: np.ndarray,
    names: list[str],
    y: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
    pred: np.ndarray | None = None,
) -> pd.DataFrame:
    """Metrics per missing pattern (which modalities were present), most common first;
    ``pred``: the decisions (default the most probable class)."""
    labels = np.array(
        ["+".join(n for n, p in zip(names, row, strict=True) if p) for row in present]
    )
    rows = []
    for pattern in pd.Series(labels).value_counts().index:
        mask = labels == pattern
        with warnings.catch_warnings():
            # Small pattern groups often hold one class; the metrics say n/a where undefined.
            warnings.simplefilter("ignore", UserWarning)
            m = classification_metrics(
                y[mask], probs[mask], num_classes, None if pred is None else pred[mask]
            )
        rows.append(
            {
                "present": pattern,
                "n": int(mask.sum()),
                "acc": m["acc"],
                "macro_f1": m["macro_f1"],
                "auroc": m["auroc"],
            }
        )
    return pd.DataFrame(rows)
