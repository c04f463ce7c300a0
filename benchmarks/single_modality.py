"""Each modality alone versus OmniFuse on all three, on make-data cohorts (issue 2 evidence).

For every seed: generate `make-data --n N --seed S`, split it stratified 0.8/0.1/0.1, train the
full model on everyone and one single-modality model per modality (on the training patients who
have that modality, selected on the validation patients who have it), all with the default
train settings. Each single-modality model is compared with the full model on the same test
patients: those who have that modality. Prints per-seed rows and the mean over seeds.

    python benchmarks/single_modality.py --n 240 --seeds 42 1 2 3 4
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from omnifuse_cli.config import DEFAULT_MODALITIES, DataConfig, TrainConfig
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.splits import stratified_split
from omnifuse_cli.engine.fitting import fit_model
from omnifuse_cli.engine.frozen_features import cache_frozen_features
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import build_for_cohort
from omnifuse_cli.synthetic import CohortSpec, make_cohort


def restrict(cohort: Cohort, keep: list[int]) -> Cohort:
    """The cohort seen through some modalities only (patients keep their order)."""
    sub = dataclasses.replace(cohort)
    sub.modalities = tuple(cohort.modalities[k] for k in keep)
    sub.present = cohort.present[:, keep]
    return sub


def train_and_predict(
    cohort: Cohort, splits: dict[str, np.ndarray], manifest: Path, seed: int
) -> np.ndarray:
    """Predicted class for every patient of splits['test'] (in that order)."""
    cfg = TrainConfig(seed=seed, device="cpu")
    request = TrainRequest(
        manifest, 3, Path("unused"), data=DataConfig(modalities=cohort.modalities), train=cfg
    )
    torch.manual_seed(seed)
    model, pre, _ = build_for_cohort(cohort, splits["train"], request)
    data = pre.prepare(cohort)
    frozen = [n for n, e in model.encoders.items() if hasattr(e, "backbone")]
    for name in frozen:
        model.encoders[name].backbone.requires_grad_(False)
    cache_frozen_features(model, data, frozen, device=torch.device("cpu"), batch_size=32, amp=False)
    _, _, best = fit_model(model, data, splits, cfg, 3, lambda e: None)
    model.load_state_dict(best)
    result = infer(model, data, splits["test"], device=torch.device("cpu"))
    return np.exp(result.log_probs).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omnifuse-single-"))
    names = [m.name for m in DEFAULT_MODALITIES]
    table: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
    full_all: list[float] = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        summary = make_cohort(CohortSpec(n=args.n, seed=seed), work / f"data{seed}")
        cohort = read_manifest(summary.manifest, DEFAULT_MODALITIES)
        assert cohort.labels is not None
        splits = stratified_split(cohort.labels, train=0.8, val=0.1, test=0.1, seed=seed)
        y_test = cohort.labels[splits["test"]]
        fused = train_and_predict(cohort, splits, summary.manifest, seed)
        full_all.append(f1_score(y_test, fused, average="macro"))
        row = [f"seed {seed}: all modalities {full_all[-1]:.3f} on {len(y_test)}"]
        for m, name in enumerate(names):
            has = cohort.present[:, m]
            sub_splits = {k: v[has[v]] for k, v in splits.items()}
            single = train_and_predict(restrict(cohort, [m]), sub_splits, summary.manifest, seed)
            on_test = has[splits["test"]]
            f_single = f1_score(y_test[on_test], single, average="macro")
            f_fused = f1_score(y_test[on_test], fused[on_test], average="macro")
            table[name].append((f_single, f_fused, int(on_test.sum())))
            row.append(
                f"{name} alone {f_single:.3f} vs fused {f_fused:.3f} ({int(on_test.sum())} pts)"
            )
        print("; ".join(row) + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nmean test macro-F1 over seeds {args.seeds} (n={args.n}, default settings)")
    print(f"all modalities, all test patients: {np.mean(full_all):.3f} +- {np.std(full_all):.3f}")
    for name, rows in table.items():
        s, f, k = zip(*rows, strict=True)
        print(
            f"test patients with {name} (mean {np.mean(k):.0f}): {name} alone "
            f"{np.mean(s):.3f} +- {np.std(s):.3f}; OmniFuse {np.mean(f):.3f} +- {np.std(f):.3f}"
        )


if __name__ == "__main__":
    main()
