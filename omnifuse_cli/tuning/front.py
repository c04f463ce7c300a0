"""``omnifuse_cli.tune(...)``: the search's front door (`omnifuse tune run` calls it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omnifuse_cli.engine.events import EventFn
from omnifuse_cli.settings import check_names
from omnifuse_cli.tuning.outputs import TuneResult
from omnifuse_cli.tuning.request import TuneMetric, TuneRequest
from omnifuse_cli.tuning.run import run_tune
from omnifuse_cli.tuning.space import (
    SearchSpace,
    default_space,
    parse_space,
    read_space,
)


def tune(
    manifest: str | os.PathLike[str],
    *,
    num_classes: int,
    trials: int = 30,
    space: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    metric: TuneMetric = "auroc",
    folds: int = 0,
    out_dir: str | os.PathLike[str] = "runs/tune",
    storage: str | None = None,
    study_name: str | None = None,
    pruning: bool = True,
    sampler_seed: int | None = None,
    refit: bool = False,
    nested_cv: int = 0,
    overwrite: bool = False,
    on_progress: EventFn | None = None,
    track: str | None = None,
    track_uri: str | None = None,
    **settings: Any,
) -> TuneResult:
    """Search training settings on ``manifest``'s training patients (its test patients, the
    split `omnifuse train` makes with the same ``seed`` and ratios, are never seen) and return
    the trials and the best settings.

    ``space``: a space.yaml path, the same mapping as a dict, or None for the default space
    (omnifuse_cli.tuning.DEFAULT_SPACE_YAML). ``settings`` (by flag name) are fixed for every
    trial and take that setting out of the search. ``folds`` 0 scores a trial on the inner
    validation split, K >= 2 by K-fold cross-validation. The study lives in ``storage`` (an
    SQLAlchemy URL; default sqlite:///OUT_DIR/study.db) under ``study_name`` (default the out
    dir's name): processes that give the same pair share its ``trials``, and rerunning after an
    interruption completes it. ``refit`` trains the best settings like `omnifuse train` into
    OUT_DIR/refit; ``nested_cv`` K estimates the whole procedure by nested cross-validation.
    ``track`` ("mlflow" or "tensorboard", at ``track_uri``): the search as one tracked run with a
    child run per trial."""
    check_names(settings, "tune")
    searched = _space(space)
    fixed_here = sorted(set(settings) & set(searched.names))
    if fixed_here:  # a setting given for every trial is not searched
        searched = SearchSpace(
            tuple(p for p in searched.params if p.name not in fixed_here), searched.fixed
        )
    request = TuneRequest(
        manifest=Path(manifest),
        num_classes=num_classes,
        out_dir=Path(out_dir),
        space=searched,
        settings=_absolute_paths(settings),
        trials=trials,
        metric=metric,
        folds=folds,
        storage=storage,
        study_name=study_name,
        pruning=pruning,
        seed=int(settings.get("seed", 42)) if sampler_seed is None else sampler_seed,
        refit=refit,
        nested_cv=nested_cv,
        overwrite=overwrite,
        space_source=str(space)
        if isinstance(space, str | os.PathLike)
        else "default"
        if space is None
        else "mapping",
    )
    return run_tune(request, on_progress, track=track, track_uri=track_uri)


def _space(space: str | os.PathLike[str] | Mapping[str, Any] | None) -> SearchSpace:
    if space is None:
        return default_space()
    if isinstance(space, Mapping):
        return parse_space(space, "search space")
    return read_space(Path(space))


def _absolute_paths(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Path settings made absolute: trials read them from other folders."""
    out = dict(settings)
    for name in ("labs_table", "image_weights", "cache_dir"):
        if out.get(name):
            out[name] = str(Path(out[name]).absolute())
    return out
