"""`omnifuse tune run --nested-cv K`: how well the whole tuning procedure does on patients it
never saw. The pool is split into K stratified outer folds; for each, a complete search runs on
the other K-1 folds (its own study, ``NAME-outerK``, in the same storage), the winner is
trained on them and scored once on the outer fold. The mean outer score estimates what tuning
then training delivers; the best trials' own scores, chosen as the best of many, are optimistic,
and nested.json keeps both so the report can say which number is which."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import StratifiedKFold

from omnifuse_cli import api
from omnifuse_cli.data.tables import read_table
from omnifuse_cli.engine.events import EventFn, ProgressEvent
from omnifuse_cli.engine.files import write_csv, write_text_atomic
from omnifuse_cli.tuning.outputs import TuneResult
from omnifuse_cli.tuning.request import (
    METRIC_SOURCES,
    NESTED_CSV,
    NESTED_DIR,
    NESTED_JSON,
    Pool,
    TuneRequest,
)
from omnifuse_cli.tuning.run import run_tune

OUTER_RESULT = "outer.json"


def run_nested(request: TuneRequest, pool: Pool, result: TuneResult, emit: EventFn) -> None:
    frame = read_table(pool.manifest, "manifest", request.configs().data.encoding)
    labels = pd.to_numeric(
        frame.get("label", pd.Series(index=frame.index, dtype=str)), errors="coerce"
    )
    labelled = np.flatnonzero(labels.notna().to_numpy())
    unlabeled = np.flatnonzero(labels.isna().to_numpy())
    outer = StratifiedKFold(request.nested_cv, shuffle=True, random_state=request.seed)
    table_name = METRIC_SOURCES[request.metric][1]
    rows: list[dict[str, Any]] = []
    y = labels.to_numpy()[labelled].astype(int)
    for k, (tr, te) in enumerate(outer.split(labelled, y), start=1):
        folder = request.out_dir / NESTED_DIR / f"outer-{k}"
        done = folder / OUTER_RESULT
        if done.is_file():  # finished before an interruption
            rows.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        emit(ProgressEvent("message", text=f"nested cv: outer fold {k}/{request.nested_cv}"))
        folder.mkdir(parents=True, exist_ok=True)
        train_rows = np.sort(np.concatenate([labelled[tr], unlabeled]))
        write_csv(folder / "train.csv", frame.iloc[train_rows])
        write_csv(folder / "test.csv", frame.iloc[labelled[te]])
        inner_settings = {
            **request.settings,
            "train_ratio": pool.train_ratio,
            "val_ratio": pool.val_ratio,
            "test_ratio": 0.0,
        }
        inner = run_tune(
            replace(
                request,
                manifest=folder / "train.csv",
                out_dir=folder / "tune",
                settings=inner_settings,
                study_name=f"{request.name}-outer{k}",
                storage=request.storage_url,
                refit=False,
                nested_cv=0,
                overwrite=False,
            ),
            emit,
        )
        if inner.best_number is None:
            rows.append({"outer_fold": k, "n_train": len(train_rows), "n_test": len(te)})
            continue
        run = api.train(
            folder / "train.csv",
            num_classes=request.num_classes,
            out_dir=folder / "model",
            overwrite=True,
            **{**inner.best_settings, **inner_settings},
        )
        scored = run.evaluate(folder / "test.csv", bootstrap=0, out_dir=folder / "eval")
        row = {
            "outer_fold": k,
            "n_train": len(train_rows),
            "n_test": len(te),
            "best_trial": inner.best_number,
            "best_inner_value": inner.best_value,
            "outer_auroc": scored.metrics.get("auroc"),
            "outer_macro_f1": scored.metrics.get("macro_f1"),
            "outer_log_loss": scored.metrics.get("loss"),
            "params": json.dumps(
                {k2: v for k2, v in inner.best_settings.items() if k2 in request.space.names},
                default=str,
            ),
        }
        row[f"outer_{request.metric}"] = scored.metrics.get(table_name)
        write_text_atomic(done, json.dumps(row, default=str) + "\n")
        rows.append(row)
    nested = pd.DataFrame(rows)
    write_csv(request.out_dir / NESTED_CSV, nested)
    result.nested = nested
    result.nested_summary = _summary(nested, request)
    write_text_atomic(
        request.out_dir / NESTED_JSON, json.dumps(result.nested_summary, indent=2) + "\n"
    )


def _summary(nested: pd.DataFrame, request: TuneRequest) -> dict[str, Any]:
    column = f"outer_{request.metric}"
    outer = _numbers(nested, column)
    inner = _numbers(nested, "best_inner_value")
    mean = float(outer.mean()) if len(outer) else math.nan
    low = high = math.nan
    if len(outer) > 1:
        half = stats.t.ppf(0.975, len(outer) - 1) * outer.std(ddof=1) / math.sqrt(len(outer))
        low, high = mean - half, mean + half
    return {
        "folds": request.nested_cv,
        "metric": request.metric,
        "outer_mean": mean,
        "outer_ci_low": low,
        "outer_ci_high": high,
        "inner_mean": float(inner.mean()) if len(inner) else math.nan,
        "interval": "t over outer folds, 95%",
    }


def _numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.zeros(0)
    return pd.to_numeric(frame[column], errors="coerce").dropna().to_numpy(float)
