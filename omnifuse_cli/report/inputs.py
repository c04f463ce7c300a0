"""What a report shows, read from the files a run (`train` + `evaluate`) or a cross-validation
(`cv`) folder holds. Nothing here trains or predicts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.errors import BundleError, OmnifuseError

SMALL_SUBGROUP = 30  # engine.clinical's: fewer patients make a subgroup's metrics imprecise

KINDS = ("run", "cv")


@dataclass
class Clinical:
    """The clinical reading of the evaluated predictions (engine/outputs.py writes the files)
    and the post-hoc fit behind them; each table is None when its file is absent."""

    folder: Path | None = None  # where the files were looked for (None: nothing evaluated)
    calibration: pd.DataFrame | None = None  # metric, before, after
    operating: pd.DataFrame | None = None  # positive_class, rule, metric, value, ci_low, ci_high
    decision: pd.DataFrame | None = None  # class, threshold, net_benefit, treat_all, ...
    coverage: pd.DataFrame | None = None  # alpha, mode, by, group, n, coverage, ...
    subgroups: pd.DataFrame | None = None  # column, group, n, class_counts, metrics, small
    gaps: pd.DataFrame | None = None  # column, metric, gap, best_group, worst_group, ...
    legacy: bool = False  # the model predates calibration and operating points
    calibrated: bool = False  # a temperature was fitted (run) / asked for (cv)
    temperature: float | None = None  # the run's (None for cv: one per fold)
    posthoc_lines: list[str] = field(default_factory=list)  # PostHoc.describe()
    posthoc_source: str = ""  # whose post-hoc fit posthoc_lines describe, in words
    positive_class: str | None = None  # the operating point's positive class
    threshold: float | None = None
    rule: str | None = None
    fold_posthoc: pd.DataFrame | None = None  # cv: fold, patients, temperature, threshold
    rerun: str = ""  # the command that writes the files (evaluate again / cv again)
    subgroup_command: str = ""  # the command that writes subgroups.csv

    @property
    def evaluated(self) -> bool:
        return self.calibration is not None


LEGACY = (
    "trained before calibration: probabilities are uncalibrated (temperature 1), no operating point"
)
CLINICAL_FILES = {
    "calibration": "calibration.csv",
    "operating": "operating_point.csv",
    "decision": "decision_curve.csv",
    "coverage": "coverage.csv",
    "subgroups": "subgroups.csv",
    "gaps": "subgroup_gaps.csv",
}
_CLINICAL_TEXT = (
    "class",
    "group",
    "column",
    "by",
    "mode",
    "rule",
    "positive_class",
    "best_group",
    "worst_group",
    "class_counts",
    "small",
    "includes_small",
)


@dataclass
class ReportInputs:
    kind: str  # run | cv
    source: Path
    meta: dict[str, str]
    class_names: list[str]
    modalities: list[str]  # names, in model order
    cohort: pd.DataFrame | None  # one row per patient: id, label, group (split or fold), modalities
    group_name: str  # "split" or "fold"
    metrics: pd.DataFrame  # metric, value, ci_low, ci_high (+ fold_mean, fold_sd for cv)
    evaluated_on: str  # the patients the metrics and curves are computed on, in words
    predictions: pd.DataFrame | None  # id, label, pred, prob_*, modalities, weight_*
    confusion: np.ndarray | None
    patterns: pd.DataFrame | None  # present, n, acc, macro_f1, auroc
    curves: dict[str, pd.DataFrame]  # training metrics.csv per run or fold
    variant_metrics: pd.DataFrame | None = None  # cv: every variant's pooled metrics
    fold_metrics: pd.DataFrame | None = None  # cv
    differences: pd.DataFrame | None = None  # cv with variants
    variants: dict[str, str] = field(default_factory=dict)  # cv: name -> flags
    notes: list[str] = field(default_factory=list)
    clinical: Clinical = field(default_factory=Clinical)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(labels, probabilities) of the predictions with a known label."""
        if self.predictions is None or "label" not in self.predictions:
            return None
        frame = self.predictions[self.predictions["label"].astype(str) != ""]
        columns = [f"prob_{c}" for c in self.class_names]
        return (frame["label"].to_numpy(dtype=np.int64), frame[columns].to_numpy(dtype=float))

    def raw_probabilities(self) -> np.ndarray | None:
        """The probabilities before calibration (``raw_prob_*``), in the rows of
        probabilities(); None when the predictions do not have them (an older omnifuse)."""
        if self.predictions is None or "label" not in self.predictions:
            return None
        columns = [f"raw_prob_{c}" for c in self.class_names]
        if not set(columns) <= set(self.predictions.columns):
            return None
        frame = self.predictions[self.predictions["label"].astype(str) != ""]
        return frame[columns].to_numpy(dtype=float)


