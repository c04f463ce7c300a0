"""Options users rely on, end to end through the CLI: the ablation flags, --inference-rule,
--modality-drop, --embed-dim, --max-us-images, evaluate --missing-rate, a modality set other
than labs/us/text, and the DWFuse weights that predictions.csv reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.evaluation import simulate_missing
from omnifuse_cli.engine.inference import infer, loader
from omnifuse_cli.engine.runs import read_split_assignment
from omnifuse_cli.engine.training import TrainResult
from omnifuse_cli.model.fusion import dwfuse_weights

from .conftest import N_PATIENTS, NUM_CLASSES, save_png
from .helpers import TINY_RUN, assert_ok, invoke

Run = tuple[Path, TrainResult]
CPU = torch.device("cpu")
TINY = ["--num-classes", "3", "--epochs", "2", *TINY_RUN, "--tla-min-patients", "1"]


def read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "pred": str}).set_index("id")


def train_and_predict(manifest: Path, root: Path, *flags: object) -> tuple[Path, pd.DataFrame]:
    run, preds = root / "run", root / "predictions.csv"
    assert_ok(invoke("train", manifest, "--out-dir", run, *TINY, *flags))
    assert_ok(invoke("predict", manifest, "--run", run, "--out", preds, "--device", "cpu"))
    return run, read_predictions(preds)


# -- ablations, inference rule, modality dropout, embedding size --------------------------------


def test_no_dwfuse_with_the_joint_rule_no_tla_embed_dim_and_no_modality_drop(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    run, preds = train_and_predict(
        tiny_manifest,
        tmp_path,
        "--no-dwfuse",
        "--inference-rule",
        "joint",
        "--no-tla",
        "--embed-dim",
        16,
        "--modality-drop",
        0,
    )
    model = load_bundle(run).model
    method = model.config.method
    assert (method.use_dwfuse, method.use_tla, method.inference_rule) == (False, False, "joint")
    assert method.embed_dim == 16 and method.modality_drop == 0.0
    assert model.modality_heads is None  # one classifier on the concatenation
    assert model.missing.shape == (3, 16)
    assert model.joint_head[0].in_features == 3 * 16
    assert model.encoders["labs"].net[-1].out_features == 16
    metrics = pd.read_csv(run / "metrics.csv", keep_default_na=False)
    assert (metrics["loss_tla"] == 0).all()
    assert (metrics["lazy_combo"] == "").all()
    # Without modality dropout no slot is hidden, so the imputation has nothing to learn from.
    assert (metrics["loss_forward"] == 0).all() and (metrics["loss_backward"] > 0).all()
    assert len(preds) == N_PATIENTS
    assert not [c for c in preds.columns if c.startswith("weight_")]  # no DWFuse weights


def test_no_imputation_with_the_mean_rule(tiny_manifest: Path, tmp_path: Path) -> None:
    run, preds = train_and_predict(
        tiny_manifest,
        tmp_path,
        "--no-imputation",
        "--inference-rule",
        "mean",
        "--modality-drop",
        0.5,
    )
    bundle = load_bundle(run)
    model = bundle.model
    assert model.cra_forward is None and model.cra_backward is None
    assert model.config.method.modality_drop == 0.5
    metrics = pd.read_csv(run / "metrics.csv")
    assert (metrics["loss_forward"] == 0).all() and (metrics["loss_backward"] == 0).all()
    # The file's probabilities are the mean of the modality heads, not the label-free rule.
    cohort = read_manifest(tiny_manifest, model.config.modalities, num_classes=NUM_CLASSES)
    data = bundle.preprocessor.prepare(cohort)
    rows = np.arange(len(cohort))
    probs = preds.loc[cohort.ids, [f"prob_{c}" for c in range(NUM_CLASSES)]].to_numpy()
    mean = np.exp(infer(model, data, rows, device=CPU, rule="mean").log_probs)
    label_free = np.exp(infer(model, data, rows, device=CPU, rule="label-free").log_probs)
    np.testing.assert_allclose(probs, mean, rtol=1e-5, atol=1e-7)
    assert not np.allclose(probs, label_free, atol=1e-4)


def test_no_backward_and_one_image_per_patient(tiny_manifest: Path, tmp_path: Path) -> None:
    """--max-us-images 1: a patient's second image never reaches the model."""
    run, preds = train_and_predict(tiny_manifest, tmp_path, "--no-backward", "--max-us-images", 1)
    bundle = load_bundle(run)
    assert bundle.model.cra_forward is not None and bundle.model.cra_backward is None
    assert bundle.preprocessor.image.max_images == 1
    metrics = pd.read_csv(run / "metrics.csv")
    assert (metrics["loss_backward"] == 0).all() and (metrics["loss_forward"] > 0).all()

    changed = second_images_replaced(tiny_manifest, tmp_path / "changed")
    again = tmp_path / "again.csv"
    assert_ok(invoke("predict", changed, "--run", run, "--out", again, "--device", "cpu"))
    pd.testing.assert_frame_equal(read_predictions(again), preds)


