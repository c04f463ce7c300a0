"""The search space of `omnifuse tune`: which settings a trial may change, over which ranges.

A space is a YAML mapping from setting names (omnifuse train's flags without dashes; ``-`` or
``_``) to a range or a fixed value::

    lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    num_ra: {type: int, low: 1, high: 6}
    image_backbone: {type: categorical, choices: [resnet18, resnet34]}
    epochs: 30            # a plain value fixes the setting for every trial

Every bound and every choice is checked against the setting (its type and its own validation,
the same as ``omnifuse train`` applies) before the first trial starts, so a typo fails in a
second rather than after an hour of trials. ``omnifuse tune init`` writes DEFAULT_SPACE_YAML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import yaml

from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import BY_NAME, build_configs, check_names

if TYPE_CHECKING:  # only for annotations: optuna is imported where a trial is sampled
    import optuna

ParamType = Literal["float", "int", "categorical"]
PARAM_TYPES: tuple[str, ...] = ("float", "int", "categorical")
Choice = str | int | float | bool | None

# Settings a search may not change: they decide which patients and values are read (every trial
# must see the same data), where things go, or how the machine runs (not what is learned).
NOT_SEARCHABLE = frozenset(
    {
        "labs_table",
        "labs_id_col",
        "modality",
        "on_bad_file",
        "labs_format",
        "labs_agg",
        "encoding",
        "on_empty_patient",
        "train_ratio",
        "val_ratio",
        "test_ratio",
        "device",
        "threads",
        "num_workers",
        "cache",
        "cache_dir",
        "positive_class",
    }
)


@dataclass(frozen=True)
class Param:
    """One searched setting."""

    name: str
    type: ParamType
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Choice, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return out

    def describe(self) -> str:
        """``lr in [0.0001, 0.003] (log)``, ``image_backbone in {resnet18, resnet34}``."""
        if self.type == "categorical":
            return f"{self.name} in {{{', '.join(str(c) for c in self.choices)}}}"
        scale = " (log)" if self.log else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{scale}{step}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step) if self.step else 1
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    fixed: Mapping[str, Any]  # settings every trial gets

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.as_dict() for p in self.params}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """This trial's settings: the fixed ones and one value per searched parameter."""
        values = dict(self.fixed)
        values.update({p.name: p.suggest(trial) for p in self.params})
        return values


DEFAULT_SPACE_YAML = """\
# omnifuse tune search space (omnifuse tune init). One entry per setting, named like omnifuse
# train's flags without dashes:
#   NAME: {type: float, low: L, high: H, log: true|false, step: S}   (log: sampled on a log scale)
#   NAME: {type: int, low: L, high: H, step: S, log: true|false}
#   NAME: {type: categorical, choices: [A, B, C]}
#   NAME: VALUE                                                       (fixed for every trial)
# Settings given on the command line of `omnifuse tune run` are fixed too, unless listed here.
# Data settings (modality, labs_table, ratios, encoding, ...) cannot be searched: every trial
# sees the same patients. Delete a line to keep that setting at its default.

# Optimisation
lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
batch_size: {type: categorical, choices: [16, 32, 64]}

# Imputation: the cascade residual autoencoder (CRA) and its loss weight (method.md Eq. 18)
lambda0: {type: float, low: 1.0, high: 30.0, log: true}
num_ra: {type: int, low: 2, high: 6}
ra_layers: {type: categorical, choices: ["64,16", "128,32", "256,64"]}
cra_dropout: {type: float, low: 0.0, high: 0.5}
reliability: {type: categorical, choices: [auto, "0.5", "1"]}

# Fusion and robustness
embed_dim: {type: categorical, choices: [64, 128, 256]}
modality_drop: {type: float, low: 0.0, high: 0.6}

# Traceable laziness activation (TLA): patients a modality combination needs to be mined
tla_min_patients: {type: int, low: 5, high: 60, log: true}

# Images: each backbone and size is encoded once (the frozen-feature cache), then reused
image_backbone: {type: categorical, choices: [resnet18, resnet34]}
image_size: {type: categorical, choices: [128, 224]}
"""


