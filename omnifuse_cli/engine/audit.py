"""`omnifuse check`: validate a manifest without training and describe the data."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.config import DataConfig, TrainConfig
from omnifuse_cli.data.cohort import Cohort, NoteStats, check_trainable
from omnifuse_cli.data.dicom import describe
from omnifuse_cli.data.images import View
from omnifuse_cli.data.manifest import read_manifest, reading_options
from omnifuse_cli.data.splits import train_split
from omnifuse_cli.errors import DataError


@dataclass
class AuditReport:
    manifest: Path
    n_patients: int
    label_counts: dict[str, int]
    presence: dict[str, int]  # modality -> patients having it
    patterns: dict[str, int]  # "labs+us" -> patients with exactly that set, most common first
    images_per_patient: dict[str, dict[str, float]]  # image modality -> min/mean/max/total
    vector_sizes: dict[str, int]
    # image modality -> one row per kind of file found (format, photometric, frames, size)
    # with the number of files of that kind, most common first
    image_files: dict[str, list[dict[str, str | int]]] = field(default_factory=dict)
    # text modality -> how its notes were read (encodings, guessed files, empty notes)
    note_stats: dict[str, NoteStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # skipped files, labs-table mismatches
    problems: list[str] = field(default_factory=list)  # what stops training
    split_summary: pd.DataFrame | None = None  # the split train would make (split_summary)
    n_unlabeled: int = 0  # patients with an empty label: they train the imputation only

    @property
    def trainable(self) -> bool:
        return not self.problems


def audit_manifest(
    manifest: Path,
    data: DataConfig,
    *,
    num_classes: int | None = None,
    split: TrainConfig | None = None,
) -> AuditReport:
    """Read and validate like `train` does; unreadable input raises, as it would there."""
    cohort = read_manifest(
        manifest,
        data.modalities,
        num_classes=num_classes,
        require_labels=False,
        **reading_options(data),
    )
    names = cohort.names
    # One count per distinct presence row, not a string per patient (a million patients).
    # Ties keep the order of first appearance, as counting patient by patient did.
    rows, first, counts = np.unique(cohort.present, axis=0, return_index=True, return_counts=True)
    patterns = Counter(
        {
            "+".join(n for n, p in zip(names, rows[k], strict=True) if p): int(counts[k])
            for k in np.argsort(first)
        }
    )
    images = {}
    for name, lists in cohort.images.items():
        sizes = np.array([len(p) for p in lists if p])
        if len(sizes):
            images[name] = {
                "min": float(sizes.min()),
                "mean": float(sizes.mean()),
                "max": float(sizes.max()),
                "total": float(sizes.sum()),
            }
    report = AuditReport(
        manifest=Path(manifest),
        n_patients=len(cohort),
        label_counts={},
        presence={n: int(cohort.present[:, i].sum()) for i, n in enumerate(names)},
        patterns=dict(patterns.most_common()),
        images_per_patient=images,
        vector_sizes={n: v.shape[1] for n, v in cohort.vectors.items()},
        image_files={n: describe_files(lists) for n, lists in cohort.images.items()},
        note_stats=dict(cohort.note_stats),
        notes=list(cohort.notes),
    )
    if cohort.labels is None or not (cohort.labels >= 0).any():
        report.problems.append(
            "no patient has a label (training needs labelled patients; "
            "unlabeled ones, with an empty label cell, only join them)"
        )
        return report
    labelled = cohort.labels[cohort.labels >= 0]
    report.n_unlabeled = int((cohort.labels < 0).sum())
    classes = num_classes or int(labelled.max()) + 1
    counts = np.bincount(labelled, minlength=classes)
    report.label_counts = {str(c): int(counts[c]) for c in range(classes)}
    cfg = split or TrainConfig()
    try:
        check_trainable(cohort, classes)
        splits = train_split(cohort.labels, cfg)
    except DataError as err:
        report.problems.append(err.message + (f" ({err.hint})" if err.hint else ""))
        return report
    report.split_summary = split_summary(cohort, splits, [str(c) for c in range(classes)])
    return report


def describe_files(views: list[list[View]]) -> list[dict[str, str | int]]:
    """Every distinct file of an image modality described (data.dicom.describe: format,
    photometric interpretation, frames, size), counted by kind, most common first."""
    files = dict.fromkeys(Path(os.fspath(v)) for patient in views for v in patient)
    kinds: Counter[tuple[tuple[str, str | int], ...]] = Counter()
    for path in files:
        try:
            kinds[tuple(describe(path).items())] += 1
        except DataError as err:
            kinds[(("format", f"unreadable ({err.message})"),)] += 1
    return [{**dict(kind), "files": count} for kind, count in kinds.most_common()]


def split_summary(
    cohort: Cohort, splits: dict[str, np.ndarray], class_names: list[str]
) -> pd.DataFrame:
    """Patients per class and per missing pattern in each split (train, val, test, all).

    One row per class (``kind`` class) then one per presence pattern (``kind`` pattern, most
    common first): researchers check that every class and every pattern reached each split."""
    assert cohort.labels is not None
    split_of = np.full(len(cohort), -1, dtype=np.int64)
    for k, idx in enumerate(splits.values()):
        split_of[idx] = k
    rows, first, code = np.unique(cohort.present, axis=0, return_index=True, return_inverse=True)
    code = code.reshape(-1)
    names = [
        "+".join(n for n, p in zip(cohort.names, row, strict=True) if p) or "(none)" for row in rows
    ]
    labels = cohort.labels
    if (labels < 0).any():  # unlabeled patients: a class row of their own
        class_names = [*class_names, "unlabeled"]
        labels = np.where(labels < 0, len(class_names) - 1, labels)
    groups = [("class", class_names, labels), ("pattern", names, code)]
    records = []
    for kind, values, key in groups:
        table = np.zeros((len(values), len(splits)), dtype=np.int64)
        for k in range(len(splits)):
            table[:, k] = np.bincount(key[split_of == k], minlength=len(values))
        order = (
            range(len(values))
            if kind == "class"
            else sorted(range(len(values)), key=lambda v: (-table[v].sum(), first[v]))
        )
        for v in order:
            records.append(
                {
                    "kind": kind,
                    "value": values[v],
                    **{name: int(table[v, k]) for k, name in enumerate(splits)},
                    "total": int(table[v].sum()),
                }
            )
    return pd.DataFrame(records)