def test_a_run_with_several_images_sees_the_second_one(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    """The control of the test above: with the default --max-us-images 4 the same change moves
    the predictions of exactly the patients with two images."""
    run, _ = trained_run
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    changed = second_images_replaced(tiny_manifest, tmp_path / "changed")
    assert_ok(invoke("predict", tiny_manifest, "--run", run, "--out", before, "--device", "cpu"))
    assert_ok(invoke("predict", changed, "--run", run, "--out", after, "--device", "cpu"))
    a, b = read_predictions(before), read_predictions(after)
    probs = [f"prob_{c}" for c in range(NUM_CLASSES)]
    moved = ~np.isclose(a[probs], b[probs], rtol=0, atol=1e-7).all(axis=1)
    cohort = read_manifest(
        tiny_manifest, load_bundle(run).model.config.modalities, num_classes=NUM_CLASSES
    )
    two_images = {
        pid for pid, images in zip(cohort.ids, cohort.images["us"], strict=True) if len(images) == 2
    }
    assert moved.any()
    assert set(a.index[moved]) == two_images


def second_images_replaced(manifest: Path, dest: Path) -> Path:
    """A copy of the cohort whose second ultrasound images are bright noise."""
    shutil.copytree(manifest.parent, dest)
    seconds = sorted((dest / "us").glob("*_1.png"))
    assert seconds
    for k, path in enumerate(seconds):
        save_png(path, 0.95, seed=9000 + k)
    return dest / manifest.name


def test_mean_rule_without_dwfuse_is_refused_with_the_alternative(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    result = invoke(
        "train",
        tiny_manifest,
        "--out-dir",
        tmp_path / "run",
        *TINY,
        "--no-dwfuse",
        "--inference-rule",
        "mean",
    )
    assert result.exit_code == 2, result.output
    assert "--inference-rule mean needs DWFuse's modality heads" in result.stderr
    assert "--inference-rule joint" in result.stderr
    assert not (tmp_path / "run").exists()


# -- evaluate --missing-rate --------------------------------------------------------------------


def test_evaluate_missing_rate_hides_modalities_reproducibly(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    run, _ = trained_run
    full, hidden = tmp_path / "full", tmp_path / "hidden"
    common = ["--bootstrap", 0, "--device", "cpu"]
    assert_ok(invoke("evaluate", run, "--out-dir", full, *common))
    result = invoke(
        "evaluate", run, "--out-dir", hidden, "--missing-rate", 0.5, "--seed", 3, *common
    )
    assert_ok(result)
    assert "missing rate 0.5 (seed 3)" in " ".join(result.output.split())

    cohort = read_manifest(
        tiny_manifest, load_bundle(run).model.config.modalities, num_classes=NUM_CLASSES
    )
    expected, empty = simulate_missing(cohort.present, cohort.names, (), 0.5, 3)
    assert not empty.any()
    split = read_split_assignment(run)
    test_ids = split.loc[split["split"] == "test", "id"].tolist()
    a, b = read_predictions(full / "predictions.csv"), read_predictions(hidden / "predictions.csv")
    assert sorted(b.index) == sorted(test_ids)
    row = {pid: i for i, pid in enumerate(cohort.ids)}
    names = np.array(cohort.names)
    for pid in test_ids:
        kept = expected[row[pid]]
        assert b.loc[pid, "modalities"] == "+".join(names[kept]), pid
    # Patients who lost a modality are scored differently; the others exactly as before.
    lost = np.array([a.loc[pid, "modalities"] != b.loc[pid, "modalities"] for pid in test_ids])
    assert lost.any()
    probs = [f"prob_{c}" for c in range(NUM_CLASSES)]
    same = np.isclose(a.loc[test_ids, probs], b.loc[test_ids, probs], rtol=0, atol=1e-7).all(axis=1)
    assert (same == ~lost).all()
    patterns = pd.read_csv(hidden / "patterns.csv")
    assert patterns["n"].sum() == len(test_ids)
    metrics = pd.read_csv(hidden / "metrics.csv").set_index("metric")["value"]
    assert metrics["acc"] == pytest.approx(
        (b.loc[test_ids, "pred"].astype(int) == b.loc[test_ids, "label"]).mean()
    )


# -- a modality set of two vectors and one text ---------------------------------------------------


def write_other_cohort(root: Path, *, labels: bool = True) -> Path:
    """30 patients with blood (3 values), vitals (2 values) and a report; some missing."""
    rng = np.random.default_rng(1)
    words = ("stable no findings", "borderline values", "acute admitted")
    lines = ["id,label,blood,vitals,report" if labels else "id,blood,vitals,report"]
    for i in range(N_PATIENTS):
        label = i % NUM_CLASSES
        has = [
            (True, True, True),
            (True, False, True),
            (False, True, True),
            (True, True, False),
            (False, False, True),
            (True, False, False),
        ][i % 6]
        blood = json.dumps(list(np.round(label + rng.normal(0, 0.4, 3), 3))) if has[0] else ""
        vitals = json.dumps(list(np.round(-label + rng.normal(0, 0.4, 2), 3))) if has[1] else ""
        report = f"{words[label]} case {i}" if has[2] else ""
        cells = [
            f"p{i:03d}",
            *([str(label)] if labels else []),
            f'"{blood}"' if blood else "",
            f'"{vitals}"' if vitals else "",
            report,
        ]
        lines.append(",".join(cells))
    root.mkdir(parents=True, exist_ok=True)
    path = root / ("manifest.csv" if labels else "patients.csv")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_train_predict_and_evaluate_with_two_vectors_and_a_text(tmp_path: Path) -> None:
    manifest = write_other_cohort(tmp_path / "data")
    modalities = [
        "--modality",
        "blood=vector",
        "--modality",
        "vitals=vector",
        "--modality",
        "report=text",
    ]
    run = tmp_path / "run"
    assert_ok(invoke("train", manifest, "--out-dir", run, *TINY, *modalities))
    model = load_bundle(run).model
    assert [(m.name, m.kind) for m in model.config.modalities] == [
        ("blood", "vector"),
        ("vitals", "vector"),
        ("report", "text"),
    ]
    assert model.config.input_dims[:2] == (3, 2)
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"tla_blood", "tla_blood+vitals+report"} <= set(metrics.columns)

    patients = write_other_cohort(tmp_path / "new", labels=False)
    out = tmp_path / "predictions.csv"
    assert_ok(invoke("predict", patients, "--run", run, "--out", out, "--device", "cpu"))
    preds = read_predictions(out)
    assert len(preds) == N_PATIENTS and "label" not in preds.columns
    assert {"weight_blood", "weight_vitals", "weight_report"} <= set(preds.columns)
    assert preds.loc["p001", "modalities"] == "blood+report"
    assert preds.loc["p004", "modalities"] == "report"
    assert set(preds["pred"]) <= {"0", "1", "2"}
    assert_ok(invoke("evaluate", run, "--bootstrap", 0, "--device", "cpu"))
    patterns = pd.read_csv(run / "eval" / "test" / "patterns.csv")
    assert set(patterns["present"]) <= {
        "blood+vitals+report",
        "blood+report",
        "vitals+report",
        "blood+vitals",
        "report",
        "blood",
    }


# -- predictions.csv weights are the model's w_m at the predicted class ---------------------------


def test_prediction_weights_are_the_models_gated_w_m_at_the_predicted_class(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    run, _ = trained_run
    out = tmp_path / "predictions.csv"
    assert_ok(invoke("predict", tiny_manifest, "--run", run, "--out", out, "--device", "cpu"))
    preds = read_predictions(out)

    bundle = load_bundle(run)
    model = bundle.model.eval()
    method = model.config.method
    assert method.reliability == "auto" and method.inference_rule == "label-free"
    cohort = read_manifest(tiny_manifest, model.config.modalities, num_classes=NUM_CLASSES)
    data = bundle.preprocessor.prepare(cohort)
    batch: dict[str, Any] = next(iter(loader(data, np.arange(10), batch_size=10)))
    with torch.no_grad():
        fused = model.fuse(model.embed(batch["inputs"], batch["present"]), batch["present"])
        log_probs = model.predict_from(fused).log_probs
        assert fused.modality_log_probs is not None
        # Eq. 10 with each slot gated: 1 when observed, the modality's reliability when imputed.
        weights = dwfuse_weights(
            fused.modality_log_probs, method.beta, fused.gate
        ) * fused.gate.unsqueeze(-1)
    pred = log_probs.argmax(1)
    ids = [cohort.ids[i] for i in batch["index"].tolist()]
    assert [int(p) for p in preds.loc[ids, "pred"]] == pred.tolist()
    names = [m.name for m in model.config.modalities]
    at_pred = weights[torch.arange(len(ids)), :, pred].numpy()  # (B, M)
    np.testing.assert_allclose(
        preds.loc[ids, [f"weight_{n}" for n in names]].to_numpy(), at_pred, rtol=1e-5, atol=1e-7
    )
    # Another class's weights differ: the file's are those of the predicted class.
    other = weights[torch.arange(len(ids)), :, (pred + 1) % NUM_CLASSES].numpy()
    assert not np.allclose(at_pred, other, atol=1e-4)
    # A modality the patient lacks counts only as much as its imputation is trusted.
    absent = ~batch["present"]
    assert absent.any()
    reliability = model.reliability.numpy()
    cols = np.nonzero(absent.numpy())
    assert (at_pred[cols] <= reliability[cols[1]] + 1e-6).all()
