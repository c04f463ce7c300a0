"""`omnifuse predict`: class probabilities and DWFuse modality weights for new patients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.inference import infer, resolve_device


@dataclass(frozen=True)
class PredictRequest:
    run_dir: Path
    patients: Path
    labs_table: Path | None = None
    labs_id_col: str | None = None
    device: str = "auto"
    batch_size: int = 32


@dataclass
class PredictResult:
    run_dir: Path
    frame: pd.DataFrame  # one row per patient
    class_names: list[str]
    modality_names: list[str]


def predict_patients(request: PredictRequest) -> PredictResult:
    device = resolve_device(request.device)
    bundle = load_bundle(request.run_dir, device)
    run_meta = bundle.meta.get("run", {})
    config = bundle.model.config
    cohort = read_manifest(
        Path(request.patients), config.modalities, labs_table=request.labs_table,
        labs_id_col=request.labs_id_col or run_meta.get("labs_id_col", "id"),
        require_labels=False, num_classes=config.num_classes,
    )
    bundle.preprocessor.check_compatible(cohort)
    data = bundle.preprocessor.prepare(cohort)
    result = infer(bundle.model, data, np.arange(len(cohort)), device=device,
                   batch_size=request.batch_size)
    names = [m.name for m in config.modalities]
    labels = None if cohort.labels is None else cohort.labels[result.index]
    frame = prediction_frame([cohort.ids[i] for i in result.index], labels,
                             np.exp(result.log_probs), cohort.present[result.index], names,
                             bundle.class_names, result.weights)
    return PredictResult(Path(request.run_dir), frame, bundle.class_names, names)


def prediction_frame(ids: list[str], labels: np.ndarray | None, probs: np.ndarray,
                     present: np.ndarray, names: list[str], class_names: list[str],
                     weights: np.ndarray | None) -> pd.DataFrame:
    """One row per patient: id, label (if known), pred, prob_<class>, modalities present and
    weight_<modality>, each modality's DWFuse weight at the predicted class (predictions.csv of
    predict, evaluate and cv)."""
    pred = probs.argmax(1)
    frame = pd.DataFrame({"id": ids})
    if labels is not None:
        frame["label"] = [int(v) if v >= 0 else None for v in labels]
    frame["pred"] = [class_names[c] for c in pred]
    for c, cname in enumerate(class_names):
        frame[f"prob_{cname}"] = probs[:, c]
    frame["modalities"] = ["+".join(n for n, p in zip(names, row, strict=True) if p)
                           for row in present]
    if weights is not None:
        # w_m at the predicted class: how much each modality's own head counts for this patient.
        at_pred = np.take_along_axis(weights, pred[:, None, None], axis=2)[:, :, 0]
        for m, name in enumerate(names):
            frame[f"weight_{name}"] = at_pred[:, m]
    return frame