_TEXT = (
    "id",
    "pred",
    "present",
    "modalities",
    "variant",
    "split",
    "phase",
    "lazy_combo",
    "metric",
    "true",
    "label",
    "set",
    "conformal_mode",
)


def group_order(groups: pd.Series) -> list[str]:
    """Splits in the order train, val, test; folds by number."""
    splits = ["train", "val", "test"]
    return sorted(
        {str(g) for g in groups}, key=lambda g: (splits.index(g) if g in splits else 3, len(g), g)
    )


def _csv(path: Path, text: tuple[str, ...] = ()) -> pd.DataFrame:
    """A result CSV: text columns as written, the others numeric with empty cells as NaN (the
    files write an undefined metric as an empty cell)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        if column in _TEXT or column in text:
            continue
        filled = frame[column] != ""
        numbers = pd.to_numeric(frame[column].where(filled), errors="coerce")
        if int(numbers.notna().sum()) == int(filled.sum()):
            frame[column] = numbers
    return frame


def _key_values(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(frame["key"], frame["value"], strict=True))


def load_inputs(source: Path) -> ReportInputs:
    """Read a run or cv folder; a clear error for anything else (before anything is written)."""
    source = Path(source)
    if not source.exists():
        raise BundleError(
            f"{source} does not exist",
            hint="pass a folder written by omnifuse train or omnifuse cv",
        )
    if not source.is_dir():
        raise BundleError(
            f"{source} is a file, not a run or cross-validation folder",
            hint="pass a folder written by omnifuse train or omnifuse cv",
        )
    if (source / "cv.json").is_file():
        if not (source / "metrics.csv").is_file():
            raise BundleError(
                f"the cross-validation in {source} has not finished (no metrics.csv)",
                hint=f"finish it: omnifuse cv --resume {source}",
            )
        return _load_cv(source)
    if (source / "model" / "bundle.json").is_file() and (source / "metrics.csv").is_file():
        if (source.parent / "cv.json").is_file():
            raise BundleError(
                f"{source} is the final model of a cross-validation; its results "
                "are in the cross-validation folder",
                hint=f"omnifuse report {source.parent}",
            )
        if not (source / "meta.csv").is_file():
            raise BundleError(
                f"the run in {source} has not finished (no meta.csv)",
                hint=f"finish it: omnifuse train --resume {source}",
            )
        return _load_run(source)
    raise BundleError(
        f"{source} is not an omnifuse run or cross-validation folder (neither model/bundle.json "
        "with metrics.csv nor cv.json inside)",
        hint="pass a folder written by omnifuse train or omnifuse cv",
    )


def _modality_names(meta: dict[str, str]) -> list[str]:
    spec = meta.get("modalities", "")
    return [part.split("=")[0] for part in spec.split(",") if part]


def _load_run(source: Path) -> ReportInputs:
    meta = _key_values(source / "meta.csv")
    bundle = json.loads((source / "model" / "bundle.json").read_text(encoding="utf-8"))
    class_names = [str(c) for c in bundle.get("class_names", [])] or [
        str(c) for c in range(int(meta.get("num_classes", 2)))
    ]
    notes: list[str] = []
    eval_dir = source / "eval" / "test"
    evaluated_on = "the run's test split"
    if not (source / "test.csv").is_file():  # --test-ratio 0: an external cohort's evaluation
        external = sorted(
            (d for d in (source / "eval").glob("*") if (d / "metrics.csv").is_file()),
            key=lambda d: (d / "metrics.csv").stat().st_mtime,
        )
        if not external:
            raise BundleError(
                f"the run in {source} has no test split (--test-ratio 0) and has "
                "not been evaluated on another cohort",
                hint=f"omnifuse evaluate {source} --manifest TEST.csv, then report again",
            )
        eval_dir = external[-1]
        evaluated_on = f"the external cohort {eval_dir.name} (the newest evaluation)"
    if (eval_dir / "metrics.csv").is_file():
        metrics = _csv(eval_dir / "metrics.csv")
    else:
        test = _csv(source / "test.csv")
        metrics = pd.DataFrame(
            {
                "metric": [c.removeprefix("test_") for c in test.columns],
                "value": [float(v) for v in test.iloc[0]],
            }
        )
        metrics["ci_low"] = math.nan
        metrics["ci_high"] = math.nan
        notes.append(
            "the run has not been evaluated: run `omnifuse evaluate "
            f"{source}` first for intervals, ROC/PR and calibration curves, DWFuse "
            "weights and metrics per missing pattern"
        )
    predictions = (
        _csv(eval_dir / "predictions.csv") if (eval_dir / "predictions.csv").is_file() else None
    )
    if predictions is None and (eval_dir / "metrics.csv").is_file():
        notes.append(
            f"{eval_dir} has no predictions.csv (evaluated by an older omnifuse): "
            f"run `omnifuse evaluate {source}` again for the curves"
        )
    cm_path = eval_dir / "confusion_matrix.csv"
    cm_path = cm_path if cm_path.is_file() else source / "confusion_matrix.csv"
    confusion = _csv(cm_path).drop(columns=["true"]).to_numpy(dtype=np.int64)
    patterns = _csv(eval_dir / "patterns.csv") if (eval_dir / "patterns.csv").is_file() else None
    modalities = _modality_names(meta)
    cohort = _run_cohort(source, meta, modalities, notes)
    curves = {"run": _csv(source / "metrics.csv")}
    clinical = _run_clinical(
        source, bundle, class_names, eval_dir if (eval_dir / "metrics.csv").is_file() else None
    )
    if clinical.legacy:
        notes.append(f"the run was {LEGACY}")
    return ReportInputs(
        kind="run",
        source=source,
        meta=meta,
        class_names=class_names,
        modalities=modalities,
        cohort=cohort,
        group_name="split",
        metrics=metrics,
        evaluated_on=evaluated_on,
        predictions=predictions,
        confusion=confusion,
        patterns=patterns,
        curves=curves,
        notes=notes,
        clinical=clinical,
    )


def _read_clinical(folder: Path, clinical: Clinical) -> None:
    """The clinical files in ``folder`` (engine/outputs.py), each left None when absent."""
    clinical.folder = folder
    for attr, name in CLINICAL_FILES.items():
        if (folder / name).is_file():
            setattr(clinical, attr, _csv(folder / name, _CLINICAL_TEXT))
    for frame, column in ((clinical.subgroups, "small"), (clinical.gaps, "includes_small")):
        if frame is None:
            continue
        if column in frame:
            frame[column] = frame[column].astype(str).str.lower().isin(("true", "1"))
        elif column == "small":
            frame[column] = frame["n"] < SMALL_SUBGROUP
    if clinical.operating is not None and len(clinical.operating):
        first = clinical.operating.iloc[0]
        clinical.positive_class = str(first["positive_class"])
        clinical.rule = str(first["rule"])
        values = clinical.operating.set_index("metric")["value"]
        if "threshold" in values.index:
            clinical.threshold = float(values["threshold"])


def _posthoc(bundle: dict[str, Any]) -> PostHoc:
    """PostHoc of a bundle's meta (engine.posthoc imports no torch)."""
    return PostHoc.from_bundle(bundle)


