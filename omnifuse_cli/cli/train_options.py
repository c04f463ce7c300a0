"""`train`'s model and training options, shared with every command that trains (`cv` and its
`--variant` flags), and the one function that turns their values into configs.

The options are defined once, in `omnifuse train`'s signature. `with_train_options` gives another
command the same options (same names, types, defaults and help) by reading that signature, and
`build_configs` maps option values to DataConfig/MethodConfig/TrainConfig: an option named like a
config field (`--lr` -> TrainConfig.lr, `--embed-dim` -> MethodConfig.embed_dim,
`--image-backbone` -> ImageConfig.backbone, `--no-tla` -> MethodConfig.use_tla negated) needs no
entry anywhere; one that needs converting has a line in CONVERTERS.

`omnifuse train` builds its own configs here too, so one mapping serves train, cv, `--variant`
and `--config` files (whose keys are the same options, see cli/config_file.py).

Adding a train option: define it in `train`'s signature; `cv`, `--variant`, config files and
`omnifuse config init` take it from then on. When it goes unchanged to a config field of the same
name, that is all; otherwise add its line to CONVERTERS; when it decides which patients or values
are read, add it to DATA_READING (variants may not change it). tests/test_cv.py builds every
option through train and cv (a new text option needs an example value in its EXAMPLES).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

from omnifuse_cli.config import (
    DataConfig,
    ImageConfig,
    MethodConfig,
    TextConfig,
    TrainConfig,
    parse_modality_options,
)
from omnifuse_cli.errors import ConfigError

# train's own parameters: which data, where the run goes, resuming. Commands that share the
# training options define these themselves.
TRAIN_ONLY = ("manifest", "manifest_opt", "num_classes", "resume", "out_dir", "overwrite")
# What cli/config_file.with_config_file gives every command that takes --config.
CONFIG_PARAMS = ("ctx", "config")
# Options that decide which patients and values are read: a variant compared with the base model
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
HELP_PANEL = "Model and training options (as omnifuse train)"


def _widths(value: Any, _: Mapping[str, Any]) -> tuple[int, ...]:
    from omnifuse_cli import config

    if isinstance(value, str):
        return config.parse_widths(value)  # type: ignore[attr-defined]
    return tuple(int(v) for v in value)


def _encoding(value: str) -> str:
    from omnifuse_cli.data.text import check_encoding

    return check_encoding(value)


def _threshold(value: str, _: Mapping[str, Any]) -> str:
    from omnifuse_cli.engine.clinical import parse_threshold_rule

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
    "select_by": ("train", "select_metric", lambda v, _: v),
    "ra_layers": ("method", "ra_layers", _widths),
    "reliability": ("method", "reliability", lambda v, _: str(v).strip().lower()),
    "encoding": ("data", "encoding", lambda v, _: _encoding(v)),
    "text_min_df": ("text", "min_freq", lambda v, _: v),
    "threshold": ("train", "threshold", _threshold),
    "positive_class": ("train", "positive_class", lambda v, _: str(v).strip() if v else None),
    "class_weight": ("train", "class_weight", lambda v, _: str(v).strip().lower()),
}
FOLDED = ("freeze_text",)  # read by another option's converter (finetune_text_last_n)

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
    merged = {**train_defaults(), **values}
    parts: dict[str, dict[str, Any]] = {kind: {} for kind in _CONFIGS}
    for option, value in merged.items():
        if option in TRAIN_ONLY or option in FOLDED:
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


def train_parameters() -> list[inspect.Parameter]:
    """`omnifuse train`'s model and training options, as parameters of its signature."""
    from omnifuse_cli.cli.train import train

    signature = inspect.signature(train, eval_str=True)
    return [
        p
        for p in signature.parameters.values()
        if p.name not in TRAIN_ONLY and p.name not in CONFIG_PARAMS
    ]


def train_defaults() -> dict[str, Any]:
    return {p.name: p.default for p in train_parameters()}


def _in_panel(parameter: inspect.Parameter) -> inspect.Parameter:
    """The same option, listed under its own heading in --help."""
    if get_origin(parameter.annotation) is not Annotated:
        return parameter
    base, *extras = get_args(parameter.annotation)
    moved = []
    for extra in extras:
        if hasattr(extra, "rich_help_panel"):
            extra = copy.copy(extra)
            extra.rich_help_panel = HELP_PANEL
        moved.append(extra)
    return parameter.replace(
        annotation=Annotated[(base, *moved)],  # type: ignore[valid-type]
        kind=inspect.Parameter.KEYWORD_ONLY,
    )


def with_train_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` (which ends in ``**train_options``) every option of `omnifuse train`
    but TRAIN_ONLY; it receives their values in ``train_options``."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [_in_panel(p) for p in train_parameters() if p.name not in taken]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        return command(**kwargs)

    wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the merged signature, not the command's own
    return wrapper


def parse_variant(spec: str, base: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``NAME=--no-imputation --lr 1e-3`` -> (name, flags, option values): the base values with
    the flags applied, parsed exactly as `omnifuse train` parses them."""
    import typer

    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(
            f'--variant {spec!r} is not NAME="FLAGS"',
            hint='write e.g. --variant no-imputation="--no-imputation"',
        )
    try:
        args = shlex.split(flags)
    except ValueError as err:
        raise ConfigError(f"--variant {name}: cannot read its flags {flags!r} ({err})") from err
    if "--help" in args:
        raise ConfigError(f"--variant {name}: give train options, not --help")
    if not args:
        raise ConfigError(
            f"--variant {name} has no flags",
            hint=f'give the train options it changes, e.g. {name}="--no-tla"',
        )

    def parse_only(**_: Any) -> None:
        """(parses a variant's flags)"""

    parse_only.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in train_parameters()]
    )
    app = typer.Typer(add_completion=False)
    app.command()(parse_only)
    command = typer.main.get_command(app)
    # Click's classes are matched by name: typer may use its own vendored copy of click.
    try:
        ctx = command.make_context(f"--variant {name}", list(args), resilient_parsing=False)
    except Exception as err:
        if type(err).__name__ == "NoSuchOption":
            raise ConfigError(
                f"--variant {name}: {err.option_name} is not a model or training "  # type: ignore[attr-defined]
                "option of omnifuse train",
                hint=f"a variant takes train's model and training options ({flags.strip()!r} "
                "was given); see omnifuse train --help",
            ) from err
        if hasattr(err, "format_message"):
            raise ConfigError(f"--variant {name}: {err.format_message()}") from err
        raise
    given = {
        k: v
        for k, v in ctx.params.items()
        if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }
    fixed = [f"--{k.replace('_', '-')}" for k in given if k in DATA_READING]
    if fixed:
        raise ConfigError(
            f"--variant {name} changes {', '.join(fixed)}: a variant is compared with the base "
            "model on the same patients and values",
            hint="give data options once, outside --variant",
        )
    return name, " ".join(args), {**base, **given}
