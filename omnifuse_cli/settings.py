"""Every model and training setting of omnifuse, declared once: its name, default, type, flag
and help. `omnifuse train`'s options, `cv`'s shared options and `--variant` flags, the keys of
`--config` files and `omnifuse config init`, and the keyword arguments of the Python API
(`omnifuse_cli.api.train`, `OmniFuseClassifier`) all come from SETTINGS; `build_configs` turns a
set of values into DataConfig/MethodConfig/TrainConfig.

Adding a setting: add its `Setting` here (in the order --help should list it). When it goes
unchanged to a config field of the same name (`lr` -> TrainConfig.lr, `embed_dim` ->
MethodConfig.embed_dim, `image_backbone` -> ImageConfig.backbone, `no_tla` -> MethodConfig.use_tla
negated) that is all; otherwise add its line to CONVERTERS; when it decides which patients or
values are read, add it to DATA_READING (cv variants may not change it). tests/test_cv.py builds
every setting through train and cv (a new text setting needs an example value in its EXAMPLES).

Over 500 lines because SETTINGS is a declaration table (one entry per setting, ~9 lines each
after formatting); the code around it is short.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnifuse_cli.config import (
    DataConfig,
    ImageConfig,
    MethodConfig,
    TextConfig,
    TrainConfig,
    parse_modality_options,
)
from omnifuse_cli.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` is the API keyword and the parameter name; ``flag`` the command-line
    spelling (``--amp/--no-amp`` for a switch pair; the config-file key is its first flag without
    dashes); ``kind`` the type of one value (a repeatable option takes a list of them)."""

    name: str
    default: Any
    kind: type
    flag: str
    help: str = ""
    optional: bool = False  # None is a value (its meaning is in show_default)
    many: bool = False  # repeatable: a list of values
    min: float | None = None
    max: float | None = None
    show_default: bool | str = True

    @property
    def key(self) -> str:
        """The setting's key in a --config file."""
        return self.flag.split("/")[0].lstrip("-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "labs_table",
        None,
        Path,
        "--labs-table",
        help=(
            "One CSV of lab values for all patients (id column + one column per analyte);"
            " replaces the manifest's labs cells."
        ),
        optional=True,
    ),
    Setting(
        "labs_id_col",
        None,
        str,
        "--labs-id-col",
        help="Id column of --labs-table.",
        optional=True,
        show_default="id; evaluate and predict: the run's",
    ),
    Setting(
        "modality",
        None,
        str,
        "--modality",
        help=(
            "Declare a manifest column as a modality, NAME=KIND with KIND vector, image "
            "or text; repeat for each."
        ),
        optional=True,
        many=True,
        show_default="labs=vector us=image text=text",
    ),
    Setting(
        "on_bad_file",
        "error",
        str,
        "--on-bad-file",
        help=(
            "Unreadable image files (missing, corrupt, truncated, unsupported): error "
            "lists them all; skip drops them and treats the modality as missing where "
            "none are left."
        ),
    ),
    Setting(
        "labs_format",
        "auto",
        str,
        "--labs-format",
        help=(
            "Layout of --labs-table: wide (one row per patient, a column per analyte), "
            "long (one row per measurement: id, analyte, value, optional time and unit) "
            "or auto (from the columns)."
        ),
    ),
    Setting(
        "labs_agg",
        "last",
        str,
        "--labs-agg",
        help=(
            "Long labs with several values of one analyte for a patient: last or first "
            "(by time, else by row order), mean, min or max."
        ),
    ),
    Setting(
        "encoding",
        "auto",
        str,
        "--encoding",
        help=(
            "Encoding of note files (and of the manifest): auto (a BOM decides, else "
            "UTF-8, else UTF-16, Windows-1252 or GB18030 by what the text looks like; "
            "check names every guessed file) or a name such as utf-8, gb18030, cp1252, "
            "latin-1, utf-16."
        ),
    ),
    Setting(
        "on_empty_patient",
        "skip",
        str,
        "--on-empty-patient",
        help=(
            "Patients without any modality: skip leaves them out with a warning (recorded"
            " as excluded in split_assignment.csv); error refuses the manifest."
        ),
    ),
    Setting(
        "preset",
        "medium",
        str,
        "--preset",
        help=(
            "fast (plain concatenation, 10 epochs), medium (the OmniFuse method) or best "
            "(5 bagged models + a greedy ensemble with TF-IDF/logistic and gradient-boosting "
            "members); options given explicitly win over the preset (README: Presets)."
        ),
    ),
    Setting(
        "eval_metric",
        "auto",
        str,
        "--eval-metric",
        help=(
            "The score that picks the best epoch, stops early, weighs the ensemble and is "
            "reported first: auroc, log_loss, macro_f1, balanced_accuracy, accuracy, or auto "
            "(macro_f1 for one model; with --bag-folds auroc for two classes, log_loss "
            "for more)."
        ),
    ),
    Setting(
        "time_limit",
        None,
        float,
        "--time-limit",
        help=(
            "Seconds of wall clock for the whole run: training plans for it, stops cleanly "
            "when it runs out and keeps the best model so far (meta.csv says what finished)."
        ),
        optional=True,
        show_default="none",
        min=1,
    ),
    Setting(
        "bag_folds",
        None,
        int,
        "--bag-folds",
        help=(
            "Train K models on K stratified folds of the training patients, each stopped "
            "on its own out-of-fold part, and average them (0: one model with a validation "
            "split)."
        ),
        optional=True,
        show_default="the preset's: 0, best: 5",
        min=0,
    ),
    Setting(
        "ensemble",
        None,
        bool,
        "--ensemble/--no-ensemble",
        help=(
            "With --bag-folds: weigh the bag and classical members (TF-IDF + logistic "
            "regression, gradient boosting) on the same folds by greedy selection on "
            "out-of-fold predictions."
        ),
        optional=True,
        show_default="the preset's: best on",
    ),
    Setting(
        "epochs",
        None,
        int,
        "--epochs",
        help="Passes over the training patients.",
        optional=True,
        show_default="auto: 30, fewer past 20,000 training patients",
        min=1,
    ),
    Setting(
        "batch_size",
        None,
        int,
        "--batch-size",
        help="Patients per batch.",
        optional=True,
        show_default="auto: 32, larger past 20,000 training patients",
        min=1,
    ),
    Setting(
        "lr",
        None,
        float,
        "--lr",
        help="Learning rate of everything but pretrained backbones.",
        optional=True,
        show_default="auto: 0.0003, scaled with the batch size",
    ),
    Setting(
        "weight_decay",
        0.0001,
        float,
        "--weight-decay",
    ),
    Setting(
        "seed",
        42,
        int,
        "--seed",
    ),
    Setting(
        "train_ratio",
        0.8,
        float,
        "--train-ratio",
    ),
    Setting(
        "val_ratio",
        0.1,
        float,
        "--val-ratio",
    ),
    Setting(
        "test_ratio",
        0.1,
        float,
        "--test-ratio",
        help=(
            "0: no internal test split (evaluate an external cohort with omnifuse "
            "evaluate RUN --manifest TEST.csv)."
        ),
    ),
    Setting(
        "device",
        "auto",
        str,
        "--device",
        help="auto (CUDA when available), cpu, cuda or cuda:N.",
    ),
    Setting(
        "threads",
        None,
        int,
        "--threads",
        help="CPU threads torch may use.",
        optional=True,
        min=1,
        show_default="the usable cores (CPU affinity, cgroup limit, OMP_NUM_THREADS)",
    ),
    Setting(
        "amp",
        True,
        bool,
        "--amp/--no-amp",
        help="bf16 autocast on CUDA (CPU always runs fp32).",
    ),
    Setting(
        "image_backbone",
        "resnet34",
        str,
        "--image-backbone",
        help=(
            "Any torchvision classification model by name (resnet18, resnet50, "
            "densenet121, efficientnet_b0, convnext_tiny, mobilenet_v2, "
            "mobilenet_v3_large, ...; not googlenet, inception_v3 or squeezenet), without"
            " its classifier. For non-ResNets, --finetune-image-scope layer4 means the "
            "last block of its features and layer3+ the last two."
        ),
    ),
    Setting(
        "image_size",
        224,
        int,
        "--image-size",
        help="Resize + CenterCrop side.",
    ),
    Setting(
        "max_us_images",
        4,
        int,
        "--max-us-images",
        help="Images kept per patient.",
        min=1,
    ),
    Setting(
        "pretrained_image",
        None,
        bool,
        "--pretrained-image/--no-pretrained-image",
        help=(
            "ImageNet weights for the image backbone: --pretrained-image downloads them "
            "if needed (error when offline); --no-pretrained-image starts from random "
            "weights; by default they are used when already in the local torch cache."
        ),
        optional=True,
        show_default=False,
    ),
    Setting(
        "image_weights",
        None,
        Path,
        "--image-weights",
        help=(
            "Local state dict of that torchvision model (.pth/.safetensors) for offline machines."
        ),
        optional=True,
    ),
    Setting(
        "text_encoder",
        "simple",
        str,
        "--text-encoder",
        help="simple (offline n-grams, works for Chinese) or hf (transformers).",
    ),
    Setting(
        "text_model",
        "bert-base-chinese",
        str,
        "--text-model",
        help="hf: local folder or hub name.",
    ),
    Setting(
        "text_max_length",
        256,
        int,
        "--text-max-length",
        help="hf: tokens per note.",
    ),
    Setting(
        "text_ngrams",
        2,
        int,
        "--text-ngrams",
        help="simple: word n-grams up to N (Chinese characters up to N+1) in the tf-idf.",
        min=1,
        max=4,
    ),
    Setting(
        "text_min_df",
        2,
        int,
        "--text-min-df",
        help="simple: n-grams of fewer training notes are unknown.",
        min=1,
    ),
    Setting(
        "freeze_text",
        False,
        bool,
        "--freeze-text",
        help="Keep the hf text model frozen for the whole run.",
    ),
    Setting(
        "warmup_epochs",
        5,
        int,
        "--warmup-epochs",
        help="Epochs with frozen backbones before fine-tuning.",
        min=0,
    ),
    Setting(
        "finetune_image_scope",
        "none",
        str,
        "--finetune-image-scope",
        help=(
            "After warm-up, unfreeze none, layer4, layer3+ or all of the image backbone "
            "(none keeps features cached: fastest on CPU)."
        ),
    ),
    Setting(
        "finetune_text_last_n",
        0,
        int,
        "--finetune-text-last-n",
        help="After warm-up, unfreeze the last N transformer layers of the hf text model.",
        min=0,
    ),
    Setting(
        "lr_image",
        0.0001,
        float,
        "--lr-image",
    ),
    Setting(
        "lr_text",
        2e-05,
        float,
        "--lr-text",
    ),
    Setting(
        "no_imputation",
        False,
        bool,
        "--no-imputation",
        help="Ablation: no CRA; missing slots keep the missing embedding.",
    ),
    Setting(
        "no_backward",
        False,
        bool,
        "--no-backward",
        help="Ablation: forward imputation only, no cycle.",
    ),
    Setting(
        "no_dwfuse",
        False,
        bool,
        "--no-dwfuse",
        help="Ablation: one classifier on the concatenation.",
    ),
    Setting(
        "no_tla",
        False,
        bool,
        "--no-tla",
        help="Ablation: no laziness activation.",
    ),
    Setting(
        "inference_rule",
        "label-free",
        str,
        "--inference-rule",
        help="label-free (DWFuse rule), joint (RA head only) or mean (of modality heads).",
    ),
    Setting(
        "modality_drop",
        0.3,
        float,
        "--modality-drop",
        help=(
            "Training-time modality dropout (every variant): each present modality hidden"
            " with this probability, one always kept."
        ),
    ),
    Setting(
        "drop_full_view",
        True,
        bool,
        "--drop-full-view/--no-drop-full-view",
        help="Supervise the undropped view of each batch as well as the dropped one.",
    ),
    Setting(
        "reliability",
        "auto",
        str,
        "--reliability",
        help=(
            "Gate of imputed slots: auto (each modality's imputation R^2 on validation, "
            "re-estimated every epoch), or a fixed number in [0, 1]: 0 = imputed slots "
            "never count (as --no-imputation), 1 = the paper's rule."
        ),
    ),
    Setting(
        "slot_flags",
        True,
        bool,
        "--slot-flags/--no-slot-flags",
        help="Modality heads see whether their slot is observed or imputed.",
    ),
    Setting(
        "joint_input",
        "latents",
        str,
        "--joint-input",
        help=("Joint head input: latents (CRA latents, the paper), slots (fused slots) or both."),
    ),
    Setting(
        "imputation_loss",
        "normalized",
        str,
        "--imputation-loss",
        help=(
            "normalized (standardised slots, dropped slots only) or paper (Eq. 7 with the"
            " complementary target)."
        ),
    ),
    Setting(
        "lambda0",
        10.0,
        float,
        "--lambda0",
        help="Weight of the forward imputation loss (the paper's is 1).",
    ),
    Setting(
        "ra_layers",
        "128,32",
        str,
        "--ra-layers",
        help=(
            "Residual autoencoder widths, comma-separated; the last is the latent "
            "(MMIN's: 256,128,64)."
        ),
    ),
    Setting(
        "num_ra",
        5,
        int,
        "--num-ra",
        help="Residual autoencoders per cascade (K).",
        min=1,
    ),
    Setting(
        "cra_dropout",
        0.2,
        float,
        "--cra-dropout",
        help="Dropout inside the residual autoencoders.",
    ),
    Setting(
        "tla_min_patients",
        20,
        int,
        "--tla-min-patients",
        help=("TLA only picks a combination that at least this many mined training patients have."),
        min=1,
    ),
    Setting(
        "linear_path",
        True,
        bool,
        "--linear-path/--no-linear-path",
        help=(
            "After training, fit a logistic regression on the sparse inputs (tf-idf "
            "n-grams of simple-encoder notes, lab values) and blend it with OmniFuse by "
            "validation log loss."
        ),
    ),
    Setting(
        "select_by",
        None,
        str,
        "--select-by",
        help="Older spelling of --eval-metric (loss = log_loss); wins when given.",
        optional=True,
        show_default="--eval-metric",
    ),
    Setting(
        "patience",
        None,
        int,
        "--patience",
        optional=True,
        show_default="auto: 0, 3 past 20,000 training patients",
        help=(
            "Stop after this many epochs without a better validation --eval-metric score, "
            "keeping the best epoch (0: train every epoch)."
        ),
        min=0,
    ),
    Setting(
        "class_weight",
        "none",
        str,
        "--class-weight",
        help=(
            "Weight of each class in every loss term that sees labels: none, balanced "
            "(inverse class frequency on the training patients) or one weight per class "
            "in class order, e.g. 1,3."
        ),
    ),
    Setting(
        "calibrate",
        "temperature",
        str,
        "--calibrate",
        help=(
            "temperature: fit one temperature on the validation split by log loss after "
            "the best epoch (stored in the bundle, applied by evaluate, predict and cv); "
            "none: keep the raw probabilities. Validation splits under 30 patients are "
            "not calibrated (a note says so)."
        ),
    ),
    Setting(
        "positive_class",
        None,
        str,
        "--positive-class",
        help=(
            "Class called positive by the operating point: binary tasks default to the "
            "second class (1); with more classes, one-vs-rest for this class."
        ),
        optional=True,
    ),
    Setting(
        "threshold",
        "youden",
        str,
        "--threshold",
        help=(
            "Operating point chosen on validation for the positive class: youden, f1, "
            "sens=0.9, spec=0.9, ppv=0.5 or npv=0.95 (the most specific / most sensitive "
            "threshold that meets the target)."
        ),
    ),
    Setting(
        "embed_dim",
        128,
        int,
        "--embed-dim",
    ),
    Setting(
        "num_workers",
        0,
        int,
        "--num-workers",
        help="DataLoader worker processes.",
        min=0,
    ),
    Setting(
        "cache",
        True,
        bool,
        "--cache/--no-cache",
        help=(
            "Keep frozen-backbone features in the cache folder and reuse them; --no-cache"
            " encodes them again, in memory, for this run only."
        ),
    ),
    Setting(
        "cache_dir",
        None,
        Path,
        "--cache-dir",
        help=(
            "Folder of the frozen-feature cache: images and hf notes encoded once by a "
            "frozen backbone, reused by later runs, cv folds, --resume, evaluate and "
            "predict on the same files."
        ),
        optional=True,
        show_default="$OMNIFUSE_CACHE_DIR, else ~/.cache/omnifuse/features",
    ),
)

