"""What make-data generates: CohortSpec, its validated fields and their defaults, and the
severity each class stands for. Every other module of the package reads its knobs from a
CohortSpec; the package docstring explains what each knob does to the cohort."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from omnifuse_cli.errors import ConfigError

MAX_ID = 10**10 - 1  # ids are written as 10 zero-padded digits
MISSING_MODES = ("mcar", "mnar")

DEFAULT_LABS_SIGNAL = 3.0
DEFAULT_US_SIGNAL = 0.75
DEFAULT_TEXT_SIGNAL = 0.6
DEFAULT_LABS_NOISE = 1.0
DEFAULT_US_NOISE = 1.0
DEFAULT_TEXT_NOISE = 1.0
DEFAULT_SHARED_SEVERITY = 0.5
DEFAULT_CORRUPT_RATE = 0.05
DEFAULT_MISSING_MODE = "mcar"

_INT_FIELDS = frozenset(
    {"n", "unlabeled", "seed", "num_classes", "labs_dim", "image_size", "images_per_patient"}
)
_FLAG_FIELDS = frozenset({"ultrasound", "inline_notes"})


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. Every field is validated; the package docstring explains the knobs."""

    n: int = 60  # patients
    seed: int = 42
    num_classes: int = 3
    labs_dim: int = 20  # analytes per panel
    image_size: int = 256  # PNG side in pixels
    images_per_patient: int = 3  # most views per patient; most patients get this many
    missing_labs: float = 0.2  # probability a patient lacks the whole modality
    missing_us: float = 0.3
    missing_text: float = 0.3
    labs_signal: float = DEFAULT_LABS_SIGNAL  # class shift, in analyte SDs
    us_signal: float = DEFAULT_US_SIGNAL  # how far views move to their class's lesion pattern
    text_signal: float = DEFAULT_TEXT_SIGNAL  # probability a finding describes the true class
    labs_noise: float = DEFAULT_LABS_NOISE
    us_noise: float = DEFAULT_US_NOISE
    text_noise: float = DEFAULT_TEXT_NOISE
    shared_severity: float = DEFAULT_SHARED_SEVERITY  # share of signal from the patient's own
    corrupt_rate: float = DEFAULT_CORRUPT_RATE  # share of patients with one low-quality modality
    missing_mode: str = DEFAULT_MISSING_MODE  # mcar or mnar (milder patients skip labs and us)
    # False: no ultrasound modality at all (no us column, no PNGs): large lab+note cohorts in
    # minutes, since rendering views is by far the slowest part of the generator.
    ultrasound: bool = True
    inline_notes: bool = False  # notes in the manifest's text cells instead of text/<id>.txt
    # Extra patients from the same generator whose label is withheld (an empty label cell:
    # unlabeled patients); truth.csv keeps their labels. Their ids follow the n labelled ones.
    unlabeled: int = 0

    @property
    def total(self) -> int:
        """Every patient written: the n labelled ones and the unlabeled ones."""
        return self.n + self.unlabeled

    def __post_init__(self) -> None:
        if self.missing_mode not in MISSING_MODES:
            _bad(
                "missing_mode",
                repr(self.missing_mode),
                " or ".join(MISSING_MODES),
                "mcar: missing at random; mnar: milder patients skip labs and ultrasound "
                "more often",
            )
        for f in fields(self):
            if f.name in _FLAG_FIELDS:
                if not isinstance(getattr(self, f.name), bool):
                    _bad(f.name, repr(getattr(self, f.name)), "True or False", "a switch")
                continue
            if f.name == "missing_mode":
                continue
            value = getattr(self, f.name)
            kind = int if f.name in _INT_FIELDS else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                wanted = "an integer" if kind is int else "a number"
                _bad(f.name, repr(value), wanted, "pass a plain number")
            if not math.isfinite(value):
                _bad(f.name, value, "a finite number", "pass a plain number")
        if self.num_classes < 2:
            _bad("num_classes", self.num_classes, "at least 2", "a classifier needs two classes")
        if self.n < 2 * self.num_classes:
            _bad(
                "n",
                self.n,
                f"at least {2 * self.num_classes} (2 per class)",
                "raise --n or lower --num-classes",
            )
        if self.unlabeled < 0:
            _bad("unlabeled", self.unlabeled, "0 or more", "extra patients without a label")
        if self.total > MAX_ID:
            _bad("n", self.n, f"at most {MAX_ID} with the unlabeled patients", "ids are 10 digits")
        if self.labs_dim < 1:
            _bad("labs_dim", self.labs_dim, "at least 1", "it is the number of analytes")
        if not 32 <= self.image_size <= 4096:
            _bad(
                "image_size",
                self.image_size,
                "between 32 and 4096",
                "it is the side of the square PNGs in pixels",
            )
        if not 1 <= self.images_per_patient <= 100:
            _bad(
                "images_per_patient",
                self.images_per_patient,
                "between 1 and 100",
                "it is the most ultrasound views a patient gets",
            )
        for name in ("missing_labs", "missing_us", "missing_text"):
            _check(
                self,
                name,
                lambda v: 0 <= v < 1,
                "in [0, 1)",
                "it is the probability that a patient lacks the modality",
            )
        for name in ("us_signal", "text_signal"):
            _check(
                self,
                name,
                lambda v: 0 <= v <= 1,
                "in [0, 1]",
                "0 = no class signal, 1 = the full class signal",
            )
        _check(
            self,
            "shared_severity",
            lambda v: 0 <= v <= 1,
            "in [0, 1]",
            "it is the share of each modality's signal that follows the patient's own "
            "severity: 0 = the class's only, 1 = the patient's only",
        )
        _check(
            self,
            "corrupt_rate",
            lambda v: 0 <= v < 1,
            "in [0, 1)",
            "it is the share of patients (with two or more modalities) who get one "
            "low-quality modality",
        )
        for name in ("labs_signal", "labs_noise", "us_noise", "text_noise"):
            _check(self, name, lambda v: v >= 0, ">= 0", "0 turns it off")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value: object, wanted: str, hint: str) -> None:
    raise ConfigError(f"{_option(name)} must be {wanted}, got {value}", hint=hint)


def _check(
    spec: CohortSpec, name: str, ok: Callable[[float], bool], wanted: str, hint: str
) -> None:
    value = getattr(spec, name)
    if not ok(value):
        _bad(name, value, wanted, hint)


def severities(num_classes: int) -> np.ndarray:
    """Severity s in [0, 1] of each class: 0 = normal, 1 = most severe."""
    return np.arange(num_classes) / (num_classes - 1)
