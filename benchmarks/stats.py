"""Statistics for a benchmark that compares classifiers by test AUROC, paired by seed.

Design
------
Every run of the benchmark (one method, one seed, one data regime) keeps its per-patient test
predictions (:class:`Preds`; :func:`save_predictions` / :func:`load_predictions` store them in
one long, gzip-compressed CSV that a resumable study can append to). Two methods are compared
on the same seeds, and within a seed on the same test patients, so every comparison is paired.

The estimand of a contrast "a vs b" is the mean over seeds of ``AUROC(a) - AUROC(b)``. Two
uncertainty statements are reported for it:

* :func:`seed_interval`: the classical paired t-interval / t-test over the per-seed
  differences. It treats each seed's test AUROC as exact, so it ignores the test-patient
  sampling variance; with small test pools and seeds that agree it is too narrow.
* :func:`hierarchical_bootstrap`: a two-stage bootstrap. Each replicate resamples the seeds
  with replacement and then, within each drawn seed, that seed's test patients with
  replacement; a and b see the same resampled patients (paired). The replicate is the mean
  over the drawn seeds of the metric difference. The percentile interval therefore carries
  both the seed variance and the test-patient variance. p-values use the ``(count + 1) /
  (n + 1)`` correction so that they are never 0.

Speed: a resample of patients is a multiplicity vector ``w`` (how often each patient was
drawn), and the AUROC of the resample is a weighted Mann-Whitney statistic. For each class
column the scores are sorted once per seed and tied scores grouped; for a chunk of replicates
the ``(chunk, N)`` weight matrix is gathered into score order, summed per tie group
(``np.add.reduceat``), and the weighted count of (positive, negative) pairs with the positive
ranked higher (ties count 1/2) comes from one cumulative sum over the groups. Nothing loops over
replicates in Python. Measured: 10 seeds x 2,000 test patients x 3 classes x 2,000 replicates
(one method's scores rounded to 2 decimals, so with many ties) take 6.0 s on one pinned core
(numpy 2.4, scipy 1.17, this repository's development machine); a custom
``metric`` falls back to an explicit Python loop over resamples, which is far slower.

AUROC (:func:`fast_auroc`) is computed exactly as omnifuse does with scikit-learn (binary:
``roc_auc_score(y, probs[:, 1])``; C > 2: macro one-vs-rest over classes ``0..C-1``), but
from average ranks. When a class is absent from ``y`` it returns NaN (scikit-learn >= 1.8
returns NaN with a warning, older versions raised; omnifuse's own ``auroc`` maps that to NaN).
A bootstrap resample that lacks a class gives NaN for that seed; such replicates are dropped
and the number of valid replicates is reported as ``n_valid``.

Multiplicity (:func:`contrast_table`): the family is the whole table. The one-sided
hierarchical-bootstrap p-values are Holm-adjusted (:func:`holm`), and each contrast also gets a
Bonferroni-adjusted percentile interval at level ``1 - (1 - level) / k`` from the same
replicates. Verdicts are given only where both adjusted statements support them (rule in
:func:`contrast_table`).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "Contrast",
    "Preds",
    "bootstrap_patients",
    "contrast_table",
    "fast_auroc",
    "hierarchical_bootstrap",
    "holm",
    "load_predictions",
    "markdown_table",
    "preds_from_frame",
    "save_predictions",
    "seed_interval",
    "weighted_auroc",
]

Metric = Callable[[np.ndarray, np.ndarray], float]

#: Replicates per vectorised chunk (a (chunk, N) float matrix per step; 256 x 2,000 = 4 MB).
_CHUNK = 256


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------


def _check_probs(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {probs.shape}")
    if y.shape != (probs.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({probs.shape[0]},)")
    if y.size and (y.min() < 0 or y.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    return y.astype(np.int64), probs


def fast_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Test AUROC as omnifuse computes it with scikit-learn, from average ranks.

    Binary (2 columns): the AUROC of ``probs[:, 1]`` for class 1. C > 2 columns: the
    unweighted mean over classes ``0..C-1`` of the one-vs-rest AUROC of ``probs[:, c]``.
    Each AUROC is the Mann-Whitney ``U / (n_pos * n_neg)`` with average ranks, so tied scores
    count 1/2 (identical to scikit-learn's trapezoidal ROC area). NaN when a class is absent
    from ``y`` (binary: either class; multi-class: any class); scikit-learn is undefined there.
    Labels outside ``0..C-1`` raise ValueError."""
    y, probs = _check_probs(y, probs)
    n, c = probs.shape
    counts = np.bincount(y, minlength=c)
    if (counts == 0).any():
        return math.nan
    cols = [1] if c == 2 else list(range(c))
    ranks = sps.rankdata(probs[:, cols], method="average", axis=0)
    aucs = []
    for j, col in enumerate(cols):
        pos = y == col
        n_pos = counts[col]
        n_neg = n - n_pos
        u = ranks[pos, j].sum() - n_pos * (n_pos + 1) / 2.0
        aucs.append(u / (n_pos * n_neg))
    return float(np.mean(aucs))


