"""The figures of a tune folder's report, drawn from trials.csv and intermediate.csv with
matplotlib's object API (Figure, never pyplot: optuna's own matplotlib plots draw through pyplot's
global state, so the report draws their equivalents itself): the optimisation history, the
intermediate scores the pruner saw, parameter importances and one slice panel per setting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from omnifuse_cli.report.figures import COLORS
from omnifuse_cli.report.tune_inputs import PARAM, best_so_far

BEST = "#d62728"
PRUNED = "#9a9a9a"
JITTER = 0.15  # categories: horizontal spread of the points, in category widths
PANEL_COLUMNS = 3


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _complete(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]


def history(
    trials: pd.DataFrame,
    maximize: bool,
    metric: str,
    best_number: int | None,
    last_scores: dict[int, float] | None = None,
) -> Figure | None:
    """Each complete trial's objective value, the best so far (a step line), the best trial
    marked; pruned trials (grey crosses) at their last reported score when known."""
    done = _complete(trials)
    if not len(done):
        return None
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    numbers = done["number"].to_numpy(dtype=int)
    values = done["value"].to_numpy(dtype=float)
    ax.scatter(numbers, values, s=18, color=COLORS[0], label="objective value", zorder=3)
    ax.step(
        numbers,
        best_so_far(values, maximize),
        where="post",
        color=BEST,
        linewidth=1.5,
        label="best so far",
        gid="best-so-far",
    )
    if last_scores:
        pruned = trials[trials["state"] == "PRUNED"]["number"].astype(int)
        shown = [(n, last_scores[n]) for n in pruned if n in last_scores]
        if shown:
            x, y = zip(*shown, strict=True)
            ax.scatter(x, y, marker="x", s=20, color=PRUNED, label="pruned (last score)")
    if best_number is not None and best_number in set(numbers):
        value = float(done.loc[done["number"] == best_number, "value"].iloc[0])
        ax.scatter(
            [best_number],
            [value],
            s=120,
            facecolors="none",
            edgecolors=BEST,
            linewidths=1.5,
            label=f"best trial #{best_number}",
            zorder=4,
        )
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    ax.set_title("optimisation history")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def intermediate(frame: pd.DataFrame, states: dict[int, str], metric: str) -> Figure | None:
    """The per-step validation scores each trial reported (what the pruner compared); pruned
    trials in grey, complete ones in colour."""
    if frame is None or not len(frame):
        return None
    fig = _figure(7.0, 3.4)
    ax = fig.subplots()
    labelled: set[str] = set()
    for number in sorted(frame["number"].astype(int).unique()):
        part = frame[frame["number"] == number]
        state = states.get(int(number), "?")
        pruned = state == "PRUNED"
        label = "pruned" if pruned else "complete" if state == "COMPLETE" else state.lower()
        part = part.sort_values("step")
        ax.plot(
            part["step"],
            part["value"],
            color=PRUNED if pruned else COLORS[0],
            alpha=0.6 if pruned else 0.8,
            linewidth=1,
            marker="." if len(part) < 3 else None,
            label=None if label in labelled else label,
        )
        labelled.add(label)
    ax.set_xlabel("step (epoch)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"reported {metric}")
    ax.set_title("intermediate scores")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def importances(values: dict[str, float]) -> Figure:
    """Horizontal bars, the most important setting on top."""
    order = sorted(values, key=lambda k: values[k])
    fig = _figure(6.0, 0.9 + 0.35 * len(order))
    ax = fig.subplots()
    ax.barh(order, [values[k] for k in order], color=COLORS[0])
    for y, name in enumerate(order):
        ax.text(values[name], y, f" {values[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, max(values.values()) * 1.15))
    ax.set_xlabel("importance (share of the objective's variation)")
    ax.set_title("parameter importances")
    return fig


def _label(value: Any) -> str:
    """A category as its tick shows it: 32, not 32.0 (a column with a gap is read as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _categories(column: pd.Series, spec: dict[str, Any]) -> list[str]:
    """The categories seen, in the order the space declares them."""
    seen = [_label(v) for v in column.dropna().unique()]
    declared = [_label(c) for c in spec.get("choices", [])]
    return [c for c in declared if c in seen] + sorted(c for c in seen if c not in declared)


def slices(
    trials: pd.DataFrame,
    params: Sequence[str],
    space: dict[str, dict[str, Any]],
    metric: str,
    best_number: int | None,
) -> Figure | None:
    """One panel per setting: each complete trial's objective value against the setting's
    value (log axis for a log-scaled range; categories side by side, jittered), coloured by
    trial number; the best trial ringed."""
    done = _complete(trials)
    if not len(done) or not params:
        return None
    cols = min(PANEL_COLUMNS, len(params))
    rows = math.ceil(len(params) / cols)
    fig = _figure(3.0 * cols + 0.8, 2.6 * rows + 0.2)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True)).ravel()
    norm = Normalize(vmin=float(trials["number"].min()), vmax=float(trials["number"].max()))
    rng = np.random.default_rng(0)
    mappable = None
    for ax, name in zip(axes, params, strict=False):
        spec = space.get(name, {})
        column = done.get(PARAM + name, pd.Series(dtype=object))
        shown = done[column.notna() & (column.astype(str) != "")]
        ax.set_title(name, fontsize=10)
        if not len(shown):
            ax.text(0.5, 0.5, "not sampled", ha="center", va="center", transform=ax.transAxes)
            continue
        values = shown[PARAM + name]
        numeric = pd.to_numeric(values, errors="coerce")
        if spec.get("type") == "categorical" or numeric.isna().any():
            names = _categories(values, spec)
            x = np.array([names.index(_label(v)) for v in values], dtype=float)
            x += rng.uniform(-JITTER, JITTER, len(x))
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set_xlim(-0.5, len(names) - 0.5)
        else:
            x = numeric.to_numpy(dtype=float)
            if spec.get("log"):
                ax.set_xscale("log")
                # minor ticks unlabelled: a range under one decade would print overlapping labels
                ax.xaxis.set_minor_formatter(NullFormatter())
            elif spec.get("type") == "int":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        mappable = ax.scatter(
            x,
            shown["value"].to_numpy(dtype=float),
            c=shown["number"].to_numpy(dtype=float),
            cmap="viridis",
            norm=norm,
            s=18,
            gid=f"slice-{name}",
        )
        best = (shown["number"] == best_number).to_numpy()
        if best.any():
            ax.scatter(
                x[best],
                shown["value"].to_numpy(dtype=float)[best],
                s=110,
                facecolors="none",
                edgecolors=BEST,
                linewidths=1.5,
            )
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(metric)
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes[: len(params)]), label="trial", shrink=0.8)
    return fig
