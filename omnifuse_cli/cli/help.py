"""Every command's --help: its docstring as paragraphs that wrap at any width, and an Examples
section (the epilog) listing runnable command lines."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

EXAMPLES: dict[str, tuple[str, ...]] = {
    "synth": (
        "omnifuse synth",
        "omnifuse synth --epochs 10 --threads 1",
    ),
    "make-data": (
        "omnifuse make-data --out-dir data_synth_raw --n 240",
        "omnifuse make-data --n 600 --image-size 64 --unlabeled 2000 --seed 1",
        "omnifuse make-data --n 100000 --no-images --inline-notes",
    ),
    "check": (
        "omnifuse check data_synth_raw/manifest.csv --num-classes 3",
        "omnifuse check hospital/manifest.csv --labs-table labs_long.csv --labs-id-col subject_id",
    ),
    "train": (
        "omnifuse train data_synth_raw/manifest.csv --num-classes 3 --out-dir runs/demo",
        "omnifuse train m.csv --num-classes 2 --image-backbone resnet18 --image-size 64",
        "omnifuse train m.csv --num-classes 3 --no-imputation --epochs 20 --patience 5",
        "omnifuse train --config study.yaml --out-dir runs/study",
        "omnifuse train --resume runs/demo",
    ),
    "evaluate": (
        "omnifuse evaluate runs/demo",
        "omnifuse evaluate runs/demo --manifest external/manifest.csv",
        "omnifuse evaluate runs/demo --drop-modality us --subgroup-col sex",
        "omnifuse evaluate runs/demo --modality-missing-rate labs=0.8 --seed 1",
    ),
    "predict": (
        "omnifuse predict patients.csv --run runs/demo --out predictions.csv",
        "omnifuse predict patients.csv --run runs/demo --conformal 0.1",
    ),
    "cv": (
        "omnifuse cv data_synth_raw/manifest.csv --num-classes 3 --out-dir runs/cv",
        'omnifuse cv m.csv --num-classes 3 --variant no-imputation="--no-imputation"',
        "omnifuse cv m.csv --num-classes 2 --folds 10 --group-col site --refit",
        "omnifuse cv --resume runs/cv",
    ),
    "report": (
        "omnifuse report runs/demo",
        "omnifuse report runs/cv --out report.html",
        "omnifuse report runs/tune",
    ),
    "tune init": (
        "omnifuse tune init space.yaml",
        "omnifuse tune init",
    ),
    "tune run": (
        "omnifuse tune run data_synth_raw/manifest.csv --num-classes 3 --trials 30 --refit",
        "omnifuse tune run m.csv --num-classes 2 --space space.yaml --folds 5 --metric log_loss",
        "omnifuse tune run m.csv --num-classes 3 --storage sqlite:///shared/study.db "
        "--study-name s1 --out-dir runs/tune-a",
        "omnifuse tune run m.csv --num-classes 3 --trials 20 --nested-cv 5 "
        "--image-backbone resnet18",
    ),
    "config init": (
        "omnifuse config init study.yaml",
        "omnifuse config init cv.yaml --command cv",
    ),
    "config show": (
        "omnifuse config show runs/demo",
        "omnifuse config show runs/cv > cv.yaml",
    ),
}


def paragraphs(doc: str | None) -> str:
    """A docstring with each paragraph on one line, so --help wraps it at the terminal's width
    rather than at the source's line breaks."""
    text = inspect.cleandoc(doc or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


def epilog(name: str) -> str:
    """The Examples section of `omnifuse NAME --help` (a blank line keeps each on its own)."""
    return "\n\n".join(["[bold]Examples[/]", *(f"$ {line}" for line in EXAMPLES[name])])


def command_options(name: str, function: Callable[..., Any]) -> dict[str, Any]:
    """``help`` and ``epilog`` for ``app.command(...)``."""
    return {"help": paragraphs(function.__doc__), "epilog": epilog(name)}