class _AurocPlan:
    """One test set's sorted scores per class column, for weighted AUROCs of many resamples."""

    def __init__(self, y: np.ndarray, probs: np.ndarray) -> None:
        y, probs = _check_probs(y, probs)
        self.n, self.c = probs.shape
        self.cols = [1] if self.c == 2 else list(range(self.c))
        self.columns: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        for col in self.cols:
            order = np.argsort(probs[:, col], kind="stable")
            scores = probs[order, col]
            pos = (y[order] == col).astype(float)
            new_group = np.ones(self.n, dtype=bool)
            new_group[1:] = scores[1:] != scores[:-1]
            starts = np.flatnonzero(new_group)
            self.columns.append((order, pos, None if starts.size == self.n else starts))

    def auroc(self, weights: np.ndarray) -> np.ndarray:
        """Weighted AUROC for each row of ``weights`` ((R, N) multiplicities) -> (R,).

        For one class column, with scores sorted ascending and tied scores grouped, P_g / Q_g
        are the weighted positives / negatives in group g: the AUROC is
        ``sum_g P_g * (sum_{h<g} Q_h + Q_g / 2) / (sum P * sum Q)``. NaN where a class has
        zero weight."""
        weights = np.asarray(weights, dtype=float)
        total = np.zeros(weights.shape[0])
        for order, pos, starts in self.columns:
            ws = weights[:, order]
            wp = ws * pos
            if starts is not None:
                ws = np.add.reduceat(ws, starts, axis=1)
                wp = np.add.reduceat(wp, starts, axis=1)
            wq = ws - wp
            below = np.cumsum(wq, axis=1)
            below -= 0.5 * wq
            num = np.einsum("ij,ij->i", wp, below)
            den = wp.sum(axis=1) * wq.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = num / den
            auc[den == 0] = math.nan
            total += auc
        return total / len(self.columns)


def weighted_auroc(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray | float:
    """AUROC of a resample given as multiplicities: ``weights`` (N,) or (R, N), one weight per
    patient (e.g. how often a bootstrap drew it). With integer weights this equals
    :func:`fast_auroc` on the explicitly repeated rows. Returns a float for (N,) weights and an
    (R,) array for (R, N); NaN where a class has zero total weight."""
    weights = np.asarray(weights, dtype=float)
    plan = _AurocPlan(y, probs)
    if weights.ndim == 1:
        return float(plan.auroc(weights[None, :])[0])
    return plan.auroc(weights)


# --------------------------------------------------------------------------------------------
# Multiplicity and the seed-level t statistics
# --------------------------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``, which
    is monotone in the raw p and never below it. NaN entries stay NaN and do not count in m."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    if m == 0:
        return out.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def seed_interval(diffs: np.ndarray, level: float = 0.95, margin: float = 0.0) -> dict[str, float]:
    """Paired t statistics over per-seed differences (a - b, one number per seed).

    Returns ``mean``, ``median``, ``sd`` (ddof 1), ``n``, the two-sided t-interval ``low`` /
    ``high`` at ``level``, ``p_two`` (H0: mean difference 0) and ``p_one`` (H0: diff <=
    -margin against H1: diff > -margin; margin 0 is plain superiority). NaN differences (a
    seed whose test set lacks a class) are dropped. With n < 2 the interval and p-values are
    NaN. With zero spread (every seed gives the same difference) the interval is that point,
    and the p-values are the limits of the t-test: 0 or 1 (``p_two`` 1 when the difference is
    0 and 0 otherwise; ``p_one`` 0 when ``diff > -margin`` and 1 otherwise)."""
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[~np.isnan(d)]
    n = d.size
    out = {
        "mean": math.nan,
        "median": math.nan,
        "sd": math.nan,
        "n": float(n),
        "low": math.nan,
        "high": math.nan,
        "p_two": math.nan,
        "p_one": math.nan,
    }
    if n == 0:
        return out
    mean = float(d.mean())
    out["mean"] = mean
    out["median"] = float(np.median(d))
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out["sd"] = sd
    df = n - 1
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + level / 2.0, df)) * se
    out["low"], out["high"] = mean - half, mean + half
    if se > 0:
        out["p_two"] = float(2.0 * sps.t.sf(abs(mean) / se, df))
        out["p_one"] = float(sps.t.sf((mean + margin) / se, df))
    else:
        out["p_two"] = 1.0 if mean == 0 else 0.0
        out["p_one"] = 0.0 if mean > -margin else 1.0
    return out


