"""`omnifuse train`: split, fit preprocessing, cache frozen features, train, select, test.

No printing here: progress goes through ``on_event`` and the result comes back as dataclasses.
The run directory gets the seed's files (metrics.csv, test.csv, confusion_matrix.csv, split.csv,
meta.csv) plus split_assignment.csv and the model bundle under ``model/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from omnifuse_cli.config import (
    DataConfig,
    ImageConfig,
    MethodConfig,
    ModalitySpec,
    ModelConfig,
    TrainConfig,
    method_config_from_dict,
    text_config_from_dict,
    to_primitive,
)
from omnifuse_cli.data.manifest import Cohort, check_trainable, read_manifest, reading_options
from omnifuse_cli.data.prepared import (
    PatientDataset,
    PreparedCohort,
    Preprocessor,
    make_collate,
    move_to,
)
from omnifuse_cli.data.splits import stratified_split, training_patients
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.audit import split_summary
from omnifuse_cli.engine.bundle import BUNDLE_DIR, save_bundle, versions
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import prepare_out_dir, write_csv, write_text_atomic
from omnifuse_cli.engine.inference import (
    Inference,
    autocast,
    cache_frozen_features,
    feature_cache,
    infer,
    loader,
    resolve_device,
)
from omnifuse_cli.engine.linear_path import LinearFit, fit_linear_path
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.metrics import classification_metrics, confusion
from omnifuse_cli.engine.modelling import (
    build_model,
    image_feature_dim,
    load_image_weights,
    load_text_backbone,
)
from omnifuse_cli.engine.posthoc import KEY as POSTHOC
from omnifuse_cli.engine.posthoc import PENDING, PostHoc, class_weights, fit_posthoc, positive_index
from omnifuse_cli.errors import BundleError, TrainingInterrupted
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.laziness import (
    available,
    combinations,
    combo_mask,
    combo_name,
    pick_lazy,
)
from omnifuse_cli.model.omnifuse import OmniFuse

LOSS_TERMS = ("forward", "backward", "dwfuse", "tla")


@dataclass(frozen=True)
class TrainRequest:
    manifest: Path
    num_classes: int
    out_dir: Path
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = False
    # The CLI's resolved settings as YAML, saved beside request.json as config.yaml (the
    # --config format, so a run can be repeated from it); None writes no config.yaml.
    config_yaml: str | None = None


@dataclass
class EpochRecord:
    epoch: int
    phase: str  # warmup (backbones frozen, features cached), frozen, or finetune
    train_loss: float
    losses: dict[str, float]  # each term of Eq. 18, mean over training patients
    val_loss: float
    val_acc: float
    val_macro_f1: float
    val_auroc: float
    lazy_combo: str  # mined after this epoch, activated during the next
    tla_distances: dict[str, float]
    seconds: float
    is_best: bool = False
    # Each imputed modality's reliability r_m after this epoch (the gate the epoch was scored
    # with); empty without imputation or with a fixed --reliability.
    reliability: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "phase": self.phase,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "val_macro_f1": self.val_macro_f1,
            "val_auroc": self.val_auroc,
        }
        out.update({f"loss_{k}": v for k, v in self.losses.items()})
        out["lazy_combo"] = self.lazy_combo
        out.update({f"tla_{k}": v for k, v in self.tla_distances.items()})
        out.update({f"reliability_{k}": v for k, v in self.reliability.items()})
        out["seconds"] = self.seconds
        out["best"] = int(self.is_best)
        return out


@dataclass
class TrainResult:
    out_dir: Path
    records: list[EpochRecord]
    best_epoch: int
    test: dict[str, float]  # empty without a test split (--test-ratio 0)
    confusion: np.ndarray | None
    split_counts: dict[str, int]
    class_names: list[str]
    encode_seconds: float
    device: str
    image_weights: str
    notes: list[str]
    # Patients per class and per missing pattern in each split (engine.audit.split_summary).
    split_summary: pd.DataFrame | None = None


CHECKPOINT = "checkpoint.pt"  # state after the last complete epoch, for --resume
REQUEST = "request.json"  # every setting of the run, so --resume needs nothing else
CONFIG_YAML = "config.yaml"  # the same settings in the CLI's --config format


def save_request(request: TrainRequest) -> None:
    if request.config_yaml is not None:
        write_text_atomic(request.out_dir / CONFIG_YAML, request.config_yaml)
    raw = to_primitive(request)
    del raw["config_yaml"]
    raw["manifest"] = str(Path(request.manifest).resolve())
    if request.data.labs_table:
        raw["data"]["labs_table"] = str(Path(request.data.labs_table).resolve())
    write_text_atomic(
        request.out_dir / REQUEST, json.dumps(raw, ensure_ascii=False, indent=1, default=str)
    )


def load_request(run_dir: Path) -> TrainRequest:
    """The request a run was started with (for --resume)."""
    path = Path(run_dir) / REQUEST
    if not path.is_file():
        raise BundleError(
            f"{run_dir} is not a resumable run (no {REQUEST})",
            hint="pass the folder that `omnifuse train --out-dir` wrote",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        data = raw["data"]
        return TrainRequest(
            manifest=Path(raw["manifest"]),
            num_classes=int(raw["num_classes"]),
            out_dir=Path(run_dir),
            data=DataConfig(
                **{
                    **data,
                    "modalities": tuple(ModalitySpec(**m) for m in data["modalities"]),
                    "image": ImageConfig(**data["image"]),
                    "text": text_config_from_dict(data["text"]),
                }
            ),
            method=method_config_from_dict(raw["method"]),
            train=TrainConfig(**raw["train"]),
            overwrite=True,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path} is damaged: {err}") from err


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
    cfg, data_cfg = request.train, request.data
    if device.type == "cpu" or cfg.threads:
        set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_read = time.perf_counter()
    with distributed.together("reading the data"):
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
        splits = stratified_split(
            cohort.labels,
            train=cfg.train_ratio,
            val=cfg.val_ratio,
            test=cfg.test_ratio,
            seed=cfg.seed,
        )
        distributed.check_world_fits(len(splits["train"]), cfg.batch_size)
        summary = split_summary(cohort, splits, [str(c) for c in range(request.num_classes)])
        digests = data_digests(request) if distributed.active() else {}
    distributed.check_same_data(digests)
    with distributed.together("preparing the run folder"):
        if not resume and distributed.is_main():
            prepare_out_dir(request.out_dir, request.overwrite)
            save_request(request)
            _write_split_files(request.out_dir, cohort, splits)
            write_csv(request.out_dir / "splits_summary.csv", summary)
    for note in cohort.notes:
        emit(ProgressEvent("message", text=note))
    if len(splits.get("unlabeled", ())):
        emit(ProgressEvent("message", text=unlabeled_note(splits)))
    _say_if_slow(emit, t_read, f"read {len(cohort):,} patients")

    t_prepare = time.perf_counter()
    with distributed.together("building the model"):
        model, pre, weights_desc = build_for_cohort(cohort, training_patients(splits), request)
        data = pre.prepare(cohort)
    _say_if_slow(
        emit,
        t_prepare,
        "built the model and prepared the inputs (vocabulary, tokens, standardised labs)",
    )
    if not weights_desc.startswith(("file", "ImageNet", "none")):
        emit(ProgressEvent("message", text=f"image backbone: {weights_desc}"))
    model.to(device)
    frozen = _backbone_names(model)
    for name in frozen:
        for p in model.encoders[name].backbone.parameters():
            p.requires_grad = False

    t0 = time.perf_counter()
    if frozen:
        emit(ProgressEvent("message", text="encoding images/notes once with the frozen backbones"))
        with distributed.together("encoding images/notes"):
            cache_frozen_features(
                model,
                data,
                frozen,
                device=device,
                batch_size=cfg.encode_batch_size,
                amp=cfg.amp,
                progress=lambda d, t: emit(ProgressEvent("encode", d, t)),
                num_workers=cfg.num_workers,
                cache=feature_cache(cfg.cache_dir, cfg.cache),
                notify=lambda text: emit(ProgressEvent("message", text=text)),
            )
    encode_seconds = time.perf_counter() - t0

    class_names = [str(c) for c in range(request.num_classes)]
    positive_index(cfg, class_names)  # a wrong --positive-class fails before training
    meta = _meta(request, cohort, device, weights_desc, splits)

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
        write_csv(request.out_dir / "metrics.csv", pd.DataFrame(rows))

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
        )
    except TrainingInterrupted as stop:
        stop.hint = f"continue with: omnifuse train --resume {request.out_dir}"
        raise
    model.load_state_dict(best_state)
    meta["stopped"] = stop_reason(cfg, records[-1].epoch if records else 0, best_epoch)
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
    test: dict[str, float] = {}
    cm = None
    if len(splits["test"]):  # --test-ratio 0: the user evaluates an external cohort
        result = infer_all(
            model, data, splits["test"], device=device, batch_size=cfg.batch_size, amp=cfg.amp
        )
        probs = posthoc.probabilities(result.log_probs)
        pred = posthoc.decide(probs)
        y_test = cohort.labels[result.index]
        test = classification_metrics(y_test, probs, request.num_classes, pred)
        cm = confusion(y_test, pred, request.num_classes)
    if distributed.is_main():
        _write_results(
            request.out_dir,
            test,
            cm,
            class_names,
            meta,
            {
                "best_epoch": best_epoch,
                "encode_seconds": round(encode_seconds, 3),
                "train_seconds": round(sum(r.seconds for r in records), 3),
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
        image_weights=weights_desc,
        notes=list(cohort.notes),
        split_summary=summary,
    )


SLOW_STEP_SECONDS = 10.0  # steps before training that took longer are reported with their time


def fit_linear(
    model: OmniFuse,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
) -> LinearFit | None:
    """Fit the model's linear path (engine/linear_path.py) after the best epoch is restored:
    scikit-learn on the training split, the blend on validation."""
    if model.linear is None:
        return None
    val = infer_all(
        model, data, splits["val"], device=device, batch_size=max(cfg.batch_size, 256), amp=cfg.amp
    )
    assert data.labels is not None
    weights = class_weights(
        cfg.class_weight, data.labels[splits["train"]].numpy(), model.config.num_classes
    )
    return fit_linear_path(
        model,
        data,
        splits["train"],
        splits["val"],
        val,
        seed=cfg.seed,
        class_weight=None if weights is None else dict(enumerate(weights)),
    )


def fit_finish(
    model: OmniFuse,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
    class_names: list[str],
    linear: LinearFit | None = None,
) -> PostHoc:
    """Temperature, operating point and conformal scores on the validation split
    (engine/posthoc.py), after the best epoch and the linear path. With a linear path, on its
    validation predictions before its refit on training + validation patients: after the refit
    the validation patients are in-sample, their predictions too confident to calibrate on."""
    assert data.labels is not None
    if linear is not None and linear.val_log_probs is not None:
        index = linear.val_index
        log_probs = linear.val_log_probs
    else:
        val = infer_all(
            model,
            data,
            splits["val"],
            device=device,
            batch_size=max(cfg.batch_size, 256),
            amp=cfg.amp,
        )
        index, log_probs = val.index, val.log_probs
    return fit_posthoc(log_probs, data.labels[index].numpy(), cfg, class_names)


def posthoc_meta(posthoc: PostHoc) -> dict[str, Any]:
    """The run's record of its post-hoc fit (meta.csv)."""
    return {
        "calibration": posthoc.calibration,
        "temperature": round(posthoc.temperature, 6),
        "positive_class": "" if posthoc.positive is None else posthoc.positive,
        "threshold_rule": posthoc.rule or "",
        "threshold": "" if posthoc.threshold is None else round(posthoc.threshold, 6),
    }


