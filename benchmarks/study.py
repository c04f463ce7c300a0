"""The evidence study (issue 4): ablations, missing-rate curves against classical baselines,
DWFuse inference rules, speed and memory. One command reproduces benchmarks/RESULTS.md:

    python3 dev.py bench              # the whole study (see RESULTS.md for its wall time)
    python3 dev.py bench --quick      # smoke run: small cohorts, 2 seeds, 3 rates (minutes)
    python3 dev.py bench --report     # rebuild RESULTS.md and the plots from runs.csv only

Design
- Datasets are built once: two make-data cohorts (default knobs, and one whose labs are made
  three times noisier) and scikit-learn's breast cancer set (WDBC) as three vector modalities.
  The frozen image backbone encodes every ultrasound view once per cohort; every run reuses
  those features, exactly as `omnifuse train` does with frozen backbones.
- A run is (dataset, variant, seed, missing rate). The seed drives the stratified 0.8/0.1/0.1
  split, the model's initialisation and the injected missingness. Missingness is injected per
  patient and modality before the split (each present modality hidden with probability r,
  every patient keeping at least one: the same draw as `omnifuse evaluate --missing-rate`).
- OmniFuse runs use `omnifuse train`'s own code (build_for_cohort, fit_model, infer) with the
  default TrainConfig; only the MethodConfig switches differ between ablation rows.
- Classical baselines see the same patients and splits: labs values, the mean frozen image
  feature of a patient's views and a 64-d LSA (tf-idf + truncated SVD, fitted on the training
  notes with omnifuse's tokenizer) of the note, concatenated with NaN where a modality is
  missing. HistGradientBoosting takes the NaN natively; the logistic regression gets mean
  imputation plus missing indicators. Each picks its hyper-parameters on the validation split.
- Every run's rows are appended to runs.csv as soon as it ends, so an interrupted study
  continues where it stopped (--fresh starts over). Only validation numbers choose anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
import pandas as pd
import torch

from omnifuse_cli import __version__
from omnifuse_cli.config import (
    DEFAULT_MODALITIES,
    DataConfig,
    MethodConfig,
    ModalitySpec,
    TrainConfig,
)
from omnifuse_cli.data.cache import FeatureArray
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.splits import stratified_split
from omnifuse_cli.data.text import tokenize
from omnifuse_cli.engine.epoch import train_epoch
from omnifuse_cli.engine.evaluation import simulate_missing
from omnifuse_cli.engine.fitting import (
    _optimizer,  # the fine-tuning measurement times train_epoch exactly as fit_model sets it up
    _unfreeze,
    fit_model,
)
from omnifuse_cli.engine.frozen_features import cache_frozen_features
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.metrics import classification_metrics
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import build_for_cohort
from omnifuse_cli.model.encoders import ImageEncoder
from omnifuse_cli.synthetic import CohortSpec, make_cohort

ROOT = Path(__file__).resolve().parent.parent
DATA_SEED = 7  # the cohorts are fixed; the study's seeds vary splits, inits and missingness
CPU = torch.device("cpu")

# The paper's Table 4 rows (a-f), as MethodConfig switches.
VARIANTS: dict[str, dict[str, bool]] = {
    "concat": dict(use_imputation=False, use_dwfuse=False, use_tla=False),
    "+DWFuse": dict(use_imputation=False, use_dwfuse=True, use_tla=False),
    "+TLA": dict(use_imputation=False, use_dwfuse=True, use_tla=True),
    "+forward imputation": dict(
        use_imputation=True, use_backward=False, use_dwfuse=True, use_tla=True
    ),
    "forward+backward, no TLA": dict(
        use_imputation=True, use_backward=True, use_dwfuse=True, use_tla=False
    ),
    "full OmniFuse": dict(use_imputation=True, use_backward=True, use_dwfuse=True, use_tla=True),
}
# Settings of the full model tried against the defaults (lr 3e-4, modality drop 0.3), on
# validation only: name -> (MethodConfig overrides, TrainConfig overrides).
TUNING: dict[str, tuple[dict, dict]] = {
    "lr 1e-3": ({}, {"lr": 1e-3}),
    "lr 1e-4": ({}, {"lr": 1e-4}),
    "modality drop 0.1": ({"modality_drop": 0.1}, {}),
    "modality drop 0.5": ({"modality_drop": 0.5}, {}),
}
CURVE_METHODS = {  # label on the plots -> variant
    "OmniFuse (full)": "full OmniFuse",
    "OmniFuse without imputation": "+TLA",
    "concat fusion": "concat",
    "HistGradientBoosting (NaN)": "hgb",
    "mean-impute + indicators + LogReg": "logreg",
}
RULES = ("label-free", "joint", "mean")
KEY = ["dataset", "variant", "seed", "rate"]
COLUMNS = [
    *KEY,
    "rule",
    "split",
    "n",
    "auroc",
    "macro_f1",
    "acc",
    "loss",
    "best_epoch",
    "train_seconds",
    "epoch_seconds",
    "params",
]


@dataclass
class Dataset:
    name: str
    description: str
    cohort: Cohort
    num_classes: int
    image_cache: dict[str, FeatureArray]
    encode_seconds: float = 0.0
    n_images: int = 0
    image_weights: str = ""


DATASETS: dict[str, Dataset] = {}  # filled in the parent before the worker pool forks


# -- datasets ---------------------------------------------------------------------------------
def synth_dataset(name: str, description: str, work: Path, n: int, **knobs: float) -> Dataset:
    summary = make_cohort(CohortSpec(n=n, seed=DATA_SEED, **knobs), work / name)
    cohort = read_manifest(summary.manifest, DEFAULT_MODALITIES)
    request = TrainRequest(summary.manifest, 3, work / "unused", train=TrainConfig(device="cpu"))
    torch.manual_seed(DATA_SEED)
    model, pre, loaded = build_for_cohort(cohort, np.arange(len(cohort)), request)
    weights = loaded.description
    data = pre.prepare(cohort)
    names = [n for n, e in model.encoders.items() if isinstance(e, ImageEncoder)]
    t0 = time.perf_counter()
    cache_frozen_features(model, data, names, device=CPU, batch_size=32, amp=False)
    seconds = time.perf_counter() - t0
    n_images = sum(len(p) for name in names for p in data.images[name])
    return Dataset(name, description, cohort, 3, dict(data.image_cache), seconds, n_images, weights)


def wdbc_dataset() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    x = raw.data.astype(np.float32)
    columns = list(raw.feature_names)
    groups = {"mean": slice(0, 10), "error": slice(10, 20), "worst": slice(20, 30)}
    cohort = Cohort(
        source=Path("sklearn:load_breast_cancer"),
        ids=[f"wdbc{i:03d}" for i in range(len(x))],
        labels=raw.target.astype(np.int64),
        modalities=tuple(ModalitySpec(k, "vector") for k in groups),
        vectors={k: x[:, s] for k, s in groups.items()},
        vector_columns={k: [c.replace(" ", "_") for c in columns[s]] for k, s in groups.items()},
        present=np.ones((len(x), 3), dtype=bool),
    )
    return Dataset(
        "wdbc",
        "scikit-learn breast cancer (WDBC), 569 patients, 2 classes; "
        "modalities mean / error / worst (10 features each)",
        cohort,
        2,
        {},
    )


def build_datasets(work: Path, n: int) -> dict[str, Dataset]:
    return {
        d.name: d
        for d in (
            synth_dataset(
                "synth", f"make-data --n {n} --seed {DATA_SEED} (default knobs)", work, n
            ),
            synth_dataset(
                "synth-noisy-labs",
                f"make-data --n {n} --seed {DATA_SEED} --labs-noise 3 "
                "(labs, the strongest modality, three times noisier)",
                work,
                n,
                labs_noise=3.0,
            ),
            wdbc_dataset(),
        )
    }


def inject_missing(cohort: Cohort, rate: float, seed: int) -> Cohort:
    """Hide modalities per patient (probability ``rate`` each, keeping one) and their values."""
    if rate <= 0:
        return cohort
    present, _ = simulate_missing(cohort.present, cohort.names, (), rate, seed + 10_000)
    return hide(cohort, cohort.present & ~present)


def hide(cohort: Cohort, hidden: np.ndarray) -> Cohort:
    """A copy of ``cohort`` without the (patient, modality) slots of ``hidden`` (N, M): not
    present, and their values removed, as if the manifest's cells had been empty."""
    out = dataclasses.replace(
        cohort,
        present=cohort.present & ~hidden,
        vectors=dict(cohort.vectors),
        images=dict(cohort.images),
        texts=dict(cohort.texts),
    )
    for k, spec in enumerate(cohort.modalities):
        rows = hidden[:, k]
        if spec.kind == "vector":
            values = out.vectors[spec.name].copy()
            values[rows] = np.nan
            out.vectors[spec.name] = values
        elif spec.kind == "image":
            out.images[spec.name] = [
                [] if h else p for h, p in zip(rows, cohort.images[spec.name], strict=True)
            ]
        else:
            out.texts[spec.name] = [
                None if h else t for h, t in zip(rows, cohort.texts[spec.name], strict=True)
            ]
    return out


