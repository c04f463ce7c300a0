"""`omnifuse train` with --bag-folds (and --ensemble): the bag (engine/bagging.py), the classical
members on the same folds (engine/classical.py), the greedy ensemble weights
(engine/ensemble.py) and the post-hoc fit, all on out-of-fold predictions; then how a saved
bagged run scores new patients (``Scorer``), shared by train's test split, evaluate, predict
and cv.

The ensemble's probability is sum_i w_i p_i over its members: the bag (mean of its OmniFuse
models, each blended with its linear path) and each classical member (mean of its fold models).
Calibration, the operating point and the conformal scores are then fitted on the ensemble's
out-of-fold log-probabilities, as they would be on a validation split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli.config import ImageConfig, TrainConfig
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.prepared import PreparedCohort
from omnifuse_cli.engine.bagging import BagFit, train_bag
from omnifuse_cli.engine.bundle import LoadedBundle
from omnifuse_cli.engine.classical import (
    FittedMember,
    OutOfTime,
    fit_bagged_member,
    member_inputs,
    usable_kinds,
)
from omnifuse_cli.engine.classical_io import load_members, save_members
from omnifuse_cli.engine.ensemble import (
    EnsembleFit,
    Metric,
    combine,
    greedy_selection,
    parse_metric,
)
from omnifuse_cli.engine.epoch import backbone, backbone_names
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.engine.posthoc import PostHoc, class_weights, fit_posthoc
from omnifuse_cli.engine.presets import resolve_metric
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse

MEMBERS_DIR = "members"  # in the bundle folder: the classical members (skops files)
BAG = "bag"  # bundle.json keys
ENSEMBLE = "ensemble"
OMNIFUSE = "omnifuse_bag"  # the bag's name among the ensemble's members


@dataclass
class BaggedOutcome:
    bag: BagFit
    posthoc: PostHoc
    members: list[FittedMember] = field(default_factory=list)
    ensemble: EnsembleFit | None = None
    lines: list[str] = field(default_factory=list)
    # The run's out-of-fold log-probabilities (the ensemble's, else the bag's) on bag.oof_index,
    # before calibration: what the post-hoc fit saw.
    oof_log_probs: np.ndarray | None = None

    @property
    def model(self) -> BaggedOmniFuse:
        return self.bag.model

    def scorer(self) -> Scorer:
        return Scorer(self.ensemble, self.members)

    def bundle_extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {BAG: {"members": len(self.bag.fits), **self.bag.meta()}}
        if self.ensemble is not None:
            out[ENSEMBLE] = self.ensemble.to_dict()
        return out

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.bag.meta())
        if self.ensemble is not None:
            for name, weight, score in zip(
                self.ensemble.names,
                self.ensemble.weights,
                self.ensemble.member_scores,
                strict=True,
            ):
                out[f"ensemble_weight_{name}"] = round(float(weight), 4)
                out[f"ensemble_oof_{name}"] = round(float(score), 6)
            out["ensemble_oof_score"] = round(float(self.ensemble.ensemble_score), 6)
            out["ensemble_metric"] = self.ensemble.metric
        return out


def fit_bagged(
    model: OmniFuse,
    image_cfg: ImageConfig,
    cohort: Cohort,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    num_classes: int,
    class_names: list[str],
    emit: EventFn,
    device: torch.device,
    deadline: float | None = None,
    members_deadline: float | None = None,
) -> BaggedOutcome:
    """The bag, then (cfg.ensemble) the classical members and the ensemble weights, then the
    post-hoc fit on the out-of-fold predictions."""
    text_backbones = {
        name: backbone(model, name)
        for name in backbone_names(model)
        if model.config.modalities[model.names.index(name)].kind == "text"
    }

    def new_member(k: int) -> OmniFuse:
        torch.manual_seed(cfg.seed + 1009 * k)
        return build_model(model.config, image_cfg, text_backbones)

    bag = train_bag(model, new_member, data, splits, cfg, num_classes, emit, device, deadline)
    lines = [bag.describe()]
    assert cohort.labels is not None
    y = cohort.labels[bag.oof_index]
    log_probs = bag.oof_log_probs
    members: list[FittedMember] = []
    ensemble = None
    if cfg.ensemble:
        metric = parse_metric(resolve_metric(cfg.select_metric, num_classes, bagged=True))
        members = _fit_members(cohort, bag, cfg, num_classes, metric, emit, members_deadline)
        if members:
            where = np.searchsorted(bag.pool, bag.oof_index)
            oof = [np.exp(bag.oof_log_probs)] + [_oof(m)[where] for m in members]
            ensemble = greedy_selection(
                oof, y, metric, names=[OMNIFUSE] + [m.name for m in members]
            )
            log_probs = np.log(np.clip(combine(oof, ensemble.weights), 1e-12, None))
            lines.append(describe_ensemble(ensemble))
    posthoc = fit_posthoc(log_probs, y, cfg, class_names)
    return BaggedOutcome(bag, posthoc, members, ensemble, lines, log_probs)


def _oof(member: FittedMember) -> np.ndarray:
    assert member.oof_probs is not None  # a member fitted in this run
    return member.oof_probs


def _fit_members(
    cohort: Cohort,
    bag: BagFit,
    cfg: TrainConfig,
    num_classes: int,
    metric: Metric,
    emit: EventFn,
    deadline: float | None,
) -> list[FittedMember]:
    """The classical members on the bag's folds (a member that runs out of time is left out)."""
    inputs = member_inputs(cohort.subset(bag.pool))
    assert cohort.labels is not None
    y = cohort.labels[bag.pool]
    weights = class_weights(cfg.class_weight, y, num_classes)
    out: list[FittedMember] = []
    for kind in usable_kinds(inputs):
        emit(ProgressEvent("message", text=f"ensemble member: {kind} on the bag's folds"))
        t0 = time.monotonic()
        try:
            member = fit_bagged_member(
                kind,
                inputs,
                y,
                bag.folds,
                num_classes,
                seed=cfg.seed,
                metric=metric,
                threads=torch.get_num_threads(),
                class_weight=None if weights is None else dict(enumerate(weights)),
                deadline=deadline,
            )
        except OutOfTime:
            emit(ProgressEvent("message", text=f"time limit: ensemble member {kind} left out"))
            continue
        emit(ProgressEvent("message", text=f"{member.name}: {time.monotonic() - t0:.0f} s"))
        out.append(member)
    return out


