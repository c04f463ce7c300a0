"""Issue 18: unlabeled patients (an empty label cell), the reliability gate made observable and
estimated out of sample when validation cannot, and missingness shift at evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omnifuse_cli.config import (
    PAPER_OPTIONS,
    DataConfig,
    ImageConfig,
    MethodConfig,
    ModalitySpec,
    ModelConfig,
    TrainConfig,
)
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.splits import stratified_split, training_patients
from omnifuse_cli.engine.cv import assign_folds, assign_folds_labelled
from omnifuse_cli.engine.epoch import MixedBatches, _epoch_batches
from omnifuse_cli.engine.evaluation import simulate_missing
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.engine.reliability import reliability_plan
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import run_training
from omnifuse_cli.errors import ManifestError
from omnifuse_cli.synthetic import CohortSpec, make_cohort
from tests.helpers import assert_ok, flat, invoke

LABS_TEXT = ("--modality", "labs=vector", "--modality", "text=text")


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 labelled + 60 unlabeled patients (labs and notes), from make-data --unlabeled."""
    root = tmp_path_factory.mktemp("unlabeled")
    make_cohort(
        CohortSpec(
            n=90,
            unlabeled=60,
            labs_dim=6,
            ultrasound=False,
            inline_notes=True,
            seed=4,
            missing_labs=0.3,
            missing_text=0.3,
        ),
        root,
    )
    return root


# -- reading and splitting --------------------------------------------------------------------


