"""Split conformal prediction sets (LAC; Sadinle et al. 2019): sets of classes that hold the
true class with a chosen probability, calibrated on validation patients, and their coverage.

Conventions as in calibration.py: ``y`` holds class indices, ``probs`` is (N, C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from omnifuse_cli.engine.calibration import class_name
from omnifuse_cli.engine.subgroups import ordered_values
from omnifuse_cli.errors import ConfigError

MAX_STORED_SCORES = 20000


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ConfigError(
            f"the conformal miscoverage alpha must lie in (0, 1), not {alpha}",
            hint="e.g. 0.1 for sets that hold the true class 90% of the time",
        )
    return float(alpha)


def _weighted_quantile(scores: np.ndarray, weights: np.ndarray, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest score, n = total weight (inf when beyond n).

    With unit weights this is the exact order statistic; a stored subsample carries weights
    n_c / m_c so it stands for the patients it replaced."""
    n = int(round(float(weights.sum())))
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if n == 0 or k > n:
        return math.inf
    i = int(np.searchsorted(np.cumsum(weights), k - 1e-9, side="left"))
    return float(scores[min(i, len(scores) - 1)])


@dataclass
class ConformalCalibration:
    """Validation nonconformity scores (1 - probability of the true class), sorted ascending,
    with their true classes. ``weights`` (None = 1 each) is how many validation patients each
    stored score stands for; it differs from 1 only after a subsampled ``to_dict``."""

    scores: np.ndarray
    labels: np.ndarray
    num_classes: int
    weights: np.ndarray | None = None

    @classmethod
    def from_validation(
        cls, y: np.ndarray, probs: np.ndarray, num_classes: int
    ) -> ConformalCalibration:
        """Scores of the validation patients (y, probs)."""
        y = np.asarray(y, dtype=int)
        probs = np.asarray(probs, dtype=float)
        scores = 1.0 - probs[np.arange(len(y)), y]
        order = np.argsort(scores, kind="stable")
        return cls(scores=scores[order], labels=y[order], num_classes=int(num_classes))

    def _weights(self) -> np.ndarray:
        return np.ones(len(self.scores)) if self.weights is None else self.weights

    def class_counts(self) -> np.ndarray:
        """Validation patients per class."""
        counts = np.bincount(self.labels, weights=self._weights(), minlength=self.num_classes)
        return np.rint(counts).astype(int)

    @staticmethod
    def min_per_class(alpha: float) -> int:
        """Validation patients a class needs for class-conditional sets: max(20, ceil(2/alpha))."""
        return max(20, math.ceil(2 / _check_alpha(alpha) - 1e-9))

    def class_conditional(self, alpha: float) -> bool:
        """Whether every class has at least min_per_class(alpha) validation patients."""
        return bool((self.class_counts() >= self.min_per_class(alpha)).all())

    def mode(self, alpha: float) -> str:
        """ "class-conditional" or "marginal": how sets at ``alpha`` are calibrated."""
        return "class-conditional" if self.class_conditional(alpha) else "marginal"

    def quantiles(self, alpha: float) -> np.ndarray:
        """qhat per class, shape (C,): class-conditional when class_conditional(alpha), else the
        marginal qhat repeated. +inf where ceil((n+1)(1-alpha)) > n."""
        _check_alpha(alpha)
        weights = self._weights()
        if not self.class_conditional(alpha):
            return np.full(self.num_classes, _weighted_quantile(self.scores, weights, alpha))
        return np.array(
            [
                _weighted_quantile(self.scores[self.labels == c], weights[self.labels == c], alpha)
                for c in range(self.num_classes)
            ]
        )

    def sets(self, probs: np.ndarray, alpha: float) -> np.ndarray:
        """Bool (N, C) prediction sets: class c is in when 1 - probs[:, c] <= qhat_c (a set may
        be empty: the model is then unsure of every class at this alpha)."""
        probs = np.asarray(probs, dtype=float)
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes})")
        return (1.0 - probs) <= self.quantiles(alpha)[None, :]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form. Scores are rounded up to 7 decimals (never lowering a quantile); past
        MAX_STORED_SCORES patients, each class keeps evenly spaced order statistics (its share
        of the budget, at least min(n_c, 1000)) with weights, and ``subsampled_from`` records n.
        """
        scores, labels, weights = self.scores, self.labels, self._weights()
        out: dict[str, Any] = {"num_classes": int(self.num_classes)}
        n = int(round(float(weights.sum())))
        if len(scores) > MAX_STORED_SCORES:
            parts = []
            for c in range(self.num_classes):
                mine = np.flatnonzero(labels == c)
                if not len(mine):
                    continue
                n_c = float(weights[mine].sum())
                m = min(
                    len(mine),
                    max(
                        math.ceil(MAX_STORED_SCORES * len(mine) / len(scores)), min(len(mine), 1000)
                    ),
                )
                pick = mine[np.unique(np.rint(np.linspace(0, len(mine) - 1, m)).astype(int))]
                parts.append((pick, np.full(len(pick), n_c / len(pick))))
            pick = np.concatenate([p for p, _ in parts])
            w = np.concatenate([w for _, w in parts])
            order = np.argsort(scores[pick], kind="stable")
            scores, labels, weights = scores[pick][order], labels[pick][order], w[order]
            out["subsampled_from"] = n
        rounded = np.ceil(np.asarray(scores, dtype=float) * 1e7 - 1e-6) / 1e7
        out["scores"] = [round(float(s), 7) for s in rounded]
        out["labels"] = [int(v) for v in labels]
        if "subsampled_from" in out or self.weights is not None:
            out["weights"] = [float(v) for v in weights]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalCalibration:
        """Inverse of to_dict."""
        weights = d.get("weights")
        return cls(
            scores=np.asarray(d["scores"], dtype=float),
            labels=np.asarray(d["labels"], dtype=int),
            num_classes=int(d["num_classes"]),
            weights=None if weights is None else np.asarray(weights, dtype=float),
        )


def coverage_table(
    y: np.ndarray,
    sets: np.ndarray,
    groups: dict[str, np.ndarray] | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Coverage, mean set size and number of empty sets: overall, per true class and per value
    of each grouping (most frequent first). Columns by, group, n, coverage, mean_set_size,
    empty_sets (a count)."""
    y = np.asarray(y, dtype=int)
    sets = np.asarray(sets, dtype=bool)
    covered = sets[np.arange(len(y)), y]
    size = sets.sum(axis=1)

    def row(by: str, group: str, mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {
            "by": by,
            "group": group,
            "n": n,
            "coverage": float(covered[mask].mean()) if n else math.nan,
            "mean_set_size": float(size[mask].mean()) if n else math.nan,
            "empty_sets": int((size[mask] == 0).sum()),
        }

    rows = [row("all", "all", np.ones(len(y), dtype=bool))]
    rows += [row("class", class_name(c, class_names), y == c) for c in range(sets.shape[1])]
    for key, values in (groups or {}).items():
        text = np.asarray(values).astype(str)
        rows += [row(key, v, text == v) for v in ordered_values(text)]
    return pd.DataFrame(
        rows, columns=["by", "group", "n", "coverage", "mean_set_size", "empty_sets"]
    )
