"""The report's figures, drawn with matplotlib's object API (Figure, never pyplot: no global state,
safe in any process). Each function takes result tables and returns a Figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from omnifuse_cli.report.curves import Curve, Reliability
from omnifuse_cli.report.inputs import group_order

COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
LOSS_TERMS = ("train_loss", "loss_forward", "loss_backward", "loss_dwfuse", "loss_tla")
VAL_METRICS = ("val_macro_f1", "val_acc", "val_auroc", "val_loss")
METRIC_NAMES = {
    "acc": "accuracy",
    "macro_f1": "macro-F1",
    "balanced_acc": "balanced accuracy",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "loss": "log loss",
    "ece": "ECE",
    "brier": "Brier score",
}
LOWER_IS_BETTER = ("loss", "ece", "brier")


def _color(k: int) -> str:
    return COLORS[k % len(COLORS)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def class_counts(cohort: pd.DataFrame, class_names: Sequence[str], group_name: str) -> Figure:
    """Patients per class in every split or fold (stacked bars)."""
    groups = group_order(cohort["group"])
    fig = _figure(max(4.0, 1.1 * len(groups) + 2), 3.2)
    ax = fig.subplots()
    bottom = np.zeros(len(groups))
    for c, name in enumerate(class_names):
        counts = np.array(
            [
                int(((cohort["group"].astype(str) == g) & (cohort["label"] == c)).sum())
                for g in groups
            ]
        )
        ax.bar(groups, counts, bottom=bottom, color=_color(c), label=f"class {name}")
        for x, (b, n) in enumerate(zip(bottom, counts, strict=True)):
            if n:
                ax.text(x, b + n / 2, str(n), ha="center", va="center", fontsize=8, color="white")
        bottom += counts
    ax.set_ylabel("patients")
    ax.set_title(f"patients per class and {group_name}")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def missing_patterns(patterns: pd.Series, modalities: Sequence[str]) -> Figure:
    """UpSet-style chart: patients with each set of modalities present (bars), the set below each
    bar (dots), and each modality's presence on the left."""
    patterns = patterns.sort_values(ascending=False)
    sets = [set(p.split("+")) if p else set() for p in patterns.index]
    fig = _figure(max(5.0, 0.55 * len(patterns) + 3), 4.2)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1.2), width_ratios=(1, 4))
    bars = fig.add_subplot(grid[0, 1])
    dots = fig.add_subplot(grid[1, 1], sharex=bars)
    side = fig.add_subplot(grid[1, 0])
    x = np.arange(len(patterns))
    bars.bar(x, patterns.to_numpy(), color="#444444")
    for xi, n in zip(x, patterns.to_numpy(), strict=True):
        bars.text(float(xi), n, str(int(n)), ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("patients")
    bars.set_title("missing patterns: modalities present")
    bars.tick_params(labelbottom=False)
    for m, name in enumerate(modalities):
        has = np.array([name in s for s in sets])
        dots.scatter(
            x, np.full(len(x), m), s=60, color=np.where(has, "#222222", "#dddddd"), zorder=2
        )
        if has.any():
            dots.plot(x[has], np.full(has.sum(), m), color="#222222", lw=0, zorder=1)
    for xi, s in zip(x, sets, strict=True):
        present = [m for m, name in enumerate(modalities) if name in s]
        if len(present) > 1:
            dots.plot([xi, xi], [min(present), max(present)], color="#222222", lw=2, zorder=1)
    dots.set_yticks(range(len(modalities)), list(modalities))
    dots.set_xticks([])
    dots.set_ylim(-0.5, len(modalities) - 0.5)
    for spine in ("top", "right", "bottom"):
        dots.spines[spine].set_visible(False)
    presence = [
        sum(n for s, n in zip(sets, patterns.to_numpy(), strict=True) if name in s)
        for name in modalities
    ]
    side.barh(range(len(modalities)), presence, color=[_color(m) for m in range(len(modalities))])
    side.set_ylim(-0.5, len(modalities) - 0.5)
    side.set_yticks([])
    side.invert_xaxis()
    side.set_xlabel("patients with it")
    fig.add_subplot(grid[0, 0]).axis("off")
    return fig


def _curves(ax: Axes, curves: dict[int, Curve], class_names: Sequence[str], label: str) -> None:
    for c, curve in curves.items():
        color = _color(c)
        ax.plot(
            curve.x,
            curve.y,
            color=color,
            lw=1.8,
            label=f"class {class_names[c]} (n={curve.positives})",
        )
        if np.isfinite(curve.low).all():
            ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.18, lw=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="lower right" if label == "ROC" else "lower left")
    ax.set_title(f"{label}, one class vs rest (95% bootstrap bands)", fontsize=10)


