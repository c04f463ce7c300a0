"""Which text representation carries the signal on a real manifest? Logistic regression (C by
5-fold CV, as compare.py's `lr`) on the same 70/30 splits, one representation change at a time,
including omnifuse's own `simple` tokenizer (binary tf-idf over lower-cased words, L2-normed)
so a gap between omnifuse and `lr` can be split into representation vs model.

  nice -n 10 .venv/bin/python benchmarks/real/ablate_text.py \
      --manifest /work/real_data/drugreview/manifest.csv --seeds 5

Writes benchmarks/real/results/<name>-text-ablation.csv and .md.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import load_manifest, score, split  # noqa: E402


def omnifuse_tokens(text: str) -> list[str]:
    try:
        from omnifuse_cli.data.text import tokenize
    except ImportError:  # pragma: no cover - outside omnifuse's venv
        import re

        return re.findall(r"[^\W]+", text.lower())
    return tokenize(text)


def variants():
    from sklearn.feature_extraction.text import TfidfVectorizer

    def T(**kw):  # noqa: N802 - short on purpose: one line per variant
        return lambda: TfidfVectorizer(**kw)

    return {
        "ref: 1-2gram sublinear min_df2 (+num)": (
            T(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
            True,
        ),
        "text only, same tf-idf": (T(ngram_range=(1, 2), sublinear_tf=True, min_df=2), False),
        "numbers only": (None, True),
        "unigrams (+num)": (T(ngram_range=(1, 1), sublinear_tf=True, min_df=2), True),
        "1-2gram raw tf (+num)": (T(ngram_range=(1, 2), sublinear_tf=False, min_df=2), True),
        "1-2gram min_df1 (+num)": (T(ngram_range=(1, 2), sublinear_tf=True, min_df=1), True),
        "1-3gram (+num)": (T(ngram_range=(1, 3), sublinear_tf=True, min_df=2), True),
        "char_wb 2-5 (+num)": (
            T(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
            True,
        ),
        "omnifuse tokenizer, binary unigram tf-idf (+num)": (
            T(
                tokenizer=omnifuse_tokens,
                token_pattern=None,
                lowercase=False,
                binary=True,
                max_features=20000,
            ),
            True,
        ),
        "omnifuse tokenizer + word bigrams, binary (+num)": (
            T(
                tokenizer=omnifuse_tokens,
                token_pattern=None,
                lowercase=False,
                binary=True,
                ngram_range=(1, 2),
                min_df=2,
                max_features=20000,
            ),
            True,
        ),
    }


def fit_one(df, x, tr, te, n_cls, seed, make_vec, use_num):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    ncols = [f"n{j}" for j in range(x.shape[1])]
    frame = pd.concat([df[["text"]].reset_index(drop=True), pd.DataFrame(x, columns=ncols)], axis=1)
    parts = []
    if make_vec is not None:
        parts.append(("txt", make_vec(), "text"))
    if use_num:
        parts.append(
            (
                "num",
                Pipeline(
                    [
                        (
                            "imp",
                            SimpleImputer(
                                strategy="median", add_indicator=True, keep_empty_features=True
                            ),
                        ),
                        ("sc", StandardScaler()),
                    ]
                ),
                ncols,
            )
        )
    pipe = Pipeline([("pre", ColumnTransformer(parts)), ("clf", LogisticRegression(max_iter=5000))])
    grid = GridSearchCV(
        pipe,
        {"clf__C": np.logspace(-2, 2, 9)},
        scoring="roc_auc" if n_cls == 2 else "roc_auc_ovr",
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        n_jobs=1,
    )
    grid.fit(frame.iloc[tr], df["label"].to_numpy()[tr])
    return grid.predict_proba(frame.iloc[te]), grid.best_params_["clf__C"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", default="/work/real_data/drugreview/manifest.csv")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    manifest = Path(args.manifest)
    name = manifest.parent.name
    df, x, n_cls = load_manifest(manifest)
    rows = []
    for seed in range(args.seeds):
        tr, te = split(df["label"].to_numpy(), seed, 0.3)
        for vname, (mk, use_num) in variants().items():
            t0 = time.time()
            p, c = fit_one(df, x, tr, te, n_cls, seed, mk, use_num)
            s = score(df["label"].to_numpy()[te], p, n_cls)
            rows.append(
                {"seed": seed, "variant": vname, **s, "C": c, "seconds": round(time.time() - t0, 1)}
            )
            print(f"seed {seed} {vname:50s} AUROC {s['auroc']:.4f} C={c:.3g}", flush=True)
    res = pd.DataFrame(rows)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / f"{name}-text-ablation.csv", index=False)
    ref = res[res["variant"] == list(variants())[0]].set_index("seed")["auroc"]
    lines = [
        f"# {name}: text representation ablation (logistic regression, C by 5-fold CV)",
        "",
        "| variant | AUROC mean | SD | mean diff vs ref | median C |",
        "|---|---|---|---|---|",
    ]
    for v in variants():
        r = res[res["variant"] == v].set_index("seed")
        d = (r["auroc"] - ref.loc[r.index]).mean()
        lines.append(
            f"| {v} | {r['auroc'].mean():.4f} | {r['auroc'].std(ddof=1):.4f} | "
            f"{d:+.4f} | {r['C'].median():.3g} |"
        )
    md = "\n".join(lines) + "\n"
    (out / f"{name}-text-ablation.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
