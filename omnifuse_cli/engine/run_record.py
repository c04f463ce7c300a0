"""What a train run records: its result (TrainResult), the split files, meta.csv's settings and
the test split's files, and the short texts it says (unlabeled patients, random image weights).
Shared by a single model's run (training.py) and a bagged one (bagged_train.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli import __version__
from omnifuse_cli.config import TrainConfig, to_primitive
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.prepared import PreparedCohort
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.bundle import versions
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.fitting import EpochRecord, infer_all
from omnifuse_cli.engine.metrics import classification_metrics, confusion
from omnifuse_cli.engine.modelling import ImageWeights
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.engine.runs import (
    CONFUSION,
    SPLIT,
    SPLIT_ASSIGNMENT,
    TEST,
    TrainRequest,
    write_meta,
)
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse


@dataclass
class TrainResult:
    out_dir: Path
    records: list[EpochRecord]
    best_epoch: int
    test: dict[str, float]  # empty without a test split (--test-ratio 0)
    confusion: np.ndarray | None
    split_counts: dict[str, int]
    class_names: list[str]
    encode_seconds: float
    device: str
    image_weights: str
    notes: list[str]
    # Patients per class and per missing pattern in each split (engine.audit.split_summary).
    split_summary: pd.DataFrame | None = None
    select_metric: str = "macro_f1"  # the validation score that picked best_epoch
    bag: str = ""  # --bag-folds: what the bag finished (engine/bagging.BagFit.describe)


def unlabeled_note(splits: dict[str, np.ndarray]) -> str:
    return (
        f"{len(splits['unlabeled']):,} unlabeled patient(s) (empty label) train the "
        "imputation and fit the normalisation and vocabulary beside the "
        f"{len(splits['train']):,} labelled training patients; no label loss, validation "
        "score or test metric uses them"
    )


def weights_warning(weights: ImageWeights) -> str:
    return (
        f"image backbone: {weights.description}. Random image features are far weaker than "
        "ImageNet ones: this run's image results say little about what the images can do."
    )


def pinned_config(config_yaml: str, weights: ImageWeights) -> str:
    """The run's config.yaml with what it actually used in its header: omnifuse's version and
    the image weights loaded (their sha256, or random init). Comments, so the file still
    repeats the run as a --config file."""
    lines = config_yaml.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    used = weights.description + (f" (sha256 {weights.sha256})" if weights.sha256 else "")
    pinned = [f"# omnifuse {__version__}; image weights: {used}\n"]
    return "".join(lines[:head] + pinned + lines[head:])


def split_assignment(cohort: Cohort, splits: dict[str, np.ndarray]) -> pd.DataFrame:
    """id, label and split of every patient (empty split for patients in none), then the
    patients left out for having no modality (split ``excluded``)."""
    assert cohort.labels is not None
    assignment = np.full(len(cohort), "", dtype=object)
    for name, idx in splits.items():
        assignment[idx] = name
    frame = pd.DataFrame({"id": cohort.ids, "label": cohort.labels, "split": assignment})
    if not cohort.excluded:
        return frame
    excluded = pd.DataFrame(cohort.excluded, columns=["id", "label"]).assign(split="excluded")
    return pd.concat([frame, excluded], ignore_index=True)


def write_split_files(out_dir: Path, cohort: Cohort, splits: dict[str, np.ndarray]) -> None:
    """Each patient's split; patients left out for having no modality are listed as
    ``excluded`` (with their label, -1 when they have none)."""
    write_csv(out_dir / SPLIT_ASSIGNMENT, split_assignment(cohort, splits))
    counts = {name: len(idx) for name, idx in splits.items()}
    if cohort.excluded:
        counts["excluded"] = len(cohort.excluded)
    write_csv(out_dir / SPLIT, pd.DataFrame({"split": list(counts), "n": list(counts.values())}))


def run_meta(
    request: TrainRequest,
    cohort: Cohort,
    device: torch.device,
    weights: ImageWeights,
    splits: dict[str, np.ndarray],
    warnings: list[str],
) -> dict[str, Any]:
    data_cfg = request.data
    return {
        "manifest": str(Path(request.manifest).resolve()),
        "labs_table": str(Path(data_cfg.labs_table).resolve()) if data_cfg.labs_table else "",
        "labs_id_col": data_cfg.labs_id_col,
        "labs_format": data_cfg.labs_format,
        "labs_agg": data_cfg.labs_agg,
        "encoding": data_cfg.encoding,
        "on_empty_patient": data_cfg.on_empty_patient,
        "n_excluded": len(cohort.excluded),
        "num_classes": request.num_classes,
        "modalities": ",".join(f"{m.name}={m.kind}" for m in data_cfg.modalities),
        "n_patients": len(cohort),
        **{f"n_{k}": len(v) for k, v in splits.items()},
        "device": str(device),
        "processes": distributed.world_size(),
        **weights.meta(),
        "warnings": " | ".join(warnings),
        **{f"image_{k}": v for k, v in to_primitive(data_cfg.image).items()},
        **{f"text_{k}": v for k, v in to_primitive(data_cfg.text).items()},
        **to_primitive(request.method),
        **to_primitive(request.train),
        **{f"version_{k}": v for k, v in versions().items()},
    }


def write_results(
    out_dir: Path,
    test: dict[str, float],
    cm: np.ndarray | None,
    class_names: list[str],
    meta: dict[str, Any],
    timings: dict[str, Any],
) -> None:
    """meta.csv, and the test split's metrics and confusion matrix when there is one."""
    if cm is not None:
        write_csv(out_dir / TEST, pd.DataFrame([{f"test_{k}": v for k, v in test.items()}]))
        frame = pd.DataFrame(cm, columns=[f"pred_{c}" for c in class_names])
        frame.insert(0, "true", class_names)
        write_csv(out_dir / CONFUSION, frame)
    write_meta(out_dir, {**meta, **timings})


def score_test(
    model: OmniFuse | BaggedOmniFuse,
    data: PreparedCohort,
    cohort: Cohort,
    test_idx: np.ndarray,
    cfg: TrainConfig,
    posthoc: PostHoc,
    combine: Callable[[Cohort, np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """The test split's metrics and confusion matrix from the calibrated probabilities and the
    operating point's decisions (empty and None under --test-ratio 0). ``combine``: the
    weighted ensemble (bagged_run.Scorer.log_probs) of the scored patients."""
    if not len(test_idx):  # --test-ratio 0: the user evaluates an external cohort
        return {}, None
    assert cohort.labels is not None
    result = infer_all(
        model, data, test_idx, device=_device(model), batch_size=cfg.batch_size, amp=cfg.amp
    )
    log_probs = result.log_probs
    if combine is not None:
        log_probs = combine(cohort.subset(result.index), log_probs)
    probs = posthoc.probabilities(log_probs)
    pred = posthoc.decide(probs)
    y = cohort.labels[result.index]
    num_classes = probs.shape[1]
    return classification_metrics(y, probs, num_classes, pred), confusion(y, pred, num_classes)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