# --------------------------------------------------------------------------------------------
# Predictions and the paired bootstraps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Preds:
    """One method's test predictions of one seed."""

    ids: np.ndarray  # (N,) patient ids (str or int), unique
    y: np.ndarray  # (N,) int labels
    probs: np.ndarray  # (N, C) probabilities

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        y = np.asarray(self.y)
        probs = np.asarray(self.probs, dtype=float)
        if ids.ndim != 1 or y.shape != ids.shape or probs.ndim != 2 or len(probs) != len(ids):
            raise ValueError(
                f"Preds shapes disagree: ids {ids.shape}, y {y.shape}, "
                f"probs {probs.shape} (want (N,), (N,), (N, C))"
            )
        if probs.shape[1] < 2:
            raise ValueError(f"probs need at least 2 columns, got {probs.shape[1]}")
        if y.size and (y.min() < 0 or y.max() >= probs.shape[1]):
            raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "y", y.astype(np.int64))
        object.__setattr__(self, "probs", probs)


def _align(a: Preds, b: Preds, where: str) -> Preds:
    """b reordered to a's patient order; ValueError unless both cover the same unique ids
    with the same labels and class count. Ids are matched by their string form."""
    ka = a.ids.astype(str)
    kb = b.ids.astype(str)
    for name, k in (("a", ka), ("b", kb)):
        if np.unique(k).size != k.size:
            raise ValueError(f"{where}: method {name} has duplicate patient ids")
    if ka.size != kb.size:
        raise ValueError(
            f"{where}: the methods have {ka.size} and {kb.size} test patients; "
            "paired comparisons need the same patients"
        )
    index = pd.Index(kb).get_indexer(ka)
    if (index < 0).any():
        missing = ka[index < 0][:3].tolist()
        raise ValueError(
            f"{where}: patient ids of a missing from b (e.g. {missing}); paired "
            "comparisons need the same patients"
        )
    if a.probs.shape[1] != b.probs.shape[1]:
        raise ValueError(
            f"{where}: the methods have {a.probs.shape[1]} and "
            f"{b.probs.shape[1]} probability columns"
        )
    aligned = Preds(ids=b.ids[index], y=b.y[index], probs=b.probs[index])
    if not np.array_equal(a.y, aligned.y):
        raise ValueError(f"{where}: the methods disagree on some patients' labels")
    return aligned


def _pairs(a: Sequence[Preds], b: Sequence[Preds]) -> list[tuple[Preds, Preds]]:
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} seeds and b {len(b)}; paired by seed they must match")
    if not a:
        raise ValueError("no seeds to compare")
    return [
        (pa, _align(pa, pb, f"seed index {s}")) for s, (pa, pb) in enumerate(zip(a, b, strict=True))
    ]


def _safe(metric: Metric, y: np.ndarray, probs: np.ndarray) -> float:
    try:
        return float(metric(y, probs))
    except ValueError:
        return math.nan


