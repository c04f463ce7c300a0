"""1 process vs 2 torchrun processes (gloo, CPU) on the same labs + notes cohort.

Each configuration is `omnifuse train` on the same manifest and settings: one process with one
and with two intra-op threads, and `torchrun --nproc-per-node 2` with one thread per process.
Reported: wall time of the whole command (start-up, reading, training, test) and the mean
epoch time from metrics.csv (epochs after the first), with the speed-up of 2 processes over
each 1-process configuration. On a 2-core machine the gain is expected to be small: the two
ranks share the cores that one process can already use, and every step adds a gradient
all-reduce.

usage: python benchmarks/ddp_speed.py [--n 20000] [--epochs 3] [--batch-size 256]
Writes benchmarks/results/ddp_speed.csv and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import common
import pandas as pd

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "ddp_speed"
RESULTS = ROOT / "results" / "ddp_speed.csv"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(n: int, epochs: int, batch_size: int) -> pd.DataFrame:
    data = WORK / f"cohort-{n}"
    if not (data / "manifest.csv").is_file():
        _run(
            [
                sys.executable,
                "-m",
                "omnifuse_cli",
                "make-data",
                "--out-dir",
                str(data),
                "--n",
                str(n),
                "--no-images",
                "--inline-notes",
                "--overwrite",
            ],
            2,
        )
    train = [
        "train",
        str(data / "manifest.csv"),
        "--num-classes",
        "3",
        "--modality",
        "labs=vector",
        "--modality",
        "text=text",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
        "--no-cache",
        "--overwrite",
    ]
    configs = [
        ("1 process, 1 thread", 1, 1),
        ("1 process, 2 threads", 1, 2),
        ("2 processes, 1 thread each", 2, 1),
    ]
    rows = []
    for label, processes, threads in configs:
        out = WORK / f"run-{processes}p{threads}t"
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(processes),
                "--master-port",
                str(_port()),
                "-m",
                "omnifuse_cli",
            ]
            if processes > 1
            else [sys.executable, "-m", "omnifuse_cli"]
        )
        wall = _run([*launcher, *train, "--out-dir", str(out)], threads)
        metrics = pd.read_csv(out / "metrics.csv")
        later = metrics["seconds"].iloc[1:] if len(metrics) > 1 else metrics["seconds"]
        rows.append(
            {
                "configuration": label,
                "patients": n,
                "epochs": epochs,
                "batch_size": batch_size,
                "wall_s": round(wall, 1),
                "epoch_s": round(float(later.mean()), 2),
                "final_train_loss": round(float(metrics["train_loss"].iloc[-1]), 4),
            }
        )
    frame = pd.DataFrame(rows)
    two = frame.iloc[-1]
    frame["speedup_of_2_processes_epoch"] = (frame["epoch_s"] / two["epoch_s"]).round(2)
    frame["speedup_of_2_processes_wall"] = (frame["wall_s"] / two["wall_s"]).round(2)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    frame = measure(args.n, args.epochs, args.batch_size)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS, index=False)
    print(common.markdown(frame))


if __name__ == "__main__":
    main()
