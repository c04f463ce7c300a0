"""What `omnifuse cv` is asked to do (the base model, its variants, folds and repeats), the
cv.json that keeps it for --resume (through engine/runs.py), and the names of the files a cv
folder holds beyond a run's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omnifuse_cli.config import DataConfig, MethodConfig, TrainConfig, to_primitive
from omnifuse_cli.data.manifest import reading_options
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.outputs import DEFAULT_ALPHA
from omnifuse_cli.engine.runs import CV_FILE, load_request, save_request
from omnifuse_cli.engine.subgroups import parse_subgroup
from omnifuse_cli.errors import ConfigError

BASE = "base"
FOLDS_DIR = "folds"
FOLD_DONE = "fold.json"  # written last: a fold with this file is complete
REFIT_DONE = "refit.json"
ENCODING = "encoding.json"  # image weights used and encoding time, kept across --resume
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")


@dataclass(frozen=True)
class Variant:
    """One model setting trained on every fold."""

    name: str
    data: DataConfig
    method: MethodConfig
    train: TrainConfig
    flags: str = ""  # the train flags that make it, as the user wrote them (empty for base)


@dataclass(frozen=True)
class CVRequest:
    manifest: Path
    num_classes: int
    out_dir: Path
    base: Variant
    variants: tuple[Variant, ...] = ()
    folds: int = 5
    repeats: int = 1
    group_col: str | None = None
    refit: bool = False
    bootstrap: int = 1000  # resamples for the 95% intervals (0 = none)
    overwrite: bool = False
    subgroup_cols: tuple[str, ...] = ()  # --subgroup-col: metrics per subgroup, pooled
    conformal: float = DEFAULT_ALPHA  # each fold's conformal sets at this alpha (coverage.csv)
    # The CLI's resolved settings as YAML, saved as config.yaml (the --config format); None
    # writes none.
    config_yaml: str | None = None

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.conformal < 1.0:
            raise ConfigError(f"--conformal must be in (0, 1), got {self.conformal}")
        for spec in self.subgroup_cols:
            parse_subgroup(spec)
        names = [v.name for v in self.all_variants]
        for name in names[1:]:
            if not _NAME_RE.match(name):
                raise ConfigError(
                    f"--variant name {name!r} is not usable as a folder name",
                    hint="use letters, digits, '-', '_', '.', '+'",
                )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"--variant {', '.join(dupes)} is given more than once"
                + (f" ({BASE!r} is the model without variant flags)" if BASE in dupes else "")
            )
        for v in self.variants:
            if _reading(v.data) != _reading(self.base.data):
                raise ConfigError(
                    f"--variant {v.name} reads the data differently from the base "
                    "model; variants are compared on the same patients"
                )

    @property
    def all_variants(self) -> tuple[Variant, ...]:
        return (self.base, *self.variants)


def _reading(data: DataConfig) -> tuple[object, ...]:
    """What decides which patients and values are read (the manifest's reading options)."""
    return (data.modalities, *reading_options(data).items())


def save_cv_request(request: CVRequest) -> None:
    save_request(request, CV_FILE, kind="omnifuse-cv")


def load_cv_request(out_dir: Path) -> CVRequest:
    return load_request(CVRequest, out_dir, CV_FILE, what="cross-validation", command="cv")


def cv_digests(request: CVRequest) -> dict[str, str]:
    """What every torchrun process must agree on (see training.data_digests)."""
    settings = to_primitive(request)
    for key in ("manifest", "out_dir", "overwrite", "config_yaml"):
        settings.pop(key, None)
    for variant in (settings["base"], *settings["variants"]):
        variant["data"].pop("labs_table", None)
    return distributed.digests(request.manifest, request.base.data.labs_table, settings)
