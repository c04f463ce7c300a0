"""Batched prediction, shared by train/evaluate/predict: the device, autocast, the patients'
DataLoader and ``infer``. Frozen backbones' features are cached by frozen_features.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from omnifuse_cli.data.prepared import PatientDataset, PreparedCohort, make_collate, move_to
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.model.omnifuse import OmniFuse

ProgressFn = Callable[[int, int], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for but CUDA is not available here",
            hint="use --device cpu (or auto)",
        )
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA; CPU stays fp32 (bf16 matmuls are slow on most laptop CPUs)."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def loader(
    data: PreparedCohort,
    indices: np.ndarray | list[int],
    *,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> DataLoader[dict[str, Any]]:
    return DataLoader(
        PatientDataset(data, indices),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=make_collate(data),
        num_workers=num_workers,
    )


@dataclass
class Inference:
    log_probs: np.ndarray  # (N, C) under the model's inference rule
    weights: np.ndarray | None  # (N, M, C) DWFuse weights, None without DWFuse
    index: np.ndarray  # (N,) rows of the PreparedCohort, in order


@torch.no_grad()
def infer(
    model: OmniFuse | BaggedOmniFuse,
    data: PreparedCohort,
    indices: np.ndarray | list[int],
    *,
    device: torch.device,
    batch_size: int = 32,
    amp: bool = True,
    rule: str | None = None,
    progress: ProgressFn | None = None,
    num_workers: int = 0,
) -> Inference:
    model.eval()
    outs, weights, index = [], [], []
    batches = loader(data, indices, batch_size=batch_size, num_workers=num_workers)
    for k, batch in enumerate(batches):
        batch = move_to(batch, device)
        with autocast(device, amp):
            pred = model(batch["inputs"], batch["present"], rule=rule)
        outs.append(pred.log_probs.float().cpu())
        if pred.weights is not None:
            weights.append(pred.weights.float().cpu())
        index.append(batch["index"].cpu())
        if progress:
            progress(k + 1, len(batches))
    return Inference(
        torch.cat(outs).numpy(),
        torch.cat(weights).numpy() if weights else None,
        torch.cat(index).numpy(),
    )