def _run_clinical(
    source: Path, bundle: dict[str, Any], class_names: list[str], eval_dir: Path | None
) -> Clinical:
    posthoc = _posthoc(bundle)
    clinical = Clinical(
        legacy=posthoc.legacy,
        calibrated=posthoc.calibration == "temperature",
        temperature=float(posthoc.temperature),
        posthoc_lines=posthoc.describe(),
        posthoc_source="the run's model (fitted on its validation split)",
        rerun=f"omnifuse evaluate {source}",
        subgroup_command=f"omnifuse evaluate {source} --subgroup-col COL",
    )
    if posthoc.positive is not None and posthoc.positive < len(class_names):
        clinical.positive_class = class_names[posthoc.positive]
    clinical.threshold, clinical.rule = posthoc.threshold, posthoc.rule
    if eval_dir is not None:
        _read_clinical(eval_dir, clinical)
    return clinical


def _run_cohort(
    source: Path, meta: dict[str, str], modalities: list[str], notes: list[str]
) -> pd.DataFrame | None:
    """split_assignment.csv plus each patient's modalities, read from the run's manifest when it
    is on this machine (without decoding images)."""
    path = source / "split_assignment.csv"
    if not path.is_file():
        return None
    frame = _csv(path)
    frame["label"] = frame["label"].astype(int)
    frame = frame.rename(columns={"split": "group"})
    frame["modalities"] = ""
    manifest = Path(meta.get("manifest", ""))
    if not manifest.is_file():
        notes.append(
            f"the run's manifest {manifest} is not on this machine: modality presence "
            "is shown for evaluated patients only"
        )
        return frame
    # Here: data.manifest loads torch, which a report otherwise never needs.
    from omnifuse_cli.data.manifest import read_manifest

    specs = tuple(
        ModalitySpec(*part.split("=", 1)) for part in meta.get("modalities", "").split(",") if part
    )
    try:
        cohort = read_manifest(
            manifest,
            specs,
            labs_table=Path(meta["labs_table"]) if meta.get("labs_table") else None,
            labs_id_col=meta.get("labs_id_col", "id") or "id",
            check_files=False,
            allow_unlabeled=True,
        )
    except OmnifuseError as err:
        notes.append(f"could not read the run's manifest for modality presence: {err.message}")
        return frame
    present = {
        pid: "+".join(n for n, p in zip(modalities, row, strict=True) if p)
        for pid, row in zip(cohort.ids, cohort.present, strict=True)
    }
    frame["modalities"] = frame["id"].map(present).fillna("")
    return frame


