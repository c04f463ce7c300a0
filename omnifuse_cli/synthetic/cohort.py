"""Assembling and writing a cohort: labels, patient severities, missingness and corruption
drawn from their own random streams, the lab values and notes that follow from them
(DrawnCohort), and the files make-data writes (manifest.csv, labs_table.csv, truth.csv, the
PNGs and notes), a chunk at a time with progress reported through a callback."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnifuse_cli.synthetic.labs import format_labs, lab_values
from omnifuse_cli.synthetic.notes import make_note
from omnifuse_cli.synthetic.spec import CohortSpec, severities
from omnifuse_cli.synthetic.ultrasound import UltrasoundRenderer

MODALITIES = ("labs", "us", "text")
SEVERITY_SPREAD = 0.35  # SD of a patient's severity around the class's, in class gaps 1/(C-1)
MNAR_BASE = 1.5  # mnar skip weight 1.5 - s: the mildest skip 3x as often as the most severe
MAX_MISSING_PROBABILITY = 0.95  # mnar never makes a modality certain to be missing
CORRUPTIONS = ("uninformative", "other_patient")  # kinds written to truth.csv
WRITE_CHUNK = 20_000  # patients formatted and written at a time: bounded memory at any n


@dataclass(frozen=True)
class CohortSummary:
    out_dir: Path
    manifest: Path
    labs_table: Path
    truth: Path
    n_patients: int
    n_images: int
    label_counts: dict[int, int]
    present_counts: dict[str, int]  # modality name -> patients having it
    corrupted_counts: dict[str, int]  # modality name -> patients whose copy of it is corrupted
    n_unlabeled: int = 0  # of n_patients, written with an empty label (truth.csv has it)


@dataclass(frozen=True)
class DrawnCohort:
    """Everything make-data writes except the pixels, which are only rendered while writing, so
    the generator can be studied on thousands of patients in seconds. Per-patient arrays cover
    every patient, also those who lack the modality (their values are simply not written)."""

    labels: np.ndarray  # (n,) class
    severity: np.ndarray  # (n,) the patient's latent severity in [0, 1]
    present: np.ndarray  # (n, 3) bool, columns in MODALITIES order
    lab_names: list[str]
    labs: np.ndarray  # (n, labs_dim) as written, physical units; NaN = analyte not measured
    notes: list[str]  # as written
    us_severity: np.ndarray  # (n,) severity the patient's views are rendered at
    us_seeds: list[np.random.SeedSequence]  # stream the patient's views are drawn from ([]
    # when the cohort has no ultrasound)
    corrupted: list[str]  # modality replaced by low-quality data, or ""
    corruption: list[str]  # its kind (one of CORRUPTIONS), or ""


def draw_cohort(spec: CohortSpec) -> DrawnCohort:
    """Labels, severities, missingness, corruption, lab values and notes of the cohort."""
    n, classes = spec.total, spec.num_classes
    # One independent stream per concern, so e.g. --missing-us or --text-noise never changes
    # the lab values or the labels drawn for the same seed. Children are numbered, so the first
    # four are the streams of versions without patient severity and corruption: at
    # shared_severity 0, corrupt_rate 0 and mcar, those versions' cohorts come out unchanged.
    streams = np.random.SeedSequence(spec.seed).spawn(6)
    s_design, s_labs, s_us, s_text, s_patient, s_corrupt = streams
    design = np.random.default_rng(s_design)
    labels = design.permutation(np.arange(n) % classes)
    class_severity = severities(classes)[labels]
    spread = SEVERITY_SPREAD / (classes - 1)
    severity = np.clip(
        class_severity + spread * np.random.default_rng(s_patient).standard_normal(n), 0, 1
    )
    present = design.random((n, len(MODALITIES))) >= _missing_probabilities(spec, severity)
    empty = np.flatnonzero(~present.any(axis=1))
    if spec.ultrasound:
        present[empty, design.integers(0, len(MODALITIES), len(empty))] = True
    else:  # rescued patients get labs or a note, never the absent ultrasound
        kept = np.array([j for j, m in enumerate(MODALITIES) if m != "us"])
        present[empty, kept[design.integers(0, len(kept), len(empty))]] = True
    # At shared_severity 0 this is the class severity bit for bit.
    seen = (1 - spec.shared_severity) * class_severity + spec.shared_severity * severity

    rng = np.random.default_rng(s_corrupt)
    # Every patient gets the same draws whatever the knobs: raising corrupt_rate only adds
    # patients, and presence only decides which of them qualify.
    hit = (rng.random(n) < spec.corrupt_rate) & (present.sum(axis=1) >= 2)
    pick = rng.random(n)
    uninformative = rng.random(n) < 0.5
    random_severity = rng.random(n)
    donor = (np.arange(n) + rng.integers(1, n, n)) % n  # anyone but the patient
    target = np.full(n, -1)  # index of the corrupted modality
    for i in np.flatnonzero(hit):
        options = np.flatnonzero(present[i])
        target[i] = options[int(pick[i] * len(options))]
    junk = {m: np.flatnonzero((target == j) & uninformative) for j, m in enumerate(MODALITIES)}
    swap = {m: np.flatnonzero((target == j) & ~uninformative) for j, m in enumerate(MODALITIES)}

    names, clean_labs = lab_values(spec, seen, np.random.default_rng(s_labs))
    labs = clean_labs.copy()
    if len(junk["labs"]):
        # The same stream again: the patient keeps their own noise and unmeasured analytes,
        # only the disease signal comes from a random severity.
        shifted = seen.copy()
        shifted[junk["labs"]] = random_severity[junk["labs"]]
        _, redrawn = lab_values(spec, shifted, np.random.default_rng(s_labs))
        labs[junk["labs"]] = redrawn[junk["labs"]]
    labs[swap["labs"]] = clean_labs[donor[swap["labs"]]]

    text_rng = np.random.default_rng(s_text)
    clean_notes = [make_note(spec, float(s), text_rng) for s in seen]
    notes = list(clean_notes)
    for i in junk["text"]:
        # From the corruption stream, so every other note stays as it was.
        notes[i] = make_note(spec, float(random_severity[i]), rng)
    for i in swap["text"]:
        notes[i] = clean_notes[donor[i]]

    # Per patient: a patient's views ignore everyone else's. A million SeedSequences cost
    # seconds and hundreds of MB, so a cohort without ultrasound spawns none.
    patient_seeds = s_us.spawn(n) if spec.ultrasound else []
    source = np.arange(n)  # whose views each patient shows: a mixed-up set is the donor's own
    source[swap["us"]] = donor[swap["us"]]
    us_severity = seen[source]
    us_severity[junk["us"]] = random_severity[junk["us"]]

    return DrawnCohort(
        labels=labels,
        severity=severity,
        present=present,
        lab_names=names,
        labs=labs,
        notes=notes,
        us_severity=us_severity,
        us_seeds=[patient_seeds[j] for j in source] if spec.ultrasound else [],
        corrupted=[MODALITIES[j] if j >= 0 else "" for j in target],
        corruption=[
            "" if j < 0 else CORRUPTIONS[0 if u else 1]
            for j, u in zip(target, uninformative, strict=True)
        ],
    )


def _missing_probabilities(spec: CohortSpec, severity: np.ndarray) -> np.ndarray:
    """(n, 3): probability that each patient lacks each modality."""
    rates = np.array([spec.missing_labs, spec.missing_us, spec.missing_text])
    probabilities = np.tile(rates, (len(severity), 1))
    if spec.missing_mode == "mnar":
        # Normalised to mean 1 over the cohort, so --missing-labs/--missing-us stay the
        # cohort-wide rates. Text stays MCAR: every visit gets a note, however mild the case.
        weight = MNAR_BASE - severity
        weight /= weight.mean()
        probabilities[:, :2] = np.minimum(rates[:2] * weight[:, None], MAX_MISSING_PROBABILITY)
    if not spec.ultrasound:
        probabilities[:, 1] = 1.0  # uniform draws are < 1: nobody has ultrasound
    return probabilities


def make_cohort(
    spec: CohortSpec, out_dir: Path, *, progress: Callable[[int, int], None] | None = None
) -> CohortSummary:
    """Write the cohort under ``out_dir`` (created if needed; existing files are overwritten).

    ``progress(done, total)`` is called with 0 first, then after every patient with views to
    render and at least every WRITE_CHUNK patients. Rows are formatted and written a chunk at a
    time, so memory does not grow with the CSVs (a million patients are ~1 GB of text).
    """
    out_dir = Path(out_dir)
    if spec.ultrasound:
        (out_dir / "us").mkdir(parents=True, exist_ok=True)
    if not spec.inline_notes:
        (out_dir / "text").mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort = draw_cohort(spec)
    labels, present, names = cohort.labels, cohort.present, cohort.lab_names
    renderer = UltrasoundRenderer(spec) if spec.ultrasound else None
    columns = [m for m in MODALITIES if m != "us" or spec.ultrasound]
    manifest, labs_table, truth = (
        out_dir / "manifest.csv",
        out_dir / "labs_table.csv",
        out_dir / "truth.csv",
    )
    n_images = 0
    if progress is not None:
        progress(0, spec.total)
    with (
        _CsvFile(manifest, ["id", "label", *columns]) as rows,
        _CsvFile(labs_table, ["id", *names]) as table_rows,
        _CsvFile(truth, ["id", "label", "severity", "corrupted", "corruption"]) as truth_rows,
    ):
        for start in range(0, spec.total, WRITE_CHUNK):
            stop = min(start + WRITE_CHUNK, spec.total)
            cells = format_labs(cohort.labs[start:stop], names)
            for i in range(start, stop):
                pid = f"{i + 1:010d}"
                labs_cell = us_cell = text_cell = ""
                if present[i, 0]:
                    values = cells[i - start]
                    # The JSON cell is built from the same strings as the table, so both agree.
                    labs_cell = "[" + ", ".join(c or "null" for c in values) + "]"
                    table_rows.append([pid, *values])
                if renderer is not None and present[i, 1]:
                    paths = renderer.write_patient(
                        float(cohort.us_severity[i]),
                        np.random.default_rng(cohort.us_seeds[i]),
                        out_dir,
                        pid,
                    )
                    n_images += len(paths)
                    us_cell = ";".join(paths)
                if present[i, 2] and spec.inline_notes:
                    text_cell = cohort.notes[i]
                elif present[i, 2]:
                    text_cell = f"text/{pid}.txt"
                    (out_dir / text_cell).write_text(cohort.notes[i], encoding="utf-8")
                middle = [labs_cell, us_cell] if renderer is not None else [labs_cell]
                label = str(int(labels[i])) if i < spec.n else ""  # withheld: unlabeled
                rows.append([pid, label, *middle, text_cell])
                truth_rows.append(
                    [
                        pid,
                        str(int(labels[i])),
                        f"{cohort.severity[i]:.4f}",
                        cohort.corrupted[i],
                        cohort.corruption[i],
                    ]
                )
                if progress is not None and renderer is not None:
                    progress(i + 1, spec.total)
            for writer in (rows, table_rows, truth_rows):
                writer.flush()
            if progress is not None and renderer is None:
                progress(stop, spec.total)

    counts = np.bincount(labels[: spec.n], minlength=spec.num_classes)
    return CohortSummary(
        out_dir=out_dir,
        manifest=manifest,
        labs_table=labs_table,
        truth=truth,
        n_patients=spec.total,
        n_images=n_images,
        n_unlabeled=spec.unlabeled,
        label_counts={c: int(k) for c, k in enumerate(counts)},
        present_counts={
            m: int(present[:, j].sum()) for j, m in enumerate(MODALITIES) if m in columns
        },
        corrupted_counts={m: cohort.corrupted.count(m) for m in columns},
    )


class _CsvFile:
    """A CSV written in chunks: ``append`` rows, ``flush`` writes them out and forgets them."""

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header = path, header
        self.pending: list[list[str]] = []

    def __enter__(self) -> _CsvFile:
        self.handle = self.path.open("w", encoding="utf-8", newline="")
        self.writer = csv.writer(self.handle, lineterminator="\n")
        self.writer.writerow(self.header)
        return self

    def append(self, row: list[str]) -> None:
        self.pending.append(row)

    def flush(self) -> None:
        self.writer.writerows(self.pending)
        self.pending.clear()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()
        self.handle.close()
