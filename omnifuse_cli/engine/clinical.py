"""Clinical read-outs of a classifier's probabilities.

Temperature scaling, calibration intercept and slope, operating points chosen by a rule,
decision curves, split conformal prediction sets and subgroup tables. Everything here works on
arrays of probabilities, so it serves ``evaluate``, ``cv`` and ``report`` alike.

Conventions: ``y`` holds class indices 0..C-1, ``probs`` is (N, C), ``log_probs`` is (N, C)
log-probabilities. For binary or one-vs-rest work ``y_pos`` is a bool array and ``score`` the
probability of the positive class; a patient is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import brentq, minimize_scalar
from scipy.special import expit, log_softmax, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, roc_curve

from omnifuse_cli.engine.metrics import (
    bootstrap_ci,
    expected_calibration_error,
    metric_value,
    percentile_interval,
)
from omnifuse_cli.errors import ConfigError

_EPS = 1e-12  # tolerance when comparing achieved rates with a target or with each other

# ----------------------------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017)
# ----------------------------------------------------------------------------------------------


def _nll(log_probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``log_softmax(log_probs / T)``."""
    scaled = log_softmax(log_probs / temperature, axis=1)
    return float(-scaled[np.arange(len(y)), y].mean())


def fit_temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 (searched in [0.05, 20]) minimising the mean NLL on (log_probs, y)."""
    log_probs = np.asarray(log_probs, dtype=float)
    y = np.asarray(y, dtype=int)
    if log_probs.ndim != 2 or len(log_probs) != len(y) or not len(y):
        raise ValueError("log_probs must be (N, C) with one label per row")
    result = minimize_scalar(
        lambda t: _nll(log_probs, y, math.exp(t)),
        method="bounded",
        bounds=(math.log(0.05), math.log(20.0)),
        options={"xatol": 1e-7},
    )
    return float(math.exp(result.x))


def apply_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """``log_softmax(log_probs / T)``: temperature-scaled log-probabilities (argmax unchanged)."""
    if not temperature > 0:
        raise ConfigError(f"the temperature must be positive, not {temperature}")
    return log_softmax(np.asarray(log_probs, dtype=float) / temperature, axis=1)


# ----------------------------------------------------------------------------------------------
# Calibration intercept and slope (Van Calster et al. 2019)
# ----------------------------------------------------------------------------------------------


def _unpenalised_logistic() -> LogisticRegression:
    """Logistic regression without a penalty (``C=inf``; ``penalty=None`` is deprecated in 1.8)."""
    return LogisticRegression(C=np.inf, max_iter=1000)


def calibration_slope_intercept(y_pos: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(intercept, slope): calibration-in-the-large ``a`` in y ~ a + offset(logit p), and ``b``
    in y ~ a + b logit p. (NaN, NaN) when y_pos holds one class only."""
    y_pos = np.asarray(y_pos, dtype=bool)
    lp = logit(np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6))
    n_pos = int(y_pos.sum())
    if n_pos == 0 or n_pos == len(y_pos):
        return (math.nan, math.nan)
    with warnings.catch_warnings():
        # Perfect separation has no finite slope; lbfgs then stops at a large value and warns.
        warnings.simplefilter("ignore")
        slope = float(_unpenalised_logistic().fit(lp[:, None], y_pos.astype(int)).coef_[0, 0])

    def score_eq(a: float) -> float:
        return float(n_pos - expit(a + lp).sum())

    # score_eq falls from n_pos (a -> -inf) to n_pos - N (a -> +inf): widen until it changes sign.
    lo, hi = -1.0, 1.0
    while score_eq(lo) < 0:
        lo *= 2
    while score_eq(hi) > 0:
        hi *= 2
    intercept = float(brentq(score_eq, lo, hi, xtol=1e-12))
    return (intercept, slope)


