"""`omnifuse evaluate`'s extended outputs: simulated missingness, patterns, CIs, calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from omnifuse_cli.cli.app import app
from omnifuse_cli.engine.evaluation import EvalRequest, evaluate_run, simulate_missing
from omnifuse_cli.engine.metrics import auprc, bootstrap_ci, expected_calibration_error
from omnifuse_cli.errors import ConfigError

NAMES = ["labs", "us", "text"]


def test_simulate_missing_drops_a_modality_and_excludes_patients_left_with_nothing() -> None:
    present = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]], dtype=bool)
    out, empty = simulate_missing(present, NAMES, ("us",), 0.0, seed=0)
    assert out.tolist() == [[True, False, False], [False, False, False], [True, False, True]]
    assert empty.tolist() == [False, True, False]


def test_simulate_missing_rate_keeps_one_modality_and_is_seeded() -> None:
    present = np.ones((2000, 3), dtype=bool)
    out, empty = simulate_missing(present, NAMES, (), 0.5, seed=3)
    assert not empty.any() and out.any(axis=1).all()
    assert not (out & ~present).any()
    assert 0.40 < 1 - out.mean() < 0.50  # a bit under 0.5: everyone keeps at least one
    again, _ = simulate_missing(present, NAMES, (), 0.5, seed=3)
    other, _ = simulate_missing(present, NAMES, (), 0.5, seed=4)
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_simulate_missing_rejects_unknown_names_and_rates() -> None:
    present = np.ones((2, 3), dtype=bool)
    with pytest.raises(ConfigError, match="ct is not a modality") as error:
        simulate_missing(present, NAMES, ("ct",), 0.0, seed=0)
    assert error.value.hint is not None and "labs, us, text" in error.value.hint
    with pytest.raises(ConfigError, match="--missing-rate must be in"):
        simulate_missing(present, NAMES, (), 1.0, seed=0)


def test_expected_calibration_error_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    # bin (0.8, 0.9]: 2 right at confidence 0.9 -> |1 - 0.9|; bin (0.5, 0.6]: wrong at 0.6;
    # bin (0.6, 0.7]: right at 0.7.
    expected = 0.5 * 0.1 + 0.25 * 0.6 + 0.25 * 0.3
    assert expected_calibration_error(y, probs) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), perfect) == pytest.approx(0.0)


def test_auprc_is_macro_one_vs_rest_average_precision() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    expected = np.mean([average_precision_score(y == c, probs[:, c]) for c in range(3)])
    assert auprc(y, probs) == pytest.approx(expected)
    assert auprc(np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])) == (
        pytest.approx(average_precision_score([0, 1, 1], [0.2, 0.7, 0.4]))
    )


def test_bootstrap_intervals_bracket_the_estimate_and_narrow_with_more_patients() -> None:
    rng = np.random.default_rng(1)

    def cohort(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        probs = np.full((n, 3), 0.2)
        probs[np.arange(n), y] = 0.6  # right about 70% of the time after the swap below
        swap = rng.random(n) < 0.3
        probs[swap] = probs[swap][:, ::-1]
        return y, probs

    y, probs = cohort(60)
    ci = bootstrap_ci(y, probs, 3, n=300, seed=0)
    acc = float((probs.argmax(1) == y).mean())
    assert ci["acc"][0] <= acc <= ci["acc"][1]
    assert ci == bootstrap_ci(y, probs, 3, n=300, seed=0)
    y_big, probs_big = cohort(2000)
    big = bootstrap_ci(y_big, probs_big, 3, n=300, seed=0)
    assert big["acc"][1] - big["acc"][0] < (ci["acc"][1] - ci["acc"][0]) / 3
    assert bootstrap_ci(y, probs, 3, n=0, seed=0) == {}


def test_evaluate_writes_patterns_and_intervals(trained_run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    result = evaluate_run(
        EvalRequest(run_dir=run_dir, device="cpu", bootstrap=50, out_dir=tmp_path / "eval")
    )
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert {"auroc", "macro_f1", "acc", "auprc", "ece", "brier"} <= set(metrics["metric"])
    row = metrics.set_index("metric").loc["acc"]
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    patterns = pd.read_csv(tmp_path / "eval" / "patterns.csv", keep_default_na=False)
    assert patterns["n"].sum() == result.n
    assert set(patterns["present"]) <= {
        "+".join(c)
        for c in [
            ("labs",),
            ("us",),
            ("text",),
            ("labs", "us"),
            ("labs", "text"),
            ("us", "text"),
            ("labs", "us", "text"),
        ]
    }


def test_evaluate_cli_drop_modality(trained_run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--drop-modality",
            "us",
            "--bootstrap",
            "20",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "with us dropped" in result.output
    patterns = pd.read_csv(out / "patterns.csv", keep_default_na=False)
    assert not patterns["present"].str.contains("us").any()
    bad = runner.invoke(
        app, ["evaluate", str(run_dir), "--drop-modality", "ct"], env={"COLUMNS": "200"}
    )
    assert bad.exit_code == 2
    assert "ct is not a modality" in bad.output and "Traceback" not in bad.output