def default_space() -> SearchSpace:
    return parse_space(yaml.safe_load(DEFAULT_SPACE_YAML), "the default search space")


def read_space(path: Path) -> SearchSpace:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"search space {path} does not exist",
            hint="write one with: omnifuse tune init space.yaml",
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from None
    return parse_space(raw, f"search space {path}")


def parse_space(raw: Any, where: str) -> SearchSpace:
    """A SearchSpace from the YAML's mapping; ConfigError on anything a trial could not use."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of setting -> range, got {type(raw).__name__}"
        )
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        check_names({name: None}, where)
        if name in NOT_SEARCHABLE:
            raise ConfigError(
                f"{where}: {name} cannot be searched (it decides which patients or values are "
                "read, or how the machine runs, not what is learned)",
                hint=f"give it to `omnifuse tune run` as --{name.replace('_', '-')} instead",
            )
        if isinstance(spec, Mapping):
            params.append(_param(name, spec, where))
        else:
            fixed[name] = spec
    for name, value in fixed.items():
        _check_values(name, [value], where)
    return SearchSpace(tuple(params), fixed)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _param(name: str, spec: Mapping[str, Any], where: str) -> Param:
    here = f"{where}: {name}"
    known = {"type", "low", "high", "log", "step", "choices"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"{here}: unknown key(s) {', '.join(map(str, unknown))}", hint=_FORMS)
    kind = str(spec.get("type", "categorical" if "choices" in spec else "float"))
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{here}: type must be float, int or categorical, got {kind!r}")
    setting = BY_NAME[name]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}: categorical needs a non-empty list of choices", hint=_FORMS)
        bad = [c for c in choices if not isinstance(c, str | int | float | bool | type(None))]
        if bad:
            raise ConfigError(f"{here}: choices must be plain values, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{here}: choices repeat a value: {choices}")
        _check_values(name, choices, where)
        return Param(name, "categorical", choices=tuple(cast(list[Choice], choices)))
    if setting.kind not in (int, float):
        raise ConfigError(
            f"{here}: {kind} range for a {setting.kind.__name__} setting",
            hint="give its values as {type: categorical, choices: [...]}",
        )
    if kind == "float" and setting.kind is int:
        raise ConfigError(f"{here}: {name} takes whole numbers", hint="use type: int")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{here}: {kind} needs low and high", hint=_FORMS)
    low = _number(spec["low"], f"{here} low")
    high = _number(spec["high"], f"{here} high")
    if not low < high:
        raise ConfigError(f"{here}: low ({low:g}) must be below high ({high:g})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{here}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{here}: a log range needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{here} step")
        if step <= 0:
            raise ConfigError(f"{here}: step must be > 0, got {step:g}")
        if log:
            raise ConfigError(f"{here}: Optuna cannot combine step with log; drop one")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{here}: int bounds must be whole numbers, got {low:g}, {high:g}")
    bounds: list[Any] = [int(low), int(high)] if kind == "int" else [low, high]
    _check_values(name, bounds, where)
    return Param(name, cast(ParamType, kind), low, high, log, step)


def _check_values(name: str, values: list[Any], where: str) -> None:
    """Every value (a bound, a choice, a fixed value) builds a valid configuration, the same
    check `omnifuse train` applies to the flag."""
    for value in values:
        try:
            build_configs({name: value})
        except ConfigError as err:
            raise ConfigError(
                f"{where}: {name} = {value!r}: {err.message}", hint=err.hint
            ) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {name} = {value!r} is not a valid value ({err})") from None


_FORMS = (
    "forms: NAME: {type: float, low: L, high: H, log: true}; NAME: {type: int, low: L, "
    "high: H}; NAME: {type: categorical, choices: [A, B]}; NAME: VALUE (fixed)"
)
