"""Frozen, validated configuration objects.

The CLI builds these from options, the engine consumes them and the bundle stores their
``asdict()`` so a model can be rebuilt from primitives alone (no pickled objects).

Over 500 lines because it declares every config (data, images, notes, method, training) with
the checks of each field, one place for what a valid setting is; the code around them is short.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from omnifuse_cli.errors import ConfigError

MODALITY_KINDS = ("vector", "image", "text")
# Backbones accepted without importing torchvision, so checking a default config stays instant.
IMAGE_BACKBONES = ("resnet18", "resnet34", "resnet50")
# torchvision classifiers that are no image trunk here: squeezenet ends in a convolution (no
# Linear layer to drop); googlenet and inception_v3 are built differently for ImageNet weights
# (auxiliary heads, an input transform).
_NOT_IMAGE_TRUNKS = ("googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1")
# Closed sets of choices are Literal types: a config checks its value once, when it is built, and
# mypy checks every comparison deep inside against the set.
FinetuneImageScope = Literal["none", "layer4", "layer3+", "all"]
TextEncoderKind = Literal["simple", "hf"]
InferenceRule = Literal["label-free", "joint", "mean"]
JointInput = Literal["latents", "slots", "both"]
ImputationLoss = Literal["normalized", "paper"]
# --eval-metric: "auto" is macro-F1 for one model, AUROC (two classes) or log loss (more) for a
# bagged one (engine/presets.resolve_metric); "loss" is the older spelling of log_loss.
SelectMetric = Literal[
    "auto", "auroc", "log_loss", "loss", "macro_f1", "balanced_accuracy", "accuracy"
]
# An --eval-metric's key in the metrics dicts (engine.metrics.classification_metrics).
METRIC_KEYS = {"log_loss": "loss", "accuracy": "acc", "balanced_accuracy": "balanced_acc"}
Preset = Literal["fast", "medium", "best"]
Pretrained = Literal["auto", "yes", "no"]
OnBadFile = Literal["error", "skip"]
OnEmptyPatient = Literal["skip", "error"]
Calibration = Literal["temperature", "none"]
ON_BAD_FILE: tuple[str, ...] = get_args(OnBadFile)
ON_EMPTY_PATIENT: tuple[str, ...] = get_args(OnEmptyPatient)
LabsLayout = Literal["auto", "wide", "long"]  # --labs-format (data/labs.py)
LabsAgg = Literal["last", "first", "mean", "min", "max"]  # --labs-agg
LABS_FORMATS: tuple[str, ...] = get_args(LabsLayout)
LABS_AGGS: tuple[str, ...] = get_args(LabsAgg)
T = TypeVar("T")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _check(condition: bool, message: str, hint: str | None = None) -> None:
    if not condition:
        raise ConfigError(message, hint=hint)


def check_choice(value: str, choices: Any, option: str) -> None:
    """A ConfigError naming the option and its choices (a tuple or a Literal type) when
    ``value`` is not one of them."""
    choices = get_args(choices) or choices
    _check(
        value in choices,
        f"{option} {value!r} is not supported",
        f"choose one of {', '.join(choices)}",
    )


@dataclass(frozen=True)
class ModalitySpec:
    """One manifest column and how to read and encode it."""

    name: str  # manifest column, also the name shown to users
    kind: str  # vector | image | text

    def __post_init__(self) -> None:
        _check(
            bool(_NAME_RE.match(self.name)),
            f"modality name {self.name!r} is not a valid column name",
            "use letters, digits, '_' or '-', starting with a letter",
        )
        _check(
            self.kind in MODALITY_KINDS,
            f"modality {self.name!r} has unknown kind {self.kind!r}",
            f"choose one of {', '.join(MODALITY_KINDS)}",
        )


DEFAULT_MODALITIES: tuple[ModalitySpec, ...] = (
    ModalitySpec("labs", "vector"),
    ModalitySpec("us", "image"),
    ModalitySpec("text", "text"),
)


def parse_modality_options(values: list[str] | None) -> tuple[ModalitySpec, ...]:
    """Turn repeated ``--modality NAME=KIND`` options into specs (defaults when none given)."""
    if not values:
        return DEFAULT_MODALITIES
    specs: list[ModalitySpec] = []
    for raw in values:
        name, sep, kind = raw.partition("=")
        _check(
            bool(sep) and bool(name.strip()) and bool(kind.strip()),
            f"--modality {raw!r} is not NAME=KIND",
            "write e.g. --modality labs=vector --modality ct=image --modality report=text",
        )
        specs.append(ModalitySpec(name.strip(), kind.strip().lower()))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"--modality declares {', '.join(dupes)} more than once")
    return tuple(specs)


def image_backbones() -> tuple[str, ...]:
    """Every torchvision classification model that --image-backbone accepts."""
    import torchvision  # here, not at the top: `omnifuse --help` must not wait for it

    return tuple(
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if name not in _NOT_IMAGE_TRUNKS
    )


@dataclass(frozen=True)
class ImageConfig:
    """How image modalities are read and encoded."""

    backbone: str = "resnet34"  # torchvision classification model without its classifier
    image_size: int = 224  # Resize(size) + CenterCrop(size), as the seed
    max_images: int = 4  # views kept per patient (the first ones in the cell)
    pretrained: Pretrained = "auto"  # auto: ImageNet weights if cached locally, else random init
    weights_path: str | None = None  # local state dict, for offline hospital machines

    def __post_init__(self) -> None:
        if self.backbone not in IMAGE_BACKBONES:
            check_choice(self.backbone, image_backbones(), "--image-backbone")
        _check(self.image_size >= 16, f"--image-size must be >= 16, got {self.image_size}")
        _check(self.max_images >= 1, f"--max-us-images must be >= 1, got {self.max_images}")
        check_choice(self.pretrained, Pretrained, "pretrained")


@dataclass(frozen=True)
class TextConfig:
    """How text modalities are tokenised and encoded."""

    encoder: TextEncoderKind = (
        "simple"  # simple: offline char/word n-grams; hf: transformers AutoModel
    )
    model: str = "bert-base-chinese"  # hf: local folder or hub name
    max_length: int = 256  # hf: tokens per note
    # simple: tf-idf over word 1..ngrams-grams and Chinese character 1..ngrams+1-grams with
    # sublinear term frequency, the n-grams of at least min_freq training notes (at most
    # vocab_size, a cap for memory, not a size), at most max_ngrams distinct n-grams per note
    ngrams: int = 2
    sublinear_tf: bool = True
    vocab_size: int = 200_000
    min_freq: int = 2  # document frequency
    max_ngrams: int = 4096

    def __post_init__(self) -> None:
        check_choice(self.encoder, TextEncoderKind, "--text-encoder")
        _check(self.max_length >= 8, f"--text-max-length must be >= 8, got {self.max_length}")
        _check(self.vocab_size >= 10, f"text vocabulary size must be >= 10, got {self.vocab_size}")
        _check(1 <= self.ngrams <= 4, f"--text-ngrams must be in 1..4, got {self.ngrams}")
        _check(self.min_freq >= 1, f"--text-min-df must be >= 1, got {self.min_freq}")
        _check(self.max_ngrams >= 8, f"max_ngrams must be >= 8, got {self.max_ngrams}")


def parse_class_weight(text: str, num_classes: int | None) -> tuple[float, ...] | str | None:
    """--class-weight: "none" -> None, "balanced" -> "balanced", "1,2.5,1" -> the weights (one
    per class when ``num_classes`` is known, each > 0)."""
    value = str(text).strip().lower()
    if value in ("none", "balanced"):
        return None if value == "none" else "balanced"
    try:
        weights = tuple(float(v) for v in value.split(","))
    except ValueError:
        weights = ()
    _check(
        bool(weights) and all(w > 0 and math.isfinite(w) for w in weights),
        f"--class-weight {text!r} is not understood",
        "use none, balanced, or one positive weight per class such as 1,3",
    )
    _check(
        num_classes is None or len(weights) == num_classes,
        f"--class-weight gives {len(weights)} weight(s) for {num_classes} classes",
        "give one weight per class, in class order",
    )
    return weights


@dataclass(frozen=True)
class MethodConfig:
    """The OmniFuse objective, its ablation switches and the options of method.md Sec. 5.

    The paper's own settings: imputation_loss="paper", lambda0=1, reliability="1",
    slot_flags=False, joint_input="latents", drop_full_view=False, tla_min_patients=1.
    """

    embed_dim: int = 128  # d, each modality's embedding (MMIN's 128)
    # RA encoder widths, the last is the latent c_k. MMIN's 256-128-64 (2.8M parameters in the
    # two cascades) is sized for thousands of patients; 128-32 (0.9M) suits a few hundred.
    ra_layers: tuple[int, ...] = (128, 32)
    num_ra: int = 5  # K residual autoencoders in each cascade
    head_hidden: int = 64  # hidden width of the per-modality and joint classifiers
    dropout: float = 0.1
    cra_dropout: float = 0.2  # dropout inside the residual autoencoders
    alpha: float = 0.1  # weight of the joint RA-latent head (Eq. 14)
    beta: float = 0.5  # exponent of the DWFuse weights (Eq. 10)
    lambda0: float = 10.0  # L_forward (the paper's 1; the normalized loss is on the CE's scale)
    lambda1: float = 1.0  # backward cycle loss (Eq. 18)
    lambda2: float = 10.0  # DWFuse loss
    lambda3: float = 0.5  # TLA loss
    modality_drop: float = 0.3  # training-time drop rate (every variant; supervises imputation)
    drop_full_view: bool = True  # also supervise the undropped view of each batch
    imputation_loss: ImputationLoss = (
        "normalized"  # normalized: dropped slots, standardised; paper: Eq. 7
    )
    reliability: str = "auto"  # gate of imputed slots: auto (estimated) or a fixed 0..1
    slot_flags: bool = True  # heads see whether their slot is observed or imputed
    joint_input: JointInput = "latents"  # joint head on CRA latents, fused slots, or both (without
    # imputation there are no latents: the joint head always takes the slots)
    tla_min_patients: int = 20  # fewer patients with a combination: TLA may not pick it
    use_imputation: bool = True
    use_backward: bool = True
    use_dwfuse: bool = True
    use_tla: bool = True
    inference_rule: InferenceRule = "label-free"
    # A logistic regression on the sparse inputs (tf-idf n-grams, labs), fitted after training
    # and blended with OmniFuse's output on validation (method.md Sec. 5.6, model/linear.py).
    linear_path: bool = True

    @property
    def loss_weights(self) -> dict[str, float]:
        """Eq. 18's weight of each loss term, in the order the total adds them."""
        return {
            "forward": self.lambda0,
            "backward": self.lambda1,
            "dwfuse": self.lambda2,
            "tla": self.lambda3,
        }

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 4, f"embed_dim must be >= 4, got {self.embed_dim}")
        _check(self.num_ra >= 1, f"--num-ra must be >= 1, got {self.num_ra}")
        _check(
            len(self.ra_layers) >= 1 and all(w >= 1 for w in self.ra_layers),
            f"--ra-layers needs positive widths, got {self.ra_layers}",
        )
        _check(0.0 <= self.modality_drop < 1.0, "--modality-drop must be in [0, 1)")
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        _check(0.0 <= self.cra_dropout < 1.0, "--cra-dropout must be in [0, 1)")
        for name in ("alpha", "beta", "lambda0", "lambda1", "lambda2", "lambda3"):
            _check(getattr(self, name) >= 0, f"--{name} must be >= 0")
        check_choice(self.inference_rule, InferenceRule, "--inference-rule")
        check_choice(self.joint_input, JointInput, "--joint-input")
        check_choice(self.imputation_loss, ImputationLoss, "--imputation-loss")
        _check(self.tla_min_patients >= 1, "--tla-min-patients must be >= 1")
        _check(
            self.reliability == "auto" or _unit_number(self.reliability),
            f"--reliability must be auto or a number in [0, 1], got {self.reliability!r}",
        )
        # Without DWFuse the one classifier on the concatenation is the joint head, so "joint"
        # names what label-free does then; only "mean" needs the per-modality heads.
        _check(
            self.use_dwfuse or self.inference_rule in ("label-free", "joint"),
            f"--inference-rule {self.inference_rule} needs DWFuse's modality heads "
            "(drop --no-dwfuse)",
            "without DWFuse the concatenation's classifier is the joint head: "
            "--inference-rule joint or label-free",
        )


