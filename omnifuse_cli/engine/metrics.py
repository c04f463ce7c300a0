"""Classification metrics, all from scikit-learn."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)


def classification_metrics(y: np.ndarray, probs: np.ndarray, num_classes: int
                           ) -> dict[str, float]:
    """accuracy, macro-F1, balanced accuracy, AUROC (one-vs-rest macro) and log loss.

    AUROC is NaN when it is undefined (a class absent from y)."""
    labels = list(range(num_classes))
    pred = probs.argmax(axis=1)
    out = {
        "loss": float(log_loss(y, np.clip(probs, 1e-12, 1.0), labels=labels)),
        "acc": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
        "auroc": auroc(y, probs),
    }
    return out


def auroc(y: np.ndarray, probs: np.ndarray) -> float:
    try:
        if probs.shape[1] == 2:
            return float(roc_auc_score(y, probs[:, 1]))
        return float(roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                   labels=list(range(probs.shape[1]))))
    except ValueError:
        return math.nan


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    return confusion_matrix(y, pred, labels=list(range(num_classes)))


def auprc(y: np.ndarray, probs: np.ndarray) -> float:
    """Average precision, one-vs-rest macro over the classes present in y (NaN if none)."""
    from sklearn.metrics import average_precision_score

    if probs.shape[1] == 2:
        return float(average_precision_score(y, probs[:, 1])) if len(set(y)) == 2 else math.nan
    present = [c for c in range(probs.shape[1]) if (y == c).any()]
    if not present:
        return math.nan
    return float(np.mean([average_precision_score(y == c, probs[:, c]) for c in present]))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017); scikit-learn has none."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def full_metrics(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
    """classification_metrics plus AUPRC, expected calibration error and Brier score."""
    from sklearn.metrics import brier_score_loss

    out = classification_metrics(y, probs, num_classes)
    out["auprc"] = auprc(y, probs)
    out["ece"] = expected_calibration_error(y, probs)
    out["brier"] = float(brier_score_loss(y, probs, labels=list(range(num_classes))))
    return out


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, num_classes: int, *, n: int, seed: int,
                 names: tuple[str, ...] = ("auroc", "macro_f1", "acc"), level: float = 0.95
                 ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over patients (resampled with replacement)."""
    if n <= 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        values = {"acc": float(accuracy_score(y[idx], probs[idx].argmax(1)))}
        if "macro_f1" in names:
            values["macro_f1"] = float(f1_score(y[idx], probs[idx].argmax(1), average="macro",
                                                labels=list(range(num_classes)),
                                                zero_division=0))
        if "auroc" in names:
            values["auroc"] = auroc(y[idx], probs[idx])
        for k in names:
            draws[k].append(values[k])
    tail = (1 - level) / 2 * 100
    out = {}
    for k, values in draws.items():
        finite = np.array([v for v in values if not math.isnan(v)])
        out[k] = ((float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
                  if len(finite) else (math.nan, math.nan))
    return out