# Settings that decide which patients and values are read: a variant compared with the base model
# on the same folds must not change them.
DATA_READING = (
    "modality",
    "labs_table",
    "labs_id_col",
    "on_bad_file",
    "labs_format",
    "labs_agg",
    "encoding",
    "on_empty_patient",
)


def _widths(value: Any, _: Mapping[str, Any]) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_widths(value)
    return tuple(int(v) for v in value)


def _encoding(value: str) -> str:
    from omnifuse_cli.data.text import check_encoding  # numpy: not at `omnifuse --help`

    return check_encoding(value)


def _threshold(value: str, _: Mapping[str, Any]) -> str:
    # Here: engine.thresholds loads sklearn, scipy and pandas, which `omnifuse --help` must not.
    from omnifuse_cli.engine.thresholds import parse_threshold_rule

    return str(parse_threshold_rule(value))


def _pretrained(value: bool | None, _: Mapping[str, Any]) -> str:
    return "auto" if value is None else ("yes" if value else "no")


# option -> (config, field, convert(value, all option values)); config is data, image, text,
# method or train. Options named like their config field need no entry.
CONVERTERS: dict[str, tuple[str, str, Callable[[Any, Mapping[str, Any]], Any]]] = {
    "modality": ("data", "modalities", lambda v, _: parse_modality_options(v)),
    "labs_table": ("data", "labs_table", lambda v, _: str(v) if v else None),
    "labs_id_col": ("data", "labs_id_col", lambda v, _: v or "id"),
    "pretrained_image": ("image", "pretrained", _pretrained),
    "image_weights": ("image", "weights_path", lambda v, _: str(v) if v else None),
    "cache_dir": ("train", "cache_dir", lambda v, _: str(v) if v else None),
    "max_us_images": ("image", "max_images", lambda v, _: v),
    "finetune_text_last_n": (
        "train",
        "finetune_text_last_n",
        lambda v, values: 0 if values.get("freeze_text") else v,
    ),
    "select_by": ("train", "select_metric", lambda v, values: _metric(v or values["eval_metric"])),
    "bag_folds": ("train", "bag_folds", lambda v, _: int(v or 0)),
    "ensemble": ("train", "ensemble", lambda v, _: bool(v)),
    "time_limit": ("train", "time_limit", lambda v, _: float(v or 0.0)),
    "ra_layers": ("method", "ra_layers", _widths),
    "reliability": ("method", "reliability", lambda v, _: str(v).strip().lower()),
    "encoding": ("data", "encoding", lambda v, _: _encoding(v)),
    "text_min_df": ("text", "min_freq", lambda v, _: v),
    "threshold": ("train", "threshold", _threshold),
    "positive_class": ("train", "positive_class", lambda v, _: str(v).strip() if v else None),
    "class_weight": ("train", "class_weight", lambda v, _: str(v).strip().lower()),
}
FOLDED = ("freeze_text", "eval_metric")  # read by another option's converter

