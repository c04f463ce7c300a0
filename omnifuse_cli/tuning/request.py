"""What `omnifuse tune run` was asked to do (TuneRequest), the folder's file names, and the
held-out split: the patients a search may see (the pool) and the test patients it never sees."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from omnifuse_cli import __version__
from omnifuse_cli.data.cells import absolute_paths
from omnifuse_cli.data.manifest import read_manifest, reading_options
from omnifuse_cli.data.splits import train_split
from omnifuse_cli.data.tables import normalize_ids, read_table
from omnifuse_cli.engine.files import write_csv, write_text_atomic
from omnifuse_cli.engine.runs import (  # noqa: F401 (re-exported for tuning/'s modules)
    BEST_JSON,
    BEST_YAML,
    INTERMEDIATE_CSV,
    NESTED_CSV,
    NESTED_JSON,
    REFIT_DIR,
    TRIALS_CSV,
    TUNE_JSON,
)
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import TrainSettings, build_configs
from omnifuse_cli.tuning.space import SearchSpace

TuneMetric = Literal["auroc", "macro_f1", "log_loss"]
TUNE_METRICS: tuple[str, ...] = ("auroc", "macro_f1", "log_loss")
# metric -> (the epoch record's validation field, the metrics tables' name, direction, select_by)
METRIC_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "auroc": ("val_auroc", "auroc", "maximize", "auroc"),
    "macro_f1": ("val_macro_f1", "macro_f1", "maximize", "macro_f1"),
    "log_loss": ("val_loss", "loss", "minimize", "loss"),
}

SAMPLER = "TPESampler"  # multivariate=False, constant_liar=True: see tuning/run.py

# The tune folder: the files the report reads are named in engine/runs.py (imported here for
# tuning/'s modules), the rest here; README "tune" lists them all.
STUDY_DB = "study.db"
POOL_MANIFEST = "pool.csv"  # the patients the search sees, file references absolute
SPLIT = "split.csv"  # id, split (pool | test | excluded)
TRIALS_DIR = "trials"
NESTED_DIR = "nested"


@dataclass(frozen=True)
class TuneRequest:
    manifest: Path
    num_classes: int
    out_dir: Path
    space: SearchSpace
    settings: Mapping[str, Any] = field(default_factory=dict)  # fixed for every trial, by name
    trials: int = 30
    metric: TuneMetric = "auroc"
    folds: int = 0  # 0: the objective is the inner validation split; K: K-fold cv of the pool
    storage: str | None = None  # None: sqlite:///OUT_DIR/study.db
    study_name: str | None = None  # None: the out dir's name
    pruning: bool = True
    seed: int = 42  # the sampler's
    refit: bool = False
    nested_cv: int = 0
    overwrite: bool = False
    space_source: str = "default"

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.metric not in TUNE_METRICS:
            raise ConfigError(
                f"--metric must be one of {', '.join(TUNE_METRICS)}, got {self.metric!r}"
            )
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"--folds must be 0 (inner validation) or >= 2, got {self.folds}")
        if self.nested_cv == 1 or self.nested_cv < 0:
            raise ConfigError(f"--nested-cv must be 0 (none) or >= 2, got {self.nested_cv}")
        if not self.space.params:
            raise ConfigError(
                "the search space searches nothing",
                hint="give ranges in --space (omnifuse tune init space.yaml writes an example)",
            )

    @property
    def direction(self) -> str:
        return METRIC_SOURCES[self.metric][2]

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.out_dir / STUDY_DB).absolute().as_posix()}"

    @property
    def name(self) -> str:
        return self.study_name or self.out_dir.absolute().name

    @property
    def objective(self) -> str:
        return f"{self.folds}-fold cv" if self.folds else "validation"

    def signature(self) -> dict[str, Any]:
        """What every process joining the study must search alike."""
        return {
            "num_classes": self.num_classes,
            "metric": self.metric,
            "folds": self.folds,
            "space": self.space.as_dict(),
            "fixed": {k: _jsonable(v) for k, v in sorted(self.trial_settings().items())},
        }

    def trial_settings(self) -> dict[str, Any]:
        """Settings every trial gets: the command line's, the space's fixed values, and the
        epoch selection by the tuned metric unless given."""
        out = dict(self.settings)
        out.update(self.space.fixed)
        out.setdefault("select_by", METRIC_SOURCES[self.metric][3])
        return out

    def configs(self) -> TrainSettings:
        return build_configs(self.trial_settings())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def save_tune_json(request: TuneRequest, n_pool: int, n_test: int) -> None:
    data = {
        "kind": "tune",
        "manifest": str(request.manifest.absolute()),
        "num_classes": request.num_classes,
        "metric": request.metric,
        "direction": request.direction,
        "objective": "cv" if request.folds else "validation",
        "folds": request.folds,
        "trials": request.trials,
        "study_name": request.name,
        "storage": request.storage_url,
        "sampler": SAMPLER,
        "seed": request.seed,
        "pruner": "MedianPruner" if request.pruning else "none",
        "space": request.space.as_dict(),
        "space_source": request.space_source,
        "fixed": {k: _jsonable(v) for k, v in request.trial_settings().items()},
        "n_pool": n_pool,
        "n_test": n_test,
        "nested_cv": request.nested_cv,
        "refit": request.refit,
        "version": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    write_text_atomic(request.out_dir / TUNE_JSON, json.dumps(data, indent=2, default=str) + "\n")


def load_tune_json(out_dir: Path) -> dict[str, Any]:
    path = out_dir / TUNE_JSON
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@dataclass(frozen=True)
class Pool:
    manifest: Path  # the pool's manifest (pool.csv in the tune folder)
    n_pool: int
    n_test: int
    train_ratio: float  # the pool's own train/validation split for a trial (test 0)
    val_ratio: float


def split_pool(request: TuneRequest, made: TrainSettings) -> Pool:
    """Set the test patients aside exactly as `omnifuse train` with the same seed and ratios
    will (the refit's test split), and write the rest as the pool's manifest."""
    data, cfg = made.data, made.train
    cohort = read_manifest(
        request.manifest,
        data.modalities,
        num_classes=request.num_classes,
        allow_unlabeled=True,
        check_files=False,  # every trial reads the files; this only needs ids and labels
        **reading_options(data),
    )
    assert cohort.labels is not None
    splits = train_split(cohort.labels, cfg)
    ids = np.asarray(cohort.ids, dtype=object)
    test_ids = set(ids[splits["test"]].tolist())
    pool_ids = set(ids.tolist()) - test_ids
    frame = read_table(request.manifest, "manifest", data.encoding)
    frame_ids = pd.Series(normalize_ids(frame["id"]), index=frame.index)
    pool = absolute_paths(frame[frame_ids.isin(pool_ids)], data.modalities, request.manifest.parent)
    path = request.out_dir / POOL_MANIFEST
    if data.encoding == "auto":
        write_csv(path, pool)
    else:  # the notes inside keep the encoding the user named for this cohort
        pool.to_csv(path, index=False, encoding=data.encoding)
    split = pd.DataFrame({"id": frame_ids.to_numpy()})
    split["split"] = np.where(
        split["id"].isin(test_ids), "test", np.where(split["id"].isin(pool_ids), "pool", "excluded")
    )
    write_csv(request.out_dir / SPLIT, split)
    inner = cfg.train_ratio + cfg.val_ratio
    return Pool(path, len(pool_ids), len(test_ids), cfg.train_ratio / inner, cfg.val_ratio / inner)