def _unit_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return 0.0 <= value <= 1.0


# The paper's reading of every option added in method.md Sec. 5 (Eqs. 1-18 untouched).
PAPER_OPTIONS: dict[str, Any] = {
    "lambda0": 1.0,
    "drop_full_view": False,
    "imputation_loss": "paper",
    "reliability": "1",
    "slot_flags": False,
    "joint_input": "latents",
    "tla_min_patients": 1,
    "linear_path": False,
}
# What bundles and run requests written before these options existed were trained with
# (cra_dropout None: the model's dropout, which the CRA used then).
LEGACY_METHOD: dict[str, Any] = {**PAPER_OPTIONS, "cra_dropout": None}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model: data-derived sizes plus the method."""

    modalities: tuple[ModalitySpec, ...]
    num_classes: int
    input_dims: tuple[int, ...]  # per modality: vector length, vocabulary size or feature width
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        _check(len(self.modalities) >= 1, "at least one modality is needed")
        _check(
            len(self.input_dims) == len(self.modalities),
            "input_dims must give one size per modality",
        )
        _check(self.num_classes >= 2, f"--num-classes must be >= 2, got {self.num_classes}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, split and schedule."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4  # heads, encoders trained from scratch, CRA (chosen on validation)
    weight_decay: float = 1e-4
    warmup_epochs: int = 5  # backbones frozen (features cached); then fine-tuning if asked
    finetune_image_scope: FinetuneImageScope = (
        "none"  # none keeps the image backbone frozen for the whole run
    )
    finetune_text_last_n: int = 0  # hf text: transformer layers unfrozen after warm-up
    lr_image: float = 1e-4
    lr_text: float = 2e-5
    seed: int = 42
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA only; CPU always runs fp32
    tla_sample: int = 512  # training patients used to mine the lazy combination each epoch
    # --eval-metric: the score that picks the best epoch, stops early, weighs the ensemble and
    # is reported first ("auto": engine/presets.resolve_metric).
    select_metric: SelectMetric = "auto"
    patience: int = 0  # stop after this many epochs without a better score (0: never)
    preset: Preset = "medium"  # what set the defaults (settings.PRESETS); recorded in meta.csv
    # Settings left to the cohort-size rule (engine/presets.adapt_to_cohort): batch_size, lr,
    # epochs, patience when neither the user nor the preset gave them.
    cohort_defaults: tuple[str, ...] = ()
    bag_folds: int = 0  # >= 2: K models on K stratified folds of the training patients
    ensemble: bool = False  # greedy ensemble of the bag and classical members (engine/ensemble)
    time_limit: float = 0.0  # seconds of wall clock for the whole run (0: none)
    # Loss weight of each class: none, balanced (n / (C * n_c) on the training patients) or
    # explicit weights "1,2.5" (one per class, in class order).
    class_weight: str = "none"
    calibrate: Calibration = (
        "temperature"  # one temperature fitted on validation (engine/posthoc.py)
    )
    positive_class: str | None = None  # binary: the last class; C > 2: one-vs-rest if given
    threshold: str = "youden"  # operating point rule (engine/thresholds.parse_threshold_rule)
    encode_batch_size: int = 32
    num_workers: int = 0
    cache: bool = True  # frozen features on disk (data/cache.py), reused by later runs
    cache_dir: str | None = None  # None: $OMNIFUSE_CACHE_DIR or ~/.cache/omnifuse/features
    threads: int | None = None  # torch's CPU threads; None: the usable cores (engine.machine)

    def __post_init__(self) -> None:
        _check(
            self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"
        )
        _check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        check_choice(self.finetune_image_scope, FinetuneImageScope, "--finetune-image-scope")
        _check(
            self.finetune_text_last_n >= 0,
            f"--finetune-text-last-n must be >= 0, got {self.finetune_text_last_n}",
        )
        if self.test_ratio == 0 and abs(self.train_ratio + self.val_ratio - 1.0) > 1e-6:
            # --test-ratio 0 alone: the test share goes to training (0.8/0.1/0 -> 0.9/0.1/0).
            object.__setattr__(self, "train_ratio", round(1.0 - self.val_ratio, 10))
        ratios = (self.train_ratio, self.val_ratio, self.test_ratio)
        _check(
            0.0 < self.train_ratio < 1.0
            and 0.0 < self.val_ratio < 1.0
            and 0.0 <= self.test_ratio < 1.0,
            f"split ratios must each be in (0, 1) (--test-ratio may be 0), got {ratios}",
        )
        _check(
            abs(sum(ratios) - 1.0) < 1e-6,
            f"--train-ratio + --val-ratio + --test-ratio must be 1, got {sum(ratios):.3f}",
        )
        _check(
            bool(re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", self.device)),
            f"--device {self.device!r} is not understood",
            "use auto, cpu, cuda or cuda:N",
        )
        _check(self.tla_sample >= 1, "tla_sample must be >= 1")
        _check(self.patience >= 0, f"--patience must be >= 0, got {self.patience}")
        check_choice(self.select_metric, SelectMetric, "--eval-metric")
        check_choice(self.preset, Preset, "--preset")
        _check(
            self.bag_folds == 0 or self.bag_folds >= 2,
            f"--bag-folds must be 0 (no bagging) or >= 2, got {self.bag_folds}",
        )
        _check(self.time_limit >= 0, f"--time-limit must be >= 0, got {self.time_limit}")
        _check(
            not self.ensemble or self.bag_folds >= 2,
            "--ensemble weighs models on out-of-fold predictions: it needs --bag-folds K >= 2",
            "add --bag-folds 5, or --no-ensemble",
        )
        check_choice(self.calibrate, Calibration, "--calibrate")
        parse_class_weight(self.class_weight, None)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to read the manifest."""

    modalities: tuple[ModalitySpec, ...] = DEFAULT_MODALITIES
    labs_table: str | None = None
    labs_id_col: str = "id"
    on_bad_file: OnBadFile = "error"  # unreadable image files: error, or skip (modality missing)
    labs_format: LabsLayout = (
        "auto"  # labs table layout: wide (a column per analyte), long, or auto
    )
    labs_agg: LabsAgg = "last"  # long labs: one value per patient and analyte (last by time, ...)
    encoding: str = "auto"  # note files and the manifest: auto (BOM, UTF-8, detected) or a name
    on_empty_patient: OnEmptyPatient = (
        "skip"  # patients without any modality: skip (left out) or error
    )
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        _check(
            self.on_bad_file in ON_BAD_FILE,
            f"--on-bad-file must be error or skip, got {self.on_bad_file!r}",
        )
        check_choice(self.labs_format, LABS_FORMATS, "--labs-format")
        check_choice(self.labs_agg, LABS_AGGS, "--labs-agg")
        check_choice(self.on_empty_patient, ON_EMPTY_PATIENT, "--on-empty-patient")