def _load_cv(source: Path) -> ReportInputs:
    request = json.loads((source / "cv.json").read_text(encoding="utf-8"))
    meta = _key_values(source / "meta.csv")
    num_classes = int(request["num_classes"])
    class_names = [str(c) for c in range(num_classes)]
    base = "base"
    variants = {v["name"]: v.get("flags", "") for v in request.get("variants", [])}
    all_metrics = _csv(source / "metrics.csv")
    metrics = all_metrics[all_metrics["variant"] == base].drop(columns=["variant"])
    predictions = _csv(source / "predictions.csv")
    predictions = predictions[predictions["variant"] == base]
    notes = []
    repeats = int(request.get("repeats", 1))
    if repeats > 1:
        predictions = predictions[predictions["repeat"].astype(int) == 1]
        notes.append(f"curves show repeat 1 of {repeats}; metrics are means over the repeats")
    cm = _csv(source / "confusion_matrix.csv")
    confusion = cm[cm["variant"] == base].drop(columns=["variant", "true"]).to_numpy(np.int64)
    patterns = _csv(source / "patterns.csv")
    patterns = patterns[patterns["variant"] == base].drop(columns=["variant"])
    folds = _csv(source / "folds.csv")
    folds = folds[folds["repeat"].astype(int) == 1]
    fold = folds["fold"].astype(str)  # fold 0: unlabeled patients, in every training fold
    cohort = pd.DataFrame(
        {
            "id": folds["id"],
            "label": folds["label"].astype(int),
            "group": ("fold " + fold).where(fold != "0", "unlabeled"),
            "modalities": folds["modalities"],
        }
    )
    curves = {}
    for path in sorted((source / "folds" / base).glob("rep*-fold*/metrics.csv")):
        curves[path.parent.name] = _csv(path)
    fold_metrics = _csv(source / "fold_metrics.csv")
    diff_path = source / "differences.csv"
    differences = _csv(diff_path) if diff_path.is_file() else None
    spec = ",".join(f"{m['name']}={m['kind']}" for m in request["base"]["data"]["modalities"])
    meta.setdefault("modalities", spec)
    meta.setdefault("manifest", request.get("manifest", ""))
    meta.setdefault("n_patients", str(len(cohort)))
    clinical = _cv_clinical(source, meta, predictions, class_names)
    if clinical.legacy:
        notes.append(f"the cross-validation was {LEGACY}")
    return ReportInputs(
        kind="cv",
        source=source,
        meta=meta,
        class_names=class_names,
        modalities=_modality_names(meta),
        cohort=cohort,
        group_name="fold",
        metrics=metrics,
        evaluated_on="out-of-fold predictions of every patient",
        predictions=predictions,
        confusion=confusion,
        patterns=patterns,
        curves=curves,
        variant_metrics=all_metrics,
        fold_metrics=fold_metrics,
        differences=differences,
        variants=variants,
        notes=notes,
        clinical=clinical,
    )