@dataclass(frozen=True)
class OperatingMark:
    """The operating point of the positive class, to mark on its ROC curve."""

    cls: int  # the positive class's index
    fpr: float  # 1 - specificity
    tpr: float  # sensitivity
    threshold: float


def discrimination(
    roc: dict[int, Curve],
    pr: dict[int, Curve],
    class_names: Sequence[str],
    operating: OperatingMark | None = None,
) -> Figure:
    fig = _figure(9.0, 4.0)
    left, right = fig.subplots(1, 2)
    _curves(left, roc, class_names, "ROC")
    if operating is not None and np.isfinite([operating.fpr, operating.tpr]).all():
        left.plot(
            [operating.fpr],
            [operating.tpr],
            ls="none",
            marker="D",
            ms=8,
            mfc=_color(operating.cls),
            mec="black",
            mew=1.2,
            zorder=5,
            gid="operating-point",
            label=f"operating point, class {class_names[operating.cls]} "
            f"(p >= {operating.threshold:.2f})",
        )
        left.legend(fontsize=8, frameon=False, loc="lower right")
    left.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    left.set_xlabel("false positive rate")
    left.set_ylabel("true positive rate")
    _curves(right, pr, class_names, "precision-recall")
    right.set_xlabel("recall")
    right.set_ylabel("precision")
    return fig