def to_primitive(obj: Any) -> Any:
    """asdict() with tuples turned into lists, for JSON."""
    raw = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return _listify(raw)


def _listify(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


# What bundles and run requests written before the n-gram tf-idf existed were trained with:
# words, Chinese characters and pairs, binary term frequency, max_length n-grams per note.
LEGACY_TEXT: dict[str, Any] = {"ngrams": 1, "sublinear_tf": False}


def _legacy_method(raw: dict[str, Any]) -> dict[str, Any]:
    """Older files get the method settings they were trained with, not today's defaults."""
    for key, value in LEGACY_METHOD.items():
        if key not in raw:
            raw[key] = raw.get("dropout", 0.1) if value is None else value
    return raw


def _legacy_text(raw: dict[str, Any]) -> dict[str, Any]:
    """Older files keep their tokenizer."""
    text = {**LEGACY_TEXT, **raw}
    text.setdefault("max_ngrams", text.get("max_length", 256))
    return text


# How a saved config written before a setting existed reads today: the setting it was used with.
_LEGACY: dict[type, Callable[[dict[str, Any]], dict[str, Any]]] = {
    MethodConfig: _legacy_method,
    TextConfig: _legacy_text,
}


def from_primitive(cls: type[T], raw: Mapping[str, Any]) -> T:
    """The one way back from to_primitive: rebuild a (nested, frozen) dataclass from saved
    JSON primitives (lists become the tuples the field types name, dicts the dataclasses, str
    the Paths), with the settings older files were written under (_LEGACY). Requests, cv
    requests and bundles are all read with it."""
    fill = _LEGACY.get(cls)
    values = fill(dict(raw)) if fill else dict(raw)
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: _coerce(hints[f.name], values[f.name])
        for f in fields(cls)  # type: ignore[arg-type]
        if f.name in values
    }
    return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and is_dataclass(hint) and isinstance(value, dict):
        return from_primitive(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(_coerce(args[0] if args else Any, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (
                is_dataclass(arg) or typing.get_origin(arg) is tuple or arg is Path
            ):
                return _coerce(arg, value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value
