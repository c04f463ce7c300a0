"""One training epoch: the batches it draws (shuffled labelled patients, unlabeled ones mixed
in, one slice per rank under torchrun) and the optimizer steps over them. fitting.py runs the
epochs; the per-batch loss is the model's (OmniFuse.losses)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.prepared import PatientDataset, PreparedCohort, make_collate, move_to
from omnifuse_cli.engine import distributed
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.inference import autocast
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.laziness import available, combo_mask
from omnifuse_cli.model.omnifuse import OmniFuse

LOSS_TERMS = ("forward", "backward", "dwfuse", "tla")


def backbone_names(model: OmniFuse | BaggedOmniFuse) -> list[str]:
    """Modalities whose encoder wraps a pretrained backbone (image network, Hugging Face text
    model): frozen until fine-tuning, their features cached."""
    return [n for n, e in model.encoders.items() if isinstance(e, (ImageEncoder, HFTextEncoder))]


def backbone(model: OmniFuse | BaggedOmniFuse, name: str) -> torch.nn.Module:
    """The pretrained backbone of modality ``name``, one of ``backbone_names(model)``."""
    encoder = model.encoders[name]
    assert isinstance(encoder, (ImageEncoder, HFTextEncoder)), name
    return encoder.backbone


def _set_train_mode(model: OmniFuse) -> None:
    model.train()
    # Backbone BatchNorm statistics stay frozen: patient batches are far too small to re-estimate
    # ImageNet-scale statistics, and frozen features must match the cached ones.
    for name in backbone_names(model):
        for module in backbone(model, name).modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        if isinstance(model.encoders[name], HFTextEncoder):
            backbone(model, name).eval()


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

    def __iter__(self) -> Iterator[list[int]]:
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
    have the lazy combination; for the paper's L_forward, share of the batch's present slots),
    times the world size: DDP's gradient average is then the gradient of the global batch's
    loss, as in one process. A rank left without patients (last
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
    # The paper's L_forward averages over the batch's present slots (a held-out patient's are
    # no targets), not its rows: each training patient's count of them, looked up per batch.
    slots: np.ndarray | None = None
    if method.imputation_loss == "paper":
        slots = data.present[indices].sum(dim=1).numpy()
        if holdout is not None:
            slots = slots * ~holdout[indices]
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
        if slots is not None:
            share["forward"] = (float(slots[rows][part].sum()) if n else 0.0) / max(
                float(slots[rows].sum()), 1.0
            )
        rows_held = None if held is None else held[batch["index"]].to(device)
        batch = move_to(batch, device)
        with autocast(device, cfg.amp):
            terms = ddp(batch["inputs"], batch["present"], batch["y"], lazy_mask, noise, rows_held)
        loss = sum(lambdas[key] * share[key] * terms[key] for key in LOSS_TERMS)
        loss = loss + sum(p.reshape(-1)[0] for p in trainable) * 0.0  # see wrap_ddp
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

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            rows = np.asarray(batch)
            part = rows[_rank_part(len(rows), self.world, self.rank)]
            self.taken.append((rows, len(part)))
            yield [int(i) for i in part] if len(part) else [int(rows[0])]


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


def wrap_ddp(model: OmniFuse, device: torch.device) -> torch.nn.Module | None:
    """The model as DistributedDataParallel under torchrun (None in one process).

    A batch slice without some modality, an epoch without a lazy combination or an ablation
    leaves parameters out of a step's graph; rather than find_unused_parameters (a graph walk
    every step), _train_epoch_ddp adds 0 x one element of every trainable parameter to the
    loss, so each gets a gradient (zero where unused) on every rank."""
    if not distributed.active():
        return None
    return DistributedDataParallel(
        _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None
    )
