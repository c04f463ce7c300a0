"""The epoch loop apart from the run around it: fit_model trains (epoch.py), validates, mines
the lazy combination, re-estimates the reliability gate and keeps the best state, saving a
checkpoint after every epoch for --resume. training.py owns the run folder around it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.prepared import PreparedCohort, move_to
from omnifuse_cli.data.splits import training_patients
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.epoch import backbone_names, train_epoch, wrap_ddp
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.inference import Inference, autocast, infer, loader
from omnifuse_cli.engine.metrics import classification_metrics
from omnifuse_cli.engine.posthoc import class_weights
from omnifuse_cli.engine.presets import resolve_metric
from omnifuse_cli.engine.reliability import reliability_plan, reliability_values
from omnifuse_cli.engine.stopping import out_of_time, selection_key, stop_reason
from omnifuse_cli.errors import BundleError, TrainingDiverged, TrainingInterrupted
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.laziness import combinations, combo_mask, combo_name, pick_lazy
from omnifuse_cli.model.omnifuse import OmniFuse


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
    deadline: float | None = None,
    status: dict[str, Any] | None = None,
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
    ``deadline`` (a time.monotonic() value, --time-limit): no epoch starts that the slowest one
    so far says would end after it (the first epoch always runs); ``status["time_limit"]`` is
    then set, for the run's records.
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
    ddp = wrap_ddp(model, device)
    main = distributed.is_main()
    epoch = first - 1
    saved = first - 1  # last epoch whose checkpoint is on disk
    try:
        for epoch in range(first, cfg.epochs + 1):
            if out_of_time(deadline, [r.seconds for r in records], epoch > first):
                if status is not None:
                    status["time_limit"] = True
                emit(
                    ProgressEvent(
                        "message",
                        text=f"time limit: stopped before epoch {epoch} (best: epoch {best_epoch})",
                    )
                )
                break
            if finetune and epoch > cfg.warmup_epochs and not unfrozen:
                emit(ProgressEvent("message", text="warm-up done: fine-tuning backbones"))
                _unfreeze(model, data, cfg)
                unfrozen = True
                ddp = wrap_ddp(model, device)  # DDP registers the trainable parameters anew
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
            if not distributed.broadcast_object(math.isfinite(losses["total"])):
                # Diverged (lr too high for these settings): keep the best epoch so far, as
                # early stopping would; with none yet, these settings cannot train.
                if not best_state:
                    check_finite(float("nan"), epoch, cfg)
                emit(
                    ProgressEvent(
                        "warning",
                        text=f"training diverged in epoch {epoch} (the loss is NaN or "
                        f"infinite at --lr {cfg.lr:g}): stopped, the best epoch so far "
                        f"({best_epoch}) is kept; a lower --lr avoids this",
                    )
                )
                break
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
            key = selection_key(
                val, resolve_metric(cfg.select_metric, num_classes, cfg.bag_folds >= 2)
            )
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


def _rank_seed(seed: int, epoch: int) -> int:
    """A seed per (run, epoch, rank): random draws that are rank-local under DDP (modality
    dropout, nn.Dropout) are then reproducible on --resume without saving every rank's state."""
    return int(np.random.SeedSequence([seed, epoch, distributed.rank()]).generate_state(1)[0])


def _frozen_prefixes(model: OmniFuse) -> tuple[str, ...]:
    return tuple(f"encoders.{name}.backbone." for name in backbone_names(model))


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


def infer_all(
    model: OmniFuse | BaggedOmniFuse,
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
    probs = np.exp(result.log_probs)
    if not np.isfinite(probs).all():
        check_finite(float("nan"), None, cfg)
    return classification_metrics(data.labels[result.index].numpy(), probs, num_classes)


def check_finite(loss: float, epoch: int | None, cfg: TrainConfig) -> None:
    """A TrainingDiverged error (a known error: exit 2, a hint) when the loss is NaN or
    infinite, rather than a ValueError from deep inside the metrics."""
    if math.isfinite(loss):
        return
    where = f"in epoch {epoch}" if epoch is not None else "on validation"
    raise TrainingDiverged(
        f"training diverged {where}: the {'loss' if epoch else 'prediction'} is {loss} "
        f"(--lr {cfg.lr:g}, --batch-size {cfg.batch_size})",
        hint=f"lower --lr (e.g. {cfg.lr / 3:.1g}); a smaller --lambda0 or a larger --batch-size "
        "also steadies training",
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