def linear_state(model: OmniFuse) -> dict[str, torch.Tensor]:
    """The linear path's buffers as state-dict entries (to add to a saved best state)."""
    assert model.linear is not None
    return {f"linear.{k}": v for k, v in model.linear.state_dict().items()}


def linear_summary(fit: LinearFit) -> str:
    return (
        f"linear path: logistic regression C={fit.C:g} on {fit.features:,} features; "
        f"blend {fit.blend_omnifuse:.2f} x OmniFuse + {fit.blend_linear:.2f} x linear "
        f"(validation log loss {fit.val_log_loss_omnifuse:.3f} -> "
        f"{fit.val_log_loss_blend:.3f})"
    )


def linear_meta(fit: LinearFit) -> dict[str, Any]:
    return {
        "linear_C": fit.C,
        "linear_blend_omnifuse": round(fit.blend_omnifuse, 4),
        "linear_blend_linear": round(fit.blend_linear, 4),
        "linear_features": fit.features,
        "val_log_loss_omnifuse": round(fit.val_log_loss_omnifuse, 4),
        "val_log_loss_blend": round(fit.val_log_loss_blend, 4),
    }


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
    from safetensors.torch import load_file

    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise BundleError(
            f"{run_dir} has no {CHECKPOINT}: no epoch was completed, nothing to resume",
            hint="start the run again (with --overwrite)",
        )
    state = load_checkpoint(path)
    state["best_state"] = load_file(str(run_dir / BUNDLE_DIR / "model.safetensors"))
    return state