def _resample_diffs(
    a: Preds, b: Preds, count: int, rng: np.random.Generator, metric: Metric
) -> np.ndarray:
    """``count`` paired patient resamples of one seed -> metric(a) - metric(b) for each.

    The random draws are the same for the fast (weighted) and the generic path: chunks of
    ``(chunk, N)`` uniform indices."""
    n = len(a.ids)
    out = np.empty(count)
    fast = metric is fast_auroc
    if fast:
        plan_a, plan_b = _AurocPlan(a.y, a.probs), _AurocPlan(b.y, b.probs)
    for start in range(0, count, _CHUNK):
        r = min(_CHUNK, count - start)
        idx = rng.integers(0, n, size=(r, n))
        if fast:
            flat = (idx + (np.arange(r) * n)[:, None]).ravel()
            w = np.bincount(flat, minlength=r * n).reshape(r, n)
            out[start : start + r] = plan_a.auroc(w) - plan_b.auroc(w)
        else:
            for i in range(r):
                out[start + i] = _safe(metric, a.y[idx[i]], a.probs[idx[i]]) - _safe(
                    metric, b.y[idx[i]], b.probs[idx[i]]
                )
    return out


def _percentile(reps: np.ndarray, level: float) -> tuple[float, float]:
    if reps.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(reps, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(low), float(high)


def _tail_p(reps: np.ndarray, threshold: float) -> tuple[float, float]:
    """(fraction <= threshold, fraction >= threshold), each as (count + 1) / (n + 1)."""
    n = reps.size
    if n == 0:
        return math.nan, math.nan
    return (
        float((np.count_nonzero(reps <= threshold) + 1) / (n + 1)),
        float((np.count_nonzero(reps >= threshold) + 1) / (n + 1)),
    )


def _hierarchical(
    a: Sequence[Preds], b: Sequence[Preds], n_boot: int, seed: int, metric: Metric
) -> tuple[float, np.ndarray, int]:
    """(point estimate, all n_boot replicates with NaN for invalid ones, number of seeds)."""
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    pairs = _pairs(a, b)
    s = len(pairs)
    point = float(
        np.mean([_safe(metric, pa.y, pa.probs) - _safe(metric, pb.y, pb.probs) for pa, pb in pairs])
    )
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, s, size=(n_boot, s))
    slots = np.empty((n_boot, s))
    for k, (pa, pb) in enumerate(pairs):
        where = drawn == k
        count = int(where.sum())
        if count:
            slots[where] = _resample_diffs(pa, pb, count, rng, metric)
    return point, slots.mean(axis=1), s


def hierarchical_bootstrap(
    a: Sequence[Preds],
    b: Sequence[Preds],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    margin: float = 0.0,
    metric: Metric = fast_auroc,
) -> dict[str, float]:
    """Two-stage (seeds, then test patients) paired bootstrap of mean_s metric(a_s) - metric(b_s).

    ``a[s]`` / ``b[s]``: the two methods' predictions for seed s, same seeds in the same
    order; within a seed both must cover the same patient ids (any order: b is aligned to a by
    id, matched on the ids' string form) with the same labels, else ValueError. Each replicate
    draws S seeds with replacement and, for each drawn seed independently, N of its test
    patients with replacement, the same patients for a and b; the replicate is the mean over
    the drawn seeds of the metric difference.

    Returns ``diff`` (point estimate on the original data), ``low`` / ``high`` (percentile
    interval at ``level``), ``p_one`` (fraction of replicates with diff <= -margin, as
    (count + 1) / (n_valid + 1): the one-sided p for H0 diff <= -margin), ``p_two`` (min(1,
    2 min(frac <= 0, frac >= 0)) with the same correction), ``n_boot``, ``n_valid``
    (replicates in which no drawn seed's resample lacked a class) and ``seeds``.
    ``metric`` other than :func:`fast_auroc` is called on explicit resamples (slow)."""
    point, reps, s = _hierarchical(a, b, n_boot, seed, metric)
    valid = reps[~np.isnan(reps)]
    return _summary(point, valid, n_boot, level, margin) | {"seeds": float(s)}


