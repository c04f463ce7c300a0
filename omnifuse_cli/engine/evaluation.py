"""`omnifuse evaluate`: a trained run on its own test split or on an external cohort."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.files import write_csv
from omnifuse_cli.engine.inference import infer, resolve_device
from omnifuse_cli.engine.metrics import classification_metrics, confusion
from omnifuse_cli.engine.runs import read_meta, read_split_assignment
from omnifuse_cli.errors import BundleError, DataError


@dataclass(frozen=True)
class EvalRequest:
    run_dir: Path
    manifest: Path | None = None  # external cohort; None = the run's own test split
    labs_table: Path | None = None
    labs_id_col: str | None = None
    out_dir: Path | None = None  # default RUN_DIR/eval/<test|manifest stem>
    device: str = "auto"
    batch_size: int = 32


@dataclass
class EvalResult:
    source: str
    n: int
    metrics: dict[str, float]
    confusion: np.ndarray
    class_names: list[str]
    out_dir: Path


def evaluate_run(request: EvalRequest) -> EvalResult:
    run_dir = Path(request.run_dir)
    device = resolve_device(request.device)
    bundle = load_bundle(run_dir, device)
    meta = read_meta(run_dir) if (run_dir / "meta.csv").is_file() else bundle.meta["run"]
    num_classes = bundle.model.config.num_classes
    external = request.manifest is not None
    manifest = Path(request.manifest) if external else Path(meta.get("manifest", ""))
    if not manifest.is_file():
        raise BundleError(
            f"the run's manifest {manifest} is not on this machine",
            hint="pass --manifest (and --labs-table) to point at the data",
        )
    labs_table = request.labs_table
    if labs_table is None and not external and meta.get("labs_table"):
        labs_table = Path(meta["labs_table"])
    cohort = read_manifest(
        manifest, bundle.model.config.modalities, labs_table=labs_table,
        labs_id_col=request.labs_id_col or meta.get("labs_id_col", "id"),
        num_classes=num_classes,
    )
    bundle.preprocessor.check_compatible(cohort)
    if external:
        rows = np.arange(len(cohort))
        source, tag = str(manifest), manifest.stem
    else:
        assignment = read_split_assignment(run_dir)
        test_ids = set(assignment.loc[assignment["split"] == "test", "id"])
        rows = np.array([i for i, pid in enumerate(cohort.ids) if pid in test_ids])
        if len(rows) != len(test_ids):
            raise DataError(
                f"only {len(rows)} of the run's {len(test_ids)} test patients are in {manifest}",
                hint="evaluate the same manifest the run was trained on, or pass --manifest",
            )
        source, tag = f"test split of {run_dir}", "test"
    assert cohort.labels is not None
    data = bundle.preprocessor.prepare(cohort)
    result = infer(bundle.model, data, rows, device=device, batch_size=request.batch_size)
    probs = np.exp(result.log_probs)
    y = cohort.labels[result.index]
    metrics = classification_metrics(y, probs, num_classes)
    cm = confusion(y, probs.argmax(1), num_classes)
    out_dir = Path(request.out_dir) if request.out_dir else run_dir / "eval" / tag
    write_csv(out_dir / "metrics.csv", pd.DataFrame(
        {"metric": list(metrics), "value": list(metrics.values())}))
    frame = pd.DataFrame(cm, columns=[f"pred_{c}" for c in bundle.class_names])
    frame.insert(0, "true", bundle.class_names)
    write_csv(out_dir / "confusion_matrix.csv", frame)
    return EvalResult(source, len(rows), metrics, cm, bundle.class_names, out_dir)