def fit_model(
    model: OmniFuse,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    num_classes: int,
    emit: EventFn,
    *,
    on_best: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    checkpoint: Path | None = None,
    resume: dict[str, Any] | None = None,
) -> tuple[list[EpochRecord], int, dict[str, torch.Tensor]]:
    """The epoch loop: train, validate, mine the lazy combination, keep the best state.

    The best epoch has the best validation score (``cfg.select_metric``: macro-F1 or AUROC, ties
    going to the lower validation loss, or the lowest log loss). With the reliability gate on
    "auto", each imputed modality's reliability is re-estimated on the validation split after
    every epoch (estimate_reliability), before that epoch is scored.
    With ``checkpoint``, the state after every epoch (model, optimizer, random generators) is
    saved there; ``resume`` (a loaded checkpoint plus the best state so far) continues from it
    exactly as if the run had never stopped. Ctrl-C raises TrainingInterrupted after the last
    complete epoch's files are on disk.
    Under torchrun the model trains as DistributedDataParallel on each rank's share of every
    global batch (train_epoch); validation, reliability and mining see the full sets on every
    rank, rank 0's decisions are broadcast, and only rank 0 calls ``on_best``/``on_epoch`` and
    writes the checkpoint.
    """
    device = next(model.parameters()).device
    optimizer = _optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    train_idx = splits["train"]
    # Unlabeled patients only feed the imputation losses: a model without imputation has no
    # use for them in its batches (they still fitted its normalisation and vocabulary).
    unlabeled = (
        splits.get("unlabeled", train_idx[:0]) if model.cra_forward is not None else train_idx[:0]
    )
    plan = reliability_plan(model, data, splits, cfg.seed)
    if plan is not None and plan.messages:
        for text in plan.messages:
            emit(ProgressEvent("message", text=text))
    mining_idx = np.sort(rng.choice(train_idx, min(cfg.tla_sample, len(train_idx)), replace=False))
    generator = torch.Generator().manual_seed(cfg.seed)
    records: list[EpochRecord] = []
    rows: list[dict[str, Any]] = []
    best_key: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch = 0
    lazy: tuple[int, ...] | None = None
    finetune = cfg.finetune_image_scope != "none" or cfg.finetune_text_last_n > 0
    unfrozen = False
    first = 1
    if resume is not None:
        if finetune and resume["epoch"] > cfg.warmup_epochs:
            _unfreeze(model, data, cfg)
            unfrozen = True
        missing, unexpected = model.load_state_dict(resume["model"], strict=False)
        frozen = _frozen_prefixes(model)
        if unexpected or any(not k.startswith(frozen) for k in missing):
            raise BundleError(
                "checkpoint.pt does not match this run's model",
                hint="start the run again without --resume",
            )
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["torch_rng"])
        generator.set_state(resume["loader_rng"])
        lazy = tuple(resume["lazy"]) or None
        # Checkpoints written before --select-by stored the macro-F1 key as two numbers.
        best_key = tuple(
            resume["best_key"]
            if "best_key" in resume
            else (resume["best_f1"], resume["best_neg_loss"])
        )
        best_epoch, best_state = resume["best_epoch"], resume["best_state"]
        rows = list(resume["rows"])
        first = resume["epoch"] + 1
    else:
        _fit_feature_stats(model, data, training_patients(splits))
    assert data.labels is not None
    weights = class_weights(cfg.class_weight, data.labels[train_idx].numpy(), num_classes)
    model.class_weight = (
        None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    )
    ddp = _wrap_ddp(model, device)
    main = distributed.is_main()
    epoch = first - 1
    saved = first - 1  # last epoch whose checkpoint is on disk
    try:
        for epoch in range(first, cfg.epochs + 1):
            if finetune and epoch > cfg.warmup_epochs and not unfrozen:
                emit(ProgressEvent("message", text="warm-up done: fine-tuning backbones"))
                _unfreeze(model, data, cfg)
                unfrozen = True
                ddp = _wrap_ddp(model, device)  # DDP registers the trainable parameters anew
            phase = ("warmup" if not unfrozen else "finetune") if finetune else "frozen"
            t_epoch = time.perf_counter()
            noise = None
            if ddp is not None:
                noise = torch.Generator().manual_seed(_rank_seed(cfg.seed, epoch))
                torch.manual_seed(_rank_seed(cfg.seed + 1, epoch))  # nn.Dropout, per rank
            losses = train_epoch(
                model,
                data,
                train_idx,
                optimizer,
                lazy,
                cfg,
                device,
                generator,
                emit,
                ddp=ddp,
                noise=noise,
                unlabeled=unlabeled,
                epoch=epoch,
                holdout=None if plan is None else plan.mask,
            )
            if plan is not None:
                plan.update(model, data, device=device, batch_size=cfg.batch_size, amp=cfg.amp)
                model.reliability.copy_(distributed.broadcast_object(model.reliability.cpu()))
            val = distributed.broadcast_object(
                evaluate_split(model, data, splits["val"], device, cfg, num_classes)
            )
            distances: dict[str, float] = {}
            lazy_name = ""
            if model.config.method.use_tla:
                raw = distributed.broadcast_object(
                    mine_lazy(
                        model,
                        data,
                        mining_idx,
                        device=device,
                        batch_size=cfg.batch_size,
                        amp=cfg.amp,
                        min_patients=model.config.method.tla_min_patients,
                    )
                )
                lazy = pick_lazy(raw)
                distances = {combo_name(k, model.names): v for k, v in raw.items()}
                lazy_name = combo_name(lazy, model.names) if lazy is not None else ""
            record = EpochRecord(
                epoch=epoch,
                phase=phase,
                train_loss=losses.pop("total"),
                losses=losses,
                val_loss=val["loss"],
                val_acc=val["acc"],
                val_macro_f1=val["macro_f1"],
                val_auroc=val["auroc"],
                lazy_combo=lazy_name,
                tla_distances=distances,
                seconds=time.perf_counter() - t_epoch,
                reliability=reliability_values(model),
            )
            key = selection_key(val, cfg.select_metric)
            if best_key is None or key > best_key:
                best_key, best_epoch, record.is_best = key, epoch, True
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
                if on_best and main:
                    on_best(epoch, best_state)
            records.append(record)
            rows.append(record.row())
            if on_epoch and main:
                on_epoch(rows)
            if checkpoint is not None and main:
                save_checkpoint(
                    checkpoint,
                    {
                        "epoch": epoch,
                        "model": _trained_state(model, unfrozen),
                        "optimizer": optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "loader_rng": generator.get_state(),
                        "lazy": list(lazy or ()),
                        "best_key": list(best_key),
                        "best_epoch": best_epoch,
                        "rows": rows,
                    },
                )
            saved = epoch
            emit(ProgressEvent("epoch", epoch, cfg.epochs, record=record))
            # With fine-tuning, patience counts from the end of warm-up at the earliest: the
            # fine-tuned epochs must get their chance to beat the frozen ones.
            since = max(best_epoch, cfg.warmup_epochs if finetune else 0)
            if cfg.patience and epoch - since >= cfg.patience and epoch < cfg.epochs:
                emit(ProgressEvent("message", text=stop_reason(cfg, epoch, best_epoch)))
                break
    except KeyboardInterrupt:
        stop = TrainingInterrupted(
            f"training stopped during epoch {saved + 1}; {saved} epoch(s) are complete and saved "
            f"(best so far: epoch {best_epoch})",
            hint="continue with: omnifuse train --resume RUN_DIR",
        )
        stop.all_ranks = True  # type: ignore[attr-defined]  # every rank got the Ctrl-C
        raise stop from None
    return records, best_epoch, best_state


