#!/usr/bin/env python3
"""One entry point for a fresh machine: `python3 dev.py demo`, `test` or `bench`.

Creates a virtual environment in .venv (or $OMNIFUSE_VENV), installs omnifuse with its test
dependencies into it, then runs the demo (make-data -> train -> evaluate -> predict -> report)
or the tests, or the evidence study (benchmarks/study.py, which writes benchmarks/RESULTS.md). Only
the standard library is used here, so it runs on Linux, macOS and Windows with any
Python >= 3.10.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("OMNIFUSE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".omnifuse-installed"


def run(*args: str | Path) -> None:
    print("$", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def ensure_env() -> None:
    """Create the venv and (re)install when pyproject.toml changed since the last install."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.write_text(wanted)


def omnifuse(*args: str) -> None:
    run(PYTHON, "-m", "omnifuse_cli", *args)


def demo() -> None:
    data, run_dir = Path("demo") / "data_synth_raw", Path("demo") / "run"
    start = time.perf_counter()
    omnifuse("make-data", "--out-dir", str(data), "--n", "240", "--overwrite")
    omnifuse("train", str(data / "manifest.csv"), "--num-classes", "3", "--out-dir",
             str(run_dir), "--overwrite")
    omnifuse("evaluate", str(run_dir))
    omnifuse("predict", str(data / "manifest.csv"), "--run", str(run_dir), "--out",
             str(Path("demo") / "predictions.csv"))
    omnifuse("report", str(run_dir))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is under "
          f"{ROOT / 'demo'}", flush=True)
    print(f"report: {ROOT / run_dir / 'report.html'} (open it in a browser)", flush=True)


def test(extra: list[str]) -> None:
    run(PYTHON, "-m", "pytest", *extra)


def bench(extra: list[str]) -> None:
    run(PYTHON, ROOT / "benchmarks" / "study.py", *extra)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in {"demo", "test", "bench", "setup"}:
        sys.exit("usage: python3 dev.py demo | test [pytest args] | bench [study args] | setup")
    ensure_env()
    if command == "demo":
        demo()
    elif command == "test":
        test(sys.argv[2:])
    elif command == "bench":
        bench(sys.argv[2:])


if __name__ == "__main__":
    main()
