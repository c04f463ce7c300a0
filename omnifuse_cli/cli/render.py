"""Pure functions that turn engine results into rich renderables (tested by rendering to text)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

from omnifuse_cli.config import METRIC_KEYS

if TYPE_CHECKING:  # the engine (and torch) load only when a command runs, never for --help
    from omnifuse_cli.engine.audit import AuditReport
    from omnifuse_cli.engine.cv.summary import FoldResult
    from omnifuse_cli.engine.fitting import EpochRecord

METRIC_LABELS = {
    "acc": "accuracy",
    "macro_f1": "macro-F1",
    "balanced_acc": "balanced accuracy",
    "auroc": "AUROC (OvR macro)",
    "loss": "log loss",
    "auprc": "AUPRC (OvR macro)",
    "ece": "calibration error (ECE)",
    "brier": "Brier score",
}


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def titled(title: str, **kwargs: Any) -> Table:
    """A left-titled table at least as wide as its title: rich wraps a title to the table's
    width, which broke short tables' titles mid-phrase ("test metrics (best" / "checkpoint)")."""
    return Table(title=title, title_justify="left", min_width=cell_len(title), **kwargs)


def epoch_table(title: str = "training") -> Table:
    """One row per epoch: each loss term of Eq. 18, validation metrics and the lazy combination.

    ``*`` marks a new best epoch, ``ft`` an epoch that fine-tuned backbones."""
    table = titled(title, box=None, padding=(0, 1, 0, 0), header_style="bold underline")
    for name in (
        "epoch",
        "loss",
        "fwd",
        "bwd",
        "dwfuse",
        "tla",
        "val_loss",
        "val_acc",
        "val_F1",
        "lazy",
        "s",
    ):
        table.add_column(name, justify="left" if name == "lazy" else "right", no_wrap=True)
    return table


def add_epoch_row(table: Table, record: EpochRecord) -> None:
    losses = record.losses
    mark = ("*" if record.is_best else "") + (" ft" if record.phase == "finetune" else "")
    table.add_row(
        f"{record.epoch}{mark}",
        fmt(record.train_loss, 2),
        fmt(losses["forward"]),
        fmt(losses["backward"]),
        fmt(losses["dwfuse"]),
        fmt(losses["tla"]),
        fmt(record.val_loss),
        fmt(record.val_acc),
        fmt(record.val_macro_f1),
        record.lazy_combo or "-",
        f"{record.seconds:.1f}",
    )


