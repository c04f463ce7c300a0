"""--select-by with the linear path on (the default model), judged on validation-only data.

benchmarks/selection.py replays epoch choices of the fusion network alone (--no-linear-path);
the default model blends the kept epoch with a logistic regression, so the best epoch for the
blend may differ. Here, per seed, the real cohorts are split as benchmarks/real/compare.py does
(the same stratified 70/30 split; its 30% test part is never read), and the 70% is split again:
5/7 train a run with `omnifuse train ... --test-ratio 0` (its own 0.9/0.1 train/validation split,
as compare.py's runs), 2/7 are judge patients scored with `omnifuse evaluate --manifest`.

Declared before running: the default stays --select-by auroc if, on both real cohorts, the
judge-AUROC difference auroc - macro_f1 (paired by seed, 95% t-interval over 10 seeds) is not
entirely below 0 and its mean over the two cohorts is >= 0; otherwise the default returns to
macro_f1.

  nice .venv/bin/python benchmarks/selection_blend.py [--cohorts drug,drug3] [--seeds 10]
Writes benchmarks/results/selection_blend.csv and .md.
"""

from __future__ import annotations

import os

from common import one_thread_per_process

one_thread_per_process()  # before numpy loads

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
REAL = Path(os.environ.get("OMNIFUSE_REAL_DATA", "/work/real_data"))
WORK = HERE / "work-selection-blend"
COHORTS = {
    "drug": (REAL / "drugreview" / "manifest.csv", 2),
    "drug3": (REAL / "drugreview-3class" / "manifest.csv", 3),
}
RULES = ("macro_f1", "auroc")


def run_one(name: str, seed: int) -> list[dict]:
    from sklearn.model_selection import StratifiedShuffleSplit

    sys.path.insert(0, str(HERE / "real"))
    from compare import split  # the benchmark's own 70/30 split

    manifest, classes = COHORTS[name]
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    labels = frame["label"].astype(int).to_numpy()
    pool, _test = split(labels, seed, 0.3)
    inner = StratifiedShuffleSplit(1, test_size=2 / 7, random_state=seed)
    fit, judge = next(inner.split(np.zeros(len(pool)), labels[pool]))
    folder = WORK / f"{name}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    frame.iloc[pool[fit]].to_csv(folder / "train.csv", index=False)
    frame.iloc[pool[judge]].to_csv(folder / "judge.csv", index=False)
    rows = []
    for rule in RULES:
        run = folder / rule
        subprocess.run(
            [
                sys.executable,
                "-m",
                "omnifuse_cli",
                "train",
                str(folder / "train.csv"),
                "--num-classes",
                str(classes),
                "--modality",
                "labs=vector",
                "--modality",
                "text=text",
                "--out-dir",
                str(run),
                "--seed",
                str(seed),
                "--test-ratio",
                "0",
                "--threads",
                "1",
                "--select-by",
                rule,
                "--overwrite",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "omnifuse_cli",
                "evaluate",
                str(run),
                "--manifest",
                str(folder / "judge.csv"),
                "--out-dir",
                str(run / "judge"),
                "--bootstrap",
                "0",
                "--threads",
                "1",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        metrics = pd.read_csv(run / "judge" / "metrics.csv").set_index("metric")["value"]
        rows.append(
            {
                "cohort": name,
                "seed": seed,
                "rule": rule,
                "auroc": metrics["auroc"],
                "loss": metrics["loss"],
                "macro_f1": metrics["macro_f1"],
                "n_judge": len(judge),
            }
        )
    return rows


def main() -> None:
    from scipy import stats

    parser = argparse.ArgumentParser()
    parser.add_argument("--cohorts", default="drug,drug3")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    target = HERE / "results" / "selection_blend.csv"
    done = pd.read_csv(target) if target.is_file() else pd.DataFrame()
    rows = done.to_dict("records")
    for name in args.cohorts.split(","):
        for seed in range(args.seeds):
            if len(done) and ((done.cohort == name) & (done.seed == seed)).any():
                continue
            rows += run_one(name, seed)
            pd.DataFrame(rows).to_csv(target, index=False)
            print(rows[-2:], flush=True)
    frame = pd.DataFrame(rows)
    out = [
        "# --select-by with the linear path on, on judge patients (validation only)",
        "",
        "benchmarks/selection_blend.py (design and decision rule in its docstring).",
        "",
        "| cohort | seeds | judge patients | AUROC macro_f1 | AUROC auroc | d AUROC [95% CI] "
        "| d log loss | d macro-F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means = []
    for name, g in frame.groupby("cohort"):
        wide = {
            m: g.pivot(index="seed", columns="rule", values=m)
            for m in ("auroc", "loss", "macro_f1")
        }
        d = (wide["auroc"]["auroc"] - wide["auroc"]["macro_f1"]).to_numpy()
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        means.append((d.mean(), d.mean() + half))
        dl = (wide["loss"]["auroc"] - wide["loss"]["macro_f1"]).mean()
        df1 = (wide["macro_f1"]["auroc"] - wide["macro_f1"]["macro_f1"]).mean()
        out.append(
            f"| {name} | {len(d)} | {int(g.n_judge.iloc[0])} | "
            f"{wide['auroc']['macro_f1'].mean():.4f} | {wide['auroc']['auroc'].mean():.4f} "
            f"| {d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] | "
            f"{dl:+.4f} | {df1:+.4f} |"
        )
    keep = all(high >= 0 for _, high in means) and np.mean([m for m, _ in means]) >= 0
    out += [
        "",
        f"Decision by the declared rule: the default is --select-by "
        f"{'auroc' if keep else 'macro_f1'}.",
        "",
    ]
    (HERE / "results" / "selection_blend.md").write_text("\n".join(out), encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
