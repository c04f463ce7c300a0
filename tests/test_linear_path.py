"""The linear path (method.md Sec. 5.6): a logistic regression on the sparse inputs, fitted by
scikit-learn after training and blended with OmniFuse on validation patients."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omnifuse_cli.config import MethodConfig, from_primitive, to_primitive
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.linear_path import _fit_blend, design_matrix
from omnifuse_cli.engine.prediction import PredictRequest, predict_patients
from omnifuse_cli.engine.training import run_training

from .conftest import tiny_request


@pytest.fixture(scope="module")
def runs(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    out = {}
    for linear in (True, False):
        request = tiny_request(tiny_manifest, tmp_path_factory.mktemp(f"linear{linear}"), epochs=2)
        # 12 validation patients: enough for the blend (MIN_VALIDATION)
        request = dataclasses.replace(
            request,
            method=dataclasses.replace(request.method, linear_path=linear),
            train=dataclasses.replace(
                request.train, train_ratio=0.5, val_ratio=0.4, test_ratio=0.1
            ),
        )
        out[linear] = run_training(request).out_dir
    return out


def test_the_fitted_path_is_scikit_learns_logistic_regression(
    runs: dict[bool, Path], tiny_manifest: Path
) -> None:
    """The buffers reproduce the fitted model's decision function on every patient, from the
    same batches the model sees (tf-idf rows, standardised labs, presence)."""
    bundle = load_bundle(runs[True], torch.device("cpu"))
    model = bundle.model
    assert model.linear is not None and model.linear.fitted
    meta = dict(pd.read_csv(runs[True] / "meta.csv", dtype=str).values)
    assert float(meta["linear_blend_omnifuse"]) >= 0 and float(meta["linear_blend_linear"]) >= 0
    assert float(meta["val_log_loss_blend"]) <= float(meta["val_log_loss_omnifuse"])
    cohort = read_manifest(tiny_manifest, model.config.modalities)
    data = bundle.preprocessor.prepare(cohort)
    rows = np.arange(len(cohort))
    x = design_matrix(model, data, rows)
    coef = np.concatenate(
        [getattr(model.linear, f"{kind}_{name}").numpy() for _, name, kind in model.linear.terms]
        + [model.linear.presence.numpy()]
    )
    expected = x @ coef + model.linear.intercept.numpy()
    from omnifuse_cli.engine.inference import loader

    got = []
    for batch in loader(data, rows, batch_size=7):
        got.append(model.linear.logits(batch["inputs"], batch["present"]))
    np.testing.assert_allclose(torch.cat(got).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_without_the_path_the_output_is_omnifuse_alone(
    runs: dict[bool, Path], tiny_manifest: Path
) -> None:
    bundle = load_bundle(runs[True], torch.device("cpu"))
    model = bundle.model
    cohort = read_manifest(tiny_manifest, model.config.modalities)
    data = bundle.preprocessor.prepare(cohort)
    rows = np.arange(len(cohort))
    blended = infer(model, data, rows, device=torch.device("cpu")).log_probs
    a, b = model.linear.blend.tolist()
    with torch.no_grad():
        model.linear.blend.copy_(torch.tensor([1.0, 0.0]))
        model.linear.bias.zero_()
    alone = infer(model, data, rows, device=torch.device("cpu")).log_probs
    if b > 0:
        assert not np.allclose(blended, alone)
    assert np.allclose(np.exp(alone).sum(1), 1.0, atol=1e-5)
    plain = load_bundle(runs[False], torch.device("cpu")).model
    assert plain.linear is None


def test_the_blend_never_uses_a_part_against_its_own_prediction() -> None:
    rng = np.random.default_rng(0)
    y = torch.as_tensor(rng.integers(0, 2, 200))
    good = torch.stack([torch.zeros(200), 3.0 * (2 * y - 1) + torch.randn(200)], dim=1).double()
    noise = torch.randn(200, 2, dtype=torch.float64)
    omni = torch.log_softmax(noise, dim=1)
    a, b, bias, before, after = _fit_blend(omni, good, y)
    assert b > 0 and a >= 0 and after < before
    # an anti-informative OmniFuse is not used the other way round: its weight is 0
    anti = torch.log_softmax(-2.0 * good, dim=1)
    a, b, *_ = _fit_blend(anti, good, y)
    assert a == 0.0 and b > 0
    # too few validation patients: OmniFuse alone
    assert _fit_blend(omni[:5], good[:5], y[:5])[:2] == (1.0, 0.0)


def test_runs_written_before_the_path_load_without_it() -> None:

    raw = to_primitive(MethodConfig())
    del raw["linear_path"]
    assert from_primitive(MethodConfig, raw).linear_path is False


def test_predict_uses_the_blend(runs: dict[bool, Path], tiny_manifest: Path) -> None:
    frame = predict_patients(
        PredictRequest(run_dir=runs[True], patients=tiny_manifest, device="cpu")
    ).frame
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (frame["pred"].astype(int) == probs.argmax(1)).all()