def test_make_data_withholds_labels_and_keeps_them_in_truth(cohort_dir: Path) -> None:
    manifest = pd.read_csv(cohort_dir / "manifest.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(cohort_dir / "truth.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == len(truth) == 150
    assert (manifest["label"].iloc[:90] != "").all()
    assert (manifest["label"].iloc[90:] == "").all()
    assert (truth["label"] != "").all()  # the withheld labels are kept for studies
    assert truth["label"].iloc[:90].tolist() == manifest["label"].iloc[:90].tolist()


def test_make_data_without_unlabeled_is_unchanged(tmp_path: Path) -> None:
    spec = dict(n=30, labs_dim=4, ultrasound=False, inline_notes=True, seed=9)
    make_cohort(CohortSpec(**spec), tmp_path / "a")
    make_cohort(CohortSpec(**spec, unlabeled=0), tmp_path / "b")
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (
        tmp_path / "b" / "manifest.csv"
    ).read_bytes()


def test_empty_labels_are_unlabeled_only_where_allowed(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('id,label,labs\n1,0,"[1]"\n2,,"[2]"\n3,1,"[3]"\n', encoding="utf-8")
    specs = (ModalitySpec("labs", "vector"),)
    with pytest.raises(ManifestError, match="empty label"):
        read_manifest(path, specs)
    cohort = read_manifest(path, specs, allow_unlabeled=True)
    assert cohort.labels.tolist() == [0, -1, 1]
    path.write_text('id,label,labs\n1,0,"[1]"\n2,x,"[2]"\n', encoding="utf-8")
    with pytest.raises(ManifestError, match="not an integer class index"):
        read_manifest(path, specs, allow_unlabeled=True)


def test_split_keeps_labelled_splits_and_sets_unlabeled_apart() -> None:
    rng = np.random.default_rng(0)
    labelled = np.arange(60) % 3
    labels = np.full(100, -1)
    where = np.sort(rng.choice(100, 60, replace=False))
    labels[where] = labelled
    splits = stratified_split(labels, train=0.6, val=0.2, test=0.2, seed=3)
    alone = stratified_split(labelled, train=0.6, val=0.2, test=0.2, seed=3)
    for name in ("train", "val", "test"):
        assert splits[name].tolist() == where[alone[name]].tolist()
    assert splits["unlabeled"].tolist() == np.flatnonzero(labels < 0).tolist()
    assert sorted(training_patients(splits).tolist()) == sorted(
        [*splits["train"].tolist(), *splits["unlabeled"].tolist()]
    )
    assert "unlabeled" not in alone


def test_cv_folds_never_test_unlabeled_patients() -> None:
    labels = np.array([0, 1, 2, -1] * 15)
    folds = assign_folds_labelled(labels, 3, 2, seed=1)
    assert (folds[:, labels < 0] == 0).all()
    assert (folds[:, labels >= 0] > 0).all()
    alone = assign_folds(labels[labels >= 0], 3, 2, seed=1)
    assert np.array_equal(folds[:, labels >= 0], alone)


# -- the loss: label terms skip unlabeled patients --------------------------------------------


def _tiny(**method: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = MethodConfig(
        **{
            "embed_dim": 8,
            "ra_layers": (16, 4),
            "num_ra": 2,
            "head_hidden": 8,
            "dropout": 0.0,
            "cra_dropout": 0.0,
            "modality_drop": 0.5,
            **method,
        }
    )  # type: ignore[arg-type]
    specs = tuple(ModalitySpec(n, "vector") for n in "abc")
    return build_model(ModelConfig(specs, 3, (4, 5, 6), cfg), ImageConfig(), {})


def _batch(size: int, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        n: {"x": torch.randn(size, d, generator=g), "mask": torch.ones(size, d, dtype=bool)}
        for n, d in zip("abc", (4, 5, 6), strict=True)
    }
    present = torch.ones(size, 3, dtype=torch.bool)
    return inputs, present, torch.randint(0, 3, (size,), generator=g)


def _cat(a: dict, b: dict) -> dict:
    return {n: {k: torch.cat([a[n][k], b[n][k]]) for k in a[n]} for n in a}


def test_unlabeled_rows_enter_imputation_terms_only() -> None:
    model = _tiny(modality_drop=0.0)
    model.eval()
    inputs, present, y = _batch(12, 1)
    extra, extra_present, _ = _batch(20, 2)
    lazy = torch.tensor([True, False, False])
    alone = model.losses(inputs, present, y, lazy=lazy)
    mixed = model.losses(
        _cat(inputs, extra),
        torch.cat([present, extra_present]),
        torch.cat([y, torch.full((20,), -1)]),
        lazy=lazy,
    )
    # Label terms are the labelled patients' means, whatever unlabeled rows join the batch.
    torch.testing.assert_close(mixed["dwfuse"], alone["dwfuse"])
    torch.testing.assert_close(mixed["tla"], alone["tla"])
    assert not torch.isclose(mixed["backward"], alone["backward"])  # imputation sees them


def test_a_batch_of_unlabeled_patients_trains_the_imputation_only() -> None:
    model = _tiny()
    inputs, present, _ = _batch(16, 3)
    terms = model.losses(
        inputs,
        present,
        torch.full((16,), -1),
        lazy=None,
        generator=torch.Generator().manual_seed(0),
    )
    assert terms["dwfuse"].item() == 0 and terms["tla"].item() == 0
    assert terms["forward"].item() > 0 and terms["backward"].item() > 0
    terms["total"].backward()
    assert model.cra_forward is not None
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.cra_forward.parameters()
    )
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.joint_head.parameters())


def test_held_out_patients_are_never_imputation_targets() -> None:
    model = _tiny(**{k: v for k, v in PAPER_OPTIONS.items() if k == "drop_full_view"})
    inputs, present, y = _batch(16, 5)
    kwargs = {"lazy": None}
    everyone = torch.ones(16, dtype=torch.bool)
    base = model.losses(
        inputs, present, y, generator=torch.Generator().manual_seed(1), holdout=~everyone, **kwargs
    )
    plain = model.losses(inputs, present, y, generator=torch.Generator().manual_seed(1), **kwargs)
    torch.testing.assert_close(base["forward"], plain["forward"])
    held = model.losses(
        inputs, present, y, generator=torch.Generator().manual_seed(1), holdout=everyone, **kwargs
    )
    assert held["forward"].item() == 0 and held["backward"].item() == 0
    torch.testing.assert_close(held["dwfuse"], plain["dwfuse"])  # they still train the heads


def test_mixed_batches_show_every_unlabeled_patient_once_per_epoch() -> None:
    cfg = TrainConfig(batch_size=8, seed=3)
    train, unlabeled = np.arange(0, 40), np.arange(40, 140)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    mixed, indices = _epoch_batches(None, train, unlabeled, cfg, g1, epoch=1)  # type: ignore[arg-type]
    plain, _ = _epoch_batches(None, train, None, cfg, g2, epoch=1)  # type: ignore[arg-type]
    assert isinstance(mixed, MixedBatches)
    batches, labelled = list(mixed), list(plain)
    assert [b[: len(p)] for b, p in zip(batches, labelled, strict=True)] == labelled
    seen = [indices[i] for b, p in zip(batches, labelled, strict=True) for i in b[len(p) :]]
    assert sorted(seen) == unlabeled.tolist()
    again, _ = _epoch_batches(
        None, train, unlabeled, cfg, torch.Generator().manual_seed(0), epoch=2
    )  # type: ignore[arg-type]
    assert [b[8:] for b in again] != [b[8:] for b in batches]  # a new order each epoch


# -- train / check / cv / evaluate / predict --------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    result = invoke(
        "train",
        cohort_dir / "manifest.csv",
        "--num-classes",
        3,
        *LABS_TEXT,
        "--epochs",
        3,
        "--out-dir",
        out,
        "--device",
        "cpu",
        "--train-ratio",
        0.6,
        "--val-ratio",
        0.2,
        "--test-ratio",
        0.2,
    )
    assert_ok(result)
    assert "60 unlabeled patient(s) (empty label) train the imputation" in flat(result.output)
    return out


