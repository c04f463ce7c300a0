"""AutoGluon leg of benchmarks/real/compare.py, run by a separate interpreter
(``--autogluon-python /work/agvenv/bin/python``) so AutoGluon's dependencies never touch
omnifuse's environment.

  python ag_runner.py TRAIN.csv TEST.csv OUT_PROBS.csv --time-limit 300 --presets medium_quality
             [--work-dir DIR] [--seed S]

TRAIN/TEST: columns id,label,text,num_0..num_{d-1} (NaN allowed). Writes id,prob_0..prob_{C-1}.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("out")
    ap.add_argument("--time-limit", type=float, default=300)
    ap.add_argument("--presets", default="medium_quality")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from autogluon.tabular import TabularPredictor  # noqa: PLC0415

    tr = pd.read_csv(args.train, keep_default_na=True)
    te = pd.read_csv(args.test, keep_default_na=True)
    tr["text"] = tr["text"].fillna("").astype(str)
    te["text"] = te["text"].fillna("").astype(str)
    n_cls = tr["label"].nunique()
    problem = "binary" if n_cls == 2 else "multiclass"
    metric = "roc_auc" if n_cls == 2 else "roc_auc_ovo_macro"
    feats = [c for c in tr.columns if c not in ("id",)]
    t0 = time.time()
    pred = TabularPredictor(
        label="label", problem_type=problem, eval_metric=metric, path=args.work_dir, verbosity=1
    )
    pred.fit(
        tr[feats],
        presets=args.presets,
        time_limit=args.time_limit,
        # no GPU / no multimodal torch text models: keep to the tabular defaults
        ag_args_fit={"num_cpus": 1, "num_gpus": 0},
    )
    fit_s = time.time() - t0
    proba = pred.predict_proba(te[[c for c in feats if c != "label"]], as_multiclass=True)
    cols = sorted(proba.columns, key=lambda c: int(c))
    out = pd.DataFrame({"id": te["id"]})
    for c in cols:
        out[f"prob_{int(c)}"] = proba[c].to_numpy()
    out.to_csv(args.out, index=False)
    lb = pred.leaderboard(silent=True)
    print(f"AG_FIT_SECONDS {fit_s:.1f}")
    print(f"AG_BEST_MODEL {pred.model_best}")
    print(lb[["model", "score_val"]].head(8).to_string())
    if args.work_dir is None:
        print(f"AG_PATH {os.path.abspath(pred.path)}")


if __name__ == "__main__":
    main()
