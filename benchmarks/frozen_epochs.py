"""Cost of frozen-backbone epochs versus re-encoding images every epoch.

Generates a make-data cohort (default 240 patients), then measures in one process:
  1. a bare torchvision ResNet forward pass over every image of the cohort at --image-size
     (what a pipeline that re-encodes every epoch pays per epoch, at least);
  2. `omnifuse train` with --epochs frozen epochs: the one-off encoding and the per-epoch time.
Reports the ratio of (encode + all epochs) to (epochs x bare forward pass).

    python benchmarks/frozen_epochs.py --n 240 --epochs 5 --missing-us 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch.utils.data import DataLoader

from omnifuse_cli.config import DEFAULT_MODALITIES, DataConfig, ImageConfig, TrainConfig
from omnifuse_cli.data.images import ImageFiles
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import run_training
from omnifuse_cli.synthetic import CohortSpec, make_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--missing-us",
        type=float,
        default=0.0,
        help="0 gives every patient ultrasound: ~2.7 views each, about the "
        "reference's 644 images for 240 patients",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omnifuse-bench-"))
    summary = make_cohort(CohortSpec(n=args.n, missing_us=args.missing_us), work / "data")
    cohort = read_manifest(summary.manifest, DEFAULT_MODALITIES)
    paths = [p for patient in cohort.images["us"] for p in patient[:4]]

    net = getattr(torchvision.models, args.backbone)(weights=None).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for pixels in DataLoader(ImageFiles(paths, args.image_size), batch_size=32):
            net(pixels)
    bare = time.perf_counter() - t0

    request = TrainRequest(
        manifest=summary.manifest,
        num_classes=3,
        out_dir=work / "run",
        data=DataConfig(
            image=ImageConfig(backbone=args.backbone, image_size=args.image_size, pretrained="no")
        ),
        train=TrainConfig(epochs=args.epochs, device="cpu"),
    )
    t0 = time.perf_counter()
    result = run_training(request)
    total = time.perf_counter() - t0
    epochs = pd.read_csv(work / "run" / "metrics.csv")["seconds"]
    print(
        f"cohort: {args.n} patients, {len(paths)} images, {args.backbone} at "
        f"{args.image_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"bare {args.backbone} forward over all images: {bare:.1f} s")
    print(
        f"omnifuse one-off encoding: {result.encode_seconds:.1f} s; frozen epochs: "
        + ", ".join(f"{s:.2f}" for s in epochs)
        + " s"
    )
    frozen = result.encode_seconds + float(epochs.sum())
    print(
        f"encode + {args.epochs} frozen epochs = {frozen:.1f} s vs {args.epochs} x bare "
        f"forward = {args.epochs * bare:.1f} s (ratio {frozen / (args.epochs * bare):.2f}); "
        f"whole train command {total:.1f} s"
    )


if __name__ == "__main__":
    main()
