"""A tiny training run end to end: run-dir files, bundle round trip, copies, hf text, weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omnifuse_cli.config import ImageConfig, TextConfig
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.data.tables import normalize_id
from omnifuse_cli.engine.bundle import FORMAT_VERSION, load_bundle
from omnifuse_cli.engine.evaluation import EvalRequest, evaluate_run
from omnifuse_cli.engine.frozen_features import cache_frozen_features
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.prediction import PredictRequest, predict_patients
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import TrainResult, run_training
from omnifuse_cli.errors import BundleError, DataError, WeightsError
from omnifuse_cli.model.encoders import HFTextEncoder, ImageEncoder, resnet_state_for_trunk

from .conftest import N_PATIENTS, NUM_CLASSES, tiny_bert

Run = tuple[Path, TrainResult]
MakeRequest = Callable[..., TrainRequest]
TLA_COLUMNS = [
    "tla_labs",
    "tla_us",
    "tla_text",
    "tla_labs+us",
    "tla_labs+text",
    "tla_us+text",
    "tla_labs+us+text",
]


def predict(run_dir: Path, patients: Path) -> pd.DataFrame:
    return predict_patients(PredictRequest(run_dir=run_dir, patients=patients, device="cpu")).frame


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def assert_same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert a["id"].tolist() == b["id"].tolist()
    assert a["pred"].tolist() == b["pred"].tolist()
    numeric = [c for c in a.columns if c.startswith(("prob_", "weight_"))]
    assert np.array_equal(a[numeric].to_numpy(), b[numeric].to_numpy())


# -- the run directory ------------------------------------------------------------------------


def test_run_dir_holds_every_file(trained_run: Run) -> None:
    run_dir, _ = trained_run
    for name in (
        "metrics.csv",
        "test.csv",
        "confusion_matrix.csv",
        "split.csv",
        "meta.csv",
        "split_assignment.csv",
        "model/bundle.json",
        "model/model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_metrics_csv_has_one_row_per_epoch_with_every_term(trained_run: Run) -> None:
    run_dir, result = trained_run
    metrics = pd.read_csv(run_dir / "metrics.csv", keep_default_na=False)
    for column in (
        "epoch",
        "train_loss",
        "val_loss",
        "val_acc",
        "val_macro_f1",
        "loss_forward",
        "loss_backward",
        "loss_dwfuse",
        "loss_tla",
        "lazy_combo",
        *TLA_COLUMNS,
    ):
        assert column in metrics.columns, column
    assert metrics["epoch"].tolist() == [1, 2]
    assert set(metrics["lazy_combo"]) <= {c.removeprefix("tla_") for c in TLA_COLUMNS}
    # Each epoch's lazy combination is the one with the largest logged distance (Eq. 15).
    for _, row in metrics.iterrows():
        assert row["lazy_combo"] == max(TLA_COLUMNS, key=lambda c: row[c]).removeprefix("tla_")
    # No lazy combination is known during epoch 1, so L_TLA is 0 then and positive after.
    assert metrics["loss_tla"].tolist()[0] == 0.0 and metrics["loss_tla"].tolist()[1] > 0
    assert metrics["loss_forward"].gt(0).all() and metrics["loss_dwfuse"].gt(0).all()
    total = (
        10.0 * metrics["loss_forward"]
        + 1.0 * metrics["loss_backward"]
        + 10.0 * metrics["loss_dwfuse"]
        + 0.5 * metrics["loss_tla"]
    )
    np.testing.assert_allclose(metrics["train_loss"], total, rtol=1e-5)
    assert metrics["best"].sum() >= 1
    assert [r.epoch for r in result.records] == [1, 2]


def test_test_csv_and_confusion_matrix(trained_run: Run) -> None:
    run_dir, result = trained_run
    test = pd.read_csv(run_dir / "test.csv")
    assert list(test.columns) == [
        "test_loss",
        "test_acc",
        "test_macro_f1",
        "test_balanced_acc",
        "test_auroc",
    ]
    assert test.loc[0, "test_acc"] == pytest.approx(result.test["acc"])
    cm = pd.read_csv(run_dir / "confusion_matrix.csv")
    assert list(cm.columns) == ["true", "pred_0", "pred_1", "pred_2"]
    assert cm["true"].tolist() == [0, 1, 2]
    counts = cm[["pred_0", "pred_1", "pred_2"]].to_numpy()
    assert counts.sum() == result.split_counts["test"] == 6
    assert counts.sum(axis=1).tolist() == [2, 2, 2]  # stratified test split
    assert np.trace(counts) / counts.sum() == pytest.approx(test.loc[0, "test_acc"])


def test_split_files_are_disjoint_and_cover_all_patients(
    trained_run: Run, tiny_manifest: Path
) -> None:
    run_dir, result = trained_run
    split = pd.read_csv(run_dir / "split.csv")
    assert dict(zip(split["split"], split["n"], strict=True)) == {"train": 18, "val": 6, "test": 6}
    assignment = pd.read_csv(run_dir / "split_assignment.csv", dtype=str)
    assert list(assignment.columns) == ["id", "label", "split"]
    groups = {name: set(frame["id"]) for name, frame in assignment.groupby("split")}
    assert set(groups) == {"train", "val", "test"}
    assert sum(len(g) for g in groups.values()) == N_PATIENTS
    assert not (
        groups["train"] & groups["val"]
        or groups["train"] & groups["test"]
        or groups["val"] & groups["test"]
    )
    manifest = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    assert set().union(*groups.values()) == {normalize_id(i) for i in manifest["id"]}
    assert result.split_counts == {"train": 18, "val": 6, "test": 6}


def test_meta_csv_records_the_run(trained_run: Run, tiny_manifest: Path) -> None:
    run_dir, _ = trained_run
    meta = pd.read_csv(run_dir / "meta.csv", dtype=str, keep_default_na=False)
    values = dict(zip(meta["key"], meta["value"], strict=True))
    assert values["manifest"] == str(tiny_manifest.resolve())
    assert values["num_classes"] == "3"
    assert values["modalities"] == "labs=vector,us=image,text=text"
    assert values["image_backbone"] == "resnet18" and values["image_image_size"] == "32"
    assert values["n_patients"] == "30" and values["n_test"] == "6"
    assert values["best_epoch"] in {"1", "2"}
    assert values["version_omnifuse"]


# -- bundle round trip ------------------------------------------------------------------------


def test_evaluate_reproduces_the_training_test_metrics(trained_run: Run, tmp_path: Path) -> None:
    run_dir, result = trained_run
    test = pd.read_csv(run_dir / "test.csv")
    evaluated = evaluate_run(EvalRequest(run_dir=run_dir, device="cpu", out_dir=tmp_path / "eval"))
    assert evaluated.n == 6
    assert evaluated.metrics["acc"] == test.loc[0, "test_acc"] == result.test["acc"]
    assert evaluated.metrics["macro_f1"] == pytest.approx(test.loc[0, "test_macro_f1"])
    assert evaluated.metrics["loss"] == pytest.approx(test.loc[0, "test_loss"], rel=1e-5)
    cm = pd.read_csv(run_dir / "confusion_matrix.csv")[["pred_0", "pred_1", "pred_2"]]
    assert np.array_equal(evaluated.confusion, cm.to_numpy())
    written = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert written.set_index("metric").loc["acc", "value"] == pytest.approx(test.loc[0, "test_acc"])


def test_evaluate_an_external_manifest(trained_run: Run, tiny_manifest: Path) -> None:
    run_dir, _ = trained_run
    copy = copy_run(run_dir, run_dir.parent / "ext_eval_copy")
    evaluated = evaluate_run(EvalRequest(run_dir=copy, manifest=tiny_manifest, device="cpu"))
    assert evaluated.n == N_PATIENTS
    assert evaluated.confusion.sum() == N_PATIENTS
    assert (copy / "eval" / "manifest" / "metrics.csv").is_file()


def test_two_loads_predict_identically(trained_run: Run, tiny_manifest: Path) -> None:
    run_dir, _ = trained_run
    first = predict(run_dir, tiny_manifest)
    second = predict(run_dir, tiny_manifest)
    assert_same_predictions(first, second)
    assert len(first) == N_PATIENTS
    probs = first[[f"prob_{c}" for c in range(NUM_CLASSES)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert first["pred"].tolist() == [str(c) for c in probs.argmax(axis=1)]
    a, b = load_bundle(run_dir), load_bundle(run_dir)
    for (key, ta), (_, tb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(ta, tb), key
    assert a.class_names == ["0", "1", "2"]
    assert a.preprocessor.state() == b.preprocessor.state()


def test_predict_accepts_the_bundle_folder_itself(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    # load_bundle accepts RUN_DIR/model, and bundle.json carries the run's meta under "run":
    # the bundle alone, copied without the run's CSVs, must be enough to predict.
    run_dir, _ = trained_run
    assert load_bundle(run_dir / "model").meta["run"]["labs_id_col"] == "id"
    bundle_only = copy_run(run_dir / "model", tmp_path / "bundle_only")
    assert_same_predictions(predict(run_dir, tiny_manifest), predict(bundle_only, tiny_manifest))


def test_predict_without_labels_and_with_missing_modalities(
    trained_run: Run, tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    src = pd.read_csv(run_dir / "meta.csv", dtype=str).set_index("key").loc["manifest", "value"]
    manifest = pd.read_csv(src, dtype=str, keep_default_na=False)
    rows = manifest.drop(columns=["label"]).head(8)
    rows["labs"] = rows["labs"].where(rows.index % 2 == 0, "")
    rows.loc[rows["labs"].eq("") & rows["text"].eq(""), "text"] = "甲状腺结节"
    # Paths are relative to the manifest's folder: write beside a copy of the cohort.
    patients = Path(shutil.copytree(Path(src).parent, tmp_path / "data")) / "new_patients.csv"
    rows.to_csv(patients, index=False)
    frame = predict(run_dir, patients)
    assert "label" not in frame.columns
    assert list(frame.columns) == [
        "id",
        "pred",
        "prob_0",
        "prob_1",
        "prob_2",
        "modalities",
        "weight_labs",
        "weight_us",
        "weight_text",
        "reason",
    ]
    assert frame["reason"].fillna("").eq("").all()  # every patient here can be scored
    expected = [
        "+".join(n for n in ("labs", "us", "text") if str(r[n]).strip()) for _, r in rows.iterrows()
    ]
    assert frame["modalities"].tolist() == expected
    weights = frame[["weight_labs", "weight_us", "weight_text"]].to_numpy()
    # Observed modalities always count; an imputed slot counts its reliability (0 when
    # imputation has not earned it, method.md Sec. 5.1).
    observed = np.array(
        [[m in str(s).split("+") for m in ("labs", "us", "text")] for s in frame["modalities"]]
    )
    assert ((weights >= 0) & (weights <= 1)).all() and (weights[observed] > 0).all()


def test_predict_rejects_a_different_lab_panel(trained_run: Run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    patients = tmp_path / "p.csv"
    patients.write_text('id,labs,us,text\n1,"[1, 2, 3, 4]",,note\n', encoding="utf-8")
    with pytest.raises(
        DataError, match="labs has 4 values per patient, the model was trained on 5"
    ):
        predict(run_dir, patients)


def test_copied_run_predicts_identically(
    trained_run: Run, tiny_manifest: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    reference = predict(run_dir, tiny_manifest)
    original = copy_run(run_dir, tmp_path / "original")
    moved = copy_run(original, tmp_path / "elsewhere" / "moved")
    shutil.rmtree(original)
    assert_same_predictions(reference, predict(moved, tiny_manifest))
    evaluated = evaluate_run(EvalRequest(run_dir=moved, device="cpu"))
    assert evaluated.metrics["acc"] == pd.read_csv(run_dir / "test.csv").loc[0, "test_acc"]
    assert (moved / "eval" / "test" / "metrics.csv").is_file()


def test_evaluate_says_when_the_runs_manifest_is_gone(trained_run: Run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    copy = copy_run(run_dir, tmp_path / "run")
    meta = pd.read_csv(copy / "meta.csv", dtype=str, keep_default_na=False)
    meta.loc[meta["key"] == "manifest", "value"] = str(tmp_path / "gone" / "manifest.csv")
    meta.to_csv(copy / "meta.csv", index=False)
    with pytest.raises(BundleError, match="is not on this machine"):
        evaluate_run(EvalRequest(run_dir=copy, device="cpu"))


def test_cached_features_predict_like_pixels_even_for_batches_without_images(
    trained_run: Run, tiny_manifest: Path
) -> None:
    # Training encodes images once with the frozen trunk; predictions from those cached
    # features must equal the ones computed from pixels, for every batch composition.
    bundle = load_bundle(trained_run[0])
    cohort = read_manifest(tiny_manifest, bundle.model.config.modalities)
    data = bundle.preprocessor.prepare(cohort)
    cpu = torch.device("cpu")
    rows = np.arange(len(cohort))
    plain = infer(bundle.model, data, rows, device=cpu, batch_size=4)
    cache_frozen_features(bundle.model, data, ["us"], device=cpu, batch_size=8, amp=False)
    assert [len(f) for f in data.image_cache["us"]] == [len(p) for p in cohort.images["us"]]
    cached = infer(bundle.model, data, rows, device=cpu, batch_size=4)
    np.testing.assert_allclose(cached.log_probs, plain.log_probs, atol=1e-5)
    no_us = np.flatnonzero(~cohort.present[:, 1])
    assert len(no_us) >= 4
    only = infer(bundle.model, data, no_us, device=cpu, batch_size=4)  # batches with no image
    np.testing.assert_allclose(only.log_probs, plain.log_probs[no_us], atol=1e-5)


def test_training_with_batches_that_hold_no_image(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    # batch_size 1: every patient without ultrasound is a batch without any image.
    result = run_training(make_request(tiny_manifest, tmp_path / "run", epochs=1, batch_size=1))
    assert result.split_counts["test"] == 6
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_labs_table_run_predicts_with_the_table_and_checks_its_columns(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    frame = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    rows = []
    for _, row in frame[frame["labs"] != ""].iterrows():
        values = ["" if v is None else v for v in json.loads(row["labs"])]
        rows.append({"patient": str(int(row["id"])), **{f"a{j}": v for j, v in enumerate(values)}})
    table = pd.DataFrame(rows)
    data = Path(shutil.copytree(tiny_manifest.parent, tmp_path / "data"))
    table.to_csv(data / "labs_table.csv", index=False)
    frame.drop(columns=["labs"]).to_csv(data / "manifest_no_labs.csv", index=False)
    run_dir = tmp_path / "run"
    result = run_training(
        make_request(
            data / "manifest_no_labs.csv",
            run_dir,
            labs_table=str(data / "labs_table.csv"),
            labs_id_col="patient",
        )
    )
    assert result.notes == [
        "labs table matched 20 of 30 manifest ids; the other 10 patients "
        "are treated as missing labs"
    ]
    bundle = load_bundle(run_dir)
    assert bundle.preprocessor.vector_stats["labs"]["columns"] == [f"a{j}" for j in range(5)]
    # evaluate finds the table and its id column through meta.csv
    evaluated = evaluate_run(EvalRequest(run_dir=run_dir, device="cpu"))
    assert evaluated.metrics["acc"] == pd.read_csv(run_dir / "test.csv").loc[0, "test_acc"]
    request = PredictRequest(
        run_dir=run_dir,
        patients=data / "manifest_no_labs.csv",
        labs_table=data / "labs_table.csv",
        device="cpu",
    )
    frame_out = predict_patients(request).frame
    assert frame_out["modalities"].str.contains("labs").sum() == 20
    table[["patient", "a1", "a0", "a2", "a3", "a4"]].to_csv(data / "labs_swapped.csv", index=False)
    swapped = PredictRequest(
        run_dir=run_dir,
        patients=data / "manifest_no_labs.csv",
        labs_table=data / "labs_swapped.csv",
        device="cpu",
    )
    # A table is read by analyte name into the run's columns and order.
    pd.testing.assert_frame_equal(predict_patients(swapped).frame, frame_out)
    table[["patient", "a1", "a0", "a2", "a4"]].to_csv(data / "labs_short.csv", index=False)
    short = PredictRequest(
        run_dir=run_dir,
        patients=data / "manifest_no_labs.csv",
        labs_table=data / "labs_short.csv",
        device="cpu",
    )
    assert (
        "1 analyte(s) of the run missing from this lab table (empty for every patient): a3"
        in predict_patients(short).notes
    )


# -- broken bundles ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"garbage, not safetensors" * 10, b"\x08" + b"\x00" * 7])
def test_garbage_safetensors_is_a_bundle_error(
    trained_run: Run, tmp_path: Path, content: bytes
) -> None:
    copy = copy_run(trained_run[0], tmp_path / "run")
    (copy / "model" / "model.safetensors").write_bytes(content)
    with pytest.raises(BundleError, match="model.safetensors is missing or corrupted"):
        load_bundle(copy)


def test_truncated_safetensors_is_a_bundle_error(trained_run: Run, tmp_path: Path) -> None:
    copy = copy_run(trained_run[0], tmp_path / "run")
    weights = copy / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError, match="model.safetensors"):
        load_bundle(copy)


def test_missing_safetensors_is_a_bundle_error(trained_run: Run, tmp_path: Path) -> None:
    copy = copy_run(trained_run[0], tmp_path / "run")
    (copy / "model" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing or corrupted"):
        load_bundle(copy)


def test_safetensors_of_another_model_is_a_bundle_error(trained_run: Run, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    copy = copy_run(trained_run[0], tmp_path / "run")
    save_file({"missing": torch.zeros(3)}, str(copy / "model" / "model.safetensors"))
    with pytest.raises(BundleError, match="does not match its bundle.json"):
        load_bundle(copy)


def test_newer_bundle_format_is_a_bundle_error(trained_run: Run, tmp_path: Path) -> None:
    copy = copy_run(trained_run[0], tmp_path / "run")
    path = copy / "model" / "bundle.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    assert meta["format_version"] == FORMAT_VERSION
    meta["format_version"] = 999
    path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(BundleError, match="newer") as info:
        load_bundle(copy)
    assert "upgrade" in (info.value.hint or "")


def test_corrupted_bundle_json_is_a_bundle_error(trained_run: Run, tmp_path: Path) -> None:
    copy = copy_run(trained_run[0], tmp_path / "run")
    path = copy / "model" / "bundle.json"
    path.write_text('{"format": "omnifuse-bundle", ', encoding="utf-8")
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(copy)
    path.write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(BundleError, match="is not an omnifuse bundle"):
        load_bundle(copy)
    path.write_text('{"format": "omnifuse-bundle", "format_version": 1}', encoding="utf-8")
    with pytest.raises(BundleError, match="invalid config"):
        load_bundle(copy)


def test_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(BundleError, match="is not an omnifuse run") as info:
        load_bundle(tmp_path)
    assert "omnifuse train --out-dir" in (info.value.hint or "")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="is not an omnifuse run"):
        predict(tmp_path, tmp_path / "notes.txt")


# -- hf text encoder --------------------------------------------------------------------------


def test_hf_text_encoder_bundle_loads_offline(
    tiny_manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_request: MakeRequest,
) -> None:
    from transformers import BertModel

    folder = tiny_bert(tmp_path / "bert")
    original = {k: v.clone() for k, v in BertModel.from_pretrained(folder).state_dict().items()}
    run_dir = tmp_path / "run"
    request = make_request(
        tiny_manifest,
        run_dir,
        epochs=1,
        text=TextConfig(encoder="hf", model=str(folder), max_length=32),
    )
    run_training(request)
    assert (run_dir / "model" / "text_text").is_dir()
    reference = predict(run_dir, tiny_manifest)

    shutil.rmtree(folder)  # the bundle must carry everything it needs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    bundle = load_bundle(run_dir)
    encoder = bundle.model.encoders["text"]
    assert isinstance(encoder, HFTextEncoder)
    loaded = encoder.backbone.state_dict()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key  # the frozen backbone round-trips
    assert_same_predictions(reference, predict(run_dir, tiny_manifest))
    test = pd.read_csv(run_dir / "test.csv")
    evaluated = evaluate_run(EvalRequest(run_dir=run_dir, device="cpu"))
    assert evaluated.metrics["acc"] == test.loc[0, "test_acc"]
    assert evaluated.metrics["loss"] == pytest.approx(test.loc[0, "test_loss"], rel=1e-5)


def test_overwriting_a_run_replaces_its_text_model_files(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    run_dir = tmp_path / "run"
    first = tiny_bert(tmp_path / "bert32", hidden=32)
    run_training(
        make_request(
            tiny_manifest,
            run_dir,
            epochs=1,
            text=TextConfig(encoder="hf", model=str(first), max_length=32),
        )
    )
    second = tiny_bert(tmp_path / "bert16", hidden=16, extra_chars="甲状腺")
    run_training(
        make_request(
            tiny_manifest,
            run_dir,
            epochs=1,
            overwrite=True,
            text=TextConfig(encoder="hf", model=str(second), max_length=32),
        )
    )
    saved = json.loads((run_dir / "model" / "text_text" / "config.json").read_text("utf-8"))
    assert saved["hidden_size"] == 16
    bundle = load_bundle(run_dir)
    assert bundle.model.config.input_dims[2] == 16
    vocab = bundle.preprocessor.tokenizers["text"].get_vocab()
    assert "甲" in vocab


# -- image weights ----------------------------------------------------------------------------


def test_image_weights_file_initialises_the_trunk(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    weights = tmp_path / "resnet18.pth"
    torch.save(state, weights)
    image = ImageConfig(backbone="resnet18", image_size=32, weights_path=str(weights))
    run_dir = tmp_path / "run"
    result = run_training(make_request(tiny_manifest, run_dir, epochs=1, image=image))
    assert result.image_weights == f"file {weights}"
    meta = pd.read_csv(run_dir / "meta.csv", dtype=str, keep_default_na=False)
    image_weights = meta.loc[meta["key"] == "image_weights", "value"].item()
    assert str(weights) in image_weights
    encoder = load_bundle(run_dir).model.encoders["us"]
    assert isinstance(encoder, ImageEncoder)
    trunk = encoder.backbone.state_dict()
    for key, value in resnet_state_for_trunk(state).items():
        assert torch.equal(trunk[key], value), key  # frozen: still exactly the file's weights


def test_image_weights_of_the_wrong_depth(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    import torchvision

    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    image = ImageConfig(backbone="resnet18", image_size=32, weights_path=str(weights))
    with pytest.raises(WeightsError, match="do not fit resnet18") as info:
        run_training(make_request(tiny_manifest, tmp_path / "run", image=image))
    assert "same depth" in (info.value.hint or "")


def test_image_weights_that_are_not_a_state_dict(
    tiny_manifest: Path, tmp_path: Path, make_request: MakeRequest
) -> None:
    missing = ImageConfig(
        backbone="resnet18", image_size=32, weights_path=str(tmp_path / "none.pth")
    )
    with pytest.raises(WeightsError, match="does not exist"):
        run_training(make_request(tiny_manifest, tmp_path / "r1", image=missing))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    image = ImageConfig(backbone="resnet18", image_size=32, weights_path=str(junk))
    with pytest.raises(WeightsError, match="could not be read as a state dict"):
        run_training(make_request(tiny_manifest, tmp_path / "r2", image=image))


# -- default ("auto") image weights ---------------------------------------------------------------
def test_auto_image_weights_use_the_local_torch_cache_only(tmp_path: Path) -> None:
    import hashlib

    import torchvision

    from omnifuse_cli.config import ImageConfig, MethodConfig, ModalitySpec, ModelConfig
    from omnifuse_cli.engine.modelling import build_model, load_image_weights

    config = ModelConfig((ModalitySpec("us", "image"),), 2, (512,), MethodConfig())
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        model = build_model(config, ImageConfig(backbone="resnet18"), {})
        fallback = load_image_weights(model, ImageConfig(backbone="resnet18"))
        assert fallback.description.startswith("random init")
        assert (fallback.source, fallback.fallback, fallback.sha256) == ("random", True, "")
        reference = torchvision.models.resnet18(weights=None)
        url = torchvision.models.ResNet18_Weights.DEFAULT.url
        cached = tmp_path / "hub" / "checkpoints" / Path(url).name
        cached.parent.mkdir(parents=True)
        torch.save(reference.state_dict(), cached)
        loaded = load_image_weights(model, ImageConfig(backbone="resnet18"))
        described = loaded.description
        assert described.startswith("ImageNet") and str(cached) in described
        assert (loaded.source, loaded.fallback) == ("imagenet", False)
        assert loaded.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
        trunk = model.encoders["us"].backbone
        assert torch.equal(trunk[0].weight, reference.conv1.weight)
        assert torch.equal(trunk[7][1].conv2.weight, reference.layer4[1].conv2.weight)
        fresh = build_model(config, ImageConfig(backbone="resnet18"), {})
        chosen = load_image_weights(fresh, ImageConfig(backbone="resnet18", pretrained="no"))
        assert chosen.description == "random init (--no-pretrained-image)"
        assert not chosen.fallback  # asked for: no warning
        assert not torch.equal(fresh.encoders["us"].backbone[0].weight, reference.conv1.weight)
    finally:
        torch.hub.set_dir(previous)
