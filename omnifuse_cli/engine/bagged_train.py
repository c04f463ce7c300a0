"""`omnifuse train --bag-folds K`: after the data is read, the model built and the frozen
features encoded (training.py), the bag, its ensemble and the post-hoc fit on out-of-fold
predictions (bagged_run.py), then the bundle, the run's files and the test split, as a single
model's run writes them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.prepared import PreparedCohort, Preprocessor
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.bagged_run import fit_bagged, oof_frame, save_outcome_members
from omnifuse_cli.engine.bundle import save_bundle
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.finishing import posthoc_meta
from omnifuse_cli.engine.posthoc import KEY as POSTHOC
from omnifuse_cli.engine.presets import Budget
from omnifuse_cli.engine.reliability import reliability_meta
from omnifuse_cli.engine.run_record import TrainResult, score_test, write_results
from omnifuse_cli.engine.runs import BUNDLE_DIR, METRICS, OOF, TrainRequest
from omnifuse_cli.model.omnifuse import OmniFuse


def finish_bagged(
    request: TrainRequest,
    cohort: Cohort,
    model: OmniFuse,
    pre: Preprocessor,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    meta: dict[str, Any],
    device: torch.device,
    emit: EventFn,
    budget: Budget,
    summary: pd.DataFrame,
    encode_seconds: float,
) -> TrainResult:
    """--bag-folds: the bag, the ensemble and the post-hoc fit on out-of-fold predictions
    (engine/bagged_run.py), then the bundle and the test split, as a single model's run."""
    cfg = request.train
    class_names = [str(c) for c in range(request.num_classes)]
    outcome = fit_bagged(
        model,
        request.data.image,
        cohort,
        data,
        splits,
        cfg,
        request.num_classes,
        class_names,
        emit,
        device,
        deadline=budget.models,
        members_deadline=budget.members,
    )
    for line in outcome.lines + outcome.posthoc.describe():
        emit(ProgressEvent("message", text=line))
    bag = outcome.model
    meta.update(reliability_meta(bag.first, data, splits, cfg))
    meta.update(outcome.meta())
    meta.update(posthoc_meta(outcome.posthoc))
    meta["stopped"] = outcome.bag.describe()
    folder = request.out_dir / BUNDLE_DIR
    if distributed.is_main():
        save_bundle(
            folder,
            bag,
            pre,
            class_names=class_names,
            extra={
                "best_epoch": 0,
                "run": meta,
                POSTHOC: outcome.posthoc.to_dict(),
                **outcome.bundle_extra(),
            },
            state=bag.bag_state(),
        )
        save_outcome_members(folder, outcome)
    scorer = outcome.scorer()
    test, cm = score_test(
        bag, data, cohort, splits["test"], cfg, outcome.posthoc, combine=scorer.log_probs
    )
    records = [r for fit in outcome.bag.fits for r in fit.records]
    if distributed.is_main():
        write_csv(request.out_dir / METRICS, outcome.bag.metrics_frame())
        write_csv(request.out_dir / OOF, oof_frame(outcome, cohort, class_names))
        write_results(
            request.out_dir,
            test,
            cm,
            class_names,
            meta,
            {
                "best_epoch": 0,
                "encode_seconds": round(encode_seconds, 3),
                "train_seconds": round(sum(r.seconds for r in records), 3),
                **budget.meta(time.monotonic()),
            },
        )
    distributed.barrier()
    return TrainResult(
        out_dir=request.out_dir,
        records=records,
        best_epoch=0,
        test=test,
        confusion=cm,
        split_counts={k: len(v) for k, v in splits.items()},
        class_names=class_names,
        encode_seconds=encode_seconds,
        device=str(device),
        image_weights=str(meta.get("image_weights", "")),
        notes=list(cohort.notes),
        split_summary=summary,
        select_metric=cfg.select_metric,
        bag=outcome.bag.describe(),
    )