def confusion(cm: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts, shaded by the share of each true class."""
    fig = _figure(1.2 * len(class_names) + 2.2, 1.0 * len(class_names) + 1.6)
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if share[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(class_names)), list(class_names))
    ax.set_yticks(range(len(class_names)), list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class")
    return fig


def calibration(
    rel: Reliability,
    confidence: np.ndarray,
    before: Reliability | None = None,
    label: str = "model",
) -> Figure:
    """Reliability diagram (quantile bins, patients per bin written on each point) above the
    distribution of the top-label probability; ``before``: the same before calibration, drawn
    underneath in grey."""
    fig = _figure(5.2, 5.4)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1.2), sharex=True)
    top.plot([0, 1], [0, 1], color="#999999", ls="--", lw=0.8, label="perfect calibration")
    if before is not None:
        top.plot(
            before.confidence,
            before.accuracy,
            marker="o",
            mfc="white",
            color="#888888",
            ls=":",
            lw=1.4,
            label="before calibration",
            gid="before-calibration",
        )
    top.plot(rel.confidence, rel.accuracy, marker="o", color=_color(0), label=label)
    for x, y, n in zip(rel.confidence, rel.accuracy, rel.count, strict=True):
        top.annotate(
            str(int(n)), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7
        )
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.05)
    top.legend(fontsize=8, frameon=False, loc="upper left")
    top.set_title("reliability of the predicted class (quantile bins, n per bin)", fontsize=10)
    bottom.hist(confidence, bins=20, range=(0, 1), color="#777777")
    bottom.set_xlabel("probability of the predicted class")
    bottom.set_ylabel("patients")
    return fig


def training(curves: dict[str, pd.DataFrame]) -> Figure:
    """Loss terms and validation metrics per epoch (one run; or the mean over folds with the
    range shaded), and the lazy combination TLA picked after each epoch."""
    fig = _figure(11.0, 3.6)
    losses, vals, lazy = fig.subplots(1, 3)
    frames = list(curves.values())
    several = len(frames) > 1

    def draw(ax: Axes, column: str, k: int) -> None:
        series = [f.set_index("epoch")[column] for f in frames if column in f]
        if not series:
            return
        table = pd.concat(series, axis=1).apply(pd.to_numeric, errors="coerce")
        if table.isna().all().all():
            return
        epochs = table.index.to_numpy()
        mean = table.mean(axis=1).to_numpy()
        ax.plot(
            epochs,
            mean,
            color=_color(k),
            lw=1.6,
            label=column.replace("loss_", "").replace("val_", "val "),
        )
        if several:
            ax.fill_between(
                epochs, table.min(axis=1), table.max(axis=1), color=_color(k), alpha=0.15, lw=0
            )

    for k, column in enumerate(LOSS_TERMS):
        draw(losses, column, k)
    losses.set_yscale("symlog", linthresh=1.0)
    losses.set_title(
        "training loss terms" + (" (mean, range over folds)" if several else ""), fontsize=10
    )
    for k, column in enumerate(VAL_METRICS):
        draw(vals, column, k)
    vals.set_title("validation (inner split)" if several else "validation", fontsize=10)
    for ax in (losses, vals, lazy):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (losses, vals):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    picks = pd.concat([f[["epoch", "lazy_combo"]] for f in frames if "lazy_combo" in f])
    picks = picks[picks["lazy_combo"].astype(str) != ""]
    if len(picks):
        combos = sorted(picks["lazy_combo"].astype(str).unique(), key=lambda c: (len(c), c))
        counts = picks.groupby(["epoch", "lazy_combo"]).size().reset_index(name="n")
        lazy.scatter(
            counts["epoch"],
            [combos.index(c) for c in counts["lazy_combo"]],
            s=30 + 40 * counts["n"],
            color=_color(3),
            alpha=0.8,
        )
        lazy.set_yticks(range(len(combos)), combos, fontsize=8)
    else:
        lazy.text(
            0.5,
            0.5,
            "none picked\n(TLA off, or too few patients\nwith each combination)",
            ha="center",
            va="center",
            transform=lazy.transAxes,
            fontsize=9,
        )
    lazy.set_xlabel("epoch")
    lazy.set_title("lazy combination picked" + (" (size = folds)" if several else ""), fontsize=10)
    return fig


def dwfuse_weights(
    predictions: pd.DataFrame, modalities: Sequence[str], class_names: Sequence[str]
) -> Figure | None:
    """Each modality's DWFuse weight at the predicted class, by true class (box plots)."""
    columns = [m for m in modalities if f"weight_{m}" in predictions]
    if not columns:
        return None
    fig = _figure(max(5.0, 1.6 * len(columns) + 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(class_names)
    for c, name in enumerate(class_names):
        rows = predictions[predictions["label"].astype(str) == str(c)]
        data = [rows[f"weight_{m}"].to_numpy(dtype=float) for m in columns]
        positions = np.arange(len(columns)) - 0.4 + width * (c + 0.5)
        keep = [k for k, d in enumerate(data) if len(d)]
        if not keep:
            continue
        parts = ax.boxplot(
            [data[k] for k in keep],
            positions=positions[keep],
            widths=width * 0.9,
            patch_artist=True,
            showfliers=False,
        )
        for box in parts["boxes"]:
            box.set_facecolor(_color(c))
            box.set_alpha(0.6)
        ax.plot([], [], color=_color(c), lw=6, alpha=0.6, label=f"true class {name}")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("DWFuse weight at the predicted class")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("modality weights by true class", fontsize=10)
    return fig


def pattern_metrics(patterns: pd.DataFrame) -> Figure:
    """Macro-F1 and AUROC of every missing pattern, with its patient count."""
    frame = patterns.iloc[::-1]
    fig = _figure(7.0, 0.42 * len(frame) + 1.4)
    ax = fig.subplots()
    y = np.arange(len(frame))
    for k, (column, label) in enumerate((("macro_f1", "macro-F1"), ("auroc", "AUROC"))):
        values = pd.to_numeric(frame[column], errors="coerce").fillna(0).to_numpy()
        ax.barh(y + (k - 0.5) * 0.38, values, height=0.36, color=_color(k), label=label)
    ax.set_yticks(
        y,
        [f"{p} (n={int(n)})" for p, n in zip(frame["present"], frame["n"], strict=True)],
        fontsize=8,
    )
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_title("metrics by missing pattern (n/a drawn as 0)", fontsize=10)
    return fig


def forest(differences: pd.DataFrame) -> Figure:
    """Paired differences (variant - base) with 95% bootstrap intervals, one row per variant and
    metric; a dashed line at no difference."""
    frame = differences.reset_index(drop=True)
    fig = _figure(7.5, 0.3 * len(frame) + 1.5)
    ax = fig.subplots()
    y = np.arange(len(frame))[::-1]
    variants = list(dict.fromkeys(frame["variant"]))
    for row, yi in zip(frame.itertuples(), y, strict=True):
        color = _color(variants.index(row.variant))
        ax.plot([row.ci_low, row.ci_high], [yi, yi], color=color, lw=1.6)
        ax.plot(row.difference, yi, "o", color=color)
    labels = [
        f"{v}: {METRIC_NAMES.get(m, m)}" + (" (lower better)" if m in LOWER_IS_BETTER else "")
        for v, m in zip(frame["variant"], frame["metric"], strict=True)
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="#999999", ls="--", lw=0.8)
    ax.set_xlabel("difference from the base model (variant - base), 95% paired bootstrap CI")
    ax.set_title("variants compared on the same folds", fontsize=10)
    return fig


def decision_curves(frame: pd.DataFrame, thresholds: dict[str, float] | None = None) -> Figure:
    """Net benefit against the threshold probability: the model, treat all and treat none, one
    panel per class (its own prevalence); a dotted line at a class's operating threshold. The
    y-axis runs from -0.05 to a little above the largest prevalence (treat all plunges below
    zero as the threshold rises)."""
    classes = list(dict.fromkeys(frame["class"].astype(str)))
    cols = min(len(classes), 3)
    rows = -(-len(classes) // cols)
    fig = _figure(max(4.6, 3.6 * cols + 0.6), 3.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    prevalence = {}
    for name in classes:
        part = frame[frame["class"].astype(str) == name]
        odds = part["threshold"] / (1 - part["threshold"])
        prevalence[name] = float(((part["treat_all"] + odds) / (1 + odds)).iloc[0])
    top = max(prevalence.values()) * 1.1 + 0.02
    for k, (ax, name) in enumerate(zip(axes, classes, strict=False)):
        part = frame[frame["class"].astype(str) == name].sort_values("threshold")
        x = part["threshold"].to_numpy(dtype=float)
        ax.plot(x, part["net_benefit"], color=_color(k), lw=1.8, label="model", zorder=3)
        ax.plot(x, part["treat_all"], color="#777777", lw=1.0, label="treat all")
        ax.plot(x, part["treat_none"], color="#222222", lw=1.0, ls="--", label="treat none")
        if thresholds and name in thresholds and np.isfinite(thresholds[name]):
            ax.axvline(
                thresholds[name],
                color=_color(k),
                ls=":",
                lw=1.2,
                label=f"operating threshold {thresholds[name]:.2f}",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.05, top)
        ax.set_xlabel("threshold probability")
        ax.set_title(f"class {name} vs rest (prevalence {prevalence[name]:.2f})", fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    for ax in axes[: len(classes)][::cols]:
        ax.set_ylabel("net benefit")
    for ax in axes[len(classes) :]:
        ax.axis("off")
    return fig


def subgroup_metrics(
    frame: pd.DataFrame,
    metrics: Sequence[str] = ("auroc", "macro_f1"),
    overall: dict[str, float] | None = None,
) -> Figure | None:
    """Each subgroup's metrics with their 95% intervals (one panel per metric); subgroups under
    30 patients drawn hollow; a dashed line at the value over all patients (``overall``)."""
    metrics = [m for m in metrics if m in frame and np.isfinite(frame[m].astype(float)).any()]
    if not metrics or not len(frame):
        return None
    rows = frame.reset_index(drop=True)
    fig = _figure(3.4 * len(metrics) + 2.4, 0.32 * len(rows) + 1.4)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True, squeeze=False)).ravel()
    y = np.arange(len(rows))[::-1]
    columns = list(dict.fromkeys(rows["column"].astype(str)))
    for ax, m in zip(axes, metrics, strict=True):
        for yi, row in zip(y, rows.itertuples(), strict=True):
            color = _color(columns.index(str(row.column)))
            value = float(getattr(row, m))
            low, high = (
                float(getattr(row, f"{m}_ci_low", np.nan)),
                float(getattr(row, f"{m}_ci_high", np.nan)),
            )
            if np.isfinite([low, high]).all():
                ax.plot([low, high], [yi, yi], color=color, lw=1.6)
            if np.isfinite(value):
                small = bool(getattr(row, "small", False))
                ax.plot(value, yi, "o", color=color, mfc="white" if small else color)
        if m in LOWER_IS_BETTER:
            ax.set_xlim(left=0)
        else:
            ax.set_xlim(0, 1.02)
        if overall and np.isfinite(overall.get(m, np.nan)):
            ax.axvline(overall[m], color="#999999", ls="--", lw=0.8)
        ax.set_title(METRIC_NAMES.get(m, m), fontsize=10)
        ax.grid(axis="x", color="#eeeeee")
    labels = [
        f"{c} = {g} (n={int(n)})"
        for c, g, n in zip(rows["column"], rows["group"], rows["n"], strict=True)
    ]
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.suptitle(
        "metrics by subgroup, 95% bootstrap CI (hollow: under 30 patients; dashed: all patients)",
        fontsize=10,
    )
    return fig
