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
