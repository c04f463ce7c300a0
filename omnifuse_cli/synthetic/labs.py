"""Lab panels: the analyte table (reference ranges, units' decimals, organ groups), how disease
shifts the signal-bearing analytes, correlated noise and unmeasured values, and the one text
format both lab CSVs share."""

from __future__ import annotations

import math

import numpy as np

from omnifuse_cli.synthetic.spec import CohortSpec

ANALYTE_MISSING_RATE = 0.03
LAB_ONSET = 4.0  # labs are abnormal already at mild severity: 1 - (1 - s)^LAB_ONSET

# name, reference mean (median when log-normal), sd (log-sd when log-normal), decimals,
# log-normal, correlation group. Signal-bearing analytes come first so small panels keep them.
_ANALYTES: tuple[tuple[str, float, float, int, bool, str], ...] = (
    ("WBC", 6.5, 1.6, 2, False, "inflammation"),
    ("PLT", 230.0, 55.0, 0, False, "coagulation"),
    ("ALT", 24.0, 0.45, 1, True, "liver"),
    ("AST", 23.0, 0.35, 1, True, "liver"),
    ("ALB", 43.0, 3.8, 1, False, "liver"),
    ("TBIL", 12.0, 0.4, 1, True, "liver"),
    ("CRP", 3.0, 0.8, 2, True, "inflammation"),
    ("NEUT", 4.0, 1.2, 2, False, "inflammation"),
    ("LYM", 2.0, 0.6, 2, False, "inflammation"),
    ("HGB", 140.0, 14.0, 0, False, ""),
    ("PCT", 0.05, 0.5, 3, True, "inflammation"),
    ("CREA", 75.0, 15.0, 1, False, "kidney"),
    ("BUN", 5.0, 1.3, 2, False, "kidney"),
    ("GLU", 5.2, 0.7, 2, False, ""),
    ("K", 4.2, 0.35, 2, False, ""),
    ("NA", 140.0, 2.5, 1, False, ""),
    ("CL", 103.0, 2.5, 1, False, ""),
    ("CA", 2.35, 0.1, 2, False, ""),
    ("PT", 12.0, 0.8, 1, False, "coagulation"),
    ("FIB", 3.0, 0.6, 2, False, "coagulation"),
    ("GGT", 30.0, 0.5, 1, True, "liver"),
    ("ALP", 80.0, 22.0, 1, False, "liver"),
    ("LDH", 180.0, 35.0, 1, False, ""),
    ("TC", 4.6, 0.8, 2, False, ""),
    ("TG", 1.4, 0.4, 2, True, ""),
    ("AFP", 4.0, 0.5, 2, True, ""),
)
_EXTRA_ANALYTE = (50.0, 10.0, 1, False, "")  # X27, X28, ...: anonymous, signal-free
_GROUP_LOADING = 0.55  # share of an analyte's noise its organ group has in common

# Loadings (SD units) of the signal analytes on the "abnormal" and "advanced" lab drivers.
_LAB_LOADINGS: dict[str, tuple[float, float]] = {
    "WBC": (0.6, 0.0),
    "PLT": (0.0, -0.5),
    "ALT": (1.0, 0.0),
    "AST": (0.8, 0.2),
    "ALB": (-0.4, -0.3),
    "TBIL": (0.2, 0.5),
    "CRP": (0.8, 0.1),
}


def lab_drivers(severity: np.ndarray) -> np.ndarray:
    """(n, 2) for severities (n,): how abnormal a panel is (early, saturating) and how
    advanced (linear)."""
    return np.stack([1 - (1 - severity) ** LAB_ONSET, severity], axis=1)


def analyte_names(labs_dim: int) -> list[str]:
    known = [a[0] for a in _ANALYTES]
    return known[:labs_dim] + [f"X{j + 1}" for j in range(len(known), labs_dim)]


def lab_values(
    spec: CohortSpec, severity: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """(names, values) for the severity (n,) each patient's labs show: values (n, labs_dim) in
    physical units, NaN for a missing analyte. The draws do not depend on ``severity``."""
    drivers = lab_drivers(severity)
    names = analyte_names(spec.labs_dim)
    n, dim = len(severity), spec.labs_dim
    table = {a[0]: a[1:] for a in _ANALYTES}
    loadings = np.zeros((dim, drivers.shape[1]))
    for name, row in _LAB_LOADINGS.items():
        if name in names:
            loadings[names.index(name)] = row

    groups = [table.get(name, _EXTRA_ANALYTE)[4] for name in names]
    shared = {g: rng.standard_normal(n) for g in sorted(set(groups)) if g}
    z = rng.standard_normal((n, dim))
    for j, group in enumerate(groups):
        if group:
            z[:, j] = math.sqrt(1 - _GROUP_LOADING**2) * z[:, j] + _GROUP_LOADING * shared[group]
    personal = np.clip(1 + 0.25 * rng.standard_normal(n), 0.2, None)  # how marked a case is
    z = spec.labs_noise * z + spec.labs_signal * personal[:, None] * (drivers @ loadings.T)

    values = np.empty((n, dim))
    for j, name in enumerate(names):
        mean, sd, _, lognormal, _ = table.get(name, _EXTRA_ANALYTE)
        if lognormal:  # enzymes and inflammation markers are right-skewed
            values[:, j] = mean * np.exp(sd * z[:, j])
        else:
            # Concentrations cannot be negative; the floor only bites at extreme noise levels.
            values[:, j] = np.maximum(mean + sd * z[:, j], 0.02 * mean)
    missing = rng.random((n, dim)) < ANALYTE_MISSING_RATE
    all_missing = np.flatnonzero(missing.all(axis=1))
    missing[all_missing, rng.integers(0, dim, len(all_missing))] = False
    values[missing] = np.nan
    return names, values


def format_labs(values: np.ndarray, names: list[str]) -> list[list[str]]:
    """Rows of ``values`` (n, dim) as written in both CSVs: one format per column instead of a
    look-up per value (a million patients have twenty million values)."""
    decimals = {a[0]: a[3] for a in _ANALYTES}
    columns = []
    for j, name in enumerate(names):
        digits = decimals.get(name, _EXTRA_ANALYTE[2])
        column = values[:, j].tolist()
        if digits == 0:
            columns.append(["" if v != v else str(int(round(v))) for v in column])
        else:
            pattern = f"{{:.{digits}f}}"
            columns.append(["" if v != v else _trim(pattern.format(v)) for v in column])
    return [list(row) for row in zip(*columns, strict=True)] if columns else []


def _trim(text: str) -> str:
    text = text.rstrip("0")
    return text + "0" if text.endswith(".") else text