def _cv_clinical(
    source: Path, meta: dict[str, str], predictions: pd.DataFrame, class_names: list[str]
) -> Clinical:
    """The pooled clinical files of a cv folder, each fold's temperature and threshold, and the
    --refit model's post-hoc fit."""
    raw = [f"raw_prob_{c}" for c in class_names]
    has_raw = set(raw) <= set(predictions.columns)
    clinical = Clinical(
        legacy=not has_raw and not (source / "calibration.csv").is_file(),
        calibrated=meta.get("calibrate", "") == "temperature",  # refined by the folds below
        rerun="omnifuse cv again with this omnifuse (the files are written when it finishes)",
        subgroup_command="omnifuse cv MANIFEST ... --subgroup-col COL",
    )
    _read_clinical(source, clinical)
    rows = []
    for fold, part in predictions.groupby("fold", sort=True):
        labelled = part[part["label"].astype(str) != ""]
        row: dict[str, object] = {"fold": str(fold), "patients": len(part)}
        if has_raw:
            row["temperature"] = recovered_temperature(
                labelled[raw].to_numpy(dtype=float),
                labelled[[f"prob_{c}" for c in class_names]].to_numpy(dtype=float),
            )
        if "threshold" in part:
            values = pd.to_numeric(part["threshold"], errors="coerce").dropna()
            row["threshold"] = float(values.iloc[0]) if len(values) else math.nan
        rows.append(row)
    if has_raw and rows:
        clinical.fold_posthoc = pd.DataFrame(rows)
        temperatures = clinical.fold_posthoc["temperature"].to_numpy(dtype=float)
        clinical.calibrated = bool((np.abs(temperatures - 1.0) > 1e-3).any())
    final = source / "final" / "model" / "bundle.json"
    if final.is_file():
        posthoc = _posthoc(json.loads(final.read_text(encoding="utf-8")))
        clinical.posthoc_lines = posthoc.describe()
        clinical.posthoc_source = (
            "the final model refitted on every patient (--refit; its validation split)"
        )
    return clinical


def recovered_temperature(raw: np.ndarray, calibrated: np.ndarray) -> float:
    """The temperature T with calibrated = softmax(log(raw) / T), recovered by least squares on
    the centred log-probabilities of every patient (a cv fold's temperature is not stored; its
    predictions before and after calibration are). NaN when the probabilities say nothing (all
    uniform)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = np.log(raw), np.log(calibrated)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a = a[keep] - a[keep].mean(axis=1, keepdims=True)
    b = b[keep] - b[keep].mean(axis=1, keepdims=True)
    product = float((a * b).sum())
    return float((a * a).sum() / product) if product > 1e-12 else math.nan