def _summary(
    point: float, valid: np.ndarray, n_boot: int, level: float, margin: float
) -> dict[str, float]:
    low, high = _percentile(valid, level)
    le_margin, _ = _tail_p(valid, -margin)
    le_zero, ge_zero = _tail_p(valid, 0.0)
    return {
        "diff": point,
        "low": low,
        "high": high,
        "p_one": le_margin,
        "p_two": min(1.0, 2.0 * min(le_zero, ge_zero)),
        "n_boot": float(n_boot),
        "n_valid": float(valid.size),
    }


def bootstrap_patients(
    a: Preds,
    b: Preds,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    metric: Metric = fast_auroc,
) -> dict[str, float]:
    """Paired bootstrap over the test patients of a single seed: metric(a) - metric(b).

    Returns ``diff``, ``low`` / ``high`` (percentile interval at ``level``), ``p_two`` (as in
    :func:`hierarchical_bootstrap`), ``p_one`` (H0 diff <= 0), ``n_boot`` and ``n_valid``."""
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    ((pa, pb),) = _pairs([a], [b])
    point = _safe(metric, pa.y, pa.probs) - _safe(metric, pb.y, pb.probs)
    reps = _resample_diffs(pa, pb, n_boot, np.random.default_rng(seed), metric)
    return _summary(point, reps[~np.isnan(reps)], n_boot, level, 0.0)


# --------------------------------------------------------------------------------------------
# The contrast table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contrast:
    """One pre-registered comparison of method a against method b."""

    name: str  # e.g. "imputation with unlabeled patients"
    group: str  # free text shown in tables, e.g. "shared, 300 labelled + 3,000 unlabeled"
    a: str  # method name
    b: str  # method name
    kind: str  # "superiority" or "noninferiority"
    goal: float = 0.0  # superiority: the smallest difference the goal asks for (e.g. 0.02)
    margin: float = 0.0  # noninferiority: the margin (e.g. 0.01): H0 diff <= -margin

    def __post_init__(self) -> None:
        if self.kind not in ("superiority", "noninferiority"):
            raise ValueError(
                f"contrast {self.name!r}: kind must be 'superiority' or "
                f"'noninferiority', got {self.kind!r}"
            )
        if self.margin < 0:
            raise ValueError(f"contrast {self.name!r}: margin must be >= 0")

    @property
    def null_margin(self) -> float:
        """The m of H0: diff <= -m (0 for superiority)."""
        return self.margin if self.kind == "noninferiority" else 0.0


COLUMNS = [
    "name",
    "group",
    "a",
    "b",
    "kind",
    "goal",
    "margin",
    "seeds",
    "mean_a",
    "mean_b",
    "diff",
    "median",
    "seed_low",
    "seed_high",
    "boot_low",
    "boot_high",
    "adj_low",
    "adj_high",
    "p_seed",
    "p_boot",
    "p_holm",
    "verdict",
]


def _verdict(row: dict, alpha: float) -> str:
    m = row["margin"] if row["kind"] == "noninferiority" else 0.0
    shown = (row["p_holm"] < alpha) and (row["adj_low"] > -m)  # False for NaN
    worse = row["adj_high"] < -m
    if row["kind"] == "superiority":
        if shown:
            return "met" if row["diff"] >= row["goal"] else "better, below goal"
        return "worse" if row["diff"] < 0 and worse else "not shown"
    if shown:
        return "non-inferior"
    return "worse" if worse else "not shown"


