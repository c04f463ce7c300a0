"""engine/calibration.py, thresholds.py, conformal.py and subgroups.py: temperature scaling,
calibration, operating points, decision curves, conformal prediction sets and subgroup tables,
checked against hand values, scikit-learn and simulations whose answer is known."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, log_softmax, logit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from omnifuse_cli.engine.calibration import (
    apply_temperature,
    calibration_slope_intercept,
    calibration_summary,
    fit_temperature,
)
from omnifuse_cli.engine.conformal import ConformalCalibration, coverage_table
from omnifuse_cli.engine.metrics import expected_calibration_error, full_metrics, metric_value
from omnifuse_cli.engine.subgroups import (
    SMALL_SUBGROUP,
    SubgroupSpec,
    band,
    parse_subgroup,
    subgroup_gaps,
    subgroup_table,
)
from omnifuse_cli.engine.thresholds import (
    DEFAULT_THRESHOLDS,
    THRESHOLD_RULES,
    ThresholdRule,
    choose_threshold,
    decision_curve,
    operating_point,
    operating_point_ci,
    parse_threshold_rule,
)
from omnifuse_cli.errors import ConfigError


def draw_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One class per row drawn from that row's probabilities."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(log_probs, axis=1)[np.arange(len(y)), y].mean())


# -- temperature scaling -----------------------------------------------------------------------


def test_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6000, 3)) * 1.5
    y = draw_labels(rng, softmax(logits, axis=1))
    model = 3 * logits
    t = fit_temperature(model, y)
    assert abs(t - 3) < 0.3
    scaled = apply_temperature(model, t)
    assert nll(scaled, y) <= nll(model, y)
    np.testing.assert_array_equal(scaled.argmax(axis=1), model.argmax(axis=1))
    np.testing.assert_allclose(np.exp(scaled).sum(axis=1), 1.0)


def test_temperature_is_one_when_calibrated_and_binary() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20000, 2)) * 2
    y = draw_labels(rng, softmax(logits, axis=1))
    assert abs(fit_temperature(logits, y) - 1) < 0.06
    # T == 1 only renormalises.
    np.testing.assert_allclose(apply_temperature(logits, 1.0), log_softmax(logits, axis=1))
    with pytest.raises(ConfigError):
        apply_temperature(logits, 0.0)


# -- calibration intercept and slope -----------------------------------------------------------


def test_slope_matches_unpenalised_logistic_regression() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.02, 0.98, 500)
    y = rng.random(500) < expit(0.3 + 0.7 * logit(p))
    a, b = calibration_slope_intercept(y, p)
    # penalty=None is deprecated from scikit-learn 1.8; C=inf is the same model.
    ref = LogisticRegression(C=np.inf, max_iter=1000).fit(logit(p)[:, None], y.astype(int))
    assert b == pytest.approx(float(ref.coef_[0, 0]), abs=1e-4)
    # And independently: the score equations of y ~ a' + b logit p hold at the slope's MLE,
    # and the intercept solves the offset model's score equation.
    x = logit(p)
    resid = y - expit(float(ref.intercept_[0]) + b * x)
    assert abs(resid.sum()) < 1e-2 and abs((resid * x).sum()) < 1e-2
    assert abs((y - expit(a + x)).sum()) < 1e-8


def test_calibration_known_answers() -> None:
    rng = np.random.default_rng(3)
    p_true = expit(rng.normal(0, 1.5, 20000))
    y = rng.random(20000) < p_true
    a, b = calibration_slope_intercept(y, p_true)
    assert abs(a) < 0.06 and abs(b - 1) < 0.06
    _, b_over = calibration_slope_intercept(y, expit(2 * logit(p_true)))
    assert abs(b_over - 0.5) < 0.04
    a_up, _ = calibration_slope_intercept(y, expit(logit(p_true) + 1))
    assert a_up == pytest.approx(-1, abs=0.08)
    assert all(math.isnan(v) for v in calibration_slope_intercept(np.zeros(5, bool), p_true[:5]))


def test_calibration_summary_binary_and_multiclass() -> None:
    rng = np.random.default_rng(4)
    probs2 = rng.dirichlet([1, 1], 300)
    y2 = draw_labels(rng, probs2)
    out2 = calibration_summary(y2, probs2, 2)
    ref = full_metrics(y2, probs2, 2)
    assert out2["ece"] == pytest.approx(ref["ece"]) and out2["brier"] == pytest.approx(ref["brier"])
    assert out2["loss"] == pytest.approx(ref["loss"])
    a, b = calibration_slope_intercept(y2 == 1, probs2[:, 1])
    assert (out2["cal_intercept"], out2["cal_slope"]) == (a, b)

    probs3 = rng.dirichlet([1, 1, 1], 300)
    y3 = draw_labels(rng, probs3)
    out3 = calibration_summary(y3, probs3, 3, class_names=["benign", "suspect", "malignant"])
    assert "cal_slope" not in out3
    assert out3["ece"] == pytest.approx(expected_calibration_error(y3, probs3))
    a, b = calibration_slope_intercept(y3 == 2, probs3[:, 2])
    assert out3["cal_intercept_malignant"] == a and out3["cal_slope_malignant"] == b
    assert set(calibration_summary(y3, probs3, 3)) >= {"cal_slope_0", "cal_slope_1", "cal_slope_2"}


# -- operating points --------------------------------------------------------------------------

# Six patients, scores ascending; positives at 0.3, 0.5, 0.6.
Y6 = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
S6 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


@pytest.mark.parametrize(
    ("text", "threshold"),
    [
        ("youden", 0.5),  # J = 2/3 at 0.5 and at 0.3: the higher wins
        ("f1", 0.3),  # F1 6/7
        ("sens=0.9", 0.3),
        ("sens=0.6", 0.5),  # 2/3 at 0.5 and 0.4: the highest
        ("spec=0.6", 0.3),  # 2/3 at 0.4 and 0.3: the lowest
        ("spec=0.9", 0.5),
        ("ppv=0.7", 0.3),  # PPV 3/4 at 0.3 (2/3 at 0.4 in between)
        ("ppv=0.999", 0.5),  # PPV 1 at 0.6 and 0.5: the lowest
        ("npv=0.9", 0.3),  # NPV 1 at 0.3 and 0.2: the highest
        ("npv=0.7", 0.5),
    ],
)
def test_choose_threshold_by_hand(text: str, threshold: float) -> None:
    assert choose_threshold(Y6, S6, parse_threshold_rule(text)) == (threshold, True)


def test_unattainable_targets() -> None:
    y = np.array([1, 0, 1, 0, 1, 0], dtype=bool)  # the top score is a negative
    s = np.array([0.2, 0.9, 0.7, 0.3, 0.5, 0.1])
    thr, met = choose_threshold(y, s, parse_threshold_rule("ppv=0.999"))
    # PPV peaks at 2/3 (threshold 0.5): the largest value achieved, at its lowest threshold.
    ppvs = {t: operating_point(y, s, t)["ppv"] for t in s}
    best = max(ppvs.values())
    assert not met and ppvs[thr] == best and thr == min(t for t, v in ppvs.items() if v == best)
    thr, met = choose_threshold(y, s, parse_threshold_rule("spec=0.99"))
    # Specificity peaks at 2/3 (thresholds 0.9, 0.7 and 0.5): the lowest, as when met.
    assert not met and thr == 0.5
    with pytest.raises(ConfigError):
        choose_threshold(np.ones(4, bool), s[:4], ThresholdRule("youden"))


def test_operating_point_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.3
    s = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1)
    for t in (0.2, 0.5, 0.8):
        op = operating_point(y, s, t)
        pred = s >= t
        tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
        assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (tp, fp, tn, fn)
        assert op["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert op["specificity"] == pytest.approx(recall_score(~y, ~pred))
        assert op["ppv"] == pytest.approx(precision_score(y, pred))
        assert op["npv"] == pytest.approx(precision_score(~y, ~pred))
        assert op["f1"] == pytest.approx(f1_score(y, pred))
        assert op["threshold"] == t
    nobody = operating_point(y, s, 2.0)
    assert math.isnan(nobody["ppv"]) and nobody["sensitivity"] == 0.0


def test_youden_and_f1_on_random_data_are_optimal() -> None:
    rng = np.random.default_rng(6)
    y = rng.random(200) < 0.4
    s = np.round(0.25 * y + rng.random(200) * 0.75, 2)  # ties in the scores
    for rule, key in (("youden", None), ("f1", "f1")):
        thr, _ = choose_threshold(y, s, parse_threshold_rule(rule))

        def value(t: float, key: str | None = key) -> float:
            op = operating_point(y, s, t)
            return op[key] if key else op["sensitivity"] + op["specificity"] - 1

        assert value(thr) >= max(value(t) for t in np.unique(s)) - 1e-12
    thr, met = choose_threshold(y, s, parse_threshold_rule("sens=0.8"))
    assert met and operating_point(y, s, thr)["sensitivity"] >= 0.8
    higher = np.unique(s)[np.unique(s) > thr]
    assert all(operating_point(y, s, t)["sensitivity"] < 0.8 for t in higher)


def test_operating_point_ci() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(300) < 0.4
    s = 0.3 * y + rng.random(300) * 0.7
    ci = operating_point_ci(y, s, 0.5, n=200, seed=0)
    op = operating_point(y, s, 0.5)
    assert set(ci) == {"sensitivity", "specificity", "ppv", "npv", "f1"}
    for k, (lo, hi) in ci.items():
        assert lo <= op[k] <= hi and hi - lo < 0.3
    assert ci == operating_point_ci(y, s, 0.5, n=200, seed=0)
    assert operating_point_ci(y, s, 0.5, n=0, seed=0) == {}


def test_parse_threshold_rule() -> None:
    assert THRESHOLD_RULES == ("youden", "f1", "sens", "spec", "ppv", "npv")
    assert parse_threshold_rule(" Youden ") == ThresholdRule("youden")
    assert parse_threshold_rule("SENS = 0.90") == ThresholdRule("sens", 0.9)
    assert str(parse_threshold_rule("sens=0.90")) == "sens=0.9"
    assert str(parse_threshold_rule("f1")) == "f1"
    assert parse_threshold_rule("npv=0.95").target == 0.95
    for bad in (
        "sens",
        "sens=1",
        "spec=0",
        "ppv=abc",
        "accuracy=0.9",
        "",
        "youden=0.5",
        "sens=-0.2",
        "sens=nan",
    ):
        with pytest.raises(ConfigError) as err:
            parse_threshold_rule(bad)
        assert "sens=" in (err.value.hint or "")


# -- decision curves ---------------------------------------------------------------------------


def test_decision_curve_by_hand() -> None:
    y = np.array([1, 0, 1, 0, 0], dtype=bool)
    s = np.array([0.9, 0.6, 0.4, 0.3, 0.1])
    dc = decision_curve(y, s, np.array([0.25, 0.5]))
    assert list(dc.columns) == [
        "threshold",
        "net_benefit",
        "treat_all",
        "treat_none",
        "tp",
        "fp",
        "n",
    ]
    # 0.25: treated 0.9, 0.6, 0.4, 0.3 -> TP 2, FP 2; odds 1/3.
    assert dc["tp"].tolist() == [2, 1] and dc["fp"].tolist() == [2, 1]
    np.testing.assert_allclose(dc["net_benefit"], [2 / 5 - 2 / 5 / 3, 1 / 5 - 1 / 5])
    np.testing.assert_allclose(dc["treat_all"], [0.4 - 0.6 / 3, 0.4 - 0.6])
    assert (dc["treat_none"] == 0).all() and (dc["n"] == 5).all()
    # At pt = prevalence treating everyone is worth nothing; a score equal to pt is treated.
    at_prev = decision_curve(y, s, np.array([0.4]))
    assert at_prev["treat_all"].iloc[0] == pytest.approx(0.0)
    assert at_prev["tp"].iloc[0] == 2


def test_decision_curve_perfect_classifier_and_defaults() -> None:
    y = np.array([1, 1, 0, 0, 0, 0, 1, 0], dtype=bool)
    dc = decision_curve(y, y.astype(float))
    assert len(dc) == 99 and dc["threshold"].iloc[0] == 0.01 and dc["threshold"].iloc[-1] == 0.99
    np.testing.assert_array_equal(dc["threshold"], DEFAULT_THRESHOLDS)
    np.testing.assert_allclose(dc["net_benefit"], 3 / 8)
    with pytest.raises(ConfigError):
        decision_curve(y, y.astype(float), np.array([0.0, 0.5]))


# -- conformal prediction sets -----------------------------------------------------------------


def simulate(
    rng: np.random.Generator, n: int, num_classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    probs = rng.dirichlet(np.full(num_classes, 0.7), n)
    return draw_labels(rng, probs), probs


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_conformal_marginal_and_class_coverage(alpha: float) -> None:
    rng = np.random.default_rng(8)
    coverage, per_class = [], []
    for _ in range(20):
        y_cal, p_cal = simulate(rng, 2000)
        y_test, p_test = simulate(rng, 20000)
        cal = ConformalCalibration.from_validation(y_cal, p_cal, 3)
        assert cal.class_conditional(alpha)
        sets = cal.sets(p_test, alpha)
        hit = sets[np.arange(len(y_test)), y_test]
        coverage.append(hit.mean())
        per_class.append([hit[y_test == c].mean() for c in range(3)])
    mean = float(np.mean(coverage))
    assert abs(mean - (1 - alpha)) < 0.01 and mean > 1 - alpha - 0.01
    assert np.all(np.abs(np.mean(per_class, axis=0) - (1 - alpha)) < 0.03)


def test_conformal_marginal_when_a_class_is_rare() -> None:
    rng = np.random.default_rng(9)
    coverage = []
    for _ in range(20):
        y_cal, p_cal = simulate(rng, 2000)
        keep = (y_cal != 2) | (np.cumsum(y_cal == 2) <= 10)  # only 10 of class 2
        cal = ConformalCalibration.from_validation(y_cal[keep], p_cal[keep], 3)
        assert not cal.class_conditional(0.1)
        q = cal.quantiles(0.1)
        assert q[0] == q[1] == q[2]
        y_test, p_test = simulate(rng, 20000)
        coverage.append(cal.sets(p_test, 0.1)[np.arange(20000), y_test].mean())
    assert abs(np.mean(coverage) - 0.9) < 0.01


def test_conformal_quantile_by_hand() -> None:
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    probs = np.column_stack([1 - scores, scores])
    cal = ConformalCalibration.from_validation(np.zeros(9, int), probs, 2)
    np.testing.assert_allclose(cal.scores, np.sort(scores))
    assert ConformalCalibration.min_per_class(0.2) == 20
    assert ConformalCalibration.min_per_class(0.05) == 40
    assert not cal.class_conditional(0.2)
    np.testing.assert_allclose(cal.quantiles(0.2), [0.8, 0.8])  # ceil(10 * 0.8) = 8th smallest
    np.testing.assert_allclose(cal.quantiles(0.5), [0.5, 0.5])  # ceil(10 * 0.5) = 5th
    assert np.isinf(cal.quantiles(0.05)).all()  # ceil(10 * 0.95) = 10 > 9
    assert cal.sets(np.array([[0.5, 0.5], [0.0, 1.0]]), 0.05).all()
    sets = cal.sets(np.array([[0.2, 0.8], [0.15, 0.85]]), 0.2)
    assert sets.tolist() == [[True, True], [False, True]]  # 1 - 0.2 = 0.8 <= 0.8 is in
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError):
            cal.quantiles(bad)


def test_conformal_sets_can_be_empty() -> None:
    probs = np.tile([0.97, 0.03], (30, 1))
    cal = ConformalCalibration.from_validation(np.zeros(30, int), probs, 2)
    assert cal.sets(np.array([[0.5, 0.5]]), 0.1).tolist() == [[False, False]]


def test_conformal_round_trip() -> None:
    rng = np.random.default_rng(10)
    y_cal, p_cal = simulate(rng, 500)
    cal = ConformalCalibration.from_validation(y_cal, p_cal, 3)
    back = ConformalCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert "subsampled_from" not in cal.to_dict()
    _, p_test = simulate(rng, 5000)
    for alpha in (0.05, 0.1, 0.3):
        np.testing.assert_array_equal(back.sets(p_test, alpha), cal.sets(p_test, alpha))
    assert back.num_classes == 3 and back.class_counts().tolist() == cal.class_counts().tolist()


def test_conformal_subsamples_large_calibration() -> None:
    rng = np.random.default_rng(11)
    y_cal, p_cal = simulate(rng, 50000)
    cal = ConformalCalibration.from_validation(y_cal, p_cal, 3)
    d = cal.to_dict()
    assert d["subsampled_from"] == 50000 and len(d["scores"]) <= 21000
    back = ConformalCalibration.from_dict(json.loads(json.dumps(d)))
    assert back.class_counts().tolist() == cal.class_counts().tolist()
    for alpha in (0.05, 0.1, 0.2):
        assert back.class_conditional(alpha) == cal.class_conditional(alpha)
        np.testing.assert_allclose(back.quantiles(alpha), cal.quantiles(alpha), atol=0.005)
    marginal = ConformalCalibration(cal.scores, np.zeros(50000, int), 3)  # one class: marginal
    again = ConformalCalibration.from_dict(marginal.to_dict())
    assert again.quantiles(0.1)[0] == pytest.approx(marginal.quantiles(0.1)[0], abs=0.002)


def test_coverage_table_by_hand() -> None:
    y = np.array([0, 1, 1, 0])
    sets = np.array([[True, False], [True, True], [False, False], [False, True]])
    table = coverage_table(
        y, sets, {"pattern": np.array(["a", "b", "b", "c"])}, class_names=["benign", "malignant"]
    )
    assert list(table.columns) == ["by", "group", "n", "coverage", "mean_set_size", "empty_sets"]
    rows = {
        (r.by, r.group): (r.n, r.coverage, r.mean_set_size, r.empty_sets)
        for r in table.itertuples()
    }
    assert rows[("all", "all")] == (4, 0.5, 1.0, 1)
    assert rows[("class", "benign")] == (2, 0.5, 1.0, 0)
    assert rows[("class", "malignant")] == (2, 0.5, 1.0, 1)
    assert rows[("pattern", "b")] == (2, 0.5, 1.0, 1)
    assert rows[("pattern", "a")] == (1, 1.0, 1.0, 0)
    assert rows[("pattern", "c")] == (1, 0.0, 1.0, 0)
    assert table["group"].tolist() == ["all", "benign", "malignant", "b", "a", "c"]
    assert coverage_table(y, sets)["group"].tolist() == ["all", "0", "1"]


# -- subgroups ---------------------------------------------------------------------------------


def test_parse_subgroup() -> None:
    assert parse_subgroup("sex") == SubgroupSpec("sex")
    assert parse_subgroup("age:q4") == SubgroupSpec("age", "q4")
    assert parse_subgroup("age:Q3") == SubgroupSpec("age", "q3")
    assert parse_subgroup(" age : 40, 65 ") == SubgroupSpec("age", "40,65")
    assert parse_subgroup("bmi:18.5,25,30") == SubgroupSpec("bmi", "18.5,25,30")
    assert parse_subgroup("visit:baseline") == SubgroupSpec("visit:baseline")
    assert parse_subgroup("a:b:q2") == SubgroupSpec("a:b", "q2")
    assert str(parse_subgroup("age:40,65")) == "age:40,65"
    for bad in ("", "age:q1", "age:q", "age:q2.5", "age:65,40", "age:40,,65", ":q4", "age:40,40"):
        with pytest.raises(ConfigError):
            parse_subgroup(bad)


def test_band_quartiles_and_cuts() -> None:
    ages = pd.Series([1, 2, 3, 4, 5, 6, 7, 8, None], dtype=float)
    q = band(ages, parse_subgroup("age:q4"))
    assert q.tolist() == ["Q1 [1, 2]"] * 2 + ["Q2 [3, 4]"] * 2 + ["Q3 [5, 6]"] * 2 + [
        "Q4 [7, 8]"
    ] * 2 + ["missing"]
    assert list(q.cat.categories) == ["Q1 [1, 2]", "Q2 [3, 4]", "Q3 [5, 6]", "Q4 [7, 8]", "missing"]
    cut = band(pd.Series([30, 40, 50, 64.9, 65, 80, None]), parse_subgroup("age:40,65"))
    assert cut.tolist() == ["<40", "40-<65", "40-<65", "40-<65", ">=65", ">=65", "missing"]
    assert list(cut.cat.categories) == ["<40", "40-<65", ">=65", "missing"]
    same = band(pd.Series([5.0, 5.0, 5.0]), parse_subgroup("x:q4"))
    assert same.tolist() == ["Q1 [5, 5]"] * 3
    text = band(pd.Series(["42", "17", "60"], index=[10, 11, 12]), parse_subgroup("age:q2"))
    assert text.index.tolist() == [10, 11, 12] and text.tolist()[1] == "Q1 [17, 42]"
    sex = band(pd.Series(["F", "M", None, "F"]), parse_subgroup("sex"))
    assert sex.tolist() == ["F", "M", "missing", "F"]
    with pytest.raises(ConfigError, match="'age'.*'unknown'"):
        band(pd.Series([30, "unknown", 50], dtype=object), parse_subgroup("age:q2"))


def subgroup_data() -> tuple[np.ndarray, np.ndarray, pd.Series]:
    rng = np.random.default_rng(12)
    groups = pd.Series(["A"] * 120 + ["B"] * 60 + ["C"] * 20)
    p1 = rng.uniform(0.05, 0.95, 200)
    y = (rng.random(200) < p1).astype(int)
    return y, np.column_stack([1 - p1, p1]), groups


def test_subgroup_table_values() -> None:
    y, probs, groups = subgroup_data()
    table = subgroup_table(y, probs, groups, 2, column="site", n_boot=20, seed=0, op=0.5)
    assert table["group"].tolist() == ["A", "B", "C"]
    assert table["n"].tolist() == [120, 60, 20]
    assert table["small"].tolist() == [False, False, True] and SMALL_SUBGROUP == 30
    assert (table["column"] == "site").all()
    for row in table.itertuples():
        mask = (groups == row.group).to_numpy()
        ym, pm = y[mask], probs[mask]
        assert row.class_counts == f"{(ym == 0).sum()}/{(ym == 1).sum()}"
        for m in ("auroc", "macro_f1", "acc", "brier", "ece"):
            assert getattr(row, m) == pytest.approx(metric_value(m, ym, pm, 2))
            lo, hi = getattr(row, f"{m}_ci_low"), getattr(row, f"{m}_ci_high")
            assert lo <= hi
        assert (row.cal_intercept, row.cal_slope) == calibration_slope_intercept(ym == 1, pm[:, 1])
        op = operating_point(ym == 1, pm[:, 1], 0.5)
        assert row.sensitivity == op["sensitivity"] and row.npv == op["npv"]
        assert row.ppv_ci_low <= row.ppv_ci_high
    no_boot = subgroup_table(y, probs, groups, 2, column="site", n_boot=0, seed=0)
    assert no_boot["auroc_ci_low"].isna().all() and "sensitivity" not in no_boot


def test_subgroup_table_band_order_one_class_and_multiclass() -> None:
    y, probs, _ = subgroup_data()
    ages = pd.Series(np.r_[np.full(150, 70.0), np.full(40, 30.0), np.full(10, 50.0)])
    banded = band(ages, parse_subgroup("age:40,65"))
    table = subgroup_table(y, probs, banded, 2, column="age", n_boot=5, seed=1)
    assert table["group"].tolist() == ["<40", "40-<65", ">=65"]  # band order, not size
    one_class = pd.Series(np.where(y == 1, "pos", "neg"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = subgroup_table(y, probs, one_class, 2, column="y", n_boot=5, seed=0, op=0.5)
    assert t["auroc"].isna().all() and t["cal_slope"].isna().all()
    rng = np.random.default_rng(13)
    p3 = rng.dirichlet([1, 1, 1], 90)
    y3 = draw_labels(rng, p3)
    t3 = subgroup_table(
        y3,
        p3,
        pd.Series(["x", "y", "z"] * 30),
        3,
        column="g",
        n_boot=0,
        seed=0,
        names=("acc", "loss"),
    )
    assert "cal_slope" not in t3 and t3["class_counts"].str.count("/").eq(2).all()
    assert t3["loss"].iloc[0] == pytest.approx(metric_value("loss", y3[::3], p3[::3], 3))
    with pytest.raises(ConfigError):
        subgroup_table(y3, p3, pd.Series(["x"] * 90), 3, column="g", n_boot=0, seed=0, op=0.5)


def test_subgroup_gaps_by_hand() -> None:
    table = pd.DataFrame(
        {
            "column": ["sex"] * 3 + ["site"] * 3,
            "group": ["F", "M", "X", "s1", "s2", "s3"],
            "n": [50, 40, 5, 100, 10, 8],
            "auroc": [0.8, 0.7, 0.99, 0.75, 0.6, math.nan],
            "brier": [0.2, 0.15, 0.01, 0.2, 0.3, 0.1],
            "cal_slope": [0.9, 1.3, 1.0, 1.0, 1.0, 1.0],
        }
    )
    gaps = subgroup_gaps(table, ["auroc", "brier", "cal_slope"])
    got = {
        (r.column, r.metric): (
            r.gap,
            r.best_group,
            r.worst_group,
            r.groups_compared,
            r.includes_small,
        )
        for r in gaps.itertuples()
    }
    assert got[("sex", "auroc")] == pytest.approx((0.1, "F", "M", 2, False))
    assert got[("sex", "brier")] == pytest.approx((0.05, "M", "F", 2, False))
    assert got[("sex", "cal_slope")] == pytest.approx((0.4, "F", "M", 2, False))
    # site: one group of n >= 30, so every group with a finite value is compared.
    assert got[("site", "auroc")] == pytest.approx((0.15, "s1", "s2", 2, True))
    assert got[("site", "brier")] == pytest.approx((0.2, "s3", "s2", 3, True))
    one = subgroup_gaps(table[table["group"] == "F"], ["auroc"])
    assert math.isnan(one["gap"].iloc[0]) and one["groups_compared"].iloc[0] == 1
