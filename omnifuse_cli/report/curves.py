"""The numbers behind the report's curves: one-vs-rest ROC and precision-recall curves with
percentile bootstrap bands, and a reliability diagram with quantile bins (scikit-learn inside)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class Curve:
    x: np.ndarray  # GRID: false positive rate (ROC) or recall (PR)
    y: np.ndarray  # the curve of all patients, on GRID
    low: np.ndarray  # 2.5th percentile over bootstrap resamples (NaN without resamples)
    high: np.ndarray  # 97.5th percentile
    positives: int  # patients of the class


def _roc_on_grid(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    fpr, tpr, _ = roc_curve(positive, score)
    return np.interp(GRID, fpr, tpr)


def _pr_on_grid(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    precision, recall, _ = precision_recall_curve(positive, score)
    # recall falls along the arrays; np.interp needs it rising. The step interpolation takes the
    # best precision at a recall at least as high (the usual interpolated PR curve).
    order = np.argsort(recall, kind="stable")
    recall, precision = recall[order], np.maximum.accumulate(precision[order][::-1])[::-1]
    return np.interp(GRID, recall, precision)


def _band(
    y: np.ndarray,
    probs: np.ndarray,
    cls: int,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n: int,
    seed: int,
) -> Curve:
    positive = y == cls
    main = fn(positive, probs[:, cls])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if positive[idx].all() or not positive[idx].any():
            continue  # a resample without both outcomes has no curve
        draws.append(fn(positive[idx], probs[idx, cls]))
    if draws:
        low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    else:
        low = high = np.full_like(GRID, np.nan)
    return Curve(GRID, main, low, high, int(positive.sum()))


def roc_curves(
    y: np.ndarray, probs: np.ndarray, *, n: int = 200, seed: int = 0
) -> dict[int, Curve]:
    """One-vs-rest ROC of every class present with both outcomes, with a 95% bootstrap band."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            c: _band(y, probs, c, _roc_on_grid, n, seed)
            for c in range(probs.shape[1])
            if 0 < (y == c).sum() < len(y)
        }


def pr_curves(y: np.ndarray, probs: np.ndarray, *, n: int = 200, seed: int = 0) -> dict[int, Curve]:
    """One-vs-rest precision-recall curves with a 95% bootstrap band."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            c: _band(y, probs, c, _pr_on_grid, n, seed)
            for c in range(probs.shape[1])
            if 0 < (y == c).sum() < len(y)
        }


@dataclass
class Reliability:
    confidence: np.ndarray  # mean top-label probability in each bin
    accuracy: np.ndarray  # share of correct predictions in each bin
    count: np.ndarray  # patients in each bin
    edges: np.ndarray  # bin edges (quantiles of the confidence)


def reliability_bins(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> Reliability:
    """Top-label reliability diagram with quantile bins: each bin holds about the same number of
    patients (ties can merge bins), so no bin is a handful of patients."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.unique(np.quantile(confidence, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, max(len(edges) - 2, 0))
    groups = [which == b for b in range(max(len(edges) - 1, 1))]
    keep = [g for g in groups if g.any()]
    return Reliability(
        confidence=np.array([confidence[g].mean() for g in keep]),
        accuracy=np.array([correct[g].mean() for g in keep]),
        count=np.array([int(g.sum()) for g in keep]),
        edges=edges,
    )
