"""Synthetic three-modality cohorts for `omnifuse make-data`: labs, ultrasound PNGs, Chinese notes.

The layout is the reference implementation's (``manifest.csv`` with ``id,label,labs,us,text``,
``labs_table.csv``, ``us/<id>_<k>.png``, ``text/<id>.txt``), so a generated cohort exercises the
same reading code as real hospital data. ``truth.csv`` (``id,label,severity,corrupted,
corruption``) holds what no real cohort has: each patient's latent severity and which modality,
if any, was corrupted and how. Training never reads it.

How the label reaches each modality
-----------------------------------
Class ``c`` of ``C`` has severity ``s_class = c / (C - 1)`` (0 = normal, 1 = most severe). Each
patient's own severity varies around it: ``s_patient = clip(s_class + SEVERITY_SPREAD / (C - 1)
* z, 0, 1)`` with ``z ~ N(0, 1)`` and ``SEVERITY_SPREAD = 0.35`` class gaps, so neighbouring
classes overlap a little, as real disease stages do. Every modality sees ``s = (1 -
shared_severity) * s_class + shared_severity * s_patient``. The modalities see ``s`` through
different curves, so each one has its own blind spot and only their combination tells every
class apart, which is what makes fusion matter:

- labs react early and saturate (``1 - (1 - s)^4``, plus a weaker linear "advanced" axis): they
  tell healthy from diseased well, mild from severe poorly;
- ultrasound masses appear late (dark-mass burden ``s^3``, plus a few bright nodules peaking at
  mid severity): it tells severe from the rest well, normal from mild poorly;
- notes describe the nearest of five severity levels (C=3: normal, mild, severe): no blind
  spot, but findings are often wrong or absent.

With the defaults, n=240 and three classes, each modality alone scores about 0.7 accuracy with
simple classifiers (5-fold logistic regression per modality, probabilities multiplied to fuse)
and the three together about 0.85 on patients who have all three; about 0.9 at
shared_severity 0 and corrupt_rate 0, because modalities that share the patient's severity
also share their mistakes.

Knobs (defaults in brackets; each ``*_signal`` at 0 removes the class signal entirely):

``labs_signal`` [3.0]
    Class shift in units of each analyte's population SD. Seven analytes carry signal when the
    panel has them (WBC, PLT, ALT, AST, ALB, TBIL, CRP, listed first so small panels keep them):
    disease raises ALT, AST, CRP and WBC and lowers ALB; advanced disease also raises TBIL and
    lowers PLT. The other analytes are pure noise. Each patient's shift is scaled by a personal
    factor around 1 (some cases are less marked than their class).
``labs_noise`` [1.0]
    Multiplies the population variability (1 = the reference SD). Noise is correlated within
    organ groups (inflammation, liver, kidney, coagulation), as in real panels. About 3% of
    single values are missing (``null``) whatever the knob.
``us_signal`` [0.75], in [0, 1]
    How far each view's lesion pattern moves from the class-average pattern towards the
    pattern of its patient's ``s`` (0 = every class looks alike). Patterns: normal livers are
    nearly lesion-free, mid classes show a few small hyperechoic (bright) nodules and the odd
    small dark mass, severe classes several large, dark, ill-defined masses. Lesion counts are
    Poisson draws and the views of one patient are drawn independently (other lesions,
    positions, gain), so more views carry more evidence.
``us_noise`` [1.0]
    Strength of everything that is not lesion: multiplicative speckle (1 = fully developed
    Rayleigh speckle; larger values add no more speckle), parenchymal heterogeneity, per-view
    gain changes and anechoic vessels, which look like small dark masses. 0 gives clean images.
``text_signal`` [0.6], in [0, 1]
    Probability that each findings sentence (1-4 per note) describes the patient's ``s``;
    otherwise it describes a class drawn uniformly at random.
``text_noise`` [1.0]
    Scales the number of neutral sentences (history, general condition), the share of notes
    without any finding (10% at 1.0) and character-level typos (substitutions, deletions,
    repeats; 3% of characters at 1.0).
``shared_severity`` [0.5], in [0, 1]
    Share of each modality's signal that follows the patient's own severity rather than the
    class's (the ``s`` above). At 0 the modalities are independent given the class; at 1 a mild
    case of a severe class looks milder in labs, images and note alike. The default is 0.5
    because real patients show their disease in every modality at once (a large tumour raises
    the enzymes, shows on ultrasound and fills the note), while each test also varies for
    reasons of its own.
``corrupt_rate`` [0.05], in [0, 1)
    Share of the patients with two or more modalities who get one present modality (chosen at
    random) replaced by low-quality data: half the time uninformative (labs with the patient's
    own noise but the disease signal of a uniformly random severity, views rendered at a random
    severity, a note written for a random severity), half the time another random patient's
    (their panel, their whole set of views, their note copied verbatim). Patients with a single
    modality are spared so that every patient keeps some genuine evidence. The default 0.05
    because mixed-up records, failed examinations and copy-pasted notes are a few percent of
    real records, and a model should meet some of them.
``missing_mode`` [mcar]
    ``mcar``: each modality is missing with its ``missing_*`` probability, whoever the patient.
    ``mnar``: labs and ultrasound are skipped more often by milder patients, with probability
    proportional to ``1.5 - s_patient``, normalised so that the cohort-wide rates stay
    ``missing_labs`` and ``missing_us`` (the mildest skip three times as often as the most
    severe; no probability above 0.95); notes stay MCAR. The default is mcar so that the
    ``missing_*`` options mean exactly what they say; mnar tests whether a model reads the
    missingness pattern itself as evidence.

Missingness (``missing_labs/us/text``) removes a whole modality for a patient, independently
per modality; a patient who loses all three keeps one at random. Labels and missingness, labs,
images, notes, patient severities and corruption each draw from their own random stream (every
patient's images from their own), so changing one modality's knobs leaves the other
modalities' values unchanged, and at shared_severity 0, corrupt_rate 0 and mcar a seed gives
the same files as versions before those knobs existed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from omnifuse_cli.errors import ConfigError

MODALITIES = ("labs", "us", "text")
MAX_ID = 10**10 - 1  # ids are written as 10 zero-padded digits
ANALYTE_MISSING_RATE = 0.03
DYNAMIC_RANGE_DB = 48.0  # of the displayed B-mode image
NO_FINDINGS_SHARE = 0.1  # of notes at text_noise 1
LAB_ONSET = 4.0  # labs are abnormal already at mild severity: 1 - (1 - s)^LAB_ONSET
US_ONSET = 3.0  # dark masses appear late: burden s^US_ONSET
US_DARK_RATE = 4.0  # expected dark masses per view at the most severe class
US_BRIGHT_RATE = 0.5  # expected extra bright nodules per view at mid severity
US_VESSEL_RATE = 0.8  # expected vessels per view at us_noise 1
SEVERITY_SPREAD = 0.35  # SD of a patient's severity around the class's, in class gaps 1/(C-1)
MNAR_BASE = 1.5  # mnar skip weight 1.5 - s: the mildest skip 3x as often as the most severe
MAX_MISSING_PROBABILITY = 0.95  # mnar never makes a modality certain to be missing
MISSING_MODES = ("mcar", "mnar")
CORRUPTIONS = ("uninformative", "other_patient")  # kinds written to truth.csv

DEFAULT_LABS_SIGNAL = 3.0
DEFAULT_US_SIGNAL = 0.75
DEFAULT_TEXT_SIGNAL = 0.6
DEFAULT_LABS_NOISE = 1.0
DEFAULT_US_NOISE = 1.0
DEFAULT_TEXT_NOISE = 1.0
DEFAULT_SHARED_SEVERITY = 0.5
DEFAULT_CORRUPT_RATE = 0.05
DEFAULT_MISSING_MODE = "mcar"

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

# Notes: class c maps to one of five severity levels (C=3 -> normal, mild, severe).
_OPENERS = (
    "患者{sex}，{age}岁，因体检发现肝脏异常就诊。",
    "患者{sex}，{age}岁，因右上腹不适来院检查。",
    "患者{sex}，{age}岁，门诊复查。",
    "患者{sex}，{age}岁，因肝功能检查异常就诊。",
    "患者{sex}，{age}岁，外院超声检查后转诊。",
)
_NEUTRAL = (
    "患者神志清楚，精神可。",
    "既往体健，否认高血压病史。",
    "否认糖尿病、冠心病病史。",
    "饮食睡眠可，二便正常。",
    "否认药物及食物过敏史。",
    "查体：腹软，无压痛及反跳痛。",
    "心肺听诊未闻及明显异常。",
    "否认手术外伤史。",
    "否认吸烟饮酒史。",
    "家族史无特殊。",
    "生命体征平稳。",
    "双下肢无水肿。",
    "既往有胆囊结石病史，未行手术。",
    "否认输血史。",
    "患者已婚，育有一子。",
    "入院后完善相关检查。",
    "检查时患者配合良好。",
    "胆囊大小正常，壁光滑。",
    "脾脏大小形态正常。",
    "双肾未见明显异常。",
)
_CLOSERS = (
    "建议定期复查。",
    "嘱患者注意休息，清淡饮食。",
    "请结合临床及其他检查。",
    "随诊。",
)
_FINDINGS: tuple[tuple[str, ...], ...] = (
    (  # normal
        "肝脏形态大小正常，包膜光滑，实质回声均匀。",
        "肝内未见明显占位性病变。",
        "肝内血管走行清晰，门静脉不宽。",
        "超声提示：肝脏未见明显异常。",
        "患者无明显不适，本次为常规体检。",
        "肝脏各叶比例协调，回声细密均匀。",
    ),
    (  # minimal
        "肝实质回声稍增粗，分布欠均匀。",
        "肝内见点状强回声，考虑钙化灶。",
        "肝内见一小囊性无回声区，直径约{size}cm，边界清晰。",
        "超声提示：肝实质回声稍粗，建议随访。",
        "患者偶有右上腹隐痛不适。",
    ),
    (  # mild
        "肝内见一低回声小结节，大小约{size}cm，边界清。",
        "肝右叶见一稍高回声结节，形态规则，内部回声均匀。",
        "CDFI：结节内未见明显血流信号。",
        "超声提示：肝内实性小结节，考虑良性可能，建议定期复查。",
        "患者偶感右上腹胀痛，无发热。",
        "肝内见一高回声团，大小约{size}cm，考虑血管瘤。",
    ),
    (  # moderate
        "肝内见数个低回声结节，较大者约{size}cm，边界尚清。",
        "结节周边可见低回声晕，内部回声不均。",
        "CDFI：结节周边可见点条状血流信号。",
        "超声提示：肝内多发实性结节，性质待定，建议增强CT进一步检查。",
        "患者近一月乏力、食欲下降。",
    ),
    (  # severe
        "肝内多发低回声团块，最大约{size}cm，边界不清，形态不规则。",
        "团块内部回声不均，可见液化坏死区，血流信号丰富。",
        "门静脉内见低回声充填，考虑癌栓形成。",
        "肝门部及腹膜后见多发肿大淋巴结。",
        "超声提示：肝内多发占位，考虑恶性可能大。",
        "患者近期明显消瘦，体重下降约{kg}kg，伴腹胀、纳差。",
        "腹腔内见中等量积液。",
    ),
)
# Typos are drawn from frequent characters so they look like input-method slips, not garbage.
_TYPO_CHARS = "的一是了不在有人这中大为上个我以要时来用们生到作地于出就分对成会可主发年动同工也能"

_INT_FIELDS = frozenset(
    {"n", "unlabeled", "seed", "num_classes", "labs_dim", "image_size", "images_per_patient"}
)
_FLAG_FIELDS = frozenset({"ultrasound", "inline_notes"})
WRITE_CHUNK = 20_000  # patients formatted and written at a time: bounded memory at any n


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. Every field is validated; the module docstring explains the knobs."""

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
    clean_notes = [_note(spec, float(s), text_rng) for s in seen]
    notes = list(clean_notes)
    for i in junk["text"]:
        # From the corruption stream, so every other note stays as it was.
        notes[i] = _note(spec, float(random_severity[i]), rng)
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
    renderer = _UltrasoundRenderer(spec) if spec.ultrasound else None
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
            cells = _format_labs(cohort.labs[start:stop], names)
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


