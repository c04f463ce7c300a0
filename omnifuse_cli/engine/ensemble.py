"""The weighted ensemble of `--preset best`: Caruana's greedy ensemble selection on
out-of-fold probabilities.

Caruana et al. (2004), "Ensemble selection from libraries of models", as AutoGluon's
``EnsembleSelection`` does it: start from an empty ensemble and, for a fixed number of
iterations, add (with replacement) the member whose addition makes the running average of
probabilities score best on the out-of-fold (OOF) predictions. A member's weight is how often it
was added over the number of additions. Selecting with replacement is what lets a strong member
take most of the weight and keeps a weak one at zero, where a plain average would let every
member in; the OOF predictions are what keeps the choice honest, since no member saw the
patients it is scored on. As AutoGluon does, the weights are those of the best prefix of the
additions, so the ensemble never scores below its best member on the OOF patients.

Every score is higher-is-better (log loss is negated), so the search always maximises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    roc_auc_score,
)

Metric = Literal["auroc", "log_loss", "macro_f1", "balanced_accuracy", "accuracy"]
METRICS: tuple[Metric, ...] = get_args(Metric)
PROBABILITY_FLOOR = 1e-12  # log loss of a probability of 0 is infinite: one patient would decide


def parse_metric(name: str) -> Metric:
    """``name`` as a Metric, or ValueError naming the choices (for values read from files)."""
    if name not in METRICS:
        raise ValueError(f"unknown ensemble metric {name!r}; choose one of {', '.join(METRICS)}")
    return name


def score(metric: Metric, y: np.ndarray, probs: np.ndarray) -> float:
    """``metric`` of (N, C) probabilities ``probs`` against labels ``y``, higher is better.

    Classes absent from ``y`` are left out where a metric is defined per class (AUROC, macro-F1),
    because a fold or a small cohort can miss a rare class and the score must still rank
    candidates; AUROC is NaN only when ``y`` has fewer than two classes."""
    return _SCORERS[metric](np.asarray(y, dtype=np.int64), np.asarray(probs, dtype=np.float64))


def _neg_log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    clipped = np.clip(probs, PROBABILITY_FLOOR, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return -float(log_loss(y, clipped, labels=list(range(probs.shape[1]))))


def _macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    present = np.unique(y).tolist()
    return float(
        f1_score(y, probs.argmax(axis=1), average="macro", labels=present, zero_division=0)
    )


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    with warnings.catch_warnings():
        # A predicted class absent from y only counts against the classes y has; scikit-learn
        # says so in a warning that would repeat for every candidate of the search.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, probs.argmax(axis=1)))


def _accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(accuracy_score(y, probs.argmax(axis=1)))


def _auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUROC of the positive column. Several classes: the macro mean of one-vs-rest
    AUROCs (scikit-learn's multi_class="ovr" average) over the classes present in ``y``."""
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))


_SCORERS: dict[Metric, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": _auroc,
    "log_loss": _neg_log_loss,
    "macro_f1": _macro_f1,
    "balanced_accuracy": _balanced_accuracy,
    "accuracy": _accuracy,
}


