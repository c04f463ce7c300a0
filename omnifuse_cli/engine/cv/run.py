"""Running a cross-validation: encode once with the frozen backbones, train and test every fold
fit (writing its files as soon as it is done, so --resume continues after it), pool the results
and train the final --refit model."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.cohort import Cohort, check_trainable
from omnifuse_cli.data.manifest import read_manifest, reading_options
from omnifuse_cli.data.prepared import PreparedCohort, Preprocessor
from omnifuse_cli.data.splits import training_patients
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.bagged_run import (
    BaggedOutcome,
    Scorer,
    fit_bagged,
    save_outcome_members,
)
from omnifuse_cli.engine.bundle import save_bundle
from omnifuse_cli.engine.cv.encoding import (
    Encoded,
    encoded_for,
    encoding_record,
    train_request,
)
from omnifuse_cli.engine.cv.folder import (
    prepare_cv_dir,
    read_fold,
    run_meta,
    write_split,
)
from omnifuse_cli.engine.cv.folds import (
    assign_folds_labelled,
    fold_dir,
    fold_seed,
    folds_frame,
    inner_split,
    plan_folds,
    read_groups,
    val_share,
)
from omnifuse_cli.engine.cv.request import (
    FOLD_DONE,
    REFIT_DONE,
    CVRequest,
    Variant,
    cv_digests,
)
from omnifuse_cli.engine.cv.summary import CVResult, FoldResult, labelled_only, summarise
from omnifuse_cli.engine.epoch import backbone
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import write_csv, write_text_atomic
from omnifuse_cli.engine.finishing import fit_finish, fit_linear, posthoc_meta
from omnifuse_cli.engine.fitting import fit_model, infer_all
from omnifuse_cli.engine.inference import resolve_device
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.metrics import full_metrics
from omnifuse_cli.engine.outputs import conformal_sets
from omnifuse_cli.engine.posthoc import KEY as POSTHOC
from omnifuse_cli.engine.posthoc import PostHoc
from omnifuse_cli.engine.prediction import prediction_frame
from omnifuse_cli.engine.presets import adapt_to_cohort
from omnifuse_cli.engine.runs import (
    BUNDLE_DIR,
    FINAL_DIR,
    METRICS,
    PREDICTIONS,
    write_meta,
)
from omnifuse_cli.engine.training import build_for_cohort
from omnifuse_cli.errors import TrainingInterrupted
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse


def _fit(
    cohort: Cohort,
    request: CVRequest,
    variant: Variant,
    enc: Encoded,
    cfg: TrainConfig,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    device: torch.device,
    emit: EventFn,
    out: Path,
    unlabeled: np.ndarray | None = None,
) -> tuple[
    OmniFuse | BaggedOmniFuse, Preprocessor, PreparedCohort, int, PostHoc, BaggedOutcome | None
]:
    """`train`'s model building, epoch loop and post-hoc fit (temperature, operating point,
    conformal scores on the inner validation split) on given patients, with the shared
    features; ``unlabeled`` patients join the training patients (fitting.fit_model). With
    --bag-folds, the bag and its ensemble on the same patients (engine/bagged_run.py), whose
    outcome is returned too."""
    splits = {"train": train_idx, "val": val_idx}
    if unlabeled is not None and len(unlabeled):
        splits["unlabeled"] = unlabeled
    torch.manual_seed(cfg.seed)
    model, pre, _ = build_for_cohort(
        cohort, training_patients(splits), train_request(request, variant, cfg)
    )
    data = pre.prepare(cohort)
    for name, state in enc.states.items():
        trunk = backbone(model, name)
        trunk.load_state_dict(state)
        trunk.requires_grad_(False)
    data.image_cache.update(enc.image_cache)
    data.image_feature_dims.update(enc.image_dims)
    data.text_cache.update(enc.text_cache)
    model.to(device)

    def on_epoch(rows: list[dict[str, Any]]) -> None:
        write_csv(out / METRICS, pd.DataFrame(rows))

    if cfg.bag_folds >= 2:  # a bag (and its ensemble) on this fold's training patients
        outcome = fit_bagged(
            model,
            variant.data.image,
            cohort,
            data,
            {**splits, "test": train_idx[:0]},
            cfg,
            request.num_classes,
            [str(c) for c in range(request.num_classes)],
            emit,
            device,
        )
        write_csv(out / METRICS, outcome.bag.metrics_frame())
        return outcome.model, pre, data, 0, outcome.posthoc, outcome
    records, best_epoch, best_state = fit_model(
        model, data, splits, cfg, request.num_classes, emit, on_epoch=on_epoch
    )
    model.load_state_dict(best_state)
    linear = fit_linear(model, data, splits, cfg, device)
    posthoc = fit_finish(
        model, data, splits, cfg, device, [str(c) for c in range(request.num_classes)], linear
    )
    return model, pre, data, best_epoch, posthoc, None


def run_cv(
    request: CVRequest, on_event: EventFn | None = None, *, resume: bool = False
) -> CVResult:
    """Cross-validate (resume=True: continue after the last complete fold).

    Under torchrun every fold fit trains with DDP on all processes (engine/fitting.py); rank 0
    alone writes files and pools the results, and the other ranks get its summary."""
    with distributed.session(resolve_device(request.base.train.device)) as device:
        return _run_cv(request, on_event or (lambda event: None), device, resume)


def _run_cv(request: CVRequest, emit: EventFn, device: torch.device, resume: bool) -> CVResult:
    t_start = time.perf_counter()
    base = request.base
    if device.type == "cpu" or base.train.threads:
        set_threads(base.train.threads)
    main = distributed.is_main()
    with distributed.together("reading the data"):
        cohort = read_manifest(
            request.manifest,
            base.data.modalities,
            num_classes=request.num_classes,
            allow_unlabeled=True,
            **reading_options(base.data),
        )
        check_trainable(cohort, request.num_classes)
        assert cohort.labels is not None
        labels = cohort.labels
        groups = (
            read_groups(request.manifest, request.group_col, len(cohort))
            if request.group_col
            else None
        )
        assignment = assign_folds_labelled(
            labels, request.folds, request.repeats, base.train.seed, groups, request.group_col or ""
        )
        plans = plan_folds(request, labels, assignment, groups)
        for plan in plans:
            distributed.check_world_fits(len(plan.train), plan.variant.train.batch_size)
        digests = cv_digests(request) if distributed.active() else {}
    distributed.check_same_data(digests)
    folds_table = folds_frame(cohort, assignment, groups)
    out_dir = Path(request.out_dir)
    with distributed.together("preparing the cv folder"):
        if main:
            prepare_cv_dir(request, resume, folds_table)
    for note in cohort.notes:
        emit(ProgressEvent("message", text=note))

    class_names = [str(c) for c in range(request.num_classes)]
    total = len(plans) + int(request.refit)
    results: list[FoldResult] = []
    encoded: dict[str, Encoded] = {}
    current = ""
    try:
        for i, plan in enumerate(plans):
            out = fold_dir(out_dir, plan.variant.name, plan.repeat, plan.fold)
            current = f"{plan.variant.name} rep {plan.repeat} fold {plan.fold}"
            saved = distributed.broadcast_object(
                read_fold(out) if main and (out / FOLD_DONE).is_file() else None
            )
            if saved is not None:
                results.append(saved)
                emit(ProgressEvent("fold-done", i + 1, total, fold=saved))
                continue
            emit(ProgressEvent("fold", i, total, text=current))
            enc = encoded_for(encoded, cohort, request, plan.variant, device, emit)
            cfg = dataclasses.replace(
                plan.variant.train, seed=fold_seed(plan.variant.train, plan.repeat, plan.fold)
            )
            cfg, _ = adapt_to_cohort(cfg, len(plan.train), request.num_classes)
            t0 = time.perf_counter()
            model, _, data, best_epoch, posthoc, bagged = _fit(
                cohort,
                request,
                plan.variant,
                enc,
                cfg,
                plan.train,
                plan.val,
                device,
                emit,
                out,
                plan.unlabeled,
            )
            inference = infer_all(
                model, data, plan.test, device=device, batch_size=cfg.batch_size, amp=cfg.amp
            )
            scorer = bagged.scorer() if bagged is not None else Scorer()
            log_probs = scorer.log_probs(cohort.subset(inference.index), inference.log_probs)
            raw = np.exp(log_probs)
            probs = posthoc.probabilities(log_probs)
            pred = posthoc.decide(probs)
            y = labels[inference.index]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a small fold may miss a class: metrics say n/a
                metrics = full_metrics(y, probs, request.num_classes, pred)
            result = FoldResult(
                plan.variant.name,
                plan.repeat,
                plan.fold,
                len(plan.train),
                len(plan.val),
                len(plan.test),
                best_epoch,
                metrics,
                time.perf_counter() - t0,
            )
            if main:
                sets, mode = conformal_sets(posthoc.conformal, probs, request.conformal)
                frame = prediction_frame(
                    [cohort.ids[j] for j in inference.index],
                    y,
                    probs,
                    cohort.present[inference.index],
                    cohort.names,
                    class_names,
                    inference.weights,
                    pred=pred,
                    sets=sets,
                    raw=raw,
                )
                if posthoc.threshold is not None:
                    frame["threshold"] = posthoc.threshold
                if sets is not None:
                    frame["conformal_mode"] = mode
                columns: tuple[tuple[str, str | int], ...] = (
                    ("variant", plan.variant.name),
                    ("repeat", plan.repeat),
                    ("fold", plan.fold),
                )
                for position, (key, value) in enumerate(columns):
                    frame.insert(position, key, value)
                write_csv(out / PREDICTIONS, frame)
                write_split(
                    out,
                    cohort,
                    {
                        "train": plan.train,
                        "val": plan.val,
                        "test": plan.test,
                        "unlabeled": plan.unlabeled,
                    },
                )
                write_text_atomic(out / FOLD_DONE, json.dumps(dataclasses.asdict(result), indent=1))
            results.append(result)
            emit(ProgressEvent("fold-done", i + 1, total, fold=result))
        current = "the summary"
        summary = distributed.broadcast_object(
            summarise(request, labelled_only(cohort)) if main else None
        )
        assert summary is not None  # rank 0's, on every rank
        refit_dir = None
        if request.refit:
            current = "the final --refit model"
            refit_dir = _refit(cohort, request, groups, encoded, device, emit, total)
    except (KeyboardInterrupt, TrainingInterrupted):
        done = sum(
            1
            for p in plans
            if (fold_dir(out_dir, p.variant.name, p.repeat, p.fold) / FOLD_DONE).is_file()
        )
        stop = TrainingInterrupted(
            f"cross-validation stopped during {current}; {done} of {len(plans)} fold fits are "
            f"complete and saved in {out_dir}",
            hint=f"continue with: omnifuse cv --resume {out_dir}",
        )
        stop.all_ranks = True  # type: ignore[attr-defined]  # every rank got the Ctrl-C
        raise stop from None
    encoding = distributed.broadcast_object(encoding_record(out_dir, encoded) if main else None)
    assert encoding is not None  # rank 0's, on every rank
    encode_seconds = encoding["encode_seconds"]
    seconds = time.perf_counter() - t_start
    weights = encoding["image_weights"]
    if main:
        meta = run_meta(request, cohort, device, weights, encoding.get("warnings", ""))
        meta.update({"encode_seconds": round(encode_seconds, 3), "seconds": round(seconds, 3)})
        write_meta(out_dir, meta)
    distributed.barrier()  # no rank reports success before the last file is written
    return CVResult(
        out_dir=out_dir,
        n_patients=len(cohort),
        class_names=class_names,
        variants=[v.name for v in request.all_variants],
        metrics=summary["metrics"],
        patterns=summary["patterns"],
        confusion=summary["confusion"],
        differences=summary["differences"],
        folds=results,
        encode_seconds=encode_seconds,
        seconds=seconds,
        refit_dir=refit_dir,
        notes=list(cohort.notes),
    )


def _refit(
    cohort: Cohort,
    request: CVRequest,
    groups: np.ndarray | None,
    encoded: dict[str, Encoded],
    device: torch.device,
    emit: EventFn,
    total: int,
) -> Path:
    """The base model trained on every patient (an inner validation split picks the epoch),
    saved as a run folder for `omnifuse predict`."""
    out = Path(request.out_dir) / FINAL_DIR
    if distributed.broadcast_object((out / REFIT_DONE).is_file()):
        emit(ProgressEvent("refit", total, total, text="final model (already trained)"))
        return out
    assert cohort.labels is not None
    base = request.base
    emit(ProgressEvent("refit", total - 1, total, text="final model on all patients"))
    unlabeled = np.flatnonzero(cohort.labels < 0)
    train_idx, val_idx = inner_split(
        cohort.labels,
        np.flatnonzero(cohort.labels >= 0),
        val_share(base.train),
        base.train.seed,
        groups,
        "the final model",
    )
    enc = encoded_for(encoded, cohort, request, base, device, emit)
    cfg, _ = adapt_to_cohort(base.train, len(train_idx), request.num_classes)
    model, pre, _, best_epoch, posthoc, bagged = _fit(
        cohort, request, base, enc, cfg, train_idx, val_idx, device, emit, out, unlabeled
    )
    if not distributed.is_main():
        return out
    write_split(out, cohort, {"train": train_idx, "val": val_idx, "unlabeled": unlabeled})
    meta = run_meta(request, cohort, device, enc.weights, enc.warning)
    meta.update(
        {
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "n_test": 0,
            "n_unlabeled": len(unlabeled),
            "best_epoch": best_epoch,
            **posthoc_meta(posthoc),
            **(bagged.meta() if bagged is not None else {}),
        }
    )
    save_bundle(
        out / BUNDLE_DIR,
        model,
        pre,
        class_names=[str(c) for c in range(request.num_classes)],
        extra={
            "best_epoch": best_epoch,
            "run": meta,
            POSTHOC: posthoc.to_dict(),
            **(bagged.bundle_extra() if bagged is not None else {}),
        },
        state=model.bag_state() if isinstance(model, BaggedOmniFuse) else None,
    )
    if bagged is not None:
        save_outcome_members(out / BUNDLE_DIR, bagged)
    write_meta(out, meta)
    write_text_atomic(
        out / REFIT_DONE,
        json.dumps({"best_epoch": best_epoch, "n_train": len(train_idx), "n_val": len(val_idx)}),
    )
    emit(ProgressEvent("refit", total, total, text="final model saved"))
    return out
