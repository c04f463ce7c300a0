"""The benchmark's comparison statistics (benchmarks/stats.py): rank AUROC, weighted AUROC,
Holm, seed t-intervals, the hierarchical bootstrap, the contrast table and the predictions file."""

from __future__ import annotations

import gzip
import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def st():
    return load_benchmark("stats", "omnifuse_bench_stats")


def sk_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(
        roc_auc_score(
            y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))
        )
    )


def tied_data(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities (rows sum to 1) with many tied scores: most rows repeat one of
    a few probability vectors."""
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)
    palette = rng.dirichlet(np.ones(c), size=4)
    probs = palette[rng.integers(0, 4, n)]
    free = rng.random(n) < 0.3
    probs[free] = rng.dirichlet(np.ones(c), size=int(free.sum()))
    return y, probs


def informative(rng: np.random.Generator, y: np.ndarray, c: int, signal: float) -> np.ndarray:
    """Probabilities whose logits favour the true class by ``signal``."""
    logits = rng.normal(size=(len(y), c))
    logits[np.arange(len(y)), y] += signal
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_seeds(
    st, rng: np.random.Generator, seeds: int, n: int, c: int, signal_a: float, signal_b: float
):
    a, b = [], []
    for s in range(seeds):
        y = rng.integers(0, c, n)
        y[:c] = np.arange(c)
        ids = np.array([f"s{s}p{i}" for i in range(n)])
        a.append(st.Preds(ids=ids, y=y, probs=informative(rng, y, c, signal_a)))
        b.append(st.Preds(ids=ids, y=y, probs=informative(rng, y, c, signal_b)))
    return a, b


# ------------------------------------------------------------------------------------ AUROC


@pytest.mark.parametrize("c", [2, 3, 4])
def test_fast_auroc_equals_sklearn_with_ties(st, c):
    rng = np.random.default_rng(c)
    for n in (7, 50, 400):
        y, probs = tied_data(rng, n, c)
        assert abs(st.fast_auroc(y, probs) - sk_auroc(y, probs)) < 1e-10
        y, _ = tied_data(rng, n, c)
        probs = informative(rng, y, c, 1.0)
        assert abs(st.fast_auroc(y, probs) - sk_auroc(y, probs)) < 1e-10


def test_fast_auroc_nan_when_a_class_is_absent(st):
    rng = np.random.default_rng(0)
    probs2 = rng.dirichlet(np.ones(2), size=10)
    assert math.isnan(st.fast_auroc(np.zeros(10, int), probs2))
    assert math.isnan(st.fast_auroc(np.ones(10, int), probs2))
    probs3 = rng.dirichlet(np.ones(3), size=10)
    assert math.isnan(st.fast_auroc(np.array([0, 1] * 5), probs3))
    with pytest.raises(ValueError):
        st.fast_auroc(np.array([0, 1, 3]), rng.dirichlet(np.ones(3), size=3))


@pytest.mark.parametrize("c", [2, 3])
def test_weighted_auroc_equals_sklearn_on_repeated_rows(st, c):
    rng = np.random.default_rng(10 + c)
    y, probs = tied_data(rng, 60, c)
    weights = rng.integers(0, 4, size=(25, 60))
    weights[:, :c] += 1  # every class keeps some weight
    got = st.weighted_auroc(y, probs, weights)
    for w, value in zip(weights, got, strict=True):
        rows = np.repeat(np.arange(60), w)
        assert abs(value - sk_auroc(y[rows], probs[rows])) < 1e-10
    single = st.weighted_auroc(y, probs, weights[0])
    assert isinstance(single, float) and abs(single - got[0]) < 1e-12
    # unit weights: the plain AUROC; a class with zero weight: NaN
    assert abs(st.weighted_auroc(y, probs, np.ones(60)) - st.fast_auroc(y, probs)) < 1e-12
    w = np.ones(60)
    w[y == 1] = 0
    assert math.isnan(st.weighted_auroc(y, probs, w))


# ------------------------------------------------------------------------------------ Holm, t


def test_holm_hand_checked_and_nan(st):
    assert np.allclose(st.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = st.holm([0.01, math.nan, 0.04])
    assert np.isclose(out[0], 0.02) and math.isnan(out[1]) and np.isclose(out[2], 0.04)
    assert st.holm([0.5, 0.6]) == [1.0, 1.0]
    assert st.holm([]) == []
    # monotone in the raw p-values and never below them
    p = np.random.default_rng(1).random(12) * 0.1
    adj = np.array(st.holm(p))
    assert (adj >= p).all() and (np.diff(adj[np.argsort(p)]) >= 0).all()


def test_seed_interval_matches_scipy(st):
    d = np.array([0.012, 0.02, -0.004, 0.031, 0.008, 0.015])
    got = st.seed_interval(d, level=0.9)
    ref = sps.ttest_1samp(d, 0.0)
    low, high = sps.t.interval(0.9, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert got["n"] == 6 and np.isclose(got["mean"], d.mean())
    assert np.isclose(got["median"], np.median(d)) and np.isclose(got["sd"], d.std(ddof=1))
    assert np.isclose(got["low"], low) and np.isclose(got["high"], high)
    assert np.isclose(got["p_two"], ref.pvalue)
    one = sps.ttest_1samp(d, 0.0, alternative="greater").pvalue
    assert np.isclose(got["p_one"], one)
    shifted = st.seed_interval(d, margin=0.01)
    assert np.isclose(
        shifted["p_one"], sps.ttest_1samp(d + 0.01, 0.0, alternative="greater").pvalue
    )
    assert shifted["p_one"] < got["p_one"]
    assert np.isclose(shifted["low"], st.seed_interval(d)["low"])  # the margin moves p only


def test_seed_interval_small_and_degenerate(st):
    one = st.seed_interval(np.array([0.02]))
    assert one["n"] == 1 and one["mean"] == 0.02
    assert all(math.isnan(one[k]) for k in ("low", "high", "p_two", "p_one", "sd"))
    same = st.seed_interval(np.zeros(5), margin=0.01)
    assert same["low"] == same["high"] == 0.0 and same["p_two"] == 1.0 and same["p_one"] == 0.0
    assert st.seed_interval(np.array([0.1, math.nan, 0.2]))["n"] == 2


# ------------------------------------------------------------------------------------ bootstrap


def test_hierarchical_bootstrap_finds_a_strong_difference(st):
    rng = np.random.default_rng(2)
    a, b = make_seeds(st, rng, seeds=4, n=150, c=3, signal_a=2.5, signal_b=0.0)
    res = st.hierarchical_bootstrap(a, b, n_boot=400, seed=1)
    per_seed = [
        st.fast_auroc(p.y, p.probs) - st.fast_auroc(q.y, q.probs) for p, q in zip(a, b, strict=True)
    ]
    assert np.isclose(res["diff"], np.mean(per_seed))
    assert res["low"] > 0.1 and res["low"] < res["diff"] < res["high"]
    assert res["p_one"] == pytest.approx(1 / 401) and res["p_two"] == pytest.approx(2 / 401)
    assert res["n_boot"] == 400 and res["n_valid"] == 400 and res["seeds"] == 4


def test_hierarchical_bootstrap_identical_predictions(st):
    rng = np.random.default_rng(3)
    a, _ = make_seeds(st, rng, seeds=3, n=80, c=2, signal_a=1.0, signal_b=0.0)
    res = st.hierarchical_bootstrap(a, a, n_boot=200, seed=0)
    assert res["diff"] == 0.0 and res["low"] <= 0.0 <= res["high"]
    assert res["p_two"] == 1.0 and res["p_one"] == 1.0


def test_hierarchical_bootstrap_includes_patient_variance(st):
    """Seeds that agree (the same small test pool, nearly the same predictions): the seed
    t-interval is tiny, the hierarchical interval keeps the test-patient variance."""
    rng = np.random.default_rng(4)
    n = 60
    y = rng.integers(0, 2, n)
    ids = np.arange(n)
    base_a, base_b = informative(rng, y, 2, 1.5), informative(rng, y, 2, 0.8)
    a, b = [], []
    for _ in range(6):
        a.append(st.Preds(ids=ids, y=y, probs=np.clip(base_a + rng.normal(0, 1e-3, (n, 2)), 0, 1)))
        b.append(st.Preds(ids=ids, y=y, probs=np.clip(base_b + rng.normal(0, 1e-3, (n, 2)), 0, 1)))
    diffs = np.array(
        [
            st.fast_auroc(p.y, p.probs) - st.fast_auroc(q.y, q.probs)
            for p, q in zip(a, b, strict=True)
        ]
    )
    seed_only = st.seed_interval(diffs)
    res = st.hierarchical_bootstrap(a, b, n_boot=500, seed=0)
    assert res["high"] - res["low"] > 5 * (seed_only["high"] - seed_only["low"])
    assert res["low"] < seed_only["low"] and res["high"] > seed_only["high"]


def test_hierarchical_bootstrap_aligns_by_id_and_rejects_mismatches(st):
    rng = np.random.default_rng(5)
    a, b = make_seeds(st, rng, seeds=3, n=90, c=3, signal_a=1.0, signal_b=0.5)
    shuffled = []
    for q in b:
        perm = rng.permutation(len(q.ids))
        shuffled.append(st.Preds(ids=q.ids[perm], y=q.y[perm], probs=q.probs[perm]))
    ref = st.hierarchical_bootstrap(a, b, n_boot=150, seed=7)
    assert st.hierarchical_bootstrap(a, shuffled, n_boot=150, seed=7) == ref
    assert st.hierarchical_bootstrap(a, b, n_boot=150, seed=8) != ref

    other = list(b)
    q = b[1]
    other[1] = st.Preds(ids=np.array(["x"] + q.ids[1:].tolist()), y=q.y, probs=q.probs)
    with pytest.raises(ValueError, match="missing from b"):
        st.hierarchical_bootstrap(a, other, n_boot=10)
    with pytest.raises(ValueError, match="seeds"):
        st.hierarchical_bootstrap(a, b[:2], n_boot=10)
    short = list(b)
    short[0] = st.Preds(ids=q.ids[:-1], y=q.y[:-1], probs=q.probs[:-1])
    with pytest.raises(ValueError, match="same patients"):
        st.hierarchical_bootstrap(a, short, n_boot=10)
    relabelled = list(b)
    relabelled[0] = st.Preds(ids=b[0].ids, y=(b[0].y + 1) % 3, probs=b[0].probs)
    with pytest.raises(ValueError, match="labels"):
        st.hierarchical_bootstrap(a, relabelled, n_boot=10)
    duplicated = list(a)
    duplicated[2] = st.Preds(ids=np.array([a[2].ids[0]] * 90), y=a[2].y, probs=a[2].probs)
    with pytest.raises(ValueError, match="duplicate"):
        st.hierarchical_bootstrap(duplicated, b, n_boot=10)


def test_fast_path_equals_explicit_resampling(st):
    """The weighted-AUROC path and a generic metric on explicit resamples (same draws) agree."""
    rng = np.random.default_rng(6)
    a, b = make_seeds(st, rng, seeds=3, n=40, c=3, signal_a=1.0, signal_b=0.3)
    fast = st.hierarchical_bootstrap(a, b, n_boot=60, seed=3)
    slow = st.hierarchical_bootstrap(a, b, n_boot=60, seed=3, metric=lambda y, p: sk_auroc(y, p))
    assert fast.keys() == slow.keys()
    for key in fast:
        assert fast[key] == pytest.approx(slow[key], abs=1e-10)


def test_invalid_resamples_are_dropped(st):
    """A tiny test set with one patient of class 1: many resamples lack it."""
    y = np.array([0] * 9 + [1])
    rng = np.random.default_rng(7)
    a = [st.Preds(ids=np.arange(10), y=y, probs=rng.dirichlet([1, 1], 10)) for _ in range(2)]
    b = [st.Preds(ids=np.arange(10), y=y, probs=rng.dirichlet([1, 1], 10)) for _ in range(2)]
    res = st.hierarchical_bootstrap(a, b, n_boot=300, seed=0)
    assert 0 < res["n_valid"] < 300 and math.isfinite(res["low"])
    assert res["p_one"] >= 1 / (res["n_valid"] + 1)


def test_bootstrap_speed_small_version(st):
    """A scaled-down version of the 10 seeds x 2,000 patients x 3 classes x 2,000 replicates
    case (about 6 s by hand, see the module docstring): 1/40 of the work."""
    rng = np.random.default_rng(8)
    a, b = make_seeds(st, rng, seeds=5, n=1000, c=3, signal_a=1.0, signal_b=0.8)
    start = time.perf_counter()
    res = st.hierarchical_bootstrap(a, b, n_boot=400, seed=0)
    elapsed = time.perf_counter() - start
    assert res["n_valid"] == 400 and res["low"] < res["diff"] < res["high"]
    assert elapsed < 15.0


def test_bootstrap_patients(st):
    rng = np.random.default_rng(9)
    a, b = make_seeds(st, rng, seeds=1, n=200, c=2, signal_a=2.5, signal_b=0.0)
    res = st.bootstrap_patients(a[0], b[0], n_boot=300, seed=0)
    assert np.isclose(
        res["diff"], st.fast_auroc(a[0].y, a[0].probs) - st.fast_auroc(b[0].y, b[0].probs)
    )
    assert res["low"] > 0 and res["p_two"] == pytest.approx(2 / 301)
    same = st.bootstrap_patients(a[0], a[0], n_boot=100)
    assert same["diff"] == 0.0 and same["low"] <= 0 <= same["high"] and same["p_two"] == 1.0


# ------------------------------------------------------------------------------------ table


@pytest.fixture(scope="module")
def table(st):
    rng = np.random.default_rng(11)
    strong_a, noise = make_seeds(st, rng, seeds=5, n=300, c=3, signal_a=2.5, signal_b=0.0)
    preds = {"strong": strong_a, "noise": noise}
    contrasts = [
        st.Contrast("real effect", "g1", "strong", "noise", "superiority", goal=0.02),
        st.Contrast("same method", "g1", "strong", "strong", "noninferiority", margin=0.01),
        st.Contrast("goal too high", "g2, with | pipe", "strong", "noise", "superiority", goal=0.9),
        st.Contrast("reversed", "g2", "noise", "strong", "superiority", goal=0.02),
        st.Contrast("reversed ni", "g2", "noise", "strong", "noninferiority", margin=0.01),
    ]
    return st.contrast_table(contrasts, lambda c, method: preds[method], n_boot=300, seed=0)


def test_contrast_table_verdicts(st, table):
    assert list(table.columns) == st.COLUMNS
    assert table["verdict"].tolist() == [
        "met",
        "non-inferior",
        "better, below goal",
        "worse",
        "worse",
    ]
    assert (table["p_holm"] >= table["p_boot"] - 1e-15).all()
    assert (table["adj_low"] <= table["boot_low"]).all()
    assert (table["adj_high"] >= table["boot_high"]).all()
    row = table.iloc[0]
    assert row["seeds"] == 5 and row["diff"] > 0.3
    assert np.isclose(row["diff"], row["mean_a"] - row["mean_b"])
    assert row["seed_low"] < row["diff"] < row["seed_high"]
    same = table.iloc[1]
    assert same["diff"] == 0.0 and same["p_boot"] == pytest.approx(1 / 301)
    assert same["p_seed"] == 0.0  # every seed's difference is exactly 0 > -0.01


def test_contrast_kind_is_checked(st):
    with pytest.raises(ValueError, match="kind"):
        st.Contrast("x", "g", "a", "b", "equivalence")


def test_markdown_table(st, table):
    text = st.markdown_table(table, digits=3)
    lines = text.strip().split("\n")
    assert len(lines) == 2 + len(table)
    assert lines[0] == "| " + " | ".join(st.COLUMNS) + " |"
    assert lines[1].count("---") == len(st.COLUMNS)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    row = dict(zip(st.COLUMNS, cells, strict=True))
    assert row["diff"].startswith("+") and len(row["diff"].split(".")[1]) == 3
    assert row["mean_a"] == f"{table.iloc[0]['mean_a']:.3f}" and row["goal"] == "0.020"
    assert row["p_boot"] == f"{table.iloc[0]['p_boot']:.3g}" and row["seeds"] == "5"
    assert "g2, with \\| pipe" in lines[4]
    frame = pd.DataFrame({"name": ["x"], "diff": [math.nan], "p_holm": [0.000123456]})
    assert st.markdown_table(frame).split("\n")[2] == "| x |  | 0.000123 |"
    neg = pd.DataFrame({"boot_low": [-0.01234], "other": [1.5]})
    assert st.markdown_table(neg).split("\n")[2] == "| -0.0123 | 1.5000 |"


# ------------------------------------------------------------------------------------ files


def test_predictions_round_trip_with_appending(st, tmp_path):
    rng = np.random.default_rng(12)
    path = tmp_path / "predictions.csv.gz"
    runs = []
    for method, seed, c in [("a", 0, 2), ("b", 0, 3), ("a", 1, 2), ("b", 1, 3)]:
        y = rng.integers(0, c, 15)
        ids = np.array([f"{i:03d}" for i in range(15)]) if c == 2 else np.arange(15)
        runs.append(
            {
                "dataset": "NA",
                "method": method,
                "seed": seed,
                "ids": ids,
                "y": y,
                "probs": rng.dirichlet(np.ones(c), 15),
            }
        )
    st.save_predictions(runs[:1], path)  # binary only: header p0, p1
    st.save_predictions(runs[1:2], path)  # needs p2: the file is rewritten wider
    st.save_predictions(runs[2:], path)  # fits the header: appended as a new gzip member
    with open(path, "rb") as handle:
        assert handle.read().count(b"\x1f\x8b\x08") >= 2
    with gzip.open(path, "rt") as handle:
        assert handle.readline().strip() == "dataset,method,seed,id,y,p0,p1,p2"

    frame = st.load_predictions(path)
    assert len(frame) == 60 and frame["id"].map(type).eq(str).all()
    assert (frame["dataset"] == "NA").all() and frame["seed"].dtype.kind == "i"
    for run in runs:
        rows = frame[(frame["method"] == run["method"]) & (frame["seed"] == run["seed"])]
        got = st.preds_from_frame(rows)
        assert got.ids.tolist() == np.asarray(run["ids"]).astype(str).tolist()
        assert np.array_equal(got.y, run["y"])
        assert got.probs.shape == run["probs"].shape
        assert np.abs(got.probs - run["probs"]).max() <= 5e-6 + 1e-12
    first = st.preds_from_frame(frame[(frame["method"] == "a") & (frame["seed"] == 0)])
    assert first.ids[0] == "000"

    with pytest.raises(ValueError, match="clashes"):
        st.save_predictions(
            [{"id": 1, "ids": [1, 2], "y": [0, 1], "probs": np.eye(2)}], tmp_path / "bad.csv.gz"
        )
