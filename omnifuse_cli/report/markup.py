"""The HTML pieces every report section is made of: numbers and intervals as the page writes
them, escaped text, and tables whose rows carry a data-key (the tests read cells by it)."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # figures.py imports matplotlib; here it is only a type
    from matplotlib.figure import Figure

# page._sections' ``add``: renders a figure (None: none to show) and returns its HTML.
AddFigure = Callable[["Figure | None", str, str, str], str]

METRIC_LABELS = {
    "acc": "accuracy",
    "macro_f1": "macro-F1",
    "balanced_acc": "balanced accuracy",
    "auroc": "AUROC (OvR macro)",
    "auprc": "AUPRC (OvR macro)",
    "loss": "log loss",
    "ece": "calibration error (ECE)",
    "brier": "Brier score",
}


def num(value: object) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)  # type: ignore[arg-type]  # what float() refuses is caught
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "n/a" if not np.isfinite(number) else f"{number:.3f}"


def ci_range(low: object, high: object) -> str:
    return "" if num(low) == "n/a" else f"{num(low)} – {num(high)}"


def esc(text: object) -> str:
    return html.escape(str(text))


def signed(value: float) -> str:
    text = "n/a" if not np.isfinite(value) else f"{value:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def table(
    table_id: str,
    header: list[str],
    rows: list[tuple[str, list[str]]],
    numeric_from: int = 1,
    text: tuple[int, ...] = (),
) -> str:
    """rows: (data-key, cells); cells are already escaped HTML. Cells from ``numeric_from`` on
    are right-aligned numbers, except the columns in ``text``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for key, cells in rows:
        tds = "".join(
            f'<td class="num">{c}</td>' if k >= numeric_from and k not in text else f"<td>{c}</td>"
            for k, c in enumerate(cells)
        )
        body.append(f'<tr data-key="{esc(key)}">{tds}</tr>')
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


def metrics_table(table_id: str, frame: pd.DataFrame, keys: tuple[str, ...], cv: bool) -> str:
    header = ["metric", "value", "95% CI (bootstrap)"] + (["folds: mean ± SD"] if cv else [])
    rows = []
    ordered = frame.set_index("metric").reindex([k for k in keys if k in set(frame["metric"])])
    for _, row in ordered.reset_index().iterrows():
        cells = [
            esc(METRIC_LABELS.get(row["metric"], row["metric"])),
            num(row["value"]),
            ci_range(row.get("ci_low"), row.get("ci_high")),
        ]
        if cv:
            cells.append(f"{num(row['fold_mean'])} ± {num(row['fold_sd'])}")
        rows.append((str(row["metric"]), cells))
    return table(table_id, header, rows)