# What each --preset sets (README "Presets"); a setting given explicitly (a value other than its
# declared default) wins. medium is the method with the cohort-size rule's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Plain concatenation of the modality embeddings (no CRA imputation, no DWFuse, no TLA): on
    # notes + numbers within 0.003 AUROC of the method at a fifth of the time (issue 22).
    "fast": {
        "no_imputation": True,
        "no_dwfuse": True,
        "no_tla": True,
        "epochs": 10,
        "patience": 3,
    },
    "medium": {},
    # AutoGluon's recipe: every training patient trains K-1 models and scores one, and the
    # weighted ensemble is chosen on those out-of-fold predictions (engine/bagging.py).
    "best": {"bag_folds": 5, "ensemble": True},
}
# Settings left at None (neither given nor set by the preset) follow the cohort-size rule
# (engine/presets.adapt_to_cohort); these are their values before the rule runs.
COHORT_RULE: dict[str, Any] = {"epochs": 30, "batch_size": 32, "lr": 3e-4, "patience": 0}


def _metric(value: str) -> str:
    return "log_loss" if value == "loss" else str(value).strip().lower()


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in ``values`` that differ from their declared default: what the user set
    (the command line passes every option, defaults included)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        default = BY_NAME[name].default
        if isinstance(value, list | tuple) and not value:
            if default is None or default == [] or default == ():
                continue
        elif value == default and type(value) is type(default):
            continue
        out[name] = value
    return out


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting's value: the defaults, then the preset's, then ``values``' own (those that
    differ from the default: an explicit flag always wins over the preset)."""
    check_names(values)
    preset = str(values.get("preset") or "medium")
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1)
        raise ConfigError(
            f"--preset {preset!r} is not a preset",
            hint=(f"did you mean {close[0]}? " if close else "") + "use fast, medium or best",
        )
    return {**defaults(), **PRESETS[preset], **given(values), "preset": preset}


_CONFIGS: dict[str, type] = {
    "train": TrainConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "image": ImageConfig,
    "text": TextConfig,
}
_NESTED = ("image", "text")  # DataConfig fields that are configs of their own


@dataclass(frozen=True)
class TrainSettings:
    """What one trained model is: how the data is read and encoded, the method, the training."""

    data: DataConfig
    method: MethodConfig
    train: TrainConfig


def _fields(kind: str) -> set[str]:
    names = {f.name for f in dataclasses.fields(_CONFIGS[kind])}
    return names - set(_NESTED) if kind == "data" else names


def route(option: str) -> tuple[str, str, bool]:
    """Where a train option goes: (config, field, negated). KeyError for an option no config
    field takes (it needs a CONVERTERS entry)."""
    if option in CONVERTERS:
        kind, field, _ = CONVERTERS[option]
        return kind, field, False
    for kind in ("train", "method", "data", "image", "text"):
        if option in _fields(kind):
            return kind, option, False
    if option.startswith("no_") and f"use_{option[3:]}" in _fields("method"):
        return "method", f"use_{option[3:]}", True
    for kind in _NESTED:
        prefix = f"{kind}_"
        if option.startswith(prefix) and option[len(prefix) :] in _fields(kind):
            return kind, option[len(prefix) :], False
    raise KeyError(
        f"train option {option!r} matches no config field: add it to CONVERTERS in "
        "omnifuse_cli/cli/train_options.py"
    )


def build_configs(values: Mapping[str, Any]) -> TrainSettings:
    """The configs `omnifuse train` builds from these option values (parameter names as keys;
    options left out keep train's defaults)."""
    merged = with_preset(values)
    auto = tuple(name for name in COHORT_RULE if merged[name] is None)
    merged.update({name: COHORT_RULE[name] for name in auto})
    parts: dict[str, dict[str, Any]] = {kind: {} for kind in _CONFIGS}
    parts["train"]["cohort_defaults"] = auto
    for option, value in merged.items():
        if option in FOLDED:
            continue
        kind, field, negated = route(option)
        if option in CONVERTERS:
            value = CONVERTERS[option][2](value, merged)
        parts[kind][field] = (not value) if negated else value
    data = DataConfig(
        image=ImageConfig(**parts["image"]), text=TextConfig(**parts["text"]), **parts["data"]
    )
    return TrainSettings(
        data=data, method=MethodConfig(**parts["method"]), train=TrainConfig(**parts["train"])
    )


def defaults() -> dict[str, Any]:
    """Every setting's default, by name."""
    return {s.name: s.default for s in SETTINGS}


BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def check_names(values: Mapping[str, Any], where: str = "train") -> None:
    """A ConfigError naming the first unknown setting, with the closest known one."""
    for name in values:
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, list(BY_NAME), n=1)
            raise ConfigError(
                f"{where}: unknown setting {name!r}",
                hint=(f"did you mean {close[0]}? " if close else "")
                + "omnifuse_cli.settings.SETTINGS lists every setting (the flags of omnifuse "
                "train without dashes, with _ for -)",
            )


