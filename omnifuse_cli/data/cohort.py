"""The Cohort a manifest is read into: patients, labels, every modality's raw cell values and
the presence mask; and whether a cohort's labels can be trained on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.data.images import View
from omnifuse_cli.errors import DataError

NO_MODALITY = "no modality present"  # the reason of a patient who has nothing to score


@dataclass
class NoteStats:
    """How one text modality's notes were read, for `check`."""

    encodings: Counter[str] = field(default_factory=Counter)  # note files per encoding
    guessed: list[str] = field(default_factory=list)  # "path (encoding)" of guessed files
    empty: int = 0  # empty or whitespace-only notes (cells or files): missing text
    path_like: list[str] = field(default_factory=list)  # inline notes that look like a path


@dataclass
class Cohort:
    """Patients, labels and every modality's raw cell values, with the presence mask."""

    source: Path
    ids: list[str]
    labels: np.ndarray | None  # (N,) int64, None when the manifest has no label column
    modalities: tuple[ModalitySpec, ...]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # (N, D) float32, NaN = missing
    vector_columns: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, list[list[View]]] = field(default_factory=dict)  # file or frame
    texts: dict[str, list[str | None]] = field(default_factory=dict)
    present: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))  # (N, M)
    notes: list[str] = field(default_factory=list)  # things the user should hear about
    # Only with read_manifest(keep_bad_rows=True): row index -> why that patient cannot be used.
    bad_rows: dict[int, list[str]] = field(default_factory=dict)
    # Patients left out because they have no modality at all (on_empty_patient="skip"): their
    # ids and labels (-1 = none), recorded in the run's split files as excluded.
    excluded: list[tuple[str, int]] = field(default_factory=list)
    note_stats: dict[str, NoteStats] = field(default_factory=dict)  # text modality -> stats

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def subset(self, index: np.ndarray) -> Cohort:
        idx = np.asarray(index, dtype=np.int64)
        return Cohort(
            source=self.source,
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            modalities=self.modalities,
            vectors={k: v[idx] for k, v in self.vectors.items()},
            vector_columns=self.vector_columns,
            images={k: [v[i] for i in idx] for k, v in self.images.items()},
            texts={k: [v[i] for i in idx] for k, v in self.texts.items()},
            present=self.present[idx],
            notes=list(self.notes),
            excluded=list(self.excluded),
            note_stats=self.note_stats,
        )


def check_trainable(cohort: Cohort, num_classes: int) -> None:
    """Labels must cover the classes well enough for a stratified three-way split; unlabeled
    patients (label -1) are allowed beside them."""
    if cohort.labels is None:
        raise DataError("training needs labels", hint="add a 'label' column")
    if not (cohort.labels >= 0).any():
        raise DataError(
            f"none of the {len(cohort)} patients has a label (every label cell is empty)",
            hint="training needs labelled patients; unlabeled ones only join them",
        )
    counts = np.bincount(cohort.labels[cohort.labels >= 0], minlength=num_classes)
    empty = [str(c) for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise DataError(
            f"class(es) {', '.join(empty)} have no patients (label counts: "
            + ", ".join(f"{c}={counts[c]}" for c in range(num_classes))
            + ")",
            hint="check --num-classes: labels must be 0..num_classes-1",
        )