def stop_reason(cfg: TrainConfig, last_epoch: int, best_epoch: int) -> str:
    """Why training ended, for the run's records."""
    if last_epoch < cfg.epochs:
        return (
            f"early stopping after epoch {last_epoch} of {cfg.epochs}: no better validation "
            f"{cfg.select_metric.replace('_', '-')} for {cfg.patience} epochs (best: epoch "
            f"{best_epoch})"
        )
    return f"all {cfg.epochs} epochs (best: epoch {best_epoch})"


class _LossModule(torch.nn.Module):
    """DDP synchronises gradients through ``forward``; the training loss is ``losses``."""

    def __init__(self, model: OmniFuse) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
        y: torch.Tensor,
        lazy: torch.Tensor | None,
        generator: torch.Generator | None,
        holdout: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.model.losses(
            inputs, present, y, lazy=lazy, generator=generator, holdout=holdout
        )


def _wrap_ddp(model: OmniFuse, device: torch.device) -> torch.nn.Module | None:
    """The model as DistributedDataParallel under torchrun (None in one process).

    A batch slice without some modality, an epoch without a lazy combination or an ablation
    leaves parameters out of a step's graph; rather than find_unused_parameters (a graph walk
    every step), _train_epoch_ddp adds 0 x one element of every trainable parameter to the
    loss, so each gets a gradient (zero where unused) on every rank."""
    if not distributed.active():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None
    )


def _rank_seed(seed: int, epoch: int) -> int:
    """A seed per (run, epoch, rank): random draws that are rank-local under DDP (modality
    dropout, nn.Dropout) are then reproducible on --resume without saving every rank's state."""
    return int(np.random.SeedSequence([seed, epoch, distributed.rank()]).generate_state(1)[0])


def selection_key(val: dict[str, float], metric: str) -> tuple[float, ...]:
    """Larger is better. Log loss and AUROC vary less between epochs on small validation
    splits than macro-F1, whose every patient moves it by a step."""
    if metric == "loss":
        return (-val["loss"],)
    return (val[metric], -val["loss"])


RELIABILITY_MIN_PATIENTS = 10  # fewer eligible held-out patients: the estimate is not made
RELIABILITY_HOLDOUT_SHARE = 0.2  # of the eligible training patients, when validation is short


def unlabeled_note(splits: dict[str, np.ndarray]) -> str:
    return (
        f"{len(splits['unlabeled']):,} unlabeled patient(s) (empty label) train the "
        "imputation and fit the normalisation and vocabulary beside the "
        f"{len(splits['train']):,} labelled training patients; no label loss, validation "
        "score or test metric uses them"
    )


@dataclass
class ReliabilityPlan:
    """Where each imputed modality's reliability r_m is estimated after every epoch: on the
    validation patients who have m and another modality when there are at least
    RELIABILITY_MIN_PATIENTS of them; otherwise on held-out training slots: a fixed
    RELIABILITY_HOLDOUT_SHARE of the training patients (labelled and unlabeled) with two or
    more modalities, drawn from the run's seed, whose slots are never imputation targets (the
    CRA has not learnt them), together with the validation patients: both are out of sample.
    Held-out patients still train every label term. A modality with too few patients in both
    keeps r_m = 0 and says so."""

    names: list[str]
    source: dict[str, str]  # modality -> "validation", "held-out training slots" or "none"
    counts: dict[str, int]  # modality -> eligible patients in its source
    val: np.ndarray
    held: np.ndarray  # held-out training patients and validation (empty when not needed)
    mask: np.ndarray | None  # (N,) bool over the cohort: held-out rows (None when not needed)
    messages: list[str]

    def update(
        self,
        model: OmniFuse,
        data: PreparedCohort,
        *,
        device: torch.device,
        batch_size: int,
        amp: bool,
    ) -> None:
        by_val = [k for k, n in enumerate(self.names) if self.source[n] == "validation"]
        by_held = [
            k for k, n in enumerate(self.names) if self.source[n] == "held-out training slots"
        ]
        if by_val:
            estimate_reliability(
                model, data, self.val, device=device, batch_size=batch_size, amp=amp, only=by_val
            )
        if by_held:
            estimate_reliability(
                model, data, self.held, device=device, batch_size=batch_size, amp=amp, only=by_held
            )