def parse_widths(text: str) -> tuple[int, ...]:
    """``--ra-layers 128,32`` -> (128, 32)."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ConfigError(
            f"--ra-layers {text!r} is not a list of positive widths",
            hint="write e.g. --ra-layers 128,32",
        )
    return widths


def parse_modality_rates(values: list[str] | None) -> tuple[tuple[str, float], ...]:
    """--modality-missing-rate NAME=RATE (repeatable) as (name, rate) pairs; the rates are
    checked against [0, 1) where they are used."""
    out: dict[str, float] = {}
    for value in values or ():
        name, sep, rate = str(value).partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(rate)
        except ValueError:
            raise ConfigError(
                f"--modality-missing-rate must be NAME=RATE, got {value!r}",
                hint="e.g. --modality-missing-rate us=0.8",
            ) from None
    return tuple(out.items())


def as_flags(values: Mapping[str, Any]) -> list[str]:
    """Settings as the command-line flags that give them (``{"no_tla": True, "lr": 0.001}`` ->
    ``["--no-tla", "--lr", "0.001"]``), e.g. for a cv variant made in Python."""
    check_names(values)
    out: list[str] = []
    for name, value in values.items():
        setting = BY_NAME[name]
        on, _, off = setting.flag.partition("/")
        if setting.kind is bool:
            if value:
                out.append(on)
            elif value is not None and off:  # a lone switch (--no-tla) is off by default
                out.append(off)
            continue
        items = value if setting.many and isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is None:
                continue
            if isinstance(item, (list, tuple)):  # ra_layers given as widths
                item = ",".join(str(v) for v in item)
            out += [on, str(item)]
    return out


# -- the --config format (YAML), shared by the CLI's files and the API's runs -----------------

SECTION_TITLES = {
    "data": "data: which patients and values are read",
    "image": "images",
    "text": "notes",
    "method": "method",
    "train": "training",
}
OWN_TITLES = {"train": "run", "cv": "cross-validation"}  # the section of a command's own keys


def section_of(name: str) -> str:
    """The config-file section of a setting: the config it builds."""
    return SECTION_TITLES["train" if name in FOLDED else route(name)[0]]


def _yaml_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    return value


def yaml_line(key: str, value: Any) -> str:
    """``key: value`` as YAML (safe_dump: only plain types)."""
    import yaml  # here: yaml is only needed when a file is written

    return yaml.safe_dump(
        {key: _yaml_value(value)},
        allow_unicode=True,
        sort_keys=False,
        default_flow_style=False,
        width=1000,
    )


def run_config_yaml(command: str, own: Sequence[tuple[str, Any]], values: Mapping[str, Any]) -> str:
    """A run's resolved settings as the config.yaml saved in it (`omnifuse COMMAND --config
    config.yaml --out-dir NEW` repeats the run): the command's own ``(key, value)`` pairs, then
    every setting given in ``values`` (by name) in its section. Paths are written absolute, so
    the file works from any folder."""

    def saved(value: Any) -> Any:
        return str(Path(value).resolve()) if isinstance(value, Path) else value

    lines = [
        f"# Resolved settings of this omnifuse {command} run, defaults included.",
        f"# Repeat it: omnifuse {command} --config config.yaml --out-dir NEW_DIR",
        f"\n# -- {OWN_TITLES.get(command, command)} --",
    ]
    lines += [yaml_line(key, saved(value)).rstrip("\n") for key, value in own]
    for title in SECTION_TITLES.values():
        members = [s for s in SETTINGS if s.name in values and section_of(s.name) == title]
        if members:
            lines.append(f"\n# -- {title} --")
            lines += [yaml_line(s.key, saved(values[s.name])).rstrip("\n") for s in members]
    return "\n".join(lines) + "\n"