def split_for(cohort: Cohort, seed: int) -> dict[str, np.ndarray]:
    """`omnifuse train`'s split for this seed (its default ratios)."""
    assert cohort.labels is not None
    cfg = TrainConfig()
    return stratified_split(
        cohort.labels, train=cfg.train_ratio, val=cfg.val_ratio, test=cfg.test_ratio, seed=seed
    )


# -- one run ----------------------------------------------------------------------------------
def _scores(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
    m = classification_metrics(y, probs, num_classes)
    return {"auroc": m["auroc"], "macro_f1": m["macro_f1"], "acc": m["acc"], "loss": m["loss"]}


def use_cached_images(
    model,
    data,
    cohort: Cohort,  # type: ignore[no-untyped-def]
    image_cache: dict[str, FeatureArray],
) -> None:
    """Give a run the cohort's once-encoded view features (none for hidden modalities) and
    freeze its image backbones, as `omnifuse train` does with frozen backbones."""
    for name, feats in image_cache.items():
        k = cohort.names.index(name)
        kept = [f if cohort.present[i, k] else f[:0] for i, f in enumerate(feats)]
        data.image_cache[name] = FeatureArray.from_rows(torch.cat(kept), [len(f) for f in kept])
        data.image_feature_dims[name] = feats[0].shape[1]
        model.encoders[name].backbone.requires_grad_(False)


def omnifuse_run(
    ds: Dataset, variant: str, seed: int, rate: float, train: TrainConfig | None = None
) -> list[dict]:
    cohort = inject_missing(ds.cohort, rate, seed)
    splits = split_for(cohort, seed)
    method_over, train_over = TUNING.get(variant, ({}, {}))
    switches = VARIANTS["full OmniFuse"] if variant in TUNING else VARIANTS[variant]
    cfg = train or TrainConfig(seed=seed, device="cpu", **train_over)
    request = TrainRequest(
        Path(str(cohort.source)),
        ds.num_classes,
        Path("unused"),
        data=DataConfig(modalities=cohort.modalities),
        method=MethodConfig(**switches, **method_over),
        train=cfg,
    )
    torch.manual_seed(seed)
    model, pre, _ = build_for_cohort(cohort, splits["train"], request)
    data = pre.prepare(cohort)
    use_cached_images(model, data, cohort, ds.image_cache)
    t0 = time.perf_counter()
    records, best_epoch, best = fit_model(
        model, data, splits, cfg, ds.num_classes, lambda event: None
    )
    seconds = time.perf_counter() - t0
    model.load_state_dict(best)
    assert cohort.labels is not None
    timing = {
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 2),
        "epoch_seconds": round(float(np.mean([r.seconds for r in records])), 3),
    }
    rows = []
    rules = RULES if model.config.method.use_dwfuse else ("joint",)
    for split in ("val", "test"):
        for rule in rules:
            result = infer(model, data, splits[split], device=CPU, rule=rule)
            rows.append(
                {
                    "rule": rule,
                    "split": split,
                    "n": len(result.index),
                    **_scores(
                        cohort.labels[result.index], np.exp(result.log_probs), ds.num_classes
                    ),
                    **timing,
                }
            )
    return rows


