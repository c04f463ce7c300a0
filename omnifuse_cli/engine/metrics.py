"""Classification metrics, all from scikit-learn."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, num_classes: int, pred: np.ndarray | None = None
) -> dict[str, float]:
    """accuracy, macro-F1, balanced accuracy, AUROC (one-vs-rest macro) and log loss.

    ``pred``: the model's decisions (its operating point, engine/posthoc.py); None = the most
    probable class. AUROC is NaN when it is undefined (a class absent from y)."""
    labels = list(range(num_classes))
    pred = probs.argmax(axis=1) if pred is None else pred
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
        return float(
            roc_auc_score(
                y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))
            )
        )
    except ValueError:
        return math.nan


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    return confusion_matrix(y, pred, labels=list(range(num_classes)))


def auprc(y: np.ndarray, probs: np.ndarray) -> float:
    """Average precision, one-vs-rest macro over the classes present in y (NaN if none)."""
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


def full_metrics(
    y: np.ndarray, probs: np.ndarray, num_classes: int, pred: np.ndarray | None = None
) -> dict[str, float]:
    """classification_metrics plus AUPRC, expected calibration error and Brier score."""
    out = classification_metrics(y, probs, num_classes, pred)
    out["auprc"] = auprc(y, probs)
    out["ece"] = expected_calibration_error(y, probs)
    out["brier"] = float(brier_score_loss(y, probs, labels=list(range(num_classes))))
    return out


def metric_value(
    name: str, y: np.ndarray, probs: np.ndarray, num_classes: int, pred: np.ndarray | None = None
) -> float:
    """One metric of full_metrics by name (for resampling, where computing all would be waste)."""
    labels = list(range(num_classes))
    pred = probs.argmax(axis=1) if pred is None else pred
    if name == "acc":
        return float(accuracy_score(y, pred))
    if name == "macro_f1":
        return float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    if name == "balanced_acc":
        return float(balanced_accuracy_score(y, pred))
    if name == "auroc":
        return auroc(y, probs)
    if name == "auprc":
        return auprc(y, probs)
    if name == "loss":
        return float(log_loss(y, np.clip(probs, 1e-12, 1.0), labels=labels))
    if name == "ece":
        return expected_calibration_error(y, probs)
    if name == "brier":
        return float(brier_score_loss(y, probs, labels=labels))
    raise KeyError(f"unknown metric {name!r}")


def bootstrap_draws(
    y: np.ndarray,
    probs_sets: Sequence[np.ndarray],
    num_classes: int,
    *,
    n: int,
    seed: int,
    names: Sequence[str],
    preds: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Metrics of every prediction set on the same patient resamples: (n, sets, names).

    A set is (N, C) probabilities, or (R, N, C) for R repeated cross-validations of the same
    patients (the metric is then the mean over repeats). Sharing the resamples between sets
    is what makes their differences paired. NaN where a metric is undefined on a resample.
    ``preds``: each set's decisions, (N,) or (R, N), where they are not the most probable class.
    """
    rng = np.random.default_rng(seed)
    sets = [p[None] if p.ndim == 2 else p for p in probs_sets]
    decided = [
        None if d is None else (d[None] if d.ndim == 1 else d)
        for d in (preds or [None] * len(sets))
    ]
    out = np.full((n, len(sets), len(names)), np.nan)
    with warnings.catch_warnings():
        # A resample can miss a class; the metric is then NaN or scikit-learn's documented value.
        warnings.simplefilter("ignore")
        for b in range(n):
            idx = rng.integers(0, len(y), len(y))
            for s, repeats in enumerate(sets):
                dec = decided[s]
                for k, name in enumerate(names):
                    out[b, s, k] = np.mean(
                        [
                            metric_value(
                                name,
                                y[idx],
                                p[idx],
                                num_classes,
                                None if dec is None else dec[r][idx],
                            )
                            for r, p in enumerate(repeats)
                        ]
                    )
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite values (NaN, NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))


def bootstrap_ci(
    y: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
    *,
    n: int,
    seed: int,
    names: Sequence[str] = ("auroc", "macro_f1", "acc"),
    level: float = 0.95,
    pred: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over patients (resampled with replacement).

    ``probs`` is (N, C), or (R, N, C) for repeated cross-validation (see bootstrap_draws);
    ``pred`` the decisions where they are not the most probable class."""
    if n <= 0:
        return {}
    draws = bootstrap_draws(y, [probs], num_classes, n=n, seed=seed, names=names, preds=[pred])
    return {k: percentile_interval(draws[:, 0, j], level) for j, k in enumerate(names)}


def paired_bootstrap_diff(
    y: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    num_classes: int,
    *,
    n: int,
    seed: int,
    names: Sequence[str],
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of metric(b) - metric(a), both scored on the same resampled patients
    (the paired bootstrap: patient-level noise shared by the two models cancels)."""
    if n <= 0:
        return {}
    draws = bootstrap_draws(y, [probs_a, probs_b], num_classes, n=n, seed=seed, names=names)
    diff = draws[:, 1] - draws[:, 0]
    return {k: percentile_interval(diff[:, j], level) for j, k in enumerate(names)}
