"""Stratified train/val/test split by label (scikit-learn); unlabeled patients apart."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.errors import DataError


def stratified_split(
    labels: np.ndarray, *, train: float, val: float, test: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of each split, stratified by label; a clear error when a class is too small.
    ``test=0`` gives an empty test split (the cohort is tested elsewhere).

    Unlabeled patients (label -1) are split off first, into ``unlabeled`` (present only when
    there are some): they only ever train, never validate or test. The labelled patients are
    split exactly as they would be without them."""
    labels = np.asarray(labels)
    unlabeled = np.flatnonzero(labels < 0)
    if len(unlabeled):
        labelled = np.flatnonzero(labels >= 0)
        parts = stratified_split(labels[labelled], train=train, val=val, test=test, seed=seed)
        out = {name: labelled[idx] for name, idx in parts.items()}
        out["unlabeled"] = unlabeled
        return out
    n = len(labels)
    index = np.arange(n)
    counts = np.bincount(labels)
    smallest = int(np.argmin(np.where(counts > 0, counts, n + 1)))
    try:
        train_idx, rest = train_test_split(
            index, train_size=train, random_state=seed, stratify=labels
        )
        if test > 0:
            val_idx, test_idx = train_test_split(
                rest, train_size=val / (val + test), random_state=seed, stratify=labels[rest]
            )
        else:
            val_idx, test_idx = rest, rest[:0]
    except ValueError as err:
        need = len(counts[counts > 0])
        raise DataError(
            f"cannot split {n} patients {train:g}/{val:g}/{test:g} stratified by label: class "
            f"{smallest} has {counts[smallest]} patient(s) and val/test need at least {need} "
            f"patients each ({err})",
            hint=f"add patients to class {smallest}, or give val and test a larger share, e.g. "
            f"--train-ratio 0.6 --val-ratio 0.2 --test-ratio 0.2",
        ) from err
    splits = {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}
    classes = np.flatnonzero(counts)
    for name in ("val", "test") if test > 0 else ("val",):
        missing = np.setdiff1d(classes, labels[splits[name]])
        if len(missing):
            # scikit-learn only needs two patients per class; a class absent from validation or
            # test would make model selection and test metrics silently meaningless.
            c = int(missing[0])
            share = min(0.45, max(val, test, 1.0 / counts[c] + 0.01))
            share = float(np.ceil(share * 20) / 20)
            raise DataError(
                f"class {c} has {counts[c]} patient(s): none lands in the {name} split with "
                f"--train-ratio {train:g} --val-ratio {val:g} --test-ratio {test:g}",
                hint=f"try --train-ratio {1 - 2 * share:.2f} --val-ratio {share:.2f} "
                f"--test-ratio {share:.2f}, or add patients to class {c}",
            )
    return splits


def train_split(labels: np.ndarray, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The split `omnifuse train` makes with ``cfg``'s ratios and seed (check's audit and tune's
    held-out test patients use it too, so all three agree patient for patient)."""
    return stratified_split(
        labels, train=cfg.train_ratio, val=cfg.val_ratio, test=cfg.test_ratio, seed=cfg.seed
    )


def training_patients(splits: dict[str, np.ndarray]) -> np.ndarray:
    """Every patient a model learns from: the training split and the unlabeled patients (they
    fit the normalisation, the vocabulary and the imputation, never a label loss)."""
    unlabeled = splits.get("unlabeled")
    if unlabeled is None or not len(unlabeled):
        return splits["train"]
    return np.sort(np.concatenate([splits["train"], unlabeled]))
