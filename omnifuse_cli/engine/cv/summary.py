"""Cross-validation results: each fold fit's record and the pooled tables read back from the fold
files (out-of-fold metrics with bootstrap intervals, per-fold mean and SD, missing patterns,
confusion matrices, paired differences from the base model, clinical outputs)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.engine import runs
from omnifuse_cli.engine.cv.folds import fold_dir
from omnifuse_cli.engine.cv.request import BASE, FOLD_DONE, CVRequest
from omnifuse_cli.engine.evaluation import pattern_table
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.metrics import (
    bootstrap_draws,
    confusion,
    full_metrics,
    percentile_interval,
)
from omnifuse_cli.engine.outputs import ClinicalOutputs, clinical_outputs, read_subgroups
from omnifuse_cli.engine.posthoc import positive_index

METRICS = ("acc", "macro_f1", "balanced_acc", "auroc", "auprc", "loss", "ece", "brier")


@dataclass
class FoldResult:
    variant: str
    repeat: int
    fold: int
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int
    metrics: dict[str, float]  # on the fold's test patients
    seconds: float
    resumed: bool = False  # read from an earlier, interrupted invocation

    @property
    def label(self) -> str:
        return f"{self.variant} rep {self.repeat} fold {self.fold}"


@dataclass
class CVResult:
    out_dir: Path
    n_patients: int
    class_names: list[str]
    variants: list[str]
    metrics: pd.DataFrame  # variant, metric, value, ci_low, ci_high, fold_mean, fold_sd
    patterns: pd.DataFrame  # variant, present, n, acc, macro_f1, auroc
    confusion: dict[str, np.ndarray]  # per variant, rows = true class (summed over repeats)
    differences: pd.DataFrame  # variant, metric, difference, ci_low, ci_high, fold_mean, fold_sd
    folds: list[FoldResult]
    encode_seconds: float
    seconds: float
    refit_dir: Path | None
    notes: list[str] = field(default_factory=list)


def labelled_only(cohort: Cohort) -> Cohort:
    """The labelled patients (the pooled results and every metric are theirs)."""
    assert cohort.labels is not None
    if (cohort.labels >= 0).all():
        return cohort
    return cohort.subset(np.flatnonzero(cohort.labels >= 0))


def read_oof(out_dir: Path, request: CVRequest) -> pd.DataFrame:
    """Every fold's test predictions: one row per variant, repeat and patient."""
    frames = []
    for variant in request.all_variants:
        for r in range(1, request.repeats + 1):
            for k in range(1, request.folds + 1):
                path = fold_dir(out_dir, variant.name, r, k) / runs.PREDICTIONS
                frames.append(
                    pd.read_csv(path, dtype={"id": str, "pred": str}, keep_default_na=False)
                )
    return pd.concat(frames, ignore_index=True)


