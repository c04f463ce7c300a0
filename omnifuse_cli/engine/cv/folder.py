"""The cv folder's files other than the pooled tables: starting it (or checking, on --resume,
that its folds.csv still holds), each fold's split and record, and meta.csv."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from omnifuse_cli.config import to_primitive
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.engine.bundle import versions
from omnifuse_cli.engine.cv.folds import val_share
from omnifuse_cli.engine.cv.request import FOLD_DONE, CVRequest, save_cv_request
from omnifuse_cli.engine.cv.summary import FoldResult
from omnifuse_cli.engine.files import prepare_out_dir, write_csv
from omnifuse_cli.engine.run_record import split_assignment
from omnifuse_cli.engine.runs import SPLIT_ASSIGNMENT
from omnifuse_cli.errors import BundleError


def prepare_cv_dir(request: CVRequest, resume: bool, folds_frame: pd.DataFrame) -> None:
    """A new cv folder with its cv.json; on --resume, a check that the manifest still gives the
    saved folds (a changed manifest would mix two cohorts' folds)."""
    out_dir = Path(request.out_dir)
    if resume:
        saved = out_dir / "folds.csv"
        if saved.is_file():
            before = pd.read_csv(saved, dtype=str, keep_default_na=False)
            now = pd.read_csv(_as_csv(folds_frame), dtype=str, keep_default_na=False)
            if not before.equals(now):
                raise BundleError(
                    f"the folds of {request.manifest} are no longer those of "
                    f"{out_dir} (the manifest changed since)",
                    hint="start a new cross-validation with another --out-dir",
                )
    else:
        prepare_out_dir(out_dir, request.overwrite)
        save_cv_request(request)
    write_csv(out_dir / "folds.csv", folds_frame)


def _as_csv(frame: pd.DataFrame) -> io.StringIO:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    buffer.seek(0)
    return buffer


def write_split(out: Path, cohort: Cohort, parts: dict[str, np.ndarray]) -> None:
    """Which patients a model learned from (train), picked its epoch with (val) and was scored
    on (test): the audit trail that the test fold chose nothing."""
    write_csv(out / SPLIT_ASSIGNMENT, split_assignment(cohort, parts))


def read_fold(out: Path) -> FoldResult:
    raw = json.loads((out / FOLD_DONE).read_text(encoding="utf-8"))
    return FoldResult(**{**raw, "resumed": True})


def run_meta(
    request: CVRequest, cohort: Cohort, device: torch.device, weights: str, warnings: str = ""
) -> dict[str, Any]:
    """meta.csv's settings (the base model's): of the cv folder and of the --refit run."""
    base = request.base
    data = base.data
    return {
        "manifest": str(Path(request.manifest).resolve()),
        "labs_table": str(Path(data.labs_table).resolve()) if data.labs_table else "",
        "labs_id_col": data.labs_id_col,
        "labs_format": data.labs_format,
        "labs_agg": data.labs_agg,
        "encoding": data.encoding,
        "num_classes": request.num_classes,
        "modalities": ",".join(f"{m.name}={m.kind}" for m in data.modalities),
        "n_patients": len(cohort),
        "n_unlabeled": int((cohort.labels < 0).sum()) if cohort.labels is not None else 0,
        "validation": f"{request.folds}-fold stratified cross-validation"
        + (f" grouped by {request.group_col}" if request.group_col else "")
        + (f", {request.repeats} repeats" if request.repeats > 1 else "")
        + f"; inner validation share {val_share(base.train):.3f} of each training fold",
        "folds": request.folds,
        "repeats": request.repeats,
        "group_col": request.group_col or "",
        "variants": "; ".join(f"{v.name}: {v.flags}" for v in request.variants),
        "bootstrap": request.bootstrap,
        "device": str(device),
        "image_weights": weights,
        "warnings": warnings,
        **{f"image_{k}": v for k, v in to_primitive(data.image).items()},
        **{f"text_{k}": v for k, v in to_primitive(data.text).items()},
        **to_primitive(base.method),
        **to_primitive(base.train),
        "notes": " | ".join(cohort.notes),
        **{f"version_{k}": v for k, v in versions().items()},
    }
