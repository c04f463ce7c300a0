"""`omnifuse train`: split, fit preprocessing, cache frozen features, train, select, test.

No printing here: progress goes through ``on_event`` and the result comes back as dataclasses.
The run directory gets the seed's files (metrics.csv, test.csv, confusion_matrix.csv, split.csv,
meta.csv) plus split_assignment.csv and the model bundle under ``model/``. The epoch loop is
fitting.py's; what follows it (linear path, post-hoc fit) is finishing.py's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from omnifuse_cli.config import (
    ModelConfig,
    TrainConfig,
    to_primitive,
)
from omnifuse_cli.data.cohort import Cohort, check_trainable
from omnifuse_cli.data.manifest import read_manifest, reading_options
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.data.splits import train_split, training_patients
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.audit import split_summary
from omnifuse_cli.engine.bagged_train import finish_bagged
from omnifuse_cli.engine.bagging import check_baggable
from omnifuse_cli.engine.bundle import save_bundle
from omnifuse_cli.engine.epoch import backbone, backbone_names
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import prepare_out_dir, write_csv, write_text_atomic
from omnifuse_cli.engine.finishing import (
    fit_finish,
    fit_linear,
    linear_meta,
    linear_state,
    linear_summary,
    posthoc_meta,
)
from omnifuse_cli.engine.fitting import (
    fit_model,
    load_checkpoint,
    stop_reason,
)
from omnifuse_cli.engine.frozen_features import encode_frozen
from omnifuse_cli.engine.inference import resolve_device
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.modelling import (
    ImageWeights,
    build_model,
    image_feature_dim,
    load_image_weights,
    load_text_backbone,
)
from omnifuse_cli.engine.posthoc import KEY as POSTHOC
from omnifuse_cli.engine.posthoc import PENDING, positive_index
from omnifuse_cli.engine.presets import Budget, adapt_to_cohort
from omnifuse_cli.engine.reliability import reliability_meta
from omnifuse_cli.engine.run_record import (
    TrainResult,
    pinned_config,
    run_meta,
    score_test,
    unlabeled_note,
    weights_warning,
    write_results,
    write_split_files,
)
from omnifuse_cli.engine.runs import (
    BUNDLE_DIR,
    CHECKPOINT,
    CONFIG_YAML,
    METRICS,
    SPLITS_SUMMARY,
    TrainRequest,
    save_request,
)
from omnifuse_cli.errors import BundleError, TrainingInterrupted
from omnifuse_cli.model.omnifuse import OmniFuse


def run_training(
    request: TrainRequest, on_event: EventFn | None = None, *, resume: bool = False
) -> TrainResult:
    """Train a run from scratch, or (resume=True) continue one from its last complete epoch.

    Started by torchrun, every process runs this: they join one process group, train one
    DistributedDataParallel model and only rank 0 writes files (see engine/distributed.py).
    """
    with distributed.session(resolve_device(request.train.device)) as device:
        return _run_training(request, on_event or (lambda event: None), device, resume)


def _run_training(
    request: TrainRequest, emit: EventFn, device: torch.device, resume: bool
) -> TrainResult:
    started = time.monotonic()
    cfg, data_cfg = request.train, request.data
    if device.type == "cpu" or cfg.threads:
        set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_read = time.perf_counter()
    with distributed.together("reading the data"):
        if resume and cfg.bag_folds >= 2:
            raise BundleError(
                "a bagged run (--bag-folds) cannot be resumed: it keeps no checkpoint",
                hint="start it again with --overwrite",
            )
        resume_state = _load_resume_state(request.out_dir) if resume else None
        cohort = read_manifest(
            request.manifest,
            data_cfg.modalities,
            num_classes=request.num_classes,
            allow_unlabeled=True,
            **reading_options(data_cfg),
        )
        check_trainable(cohort, request.num_classes)
        assert cohort.labels is not None
        splits = train_split(cohort.labels, cfg)
        check_baggable(cfg)
        cfg, settings_line = adapt_to_cohort(cfg, _n_training(splits, cfg), request.num_classes)
        request = dataclasses.replace(request, train=cfg)
        distributed.check_world_fits(len(splits["train"]), cfg.batch_size)
        summary = split_summary(cohort, splits, [str(c) for c in range(request.num_classes)])
        digests = data_digests(request) if distributed.active() else {}
    distributed.check_same_data(digests)
    with distributed.together("preparing the run folder"):
        if not resume and distributed.is_main():
            prepare_out_dir(request.out_dir, request.overwrite)
            save_request(request)
            write_split_files(request.out_dir, cohort, splits)
            write_csv(request.out_dir / SPLITS_SUMMARY, summary)
    emit(ProgressEvent("message", text=settings_line))
    for note in cohort.notes:
        emit(ProgressEvent("message", text=note))
    if len(splits.get("unlabeled", ())):
        emit(ProgressEvent("message", text=unlabeled_note(splits)))
    _say_if_slow(emit, t_read, f"read {len(cohort):,} patients")

    t_prepare = time.perf_counter()
    with distributed.together("building the model"):
        model, pre, weights = build_for_cohort(cohort, training_patients(splits), request)
        data = pre.prepare(cohort)
    _say_if_slow(
        emit,
        t_prepare,
        "built the model and prepared the inputs (vocabulary, tokens, standardised labs)",
    )
    warnings = [weights_warning(weights)] if weights.fallback else []
    for text in warnings:
        emit(ProgressEvent("warning", text=text))
    if weights.source == "random" and not weights.fallback:
        emit(ProgressEvent("message", text=f"image backbone: {weights.description}"))
    if not resume and distributed.is_main() and request.config_yaml is not None:
        write_text_atomic(
            request.out_dir / CONFIG_YAML, pinned_config(request.config_yaml, weights)
        )
    model.to(device)
    frozen = backbone_names(model)
    for name in frozen:
        for p in backbone(model, name).parameters():
            p.requires_grad = False

    t0 = time.perf_counter()
    if frozen:
        emit(ProgressEvent("message", text="encoding images/notes once with the frozen backbones"))
        with distributed.together("encoding images/notes"):
            encode_frozen(model, data, frozen, cfg, device, emit)
    encode_seconds = time.perf_counter() - t0

    class_names = [str(c) for c in range(request.num_classes)]
    positive_index(cfg, class_names)  # a wrong --positive-class fails before training
    meta = run_meta(request, cohort, device, weights, splits, warnings)
    meta["settings_rule"] = settings_line
    budget = Budget(started, cfg.time_limit, ensemble=cfg.ensemble)
    if cfg.bag_folds >= 2:
        return finish_bagged(
            request,
            cohort,
            model,
            pre,
            data,
            splits,
            meta,
            device,
            emit,
            budget,
            summary,
            encode_seconds,
        )

    def on_best(epoch: int, state: dict[str, torch.Tensor]) -> None:
        save_bundle(
            request.out_dir / BUNDLE_DIR,
            model,
            pre,
            class_names=class_names,
            extra={"best_epoch": epoch, "run": meta, POSTHOC: PENDING},
            state=state,
        )

    def on_epoch(rows: list[dict[str, Any]]) -> None:
        write_csv(request.out_dir / METRICS, pd.DataFrame(rows))

    status: dict[str, Any] = {}
    try:
        records, best_epoch, best_state = fit_model(
            model,
            data,
            splits,
            cfg,
            request.num_classes,
            emit,
            on_best=on_best,
            on_epoch=on_epoch,
            checkpoint=request.out_dir / CHECKPOINT,
            resume=resume_state,
            deadline=budget.models,
            status=status,
        )
    except TrainingInterrupted as stop:
        stop.hint = f"continue with: omnifuse train --resume {request.out_dir}"
        raise
    model.load_state_dict(best_state)
    meta["stopped"] = stop_reason(
        cfg, records[-1].epoch if records else 0, best_epoch, bool(status.get("time_limit"))
    )
    meta.update(reliability_meta(model, data, splits, cfg))
    linear = fit_linear(model, data, splits, cfg, device)
    if linear is not None:
        emit(ProgressEvent("message", text=linear_summary(linear)))
        meta.update(linear_meta(linear))
    posthoc = fit_finish(model, data, splits, cfg, device, class_names, linear)
    for line in posthoc.describe():
        emit(ProgressEvent("message", text=line))
    meta.update(posthoc_meta(posthoc))
    if distributed.is_main():
        save_bundle(
            request.out_dir / BUNDLE_DIR,
            model,
            pre,
            class_names=class_names,
            extra={"best_epoch": best_epoch, "run": meta, POSTHOC: posthoc.to_dict()},
            state={**best_state, **(linear_state(model) if model.linear is not None else {})},
        )
    test, cm = score_test(model, data, cohort, splits["test"], cfg, posthoc)
    if distributed.is_main():
        write_results(
            request.out_dir,
            test,
            cm,
            class_names,
            meta,
            {
                "best_epoch": best_epoch,
                "encode_seconds": round(encode_seconds, 3),
                "train_seconds": round(sum(r.seconds for r in records), 3),
                **budget.meta(time.monotonic()),
            },
        )
    distributed.barrier()  # no rank reports success before the run's last file is written
    return TrainResult(
        out_dir=request.out_dir,
        records=records,
        best_epoch=best_epoch,
        test=test,
        confusion=cm,
        split_counts={k: len(v) for k, v in splits.items()},
        class_names=class_names,
        encode_seconds=encode_seconds,
        device=str(device),
        image_weights=weights.description,
        notes=list(cohort.notes),
        split_summary=summary,
        select_metric=request.train.select_metric,
    )


def _n_training(splits: dict[str, np.ndarray], cfg: TrainConfig) -> int:
    """Training patients of one model: with --bag-folds K, (K-1)/K of train + validation."""
    if cfg.bag_folds >= 2:
        pool = len(splits["train"]) + len(splits["val"])
        return pool * (cfg.bag_folds - 1) // cfg.bag_folds
    return len(splits["train"])


SLOW_STEP_SECONDS = 10.0  # steps before training that took longer are reported with their time


def _say_if_slow(emit: EventFn, started: float, what: str) -> None:
    """On a large cohort reading and preparing take minutes before the first batch: say what
    was done and how long it took, so a log file shows where the time went."""
    seconds = time.perf_counter() - started
    if seconds >= SLOW_STEP_SECONDS:
        emit(ProgressEvent("message", text=f"{what} in {seconds:.0f} s"))


def data_digests(request: TrainRequest) -> dict[str, str]:
    """What every torchrun process must agree on (distributed.digests): data and settings."""
    settings = to_primitive(request)
    for key in ("manifest", "out_dir", "overwrite", "config_yaml"):
        settings.pop(key, None)
    settings["data"].pop("labs_table", None)
    return distributed.digests(request.manifest, request.data.labs_table, settings)


def _load_resume_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise BundleError(
            f"{run_dir} has no {CHECKPOINT}: no epoch was completed, nothing to resume",
            hint="start the run again (with --overwrite)",
        )
    state = load_checkpoint(path)
    state["best_state"] = load_file(str(run_dir / BUNDLE_DIR / "model.safetensors"))
    return state


def build_for_cohort(
    cohort: Cohort, train_idx: np.ndarray, request: TrainRequest
) -> tuple[OmniFuse, Preprocessor, ImageWeights]:
    data_cfg = request.data
    tokenizers: dict[str, Any] = {}
    backbones: dict[str, torch.nn.Module] = {}
    hidden: dict[str, int] = {}
    for spec in cohort.modalities:
        if spec.kind == "text" and data_cfg.text.encoder == "hf":
            tokenizers[spec.name], backbones[spec.name], hidden[spec.name] = load_text_backbone(
                data_cfg.text.model
            )
    pre = Preprocessor.fit(cohort.subset(train_idx), data_cfg.image, data_cfg.text, tokenizers)
    dims = []
    for spec in cohort.modalities:
        if spec.kind == "image":
            dims.append(image_feature_dim(data_cfg.image.backbone))
        elif spec.name in hidden:
            dims.append(hidden[spec.name])
        else:
            dims.append(pre.input_dim(spec))
    config = ModelConfig(cohort.modalities, request.num_classes, tuple(dims), request.method)
    model = build_model(config, data_cfg.image, backbones)
    return model, pre, load_image_weights(model, data_cfg.image)
