"""--preset, --eval-metric, the cohort-size rule, --bag-folds with the weighted ensemble and
--time-limit (issue 22): what each preset sets and that flags win, and that a bagged run goes
through predict, evaluate, report and cv like any other."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.engine.bagging import fold_ids
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.fitting import selection_key
from omnifuse_cli.engine.presets import adapt_to_cohort, cohort_values, resolve_metric
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.model.bag import BaggedOmniFuse
from omnifuse_cli.settings import PRESETS, build_configs

from .helpers import TINY_RUN, assert_ok, assert_user_error, invoke

ROOT = Path(__file__).resolve().parents[1]
BAG_ARGS = ["--num-classes", "3", "--epochs", "3", *TINY_RUN, "--tla-min-patients", "1"]


# -- presets and flags ----------------------------------------------------------------------


def test_presets_set_what_the_readme_table_says() -> None:
    """The README's table lists each preset's settings; build_configs gives exactly those."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Presets") :]
    section = section[: section.index("\n#", 5)]
    for name, values in PRESETS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}`"))
        for setting, value in values.items():
            flag = "--" + setting.replace("_", "-")
            shown = flag if value is True else f"{flag} {value}"
            assert shown in row, (name, shown, row)
    fast = build_configs({"preset": "fast"})
    assert not fast.method.use_imputation and not fast.method.use_dwfuse
    assert not fast.method.use_tla
    assert (fast.train.epochs, fast.train.patience, fast.train.preset) == (10, 3, "fast")
    best = build_configs({"preset": "best"}).train
    assert (best.bag_folds, best.ensemble) == (5, True)
    medium = build_configs({})
    assert medium.train.preset == "medium" and medium.method.use_tla
    assert (medium.train.bag_folds, medium.train.ensemble) == (0, False)
    assert medium.train.select_metric == "auto"


def test_flags_given_win_over_the_preset() -> None:
    fast = build_configs({"preset": "fast", "epochs": 25, "patience": 0})
    assert (fast.train.epochs, fast.train.patience) == (25, 0)
    assert not fast.method.use_tla  # what was not given still comes from the preset
    best = build_configs({"preset": "best", "bag_folds": 3, "ensemble": False}).train
    assert (best.bag_folds, best.ensemble) == (3, False)
    # what the user gives is left out of the cohort rule; what nobody gave is in it
    assert build_configs({"preset": "fast", "epochs": 25}).train.cohort_defaults == (
        "batch_size",
        "lr",
    )
    assert set(build_configs({}).train.cohort_defaults) == {
        "epochs",
        "batch_size",
        "lr",
        "patience",
    }


def test_bad_presets_and_contradictions_are_refused() -> None:
    with pytest.raises(ConfigError, match="not a preset") as err:
        build_configs({"preset": "bset"})
    assert "did you mean best" in str(err.value.hint)
    with pytest.raises(ConfigError, match="needs --bag-folds"):
        build_configs({"preset": "best", "bag_folds": 0})
    with pytest.raises(ConfigError, match="--bag-folds must be 0"):
        build_configs({"bag_folds": 1})
    with pytest.raises(ConfigError, match="--eval-metric"):
        build_configs({"eval_metric": "f2"})


def test_eval_metric_auto_and_the_older_spelling() -> None:
    # one model on its small validation split: macro-F1 (the validation evidence); a bag:
    # AUROC for two classes, log loss for more
    assert resolve_metric("auto", 2, bagged=False) == "macro_f1"
    assert resolve_metric("auto", 3, bagged=False) == "macro_f1"
    assert resolve_metric("auto", 2, bagged=True) == "auroc"
    assert resolve_metric("auto", 3, bagged=True) == "log_loss"
    assert resolve_metric("loss", 2, bagged=False) == "log_loss"
    assert build_configs({"eval_metric": "balanced_accuracy"}).train.select_metric == (
        "balanced_accuracy"
    )
    # --select-by, when given, wins over --eval-metric
    assert build_configs({"eval_metric": "auroc", "select_by": "loss"}).train.select_metric == (
        "log_loss"
    )
    val = {"loss": 0.5, "acc": 0.8, "macro_f1": 0.7, "balanced_acc": 0.75, "auroc": math.nan}
    worse = {**val, "loss": 0.6}
    # AUROC undefined (a class missing from a small validation split): the log loss decides
    assert selection_key(val, "auroc") > selection_key(worse, "auroc")
    assert selection_key({**val, "balanced_acc": 0.9}, "balanced_accuracy") > selection_key(
        val, "balanced_accuracy"
    )


def test_the_cohort_rule() -> None:
    assert cohort_values(900) == {"batch_size": 32, "lr": 3e-4, "epochs": 30, "patience": 0}
    big = cohort_values(800_000)
    assert big["batch_size"] == 1024 and big["epochs"] == 5 and big["patience"] == 3
    assert 3e-4 < big["lr"] <= 3e-3
    sizes = [cohort_values(n)["batch_size"] for n in (10_000, 50_000, 200_000, 2_000_000)]
    assert sizes == sorted(sizes) and sizes[-1] == 1024
    cfg = build_configs({"batch_size": 64}).train
    adapted, line = adapt_to_cohort(cfg, 800_000, 2)
    assert adapted.batch_size == 64  # given: the rule leaves it alone
    assert adapted.epochs == 5 and adapted.select_metric == "macro_f1"
    assert adapted.cohort_defaults == ()  # resolved once: request.json repeats the same run
    assert "800,000 training patients" in line and "epochs 5" in line
    assert "batch_size" not in line


def test_train_logs_the_settings_and_records_the_preset(
    tmp_path: Path, tiny_manifest: Path
) -> None:
    out = tmp_path / "run"
    result = invoke(
        "train",
        tiny_manifest,
        *BAG_ARGS,
        "--preset",
        "fast",
        "--epochs",
        "2",
        "--eval-metric",
        "balanced_accuracy",
        "--out-dir",
        out,
    )
    assert_ok(result)
    assert "settings for 18 training patients: eval metric balanced_accuracy" in result.output
    meta = pd.read_csv(out / "meta.csv").set_index("key")["value"]
    assert meta["preset"] == "fast" and meta["epochs"] == "2"  # the flag won over fast's 10
    assert meta["use_tla"] == "False" and meta["use_dwfuse"] == "False"
    assert meta["select_metric"] == "balanced_accuracy"
    table = result.output[result.output.index("test metrics") :]
    assert table.index("balanced accuracy") < table.index("log loss")  # the eval metric first
    config = (out / "config.yaml").read_text(encoding="utf-8")
    assert "preset: fast" in config and "no-tla: true" in config


# -- bagging and the ensemble ---------------------------------------------------------------


def test_fold_ids_are_stratified_and_refuse_too_many_folds() -> None:
    labels = np.array([0] * 12 + [1] * 6)
    folds = fold_ids(labels, 3, seed=0)
    for k in range(3):
        assert np.bincount(labels[folds == k]).tolist() == [4, 2]
    with pytest.raises(ConfigError, match="smallest class has 6"):
        fold_ids(labels, 7, seed=0)


@pytest.fixture(scope="module")
def bagged_run(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bagged") / "run"
    result = invoke(
        "train",
        tiny_manifest,
        *BAG_ARGS,
        "--bag-folds",
        "3",
        "--ensemble",
        "--out-dir",
        out,
    )
    assert_ok(result)
    assert "bag: 3 of 3 folds" in result.output and "ensemble (log_loss" in result.output
    return out


def test_a_bagged_run_saves_its_members_once_and_its_out_of_fold_predictions(
    bagged_run: Path,
) -> None:
    bundle = load_bundle(bagged_run)
    assert isinstance(bundle.model, BaggedOmniFuse) and len(bundle.model.members) == 3
    with safe_open(str(bagged_run / "model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # the frozen image backbone is stored once, for the first member
    assert any(k.startswith("members.0.encoders.us.backbone.") for k in keys)
    assert not any(re.match(r"members\.[12]\.encoders\.us\.backbone\.", k) for k in keys)
    trunk = bundle.model.members[0].encoders["us"].backbone
    assert all(m.encoders["us"].backbone is trunk for m in bundle.model.members)
    oof = pd.read_csv(bagged_run / "oof_predictions.csv", dtype={"id": str})
    split = pd.read_csv(bagged_run / "split_assignment.csv", dtype={"id": str})
    pool = set(split[split["split"].isin(["train", "val"])]["id"])
    assert set(oof["id"]) == pool and len(oof) == len(pool)  # every training patient, once
    assert sorted(oof["fold"].unique()) == [1, 2, 3]
    probs = oof[[f"prob_{c}" for c in range(3)]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    meta = pd.read_csv(bagged_run / "meta.csv").set_index("key")["value"]
    weights = [float(v) for k, v in meta.items() if str(k).startswith("ensemble_weight_")]
    assert len(weights) >= 2 and math.isclose(sum(weights), 1.0, abs_tol=1e-3)
    assert meta["bag_folds_finished"] == "3"
    members = json.loads((bagged_run / "model" / "members" / "members.json").read_text())
    assert members  # the classical members beside the network


def test_a_bagged_run_predicts_evaluates_and_reports(
    bagged_run: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    preds = tmp_path / "preds.csv"
    assert_ok(invoke("predict", tiny_manifest, "--run", bagged_run, "--out", preds))
    frame = pd.read_csv(preds, dtype={"id": str})
    probs = frame[[f"prob_{c}" for c in range(3)]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    evaluated = tmp_path / "eval"
    assert_ok(invoke("evaluate", bagged_run, "--out-dir", evaluated))
    # evaluate scores the same test patients as train did, with the same numbers
    test = pd.read_csv(bagged_run / "test.csv").iloc[0]
    pooled = pd.read_csv(evaluated / "metrics.csv").set_index("metric")["value"]
    assert math.isclose(float(pooled["auroc"]), float(test["test_auroc"]), abs_tol=1e-6)
    same = frame.set_index("id").loc[
        pd.read_csv(evaluated / "predictions.csv", dtype={"id": str})["id"]
    ]
    by_eval = pd.read_csv(evaluated / "predictions.csv", dtype={"id": str})
    assert np.allclose(
        same[[f"prob_{c}" for c in range(3)]].to_numpy(),
        by_eval[[f"prob_{c}" for c in range(3)]].to_numpy(),
        atol=1e-6,
    )
    assert_ok(invoke("report", bagged_run))
    page = (bagged_run / "report.html").read_text(encoding="utf-8")
    assert "Bagging and ensemble" in page and "tfidf_logistic" in page


def test_a_bagged_run_cannot_resume_nor_fine_tune(
    bagged_run: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    assert_user_error(invoke("train", "--resume", bagged_run), "cannot be resumed")
    result = invoke(
        "train",
        tiny_manifest,
        *BAG_ARGS,
        "--bag-folds",
        "2",
        "--finetune-image-scope",
        "layer4",
        "--out-dir",
        tmp_path / "ft",
    )
    assert_user_error(result, "fine-tuned backbones is not supported")


def test_cv_with_bagged_folds_and_a_bagged_refit(tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    result = invoke(
        "cv",
        tiny_manifest,
        *BAG_ARGS,
        "--epochs",
        "2",
        "--folds",
        "2",
        "--bag-folds",
        "2",
        "--refit",
        "--bootstrap",
        "20",
        "--out-dir",
        out,
    )
    assert_ok(result)
    assert isinstance(load_bundle(out / "final").model, BaggedOmniFuse)
    preds = tmp_path / "p.csv"
    assert_ok(invoke("predict", tiny_manifest, "--run", out / "final", "--out", preds))
    assert pd.read_csv(preds)["prob_0"].notna().all()


# -- the time limit -------------------------------------------------------------------------


def test_the_time_limit_stops_cleanly_and_the_model_loads(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = invoke(
        "train",
        tiny_manifest,
        *BAG_ARGS,
        "--epochs",
        "100000",
        "--time-limit",
        "4",
        "--no-linear-path",
        "--out-dir",
        out,
    )
    assert_ok(result)
    meta = pd.read_csv(out / "meta.csv").set_index("key")["value"]
    assert str(meta["stopped"]).startswith("time limit after epoch")
    assert int(pd.read_csv(out / "metrics.csv")["epoch"].max()) < 100000
    assert float(meta["time_limit"]) == 4.0
    preds = tmp_path / "p.csv"
    assert_ok(invoke("predict", tiny_manifest, "--run", out, "--out", preds))
    assert_ok(invoke("report", out))
    page = " ".join((out / "report.html").read_text(encoding="utf-8").split())
    assert "Training ended: time limit after epoch" in page and "Time limit 4.0 s" in page


def test_the_time_limit_keeps_the_finished_folds_of_a_bag(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = invoke(
        "train",
        tiny_manifest,
        *BAG_ARGS,
        "--epochs",
        "100000",
        "--bag-folds",
        "3",
        "--time-limit",
        "6",
        "--no-linear-path",
        "--out-dir",
        out,
    )
    assert_ok(result)
    meta = pd.read_csv(out / "meta.csv").set_index("key")["value"]
    finished = int(meta["bag_folds_finished"])
    assert 1 <= finished <= 3
    assert "time limit" in str(meta["bag_stopped"])
    assert len(load_bundle(out).model.members) == finished  # type: ignore[union-attr]


def test_train_config_defaults_are_unchanged_for_old_requests() -> None:
    """An old request.json says which metric it selected by; a new one resolves auto."""
    assert TrainConfig(select_metric="macro_f1").select_metric == "macro_f1"


def test_classical_members_see_the_presence_mask(tiny_manifest: Path) -> None:
    """evaluate --drop-modality hides a modality through the presence mask: the ensemble's
    scikit-learn members must not read the hidden notes or labs either."""
    from omnifuse_cli.config import DEFAULT_MODALITIES
    from omnifuse_cli.data.manifest import read_manifest
    from omnifuse_cli.engine.classical import member_inputs

    cohort = read_manifest(tiny_manifest, DEFAULT_MODALITIES)
    before = member_inputs(cohort)
    assert any(before.texts) and np.isfinite(before.numbers).any()
    cohort.present[:, cohort.names.index("text")] = False
    cohort.present[:, cohort.names.index("labs")] = False
    after = member_inputs(cohort)
    assert not any(after.texts) and np.isnan(after.numbers).all()


def test_a_config_file_and_the_api_take_the_preset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`preset: best` in a --config file, overridden by a flag; and preset= in Python."""
    from omnifuse_cli import api

    seen: list[object] = []

    def capture(request: object, *_: object, **__: object) -> None:
        seen.append(request)
        raise KeyboardInterrupt

    monkeypatch.setattr("omnifuse_cli.engine.training.run_training", capture)
    config = tmp_path / "study.yaml"
    config.write_text("preset: best\nbag-folds: 3\n", encoding="utf-8")
    invoke("train", "m.csv", "--num-classes", "2", "--config", config, "--no-ensemble")
    train = seen[-1].train  # type: ignore[attr-defined]
    assert (train.preset, train.bag_folds, train.ensemble) == ("best", 3, False)
    with pytest.raises(KeyboardInterrupt):
        api.train("m.csv", num_classes=2, out_dir=tmp_path / "run", preset="fast", patience=1)
    train = seen[-1].train  # type: ignore[attr-defined]
    assert (train.preset, train.epochs, train.patience) == ("fast", 10, 1)