def classical_features(
    ds: Dataset,
    cohort: Cohort,
    train_idx: np.ndarray,
    seed: int,
    image_components: int | None = None,
) -> tuple[np.ndarray, dict[str, slice]]:
    """Per modality: values (vector), mean view feature (image; reduced to
    ``image_components`` principal components fitted on training patients when given), note
    LSA (text); NaN = absent. Returns the matrix and each modality's columns."""
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    blocks, columns, start = [], {}, 0
    for k, spec in enumerate(cohort.modalities):
        has = cohort.present[:, k]
        if spec.kind == "vector":
            block = cohort.vectors[spec.name].astype(np.float64)
        elif spec.kind == "image":
            feats = ds.image_cache[spec.name]
            block = np.stack(
                [f.mean(0).numpy() if len(f) else np.zeros(f.shape[1]) for f in feats]
            ).astype(np.float64)
            fit_rows = [i for i in train_idx if has[i]]
            if image_components and len(fit_rows) > image_components:
                pca = PCA(n_components=image_components, random_state=seed)
                pca.fit(block[fit_rows])
                block = pca.transform(block)
        else:
            texts = [t or "" for t in cohort.texts[spec.name]]
            fit_on = [texts[i] for i in train_idx if has[i]]
            tfidf = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None)
            train_matrix = tfidf.fit_transform(fit_on)
            svd = TruncatedSVD(n_components=min(64, train_matrix.shape[1] - 1), random_state=seed)
            svd.fit(train_matrix)
            block = svd.transform(tfidf.transform(texts))
        block = block.copy()
        block[~has] = np.nan
        blocks.append(block)
        columns[spec.name] = slice(start, start + block.shape[1])
        start += block.shape[1]
    return np.concatenate(blocks, axis=1), columns


