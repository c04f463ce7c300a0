"""Operating points chosen by a rule (youden, f1, sens=0.9, ...) and decision curves.

Conventions as in calibration.py: ``y_pos`` is a bool array, ``score`` the probability of the
positive class; a patient is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, roc_curve

from omnifuse_cli.engine.metrics import percentile_interval
from omnifuse_cli.errors import ConfigError

_EPS = 1e-12  # tolerance when comparing achieved rates with a target or with each other

# ----------------------------------------------------------------------------------------------
# Operating points
# ----------------------------------------------------------------------------------------------

THRESHOLD_RULES = ("youden", "f1", "sens", "spec", "ppv", "npv")
_TARGET_RULES = ("sens", "spec", "ppv", "npv")
_RULE_FORMS = "youden, f1, sens=X, spec=X, ppv=X or npv=X with 0 < X < 1 (e.g. sens=0.9)"


@dataclass(frozen=True)
class ThresholdRule:
    """How to pick a decision threshold: ``youden``, ``f1`` or a target such as ``sens=0.9``."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def parse_threshold_rule(text: str) -> ThresholdRule:
    """Parse "youden", "f1", "sens=0.9", "spec=0.95", "ppv=0.5" or "npv=0.9" (any case)."""
    cleaned = re.sub(r"\s+", "", str(text)).lower()
    if cleaned in ("youden", "f1"):
        return ThresholdRule(cleaned)
    kind, sep, value = cleaned.partition("=")
    if sep and kind in _TARGET_RULES:
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0 < target < 1:
            return ThresholdRule(kind, target)
        raise ConfigError(
            f"--threshold {text!r}: the target must be a number between 0 and 1",
            hint=f"use {_RULE_FORMS}",
        )
    raise ConfigError(f"--threshold {text!r} is not a threshold rule", hint=f"use {_RULE_FORMS}")


def _rates(tp: ArrayLike, fp: ArrayLike, n_pos: float, n_neg: float) -> dict[str, np.ndarray]:
    """sensitivity, specificity, ppv, npv, f1 from counts (NaN where a denominator is 0)."""
    tp = np.asarray(tp, dtype=float)
    fp = np.asarray(fp, dtype=float)
    fn = n_pos - tp
    tn = n_neg - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sensitivity": np.where(n_pos > 0, tp / n_pos, np.nan),
            "specificity": np.where(n_neg > 0, tn / n_neg, np.nan),
            "ppv": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "npv": np.where(tn + fn > 0, tn / (tn + fn), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }


_RULE_RATE = {"sens": "sensitivity", "spec": "specificity", "ppv": "ppv", "npv": "npv"}
# Among candidates meeting the target: sens and npv take the highest threshold (the most
# specific one), spec and ppv the lowest (the most sensitive one).
_PREFER_HIGH = {"sens": True, "npv": True, "spec": False, "ppv": False}


