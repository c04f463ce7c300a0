"""Scale benchmark (issue 10): every step is the real CLI in its own process, timed from outside
with its peak resident memory read from wait4 (ru_maxrss, which covers the process and every
process it waited for, so torchrun's workers count too).

For each size (labs + notes, 3 classes, each modality missing for 50% of patients, no images):
make-data, check, train (--epochs 2 --batch-size 1024: epoch 1 and epoch 2 seconds from
metrics.csv; an epoch there includes validation and lazy-combination mining) and predict on the
whole manifest (patients/s end to end: reading, preparing, scoring, writing). Then 20k patients
with two 64 px ultrasound views each: train once (the encode pass fills the feature cache), then
again on the same cache (encoding skipped: a cached epoch). Then the same small cohort trained
in 1 and in 2 processes (torchrun, gloo), and on one GPU when there is one.

    python benchmarks/scale.py --quick               # 2k and 10k, images 2k: minutes
    python benchmarks/scale.py                       # 10k, 100k, 1M, images 20k: an hour+

Writes benchmarks/results/scale.md (tables and the goals' verdicts, computed from the numbers)
and scale.csv (raw rows). Work files go to --work (default benchmarks/work/scale).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LABS_TEXT = ["--modality", "labs=vector", "--modality", "text=text"]
GOALS = {  # at 1,000,000 patients
    "check_s": 120.0,
    "train_rss_gb": 4.0,
    "cached_epoch_s": 300.0,
    "predict_per_s": 5000.0,
}


@dataclass
class Step:
    size: int
    step: str
    wall_s: float
    peak_rss_mb: float
    extra: dict[str, float | str] = field(default_factory=dict)
    ok: bool = True


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of one command, its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMNIFUSE_PROGRESS": "plain", "COLUMNS": "160", **(env or {})}
    with log.open("w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def omnifuse(*args: str) -> list[str]:
    return [str(BIN / "omnifuse"), *args]


def epoch_seconds(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def meta_value(run_dir: Path, key: str) -> str:
    path = run_dir / "meta.csv"
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8") as handle:
        return next((row["value"] for row in csv.DictReader(handle) if row["key"] == key), "")


def labs_notes(size: int, work: Path, epochs: int, batch: int) -> list[Step]:
    """make-data, check, train, predict on a labs + notes cohort of ``size`` patients."""
    data, run_dir, logs = work / f"data-{size}", work / f"run-{size}", work / "logs"
    steps = []
    wall, rss, rc = run(
        omnifuse(
            "make-data",
            "--n",
            str(size),
            "--no-images",
            "--inline-notes",
            "--missing-labs",
            "0.5",
            "--missing-text",
            "0.5",
            "--seed",
            "1",
            "--out-dir",
            str(data),
            "--overwrite",
        ),
        logs / f"make-data-{size}.log",
    )
    steps.append(Step(size, "make-data", wall, rss, ok=rc == 0))
    manifest = str(data / "manifest.csv")
    wall, rss, rc = run(
        omnifuse("check", manifest, "--num-classes", "3", *LABS_TEXT), logs / f"check-{size}.log"
    )
    steps.append(Step(size, "check", wall, rss, ok=rc == 0))
    wall, rss, rc = run(
        omnifuse(
            "train",
            manifest,
            "--num-classes",
            "3",
            *LABS_TEXT,
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batch),
            "--device",
            "cpu",
            "--out-dir",
            str(run_dir),
            "--overwrite",
        ),
        logs / f"train-{size}.log",
    )
    seconds = epoch_seconds(run_dir)
    extra: dict[str, float | str] = {f"epoch{k + 1}_s": round(s, 1) for k, s in enumerate(seconds)}
    extra["test_macro_f1"] = _test_metric(run_dir, "test_macro_f1")
    steps.append(Step(size, "train", wall, rss, extra, ok=rc == 0 and len(seconds) == epochs))
    wall, rss, rc = run(
        omnifuse(
            "predict",
            manifest,
            "--run",
            str(run_dir),
            "--device",
            "cpu",
            "--batch-size",
            str(batch),
            "--out",
            str(work / f"predictions-{size}.csv"),
        ),
        logs / f"predict-{size}.log",
    )
    steps.append(
        Step(size, "predict", wall, rss, {"patients_per_s": round(size / wall)}, ok=rc == 0)
    )
    return steps


def _test_metric(run_dir: Path, key: str) -> str:
    path = run_dir / "test.csv"
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8") as handle:
        row = next(csv.DictReader(handle), {})
    return f"{float(row[key]):.3f}" if row.get(key) else ""


def images(size: int, work: Path, batch: int) -> list[Step]:
    """Encode pass and a cached epoch: 2 views per patient at 64 px, resnet18 features."""
    data, logs, cache = work / f"images-{size}", work / "logs", work / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)
    steps = []
    wall, rss, rc = run(
        omnifuse(
            "make-data",
            "--n",
            str(size),
            "--image-size",
            "64",
            "--images-per-patient",
            "2",
            "--missing-us",
            "0",
            "--inline-notes",
            "--seed",
            "1",
            "--out-dir",
            str(data),
            "--overwrite",
        ),
        logs / f"make-data-images-{size}.log",
    )
    steps.append(Step(size, "make-data (2 views, 64 px)", wall, rss, ok=rc == 0))
    common = [
        "train",
        str(data / "manifest.csv"),
        "--num-classes",
        "3",
        "--image-size",
        "64",
        "--image-backbone",
        "resnet18",
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--device",
        "cpu",
        "--cache-dir",
        str(cache),
        "--overwrite",
    ]
    for label, run_name in (("train: encode pass", "first"), ("train: cache reused", "second")):
        run_dir = work / f"run-images-{size}-{run_name}"
        wall, rss, rc = run(
            omnifuse(*common, "--out-dir", str(run_dir)),
            logs / f"train-images-{size}-{run_name}.log",
        )
        seconds = epoch_seconds(run_dir)
        encode = meta_value(run_dir, "encode_seconds")
        steps.append(
            Step(
                size,
                label,
                wall,
                rss,
                {"encode_s": encode, "epoch1_s": round(seconds[0], 1) if seconds else ""},
                ok=rc == 0 and bool(seconds),
            )
        )
    return steps


def processes(size: int, work: Path, batch: int) -> list[Step]:
    """The same training in 1 and 2 CPU processes (torchrun, gloo), and on one GPU if any."""
    manifest = str(work / f"data-{size}" / "manifest.csv")
    args = [
        "train",
        manifest,
        "--num-classes",
        "3",
        *LABS_TEXT,
        "--epochs",
        "2",
        "--batch-size",
        str(batch),
        "--overwrite",
    ]
    steps = []
    launches = {
        "1 process (cpu)": omnifuse(*args, "--device", "cpu", "--out-dir", str(work / "ddp-1")),
        "2 processes (torchrun, cpu)": [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "omnifuse_cli",
            *args,
            "--device",
            "cpu",
            "--out-dir",
            str(work / "ddp-2"),
        ],
    }
    import torch

    if torch.cuda.is_available():
        launches["1 GPU"] = omnifuse(*args, "--device", "cuda", "--out-dir", str(work / "gpu-1"))
    for label, cmd in launches.items():
        run_dir = Path(cmd[cmd.index("--out-dir") + 1])
        # One intra-op thread per process, so 2 processes do not fight over 2 cores.
        wall, rss, rc = run(
            cmd,
            work / "logs" / f"{run_dir.name}.log",
            env={"OMP_NUM_THREADS": "1"} if "torchrun" in label else None,
        )
        seconds = epoch_seconds(run_dir)
        steps.append(
            Step(
                size,
                label,
                wall,
                rss,
                {f"epoch{k + 1}_s": round(s, 1) for k, s in enumerate(seconds)},
                ok=rc == 0 and len(seconds) == 2,
            )
        )
    return steps


def verdicts(steps: list[Step]) -> list[str]:
    """The issue's goals, judged from the numbers (at the largest size measured)."""
    by = {(s.size, s.step): s for s in steps if s.ok}
    sizes = sorted({s.size for s in steps if s.step == "check"})
    if not sizes:
        return []
    n = sizes[-1]
    scale_note = "" if n == 1_000_000 else f" (measured at {n:,}, the goal is for 1,000,000)"
    lines = []

    def judge(name: str, value: float | None, goal: float, unit: str, more_is_better: bool) -> None:
        if value is None:
            lines.append(f"- {name}: not measured")
            return
        met = value >= goal if more_is_better else value <= goal
        word = "at least" if more_is_better else "under"
        lines.append(
            f"- {name}: {value:,.1f} {unit} (goal {word} {goal:,.0f} {unit}): "
            f"**{'met' if met else 'missed'}**{scale_note}"
        )

    check = by.get((n, "check"))
    train = by.get((n, "train"))
    predict = by.get((n, "predict"))
    judge("check", check.wall_s if check else None, GOALS["check_s"], "s", False)
    judge(
        "peak RSS of train",
        train.peak_rss_mb / 1024 if train else None,
        GOALS["train_rss_gb"],
        "GB",
        False,
    )
    later = train.extra.get("epoch2_s") if train else None
    judge(
        "cached (later) epoch",
        float(later) if later not in (None, "") else None,
        GOALS["cached_epoch_s"],
        "s",
        False,
    )
    judge(
        "predict",
        float(predict.extra["patients_per_s"]) if predict else None,
        GOALS["predict_per_s"],
        "patients/s",
        True,
    )
    if len(sizes) >= 2:
        small, large = sizes[-2], sizes[-1]
        a, b = by.get((small, "train")), by.get((large, "train"))
        if a and b:
            ratio = b.peak_rss_mb / a.peak_rss_mb
            growth = large / small
            lines.append(
                f"- peak RSS of train, {small:,} -> {large:,} patients: x{ratio:.2f} "
                f"for x{growth:.0f} patients: **"
                f"{'sub-linear' if ratio < growth else 'not sub-linear'}**"
            )
    return lines


