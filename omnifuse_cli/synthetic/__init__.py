"""Synthetic three-modality cohorts for `omnifuse make-data`: labs, ultrasound PNGs, Chinese notes.

The package sits beside ``data/`` and holds the generator by concern: ``spec`` (CohortSpec: what
to generate, validated), ``labs`` (lab panels), ``ultrasound`` (B-mode views), ``notes``
(clinical note text) and ``cohort`` (drawing the patients and writing the files). This
docstring explains the cohort as a whole and every knob of CohortSpec.

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

from omnifuse_cli.synthetic.cohort import CohortSummary, DrawnCohort, draw_cohort, make_cohort
from omnifuse_cli.synthetic.spec import CohortSpec, severities

__all__ = [
    "CohortSpec",
    "CohortSummary",
    "DrawnCohort",
    "draw_cohort",
    "make_cohort",
    "severities",
]