def severities(num_classes: int) -> np.ndarray:
    """Severity s in [0, 1] of each class: 0 = normal, 1 = most severe."""
    return np.arange(num_classes) / (num_classes - 1)


def lab_drivers(severity: np.ndarray) -> np.ndarray:
    """(n, 2) for severities (n,): how abnormal a panel is (early, saturating) and how
    advanced (linear)."""
    return np.stack([1 - (1 - severity) ** LAB_ONSET, severity], axis=1)


def us_drivers(severity: np.ndarray) -> np.ndarray:
    """(n, 3) for severities (n,): mass size, dark-mass burden (late, convex) and
    bright-nodule burden (mid)."""
    return np.stack([severity, severity**US_ONSET, np.sin(np.pi * severity)], axis=1)


def analyte_names(labs_dim: int) -> list[str]:
    known = [a[0] for a in _ANALYTES]
    return known[:labs_dim] + [f"X{j + 1}" for j in range(len(known), labs_dim)]


# ---------------------------------------------------------------------------------------------
# Labs


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


def _format_labs(values: np.ndarray, names: list[str]) -> list[list[str]]:
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


# ---------------------------------------------------------------------------------------------
# Ultrasound


class _UltrasoundRenderer:
    """Sector-scan B-mode liver views; the fan geometry is computed once, so views are cheap."""

    HALF_ANGLE = math.radians(31)

    def __init__(self, spec: CohortSpec) -> None:
        self.spec = spec
        self.centre = us_drivers(severities(spec.num_classes)).mean(axis=0)  # class average
        size = spec.image_size
        self.size = size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.apex = (-0.08 * size, (size - 1) / 2)  # (y, x): the probe face is above the image
        self.r0, self.r1 = 0.14 * size, 0.98 * size
        r = np.hypot(yy - self.apex[0], xx - self.apex[1])
        self.theta = np.arctan2(xx - self.apex[1], yy - self.apex[0])
        self.depth = np.clip((r - self.r0) / (self.r1 - self.r0), 0.0, 1.0)
        soft = 1.5 / size  # radians, about a pixel and a half at the bottom: no jagged edge
        self.fan = (
            np.clip((self.HALF_ANGLE - np.abs(self.theta)) / (2 * soft), 0, 1)
            * np.clip((r - self.r0) / 1.5, 0, 1)
            * np.clip((self.r1 - r) / 1.5, 0, 1)
        )
        # Speckle = magnitude of a blurred complex Gaussian field (Rayleigh distributed); the
        # point spread is wider laterally than axially, as with a real transducer.
        scale = size / 256
        self.psf_axial = _gaussian_taps(0.7 * scale)
        self.psf_lateral = _gaussian_taps(1.4 * scale)

    def write_patient(
        self, severity: float, rng: np.random.Generator, out_dir: Path, pid: str
    ) -> list[str]:
        most = self.spec.images_per_patient
        count = most if rng.random() < 0.7 else int(rng.integers(1, most + 1))
        paths = []
        for k in range(1, count + 1):
            relative = f"us/{pid}_{k}.png"
            pixels = self.render(severity, self.spec.us_signal, rng)
            Image.fromarray(pixels, mode="L").save(out_dir / relative)
            paths.append(relative)
        return paths

    def render(self, severity: float, signal: float, rng: np.random.Generator) -> np.ndarray:
        """One view (uint8) whose lesion pattern lies ``signal`` of the way from the
        class-average pattern to the pattern of ``severity``."""
        size, noise = self.size, self.spec.us_noise
        # Interpolating (rather than showing another class's pattern now and then) keeps the
        # evidence graded: a weak view is ambiguous, not confidently wrong.
        drivers = us_drivers(np.array([severity]))[0]
        mass_size, dark, bright = self.centre + signal * (drivers - self.centre)

        tissue = np.full((size, size), 0.5, dtype=np.float32)
        tissue *= np.exp(
            0.15 * noise * self._smooth_noise(rng, 6) + 0.08 * noise * self._smooth_noise(rng, 24)
        )
        bounds = self._layers(tissue, rng)
        for _ in range(rng.poisson(0.05 + US_DARK_RATE * dark)):
            radius = size * (0.035 + 0.06 * mass_size) * rng.uniform(0.7, 1.3)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=0.6 - 0.45 * mass_size,
                irregular=0.3 * mass_size,
                edge=0.05 + 0.1 * mass_size,
            )
        for _ in range(rng.poisson(0.1 + US_BRIGHT_RATE * bright)):
            radius = size * rng.uniform(0.022, 0.045)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=3.5 * rng.uniform(0.8, 1.2),
                irregular=0.05,
                edge=0.08,
            )
        # Vessels: anechoic, bright-walled, in every liver; they mimic small dark lesions.
        for _ in range(rng.poisson(US_VESSEL_RATE * noise)):
            radius = size * rng.uniform(0.015, 0.04)
            self._blob(
                tissue,
                rng,
                bounds,
                radius,
                gain=0.12,
                irregular=0.0,
                edge=0.06,
                elongation=rng.uniform(1.0, 2.5),
                wall=0.8,
            )

        gain = math.exp(0.12 * noise * rng.standard_normal())
        attenuation = rng.uniform(0.6, 1.0)  # partly undone by time-gain compensation
        tissue *= gain * np.exp(-attenuation * self.depth) * (1 + 0.35 * self.depth)
        if noise > 0:
            # Uniform draws are several times cheaper than normal ones, and the blur sums
            # dozens of them, which makes the field Gaussian anyway.
            field = rng.random((2, size, size), dtype=np.float32) - np.float32(0.5)
            field = _blur(_blur(field, self.psf_axial, axis=1), self.psf_lateral, axis=2)
            speckle = np.hypot(field[0], field[1])
            speckle /= speckle.mean()
            tissue *= 1 + min(noise, 1.0) * (speckle - 1)
        # Log compression over a fixed dynamic range, as the scanner displays it, with plain
        # parenchyma at mid-gray; then the fan on black.
        decibels = 20 * np.log10(np.maximum(tissue, 1e-4) / 0.5)
        pixels = np.clip(0.5 + decibels / DYNAMIC_RANGE_DB, 0, 1) * self.fan
        return (pixels * 255 + 0.5).astype(np.uint8)

    def _smooth_noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        small = Image.fromarray(rng.standard_normal((cells, cells), dtype=np.float32), mode="F")
        return np.asarray(small.resize((self.size, self.size), Image.Resampling.BICUBIC))

    def _layers(self, tissue: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        """Abdominal wall, bright capsule and diaphragm; returns the parenchyma's depth range."""
        capsule = rng.uniform(0.10, 0.16) + rng.uniform(-0.04, 0.04) * self.theta
        wall = self.depth < capsule
        bands = 0.4 * (1 + 0.6 * np.sin(self.depth * rng.uniform(50, 80) + rng.uniform(0, 6)))
        tissue[wall] = bands[wall]
        tissue *= 1 + 2.0 * np.exp(-(((self.depth - capsule) / 0.008) ** 2))
        diaphragm = rng.uniform(0.86, 0.94) - 0.08 * self.theta**2 * rng.uniform(0, 3)
        tissue *= 1 + 2.0 * np.exp(-(((self.depth - diaphragm) / 0.012) ** 2))
        tissue[self.depth > diaphragm + 0.02] *= 0.3  # lung behind the diaphragm
        return float(capsule.mean()) + 0.06, float(diaphragm.mean()) - 0.08

    def _blob(
        self,
        tissue: np.ndarray,
        rng: np.random.Generator,
        bounds: tuple[float, float],
        radius: float,
        *,
        gain: float,
        irregular: float,
        edge: float,
        elongation: float = 1.0,
        wall: float = 0.0,
    ) -> None:
        """A soft-edged, possibly irregular ellipse multiplying the echo by ``gain`` inside."""
        size = self.size
        top, bottom = bounds
        depth = rng.uniform(top, max(top, bottom))
        angle = rng.uniform(-0.8, 0.8) * self.HALF_ANGLE
        r = self.r0 + depth * (self.r1 - self.r0)
        cy, cx = self.apex[0] + r * math.cos(angle), self.apex[1] + r * math.sin(angle)
        rx = radius * math.sqrt(elongation) * rng.uniform(0.8, 1.25)
        ry = radius / math.sqrt(elongation)
        reach = 1.6 * max(rx, ry) * (1 + irregular)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
        if y0 >= y1 or x0 >= x1:
            return
        dy, dx = self.yy[y0:y1, x0:x1] - cy, self.xx[y0:y1, x0:x1] - cx
        phi = rng.uniform(0, np.pi)
        u = (dx * math.cos(phi) + dy * math.sin(phi)) / rx
        v = (-dx * math.sin(phi) + dy * math.cos(phi)) / ry
        dist = np.hypot(u, v)
        if irregular > 0:  # lobulated border: the radius wobbles with the polar angle
            alpha = np.arctan2(v, u)
            wobble = 0.6 * np.sin(3 * alpha + rng.uniform(0, 6)) + 0.4 * np.sin(
                5 * alpha + rng.uniform(0, 6)
            )
            dist = dist / (1 + irregular * wobble)
        mask = 1 / (1 + np.exp(np.clip((dist - 1) / edge, -50, 50)))
        region = tissue[y0:y1, x0:x1]
        region *= 1 + (gain - 1) * mask
        if wall:
            region *= 1 + wall * np.exp(-(((dist - 1.05) / 0.08) ** 2))


def _gaussian_taps(sigma: float) -> np.ndarray:
    half = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(field: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Convolution along one axis by shifted adds: a few taps, far cheaper than an FFT."""
    half = len(taps) // 2
    pad = [(0, 0)] * field.ndim
    pad[axis] = (half, half)
    padded = np.pad(field, pad, mode="wrap")
    length = field.shape[axis]
    out = np.zeros_like(field)
    index: list[slice] = [slice(None)] * field.ndim
    for k, weight in enumerate(taps):
        index[axis] = slice(k, k + length)
        out += weight * padded[tuple(index)]
    return out


# ---------------------------------------------------------------------------------------------
# Notes


def _note(spec: CohortSpec, severity: float, rng: np.random.Generator) -> str:
    """A note whose correct findings describe ``severity``'s level (of five)."""
    classes, noise = spec.num_classes, spec.text_noise
    opener = _OPENERS[rng.integers(len(_OPENERS))].format(
        sex="男" if rng.random() < 0.5 else "女", age=int(rng.integers(25, 80))
    )
    n_neutral = int(rng.integers(1, 3) + rng.poisson(0.8 * noise))
    neutral = [_NEUTRAL[j] for j in rng.permutation(len(_NEUTRAL))[:n_neutral]]

    findings: list[str] = []
    if rng.random() >= min(0.9, NO_FINDINGS_SHARE * noise):  # else a note without findings
        used: set[str] = set()
        for _ in range(1 + rng.binomial(3, 0.5)):
            shown = severity
            if rng.random() >= spec.text_signal:
                shown = int(rng.integers(0, classes)) / (classes - 1)
            pool = _FINDINGS[round(shown * (len(_FINDINGS) - 1))]
            template = pool[rng.integers(len(pool))]
            if template in used:
                continue
            used.add(template)
            # Lesion sizes grow with severity, which separates classes sharing a level (C > 5).
            size_cm = (0.6 + 5.0 * shown) * rng.uniform(0.7, 1.3)
            findings.append(template.format(size=f"{size_cm:.1f}", kg=int(rng.integers(3, 12))))

    closer = [_CLOSERS[rng.integers(len(_CLOSERS))]] if rng.random() < 0.5 else []
    while 1 + len(neutral) + len(findings) + len(closer) > 8 and neutral:
        neutral.pop()  # notes are capped at eight sentences; findings are kept
    sentences = [opener, *neutral, *findings, *closer]
    while len(sentences) < 3:
        sentences.insert(1, _NEUTRAL[rng.integers(len(_NEUTRAL))])
    return _typos("".join(sentences), 0.03 * noise, rng)


def _typos(text: str, rate: float, rng: np.random.Generator) -> str:
    if rate <= 0:
        return text
    hits = rng.random(len(text)) < rate
    kinds = rng.integers(0, 3, len(text))
    subs = rng.integers(0, len(_TYPO_CHARS), len(text))
    out: list[str] = []
    start = 0
    # Only the few hit characters are visited; the text between them is copied in slices.
    for i in np.flatnonzero(hits).tolist():
        out.append(text[start:i])
        if kinds[i] == 0:
            out.append(_TYPO_CHARS[subs[i]])
        elif kinds[i] == 2:
            out.append(text[i] * 2)
        # kind 1: the character is dropped
        start = i + 1
    out.append(text[start:])
    return "".join(out)