def write_results(steps: list[Step], out: Path, args: argparse.Namespace, total: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    extras = sorted({k for s in steps for k in s.extra})
    with out.with_suffix(".csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["size", "step", "wall_s", "peak_rss_mb", "ok", *extras])
        for s in steps:
            writer.writerow(
                [
                    s.size,
                    s.step,
                    f"{s.wall_s:.2f}",
                    f"{s.peak_rss_mb:.0f}",
                    int(s.ok),
                    *(s.extra.get(k, "") for k in extras),
                ]
            )
    lines = [
        "# Scale benchmark (issue 10)",
        "",
        f"`python benchmarks/scale.py {' '.join(sys.argv[1:])}` on {datetime.now():%Y-%m-%d}, "
        f"{platform.node()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        f"total {total / 60:.1f} min. Every step is the CLI in its own process; peak RSS from "
        f"wait4. Cohorts: labs + notes (inline), 3 classes, each modality missing for 50% of "
        f"patients; train with --epochs 2 --batch-size {args.batch_size} on the CPU (an epoch "
        "includes validation and lazy-combination mining); predict scores the whole manifest "
        "end to end.",
        "",
        "| patients | step | wall (s) | peak RSS (MB) | details |",
        "|---:|---|---:|---:|---|",
    ]
    for s in steps:
        details = ", ".join(f"{k} {v}" for k, v in s.extra.items() if v != "")
        status = "" if s.ok else " **(failed, see the log)**"
        lines.append(
            f"| {s.size:,} | {s.step}{status} | {s.wall_s:.1f} | {s.peak_rss_mb:.0f} | {details} |"
        )
    lines += ["", "## Goals", "", *verdicts(steps), ""]
    out.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k and 10k patients, 2k images")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--image-patients", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list of: images,processes")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "scale")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.md")
    args = parser.parse_args()
    sizes = [2_000, 10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    image_patients = 2_000 if args.quick else args.image_patients
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    start = time.perf_counter()
    steps: list[Step] = []
    for size in sizes:
        steps += labs_notes(size, args.work, args.epochs, args.batch_size)
        print(
            "\n".join(
                f"{s.size:>9,} {s.step:<28} {s.wall_s:8.1f} s {s.peak_rss_mb:8.0f} MB {s.extra}"
                for s in steps[-4:]
            ),
            flush=True,
        )
        write_results(steps, args.out, args, time.perf_counter() - start)
    if "images" not in skip:
        steps += images(image_patients, args.work, args.batch_size)
    if "processes" not in skip:
        steps += processes(sizes[0], args.work, args.batch_size)
    write_results(steps, args.out, args, time.perf_counter() - start)
    print(args.out.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
