"""Code more than one benchmark script uses, imported by name (``import common``) like the
scripts import ``stats`` and ``study``: running ``python benchmarks/x.py`` puts this folder on
sys.path, and tests/conftest.load_benchmark does the same.

Only the standard library is imported at the top: clinical.py and selection.py import this
module before numpy, to limit the BLAS threads numpy reads once when it loads. numpy, pandas,
scikit-learn and omnifuse_cli are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from omnifuse_cli.data.cohort import Cohort

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def one_thread_per_process() -> None:
    """One BLAS/OpenMP thread in this process and in the omnifuse processes it starts (they
    inherit the environment), unless the environment already sets a count. Call it before
    numpy or torch is imported: they read these variables once, when they load."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")


def markdown(frame: pd.DataFrame) -> str:
    """A markdown table of ``frame``'s columns and values as str() prints them."""
    cols = list(frame.columns)
    lines = [
        "| " + " | ".join(str(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += [
        "| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def dev_test_pools(cohort: Cohort, dev_n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The cohort's patients split once, stratified by label, into a development pool of
    ``dev_n`` (each seed's training and validation patients are drawn from it) and a fixed
    test pool; both sorted."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    assert cohort.labels is not None
    idx = np.arange(len(cohort))
    dev, test = train_test_split(idx, train_size=dev_n, stratify=cohort.labels, random_state=seed)
    return np.sort(dev), np.sort(test)


def auroc_f1_loss(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
    """The three scores a run row records: AUROC, macro F1 and log loss."""
    from omnifuse_cli.engine.metrics import classification_metrics

    m = classification_metrics(y, probs, num_classes)
    return {"auroc": m["auroc"], "macro_f1": m["macro_f1"], "loss": m["loss"]}