def test_check_counts_unlabeled_patients(cohort_dir: Path) -> None:
    result = invoke("check", cohort_dir / "manifest.csv", "--num-classes", 3, *LABS_TEXT)
    assert_ok(result)
    out = flat(result.output)
    assert "(empty: unlabeled) │ 60" in out
    assert "ok: 90 labelled + 60 unlabeled patients, ready for" in out


def test_train_records_unlabeled_patients_and_scores_only_labelled(run_dir: Path) -> None:
    split = pd.read_csv(run_dir / "split.csv")
    assert dict(zip(split["split"], split["n"], strict=True)) == {
        "train": 54,
        "val": 18,
        "test": 18,
        "unlabeled": 60,
    }
    assignment = pd.read_csv(run_dir / "split_assignment.csv", dtype={"id": str})
    unl = assignment[assignment["split"] == "unlabeled"]
    assert len(unl) == 60 and (unl["label"] == -1).all()
    assert (assignment.loc[assignment["split"] != "unlabeled", "label"] >= 0).all()
    meta = dict(pd.read_csv(run_dir / "meta.csv", dtype=str, keep_default_na=False).values)
    assert meta["n_unlabeled"] == "60"
    summary = pd.read_csv(run_dir / "splits_summary.csv")
    row = summary[(summary["kind"] == "class") & (summary["value"] == "unlabeled")].iloc[0]
    assert row["unlabeled"] == 60 and row["train"] == 0 and row["test"] == 0


def test_metrics_csv_and_bundle_log_the_reliability(run_dir: Path) -> None:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for name in ("labs", "text"):
        assert f"reliability_{name}" in metrics
        assert metrics[f"reliability_{name}"].between(0, 1).all()
    meta = dict(pd.read_csv(run_dir / "meta.csv", dtype=str, keep_default_na=False).values)
    assert "reliability_source" in meta and "labs=" in meta["reliability_source"]
    bundle = json.loads((run_dir / "model" / "bundle.json").read_text(encoding="utf-8"))
    best = metrics[metrics["best"] == 1].iloc[-1]
    assert float(bundle["run"]["reliability_labs"]) == pytest.approx(best["reliability_labs"])


def test_evaluate_and_predict_handle_unlabeled_rows(
    run_dir: Path, cohort_dir: Path, tmp_path: Path
) -> None:
    result = invoke(
        "evaluate",
        run_dir,
        "--manifest",
        cohort_dir / "manifest.csv",
        "--bootstrap",
        0,
        "--out-dir",
        tmp_path / "ev",
    )
    assert_ok(result)
    assert "60 patient(s) have an empty label (unlabeled) and are not scored" in flat(result.output)
    assert len(pd.read_csv(tmp_path / "ev" / "predictions.csv")) == 90
    result = invoke(
        "predict", cohort_dir / "manifest.csv", "--run", run_dir, "--out", tmp_path / "p.csv"
    )
    assert_ok(result)
    frame = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert len(frame) == 150
    assert frame["label"].iloc[:90].str.fullmatch("[0-2]").all()  # integers, not 1.0
    assert (frame["label"].iloc[90:] == "").all()


