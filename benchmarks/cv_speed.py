"""Cost of `omnifuse cv` and `omnifuse report` (issue 9's performance goals), in one process:

1. one `train` run on a make-data cohort with images (default settings, CPU);
2. one cached-feature training run: what a cross-validation fold costs once the frozen backbone
   has encoded the images (build the model, fit preprocessing, train, score the test split);
3. `cv --folds 5` on the same cohort with the same settings.
   Goal: cv <= 1.5 x train + 4 x cached run (the images are encoded once, not five times).
4. `report` of a 2,000-patient run (trained small: the report's cost does not depend on the
   model) after `evaluate`, and of the cross-validation above. Goal: under 20 s.

    python benchmarks/cv_speed.py                       # n=240, 5 folds, default settings
    python benchmarks/cv_speed.py --n 90 --epochs 3 --report-n 300 --image-size 64   # smoke

Writes benchmarks/results/cv_speed.txt (or --out) with the numbers and the pooled cv metrics.
Each stage's numbers are kept in WORK/timings.json: rerun with the same --work after the process
was stopped and it continues (an interrupted cv resumes; its earlier folds' times are added).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from omnifuse_cli.config import DataConfig, ImageConfig, TrainConfig
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.splits import stratified_split
from omnifuse_cli.engine.cv import CVRequest, Variant, run_cv
from omnifuse_cli.engine.evaluation import EvalRequest, evaluate_run
from omnifuse_cli.engine.fitting import fit_model
from omnifuse_cli.engine.frozen_features import cache_frozen_features
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import build_for_cohort, run_training
from omnifuse_cli.model.encoders import ImageEncoder
from omnifuse_cli.report import build_report
from omnifuse_cli.synthetic import CohortSpec, make_cohort

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


class Clock:
    """Wall-clock and CPU seconds of a stage (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def cached_run(request: TrainRequest) -> Clock:
    """One training run on features encoded beforehand (the encoding is not timed)."""
    cfg = request.train
    cohort = read_manifest(request.manifest, request.data.modalities, num_classes=3)
    assert cohort.labels is not None
    splits = stratified_split(
        cohort.labels, train=cfg.train_ratio, val=cfg.val_ratio, test=cfg.test_ratio, seed=cfg.seed
    )
    torch.manual_seed(cfg.seed)
    model, pre, _ = build_for_cohort(cohort, splits["train"], request)
    data = pre.prepare(cohort)
    names = [n for n, e in model.encoders.items() if isinstance(e, ImageEncoder)]
    cache_frozen_features(
        model, data, names, device=CPU, batch_size=cfg.encode_batch_size, amp=False
    )
    cache, dims = dict(data.image_cache), dict(data.image_feature_dims)

    with Clock() as clock:
        torch.manual_seed(cfg.seed)
        model, pre, _ = build_for_cohort(cohort, splits["train"], request)
        data = pre.prepare(cohort)
        data.image_cache.update(cache)
        data.image_feature_dims.update(dims)
        for name in names:
            model.encoders[name].backbone.requires_grad_(False)
        _, _, best = fit_model(model, data, splits, cfg, 3, lambda event: None)
        model.load_state_dict(best)
        infer(model, data, splits["test"], device=CPU, batch_size=cfg.batch_size)
    return clock


def stage(work: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage once: its numbers are kept in WORK/timings.json, so a rerun after the process
    was stopped continues with the next stage."""
    path = work / "timings.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    if name not in done:
        done[name] = fn()
        path.write_text(json.dumps(done, indent=1))
    return done[name]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--image-size", type=int, default=ImageConfig().image_size)
    parser.add_argument("--backbone", default=ImageConfig().backbone)
    parser.add_argument("--report-n", type=int, default=2000)
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the data and runs here; rerun with it to continue",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cv_speed.txt"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="omnifuse-cv-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DataConfig(image=ImageConfig(backbone=args.backbone, image_size=args.image_size))
    train = TrainConfig(epochs=args.epochs, device="cpu")
    manifest = work / "data" / "manifest.csv"
    request = TrainRequest(manifest, 3, work / "train", data=data, train=train, overwrite=True)

    def make(folder: str, n: int) -> dict[str, Any]:
        shutil.rmtree(work / folder, ignore_errors=True)
        make_cohort(CohortSpec(n=n), work / folder)
        return {"n": n}

    def train_stage() -> dict[str, Any]:
        with Clock() as clock:
            result = run_training(request)
        return {
            "wall": clock.wall,
            "cpu": clock.cpu,
            "encode": result.encode_seconds,
            "weights": result.image_weights,
        }

    def cached_stage() -> dict[str, Any]:
        clock = cached_run(request)
        return {"wall": clock.wall, "cpu": clock.cpu}

    def cv_stage() -> dict[str, Any]:
        cv_request = CVRequest(
            manifest=manifest,
            num_classes=3,
            out_dir=work / "cv",
            base=Variant("base", data, request.method, train),
            folds=args.folds,
            overwrite=True,
        )
        with Clock() as clock:
            cv = run_cv(cv_request, resume=(work / "cv" / "cv.json").is_file())
        earlier = sum(f.seconds for f in cv.folds if f.resumed)
        return {
            "wall": clock.wall + earlier,
            "cpu": clock.cpu + earlier,
            "encode": cv.encode_seconds,
            "resumed_folds": sum(f.resumed for f in cv.folds),
        }

    def timed_report(folder: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            with Clock() as clock:
                build_report(work / folder)
            return {"wall": clock.wall, "cpu": clock.cpu}

        return run

    def big_stage() -> dict[str, Any]:
        small = DataConfig(image=ImageConfig(backbone="resnet18", image_size=64))
        run = TrainRequest(
            work / "data-big" / "manifest.csv",
            3,
            work / "run-big",
            data=small,
            train=TrainConfig(epochs=2, device="cpu"),
            overwrite=True,
        )
        with Clock() as clock:
            run_training(run)
            evaluate_run(EvalRequest(run_dir=run.out_dir, device="cpu"))
        return {"wall": clock.wall, "cpu": clock.cpu}

    stage(work, "data", lambda: make("data", args.n))
    t_train = stage(work, "train", train_stage)
    t_cached = stage(work, "cached", cached_stage)
    t_cv = stage(work, "cv", cv_stage)
    t_cv_page = stage(work, "cv_report", timed_report("cv"))
    stage(work, "data_big", lambda: make("data-big", args.report_n))
    t_big = stage(work, "big", big_stage)
    t_page = stage(work, "report", timed_report("run-big"))

    lines = [
        f"# cv and report speed ({datetime.now():%Y-%m-%d %H:%M}; {platform.platform()}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads)",
        f"command: python benchmarks/cv_speed.py --n {args.n} --folds {args.folds} --epochs "
        f"{args.epochs} --image-size {args.image_size} --backbone {args.backbone} --report-n "
        f"{args.report_n}",
        f"train: {fmt(t_train)} (encoding {t_train['encode']:.1f} s, {args.epochs} epochs, "
        f"{t_train['weights']})",
        f"cached-feature training run: {fmt(t_cached)}",
        f"cv --folds {args.folds}: {fmt(t_cv)} (encoding once {t_cv['encode']:.1f} s"
        + (
            f"; {t_cv['resumed_folds']} fold(s) timed in an earlier, stopped invocation: their "
            "fold seconds are added)"
            if t_cv["resumed_folds"]
            else ")"
        ),
    ]
    for unit in ("wall", "cpu"):
        goal = 1.5 * t_train[unit] + (args.folds - 1) * t_cached[unit]
        took = t_cv[unit]
        lines.append(
            f"  goal cv <= 1.5 x train + {args.folds - 1} x cached run, {unit} time: "
            f"{took:.1f} <= {goal:.1f} s: {'met' if took <= goal else 'NOT met'} "
            f"(ratio {took / goal:.2f})"
        )
    metrics = pd.read_csv(work / "cv" / "metrics.csv")
    lines.append(
        f"cv pooled out-of-fold metrics on the {args.n}-patient cohort (95% bootstrap "
        "CI; folds mean ± SD):"
    )
    for _, row in metrics.iterrows():
        lines.append(
            f"  {row['metric']:>13}: {row['value']:.3f} ({row['ci_low']:.3f}-"
            f"{row['ci_high']:.3f}; folds {row['fold_mean']:.3f} ± "
            f"{row['fold_sd']:.3f})"
        )
    n_test = len(pd.read_csv(work / "run-big" / "eval" / "test" / "predictions.csv"))
    lines += [
        f"report of the cv ({args.n} out-of-fold predictions): {fmt(t_cv_page)} -> "
        f"{work / 'cv' / 'report.html'}",
        f"{args.report_n}-patient run trained small (resnet18 at 64 px, 2 epochs) and "
        f"evaluated: {fmt(t_big)}",
        f"report of the {args.report_n}-patient run ({n_test} test patients, cohort read from "
        f"its manifest): {fmt(t_page)}; goal < 20 s wall: "
        f"{'met' if t_page['wall'] < 20 else 'NOT met'} -> {work / 'run-big' / 'report.html'}",
        f"work folder: {work}",
    ]
    print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def fmt(clock: dict[str, Any]) -> str:
    return f"{clock['wall']:.1f} s wall, {clock['cpu']:.1f} s CPU"


if __name__ == "__main__":
    main()