def fit_classical(
    variant: str,
    x: np.ndarray,
    y: np.ndarray,
    splits: dict[str, np.ndarray],
    num_classes: int,
    seed: int,
) -> tuple[object, dict[str, float], dict]:
    """HistGradientBoosting with NaN (``hgb``) or mean imputation + missing indicators +
    logistic regression (``logreg``), its grid point chosen on validation (macro-F1, ties to
    the lower log loss). Returns the model, its validation scores and parameters."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if variant == "hgb":
        grid = [
            dict(learning_rate=lr, max_leaf_nodes=leaves)
            for lr in (0.03, 0.1)
            for leaves in (7, 31)
        ]

        def make(p):  # type: ignore[no-untyped-def]
            return HistGradientBoostingClassifier(
                max_iter=200, random_state=seed, early_stopping=False, **p
            )
    else:
        grid = [dict(C=c) for c in (0.01, 0.1, 1.0, 10.0)]

        def make(p):  # type: ignore[no-untyped-def]
            return make_pipeline(
                SimpleImputer(strategy="mean", add_indicator=True, keep_empty_features=True),
                StandardScaler(),
                LogisticRegression(max_iter=3000, **p),
            )

    best = None
    for params in grid:
        model = make(params).fit(x[splits["train"]], y[splits["train"]])
        val = _scores(y[splits["val"]], model.predict_proba(x[splits["val"]]), num_classes)
        key = (val["macro_f1"], -val["loss"])
        if best is None or key > best[0]:
            best = (key, model, val, params)
    assert best is not None
    return best[1], best[2], best[3]


def classical_run(ds: Dataset, variant: str, seed: int, rate: float) -> list[dict]:
    cohort = inject_missing(ds.cohort, rate, seed)
    splits = split_for(cohort, seed)
    x, _ = classical_features(ds, cohort, splits["train"], seed)
    y = cohort.labels
    assert y is not None
    t0 = time.perf_counter()
    model, val, params = fit_classical(variant, x, y, splits, ds.num_classes, seed)
    test = _scores(
        y[splits["test"]],
        model.predict_proba(x[splits["test"]]),  # type: ignore[attr-defined]
        ds.num_classes,
    )
    extra = {
        "rule": "",
        "best_epoch": 0,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "epoch_seconds": math.nan,
        "params": json.dumps(params),
    }
    return [
        {"split": "val", "n": len(splits["val"]), **val, **extra},
        {"split": "test", "n": len(splits["test"]), **test, **extra},
    ]


def run_one(key: tuple[str, str, int, float]) -> list[dict]:
    dataset, variant, seed, rate = key
    torch.set_num_threads(1)
    ds = DATASETS[dataset]
    runner = classical_run if variant in ("hgb", "logreg") else omnifuse_run
    rows = runner(ds, variant, seed, rate)
    return [{"dataset": dataset, "variant": variant, "seed": seed, "rate": rate, **r} for r in rows]


def plan(
    datasets: list[str], seeds: list[int], rates: list[float], curve_datasets: list[str]
) -> list[tuple[str, str, int, float]]:
    keys = [(d, v, s, 0.0) for d in datasets for v in VARIANTS for s in seeds]
    for d in curve_datasets:
        for v in CURVE_METHODS.values():
            keys += [(d, v, s, r) for r in (0.0, *rates) for s in seeds]
    keys += [(d, v, s, 0.0) for d in datasets for v in TUNING for s in seeds]
    return list(dict.fromkeys(keys))


def run_resumable(
    keys: list[tuple],
    csv: Path,
    key_columns: list[str],
    columns: list[str],
    runner: Callable[[tuple], list[dict]],
    jobs: int,
) -> None:
    """Run every key not yet in ``csv`` in a pool of forked workers, appending each run's rows
    as soon as it ends (so an interrupted study continues where it stopped)."""
    done: set[tuple] = set()
    if csv.is_file():
        old = pd.read_csv(csv)
        done = {tuple(_plain(v) for v in row) for row in old[key_columns].itertuples(index=False)}
    todo = [k for k in keys if k not in done]
    print(
        f"{csv.name}: {len(keys)} runs planned, {len(keys) - len(todo)} already done, "
        f"{len(todo)} to do with {jobs} worker(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(runner, k): k for k in todo}
        for k, future in enumerate(as_completed(futures), 1):
            rows = pd.DataFrame(future.result()).reindex(columns=columns)
            rows.to_csv(csv, mode="a", header=not csv.is_file(), index=False)
            test = rows[rows.split == "test"].iloc[0]
            print(
                f"[{k}/{len(todo)} {time.perf_counter() - t0:.0f} s] {futures[future]}: "
                f"test AUROC {test.auroc:.3f}",
                flush=True,
            )


def _plain(value: object) -> object:
    """CSV values as the keys were written: ints stay ints, other numbers floats."""
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return value


def run_study(keys: list[tuple], runs_csv: Path, jobs: int) -> None:
    run_resumable(keys, runs_csv, KEY, COLUMNS, run_one, jobs)


# -- speed and memory -------------------------------------------------------------------------
def _peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one command, in its own process tree."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    scale = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB else
    return float(out[0]), float(out[1]) * scale


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnifuse_cli", *args]


def speed_study(work: Path, out: Path, quick: bool) -> pd.DataFrame:
    torch.set_num_threads(os.cpu_count() or 1)
    rows: list[dict] = []

    def add(what: str, value: float, unit: str, note: str = "") -> None:
        rows.append({"measure": what, "value": round(value, 3), "unit": unit, "note": note})
        print(f"{what}: {value:.3f} {unit} {note}", flush=True)

    # 1. encode once vs per epoch, on the default make-data cohort
    ds = DATASETS["synth"]
    add(
        "encode every view once (frozen resnet34, 224 px)",
        ds.encode_seconds,
        "s",
        f"{ds.n_images} images, {len(ds.cohort)} patients",
    )
    cfg = TrainConfig(seed=0, device="cpu", epochs=5)
    epoch_rows = omnifuse_run(ds, "full OmniFuse", 0, 0.0, train=cfg)
    epoch = epoch_rows[0]["epoch_seconds"]
    add(
        "one training epoch on cached features (mean of 5)",
        epoch,
        "s",
        "train + validation + TLA mining",
    )
    add("30 epochs, encode once (what omnifuse train does)", ds.encode_seconds + 30 * epoch, "s")
    add(
        "30 epochs, re-encoding the frozen backbone every epoch",
        30 * (ds.encode_seconds + epoch),
        "s",
        "computed as 30 x (encode + epoch), not measured: the cost avoided",
    )

    # 2. fine-tuning throughput vs a bare torchvision forward+backward
    small = make_cohort(CohortSpec(n=40 if quick else 60, seed=DATA_SEED), work / "finetune")
    cohort = read_manifest(small.manifest, DEFAULT_MODALITIES)
    splits = split_for(cohort, 0)
    tcfg = TrainConfig(seed=0, device="cpu", finetune_image_scope="all", warmup_epochs=0)
    request = TrainRequest(small.manifest, 3, work / "unused", train=tcfg)
    torch.manual_seed(0)
    model, pre, _ = build_for_cohort(cohort, splits["train"], request)
    data = pre.prepare(cohort)
    _unfreeze(model, data, tcfg)
    optimizer = _optimizer(model, tcfg)
    n_img = sum(len(data.images["us"][i]) for i in splits["train"])
    t0 = time.perf_counter()
    train_epoch(
        model,
        data,
        splits["train"],
        optimizer,
        None,
        tcfg,
        CPU,
        torch.Generator().manual_seed(0),
        lambda e: None,
    )
    omni_rate = n_img / (time.perf_counter() - t0)
    add(
        "fine-tuning (--finetune-image-scope all): images/s",
        omni_rate,
        "img/s",
        f"{n_img} training views incl. PNG decoding and every OmniFuse loss",
    )
    import torchvision

    bare = torchvision.models.resnet34()
    bare.train()
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
    per_step = max(1, round(n_img / max(1, math.ceil(len(splits["train"]) / tcfg.batch_size))))
    x = torch.randn(per_step, 3, 224, 224)
    steps = max(1, math.ceil(n_img / per_step))
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        bare(x).sum().backward()
        opt.step()
    bare_rate = steps * per_step / (time.perf_counter() - t0)
    add(
        "bare torchvision resnet34 forward+backward+step: images/s",
        bare_rate,
        "img/s",
        f"batches of {per_step} random tensors",
    )
    add("fine-tuning throughput / bare torchvision", omni_rate / bare_rate, "ratio")

    # 3. predict patients/s and 4. peak resident memory, through the real commands
    synth_manifest = work / "synth" / "manifest.csv"
    run_dir = work / "speed_run"
    seconds, rss_train = _peak_rss_mb(
        _cli(
            "train",
            str(synth_manifest),
            "--num-classes",
            "3",
            "--out-dir",
            str(run_dir),
            "--overwrite",
            "--epochs",
            "2",
            "--device",
            "cpu",
        )
    )
    n = len(ds.cohort)
    add(
        f"omnifuse train --epochs 2, {n} patients: peak RSS",
        rss_train,
        "MB",
        f"{seconds:.1f} s wall",
    )
    seconds, rss_pred = _peak_rss_mb(
        _cli(
            "predict",
            str(synth_manifest),
            "--run",
            str(run_dir),
            "--out",
            str(work / "pred.csv"),
            "--device",
            "cpu",
        )
    )
    add(
        f"omnifuse predict, {n} patients with {ds.n_images} images",
        n / seconds,
        "patients/s",
        f"{seconds:.1f} s wall incl. start-up and model loading",
    )
    add(f"omnifuse predict, {n} patients: peak RSS", rss_pred, "MB")
    big_n = 300 if quick else 2000
    big = work / f"cohort{big_n}"
    subprocess.run(
        _cli("make-data", "--out-dir", str(big), "--n", str(big_n), "--seed", "1", "--overwrite"),
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    n_big_images = len(list((big / "us").glob("*.png")))
    seconds, rss_big = _peak_rss_mb(
        _cli(
            "train",
            str(big / "manifest.csv"),
            "--num-classes",
            "3",
            "--out-dir",
            str(work / "big_run"),
            "--overwrite",
            "--epochs",
            "1",
            "--device",
            "cpu",
        )
    )
    add(
        f"omnifuse train --epochs 1, {big_n} patients ({n_big_images} images): peak RSS",
        rss_big,
        "MB",
        f"{seconds:.1f} s wall",
    )
    add(
        f"peak RSS {big_n} patients / {n} patients",
        rss_big / rss_train,
        "ratio",
        f"holding every image decoded would need {n_big_images * 3 * 224 * 224 * 4 / 2**20:.0f}"
        " MB more",
    )
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "speed.csv", index=False)
    return frame


# -- report -----------------------------------------------------------------------------------
def _pm(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"


def _default_rule_rows(runs: pd.DataFrame, rule: str = "label-free") -> pd.DataFrame:
    """Each run's row under the model's own rule (label-free for DWFuse models, joint
    otherwise, the only output concat has; the classical baselines have no rule)."""
    has_rule = runs.groupby(KEY)["rule"].transform(lambda r: (r == rule).any())
    keep = (runs.rule == rule) | (~has_rule & runs.rule.isin(["joint", ""]))
    return runs[keep]


def ablation_table(runs: pd.DataFrame, dataset: str, split: str) -> pd.DataFrame:
    rows = _default_rule_rows(
        runs[(runs.dataset == dataset) & (runs.rate == 0) & (runs.split == split)]
    )
    out = []
    for variant in VARIANTS:
        r = rows[rows.variant == variant]
        if len(r):
            out.append(
                {
                    "row": variant,
                    "seeds": len(r),
                    "AUROC": _pm(r.auroc),
                    "macro-F1": _pm(r.macro_f1),
                    "accuracy": _pm(r.acc),
                }
            )
    return pd.DataFrame(out)


def curve_frame(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = _default_rule_rows(runs[(runs.dataset == dataset) & (runs.split == "test")])
    out = []
    for label, variant in CURVE_METHODS.items():
        for rate, r in rows[rows.variant == variant].groupby("rate"):
            out.append(
                {
                    "method": label,
                    "rate": rate,
                    "seeds": len(r),
                    "auroc_mean": r.auroc.mean(),
                    "auroc_std": r.auroc.std(ddof=0),
                    "f1_mean": r.macro_f1.mean(),
                    "f1_std": r.macro_f1.std(ddof=0),
                }
            )
    return pd.DataFrame(out)


def plot_curves(curves: pd.DataFrame, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "auroc", "test AUROC"), (axes[1], "f1", "test macro-F1")):
        for label in CURVE_METHODS:
            c = curves[curves.method == label].sort_values("rate")
            if c.empty:
                continue
            (line,) = ax.plot(c.rate, c[f"{metric}_mean"], marker="o", ms=3, label=label)
            ax.fill_between(
                c.rate,
                c[f"{metric}_mean"] - c[f"{metric}_std"],
                c[f"{metric}_mean"] + c[f"{metric}_std"],
                alpha=0.12,
                color=line.get_color(),
            )
        ax.set_xlabel("injected missing rate per modality")
        ax.set_title(f"{dataset}: {title} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(runs: pd.DataFrame, datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(1, len(datasets))
    for j, dataset in enumerate(datasets):
        rows = _default_rule_rows(
            runs[(runs.dataset == dataset) & (runs.rate == 0) & (runs.split == "test")]
        )
        means = [rows[rows.variant == v].auroc.mean() for v in VARIANTS]
        stds = [rows[rows.variant == v].auroc.std(ddof=0) for v in VARIANTS]
        ax.bar(
            np.arange(len(VARIANTS)) + j * width, means, width, yerr=stds, label=dataset, capsize=2
        )
    ax.set_xticks(np.arange(len(VARIANTS)) + width * (len(datasets) - 1) / 2)
    ax.set_xticklabels(list(VARIANTS), fontsize=8)
    ax.set_ylabel("test AUROC")
    ax.set_ylim(0.5, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("Ablation (paper Table 4 rows), mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rules_table(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = runs[(runs.dataset == dataset) & (runs.rate == 0) & (runs.variant == "full OmniFuse")]
    out = []
    for rule in RULES:
        r = rows[rows.rule == rule]
        out.append(
            {
                "rule": rule,
                "val AUROC": _pm(r[r.split == "val"].auroc),
                "val macro-F1": _pm(r[r.split == "val"].macro_f1),
                "test AUROC": _pm(r[r.split == "test"].auroc),
                "test macro-F1": _pm(r[r.split == "test"].macro_f1),
            }
        )
    return pd.DataFrame(out)


def goal_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per rate: full OmniFuse vs the best classical baseline (AUROC) and vs concat."""
    out = []
    for rate, c in curves.groupby("rate"):
        get = {row.method: row for row in c.itertuples()}
        full = get.get("OmniFuse (full)")
        classical = [
            get[m]
            for m in ("HistGradientBoosting (NaN)", "mean-impute + indicators + LogReg")
            if m in get
        ]
        if full is None or not classical:
            continue
        best = max(classical, key=lambda r: r.auroc_mean)
        spread = max(full.auroc_std, best.auroc_std)
        row = {
            "rate": f"{rate:.1f}",
            "OmniFuse AUROC": f"{full.auroc_mean:.3f}",
            "best classical": f"{best.auroc_mean:.3f} ({best.method.split(' ')[0]})",
            "difference": f"{full.auroc_mean - best.auroc_mean:+.3f}",
            "matches (within spread)": "yes"
            if full.auroc_mean >= best.auroc_mean - spread
            else "NO",
        }
        concat = get.get("concat fusion")
        if concat is not None:
            gap = full.auroc_mean - concat.auroc_mean
            row["vs concat"] = f"{gap:+.3f}"
            if rate >= 0.5:
                clear = gap > max(full.auroc_std, concat.auroc_std)
                row["beats concat clearly (r ≥ 0.5)"] = "yes" if clear else "NO"
            else:
                row["beats concat clearly (r ≥ 0.5)"] = ""
        out.append(row)
    return pd.DataFrame(out)


