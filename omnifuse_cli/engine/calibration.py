"""Calibration of a classifier's probabilities: temperature scaling, and the calibration
intercept and slope that say how far the probabilities are from the observed risk.

Conventions (shared by thresholds.py, conformal.py and subgroups.py): ``y`` holds class indices
0..C-1, ``probs`` is (N, C), ``log_probs`` is (N, C) log-probabilities. For binary or
one-vs-rest work ``y_pos`` is a bool array and ``p`` (``score``) the probability of the positive
class. Everything works on arrays, so it serves ``evaluate``, ``cv`` and ``report`` alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import expit, log_softmax, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss

from omnifuse_cli.engine.metrics import expected_calibration_error
from omnifuse_cli.errors import ConfigError

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
        name = class_name(c, class_names)
        a, b = calibration_slope_intercept(y == c, probs[:, c])
        out[f"cal_intercept_{name}"] = a
        out[f"cal_slope_{name}"] = b
    return out


def class_name(c: int, class_names: Sequence[str] | None) -> str:
    """The name of class c: class_names[c], else its index."""
    return str(class_names[c]) if class_names is not None else str(c)
