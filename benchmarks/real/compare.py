"""omnifuse (default settings, through its CLI) against the baselines a reviewer tries first,
on the same stratified 70/30 splits of a real text + numbers cohort (benchmarks/real/prepare.py).

Methods (``--methods``, comma-separated, default all that can run):
  lr      TF-IDF (word 1-2 grams, sublinear tf, min_df 2) + numbers (median-imputed, missing
          indicators, standardised) -> LogisticRegression, C by 5-fold stratified CV over
          logspace(-2, 2, 9) scored by AUROC (macro one-vs-rest when C > 2).
  hgb     HistGradientBoostingClassifier (default params, sklearn's own early-stopping rule) on
          TF-IDF -> TruncatedSVD(100) + the raw numbers (NaN kept).
  ag      AutoGluon TabularPredictor (text column + numbers), run with --autogluon-python in a
          subprocess; skipped when that interpreter cannot import autogluon.tabular.
  omnifuse  `omnifuse train TRAIN.csv --num-classes C --modality labs=vector --modality
          text=text --out-dir RUN --seed SEED --test-ratio 0 --threads 1` (every other setting
          its default), then `omnifuse predict TEST.csv --run RUN --out preds.csv`;
          scored from its prob_* columns by the same sklearn code as the baselines.

Every method sees the identical 70% / 30% patients of each seed; AUROC (binary: roc_auc_score,
multi-class: macro one-vs-rest), log loss and (binary) Brier are computed here.

  nice -n 10 .venv/bin/python benchmarks/real/compare.py \
      --manifest /work/real_data/drugreview/manifest.csv --seeds 5 \
      [--methods lr,hgb,omnifuse] [--omnifuse-args "--epochs 50"] [--tag variant] \
      [--autogluon-python /work/agvenv/bin/python --ag-time-limit 300]

Writes benchmarks/real/results/<name>[-<tag>].csv (one row per seed x method; rerunning appends
only the missing rows unless --fresh) and the same name .md (mean, SD, paired differences
omnifuse - baseline with a 95% t-interval over seeds, timings).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_METHODS = ["lr", "hgb", "ag", "omnifuse"]


# ----------------------------------------------------------------------------- data
def load_manifest(path: Path) -> tuple[pd.DataFrame, np.ndarray, int]:
    df = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    df["text"] = df["text"].astype(str)
    rows = [json.loads(s) if s.strip() else None for s in df["labs"]]
    d = max(len(r) for r in rows if r is not None)
    x = np.full((len(df), d), np.nan)
    for i, r in enumerate(rows):
        if r is not None:
            x[i] = [np.nan if v is None else float(v) for v in r]
    df["label"] = df["label"].astype(int)
    n_cls = int(df["label"].max()) + 1
    return df, x, n_cls


def split(labels: np.ndarray, seed: int, test_size: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    tr, te = next(sss.split(np.zeros(len(labels)), labels))
    return np.sort(tr), np.sort(te)


# ----------------------------------------------------------------------------- metrics
def score(y: np.ndarray, p: np.ndarray, n_cls: int) -> dict:
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1.0)
    p = p / p.sum(1, keepdims=True)
    out = {}
    if n_cls == 2:
        out["auroc"] = roc_auc_score(y, p[:, 1])
        out["brier"] = brier_score_loss(y, p[:, 1])
    else:
        out["auroc"] = roc_auc_score(
            y, p, multi_class="ovr", average="macro", labels=list(range(n_cls))
        )
        out["brier"] = float(np.mean(np.sum((p - np.eye(n_cls)[y]) ** 2, axis=1)))
    out["logloss"] = log_loss(y, p, labels=list(range(n_cls)))
    return out


# ----------------------------------------------------------------------------- baselines
def tfidf():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)


def run_lr(df, x, tr, te, n_cls, seed, args) -> tuple[np.ndarray, str]:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    ncols = [f"n{j}" for j in range(x.shape[1])]
    frame = pd.concat([df[["text"]].reset_index(drop=True), pd.DataFrame(x, columns=ncols)], axis=1)
    # columns entirely NaN in training would break the median imputer: keep_empty_features
    num = Pipeline(
        [
            ("imp", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
            ("sc", StandardScaler()),
        ]
    )
    pre = ColumnTransformer([("txt", tfidf(), "text"), ("num", num, ncols)])
    pipe = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=5000))])
    grid = GridSearchCV(
        pipe,
        {"clf__C": np.logspace(-2, 2, 9)},
        scoring="roc_auc" if n_cls == 2 else "roc_auc_ovr",
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        n_jobs=1,
        refit=True,
    )
    grid.fit(frame.iloc[tr], df["label"].to_numpy()[tr])
    vocab = len(grid.best_estimator_.named_steps["pre"].named_transformers_["txt"].vocabulary_)
    note = f"C={grid.best_params_['clf__C']:.3g}; cv_auroc={grid.best_score_:.3f}; vocab={vocab}"
    return grid.predict_proba(frame.iloc[te]), note


def run_hgb(df, x, tr, te, n_cls, seed, args) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.ensemble import HistGradientBoostingClassifier

    vec = tfidf()
    t_tr = vec.fit_transform(df["text"].to_numpy()[tr])
    t_te = vec.transform(df["text"].to_numpy()[te])
    k = min(100, t_tr.shape[1] - 1)
    svd = TruncatedSVD(k, random_state=seed)
    z_tr = np.hstack([svd.fit_transform(t_tr), x[tr]])
    z_te = np.hstack([svd.transform(t_te), x[te]])
    clf = HistGradientBoostingClassifier(random_state=seed)
    clf.fit(z_tr, df["label"].to_numpy()[tr])
    return clf.predict_proba(z_te), f"iters={clf.n_iter_}; early_stopping={clf.do_early_stopping_}"


def ag_available(py: str | None) -> bool:
    if not py or not Path(py).exists():
        return False
    r = subprocess.run([py, "-c", "import autogluon.tabular"], capture_output=True)
    return r.returncode == 0


def run_ag(df, x, tr, te, n_cls, seed, args, work: Path) -> tuple[np.ndarray, str]:
    work.mkdir(parents=True, exist_ok=True)
    ncols = [f"num_{j}" for j in range(x.shape[1])]
    full = pd.concat(
        [df[["id", "label", "text"]].reset_index(drop=True), pd.DataFrame(x, columns=ncols)], axis=1
    )
    full.iloc[tr].to_csv(work / "ag_train.csv", index=False)
    full.iloc[te].to_csv(work / "ag_test.csv", index=False)
    agdir = work / "ag_model"
    shutil.rmtree(agdir, ignore_errors=True)
    cmd = [
        args.autogluon_python,
        str(HERE / "ag_runner.py"),
        str(work / "ag_train.csv"),
        str(work / "ag_test.csv"),
        str(work / "ag_probs.csv"),
        "--time-limit",
        str(args.ag_time_limit),
        "--presets",
        args.ag_presets,
        "--work-dir",
        str(agdir),
        "--seed",
        str(seed),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    (work / "ag_log.txt").write_text(r.stdout + "\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"autogluon failed (rc {r.returncode}): {r.stderr[-800:]}")
    probs = pd.read_csv(work / "ag_probs.csv", dtype={"id": str})
    probs = probs.set_index("id").loc[df["id"].to_numpy()[te]]
    best = [ln for ln in r.stdout.splitlines() if ln.startswith("AG_BEST_MODEL")]
    shutil.rmtree(agdir, ignore_errors=True)
    return probs[[f"prob_{k}" for k in range(n_cls)]].to_numpy(), (best[0][14:] if best else "")


# ----------------------------------------------------------------------------- omnifuse
def omnifuse_bin(args) -> str:
    if args.omnifuse:
        return args.omnifuse
    cand = Path(sys.executable).with_name("omnifuse")
    return str(cand) if cand.exists() else "omnifuse"


def write_manifest(df: pd.DataFrame, idx: np.ndarray, path: Path) -> None:
    df.iloc[idx][["id", "label", "labs", "text"]].to_csv(path, index=False)


def run_omnifuse(df, x, tr, te, n_cls, seed, args, work: Path) -> tuple[np.ndarray, str]:
    exe = omnifuse_bin(args)
    work.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = work / "train.csv", work / "test.csv"
    write_manifest(df, tr, train_csv)
    write_manifest(df, te, test_csv)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [
        exe,
        "train",
        str(train_csv),
        "--num-classes",
        str(n_cls),
        "--modality",
        "labs=vector",
        "--modality",
        "text=text",
        "--out-dir",
        str(run),
        "--seed",
        str(seed),
    ]
    extra = shlex.split(args.omnifuse_args or "")
    # default settings: --test-ratio 0 gives the test share to training (0.9/0.1)
    split_flags = ["--test-ratio", "0", "--threads", "1"]
    note = "defaults, --test-ratio 0 (train/val 0.9/0.1 of the 70%)"
    r = subprocess.run(base + split_flags + extra, capture_output=True, text=True, env=env)
    (work / "train_log.txt").write_text(
        " ".join(base + split_flags + extra) + "\n" + r.stdout + "\n" + r.stderr
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"omnifuse train failed (rc {r.returncode}): {(r.stderr or r.stdout)[-800:]}"
        )
    preds = work / "preds.csv"
    p = subprocess.run(
        [exe, "predict", str(test_csv), "--run", str(run), "--out", str(preds)],
        capture_output=True,
        text=True,
        env=env,
    )
    (work / "predict_log.txt").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(
            f"omnifuse predict failed (rc {p.returncode}): {(p.stderr or p.stdout)[-800:]}"
        )
    out = pd.read_csv(preds, dtype={"id": str})
    pcols = [c for c in out.columns if c.startswith("prob_")]
    if len(pcols) != n_cls:
        raise RuntimeError(f"expected {n_cls} prob_ columns, got {pcols}")
    out = out.set_index("id").loc[df["id"].to_numpy()[te]]
    probs = out[pcols].to_numpy(dtype=float)
    if np.isnan(probs).any():
        raise RuntimeError(f"{int(np.isnan(probs).any(1).sum())} test patients unscored")
    ep = ""
    mfile = run / "metrics.csv"
    if mfile.exists():
        m = pd.read_csv(mfile)
        ep = f"; epochs_run={len(m)}"
    if not args.keep_runs:
        for f in run.glob("*.pt"):
            if f.name not in ("best.pt", "model.pt"):
                f.unlink()
    return probs, note + ep


# ----------------------------------------------------------------------------- report
def t_interval(d: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    d = np.asarray(d, dtype=float)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return m, m - h, m + h


def markdown(res: pd.DataFrame, title: str, n_cls: int) -> str:
    lines = [f"# {title}", ""]
    methods = [m for m in ALL_METHODS if m in set(res["method"])]
    seeds = sorted(res["seed"].unique())
    piv = res.pivot_table(index="seed", columns="method", values="auroc")
    lines += [
        "AUROC on the 30% test split"
        + (" (macro one-vs-rest)" if n_cls > 2 else "")
        + " per split seed:",
        "",
        "| seed | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for s in seeds:
        lines.append(
            f"| {s} | "
            + " | ".join(
                f"{piv.loc[s, m]:.4f}" if m in piv.columns and pd.notna(piv.loc[s, m]) else "-"
                for m in methods
            )
            + " |"
        )
    lines += [
        "",
        "| method | n seeds | AUROC mean | AUROC SD | log loss mean | Brier mean "
        "| fit+predict s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r = res[res["method"] == m]
        lines.append(
            f"| {m} | {len(r)} | {r['auroc'].mean():.4f} | "
            f"{r['auroc'].std(ddof=1) if len(r) > 1 else float('nan'):.4f} | "
            f"{r['logloss'].mean():.4f} | {r['brier'].mean():.4f} | "
            f"{r['seconds'].mean():.1f} |"
        )
    if "omnifuse" in methods:
        lines += [
            "",
            "Paired difference omnifuse - baseline (AUROC, same seeds), mean and "
            "95% t-interval over seeds:",
            "",
            "| baseline | per-seed differences | mean | 95% CI |",
            "|---|---|---|---|",
        ]
        for m in methods:
            if m == "omnifuse":
                continue
            both = piv[["omnifuse", m]].dropna()
            if both.empty:
                continue
            d = (both["omnifuse"] - both[m]).to_numpy()
            mean, lo, hi = t_interval(d)
            lines.append(
                f"| {m} | "
                + ", ".join(f"{v:+.4f}" for v in d)
                + f" | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] |"
            )
    notes = res.dropna(subset=["note"])
    if len(notes):
        lines += ["", "Notes per run:", ""]
        for _, r in notes.iterrows():
            lines.append(f"- seed {r['seed']} {r['method']}: {r['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default="/work/real_data/drugreview/manifest.csv")
    ap.add_argument("--seeds", type=int, default=5, help="split seeds 0..K-1")
    ap.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 3,4")
    ap.add_argument("--test-size", type=float, default=0.3)
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--omnifuse", default=None, help="omnifuse executable")
    ap.add_argument("--omnifuse-args", default="", help="extra `omnifuse train` flags")
    ap.add_argument("--autogluon-python", default="/work/agvenv/bin/python")
    ap.add_argument("--ag-time-limit", type=float, default=300)
    ap.add_argument("--ag-presets", default="medium_quality")
    ap.add_argument("--tag", default="", help="suffix of the result files (variants)")
    ap.add_argument("--work-dir", default=None, help="default /work/real_data/runs/<name>")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the CSV")
    ap.add_argument("--keep-runs", action="store_true")
    args = ap.parse_args()

    manifest = Path(args.manifest)
    name = manifest.parent.name + (f"-{args.tag}" if args.tag else "")
    df, x, n_cls = load_manifest(manifest)
    seeds = (
        [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - set(ALL_METHODS)
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ALL_METHODS}")
    if "ag" in methods and not ag_available(args.autogluon_python):
        print(f"[skip] ag: {args.autogluon_python} cannot import autogluon.tabular", flush=True)
        methods.remove("ag")
    work_root = Path(args.work_dir or f"/work/real_data/runs/{name}")
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    old = pd.read_csv(csv_path) if csv_path.exists() and not args.fresh else None
    done = set() if old is None else set(zip(old["seed"], old["method"], strict=True))
    rows = [] if old is None else old.to_dict("records")
    print(
        f"{manifest}: {len(df)} patients, {n_cls} classes, {x.shape[1]} numeric columns; "
        f"seeds {seeds}; methods {methods}",
        flush=True,
    )
    if "omnifuse" in methods:
        print(f"omnifuse: {omnifuse_bin(args)}; extra args: {args.omnifuse_args!r}", flush=True)

    for seed in seeds:
        tr, te = split(df["label"].to_numpy(), seed, args.test_size)
        y_te = df["label"].to_numpy()[te]
        for m in methods:
            if (seed, m) in done:
                continue
            t0 = time.time()
            try:
                if m == "lr":
                    p, note = run_lr(df, x, tr, te, n_cls, seed, args)
                elif m == "hgb":
                    p, note = run_hgb(df, x, tr, te, n_cls, seed, args)
                elif m == "ag":
                    p, note = run_ag(df, x, tr, te, n_cls, seed, args, work_root / f"seed{seed}")
                else:
                    p, note = run_omnifuse(
                        df, x, tr, te, n_cls, seed, args, work_root / f"seed{seed}"
                    )
            except Exception as e:  # one failing method must not lose the others
                print(f"seed {seed} {m}: FAILED {e}", flush=True)
                continue
            sec = time.time() - t0
            s = score(y_te, p, n_cls)
            rows.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "method": m,
                    "n_train": len(tr),
                    "n_test": len(te),
                    **s,
                    "seconds": round(sec, 1),
                    "note": note,
                    "omnifuse_args": args.omnifuse_args if m == "omnifuse" else "",
                }
            )
            print(
                f"seed {seed} {m:9s} AUROC {s['auroc']:.4f}  logloss {s['logloss']:.4f}  "
                f"Brier {s['brier']:.4f}  {sec:7.1f}s  {note}",
                flush=True,
            )
            res = pd.DataFrame(rows)
            res.to_csv(csv_path, index=False)
            (out_dir / f"{name}.md").write_text(markdown(res, name, n_cls))
    res = pd.DataFrame(rows)
    if len(res):
        md = markdown(res, name, n_cls)
        (out_dir / f"{name}.md").write_text(md)
        print("\n" + md)
        print(f"wrote {csv_path} and {out_dir / (name + '.md')}")


if __name__ == "__main__":
    main()