def metrics_table(
    metrics: Mapping[str, float],
    title: str,
    intervals: Mapping[str, tuple[float, float]] | None = None,
    first: str | None = None,
) -> Table:
    """``first``: the run's --eval-metric, listed first."""
    table = titled(title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if intervals:
        table.add_column("95% CI (bootstrap)", justify="right")
    lead = METRIC_KEYS.get(first or "", first)
    order = sorted(metrics, key=lambda k: k != lead)  # stable: the rest keep their order
    for key, value in ((k, metrics[k]) for k in order):
        cells = [METRIC_LABELS.get(key, key), fmt(value)]
        if intervals:
            low, high = intervals.get(key, (None, None))
            cells.append(f"{fmt(low)} - {fmt(high)}" if low is not None else "")
        table.add_row(*cells)
    return table


def patterns_table(frame: pd.DataFrame) -> Table:
    table = titled("by missing pattern (modalities present)")
    for col in ("present", "n", "acc", "macro_f1", "auroc"):
        table.add_column(col, justify="left" if col == "present" else "right")
    for _, row in frame.iterrows():
        table.add_row(
            str(row["present"]),
            str(int(row["n"])),
            fmt(row["acc"]),
            fmt(row["macro_f1"]),
            fmt(row["auroc"]),
        )
    return table


def confusion_table(cm: np.ndarray, class_names: Sequence[str], title: str) -> Table:
    table = titled(title)
    table.add_column("true \\ pred")
    for name in class_names:
        table.add_column(str(name), justify="right")
    for name, row in zip(class_names, cm, strict=True):
        table.add_row(str(name), *(str(int(v)) for v in row))
    return table


def counts_table(
    counts: Mapping[str, object], title: str, key: str = "", value: str = "n"
) -> Table:
    table = titled(title)
    table.add_column(key)
    table.add_column(value, justify="right")
    for k, v in counts.items():
        table.add_row(str(k), str(v))
    return table


def _cell(value: object) -> str:
    """A predictions cell: floats to 3 digits, and nothing where predict could not score."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt(value) if isinstance(value, float) else str(value)


def predictions_table(
    frame: pd.DataFrame, class_names: Sequence[str], modality_names: Sequence[str], limit: int = 20
) -> Table:
    reasons = frame["reason"] if "reason" in frame else pd.Series([], dtype=str)
    unscored = int((reasons.fillna("") != "").sum())
    title = (
        f"predictions ({len(frame)} patients"
        + (f", {unscored} not scored" if unscored else "")
        + (f", first {limit} shown)" if len(frame) > limit else ")")
    )
    table = titled(
        title,
        box=None,
        padding=(0, 1, 0, 0),
        header_style="bold underline",
        caption="pN = probability of class N; w_M = DWFuse weight of modality M at "
        "the predicted class",
        caption_justify="left",
    )
    columns = [
        "id",
        *(["label"] if "label" in frame else []),
        "pred",
        *(f"prob_{c}" for c in class_names),
        "modalities",
        *(f"weight_{m}" for m in modality_names if f"weight_{m}" in frame),
        *(["reason"] if unscored else []),
    ]
    for col in columns:
        header = col.replace("prob_", "p").replace("weight_", "w_")
        left = col in ("id", "modalities", "reason")
        table.add_column(
            header, justify="left" if left else "right", no_wrap=col != "reason", overflow="fold"
        )
    for _, row in frame.head(limit).iterrows():
        table.add_row(*(escape(_cell(row[col])) for col in columns))
    return table


def audit_tables(report: AuditReport) -> list[Table]:
    """The data audit of `omnifuse check`."""
    n = report.n_patients
    tables = []
    if report.label_counts:
        counts = dict(report.label_counts)
        if report.n_unlabeled:
            counts["(empty: unlabeled)"] = report.n_unlabeled
        tables.append(counts_table(counts, f"{n} patients by label", key="label"))
    presence = titled("modalities")
    for col in ("modality", "patients", "share", "detail"):
        presence.add_column(col, justify="left" if col in ("modality", "detail") else "right")
    for name, count in report.presence.items():
        detail = ""
        if name in report.images_per_patient:
            s = report.images_per_patient[name]
            detail = (
                f"{int(s['total'])} images, {int(s['min'])}-{int(s['max'])} per patient "
                f"(mean {s['mean']:.1f})"
            )
        elif name in report.vector_sizes:
            detail = f"{report.vector_sizes[name]} values"
        presence.add_row(name, str(count), f"{count / n:.0%}", detail)
    tables.append(presence)
    tables.append(
        counts_table(
            report.patterns,
            "missing patterns (modalities present)",
            key="present",
            value="patients",
        )
    )
    for name, kinds in report.image_files.items():
        if kinds:
            files = titled(f"{name} files")
            for col in ("format", "photometric", "frames", "size", "files"):
                files.add_column(col, justify="right" if col in ("frames", "files") else "left")
            for kind in kinds:
                files.add_row(
                    *(
                        escape(str(kind.get(c, "-")))
                        for c in ("format", "photometric", "frames", "size", "files")
                    )
                )
            tables.append(files)
    for name, stats in report.note_stats.items():
        if stats.encodings or stats.empty:
            notes = titled(f"{name} notes")
            notes.add_column("read as")
            notes.add_column("notes", justify="right")
            for encoding, count in stats.encodings.most_common():
                notes.add_row(f"{encoding} file", str(count))
            if stats.empty:
                notes.add_row("empty (missing text)", str(stats.empty))
            tables.append(notes)
    if report.split_summary is not None:
        tables.append(split_summary_table(report.split_summary))
    return tables


def split_summary_table(
    frame: pd.DataFrame, title: str = "patients per split, by class and missing pattern"
) -> Table:
    """engine.audit.split_summary as a table; a class or pattern missing from a split shows a
    yellow 0 (it cannot be learnt, tuned or tested there)."""
    splits = [c for c in frame.columns if c not in ("kind", "value", "total")]
    table = titled(title)
    table.add_column("")
    for name in [*splits, "all"]:
        table.add_column(name, justify="right")
    for kind in ("class", "pattern"):
        part = frame[frame["kind"] == kind]
        for _, row in part.iterrows():
            label = f"class {row['value']}" if kind == "class" else str(row["value"])
            cells = [str(row[n]) if row[n] else "[yellow]0[/]" for n in splits]
            table.add_row(
                escape(label),
                *cells,
                str(row["total"]),
                end_section=kind == "class" and row.name == part.index[-1],
            )
    return table


def fold_table(title: str) -> Table:
    """One row per completed fold fit of `omnifuse cv` (``r`` marks one read from an earlier,
    interrupted invocation)."""
    table = titled(title, box=None, padding=(0, 1, 0, 0), header_style="bold underline")
    for name in ("variant", "rep", "fold", "train/val/test", "best", "macro-F1", "AUROC", "s"):
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
    return table


def add_fold_row(table: Table, fold: FoldResult) -> None:
    table.add_row(
        fold.variant,
        str(fold.repeat),
        f"{fold.fold}{' r' if fold.resumed else ''}",
        f"{fold.n_train}/{fold.n_val}/{fold.n_test}",
        str(fold.best_epoch),
        fmt(fold.metrics["macro_f1"]),
        fmt(fold.metrics["auroc"]),
        f"{fold.seconds:.1f}",
    )


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"{fmt(low)} - {fmt(high)}"


def _mean_sd(mean: float, sd: float) -> str:
    return f"{fmt(mean)} ± {fmt(sd)}"


def cv_metrics_table(frame: pd.DataFrame, title: str) -> Table:
    """Pooled out-of-fold metrics of one variant: value, 95% CI and per-fold mean ± SD."""
    table = titled(title)
    table.add_column("metric")
    table.add_column("pooled", justify="right")
    table.add_column("95% CI (bootstrap)", justify="right")
    table.add_column("folds: mean ± SD", justify="right")
    for _, row in frame.iterrows():
        table.add_row(
            METRIC_LABELS.get(row["metric"], row["metric"]),
            fmt(row["value"]),
            _interval(row["ci_low"], row["ci_high"]),
            _mean_sd(row["fold_mean"], row["fold_sd"]),
        )
    return table


def differences_table(frame: pd.DataFrame, title: str) -> Table:
    """Paired differences of each variant from the base model, pooled and per fold."""
    table = titled(title)
    for name in (
        "variant",
        "metric",
        "difference",
        "95% CI (paired bootstrap)",
        "folds: mean ± SD",
    ):
        table.add_column(name, justify="left" if name in ("variant", "metric") else "right")
    for _, row in frame.iterrows():
        table.add_row(
            row["variant"],
            METRIC_LABELS.get(row["metric"], row["metric"]),
            f"{row['difference']:+.3f}",
            _interval(row["ci_low"], row["ci_high"]),
            _mean_sd(row["fold_mean"], row["fold_sd"]),
        )
    return table


def calibration_table(frame: pd.DataFrame, temperature: str) -> Table:
    table = titled(f"calibration ({temperature})")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for _, row in frame.iterrows():
        table.add_row(
            METRIC_LABELS.get(row["metric"], str(row["metric"])),
            fmt(row["before"]),
            fmt(row["after"]),
        )
    return table


def operating_point_table(frame: pd.DataFrame) -> Table:
    first = frame.iloc[0]
    table = titled(
        f"operating point: class {first['positive_class']} positive ({first['rule']} on validation)"
    )
    for col in ("metric", "value", "95% CI (bootstrap)"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for _, row in frame.iterrows():
        if row["metric"] in ("tp", "fp", "tn", "fn"):
            continue
        table.add_row(
            str(row["metric"]),
            fmt(row["value"], 4 if row["metric"] == "threshold" else 3),
            _interval(row["ci_low"], row["ci_high"]),
        )
    return table


def coverage_summary_table(frame: pd.DataFrame) -> Table:
    first = frame.iloc[0]
    table = titled(
        f"conformal sets at alpha {first['alpha']:g} ({first['mode']}; target "
        f"coverage {1 - first['alpha']:.0%})"
    )
    for col in ("by", "group", "n", "coverage", "mean set size"):
        table.add_column(col, justify="left" if col in ("by", "group") else "right")
    for _, row in frame.iterrows():
        table.add_row(
            str(row["by"]),
            str(row["group"]),
            str(int(row["n"])),
            fmt(row["coverage"]),
            fmt(row["mean_set_size"], 2),
        )
    return table


def subgroup_gaps_table(frame: pd.DataFrame) -> Table:
    table = titled("largest gap between subgroups")
    for col in ("column", "metric", "gap", "best", "worst"):
        table.add_column(col, justify="right" if col == "gap" else "left")
    for _, row in frame.iterrows():
        table.add_row(
            str(row["column"]),
            METRIC_LABELS.get(row["metric"], str(row["metric"])),
            fmt(row["gap"]),
            str(row["best_group"]),
            str(row["worst_group"]),
        )
    return table


def trial_table(title: str) -> Table:
    """One row per finished tune trial: number, state, objective value, seconds, parameters."""
    table = titled(title, box=None, padding=(0, 1, 0, 0), header_style="bold underline")
    table.add_column("trial", justify="right")
    table.add_column("state")
    table.add_column("value", justify="right")
    table.add_column("s", justify="right")
    table.add_column("parameters", overflow="fold")
    return table