def _paired(option: pd.Series, default: pd.Series) -> tuple[float, float]:
    """Mean and standard error of option - default over the (dataset, seed) runs both have."""
    diff = (option - default).dropna()
    if len(diff) < 2:
        return math.nan, math.nan
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def defaults_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Validation only: every choice the study compares against `omnifuse train`'s default.

    An option replaces the default when its validation macro-F1, paired by dataset and seed,
    is higher by more than two standard errors of the paired difference; a smaller margin is
    within what re-drawing the split and the initialisation moves (see the seeds' spread)."""
    val = runs[(runs.split == "val") & (runs.rate == 0)]
    by_run = _default_rule_rows(val).set_index(["dataset", "seed", "variant"]).macro_f1
    full = val[val.variant == "full OmniFuse"].set_index(["dataset", "seed", "rule"]).macro_f1
    groups = [
        ("ablation row", "full OmniFuse", [v for v in VARIANTS if v != "full OmniFuse"]),
        ("learning rate", "lr 3e-4", ["lr 1e-3", "lr 1e-4"]),
        ("modality drop", "modality drop 0.3", ["modality drop 0.1", "modality drop 0.5"]),
    ]
    table, verdicts = [], []

    def add(
        choice: str, default_name: str, default: pd.Series, options: dict[str, pd.Series]
    ) -> None:
        best, best_diff = default_name, 0.0
        table.append(
            {
                "choice": choice,
                "option": f"{default_name} (default)",
                "val macro-F1": f"{default.mean():.3f}",
                "paired difference": "",
                "runs": len(default),
            }
        )
        for name, series in options.items():
            if series.empty:
                continue
            diff, se = _paired(series, default)
            table.append(
                {
                    "choice": choice,
                    "option": name,
                    "val macro-F1": f"{series.mean():.3f}",
                    "paired difference": f"{diff:+.3f} ± {se:.3f}",
                    "runs": len(series.dropna()),
                }
            )
            if diff > 2 * se and diff > best_diff:
                best, best_diff = name, diff
        raw = max(
            [(default.mean(), default_name)]
            + [(s.mean(), n) for n, s in options.items() if not s.empty]
        )[1]
        verdicts.append(
            f"{choice}: highest mean on validation **{raw}**; "
            + (
                f"default kept (**{default_name}**): no option beats it by more "
                "than two standard errors"
                if best == default_name
                else f"**{best}** beats the default {default_name} by more than two "
                "standard errors: it should be the default"
            )
        )

    default = by_run.xs("full OmniFuse", level="variant")
    for choice, default_name, options in groups:
        add(
            choice,
            default_name,
            default,
            {
                o: by_run.xs(o, level="variant")
                if o in set(val.variant)
                else pd.Series(dtype=float)
                for o in options
            },
        )
    add(
        "inference rule",
        "label-free",
        full.xs("label-free", level="rule"),
        {r: full.xs(r, level="rule") for r in RULES if r != "label-free"},
    )
    return pd.DataFrame(table), verdicts


# Pages written by other benchmarks, carried into RESULTS.md, and the command that reruns each.
OTHER_RESULTS = {
    "real_data.md": "python benchmarks/real/prepare.py && python benchmarks/real/compare.py "
    "--seeds 10 --methods lr,hgb,omnifuse (see benchmarks/real/RESULTS.md)",
    "scale.md": "python benchmarks/scale.py",
    "selection.md": "python benchmarks/selection.py run && python benchmarks/selection.py analyse",
    "selection_blend.md": "python benchmarks/selection_blend.py",
    "clinical.md": "python benchmarks/clinical.py all",
    "imputation.md": "python benchmarks/imputation.py",
    "startup.md": "python benchmarks/startup.py",
}


def other_results(folder: Path) -> list[str]:
    """The other benchmarks' result pages (their own top headings), appended as they are."""
    lines: list[str] = []
    for name, command in OTHER_RESULTS.items():
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            lines += [
                *text.rstrip().splitlines(),
                "",
                f"(from [`results/{name}`](results/{name}); rerun with `{command}`)",
                "",
            ]
    return lines


def write_report(out: Path, report: Path) -> None:
    import power

    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    rel = out.relative_to(report.parent).as_posix()
    head = [*power.report_lines(out, rel, meta), *other_results(report.parent / "results")]
    if not (out / "runs.csv").is_file():
        report.write_text("\n".join(head), encoding="utf-8")
        print(f"wrote {report}", flush=True)
        return
    runs = pd.read_csv(out / "runs.csv")
    runs["rule"] = runs["rule"].fillna("")
    datasets = [d for d in ("synth", "synth-noisy-labs", "wdbc") if d in set(runs.dataset)]
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    rel = out.relative_to(report.parent).as_posix()
    plot_ablation(runs, datasets, out / "ablation.png")
    wall = ", ".join(f"{k}: {v} min" for k, v in meta.get("minutes", {}).items())
    lines = [
        *head,
        "# Earlier study (issue 4): 240-patient cohorts, 5 seeds"
        if head
        else "# OmniFuse evidence study",
        "",
        "Kept for the record; its runs used the method and defaults of that time, and its "
        "24-patient test splits cannot see effects of a few hundredths (see above)."
        if head
        else "",
        "",
        "Produced by `benchmarks/study.py` (the docstring explains the design). To reproduce "
        "everything from scratch, from the repository root:",
        "",
        "```",
        meta.get("command", "python3 dev.py bench"),
        "```",
        "",
        f"- Date: {meta.get('date', '?')}; wall time per part: {wall} "
        f"({meta.get('jobs', '?')} worker processes for the runs)",
        f"- Machine: {meta.get('machine', '?')}",
        f"- Versions: {meta.get('versions', '?')}",
        f"- Seeds: {meta.get('seeds', '?')}; missing rates: {meta.get('rates', '?')}",
        f"- Image backbone weights: {meta.get('image_weights', '?')} (frozen; every view "
        "encoded once per cohort)",
        "- Every OmniFuse run uses `omnifuse train`'s defaults (30 epochs, lr 3e-4, batch 32, "
        "best epoch by validation macro-F1); splits are stratified 0.8/0.1/0.1 per seed; "
        "numbers are test-split means ± standard deviations over the seeds unless marked val.",
        "",
        "## Datasets",
        "",
    ]
    for name, desc in meta.get("datasets", {}).items():
        lines.append(f"- `{name}`: {desc}")
    lines += [
        "",
        "## Ablation (paper Table 4 rows a-f)",
        "",
        "Rows as in the paper: concat = joint head on concatenated embeddings, no "
        "imputation, DWFuse or TLA; each following row switches parts on "
        "(`--no-imputation`, `--no-backward`, `--no-dwfuse`, `--no-tla`). The "
        "label-free rule scores the DWFuse rows. Paper (MIMIC, 3 modalities): concat "
        "0.811 → full 0.872 AUROC.",
        "",
        f"![ablation]({rel}/ablation.png)",
        "",
    ]
    for d in datasets:
        lines += [f"### {d}", "", common.markdown(ablation_table(runs, d, "test")), ""]
    lines += [
        "## Missing-rate curves",
        "",
        "Missingness injected per patient and modality before the split (each present "
        "modality hidden with probability r, every patient keeping one).",
        "",
    ]
    goals = []
    for d in datasets:
        curves = curve_frame(runs, d)
        if curves.empty or curves.rate.nunique() < 2:
            continue
        plot_curves(curves, d, out / f"curves_{d}.png")
        table = curves.pivot(index="rate", columns="method", values="auroc_mean")
        std = curves.pivot(index="rate", columns="method", values="auroc_std")
        shown = table.copy().astype(object)
        for col in table.columns:
            shown[col] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table[col], std[col], strict=True)]
        shown = shown[[m for m in CURVE_METHODS if m in shown.columns]].reset_index()
        shown["rate"] = shown["rate"].map(lambda r: f"{r:.1f}")
        f1 = curves.pivot(index="rate", columns="method", values="f1_mean")
        f1 = f1[[m for m in CURVE_METHODS if m in f1.columns]].reset_index()
        for col in f1.columns[1:]:
            f1[col] = f1[col].map(lambda v: f"{v:.3f}")
        f1["rate"] = f1["rate"].map(lambda r: f"{r:.1f}")
        lines += [
            f"### {d}",
            "",
            f"![curves {d}]({rel}/curves_{d}.png)",
            "",
            "Test AUROC:",
            "",
            common.markdown(shown),
            "",
            "Test macro-F1 (means):",
            "",
            common.markdown(f1),
            "",
        ]
        goal = goal_table(curves)
        if not goal.empty:
            goals.append((d, goal))
    lines += [
        "## DWFuse inference rules (full model, rate 0)",
        "",
        "Same trained models, three ways to turn their outputs into class "
        "probabilities: the label-free rule (method.md Sec. 2), the joint head alone, "
        "the mean of the modality heads.",
        "",
    ]
    for d in datasets:
        lines += [f"### {d}", "", common.markdown(rules_table(runs, d)), ""]
    table, verdicts = defaults_table(runs)
    lines += [
        "## Defaults chosen on validation data",
        "",
        "Validation macro-F1 (mean over every dataset and seed, rate 0) of each choice the "
        "study compares with `omnifuse train`'s default, and the difference to the "
        "default paired by dataset and seed (mean ± standard error). The test split "
        "chooses nothing. An option replaces the default only when it wins by more than "
        "two standard errors.",
        "",
        common.markdown(table),
        "",
    ]
    lines += [f"- {v}" for v in verdicts] + [""]
    lines += [
        "## Goals",
        "",
        "Issue 4's goals: full OmniFuse at least matches the best classical baseline at "
        "every missing rate (test AUROC, within the seeds' spread: the larger of the two "
        "standard deviations) and beats concat fusion by a clear margin (more than that "
        "spread) at rates ≥ 0.5.",
        "",
    ]
    for d, goal in goals:
        matched = int((goal["matches (within spread)"] == "yes").sum())
        beats = goal.get("beats concat clearly (r ≥ 0.5)", pd.Series(dtype=str))
        lines += [
            f"### {d}",
            "",
            f"Matches the best classical baseline at {matched} of {len(goal)} rates; "
            f"beats concat clearly at {int((beats == 'yes').sum())} of "
            f"{int(beats.isin(['yes', 'NO']).sum())} rates ≥ 0.5.",
            "",
            common.markdown(goal),
            "",
        ]
    findings = out / "findings.md"
    if findings.is_file():  # the team's reading of these numbers, written after the study
        lines += [findings.read_text(encoding="utf-8").strip(), ""]
    if (out / "speed.csv").is_file():
        speed = pd.read_csv(out / "speed.csv").fillna("")
        lines += [
            "## Speed and memory",
            "",
            f"All on this machine's CPU ({os.cpu_count()} threads), one process.",
            "",
            common.markdown(speed),
            "",
        ]
    report.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {report}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: n=90 cohorts, 2 seeds, rates 0/0.5/0.9"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only rebuild RESULTS.md and plots from the existing runs.csv",
    )
    parser.add_argument("--fresh", action="store_true", help="forget earlier runs")
    parser.add_argument(
        "--parts",
        default="power",
        help="comma list of: power (issue 8's powered study), runs (issue 4's "
        "ablation, curves, rules on 240-patient cohorts), speed",
    )
    parser.add_argument("--n", type=int, default=None, help="make-data cohort size [240]")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="[benchmarks/results/study, or .../study-quick with --quick]",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="generated cohorts and runs [benchmarks/work, or work-quick]",
    )
    args = parser.parse_args()
    quick = args.quick
    out = args.out or ROOT / "benchmarks" / "results" / ("study-quick" if quick else "study")
    report = out.parent.parent / ("RESULTS-quick.md" if quick else "RESULTS.md")
    work = args.work or ROOT / "benchmarks" / ("work-quick" if quick else "work")
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(out, report)
        return
    n = args.n or (90 if quick else 240)
    seeds = args.seeds or ([0, 1] if quick else [0, 1, 2, 3, 4])
    rates = [0.5, 0.9] if quick else [round(0.1 * k, 1) for k in range(1, 10)]
    runs_csv = out / "runs.csv"
    if args.fresh:
        for name in ("runs.csv", "speed.csv", "power.csv"):
            (out / name).unlink(missing_ok=True)
    start = time.perf_counter()
    parts = set(args.parts.split(","))
    meta_extra: dict = {}
    if "power" in parts:
        import power
        from mobilenet_weights import ensure_mobilenet_v2_weights

        print(
            f"torchvision MobileNetV2 ImageNet weights: {ensure_mobilenet_v2_weights()}", flush=True
        )
        print(f"building the power study's cohorts under {work}", flush=True)
        power.DATA.update(power.build(work, quick))
        meta_extra = {
            "power_image_weights": power.DATA["independent"].image_weights,
            "power_datasets": {d.name: d.description for d in power.DATA.values()},
            "power_encode_seconds": {
                d.name: round(d.encode_seconds, 1) for d in power.DATA.values() if d.encode_seconds
            },
        }
        power_seeds = args.seeds or ([0, 1] if quick else list(range(10)))
        power.run(power.plan(list(power.DATA), power_seeds, quick), out / "power.csv", args.jobs)
    if parts & {"runs", "speed"}:
        print(f"building datasets under {work}", flush=True)
        DATASETS.update(build_datasets(work, n))
    if "runs" in parts:
        keys = plan(list(DATASETS), seeds, rates, curve_datasets=["synth", "wdbc"])
        run_study(keys, runs_csv, args.jobs)
    if "speed" in parts:
        speed_study(work, out, quick)
    wall = (time.perf_counter() - start) / 60
    command = "python3 dev.py bench" + (" --quick" if quick else "")
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() and not args.fresh else {}
    minutes = dict(meta.get("minutes", {}))
    minutes[",".join(sorted(parts))] = round(wall, 1)
    meta.update(meta_extra)
    meta.update(
        {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "minutes": minutes,
            "jobs": args.jobs,
            "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU threads, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "versions": f"omnifuse {__version__}, torch {torch.__version__}, python "
            f"{platform.python_version()}",
            "seeds": seeds,
            "rates": [0.0, *rates],
        }
    )
    if DATASETS:
        meta.update(
            {
                "image_weights": DATASETS["synth"].image_weights,
                "datasets": {d.name: d.description for d in DATASETS.values()},
            }
        )
    meta_path.write_text(json.dumps(meta, indent=1))
    write_report(out, report)


if __name__ == "__main__":
    main()