@dataclass(frozen=True)
class EnsembleFit:
    """The chosen weights and how they were found, for the run's records and for predicting."""

    weights: np.ndarray  # (M,) non-negative, summing to one
    names: list[str]
    member_scores: list[float]  # each member's own OOF score
    ensemble_score: float  # the weighted ensemble's OOF score
    metric: Metric
    history: list[float] = field(default_factory=list)  # the running ensemble's score per step

    def to_dict(self) -> dict[str, object]:
        """JSON primitives (a score that is not finite becomes None: JSON has no NaN)."""
        return {
            "weights": [float(w) for w in self.weights],
            "names": list(self.names),
            "member_scores": [_finite_or_none(s) for s in self.member_scores],
            "ensemble_score": _finite_or_none(self.ensemble_score),
            "metric": self.metric,
            "history": [_finite_or_none(s) for s in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EnsembleFit:
        """The inverse of to_dict; ValueError when the weights do not fit the names."""
        weights = np.asarray(data["weights"], dtype=np.float64)
        names = [str(n) for n in cast(Sequence[object], data["names"])]
        if weights.ndim != 1 or len(weights) != len(names):
            raise ValueError(f"{len(names)} ensemble members but weights {weights.tolist()}")
        if (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, abs_tol=1e-9):
            raise ValueError(f"ensemble weights {weights.tolist()} are not a distribution")
        return cls(
            weights=weights,
            names=names,
            member_scores=[_nan_if_none(s) for s in cast(Sequence[object], data["member_scores"])],
            ensemble_score=_nan_if_none(data["ensemble_score"]),
            metric=parse_metric(str(data["metric"])),
            history=[_nan_if_none(s) for s in cast(Sequence[object], data.get("history", []))],
        )


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _nan_if_none(value: object) -> float:
    return math.nan if value is None else float(cast(float, value))


def _ranked(value: float) -> float:
    """A score as the search compares it: an undefined (NaN) score loses to every defined one."""
    return value if math.isfinite(value) else -math.inf


def greedy_selection(
    oof: Sequence[np.ndarray],
    y: np.ndarray,
    metric: Metric,
    *,
    iterations: int = 50,
    names: Sequence[str] | None = None,
) -> EnsembleFit:
    """Caruana's ensemble selection with replacement on the members' OOF probabilities.

    Each of ``iterations`` steps adds the member that makes the running average score best
    (ties go to the lower index, so equal members give the same choice on every run). The
    weights are the addition counts of the best-scoring prefix of the steps (its first
    occurrence), divided by the prefix's length."""
    if not oof:
        raise ValueError("ensemble selection needs at least one member")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    members = [np.asarray(p, dtype=np.float64) for p in oof]
    shapes = {p.shape for p in members}
    y = np.asarray(y, dtype=np.int64)
    if len(shapes) != 1 or members[0].ndim != 2 or members[0].shape[0] != len(y):
        raise ValueError(f"OOF probabilities of shapes {sorted(shapes)} for {len(y)} labels")
    labels = list(names) if names is not None else [f"member_{i}" for i in range(len(members))]
    if len(labels) != len(members):
        raise ValueError(f"{len(labels)} names for {len(members)} members")

    total = np.zeros_like(members[0])
    picks: list[int] = []
    history: list[float] = []
    for step in range(1, iterations + 1):
        best_index, best_score = 0, -math.inf
        candidate_scores = [score(metric, y, (total + p) / step) for p in members]
        for i, value in enumerate(candidate_scores):
            if _ranked(value) > best_score:
                best_index, best_score = i, _ranked(value)
        total += members[best_index]
        picks.append(best_index)
        history.append(candidate_scores[best_index])

    ranked = [_ranked(h) for h in history]
    keep = int(np.argmax(ranked)) + 1  # argmax returns the first of equal maxima
    counts = np.bincount(picks[:keep], minlength=len(members)).astype(np.float64)
    return EnsembleFit(
        weights=counts / counts.sum(),
        names=labels,
        member_scores=[score(metric, y, p) for p in members],
        ensemble_score=history[keep - 1],
        metric=metric,
        history=history,
    )


def combine(probs: Sequence[np.ndarray | None], weights: np.ndarray) -> np.ndarray:
    """The weighted average of the members' (N, C) probabilities. A member of weight 0 may be
    None, so a caller need not compute predictions the ensemble does not use."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(probs) != len(weights):
        raise ValueError(f"{len(probs)} members' probabilities for {len(weights)} weights")
    out: np.ndarray | None = None
    for p, w in zip(probs, weights, strict=True):
        if w == 0:
            continue
        if p is None:
            raise ValueError("a member with a non-zero weight has no probabilities")
        part = w * np.asarray(p, dtype=np.float64)
        out = part if out is None else out + part
    if out is None:
        raise ValueError("every ensemble weight is zero")
    return out
