"""Batched prediction and frozen-backbone feature caching, shared by train/evaluate/predict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from omnifuse_cli.data.images import ImageFiles
from omnifuse_cli.data.prepared import (
    PatientDataset,
    PreparedCohort,
    collate_tokens,
    make_collate,
    move_to,
)
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder
from omnifuse_cli.model.omnifuse import OmniFuse

ProgressFn = Callable[[int, int], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but CUDA is not available here",
                          hint="use --device cpu (or auto)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):  # type: ignore[no-untyped-def]
    """bf16 autocast on CUDA; CPU stays fp32 (bf16 matmuls are slow on most laptop CPUs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")


def loader(data: PreparedCohort, indices, *, batch_size: int, shuffle: bool = False,
           generator: torch.Generator | None = None, num_workers: int = 0) -> DataLoader:
    return DataLoader(PatientDataset(data, indices), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=make_collate(data), num_workers=num_workers)


@dataclass
class Inference:
    log_probs: np.ndarray  # (N, C) under the model's inference rule
    weights: np.ndarray | None  # (N, M, C) DWFuse weights, None without DWFuse
    index: np.ndarray  # (N,) rows of the PreparedCohort, in order


@torch.no_grad()
def infer(model: OmniFuse, data: PreparedCohort, indices, *, device: torch.device,
          batch_size: int = 32, amp: bool = True, rule: str | None = None,
          progress: ProgressFn | None = None, num_workers: int = 0) -> Inference:
    model.eval()
    outs, weights, index = [], [], []
    batches = loader(data, indices, batch_size=batch_size, num_workers=num_workers)
    for k, batch in enumerate(batches):
        batch = move_to(batch, device)
        with autocast(device, amp):
            v = model.embed(batch["inputs"], batch["present"])
            pred = model.predict_from(model.fuse(v, batch["present"]), rule)
        outs.append(pred.log_probs.float().cpu())
        if pred.weights is not None:
            weights.append(pred.weights.float().cpu())
        index.append(batch["index"].cpu())
        if progress:
            progress(k + 1, len(batches))
    return Inference(torch.cat(outs).numpy(), torch.cat(weights).numpy() if weights else None,
                     torch.cat(index).numpy())


@torch.no_grad()
def cache_frozen_features(model: OmniFuse, data: PreparedCohort, names: list[str], *,
                          device: torch.device, batch_size: int, amp: bool,
                          progress: ProgressFn | None = None, num_workers: int = 0) -> None:
    """Encode every image and hf note once with the frozen backbones (streamed from disk)."""
    model.eval()
    for name in names:
        encoder = model.encoders[name]
        if isinstance(encoder, ImageEncoder):
            paths = [p for patient in data.images[name] for p in patient]
            feats = []
            files = DataLoader(ImageFiles(paths, data.image_size), batch_size=batch_size,
                               num_workers=num_workers)
            for k, pixels in enumerate(files):
                with autocast(device, amp):
                    feats.append(encoder.forward_features(pixels.to(device)).float().cpu())
                if progress:
                    progress(k + 1, len(files))
            flat = torch.cat(feats) if feats else torch.zeros(0, encoder.feature_dim)
            sizes = [len(patient) for patient in data.images[name]]
            data.image_cache[name] = list(torch.split(flat, sizes))
            data.image_feature_dims[name] = encoder.feature_dim
        elif isinstance(encoder, HFTextEncoder):
            out = []
            seqs, pad = data.token_ids[name], data.pad_ids[name]
            for k in range(0, len(seqs), batch_size):
                tokens = collate_tokens(seqs[k:k + batch_size], pad, hf=True)
                with autocast(device, amp):
                    out.append(encoder.forward_features(move_to(tokens, device)).float().cpu())
                if progress:
                    progress(min(k + batch_size, len(seqs)), len(seqs))
            data.text_cache[name] = torch.cat(out)
