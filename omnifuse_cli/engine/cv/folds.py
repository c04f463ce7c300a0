"""Which patients each fold fit trains on, picks its epoch with and is tested on: folds by
label (and group), the inner validation split, every fold's seed and folder, and folds.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.tables import read_table
from omnifuse_cli.engine.cv.request import FOLDS_DIR, CVRequest, Variant
from omnifuse_cli.errors import DataError


def read_groups(manifest: Path, column: str, n: int) -> np.ndarray:
    """The group of every manifest row (in manifest order), checked to make folds."""
    frame = read_table(Path(manifest), "manifest")
    if column not in frame.columns:
        raise DataError(
            f"--group-col {column!r} is not a column of {manifest} "
            f"(columns: {', '.join(frame.columns)})",
            hint="name the column that holds each row's patient or site",
        )
    values = frame[column].astype(str).str.strip()
    empty = np.flatnonzero((values == "").to_numpy())
    if len(empty):
        rows = ", ".join(str(i + 2) for i in empty[:20])
        raise DataError(
            f"--group-col {column!r} is empty on {len(empty)} row(s) of {manifest} (rows {rows})",
            hint="give every row its group",
        )
    if values.nunique() < 2:
        raise DataError(
            f"--group-col {column!r} puts all {n} patients in one group ({values.iloc[0]!r})",
            hint="cross-validation by group needs at least as many groups as folds",
        )
    assert len(values) == n
    return values.to_numpy(dtype=object)


def assign_folds(
    labels: np.ndarray,
    folds: int,
    repeats: int,
    seed: int,
    groups: np.ndarray | None = None,
    group_col: str = "",
) -> np.ndarray:
    """Fold number (1..folds) of every patient in every repeat: (repeats, N)."""
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    if folds > counts[smallest]:
        raise DataError(
            f"--folds {folds} is more than class {smallest} has patients ({counts[smallest]}): "
            "every fold needs each class",
            hint=f"use --folds {max(2, int(counts[smallest]))} or fewer, or add patients to "
            f"class {smallest}",
        )
    if groups is not None and len(set(groups)) < folds:
        raise DataError(
            f"--group-col {group_col!r} has {len(set(groups))} groups; --folds "
            f"{folds} needs at least {folds}",
            hint=f"use --folds {len(set(groups))} or fewer",
        )
    out = np.zeros((repeats, len(labels)), dtype=np.int64)
    index = np.arange(len(labels))
    for r in range(repeats):
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
            parts = splitter.split(index, labels)
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
            parts = splitter.split(index, labels, groups)
        for k, (_, test) in enumerate(parts, start=1):
            out[r, test] = k
    return out


def assign_folds_labelled(
    labels: np.ndarray,
    folds: int,
    repeats: int,
    seed: int,
    groups: np.ndarray | None = None,
    group_col: str = "",
) -> np.ndarray:
    """assign_folds over the labelled patients; unlabeled ones (label -1) get fold 0: they
    join every training fold and are never tested. The labelled patients' folds are those
    the cohort would get without the unlabeled ones."""
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == len(labels):
        return assign_folds(labels, folds, repeats, seed, groups, group_col)
    out = np.zeros((repeats, len(labels)), dtype=np.int64)
    out[:, labelled] = assign_folds(
        labels[labelled],
        folds,
        repeats,
        seed,
        None if groups is None else groups[labelled],
        group_col,
    )
    return out


def inner_split(
    labels: np.ndarray,
    idx: np.ndarray,
    share: float,
    seed: int,
    groups: np.ndarray | None = None,
    where: str = "a training fold",
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) patients of a training fold; validation stratified by label (and
    whole groups with ``groups``)."""
    y = labels[idx]
    if groups is not None:
        g = groups[idx]
        splits = min(max(2, int(round(1 / share))), len(set(g)))
        if splits < 2:
            raise DataError(
                f"{where}: its training patients form one group; no validation split is possible",
                hint="use fewer --folds",
            )
        splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
        train_pos, val_pos = next(splitter.split(idx, y, g))
        return np.sort(idx[train_pos]), np.sort(idx[val_pos])
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        c = int(classes[np.argmin(counts)])
        raise DataError(
            f"{where}: class {c} has {counts.min()} training patient(s); the inner "
            "validation split needs at least 2 per class",
            hint=f"use fewer --folds, or add patients to class {c}",
        )
    n_val = max(len(classes), int(round(share * len(idx))))
    n_val = min(n_val, len(idx) - len(classes))
    train, val = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val)


def val_share(cfg: TrainConfig) -> float:
    """The inner validation split's share of a training fold (as `train` splits its patients)."""
    return cfg.val_ratio / (cfg.train_ratio + cfg.val_ratio)


def fold_seed(cfg: TrainConfig, repeat: int, fold: int) -> int:
    return cfg.seed + 1000 * (repeat - 1) + fold


def fold_dir(out_dir: Path, variant: str, repeat: int, fold: int) -> Path:
    return Path(out_dir) / FOLDS_DIR / variant / f"rep{repeat}-fold{fold}"


@dataclass
class FoldPlan:
    variant: Variant
    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray  # patients without a label: they join every training fold


def plan_folds(
    request: CVRequest, labels: np.ndarray, assignment: np.ndarray, groups: np.ndarray | None
) -> list[FoldPlan]:
    """Every fold fit, inner splits included, computed before anything is written (so a fold
    too small for its validation split is an error up front)."""
    plans = []
    for variant in request.all_variants:
        share = val_share(variant.train)
        for r in range(1, request.repeats + 1):
            for k in range(1, request.folds + 1):
                test = np.flatnonzero(assignment[r - 1] == k)
                rest = np.flatnonzero((assignment[r - 1] != k) & (assignment[r - 1] > 0))
                where = f"fold {k}" + (f" of repeat {r}" if request.repeats > 1 else "")
                train, val = inner_split(
                    labels, rest, share, fold_seed(variant.train, r, k), groups, where
                )
                plans.append(
                    FoldPlan(
                        variant, r, k, train, val, test, np.flatnonzero(assignment[r - 1] == 0)
                    )
                )
    return plans


def folds_frame(cohort: Cohort, assignment: np.ndarray, groups: np.ndarray | None) -> pd.DataFrame:
    """folds.csv: every patient's fold in every repeat, with its label, group and modalities."""
    assert cohort.labels is not None
    patterns = [
        "+".join(n for n, p in zip(cohort.names, row, strict=True) if p) for row in cohort.present
    ]
    frames = []
    for r, folds in enumerate(assignment, start=1):
        frame = pd.DataFrame({"id": cohort.ids, "label": cohort.labels})
        if groups is not None:
            frame["group"] = groups
        frame["repeat"] = r
        frame["fold"] = folds
        frame["modalities"] = patterns
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