def choose_threshold(
    y_pos: np.ndarray, score: np.ndarray, rule: ThresholdRule
) -> tuple[float, bool]:
    """(threshold, met): the candidate threshold (a distinct score) that ``rule`` picks.

    youden and f1 maximise their criterion (ties: the higher threshold) and are always met.
    sens=x and npv=x take the highest threshold achieving >= x, spec=x and ppv=x the lowest.
    When no candidate achieves the target, met is False and the threshold is the one achieving
    the largest value of that rate (ties broken in the same direction as when it is met).
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    n_pos = int(y_pos.sum())
    n_neg = len(y_pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(
            "cannot choose a threshold: the labels hold one class only",
            hint="choose the threshold on data with both positives and negatives",
        )
    fpr, tpr, thresholds = roc_curve(y_pos.astype(int), score, drop_intermediate=False)
    keep = thresholds <= score.max()  # drop the leading inf ("nobody positive")
    thresholds = thresholds[keep]  # decreasing: index 0 is the highest threshold
    rates = _rates(np.rint(tpr[keep] * n_pos), np.rint(fpr[keep] * n_neg), n_pos, n_neg)
    if rule.kind in ("youden", "f1"):
        value = (
            rates["sensitivity"] + rates["specificity"] - 1
            if rule.kind == "youden"
            else rates["f1"]
        )
        best = np.nanmax(value)
        return (float(thresholds[np.flatnonzero(value >= best - _EPS)[0]]), True)
    if rule.kind not in _RULE_RATE or rule.target is None:
        raise ConfigError(f"unknown threshold rule {str(rule)!r}", hint=f"use {_RULE_FORMS}")
    value = np.nan_to_num(rates[_RULE_RATE[rule.kind]], nan=-np.inf)
    met = bool((value >= rule.target - _EPS).any())
    goal = rule.target if met else value.max()
    which = np.flatnonzero(value >= goal - _EPS)
    i = which[0] if _PREFER_HIGH[rule.kind] else which[-1]
    return (float(thresholds[i]), met)


def operating_point(y_pos: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """threshold, sensitivity, specificity, ppv, npv, f1 and the counts tp, fp, tn, fn."""
    y_pos = np.asarray(y_pos, dtype=bool)
    called = np.asarray(score, dtype=float) >= threshold
    tn, fp, fn, tp = confusion_matrix(y_pos, called, labels=[False, True]).ravel()
    rates = _rates(tp, fp, tp + fn, tn + fp)
    out = {"threshold": float(threshold)}
    out.update({k: float(v) for k, v in rates.items()})
    out.update({"tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn)})
    return out


_OP_RATES = ("sensitivity", "specificity", "ppv", "npv", "f1")


def operating_point_ci(
    y_pos: np.ndarray,
    score: np.ndarray,
    threshold: float,
    *,
    n: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over patients of sensitivity, specificity, ppv, npv and f1
    at a fixed threshold (chosen on other data, so not re-chosen per resample)."""
    if n <= 0:
        return {}
    y_pos = np.asarray(y_pos, dtype=bool)
    called = np.asarray(score, dtype=float) >= threshold
    rng = np.random.default_rng(seed)
    draws = {k: np.full(n, np.nan) for k in _OP_RATES}
    for b in range(n):
        idx = rng.integers(0, len(y_pos), len(y_pos))
        yb, cb = y_pos[idx], called[idx]
        n_pos = int(yb.sum())
        rates = _rates(
            np.count_nonzero(yb & cb), np.count_nonzero(~yb & cb), n_pos, len(yb) - n_pos
        )
        for k in _OP_RATES:
            draws[k][b] = rates[k]
    return {k: percentile_interval(draws[k], level) for k in _OP_RATES}


# ----------------------------------------------------------------------------------------------
# Decision curves (Vickers & Elkin 2006)
# ----------------------------------------------------------------------------------------------

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def decision_curve(
    y_pos: np.ndarray, score: np.ndarray, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """Net benefit of treating patients with score >= pt, against treat-all and treat-none.

    Columns threshold, net_benefit, treat_all, treat_none, tp, fp, n."""
    y_pos = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    pt = np.asarray(thresholds, dtype=float)
    if not len(pt) or ((pt <= 0) | (pt >= 1)).any():
        raise ConfigError("decision-curve thresholds must lie strictly between 0 and 1")
    n = len(y_pos)
    if not n:
        raise ConfigError("a decision curve needs at least one patient")
    pos, neg = np.sort(score[y_pos]), np.sort(score[~y_pos])
    tp = len(pos) - np.searchsorted(pos, pt, side="left")
    fp = len(neg) - np.searchsorted(neg, pt, side="left")
    odds = pt / (1 - pt)
    prevalence = len(pos) / n
    return pd.DataFrame(
        {
            "threshold": pt,
            "net_benefit": tp / n - fp / n * odds,
            "treat_all": prevalence - (1 - prevalence) * odds,
            "treat_none": np.zeros(len(pt)),
            "tp": tp.astype(int),
            "fp": fp.astype(int),
            "n": np.full(len(pt), n, dtype=int),
        }
    )