def _eligible(present: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(M,) patients of ``idx`` who have each modality and at least one other."""
    rows = present[idx]
    return (rows & (rows.sum(axis=1, keepdims=True) >= 2)).sum(axis=0)


def reliability_plan(
    model: OmniFuse, data: PreparedCohort, splits: dict[str, np.ndarray], seed: int
) -> ReliabilityPlan | None:
    """The run's ReliabilityPlan (None without imputation or with a fixed --reliability)."""
    if model.cra_forward is None or model.config.method.reliability != "auto":
        return None
    present = data.present.numpy() if torch.is_tensor(data.present) else np.asarray(data.present)
    names = list(model.names)
    val = np.asarray(splits["val"])
    on_val = _eligible(present, val)
    short = [k for k in range(len(names)) if on_val[k] < RELIABILITY_MIN_PATIENTS]
    held = val[:0]
    mask = None
    if short:
        pool = training_patients(splits)
        pool = pool[present[pool].sum(axis=1) >= 2]
        take = int(round(RELIABILITY_HOLDOUT_SHARE * len(pool)))
        held = np.sort(np.random.default_rng([seed, 0xA11]).choice(pool, take, replace=False))
        mask = np.zeros(len(present), dtype=bool)
        mask[held] = True
    # The held-out slots join the validation patients (both out of sample for the CRA).
    held = np.union1d(held, val) if len(held) else held
    on_held = _eligible(present, held)
    source, counts, messages = {}, {}, []
    for k, name in enumerate(names):
        if k not in short:
            source[name], counts[name] = "validation", int(on_val[k])
        elif on_held[k] >= RELIABILITY_MIN_PATIENTS:
            source[name], counts[name] = "held-out training slots", int(on_held[k])
        else:
            source[name], counts[name] = "none", int(on_held[k])
    moved = [n for n in names if source[n] == "held-out training slots"]
    if moved:
        messages.append(
            f"reliability of {', '.join(moved)}: validation has fewer than "
            f"{RELIABILITY_MIN_PATIENTS} patients with the modality and another, so it is "
            f"estimated on {len(held) - len(val):,} held-out training patients (their slots "
            "are not imputation targets) and the validation patients"
        )
    lost = [n for n in names if source[n] == "none"]
    if lost:
        messages.append(
            f"reliability of {', '.join(lost)} stays 0 (its imputation never votes): fewer "
            f"than {RELIABILITY_MIN_PATIENTS} patients have it and another modality in "
            "validation or the held-out training patients"
        )
    return ReliabilityPlan(names, source, counts, val, held, mask, messages)


def reliability_values(model: OmniFuse) -> dict[str, float]:
    """Each modality's current reliability (empty without imputation or when it is fixed)."""
    if model.cra_forward is None or model.config.method.reliability != "auto":
        return {}
    values = model.reliability.detach().cpu().tolist()
    return {n: round(float(v), 6) for n, v in zip(model.names, values, strict=True)}


def reliability_meta(
    model: OmniFuse, data: PreparedCohort, splits: dict[str, np.ndarray], cfg: TrainConfig
) -> dict[str, Any]:
    """The best epoch's reliabilities and where they were estimated (meta.csv, bundle)."""
    plan = reliability_plan(model, data, splits, cfg.seed)
    if plan is None:
        return {}
    out: dict[str, Any] = {f"reliability_{k}": v for k, v in reliability_values(model).items()}
    out["reliability_source"] = ";".join(
        f"{n}={plan.source[n]} ({plan.counts[n]})" for n in plan.names
    )
    return out


@torch.no_grad()
def estimate_reliability(
    model: OmniFuse,
    data: PreparedCohort,
    indices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool = True,
    min_patients: int = RELIABILITY_MIN_PATIENTS,
    only: list[int] | None = None,
) -> np.ndarray:
    """r_m = clip(R^2, 0, 1) of the forward imputation of modality m on held-out patients who
    have m and another modality: m is hidden, imputed from the rest, and compared with its
    real embedding (method.md Sec. 5.1). Sets and returns the model's reliability buffer; a
    modality with fewer than ``min_patients`` such patients, or not in ``only``, keeps its
    previous value."""
    assert model.cra_forward is not None
    model.eval()
    m = len(model.names)
    sse, total, sq, count = np.zeros(m), None, np.zeros(m), np.zeros(m)
    for batch in loader(data, indices, batch_size=max(batch_size, 256)):
        batch = move_to(batch, device)
        present = batch["present"]
        with autocast(device, amp):
            v = model.embed(batch["inputs"], present).float()
            for k in range(m):
                if only is not None and k not in only:
                    continue
                rows = present[:, k] & (present.sum(dim=1) >= 2)
                if not rows.any():
                    continue
                mask = present[rows].clone()
                mask[:, k] = False
                out = model.fuse(v[rows], mask)
                assert out.v_fwd is not None
                real, imputed = v[rows, k], out.v_fwd[:, k].float()
                sse[k] += float(((imputed - real) ** 2).sum())
                sums = real.sum(dim=0).double().cpu().numpy()
                if total is None:
                    total = np.zeros((m, len(sums)))
                total[k] += sums
                sq[k] += float((real.double() ** 2).sum())
                count[k] += int(rows.sum())
    reliability = model.reliability.detach().cpu().numpy().copy()
    for k in range(m):
        if count[k] < min_patients or total is None or (only is not None and k not in only):
            continue
        sst = sq[k] - float((total[k] ** 2).sum()) / count[k]  # sum ||v - mean v||^2
        if sst > 0:
            reliability[k] = float(np.clip(1.0 - sse[k] / sst, 0.0, 1.0))
    model.reliability.copy_(torch.as_tensor(reliability, dtype=model.reliability.dtype))
    return reliability


def _frozen_prefixes(model: OmniFuse) -> tuple[str, ...]:
    return tuple(f"encoders.{name}.backbone." for name in _backbone_names(model))


def _trained_state(model: OmniFuse, unfrozen: bool) -> dict[str, torch.Tensor]:
    """The state a checkpoint needs: backbones that were never unfrozen are left out (tens of MB
    per epoch saved); they are rebuilt identically from the run's request on --resume."""
    skip = () if unfrozen else _frozen_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def _fit_feature_stats(model: OmniFuse, data: PreparedCohort, train_idx: np.ndarray) -> None:
    """Image feature standardisation from the cached features of training patients."""
    for name, encoder in model.encoders.items():
        if isinstance(encoder, ImageEncoder) and name in data.image_cache:
            feats = data.image_cache[name].rows(train_idx)
            if len(feats):
                encoder.set_feature_stats(feats.to(encoder.feat_mean.device))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Tensors and primitives only, so it loads with weights_only=True; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # Ctrl-C mid-write keeps the previous checkpoint, no debris
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or file damaged: either way, not resumable
        raise BundleError(
            f"{path} is not a readable omnifuse checkpoint (damaged, or holding something "
            "other than tensors and plain values); it was not loaded",
            hint="start the run again without --resume",
        ) from err


def build_for_cohort(
    cohort: Cohort, train_idx: np.ndarray, request: TrainRequest
) -> tuple[OmniFuse, Preprocessor, str]:
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


def _backbone_names(model: OmniFuse) -> list[str]:
    return [n for n, e in model.encoders.items() if isinstance(e, (ImageEncoder, HFTextEncoder))]


def _optimizer(model: OmniFuse, cfg: TrainConfig) -> torch.optim.Optimizer:
    image_params, text_params = [], []
    for encoder in model.encoders.values():
        if isinstance(encoder, ImageEncoder):
            image_params += list(encoder.backbone.parameters())
        elif isinstance(encoder, HFTextEncoder):
            text_params += list(encoder.backbone.parameters())
    backbone_ids = {id(p) for p in image_params + text_params}
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": head_params, "lr": cfg.lr}]
    if image_params:
        groups.append({"params": image_params, "lr": cfg.lr_image})
    if text_params:
        groups.append({"params": text_params, "lr": cfg.lr_text})
    # foreach: one kernel per group instead of one per tensor (the CRA has many small ones).
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, foreach=True)


