"""What a report shows, read from the files a run (`train` + `evaluate`) or a cross-validation
(`cv`) folder holds (the clinical files and the post-hoc fit: clinical_inputs.py). Nothing here
trains or predicts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.engine import runs
from omnifuse_cli.errors import BundleError, OmnifuseError
from omnifuse_cli.report.clinical_inputs import LEGACY, Clinical, cv_clinical, run_clinical
from omnifuse_cli.report.result_csv import read_result_csv
from omnifuse_cli.report.tuning import Tuning, from_meta


@dataclass
class ReportInputs:
    kind: str  # run | cv | tune (a tune folder without a refit run: the checklist's stand-in)
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
    tuning: Tuning | None = None  # the search that chose the settings (omnifuse tune)

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


def group_order(groups: pd.Series) -> list[str]:
    """Splits in the order train, val, test; folds by number."""
    splits = ["train", "val", "test"]
    return sorted(
        {str(g) for g in groups}, key=lambda g: (splits.index(g) if g in splits else 3, len(g), g)
    )


def load_inputs(source: Path) -> ReportInputs:
    """Read a run or cv folder; a clear error for anything else (before anything is written)."""
    source = Path(source)
    if not source.exists():
        raise BundleError(
            f"{source} does not exist",
            hint="pass a folder written by omnifuse train, omnifuse cv or omnifuse tune",
        )
    if not source.is_dir():
        raise BundleError(
            f"{source} is a file, not a run or cross-validation folder",
            hint="pass a folder written by omnifuse train, omnifuse cv or omnifuse tune",
        )
    if (source / runs.CV_FILE).is_file():
        if not (source / runs.METRICS).is_file():
            raise BundleError(
                f"the cross-validation in {source} has not finished (no metrics.csv)",
                hint=f"finish it: omnifuse cv --resume {source}",
            )
        return _load_cv(source)
    if (source / runs.BUNDLE_DIR / "bundle.json").is_file() and (source / runs.METRICS).is_file():
        if (source.parent / runs.CV_FILE).is_file():
            raise BundleError(
                f"{source} is the final model of a cross-validation; its results "
                "are in the cross-validation folder",
                hint=f"omnifuse report {source.parent}",
            )
        if not (source / runs.META).is_file():
            raise BundleError(
                f"the run in {source} has not finished (no meta.csv)",
                hint=f"finish it: omnifuse train --resume {source}",
            )
        return _load_run(source)
    raise BundleError(
        f"{source} is not an omnifuse run or cross-validation folder (neither model/bundle.json "
        "with metrics.csv nor cv.json inside)",
        hint="pass a folder written by omnifuse train, omnifuse cv or omnifuse tune",
    )


def _modality_names(meta: dict[str, str]) -> list[str]:
    spec = meta.get("modalities", "")
    return [part.split("=")[0] for part in spec.split(",") if part]


def _load_run(source: Path) -> ReportInputs:
    meta = runs.read_key_values(source / runs.META)
    bundle = json.loads((source / runs.BUNDLE_DIR / "bundle.json").read_text(encoding="utf-8"))
    class_names = [str(c) for c in bundle.get("class_names", [])] or [
        str(c) for c in range(int(meta.get("num_classes", 2)))
    ]
    notes: list[str] = []
    eval_dir = source / "eval" / "test"
    evaluated_on = "the run's test split"
    if not (source / runs.TEST).is_file():  # --test-ratio 0: an external cohort's evaluation
        external = sorted(
            (d for d in (source / "eval").glob("*") if (d / runs.METRICS).is_file()),
            key=lambda d: (d / runs.METRICS).stat().st_mtime,
        )
        if not external:
            raise BundleError(
                f"the run in {source} has no test split (--test-ratio 0) and has "
                "not been evaluated on another cohort",
                hint=f"omnifuse evaluate {source} --manifest TEST.csv, then report again",
            )
        eval_dir = external[-1]
        evaluated_on = f"the external cohort {eval_dir.name} (the newest evaluation)"
    if (eval_dir / runs.METRICS).is_file():
        metrics = read_result_csv(eval_dir / runs.METRICS)
    else:
        test = read_result_csv(source / runs.TEST)
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
        read_result_csv(eval_dir / runs.PREDICTIONS)
        if (eval_dir / runs.PREDICTIONS).is_file()
        else None
    )
    if predictions is None and (eval_dir / runs.METRICS).is_file():
        notes.append(
            f"{eval_dir} has no predictions.csv (evaluated by an older omnifuse): "
            f"run `omnifuse evaluate {source}` again for the curves"
        )
    cm_path = eval_dir / "confusion_matrix.csv"
    cm_path = cm_path if cm_path.is_file() else source / "confusion_matrix.csv"
    confusion = read_result_csv(cm_path).drop(columns=["true"]).to_numpy(dtype=np.int64)
    patterns = (
        read_result_csv(eval_dir / "patterns.csv")
        if (eval_dir / "patterns.csv").is_file()
        else None
    )
    modalities = _modality_names(meta)
    cohort = _run_cohort(source, meta, modalities, notes)
    curves = _curves(read_result_csv(source / runs.METRICS))
    clinical = run_clinical(
        source, bundle, class_names, eval_dir if (eval_dir / runs.METRICS).is_file() else None
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
        tuning=from_meta(meta),
    )


def _run_cohort(
    source: Path, meta: dict[str, str], modalities: list[str], notes: list[str]
) -> pd.DataFrame | None:
    """split_assignment.csv plus each patient's modalities, read from the run's manifest when it
    is on this machine (without decoding images)."""
    path = source / runs.SPLIT_ASSIGNMENT
    if not path.is_file():
        return None
    frame = read_result_csv(path)
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
    request = json.loads((source / runs.CV_FILE).read_text(encoding="utf-8"))
    meta = runs.read_key_values(source / runs.META)
    num_classes = int(request["num_classes"])
    class_names = [str(c) for c in range(num_classes)]
    base = "base"
    variants = {v["name"]: v.get("flags", "") for v in request.get("variants", [])}
    all_metrics = read_result_csv(source / runs.METRICS)
    metrics = all_metrics[all_metrics["variant"] == base].drop(columns=["variant"])
    predictions = read_result_csv(source / runs.PREDICTIONS)
    predictions = predictions[predictions["variant"] == base]
    notes = []
    repeats = int(request.get("repeats", 1))
    if repeats > 1:
        predictions = predictions[predictions["repeat"].astype(int) == 1]
        notes.append(f"curves show repeat 1 of {repeats}; metrics are means over the repeats")
    cm = read_result_csv(source / "confusion_matrix.csv")
    confusion = cm[cm["variant"] == base].drop(columns=["variant", "true"]).to_numpy(np.int64)
    patterns = read_result_csv(source / "patterns.csv")
    patterns = patterns[patterns["variant"] == base].drop(columns=["variant"])
    folds = read_result_csv(source / "folds.csv")
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
        curves[path.parent.name] = read_result_csv(path)
    fold_metrics = read_result_csv(source / "fold_metrics.csv")
    diff_path = source / "differences.csv"
    differences = read_result_csv(diff_path) if diff_path.is_file() else None
    spec = ",".join(f"{m['name']}={m['kind']}" for m in request["base"]["data"]["modalities"])
    meta.setdefault("modalities", spec)
    meta.setdefault("manifest", request.get("manifest", ""))
    meta.setdefault("n_patients", str(len(cohort)))
    clinical = cv_clinical(source, meta, predictions, class_names)
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


def _curves(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A run's epochs; a bagged run's (--bag-folds) by fold, drawn like cv's folds."""
    if "fold" not in frame:
        return {"run": frame}
    return {
        f"fold {k}": part.drop(columns="fold").reset_index(drop=True)
        for k, part in frame.groupby("fold")
    }
