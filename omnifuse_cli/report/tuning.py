"""What a report says about a search of training settings (`omnifuse tune`): the facts behind
the TRIPOD+AI sentence and the pages' summary lines, read from a tune folder (tune_inputs.py) or
from the tune_* keys a refit run's meta.csv carries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

METRIC_WORDS = {"auroc": "AUROC", "macro_f1": "macro-F1", "log_loss": "log loss"}
# The run's name for the same number (test.csv's test_<name>, metrics.csv's metric column).
RUN_METRIC = {"auroc": "auroc", "macro_f1": "macro_f1", "log_loss": "loss"}


@dataclass
class Nested:
    """nested.json: the search repeated inside each outer fold, scored on that fold."""

    folds: int
    metric: str
    outer_mean: float
    outer_ci_low: float
    outer_ci_high: float
    inner_mean: float  # the best trials' own scores: optimistic


@dataclass
class Tuning:
    study: str
    trials: int  # every trial the search ran
    complete: int
    pruned: int
    metric: str  # auroc | macro_f1 | log_loss
    objective: str  # validation | cv
    folds: int  # cv: the inner folds
    sampler: str
    space: dict[str, dict[str, Any]]  # tune.json's space
    best_value: float
    n_pool: str  # patients the search saw ("?" when unknown)
    n_test: str  # held-out patients it never saw
    folder: str = ""
    best_number: int | None = None
    nested: Nested | None = None

    @property
    def metric_words(self) -> str:
        return METRIC_WORDS.get(self.metric, self.metric)

    @property
    def split(self) -> str:
        """What the objective was computed on: inner validation split, K-fold cross-validation."""
        if self.objective == "cv":
            return f"{self.folds}-fold cross-validation"
        return "inner validation split"

    @property
    def scored_on(self) -> str:
        """split, with its article where it needs one."""
        return self.split if self.objective == "cv" else f"an {self.split}"


def _int(value: object, default: int = 0) -> int:
    try:
        return int(float(str(value)))
    except ValueError:
        return default


def _float(value: object) -> float:
    try:
        return float(str(value))
    except ValueError:
        return math.nan


def number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def from_meta(meta: dict[str, str]) -> Tuning | None:
    """The search behind a refit run, from its meta.csv's tune_* keys; None without them (the
    settings were not chosen by omnifuse tune)."""
    if not any(key.startswith("tune_") for key in meta):
        return None
    try:
        space = json.loads(meta.get("tune_space", "") or "{}")
    except json.JSONDecodeError:
        space = {}
    train, val = meta.get("n_train", ""), meta.get("n_val", "")
    pool = str(_int(train) + _int(val)) if train.isdigit() and val.isdigit() else "?"
    return Tuning(
        study=meta.get("tune_study", "?"),
        trials=_int(meta.get("tune_trials", "")),
        complete=_int(meta.get("tune_complete", "")),
        pruned=_int(meta.get("tune_pruned", "")),
        metric=meta.get("tune_metric", "?"),
        objective=meta.get("tune_objective", "validation"),
        folds=_int(meta.get("tune_folds", "")),
        sampler=meta.get("tune_sampler", "?"),
        space=space if isinstance(space, dict) else {},
        best_value=_float(meta.get("tune_best_value", "")),
        n_pool=pool,
        n_test=meta.get("n_test", "?") or "?",
        folder=meta.get("tune_dir", ""),
    )


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def space_text(space: dict[str, dict[str, Any]]) -> str:
    """Each searched setting with its range: lr in [1e-05, 0.01] (log), fusion in {a, b}."""
    parts = []
    for name, spec in space.items():
        if spec.get("type") == "categorical":
            choices = ", ".join(_value(c) for c in spec.get("choices", []))
            parts.append(f"{name} in {{{choices}}}")
            continue
        extra = [
            word
            for word in (
                "log" if spec.get("log") else "",
                f"step {_value(spec['step'])}" if spec.get("step") is not None else "",
            )
            if word
        ]
        parts.append(
            f"{name} in [{_value(spec.get('low', '?'))}, {_value(spec.get('high', '?'))}]"
            + (f" ({', '.join(extra)})" if extra else "")
        )
    return ", ".join(parts) if parts else "(the space is not recorded)"


def describe(tuning: Tuning) -> str:
    """The TRIPOD+AI sentence: how the settings were chosen, on which patients, and the honest
    estimate when nested cross-validation was run."""
    failed = tuning.trials - tuning.complete - tuning.pruned
    counts = f"{tuning.complete} complete, {tuning.pruned} pruned" + (
        f", {failed} failed or unfinished" if failed > 0 else ""
    )
    text = (
        f"settings chosen by omnifuse tune: {tuning.trials} trials ({counts}) of a "
        f"{tuning.sampler} search over {space_text(tuning.space)}, objective "
        f"{tuning.metric_words} on {tuning.scored_on} of the {tuning.n_pool} training patients "
        f"only; the {tuning.n_test} test patients were never seen by the search"
    )
    nested = tuning.nested
    if nested is not None:
        text += (
            f". Nested cross-validation ({nested.folds} outer folds, the whole search repeated "
            f"inside each) estimates {METRIC_WORDS.get(nested.metric, nested.metric)} "
            f"{number(nested.outer_mean)} (95% CI {number(nested.outer_ci_low)}-"
            f"{number(nested.outer_ci_high)}) on patients the search never saw; the best "
            f"trials' own scores averaged {number(nested.inner_mean)} (optimistic: each was "
            "the best of its search)"
        )
    return text


def origin(tuning: Tuning) -> str:
    """A refit run's one line: where its settings came from."""
    return (
        f"Settings from omnifuse tune (study {tuning.study}, {tuning.trials} trials, best "
        f"{'cross-validation' if tuning.objective == 'cv' else 'validation'} score "
        f"{tuning.metric_words} {number(tuning.best_value)}"
        + (f"; folder {tuning.folder}" if tuning.folder else "")
        + "): that score is optimistic (the best of the trials); this run's test patients "
        "were never seen by the search."
    )