def _unfreeze(model: OmniFuse, data: PreparedCohort, cfg: TrainConfig) -> None:
    """After warm-up: unfreeze the asked-for backbone parts and stop using their cached features."""
    for name, encoder in model.encoders.items():
        if isinstance(encoder, ImageEncoder) and cfg.finetune_image_scope != "none":
            encoder.set_trainable_scope(cfg.finetune_image_scope)
            data.image_cache.pop(name, None)
        elif isinstance(encoder, HFTextEncoder) and cfg.finetune_text_last_n > 0:
            for p in encoder.trainable_tail(cfg.finetune_text_last_n):
                p.requires_grad = True
            data.text_cache.pop(name, None)


def _set_train_mode(model: OmniFuse) -> None:
    model.train()
    # Backbone BatchNorm statistics stay frozen: patient batches are far too small to re-estimate
    # ImageNet-scale statistics, and frozen features must match the cached ones.
    for name in _backbone_names(model):
        for module in model.encoders[name].backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        if isinstance(model.encoders[name], HFTextEncoder):
            model.encoders[name].backbone.eval()


def train_epoch(
    model: OmniFuse,
    data: PreparedCohort,
    train_idx: np.ndarray,
    optimizer: torch.optim.Optimizer,
    lazy: tuple[int, ...] | None,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    emit: EventFn,
    *,
    ddp: torch.nn.Module | None = None,
    noise: torch.Generator | None = None,
    unlabeled: np.ndarray | None = None,
    epoch: int = 0,
    holdout: np.ndarray | None = None,
) -> dict[str, float]:
    """One epoch; returns each loss term's mean over the training patients.

    With ``ddp`` (torchrun) every rank draws the same shuffled global batches from
    ``generator``, exactly as one process would, and trains on its own slice of each; ``noise``
    drives this rank's modality dropout so that ``generator`` stays identical on all ranks.
    ``unlabeled`` patients join the batches of labelled ones (MixedBatches); ``holdout`` (bool
    per cohort row) marks patients whose slots are never imputation targets.
    """
    batches, indices = _epoch_batches(data, train_idx, unlabeled, cfg, generator, epoch)
    if ddp is not None:
        return _train_epoch_ddp(
            model,
            ddp,
            data,
            indices,
            batches,
            optimizer,
            lazy,
            cfg,
            device,
            generator,
            noise,
            emit,
            holdout,
        )
    _set_train_mode(model)
    lazy_mask = combo_mask(lazy, len(model.names), device) if lazy is not None else None
    sums = dict.fromkeys(("total", *LOSS_TERMS), 0.0)
    seen = 0
    held = None if holdout is None else torch.from_numpy(holdout)
    loader_ = DataLoader(
        PatientDataset(data, indices),
        batch_sampler=batches,
        collate_fn=make_collate(data),
        num_workers=cfg.num_workers,
        generator=generator,
    )
    for k, batch in enumerate(loader_):
        rows_held = None if held is None else held[batch["index"]].to(device)
        batch = move_to(batch, device)
        with autocast(device, cfg.amp):
            terms = model.losses(
                batch["inputs"],
                batch["present"],
                batch["y"],
                lazy=lazy_mask,
                generator=generator,
                holdout=rows_held,
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        n = len(batch["y"])
        seen += n
        for key in sums:
            sums[key] += float(terms[key].detach()) * n
        emit(ProgressEvent("batch", k + 1, len(loader_)))
    return {k: v / max(seen, 1) for k, v in sums.items()}


UNLABELED_PER_LABELLED = 16  # most unlabeled patients joining each labelled one in a batch


def _epoch_batches(
    data: PreparedCohort,
    train_idx: np.ndarray,
    unlabeled: np.ndarray | None,
    cfg: TrainConfig,
    generator: torch.Generator,
    epoch: int,
) -> tuple[Any, np.ndarray]:
    """The epoch's batch sampler over positions of ``indices`` (returned with it).

    Without unlabeled patients: shuffled batches of ``--batch-size`` training patients, drawn
    from ``generator`` exactly as DataLoader(shuffle=True) draws them. With them, each batch of
    labelled patients is joined by its share of the unlabeled ones (MixedBatches)."""
    sampler = BatchSampler(
        RandomSampler(range(len(train_idx)), generator=generator), cfg.batch_size, drop_last=False
    )
    if unlabeled is None or not len(unlabeled):
        return sampler, np.asarray(train_idx)
    indices = np.concatenate([train_idx, unlabeled])
    rng = np.random.default_rng([cfg.seed, epoch, 0x5EED])
    return MixedBatches(sampler, len(train_idx), len(unlabeled), rng), indices


class MixedBatches:
    """Labelled batches, each followed by ceil(len(batch) x U / L) unlabeled patients (at most
    UNLABELED_PER_LABELLED per labelled one), taken in turn from a permutation of the U
    unlabeled patients drawn per epoch (from the run's seed and the epoch, so --resume repeats
    it): an epoch shows every unlabeled patient once unless the cap binds, and the label terms
    see exactly the batches they would see without unlabeled patients. Positions: labelled
    0..L-1, unlabeled L..L+U-1."""

    def __init__(
        self, labelled: BatchSampler, n_labelled: int, n_unlabeled: int, rng: np.random.Generator
    ) -> None:
        self.labelled, self.n_l, self.n_u, self.rng = labelled, n_labelled, n_unlabeled, rng

    def __len__(self) -> int:
        return len(self.labelled)

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = self.rng.permutation(self.n_u)
        at = 0
        for batch in self.labelled:
            k = min(
                math.ceil(len(batch) * self.n_u / self.n_l), UNLABELED_PER_LABELLED * len(batch)
            )
            take = []
            while k > 0:
                if at == len(order):
                    order, at = self.rng.permutation(self.n_u), 0
                part = order[at : at + k]
                take.append(part)
                at += len(part)
                k -= len(part)
            yield [*batch, *(int(self.n_l + i) for i in np.concatenate(take or [order[:0]]))]


def _train_epoch_ddp(
    model: OmniFuse,
    ddp: torch.nn.Module,
    data: PreparedCohort,
    indices: np.ndarray,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    lazy: tuple[int, ...] | None,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    noise: torch.Generator | None,
    emit: EventFn,
    holdout: np.ndarray | None = None,
) -> dict[str, float]:
    """The DDP epoch: the global batch of ``--batch-size`` patients is cut into one slice per
    rank (sizes differ by at most one), and each loss term is weighted by this rank's share of
    the rows it averages over (share of the batch; for TLA, share of the batch's patients who
    have the lazy combination), times the world size: DDP's gradient average is then the
    gradient of the global batch's loss, as in one process. A rank left without patients (last
    batch smaller than the world) repeats one patient with weight 0, so every rank still joins
    the gradient all-reduce. The normalized imputation loss averages over dropped slots, which
    depend on rank-local draws: it is weighted like a batch mean (exact without modality
    dropout, the case where one process and DDP can match at all). With unlabeled patients in
    the batches, the label terms are weighted by this rank's share of the batch's labelled
    patients."""
    _set_train_mode(model)
    method = model.config.method
    lazy_mask = combo_mask(lazy, len(model.names), device) if lazy is not None else None
    world, me = distributed.world_size(), distributed.rank()
    lambdas = method.loss_weights
    sums = dict.fromkeys(("total", *LOSS_TERMS), 0.0)
    # The same sampler and generator as one process's epoch (_epoch_batches), so every rank
    # draws that process's batches.
    dataset = PatientDataset(data, indices)
    slices = _RankSlices(batches, world, me)
    loader_ = DataLoader(
        dataset,
        batch_sampler=slices,
        generator=generator,
        collate_fn=make_collate(data),
        num_workers=cfg.num_workers,
    )
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    assert data.labels is not None
    labelled = (data.labels[indices] >= 0).numpy()
    # Which training patients have the lazy combination: fixed for the epoch, looked up per batch.
    has_lazy = (
        available(
            data.present[indices], combo_mask(lazy, len(model.names), torch.device("cpu"))
        ).numpy()
        & labelled
        if lazy is not None and method.use_tla
        else None
    )
    held = None if holdout is None else torch.from_numpy(holdout)
    seen = 0  # rows of the global batches (unlabeled patients may come round twice)
    for k, batch in enumerate(loader_):
        rows, n = slices.taken.popleft()  # DataLoader fetches in sampler order
        seen += len(rows)
        share = dict.fromkeys(LOSS_TERMS, n / len(rows))
        part = _rank_part(len(rows), world, me)
        if not labelled[rows].all():
            share["dwfuse"] = (float(labelled[rows][part].sum()) if n else 0.0) / max(
                float(labelled[rows].sum()), 1.0
            )
        if has_lazy is not None:
            has = has_lazy[rows]
            mine = has[part].sum() if n else 0
            share["tla"] = float(mine) / max(float(has.sum()), 1.0)
        rows_held = None if held is None else held[batch["index"]].to(device)
        batch = move_to(batch, device)
        with autocast(device, cfg.amp):
            terms = ddp(batch["inputs"], batch["present"], batch["y"], lazy_mask, noise, rows_held)
        loss = sum(lambdas[key] * share[key] * terms[key] for key in LOSS_TERMS)
        loss = loss + sum(p.reshape(-1)[0] for p in trainable) * 0.0  # see _wrap_ddp
        optimizer.zero_grad(set_to_none=True)
        (world * loss).backward()
        optimizer.step()
        for key in LOSS_TERMS:
            value = float(terms[key].detach()) * share[key] * len(rows)
            sums[key] += value
            sums["total"] += lambdas[key] * value
        emit(ProgressEvent("batch", k + 1, len(slices)))
    totals = distributed.all_reduce_sum(np.array(list(sums.values()), dtype=np.float64))
    return {key: float(totals[i]) / max(seen, 1) for i, key in enumerate(sums)}


def _rank_part(n: int, world: int, rank: int) -> slice:
    """Rows of a global batch of ``n`` that a rank trains on (np.array_split's cut)."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class _RankSlices:
    """This rank's slice of each global batch; an empty slice is replaced by the batch's first
    patient (trained with weight 0). ``taken`` queues (global batch, rows of this rank) in the
    order the DataLoader asks for them."""

    def __init__(self, batches: BatchSampler, world: int, rank: int) -> None:
        self.batches, self.world, self.rank = batches, world, rank
        self.taken: deque[tuple[np.ndarray, int]] = deque()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.batches:
            rows = np.asarray(batch)
            part = rows[_rank_part(len(rows), self.world, self.rank)]
            self.taken.append((rows, len(part)))
            yield [int(i) for i in part] if len(part) else [int(rows[0])]


def infer_all(
    model: OmniFuse,
    data: PreparedCohort,
    indices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool = True,
) -> Inference:
    """``infer`` on every patient of ``indices``; under torchrun each rank predicts its
    interleaved share and the shares are gathered back in order (no padding, so no patient is
    counted twice). Every rank returns the full result."""
    if not distributed.active():
        return infer(model, data, indices, device=device, batch_size=batch_size, amp=amp)
    indices = np.asarray(indices)
    part = distributed.shard(indices)
    mine = (
        infer(model, data, part, device=device, batch_size=batch_size, amp=amp)
        if len(part)
        else None
    )
    log_probs = distributed.gather_rows(None if mine is None else mine.log_probs, len(indices))
    weights = distributed.gather_rows(None if mine is None else mine.weights, len(indices))
    assert log_probs is not None
    return Inference(log_probs, weights, indices)


def evaluate_split(
    model: OmniFuse,
    data: PreparedCohort,
    idx: np.ndarray,
    device: torch.device,
    cfg: TrainConfig,
    num_classes: int,
) -> dict[str, float]:
    result = infer_all(
        model, data, idx, device=device, batch_size=max(cfg.batch_size, 256), amp=cfg.amp
    )
    assert data.labels is not None
    return classification_metrics(
        data.labels[result.index].numpy(), np.exp(result.log_probs), num_classes
    )


@torch.no_grad()
def mine_lazy(
    model: OmniFuse,
    data: PreparedCohort,
    indices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool = True,
    min_patients: int = 1,
) -> dict[tuple[int, ...], float]:
    """Mean cross-entropy of the prediction made from each modality combination alone, over
    the patients who have that whole combination (Eq. 15). NaN where fewer than
    ``min_patients`` have it: a mean over a handful of patients is noise, not laziness."""
    model.eval()
    m = len(model.names)
    combos = combinations(m)
    sums = np.zeros(len(combos))
    counts = np.zeros(len(combos))
    masks = torch.stack([combo_mask(c, m, device) for c in combos])  # (K, M)
    # Large no-grad batches with every combination stacked into one fuse call: mining runs
    # after every epoch and would otherwise cost more than the epoch itself.
    for batch in loader(data, indices, batch_size=max(batch_size, 256)):
        batch = move_to(batch, device)
        present, y = batch["present"], batch["y"]
        with autocast(device, amp):
            v = model.embed(batch["inputs"], present)
            ok = (present.unsqueeze(0) | ~masks.unsqueeze(1)).all(dim=2)  # (K, B) available
            combo_idx, rows = ok.nonzero(as_tuple=True)
            if len(rows) == 0:
                continue
            out = model.fuse(v[rows], masks[combo_idx])
            log_probs = model.predict_from(out).log_probs.float()
            nll = -log_probs.gather(1, y[rows].view(-1, 1)).squeeze(1)
        sums += torch.zeros(len(combos)).index_add_(0, combo_idx.cpu(), nll.cpu()).numpy()
        counts += ok.sum(dim=1).cpu().numpy()
    return {
        c: (float(sums[k] / counts[k]) if counts[k] >= max(min_patients, 1) else math.nan)
        for k, c in enumerate(combos)
    }


def split_assignment(cohort: Cohort, splits: dict[str, np.ndarray]) -> pd.DataFrame:
    """id, label and split of every patient (empty split for patients in none), then the
    patients left out for having no modality (split ``excluded``)."""
    assert cohort.labels is not None
    assignment = np.full(len(cohort), "", dtype=object)
    for name, idx in splits.items():
        assignment[idx] = name
    frame = pd.DataFrame({"id": cohort.ids, "label": cohort.labels, "split": assignment})
    if not cohort.excluded:
        return frame
    excluded = pd.DataFrame(cohort.excluded, columns=["id", "label"]).assign(split="excluded")
    return pd.concat([frame, excluded], ignore_index=True)


def _write_split_files(out_dir: Path, cohort: Cohort, splits: dict[str, np.ndarray]) -> None:
    """Each patient's split; patients left out for having no modality are listed as
    ``excluded`` (with their label, -1 when they have none)."""
    write_csv(out_dir / "split_assignment.csv", split_assignment(cohort, splits))
    counts = {name: len(idx) for name, idx in splits.items()}
    if cohort.excluded:
        counts["excluded"] = len(cohort.excluded)
    write_csv(
        out_dir / "split.csv", pd.DataFrame({"split": list(counts), "n": list(counts.values())})
    )


def _meta(
    request: TrainRequest,
    cohort: Cohort,
    device: torch.device,
    weights_desc: str,
    splits: dict[str, np.ndarray],
) -> dict[str, Any]:
    data_cfg = request.data
    return {
        "manifest": str(Path(request.manifest).resolve()),
        "labs_table": str(Path(data_cfg.labs_table).resolve()) if data_cfg.labs_table else "",
        "labs_id_col": data_cfg.labs_id_col,
        "labs_format": data_cfg.labs_format,
        "labs_agg": data_cfg.labs_agg,
        "encoding": data_cfg.encoding,
        "on_empty_patient": data_cfg.on_empty_patient,
        "n_excluded": len(cohort.excluded),
        "num_classes": request.num_classes,
        "modalities": ",".join(f"{m.name}={m.kind}" for m in data_cfg.modalities),
        "n_patients": len(cohort),
        **{f"n_{k}": len(v) for k, v in splits.items()},
        "device": str(device),
        "processes": distributed.world_size(),
        "image_weights": weights_desc,
        **{f"image_{k}": v for k, v in to_primitive(data_cfg.image).items()},
        **{f"text_{k}": v for k, v in to_primitive(data_cfg.text).items()},
        **to_primitive(request.method),
        **to_primitive(request.train),
        **{f"version_{k}": v for k, v in versions().items()},
    }


def _write_results(
    out_dir: Path,
    test: dict[str, float],
    cm: np.ndarray | None,
    class_names: list[str],
    meta: dict[str, Any],
    timings: dict[str, Any],
) -> None:
    """meta.csv, and the test split's metrics and confusion matrix when there is one."""
    if cm is not None:
        write_csv(out_dir / "test.csv", pd.DataFrame([{f"test_{k}": v for k, v in test.items()}]))
        frame = pd.DataFrame(cm, columns=[f"pred_{c}" for c in class_names])
        frame.insert(0, "true", class_names)
        write_csv(out_dir / "confusion_matrix.csv", frame)
    rows = {**meta, **timings}
    write_csv(
        out_dir / "meta.csv",
        pd.DataFrame({"key": list(rows), "value": [str(v) for v in rows.values()]}),
    )
