"""cv's frozen-feature encoding: the backbones encode every image and note once for the whole
cross-validation (per image/text setting), and every fold's model reuses the features."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_cli.config import TrainConfig, to_primitive
from omnifuse_cli.data.cache import FeatureArray
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.engine.cv.request import ENCODING, CVRequest, Variant
from omnifuse_cli.engine.epoch import backbone, backbone_names
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import write_text_atomic
from omnifuse_cli.engine.frozen_features import encode_frozen
from omnifuse_cli.engine.run_record import weights_warning
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import build_for_cohort


def train_request(
    request: CVRequest, variant: Variant, cfg: TrainConfig | None = None
) -> TrainRequest:
    return TrainRequest(
        manifest=request.manifest,
        num_classes=request.num_classes,
        out_dir=request.out_dir,
        data=variant.data,
        method=variant.method,
        train=cfg or variant.train,
    )


@dataclass
class Encoded:
    """Frozen backbones' weights and the features they gave, shared by every fold."""

    states: dict[str, dict[str, torch.Tensor]]
    image_cache: dict[str, FeatureArray]  # memory-mapped from the feature cache, or in memory
    image_dims: dict[str, int]
    text_cache: dict[str, FeatureArray]
    weights: str
    seconds: float
    warning: str = ""  # random image weights where ImageNet ones were wanted (meta, report)


def encoding_key(variant: Variant) -> str:
    text = to_primitive(variant.data.text) if variant.data.text.encoder == "hf" else None
    return json.dumps([to_primitive(variant.data.image), text], sort_keys=True)


def encode(
    cohort: Cohort, request: CVRequest, variant: Variant, device: torch.device, emit: EventFn
) -> Encoded:
    cfg = variant.train
    torch.manual_seed(request.base.train.seed)
    model, pre, loaded = build_for_cohort(
        cohort, np.arange(len(cohort)), train_request(request, variant)
    )
    warning = weights_warning(loaded) if loaded.fallback else ""
    if warning:
        emit(ProgressEvent("warning", text=warning))
    weights = loaded.description
    names = backbone_names(model)
    if not names:
        return Encoded({}, {}, {}, {}, weights, 0.0, warning)
    emit(
        ProgressEvent(
            "message", text="encoding images/notes once for every fold with the frozen backbones"
        )
    )
    data = pre.prepare(cohort)
    model.to(device)
    t0 = time.perf_counter()
    encode_frozen(model, data, names, cfg, device, emit)
    states = {
        n: {k: v.detach().to("cpu", copy=True) for k, v in backbone(model, n).state_dict().items()}
        for n in names
    }
    return Encoded(
        states,
        dict(data.image_cache),
        dict(data.image_feature_dims),
        dict(data.text_cache),
        weights,
        time.perf_counter() - t0,
        warning,
    )


def encoded_for(
    cache: dict[str, Encoded],
    cohort: Cohort,
    request: CVRequest,
    variant: Variant,
    device: torch.device,
    emit: EventFn,
) -> Encoded:
    key = encoding_key(variant)
    if key not in cache:
        cache[key] = encode(cohort, request, variant, device, emit)
    return cache[key]


def encoding_record(out_dir: Path, encoded: dict[str, Encoded]) -> dict[str, Any]:
    """What the encoding used and cost; an invocation that encoded nothing (every fold already
    done) keeps the record of the one that did."""
    path = out_dir / ENCODING
    if not encoded and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    record = {
        "image_weights": next(iter(encoded.values())).weights if encoded else "",
        "encode_seconds": round(sum(e.seconds for e in encoded.values()), 3),
        "warnings": " | ".join(sorted({e.warning for e in encoded.values() if e.warning})),
    }
    write_text_atomic(path, json.dumps(record))
    return record