def calibration_summary(
    y: np.ndarray, probs: np.ndarray, num_classes: int, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """ece, brier and loss; then cal_intercept / cal_slope of class 1 (binary) or
    cal_intercept_<name> / cal_slope_<name> one-vs-rest per class (C > 2)."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    labels = list(range(num_classes))
    out = {
        "ece": expected_calibration_error(y, probs),
        "brier": float(brier_score_loss(y, probs, labels=labels)),
        "loss": float(log_loss(y, np.clip(probs, 1e-12, 1.0), labels=labels)),
    }
    if num_classes == 2:
        out["cal_intercept"], out["cal_slope"] = calibration_slope_intercept(y == 1, probs[:, 1])
        return out
    for c in labels:
        name = _class_name(c, class_names)
        a, b = calibration_slope_intercept(y == c, probs[:, c])
        out[f"cal_intercept_{name}"] = a
        out[f"cal_slope_{name}"] = b
    return out


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[c]) if class_names is not None else str(c)


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


# ----------------------------------------------------------------------------------------------
# Split conformal prediction sets (LAC; Sadinle et al. 2019)
# ----------------------------------------------------------------------------------------------

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


def _ordered_values(values: np.ndarray) -> list[Any]:
    """Distinct values, most frequent first (ties: by their text)."""
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i]))
    return [uniq[i] for i in order]


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
    rows += [row("class", _class_name(c, class_names), y == c) for c in range(sets.shape[1])]
    for key, values in (groups or {}).items():
        text = np.asarray(values).astype(str)
        rows += [row(key, v, text == v) for v in _ordered_values(text)]
    return pd.DataFrame(
        rows, columns=["by", "group", "n", "coverage", "mean_set_size", "empty_sets"]
    )


# ----------------------------------------------------------------------------------------------
# Subgroups
# ----------------------------------------------------------------------------------------------

SMALL_SUBGROUP = 30
MISSING = "missing"
_SUBGROUP_FORMS = "COLUMN, COLUMN:qK (K quantile bands, e.g. age:q4) or COLUMN:a,b (e.g. age:40,65)"
_LOWER_IS_BETTER = frozenset({"brier", "ece", "loss"})
_IDEAL = {"cal_intercept": 0.0, "cal_slope": 1.0}  # best = closest to this


@dataclass(frozen=True)
class SubgroupSpec:
    """A column to split patients by; bands None (categories as they are), "qK" or "a,b,..."."""

    column: str
    bands: str | None = None

    def __str__(self) -> str:
        return self.column if self.bands is None else f"{self.column}:{self.bands}"

    def cut_points(self) -> list[float]:
        """The cut points of a "a,b,..." spec (empty otherwise)."""
        if self.bands is None or self.bands.startswith("q"):
            return []
        return [float(v) for v in self.bands.split(",")]


def parse_subgroup(text: str) -> SubgroupSpec:
    """Parse "sex", "age:q4" or "age:40,65". Only a suffix after the last colon that reads as
    quantile bands or numbers is a band spec; otherwise the whole text is the column name."""
    text = str(text).strip()
    if not text:
        raise ConfigError("empty subgroup", hint=f"use {_SUBGROUP_FORMS}")
    column, sep, suffix = text.rpartition(":")
    if not sep:
        return SubgroupSpec(text)
    bands = re.sub(r"\s+", "", suffix).lower()
    quantile = re.fullmatch(r"q(\d+)", bands)
    looks_numeric = bool(re.fullmatch(r"[-+0-9.,e]*", bands)) and any(ch.isdigit() for ch in bands)
    if not (quantile or looks_numeric or re.fullmatch(r"q[-+0-9.,e]*", bands)):
        return SubgroupSpec(text)  # e.g. a column named "visit:baseline"
    column = column.strip()
    if not column:
        raise ConfigError(f"subgroup {text!r} names no column", hint=f"use {_SUBGROUP_FORMS}")
    if quantile:
        k = int(quantile.group(1))
        if k < 2:
            raise ConfigError(
                f"subgroup {text!r}: quantile bands need K >= 2", hint=f"use {_SUBGROUP_FORMS}"
            )
        return SubgroupSpec(column, f"q{k}")
    try:
        cuts = [float(v) for v in bands.split(",")] if looks_numeric else []
    except ValueError:
        cuts = []
    if not cuts or not all(math.isfinite(c) for c in cuts):
        raise ConfigError(
            f"subgroup {text!r}: cannot read the bands {suffix!r}", hint=f"use {_SUBGROUP_FORMS}"
        )
    if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise ConfigError(
            f"subgroup {text!r}: cut points must increase", hint=f"use {_SUBGROUP_FORMS}"
        )
    return SubgroupSpec(column, ",".join(_fmt(c) for c in cuts))


def _fmt(v: float, digits: int = 6) -> str:
    """A number as short readable text (40.0 -> "40"; others to ``digits`` significant)."""
    v = float(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}"


def band(values: pd.Series, spec: SubgroupSpec) -> pd.Series:
    """Subgroup labels per patient (same index as values); missing values -> "missing".

    Categorical specs give str(value) as an object Series; banded specs give an ordered
    Categorical of labels ("Q1 [18, 42]", ... or "<40", "40-<65", ">=65"), "missing" last."""
    missing = values.isna()
    if spec.bands is None:
        out = values.map(str).astype(object)
        out[missing] = MISSING
        return out
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & ~missing
    if bad.any():
        shown = ", ".join(repr(str(v)) for v in pd.unique(values[bad])[:5])
        raise ConfigError(
            f"subgroup {str(spec)!r}: column {spec.column!r} has values that are "
            f"not numbers ({shown})",
            hint=f"band only numeric columns; use {spec.column!r} alone to group "
            "by its values as they are",
        )
    labels = pd.Series(np.full(len(values), MISSING, dtype=object), index=values.index)
    present = numbers.notna()
    if spec.bands.startswith("q"):
        categories = _quantile_labels(numbers, present, int(spec.bands[1:]), labels)
    else:
        cuts = spec.cut_points()
        edges = [-math.inf, *cuts, math.inf]
        categories = (
            [f"<{_fmt(cuts[0])}"]
            + [f"{_fmt(a)}-<{_fmt(b)}" for a, b in zip(cuts, cuts[1:], strict=False)]
            + [f">={_fmt(cuts[-1])}"]
        )
        cut = pd.cut(numbers[present], edges, right=False, labels=categories)
        labels[present] = cut.astype(str)
    if missing.any():
        categories = [*categories, MISSING]
    return pd.Series(
        pd.Categorical(labels, categories=categories, ordered=True), index=values.index
    )


def _quantile_labels(
    numbers: pd.Series, present: pd.Series, k: int, labels: pd.Series
) -> list[str]:
    """Fill labels[present] with "Qi [min, max]" quantile bands; return the band labels."""
    values = numbers[present]
    if not len(values):
        return []
    if values.nunique() < 2:
        codes = pd.Series(0, index=values.index)
    else:
        codes = pd.qcut(values, k, labels=False, duplicates="drop").astype(int)
    categories = []
    for i, code in enumerate(sorted(codes.unique())):
        inside = codes == code
        low, high = _fmt(values[inside].min(), 4), _fmt(values[inside].max(), 4)
        name = f"Q{i + 1} [{low}, {high}]"
        labels[inside[inside].index] = name
        categories.append(name)
    return categories


def subgroup_table(
    y: np.ndarray,
    probs: np.ndarray,
    groups: pd.Series,
    num_classes: int,
    *,
    column: str,
    n_boot: int,
    seed: int,
    names: Sequence[str] = ("auroc", "macro_f1", "acc", "brier", "ece"),
    op: float | None = None,
) -> pd.DataFrame:
    """Metrics with bootstrap intervals per subgroup (one row per group value).

    Rows follow the categories of a Categorical ``groups`` (band order), else group size
    (largest first). Columns: column, group, n, class_counts ("a/b/c"), each metric with
    _ci_low/_ci_high, cal_intercept and cal_slope (binary only), sensitivity, specificity, ppv
    and npv with intervals at threshold ``op`` (binary only), and small (n < SMALL_SUBGROUP).
    """
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if len(groups) != len(y):
        raise ValueError("groups must hold one value per patient")
    if op is not None and num_classes != 2:
        raise ConfigError("an operating threshold applies to binary tasks only")
    text = groups.astype(object).where(groups.notna(), MISSING).astype(str).to_numpy()
    order = _ordered_values(text)
    if isinstance(groups.dtype, pd.CategoricalDtype):  # band order, then anything else by size
        present = set(text)
        first = [str(c) for c in groups.cat.categories if str(c) in present]
        order = first + [v for v in order if v not in first]
    rows = []
    for value in order:
        mask = text == value
        yg, pg = y[mask], probs[mask]
        row: dict[str, Any] = {
            "column": column,
            "group": value,
            "n": int(mask.sum()),
            "class_counts": "/".join(str(int(c)) for c in np.bincount(yg, minlength=num_classes)),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class groups: undefined metrics become NaN
            cis = bootstrap_ci(yg, pg, num_classes, n=n_boot, seed=seed, names=tuple(names))
            for m in names:
                row[m] = _safe_metric(m, yg, pg, num_classes)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = cis.get(m, (math.nan, math.nan))
        if num_classes == 2:
            row["cal_intercept"], row["cal_slope"] = calibration_slope_intercept(yg == 1, pg[:, 1])
            if op is not None:
                point = operating_point(yg == 1, pg[:, 1], op)
                op_cis = operating_point_ci(yg == 1, pg[:, 1], op, n=n_boot, seed=seed)
                for m in ("sensitivity", "specificity", "ppv", "npv"):
                    row[m] = point[m]
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = op_cis.get(m, (math.nan, math.nan))
        row["small"] = row["n"] < SMALL_SUBGROUP
        rows.append(row)
    return pd.DataFrame(rows)


def _safe_metric(name: str, y: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    """metric_value, NaN where it is undefined."""
    try:
        return float(metric_value(name, y, probs, num_classes))
    except ValueError:
        return math.nan


def subgroup_gaps(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Largest between-subgroup difference per (column, metric).

    Compares subgroups with a finite value and n >= SMALL_SUBGROUP; when fewer than two such
    groups exist, all groups with a finite value (includes_small is then True). Best = highest,
    lowest for brier/ece/loss, closest to 0 (1) for cal_intercept (cal_slope). Columns column,
    metric, gap (max - min), best_group, worst_group, groups_compared, includes_small.
    """
    rows = []
    for column, part in table.groupby("column", sort=False):
        for m in metrics:
            if m not in part:
                raise KeyError(f"no metric {m!r} in the subgroup table")
            finite = part[np.isfinite(part[m].astype(float))]
            large = finite[finite["n"] >= SMALL_SUBGROUP]
            used = large if len(large) >= 2 else finite
            row: dict[str, Any] = {
                "column": column,
                "metric": m,
                "gap": math.nan,
                "best_group": None,
                "worst_group": None,
                "groups_compared": len(used),
                "includes_small": bool(len(used) and len(large) < 2),
            }
            if len(used) >= 2:
                values = used[m].astype(float).to_numpy()
                if m in _IDEAL:
                    badness = np.abs(values - _IDEAL[m])
                elif m in _LOWER_IS_BETTER:
                    badness = values
                else:
                    badness = -values
                row["gap"] = float(values.max() - values.min())
                row["best_group"] = used["group"].iloc[int(np.argmin(badness))]
                row["worst_group"] = used["group"].iloc[int(np.argmax(badness))]
            rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "column",
            "metric",
            "gap",
            "best_group",
            "worst_group",
            "groups_compared",
            "includes_small",
        ],
    )
