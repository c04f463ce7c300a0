"""--bag-folds K: K OmniFuse models on K stratified folds of the training patients (issue 22).

Every labelled training patient (the train and validation shares of `train`'s split together:
no patient is kept aside for a fixed validation split) is in exactly one fold. Member k trains
on the other folds and is early-stopped, blended with its linear path and scored on fold k, so
every training patient gets one out-of-fold prediction from a model that never saw them. Those
predictions are what the calibration, the operating point, the conformal scores and the ensemble
weights are fitted on (engine/training.py); prediction averages the members
(model/bag.BaggedOmniFuse).

One preprocessing (vocabulary, standardisation: fitted without labels on all training patients)
and one set of frozen features serve every member. Under --time-limit each fold gets an equal
share of what is left; a fold that would not finish in its share is not started, and the bag is
the folds that finished (the records say how many).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.prepared import PreparedCohort
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.finishing import fit_linear
from omnifuse_cli.engine.fitting import EpochRecord, fit_model, infer_all
from omnifuse_cli.engine.stopping import stop_reason
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse


@dataclass
class FoldFit:
    fold: int
    best_epoch: int
    last_epoch: int
    stopped: str
    seconds: float
    records: list[EpochRecord] = field(repr=False)
    linear_C: float | None = None  # noqa: N815 - scikit-learn's name


@dataclass
class BagFit:
    model: BaggedOmniFuse
    pool: np.ndarray  # the training patients the folds divide (rows of the PreparedCohort)
    folds: np.ndarray  # (len(pool),) fold of each, 0..K-1
    oof_index: np.ndarray  # patients of the finished folds, with their out-of-fold predictions
    oof_log_probs: np.ndarray  # (len(oof_index), C)
    fits: list[FoldFit]
    planned: int  # K

    @property
    def complete(self) -> bool:
        return len(self.fits) == self.planned

    def describe(self) -> str:
        epochs = ", ".join(str(f.best_epoch) for f in self.fits)
        done = f"{len(self.fits)} of {self.planned} folds"
        return (
            f"bag: {done} trained on {len(self.pool):,} training patients (best epochs {epochs}); "
            f"{len(self.oof_index):,} out-of-fold predictions"
        )

    def metrics_frame(self) -> pd.DataFrame:
        """metrics.csv of a bagged run: every fold's epochs, with the fold (1..K) first."""
        return pd.DataFrame([{"fold": f.fold + 1, **r.row()} for f in self.fits for r in f.records])

    def meta(self) -> dict[str, object]:
        return {
            "bag_folds_planned": self.planned,
            "bag_folds_finished": len(self.fits),
            "bag_best_epochs": " ".join(str(f.best_epoch) for f in self.fits),
            "bag_epochs_run": " ".join(str(f.last_epoch) for f in self.fits),
            "bag_stopped": " | ".join(f"fold {f.fold + 1}: {f.stopped}" for f in self.fits),
            "bag_oof_patients": len(self.oof_index),
        }


def check_baggable(cfg: TrainConfig) -> None:
    if cfg.bag_folds >= 2 and (cfg.finetune_image_scope != "none" or cfg.finetune_text_last_n):
        raise ConfigError(
            "--bag-folds with fine-tuned backbones is not supported: the members share one "
            "frozen backbone",
            hint="drop --finetune-image-scope/--finetune-text-last-n, or --bag-folds 0",
        )


def fold_ids(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each patient's fold, stratified by label (scikit-learn's StratifiedKFold)."""
    smallest = int(np.bincount(labels).min(initial=len(labels)))
    if k > smallest or k > len(labels):
        raise ConfigError(
            f"--bag-folds {k}: the smallest class has {smallest} training patient(s), too few "
            "for one in every fold",
            hint="use fewer --bag-folds",
        )
    out = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        out[held] = fold
    return out


def train_bag(
    first: OmniFuse,
    new_member: Callable[[int], OmniFuse],
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    num_classes: int,
    emit: EventFn,
    device: torch.device,
    deadline: float | None = None,
) -> BagFit:
    """Train the bag. ``first`` is the model the run built (its frozen features are encoded);
    ``new_member(k)`` builds member k's fresh model, seeded by k. ``splits``: train's split; its
    train and validation patients are the pool the folds divide."""
    assert data.labels is not None
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    labels = data.labels[torch.from_numpy(pool)].numpy()
    folds = fold_ids(labels, cfg.bag_folds, cfg.seed)
    members: list[OmniFuse] = []
    fits: list[FoldFit] = []
    oof_index: list[np.ndarray] = []
    oof_log_probs: list[np.ndarray] = []
    for k in range(cfg.bag_folds):
        started = time.monotonic()
        fold_deadline = None
        if deadline is not None:
            # Each fold gets an equal share of what is left, less what the last fold spent
            # after its epochs (the linear path's fit); a fold that could not train two epochs
            # and finish in what is left is not started.
            left = deadline - started
            overhead = max((f.seconds - sum(r.seconds for r in f.records) for f in fits), default=0)
            epoch = max((r.seconds for f in fits for r in f.records), default=0.0)
            if k and left < overhead + 2 * epoch:
                emit(
                    ProgressEvent(
                        "message",
                        text=f"time limit: the bag keeps {k} of {cfg.bag_folds} folds",
                    )
                )
                break
            fold_deadline = started + max(left / (cfg.bag_folds - k) - overhead, 0.0)
        model = first if k == 0 else new_member(k)
        model.to(device)
        fold_splits = {
            "train": pool[folds != k],
            "val": pool[folds == k],
            "test": splits["test"],
            "unlabeled": splits.get("unlabeled", pool[:0]),
        }
        emit(ProgressEvent("message", text=f"bag fold {k + 1} of {cfg.bag_folds}"))
        status: dict[str, object] = {}
        fold_cfg = dataclasses.replace(cfg, seed=cfg.seed + 1009 * k)
        records, best_epoch, best_state = fit_model(
            model,
            data,
            fold_splits,
            fold_cfg,
            num_classes,
            emit,
            deadline=fold_deadline,
            status=status,
        )
        model.load_state_dict(best_state)
        linear = fit_linear(model, data, fold_splits, fold_cfg, device)
        if linear is not None and linear.val_log_probs is not None:
            assert linear.val_index is not None
            oof_index.append(linear.val_index)
            oof_log_probs.append(linear.val_log_probs)
        else:
            held = infer_all(
                model,
                data,
                fold_splits["val"],
                device=device,
                batch_size=max(cfg.batch_size, 256),
                amp=cfg.amp,
            )
            oof_index.append(held.index)
            oof_log_probs.append(held.log_probs)
        last = records[-1].epoch if records else 0
        members.append(model)
        fits.append(
            FoldFit(
                fold=k,
                best_epoch=best_epoch,
                last_epoch=last,
                stopped=stop_reason(fold_cfg, last, best_epoch, bool(status.get("time_limit"))),
                seconds=time.monotonic() - started,
                records=records,
                linear_C=None if linear is None else linear.C,
            )
        )
    index = np.concatenate(oof_index)
    order = np.argsort(index)
    return BagFit(
        model=BaggedOmniFuse(members),
        pool=pool,
        folds=folds,
        oof_index=index[order],
        oof_log_probs=np.concatenate(oof_log_probs)[order],
        fits=fits,
        planned=cfg.bag_folds,
    )
