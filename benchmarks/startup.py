"""How fast `omnifuse --help` answers, and what importing the CLI costs (docs/architecture.md,
"Import time"). Goal: `omnifuse --help` imports in under 1 s.

Each measurement runs in a fresh interpreter, --runs times (default 10), and reports the best
and the median (the best is the machine's floor, the median what a user waits on a busy one):

- `python -m omnifuse_cli --help`: the whole command, interpreter start to exit (wall clock);
- `python -X importtime -c "import omnifuse_cli.cli.app"`: the cumulative import time of the CLI
  (what `--help` imports), from Python's own import timer, and its largest top-level imports;
- `python -c "import omnifuse_cli.api"`: the Python API (torch, pandas, scikit-learn), for
  contrast: what every command pays once it runs, and what `--help` must not;
- `python -c pass`: the interpreter alone.

    python benchmarks/startup.py                 # writes benchmarks/results/startup.md
    python benchmarks/startup.py --runs 3 --out /tmp/startup.md

Thread settings play no part: nothing here computes.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 1.0
# What `omnifuse --help` must not load (tests/test_layering.py checks the same list).
HEAVY = (
    "torch",
    "torchvision",
    "transformers",
    "pydicom",
    "optuna",
    "matplotlib",
    "sklearn",
    "scipy",
    "pandas",
    "numpy",
)
IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)\s*$")


@dataclass(frozen=True)
class Timing:
    """Seconds of every run of one measurement."""

    label: str
    command: str
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _env() -> dict[str, str]:
    # A fixed width keeps --help's rendering (and its cost) the same on every run.
    return {**os.environ, "COLUMNS": "100", "PYTHONDONTWRITEBYTECODE": "1"}


def wall_clock(label: str, argv: Sequence[str], runs: int) -> Timing:
    """Interpreter start to exit of ``argv``, ``runs`` times (after one untimed warm-up run
    that fills the OS file cache)."""
    subprocess.run(argv, check=True, capture_output=True, env=_env(), cwd=ROOT)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=_env(), cwd=ROOT)
        seconds.append(time.perf_counter() - start)
    return Timing(label, " ".join(_shown(a) for a in argv), seconds)


def _shown(arg: str) -> str:
    if arg == sys.executable:
        return "python"
    return f'"{arg}"' if " " in arg else arg


@dataclass(frozen=True)
class ImportTime:
    """One ``-X importtime`` run of ``import MODULE``."""

    seconds: float  # the module's cumulative import time
    by_package: dict[str, float]  # seconds spent in each top-level package's own code


def import_time(python: str, module: str) -> ImportTime:
    """``python -X importtime -c "import MODULE"``, read back."""
    done = subprocess.run(
        [python, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    subtree: list[tuple[str, int]] = []  # (name, self us) since the last top-level entry
    for line in done.stderr.splitlines():
        match = IMPORTTIME_LINE.match(line)
        if not match:
            continue
        own, total, indent, name = int(match[1]), int(match[2]), match[3], match[4]
        subtree.append((name, own))
        if len(indent) > 1:  # nested: Python lists children before the import they serve
            continue
        if name == module:
            by_package: dict[str, float] = {}
            for child, child_own in subtree:
                top = child.split(".")[0]
                by_package[top] = by_package.get(top, 0.0) + child_own / 1e6
            return ImportTime(total / 1e6, by_package)
        subtree = []
    raise RuntimeError(f"no import time for {module} in:\n{done.stderr[-2000:]}")


def cumulative(python: str, module: str, runs: int) -> tuple[Timing, ImportTime]:
    """The cumulative import time of ``module`` over ``runs`` runs, and the run closest to the
    median (for where its time goes)."""
    import_time(python, module)  # warm-up
    samples = [import_time(python, module) for _ in range(runs)]
    seconds = [sample.seconds for sample in samples]
    middle = min(samples, key=lambda s: abs(s.seconds - statistics.median(seconds)))
    command = f'python -X importtime -c "import {module}"'
    return Timing(f"import {module} (cumulative)", command, seconds), middle


def heavy_loaded(python: str, module: str) -> list[str]:
    """Which of HEAVY importing ``module`` loads."""
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    return done.stdout.split()


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{platform.system()} {platform.machine()}, {cores} usable CPU cores, "
        f"Python {platform.python_version()}"
    )


def page(
    timings: list[Timing],
    help_imports: ImportTime,
    help_heavy: list[str],
    api_heavy: list[str],
    runs: int,
) -> str:
    help_import = next(t for t in timings if t.label.startswith("import omnifuse_cli.cli.app"))
    met = help_import.median < GOAL_SECONDS
    largest = sorted(help_imports.by_package.items(), key=lambda item: -item[1])[:8]
    lines = [
        "# Startup time (`omnifuse --help`)",
        "",
        f"`python benchmarks/startup.py` on {date.today().isoformat()}, {machine()}; "
        f"best and median of {runs} runs, each in a fresh interpreter after one warm-up run.",
        "",
        "| what | command | best (s) | median (s) |",
        "|---|---|---:|---:|",
        *(f"| {t.label} | `{t.command}` | {t.best:.3f} | {t.median:.3f} |" for t in timings),
        "",
        "Where `import omnifuse_cli.cli.app` spends its time (the median run; each package's "
        "own modules): "
        + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in largest)
        + ".",
        "",
        "Heavy libraries loaded by `omnifuse --help`: "
        + (", ".join(help_heavy) if help_heavy else "none")
        + f" (of {', '.join(HEAVY)}); by `import omnifuse_cli.api`: "
        + (", ".join(api_heavy) if api_heavy else "none")
        + ".",
        "",
        "## Goal",
        "",
        f"- `omnifuse --help` import time (median): {help_import.median:.3f} s "
        f"(goal under {GOAL_SECONDS:.0f} s): **{'met' if met else 'not met'}**",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="runs per measurement [10]")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "startup.md",
        help="[benchmarks/results/startup.md]",
    )
    args = parser.parse_args()
    python = sys.executable
    timings = [
        wall_clock("`omnifuse --help`", [python, "-m", "omnifuse_cli", "--help"], args.runs),
    ]
    help_import, help_imports = cumulative(python, "omnifuse_cli.cli.app", args.runs)
    timings.append(help_import)
    timings.append(wall_clock("Python API", [python, "-c", "import omnifuse_cli.api"], args.runs))
    api_import, _ = cumulative(python, "omnifuse_cli.api", args.runs)
    timings.append(api_import)
    timings.append(wall_clock("the interpreter alone", [python, "-c", "pass"], args.runs))
    text = page(
        timings,
        help_imports,
        heavy_loaded(python, "omnifuse_cli.cli.app"),
        heavy_loaded(python, "omnifuse_cli.api"),
        args.runs,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