def test_cv_trains_every_fold_with_the_unlabeled_patients(cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    result = invoke(
        "cv",
        cohort_dir / "manifest.csv",
        "--num-classes",
        3,
        *LABS_TEXT,
        "--folds",
        3,
        "--epochs",
        2,
        "--out-dir",
        out,
        "--device",
        "cpu",
        "--bootstrap",
        0,
    )
    assert_ok(result)
    folds = pd.read_csv(out / "folds.csv", dtype={"id": str})
    assert (folds.loc[folds["label"] < 0, "fold"] == 0).all()
    assert (folds.loc[folds["label"] < 0].shape[0]) == 60
    predictions = pd.read_csv(out / "predictions.csv", dtype={"id": str})
    assert len(predictions) == 90 and set(predictions["id"]).isdisjoint(
        folds.loc[folds["label"] < 0, "id"]
    )
    for k in (1, 2, 3):
        parts = pd.read_csv(out / "folds" / "base" / f"rep1-fold{k}" / "split_assignment.csv")
        assert (parts["split"] == "unlabeled").sum() == 60
    meta = dict(pd.read_csv(out / "meta.csv", dtype=str, keep_default_na=False).values)
    assert meta["n_unlabeled"] == "60"


# -- the reliability gate ---------------------------------------------------------------------


def _request(manifest: Path, out: Path, **train: object) -> TrainRequest:
    return TrainRequest(
        manifest=manifest,
        num_classes=3,
        out_dir=out,
        overwrite=True,
        data=DataConfig(modalities=(ModalitySpec("labs", "vector"), ModalitySpec("text", "text"))),
        method=MethodConfig(embed_dim=16, ra_layers=(16, 8), num_ra=2),
        train=TrainConfig(**{"epochs": 2, "device": "cpu", "cache": False, **train}),
    )  # type: ignore[arg-type]


def test_reliability_comes_from_held_out_training_slots_when_validation_is_short(
    cohort_dir: Path, tmp_path: Path
) -> None:
    from omnifuse_cli.engine.training import build_for_cohort

    request = _request(cohort_dir / "manifest.csv", tmp_path / "r")
    cohort = read_manifest(request.manifest, request.data.modalities, allow_unlabeled=True)
    splits = stratified_split(cohort.labels, train=0.8, val=0.1, test=0.1, seed=1)
    model, pre, _ = build_for_cohort(cohort, training_patients(splits), request)
    data = pre.prepare(cohort)
    short = {**splits, "val": splits["val"][:5]}  # 5 validation patients: too few
    plan = reliability_plan(model, data, short, seed=1)
    assert plan is not None and plan.mask is not None
    assert set(plan.source.values()) == {"held-out training slots"}
    held = np.flatnonzero(plan.mask)
    assert set(held) <= set(training_patients(splits).tolist())  # never a test patient
    assert (cohort.present[held].sum(axis=1) >= 2).all()
    assert set(short["val"]) <= set(plan.held)  # validation patients join the estimate
    assert any(
        line.startswith("reliability of labs, text: validation has fewer than")
        for line in plan.messages
    )
    enough = reliability_plan(model, data, {**splits, "val": splits["train"]}, seed=1)
    assert enough is not None and enough.mask is None
    assert set(enough.source.values()) == {"validation"}
    fixed = build_for_cohort(
        cohort,
        splits["train"],
        TrainRequest(**{**request.__dict__, "method": MethodConfig(embed_dim=16, reliability="1")}),
    )[0]
    assert reliability_plan(fixed, data, short, seed=1) is None


def test_a_short_validation_split_estimates_the_gate_on_held_out_slots(
    cohort_dir: Path, tmp_path: Path
) -> None:
    events: list[str] = []
    result = run_training(
        _request(
            cohort_dir / "manifest.csv",
            tmp_path / "r",
            epochs=2,
            train_ratio=0.85,
            val_ratio=0.05,
            test_ratio=0.1,
        ),
        lambda e: events.append(e.text),
    )
    assert any("estimated on" in t and "held-out training patients" in t for t in events)
    meta = dict(pd.read_csv(result.out_dir / "meta.csv", dtype=str, keep_default_na=False).values)
    sources = dict(part.split("=") for part in meta["reliability_source"].split(";"))
    assert all(s.startswith("held-out training slots (") for s in sources.values())
    assert all(int(s.split("(")[1].rstrip(")")) >= 10 for s in sources.values())


# -- missingness shift at evaluation ----------------------------------------------------------


def test_per_modality_missing_rate_hides_that_modality_more() -> None:
    present = np.ones((4000, 3), dtype=bool)
    names = ["labs", "us", "text"]
    base, _ = simulate_missing(present, names, (), 0.3, 7)
    shifted, _ = simulate_missing(present, names, (), 0.3, 7, {"us": 0.8})
    # Rates before the keep-one rescue, which gives a few hidden modalities back.
    assert 0.18 < shifted[:, 1].mean() < 0.3 and base[:, 1].mean() > 0.68
    assert abs(shifted[:, 0].mean() - base[:, 0].mean()) < 0.03
    assert (shifted <= base).all()  # nested: the same draws, a higher rate hides a superset
    assert shifted.any(axis=1).all()


def test_evaluate_takes_a_modality_missing_rate(run_dir: Path, tmp_path: Path) -> None:
    result = invoke(
        "evaluate",
        run_dir,
        "--modality-missing-rate",
        "text=0.9",
        "--bootstrap",
        0,
        "--out-dir",
        tmp_path / "ev",
    )
    assert_ok(result)
    assert "missing rate 0, text 0.9 (seed 42)" in flat(result.output)
    result = invoke("evaluate", run_dir, "--modality-missing-rate", "us=0.5")
    assert result.exit_code == 2 and "not a modality of this model" in flat(result.stderr)
    result = invoke("evaluate", run_dir, "--modality-missing-rate", "text")
    assert result.exit_code == 2 and "must be NAME=RATE" in flat(result.stderr)


def test_make_data_cli_writes_unlabeled_patients(tmp_path: Path) -> None:
    result = invoke(
        "make-data",
        "--n",
        12,
        "--unlabeled",
        5,
        "--no-images",
        "--inline-notes",
        "--out-dir",
        tmp_path / "c",
    )
    assert_ok(result)
    assert "5 more patients with an empty label" in flat(result.output)
    manifest = pd.read_csv(tmp_path / "c" / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 17 and (manifest["label"] == "").sum() == 5