def summarise(request: CVRequest, cohort: Cohort) -> dict[str, Any]:
    """Pooled and per-fold metrics, patterns, confusion matrices and paired differences, from
    the fold files; written to the cv folder."""
    assert cohort.labels is not None
    out_dir = Path(request.out_dir)
    c = request.num_classes
    y = cohort.labels
    oof = read_oof(out_dir, request)
    position = {pid: i for i, pid in enumerate(cohort.ids)}
    prob_cols = [f"prob_{k}" for k in range(c)]
    names = [v.name for v in request.all_variants]
    pooled: dict[str, np.ndarray] = {}  # variant -> (R, N, C)
    decided: dict[str, np.ndarray] = {}  # variant -> (R, N): each fold model's decisions
    for name in names:
        probs = np.zeros((request.repeats, len(y), c))
        preds = np.zeros((request.repeats, len(y)), dtype=np.int64)
        part = oof[oof["variant"] == name]
        for r in range(1, request.repeats + 1):
            rows = part[part["repeat"] == r]
            idx = rows["id"].map(position).to_numpy()
            probs[r - 1, idx] = rows[prob_cols].to_numpy(dtype=float)
            preds[r - 1, idx] = rows["pred"].astype(int).to_numpy()
        pooled[name] = probs
        decided[name] = preds
    order = pd.DataFrame(
        {
            "v": oof["variant"].map({n: i for i, n in enumerate(names)}),
            "r": oof["repeat"],
            "p": oof["id"].map(position),
        }
    )
    write_csv(out_dir / runs.PREDICTIONS, oof.loc[order.sort_values(["v", "r", "p"]).index])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folds and patterns may miss a class: metrics say n/a
        values = {}
        for n in names:
            per_repeat = [
                full_metrics(y, p, c, d) for p, d in zip(pooled[n], decided[n], strict=True)
            ]
            values[n] = {m: float(np.mean([v[m] for v in per_repeat])) for m in METRICS}
        fold_rows = []
        for n in names:
            for r in range(1, request.repeats + 1):
                for k in range(1, request.folds + 1):
                    part = oof[(oof["variant"] == n) & (oof["repeat"] == r) & (oof["fold"] == k)]
                    yk = part["label"].to_numpy(dtype=np.int64)
                    scores = full_metrics(
                        yk,
                        part[prob_cols].to_numpy(dtype=float),
                        c,
                        part["pred"].astype(int).to_numpy(),
                    )
                    done = json.loads((fold_dir(out_dir, n, r, k) / FOLD_DONE).read_text())
                    fold_rows.append(
                        {
                            "variant": n,
                            "repeat": r,
                            "fold": k,
                            "n": len(part),
                            **{key: scores[key] for key in METRICS},
                            "best_epoch": done["best_epoch"],
                            "seconds": round(done["seconds"], 3),
                        }
                    )
        fold_metrics = pd.DataFrame(fold_rows)
        draws = (
            bootstrap_draws(
                y,
                [pooled[n] for n in names],
                c,
                n=request.bootstrap,
                seed=request.base.train.seed,
                names=METRICS,
                preds=[decided[n] for n in names],
            )
            if request.bootstrap > 0
            else None
        )
        metric_rows, diff_rows, pattern_frames = [], [], []
        confusions: dict[str, np.ndarray] = {}
        for s, n in enumerate(names):
            mine = fold_metrics[fold_metrics["variant"] == n]
            for j, m in enumerate(METRICS):
                low, high = (
                    percentile_interval(draws[:, s, j]) if draws is not None else (np.nan, np.nan)
                )
                metric_rows.append(
                    {
                        "variant": n,
                        "metric": m,
                        "value": values[n][m],
                        "ci_low": low,
                        "ci_high": high,
                        "fold_mean": float(mine[m].mean()),
                        "fold_sd": _sd(mine[m].to_numpy(dtype=float)),
                    }
                )
                if s == 0:
                    continue
                base_folds = fold_metrics[fold_metrics["variant"] == names[0]]
                per_fold = mine[m].to_numpy(dtype=float) - base_folds[m].to_numpy(dtype=float)
                low, high = (
                    percentile_interval(draws[:, s, j] - draws[:, 0, j])
                    if draws is not None
                    else (np.nan, np.nan)
                )
                diff_rows.append(
                    {
                        "variant": n,
                        "metric": m,
                        "difference": values[n][m] - values[names[0]][m],
                        "ci_low": low,
                        "ci_high": high,
                        "fold_mean": float(np.nanmean(per_fold)),
                        "fold_sd": _sd(per_fold),
                    }
                )
            y_all = np.tile(y, request.repeats)
            probs_all = pooled[n].reshape(-1, c)
            patterns = pattern_table(
                np.tile(cohort.present, (request.repeats, 1)),
                cohort.names,
                y_all,
                probs_all,
                c,
                decided[n].reshape(-1),
            )
            patterns["n"] = patterns["n"] // request.repeats
            patterns.insert(0, "variant", n)
            pattern_frames.append(patterns)
            # one matrix per repeat (at least one), so the sum is an array, never sum()'s 0
            confusions[n] = cast(np.ndarray, sum(confusion(y, d, c) for d in decided[n]))
    metrics = pd.DataFrame(metric_rows)
    differences = pd.DataFrame(
        diff_rows,
        columns=["variant", "metric", "difference", "ci_low", "ci_high", "fold_mean", "fold_sd"],
    )
    patterns_all = pd.concat(pattern_frames, ignore_index=True)
    write_csv(out_dir / runs.METRICS, metrics)
    write_csv(out_dir / "fold_metrics.csv", fold_metrics)
    write_csv(out_dir / "patterns.csv", patterns_all)
    cm_frames = []
    for n, cm in confusions.items():
        frame = pd.DataFrame(cm, columns=[f"pred_{k}" for k in range(c)])
        frame.insert(0, "true", [str(k) for k in range(c)])
        frame.insert(0, "variant", n)
        cm_frames.append(frame)
    write_csv(out_dir / "confusion_matrix.csv", pd.concat(cm_frames, ignore_index=True))
    if len(names) > 1:
        write_csv(out_dir / "differences.csv", differences)
    pooled_clinical(request, cohort, oof).write(out_dir)
    return {
        "metrics": metrics,
        "fold_metrics": fold_metrics,
        "patterns": patterns_all,
        "confusion": confusions,
        "differences": differences,
    }


def pooled_clinical(request: CVRequest, cohort: Cohort, oof: pd.DataFrame) -> ClinicalOutputs:
    """Calibration, operating point, decision curves, coverage and subgroups of the base
    model's pooled out-of-fold predictions (first repeat: every patient once), each fold with
    its own temperature, threshold and conformal sets."""
    assert cohort.labels is not None
    c = request.num_classes
    names = [str(k) for k in range(c)]
    part = oof[(oof["variant"] == BASE) & (oof["repeat"] == 1)]
    position = {pid: i for i, pid in enumerate(cohort.ids)}
    idx = part["id"].map(position).to_numpy()
    y = cohort.labels[idx]
    probs = part[[f"prob_{k}" for k in names]].to_numpy(dtype=float)
    raw_cols = [f"raw_prob_{k}" for k in names]
    raw = part[raw_cols].to_numpy(dtype=float) if set(raw_cols) <= set(part.columns) else probs
    pred = part["pred"].astype(int).to_numpy()
    threshold = positive = None
    if "threshold" in part.columns and part["threshold"].astype(str).str.strip().ne("").all():
        threshold = float(part["threshold"].astype(float).mean())
        positive = positive_index(request.base.train, names)
    sets = None
    mode = ""
    if "set" in part.columns:
        sets = np.array([[k in str(cell).split("|") for k in names] for cell in part["set"]])
        mode = "/".join(sorted(set(part["conformal_mode"].astype(str))))
    return clinical_outputs(
        y,
        raw,
        probs,
        pred,
        class_names=names,
        positive=positive,
        threshold=threshold,
        rule=request.base.train.threshold + " per fold (threshold: mean of the folds')",
        present=cohort.present[idx],
        names=cohort.names,
        sets=sets,
        alpha=request.conformal if sets is not None else None,
        conformal_mode=mode,
        subgroups=read_subgroups(
            request.manifest, request.subgroup_cols, part["id"].astype(str).tolist()
        ),
        n_boot=request.bootstrap,
        seed=request.base.train.seed,
    )


def _sd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