def describe_ensemble(fit: EnsembleFit) -> str:
    parts = ", ".join(
        f"{name} {w:.2f} (oof {s:.4f})"
        for name, w, s in zip(fit.names, fit.weights, fit.member_scores, strict=True)
    )
    return f"ensemble ({fit.metric}, out-of-fold {fit.ensemble_score:.4f}): {parts}"


def oof_frame(outcome: BaggedOutcome, cohort: Cohort, class_names: list[str]) -> pd.DataFrame:
    """oof_predictions.csv: each training patient's out-of-fold probabilities (uncalibrated:
    what the calibration, the operating point and the ensemble weights were fitted on), with
    the fold that scored them; with an ensemble also the bag's own."""
    bag = outcome.bag
    assert cohort.labels is not None and outcome.oof_log_probs is not None
    frame = pd.DataFrame(
        {
            "id": [cohort.ids[i] for i in bag.oof_index],
            "label": cohort.labels[bag.oof_index],
            "fold": bag.folds[np.searchsorted(bag.pool, bag.oof_index)] + 1,
        }
    )
    probs = np.exp(outcome.oof_log_probs)
    for c, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, c]
    if outcome.ensemble is not None:
        own = np.exp(bag.oof_log_probs)
        for c, name in enumerate(class_names):
            frame[f"{OMNIFUSE}_prob_{name}"] = own[:, c]
    return frame


def save_outcome_members(folder: Path, outcome: BaggedOutcome) -> None:
    if outcome.members:
        save_members(folder / MEMBERS_DIR, outcome.members)


class Scorer:
    """How a run turns the network's log-probabilities into its own: the identity for a single
    model or a bag alone, the weighted ensemble with the classical members otherwise."""

    def __init__(
        self, ensemble: EnsembleFit | None = None, members: list[FittedMember] | None = None
    ) -> None:
        self.ensemble = ensemble
        self.members = {m.name: m for m in members or ()}

    @classmethod
    def from_bundle(cls, bundle_folder: Path, meta: dict[str, Any]) -> Scorer:
        raw = meta.get(ENSEMBLE)
        if not raw:
            return cls()
        ensemble = EnsembleFit.from_dict(raw)
        folder = bundle_folder / MEMBERS_DIR
        return cls(ensemble, load_members(folder) if folder.is_dir() else [])

    def log_probs(self, cohort: Cohort, omnifuse_log_probs: np.ndarray) -> np.ndarray:
        """``cohort``: the scored patients, in the order of ``omnifuse_log_probs``' rows."""
        if self.ensemble is None:
            return omnifuse_log_probs
        inputs = member_inputs(cohort) if len(self.members) else None
        probs: list[np.ndarray | None] = []
        for name, weight in zip(self.ensemble.names, self.ensemble.weights, strict=True):
            if name == OMNIFUSE:
                probs.append(np.exp(omnifuse_log_probs))
            elif weight > 0:
                assert inputs is not None
                probs.append(
                    self.members[name].predict_proba(inputs, threads=torch.get_num_threads())
                )
            else:
                probs.append(None)  # weight 0: never predicted
        return np.log(np.clip(combine(probs, self.ensemble.weights), 1e-12, None))


def scorer(bundle: LoadedBundle) -> Scorer:
    """The Scorer of a loaded bundle."""
    assert bundle.folder is not None
    return Scorer.from_bundle(bundle.folder, bundle.meta)
