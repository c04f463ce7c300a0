"""The evidence study's own machinery (benchmarks/study.py): missingness injection, the
classical baselines, one OmniFuse run on cached features, and the goal verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from omnifuse_cli.config import TrainConfig
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("study", "omnifuse_study")


@pytest.fixture(scope="module")
def wdbc(study):
    return study.wdbc_dataset()


def test_wdbc_is_three_vector_modalities_of_ten(wdbc):
    cohort = wdbc.cohort
    assert cohort.names == ["mean", "error", "worst"]
    assert len(cohort) == 569 and set(cohort.labels) == {0, 1}
    assert all(cohort.vectors[n].shape == (569, 10) for n in cohort.names)
    assert cohort.vector_columns["worst"][0] == "worst_radius"


def test_inject_missing_hides_values_keeps_one_and_is_seeded(study, wdbc):
    cohort = wdbc.cohort
    out = study.inject_missing(cohort, 0.6, seed=3)
    assert out.present.any(axis=1).all()  # nobody loses every modality
    hidden_share = 1 - out.present.mean()
    assert 0.45 < hidden_share < 0.65  # 0.6 per modality, minus the kept ones
    for k, name in enumerate(cohort.names):
        gone = ~out.present[:, k]
        assert np.isnan(out.vectors[name][gone]).all()
        assert not np.isnan(out.vectors[name][~gone]).any()
    assert cohort.present.all() and not np.isnan(cohort.vectors["mean"]).any()  # untouched
    again = study.inject_missing(cohort, 0.6, seed=3)
    assert (again.present == out.present).all()
    assert (study.inject_missing(cohort, 0.6, seed=4).present != out.present).any()
    assert study.inject_missing(cohort, 0.0, seed=3) is cohort


@pytest.mark.parametrize("variant", ["hgb", "logreg"])
def test_classical_baselines_learn_wdbc_with_missing_values(study, wdbc, variant):
    rows = study.classical_run(wdbc, variant, seed=0, rate=0.5)
    assert [r["split"] for r in rows] == ["val", "test"]
    test = rows[1]
    assert test["n"] == 57
    assert test["auroc"] > 0.9  # WDBC is easy even with half of every modality hidden


def test_omnifuse_run_on_cached_image_features(study, tmp_path):
    ds = study.synth_dataset("tiny", "tiny", tmp_path, 30, image_size=64)
    assert ds.n_images > 0 and len(ds.image_cache["us"]) == 30
    cfg = TrainConfig(seed=0, device="cpu", epochs=2)
    rows = study.omnifuse_run(ds, "full OmniFuse", 0, 0.5, train=cfg)
    assert {(r["split"], r["rule"]) for r in rows} == {
        (s, r) for s in ("val", "test") for r in study.RULES
    }
    assert all(0.0 <= r["acc"] <= 1.0 and r["best_epoch"] in (1, 2) for r in rows)
    concat = study.omnifuse_run(ds, "concat", 0, 0.5, train=cfg)
    assert {r["rule"] for r in concat} == {"joint"}  # no modality heads without DWFuse


def test_goal_table_says_no_when_omnifuse_falls_behind(study):
    def row(method, rate, auc, std=0.01):
        return {
            "method": method,
            "rate": rate,
            "seeds": 5,
            "auroc_mean": auc,
            "auroc_std": std,
            "f1_mean": auc,
            "f1_std": std,
        }

    curves = pd.DataFrame(
        [
            row("OmniFuse (full)", 0.0, 0.90),
            row("HistGradientBoosting (NaN)", 0.0, 0.89),
            row("mean-impute + indicators + LogReg", 0.0, 0.80),
            row("concat fusion", 0.0, 0.88),
            row("OmniFuse (full)", 0.6, 0.80),
            row("HistGradientBoosting (NaN)", 0.6, 0.85),
            row("mean-impute + indicators + LogReg", 0.6, 0.70),
            row("concat fusion", 0.6, 0.795),
        ]
    )
    goal = study.goal_table(curves).set_index("rate")
    assert goal.loc["0.0", "matches (within spread)"] == "yes"
    assert goal.loc["0.6", "matches (within spread)"] == "NO"
    assert goal.loc["0.6", "beats concat clearly (r ≥ 0.5)"] == "NO"  # +0.005 is within spread
    assert goal.loc["0.6", "best classical"].startswith("0.850 (HistGradientBoosting")


# -- the powered study (benchmarks/power.py) -------------------------------------------------


@pytest.fixture(scope="module")
def power(study):
    return load_benchmark("power", "omnifuse_power")


def test_holm_matches_hand_computation(power):
    # p sorted: 0.01 (x4 -> 0.04), 0.02 (x3 -> 0.06), 0.03 (x2 -> 0.06, monotone), 0.5 (x1)
    assert power.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert power.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_paired_difference_interval(power):
    a = pd.Series([0.80, 0.82, 0.81, 0.83], index=[0, 1, 2, 3])
    b = pd.Series([0.79, 0.80, 0.80, 0.81, 0.5], index=[0, 1, 2, 3, 9])  # seed 9 unpaired
    d = power.paired(a, b)
    diff = np.array([0.01, 0.02, 0.01, 0.02])
    half = 3.182446 * diff.std(ddof=1) / 2  # t(0.975, 3) * SE
    assert d["seeds"] == 4 and d["diff"] == pytest.approx(0.015)
    assert d["low"] == pytest.approx(0.015 - half) and d["high"] == pytest.approx(0.015 + half)
    assert 0 < d["p"] < 0.05


def test_test_masks_are_nested_and_keep_one_modality(power):
    rng = np.random.default_rng(0)
    present = rng.random((500, 3)) > 0.3
    present[~present.any(axis=1), 0] = True
    masks = power.test_masks(present, ["a", "b", "c"], seed=1)
    assert (masks[0.0] == present).all()
    for low, high in zip(power.RATES[:-1], power.RATES[1:], strict=True):
        assert (masks[high] <= masks[low]).all()  # hidden at a rate stays hidden above it
        assert masks[high].any(axis=1).all()
    hidden = 1 - masks[0.5][present].mean()
    assert 0.35 < hidden < 0.5  # 0.5 per present modality, minus those kept
    again = power.test_masks(present, ["a", "b", "c"], seed=1)
    assert all((again[r] == masks[r]).all() for r in power.RATES)


def test_contrasts_and_verdicts_on_made_up_runs(power):
    rows = []
    for seed in range(10):
        for rate in power.RATES:
            for variant, auc in (
                ("full", 0.90 + 0.03 * (rate >= 0.7)),
                (power.NO_IMP, 0.90),
                ("concat", 0.90),
                ("hgb", 0.80),
                ("logreg", 0.85),
            ):
                rows.append(
                    {
                        "dataset": "shared",
                        "regime": "own",
                        "variant": variant,
                        "seed": seed,
                        "split": "test",
                        "rate": rate,
                        "auroc": auc + 0.002 * ((seed * 7 + len(variant)) % 3),
                    }
                )
    table = power.contrast_table(pd.DataFrame(rows)).set_index("contrast")
    imputation = table.loc["imputation at high missing rates"]
    assert imputation["diff"] == pytest.approx(0.03, abs=0.003)
    assert imputation["verdict"] == "met" and imputation["p_holm"] < 0.05
    classical = table.loc["full vs best classical, rates >= 0.5"]
    assert classical["b"] == "best classical (logreg)" and classical["verdict"] == "met"
    # Only the declared contrasts whose variants were run appear.
    assert set(table.index) == {
        "imputation at high missing rates",
        "full vs best classical, rates >= 0.5",
        "full vs best classical (own missingness)",
    }
