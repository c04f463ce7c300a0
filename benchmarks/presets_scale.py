"""Time budget and cohort-size defaults (issue 22): every step is the real CLI in its own
process, timed from outside with its peak resident memory (benchmarks/scale.py's ``run``).

1. ``--time-limit 120`` on a 3,000-patient make-data cohort (labs + notes, 3 classes, each
   modality missing for half the patients), with the default preset and with ``--preset best``:
   the wall clock of `omnifuse train` from start to exit (goal: <= 132 s), what the run says it
   finished, and that `omnifuse predict` then scores every patient with the saved model.
2. One epoch at default settings on 1,000,000 patients with labs and notes: `omnifuse train
   --epochs 1` and nothing else about the optimisation, so the batch size and learning rate are
   the cohort rule's (engine/presets.py); goal <= 300 s for the epoch (metrics.csv's seconds:
   training, validation and TLA mining), peak RSS < 4 GB for the whole train command.

    python benchmarks/presets_scale.py                    # both (the 1M cohort: ~15 min)
    python benchmarks/presets_scale.py --skip million     # the time limits only

Writes benchmarks/results/presets_scale.md and .csv; work files under --work.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import LABS_TEXT, epoch_seconds, meta_value, omnifuse, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LIMIT, LIMIT_GOAL = 120, 132.0
EPOCH_GOAL_S, RSS_GOAL_MB = 300.0, 4096.0


def make(size: int, work: Path, logs: Path) -> Path:
    data = work / f"data-{size}"
    if not (data / "manifest.csv").is_file():
        wall, _, rc = run(
            omnifuse(
                "make-data",
                "--n",
                str(size),
                "--no-images",
                "--inline-notes",
                "--num-classes",
                "3",
                "--missing-labs",
                "0.5",
                "--missing-text",
                "0.5",
                "--seed",
                "7",
                "--out-dir",
                str(data),
                "--overwrite",
            ),
            logs / f"make-data-{size}.log",
        )
        if rc:
            raise SystemExit(f"make-data {size} failed: see {logs}")
    return data / "manifest.csv"


def time_limited(work: Path, logs: Path, threads: str) -> list[dict[str, object]]:
    manifest = make(3000, work, logs)
    rows: list[dict[str, object]] = []
    for preset in ("medium", "best"):
        run_dir = work / f"limit-{preset}"
        wall, rss, rc = run(
            omnifuse(
                "train",
                str(manifest),
                "--num-classes",
                "3",
                *LABS_TEXT,
                "--preset",
                preset,
                "--time-limit",
                str(LIMIT),
                "--threads",
                threads,
                "--out-dir",
                str(run_dir),
                "--overwrite",
            ),
            logs / f"limit-{preset}.log",
        )
        preds = work / f"limit-{preset}-predictions.csv"
        p_wall, _, p_rc = run(
            omnifuse("predict", str(manifest), "--run", str(run_dir), "--out", str(preds)),
            logs / f"limit-{preset}-predict.log",
        )
        scored = 0
        if preds.is_file():
            with preds.open(encoding="utf-8") as handle:
                scored = sum(1 for row in csv.DictReader(handle) if row.get("prob_0"))
        rows.append(
            {
                "step": f"train --preset {preset} --time-limit {LIMIT}",
                "wall_s": round(wall, 1),
                "peak_rss_mb": round(rss),
                "ok": rc == 0 and wall <= LIMIT_GOAL,
                "detail": (
                    f"stopped: {meta_value(run_dir, 'stopped')}; "
                    f"bag folds {meta_value(run_dir, 'bag_folds_finished') or '-'}; "
                    f"epochs run {len(epoch_seconds(run_dir))}; "
                    f"test auroc {_test(run_dir)}; predict rc {p_rc}, {scored} of 3000 scored "
                    f"in {p_wall:.0f} s"
                ),
            }
        )
    return rows


def _test(run_dir: Path) -> str:
    path = run_dir / "test.csv"
    if not path.is_file():
        return "n/a"
    with path.open(encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    return f"{float(row['test_auroc']):.3f}"


def million(manifest: Path, work: Path, logs: Path, threads: str) -> dict[str, object]:
    run_dir = work / "run-1000000"
    wall, rss, rc = run(
        omnifuse(
            "train",
            str(manifest),
            "--num-classes",
            "3",
            *LABS_TEXT,
            "--epochs",
            "1",
            "--threads",
            threads,
            "--out-dir",
            str(run_dir),
            "--overwrite",
        ),
        logs / "train-1000000.log",
    )
    seconds = epoch_seconds(run_dir)
    epoch = seconds[0] if seconds else float("nan")
    return {
        "step": "train 1,000,000 (labs + notes) --epochs 1, defaults",
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(rss),
        "ok": rc == 0 and epoch <= EPOCH_GOAL_S and rss < RSS_GOAL_MB,
        "detail": (
            f"epoch {epoch:.1f} s (goal <= {EPOCH_GOAL_S:.0f}); batch "
            f"{meta_value(run_dir, 'batch_size')}, lr {meta_value(run_dir, 'lr')}; "
            f"{meta_value(run_dir, 'settings_rule')}"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work-presets")
    parser.add_argument(
        "--million-manifest",
        type=Path,
        default=None,
        help="an existing 1,000,000-patient labs + notes manifest (else make-data writes one)",
    )
    parser.add_argument("--threads", default="1")
    parser.add_argument("--skip", default="", help="comma list of: limit,million")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    logs = args.work / "logs"
    rows = []
    if "limit" not in skip:
        rows += time_limited(args.work, logs, args.threads)
    if "million" not in skip:
        manifest = args.million_manifest or make(1_000_000, args.work, logs)
        rows.append(million(manifest, args.work, logs, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "presets_scale.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Time budget and cohort-size defaults (issue 22)",
        "",
        f"`python benchmarks/presets_scale.py`, {datetime.now():%Y-%m-%d %H:%M}, "
        f"{platform.machine()}, {args.threads} torch thread(s); wall clock of the whole "
        "command, peak RSS from wait4.",
        "",
        "| step | wall s | peak RSS MB | goal met | detail |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['step']} | {row['wall_s']} | {row['peak_rss_mb']} | "
            f"{'yes' if row['ok'] else 'NO'} | {row['detail']} |"
        )
    (args.out / "presets_scale.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