def contrast_table(
    contrasts: Sequence[Contrast],
    predictions: Callable[[Contrast, str], list[Preds]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per contrast: per-seed t statistics, the hierarchical bootstrap, and verdicts.

    ``predictions(contrast, method)`` returns that method's per-seed predictions for the
    contrast (same seeds, same order for a and b). Per contrast: ``mean_a`` / ``mean_b`` (mean
    per-seed AUROC), ``diff`` (mean over seeds of the per-seed difference, the bootstrap's
    point estimate), ``median``, ``seed_low`` / ``seed_high`` (t-interval over seeds at
    ``level``), ``boot_low`` / ``boot_high`` (hierarchical-bootstrap percentile interval at
    ``level``), ``adj_low`` / ``adj_high`` (the same replicates' interval at the Bonferroni
    level ``1 - (1 - level) / k``, k = number of contrasts), ``p_seed`` (one-sided seed t-test)
    and ``p_boot`` (one-sided hierarchical bootstrap), both for H0 diff <= 0 (superiority) or
    diff <= -margin (noninferiority), and ``p_holm`` (Holm over the table's ``p_boot``).
    Contrast i's bootstrap uses the random seed ``seed + i``.

    Verdict, with alpha = 1 - level (0.05), and m = margin for noninferiority, 0 otherwise. A
    claim is "shown" only when both adjusted statements support it: ``p_holm < alpha`` and
    ``adj_low > -m``. (They usually agree; the interval is two-sided, so it is the stricter one
    near the boundary.)

    * superiority: "met" if shown and ``diff >= goal``; "better, below goal" if shown and
      ``diff < goal``; "worse" if ``diff < 0`` and ``adj_high < 0``; "not shown" otherwise.
    * noninferiority: "non-inferior" if shown; "worse" if ``adj_high < -margin``; "not shown"
      otherwise.
    """
    contrasts = list(contrasts)
    k = len(contrasts)
    alpha = 1.0 - level
    adj_level = 1.0 - alpha / max(k, 1)
    rows = []
    for i, c in enumerate(contrasts):
        pa, pb = predictions(c, c.a), predictions(c, c.b)
        m = c.null_margin
        point, reps, s = _hierarchical(pa, pb, n_boot, seed + i, fast_auroc)
        valid = reps[~np.isnan(reps)]
        boot = _summary(point, valid, n_boot, level, m)
        adj_low, adj_high = _percentile(valid, adj_level)
        auc_a = np.array([fast_auroc(p.y, p.probs) for p in pa])
        auc_b = np.array([fast_auroc(p.y, p.probs) for p in pb])
        seeds = seed_interval(auc_a - auc_b, level=level, margin=m)
        rows.append(
            {
                "name": c.name,
                "group": c.group,
                "a": c.a,
                "b": c.b,
                "kind": c.kind,
                "goal": c.goal,
                "margin": c.margin,
                "seeds": s,
                "mean_a": float(np.nanmean(auc_a)) if np.isfinite(auc_a).any() else math.nan,
                "mean_b": float(np.nanmean(auc_b)) if np.isfinite(auc_b).any() else math.nan,
                "diff": point,
                "median": seeds["median"],
                "seed_low": seeds["low"],
                "seed_high": seeds["high"],
                "boot_low": boot["low"],
                "boot_high": boot["high"],
                "adj_low": adj_low,
                "adj_high": adj_high,
                "p_seed": seeds["p_one"],
                "p_boot": boot["p_one"],
                "p_holm": math.nan,
                "verdict": "",
            }
        )
    for row, p in zip(rows, holm([r["p_boot"] for r in rows]), strict=True):
        row["p_holm"] = p
        row["verdict"] = _verdict(row, alpha)
    return pd.DataFrame(rows, columns=COLUMNS)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

SIGNED_COLUMNS = {
    "diff",
    "median",
    "seed_low",
    "seed_high",
    "boot_low",
    "boot_high",
    "adj_low",
    "adj_high",
}


def _is_p_column(name: str) -> bool:
    return name == "p" or name.startswith("p_")


def _cell(value: object, column: str, digits: int) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if _is_p_column(column):
            return f"{float(value):.3g}"
        if column in SIGNED_COLUMNS:
            return f"{float(value):+.{digits}f}"
        return f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table of ``frame`` (no ``tabulate``).

    Floats get ``digits`` decimals, signed (``+0.0123``) in the difference / interval columns
    (``diff``, ``median``, ``seed_low`` ... ``adj_high``); p-value columns (``p`` and ``p_*``)
    get 3 significant digits; NaN is an empty cell. Numeric columns are right-aligned."""
    columns = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for values in frame.itertuples(index=False, name=None):
        cells = [_cell(v, col, digits) for v, col in zip(values, columns, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Per-patient predictions on disk
# --------------------------------------------------------------------------------------------

_RESERVED = ("ids", "y", "probs")
_P_COLUMN = re.compile(r"^p(\d+)$")


def _long_frame(rows: Iterable[dict]) -> pd.DataFrame:
    parts = []
    for row in rows:
        keys = {k: v for k, v in row.items() if k not in _RESERVED}
        for k in keys:
            if k in ("id", "y") or _P_COLUMN.match(str(k)):
                raise ValueError(f"key column {k!r} clashes with the prediction columns")
        preds = Preds(ids=row["ids"], y=row["y"], probs=row["probs"])
        data: dict[str, object] = {k: [v] * len(preds.ids) for k, v in keys.items()}
        data["id"] = preds.ids.astype(str)
        data["y"] = preds.y
        rounded = np.round(preds.probs, 5)
        for j in range(rounded.shape[1]):
            data[f"p{j}"] = rounded[:, j]
        parts.append(pd.DataFrame(data))
    if not parts:
        return pd.DataFrame()
    return _order(pd.concat(parts, ignore_index=True, sort=False))


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    """Key columns first (first-seen order), then id, y, p0, p1, ..."""
    pcols = sorted((c for c in frame.columns if _P_COLUMN.match(str(c))), key=lambda c: int(c[1:]))
    keys = [c for c in frame.columns if c not in pcols and c not in ("id", "y")]
    return frame[keys + ["id", "y"] + pcols]


def _csv_member(frame: pd.DataFrame, header: bool) -> bytes:
    text = frame.to_csv(index=False, header=header, lineterminator="\n")
    return gzip.compress(text.encode("utf-8"))


def _read_header(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        first = handle.readline()
    return pd.read_csv(io.StringIO(first), nrows=0).columns.tolist()


def save_predictions(rows: Iterable[dict], path: Path) -> None:
    """Store runs' per-patient test predictions in one gzip-compressed long CSV.

    Each row dict holds key entries (str / int / float: e.g. dataset, regime, method, seed)
    and ``ids``, ``y``, ``probs`` (one run's test predictions). One line per patient: the key
    columns, ``id``, ``y``, ``p0`` .. ``p{C-1}`` (rounded to 5 decimals); runs with fewer
    classes leave the extra p columns empty.

    If ``path`` exists the runs are appended as a new gzip member (pandas reads concatenated
    members as one file), so a resumable study can add runs as they finish. When the new runs
    need columns the file's header lacks (a new key, more classes), the file is rewritten with
    the union of the columns (written to a temporary file, then renamed). One writer at a
    time: this is not safe for concurrent processes."""
    path = Path(path)
    new = _long_frame(rows)
    if new.empty:
        return
    if path.exists() and path.stat().st_size > 0:
        header = _read_header(path)
        if set(new.columns) <= set(header):
            member = _csv_member(new.reindex(columns=header), header=False)
            with open(path, "ab") as handle:
                handle.write(member)
                handle.flush()
                os.fsync(handle.fileno())
            return
        new = _order(pd.concat([load_predictions(path), new], ignore_index=True, sort=False))
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as handle:
        handle.write(_csv_member(new, header=True))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_predictions(path: Path) -> pd.DataFrame:
    """The long predictions table written by :func:`save_predictions` (ids as str; only empty
    cells are NaN, so an id or key such as "NA" stays a string)."""
    return pd.read_csv(
        path, dtype={"id": str}, keep_default_na=False, na_values=[""], compression="gzip"
    )


def preds_from_frame(frame: pd.DataFrame) -> Preds:
    """:class:`Preds` from the rows of one run of :func:`load_predictions`' table: the p
    columns in class order, all-NaN columns (another run's extra classes) dropped."""
    pcols = sorted((c for c in frame.columns if _P_COLUMN.match(str(c))), key=lambda c: int(c[1:]))
    pcols = [c for c in pcols if frame[c].notna().any()]
    expected = [f"p{j}" for j in range(len(pcols))]
    if pcols != expected:
        raise ValueError(f"probability columns {pcols} are not p0..p{len(pcols) - 1}")
    probs = frame[pcols].to_numpy(dtype=float)
    if np.isnan(probs).any():
        raise ValueError("some probabilities are missing in this run's rows")
    return Preds(
        ids=frame["id"].astype(str).to_numpy(), y=frame["y"].to_numpy(dtype=np.int64), probs=probs
    )
