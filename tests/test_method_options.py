"""The method options of method.md Sec. 5: reliability gate, modality dropout for every variant,
normalized imputation loss, slot flags, joint-head input, TLA minimum, selection score."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnifuse_cli.config import (
    PAPER_OPTIONS,
    ImageConfig,
    MethodConfig,
    ModalitySpec,
    ModelConfig,
    TextConfig,
    from_primitive,
    to_primitive,
)
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.engine.demo import SynthConfig, synth_cohort
from omnifuse_cli.engine.fitting import mine_lazy, selection_key
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.engine.reliability import estimate_reliability
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.model.fusion import label_free_log_probs
from omnifuse_cli.model.omnifuse import OmniFuse, drop_modalities
from omnifuse_cli.settings import parse_widths
from tests.helpers import assert_ok, assert_user_error, invoke
from tests.test_cli import TRAIN_ARGS

NAMES, DIMS = ("m1", "m2", "m3"), (4, 5, 6)  # synth_cohort's names
B, M, D, C = 24, 3, 8, 3


def model_with(**method: object) -> OmniFuse:
    torch.manual_seed(0)
    cfg = MethodConfig(
        **{
            "embed_dim": D,
            "ra_layers": (16, 4),
            "num_ra": 2,
            "head_hidden": 8,
            "dropout": 0.0,
            "cra_dropout": 0.0,
            **method,
        }
    )  # type: ignore[arg-type]
    specs = tuple(ModalitySpec(n, "vector") for n in NAMES)
    return build_model(ModelConfig(specs, C, DIMS, cfg), ImageConfig(), {})


def embeddings_and_mask(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, M, D, generator=g)
    mask = torch.rand(B, M, generator=g) > 0.5
    mask[:, 0] |= ~mask.any(dim=1)
    return v, mask


# -- reliability gate -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["label-free", "mean", "joint"])
def test_reliability_zero_reproduces_no_imputation_exactly(rule: str) -> None:
    gated = model_with(reliability="0", joint_input="slots", inference_rule=rule)
    plain = model_with(use_imputation=False, inference_rule=rule)
    # Same encoders, heads, joint head and missing embeddings; only the CRA differs.
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and all(k.startswith(("cra_", "reliability")) for k in unexpected)
    v, mask = embeddings_and_mask()
    gated.eval(), plain.eval()
    a, b = gated.predict_from(gated.fuse(v, mask)), plain.predict_from(plain.fuse(v, mask))
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
    # And the CRA really is there: at reliability 1 the imputed slots change the prediction.
    gated.reliability.fill_(1.0)
    assert not torch.allclose(gated.predict_from(gated.fuse(v, mask)).log_probs, a.log_probs)


def test_reliability_zero_ignores_what_imputed_heads_say() -> None:
    model = model_with(reliability="0")
    v, mask = embeddings_and_mask()
    out = model.fuse(v, mask)
    assert torch.equal(out.gate, mask.float())
    pred = model.predict_from(out)
    assert pred.weights is not None
    assert (pred.weights[~mask] == 0).all() and (pred.weights[mask] > 0).all()
    assert out.modality_log_probs is not None
    scrambled = out.modality_log_probs.clone()
    scrambled[~mask] = torch.log_softmax(torch.randn(int((~mask).sum()), C), dim=-1)
    a, _ = label_free_log_probs(
        out.modality_log_probs, out.joint_log_probs, alpha=0.1, beta=0.5, gate=out.gate
    )
    b, _ = label_free_log_probs(scrambled, out.joint_log_probs, alpha=0.1, beta=0.5, gate=out.gate)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reliability_one_is_the_papers_rule() -> None:
    model = model_with(reliability="1")
    v, mask = embeddings_and_mask()
    out = model.fuse(v, mask)
    assert out.v_fwd is not None and out.modality_log_probs is not None
    assert torch.equal(out.h[~mask], out.v_fwd[~mask])  # the imputed slot, untouched
    expected, _ = label_free_log_probs(
        out.modality_log_probs, out.joint_log_probs, alpha=0.1, beta=0.5
    )  # Eq. 10 with no gate
    torch.testing.assert_close(model.predict_from(out).log_probs, expected)


def test_partial_reliability_blends_the_imputed_slot() -> None:
    model = model_with(reliability="0.25")
    v, mask = embeddings_and_mask()
    out = model.fuse(v, mask)
    assert out.v_fwd is not None
    miss = model.missing.unsqueeze(0).expand(B, M, D)
    expected = 0.25 * out.v_fwd + 0.75 * miss
    torch.testing.assert_close(out.h[~mask], expected[~mask])
    assert torch.equal(out.gate[~mask], torch.full((int((~mask).sum()),), 0.25))


def tiny_cohort_data(n: int = 120, seed: int = 0):  # type: ignore[no-untyped-def]
    cohort = synth_cohort(
        SynthConfig(n=n, dims=DIMS, signal=(1.5, 1.5, 1.5), missing_rate=0.2, seed=seed)
    )
    pre = Preprocessor.fit(cohort, ImageConfig(), TextConfig())
    return cohort, pre.prepare(cohort)


def test_estimated_reliability_is_the_held_out_imputation_r2() -> None:
    cohort, data = tiny_cohort_data()
    model = model_with()  # reliability auto: starts at 0
    assert torch.equal(model.reliability, torch.zeros(M))
    idx = np.arange(len(cohort))
    got = estimate_reliability(model, data, idx, device=torch.device("cpu"), batch_size=32)
    torch.testing.assert_close(model.reliability, torch.as_tensor(got, dtype=torch.float32))
    # By hand, patient by patient.
    present = torch.as_tensor(cohort.present)
    inputs = {n: dict(zip(("x", "mask"), data.vectors[n], strict=True)) for n in NAMES}
    with torch.no_grad():
        v = model.embed(inputs, present)
        for k in range(M):
            rows = present[:, k] & (present.sum(dim=1) >= 2)
            mask = present[rows].clone()
            mask[:, k] = False
            imputed = model.fuse(v[rows], mask).v_fwd[:, k]  # type: ignore[index]
            real = v[rows, k]
            r2 = 1 - ((imputed - real) ** 2).sum() / ((real - real.mean(0)) ** 2).sum()
            assert got[k] == pytest.approx(float(r2.clamp(0, 1)), abs=1e-4)


def test_estimated_reliability_keeps_the_old_value_with_too_few_patients() -> None:
    cohort, data = tiny_cohort_data()
    model = model_with(reliability="auto")
    model.reliability.fill_(0.4)
    got = estimate_reliability(
        model, data, np.arange(5), device=torch.device("cpu"), batch_size=32, min_patients=10
    )
    assert np.allclose(got, 0.4)


# -- modality dropout, imputation loss, slot flags, joint input -------------------------------


def batch_inputs(seed: int = 1) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        n: {"x": torch.randn(B, d, generator=g), "mask": torch.ones(B, d, dtype=torch.bool)}
        for n, d in zip(NAMES, DIMS, strict=True)
    }
    present = torch.rand(B, M, generator=g) > 0.2
    present[:, 0] |= ~present.any(dim=1)
    return inputs, present, torch.randint(0, C, (B,), generator=g)


def test_modality_dropout_trains_the_variant_without_imputation_on_both_views() -> None:
    model = model_with(use_imputation=False, modality_drop=0.5)
    inputs, present, y = batch_inputs()
    terms = model.losses(inputs, present, y, lazy=None, generator=torch.Generator().manual_seed(7))
    mask = drop_modalities(present, 0.5, torch.Generator().manual_seed(7))
    assert (mask != present).any()
    v = model.embed(inputs, present)
    views = [model._classification_loss(model.fuse(v, m), y) for m in (mask, present)]
    torch.testing.assert_close(terms["dwfuse"], torch.stack(views).mean())
    only_dropped = model_with(use_imputation=False, modality_drop=0.5, drop_full_view=False)
    terms = only_dropped.losses(
        inputs, present, y, lazy=None, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(terms["dwfuse"], views[0])


def test_normalized_imputation_loss_is_over_dropped_slots_and_scale_free() -> None:
    model = model_with(modality_drop=0.5, imputation_loss="normalized")
    inputs, present, y = batch_inputs()
    gen = torch.Generator().manual_seed(5)
    terms = model.losses(inputs, present, y, lazy=None, generator=gen)
    mask = drop_modalities(present, 0.5, torch.Generator().manual_seed(5))
    v = model.embed(inputs, present)
    out = model.fuse(v, mask)
    errors = [
        (
            (
                F.layer_norm(out.v_fwd[b, m], (D,))  # type: ignore[index]
                - F.layer_norm(v[b, m], (D,))
            )
            ** 2
        ).mean()
        for b in range(B)
        for m in range(M)
        if present[b, m] and not mask[b, m]
    ]
    torch.testing.assert_close(terms["forward"], torch.stack(errors).mean())
    # The same imputation error at ten times the embedding scale costs the same.
    scaled = out.v_fwd * 10  # type: ignore[operator]
    big = model._imputation_losses(
        v * 10,
        present,
        mask,
        type(out)(
            out.v_in * 10, scaled, out.h, out.gate, out.modality_log_probs, out.joint_log_probs
        ),
    )
    torch.testing.assert_close(big[0], terms["forward"], rtol=1e-3, atol=1e-5)  # LN eps
    torch.testing.assert_close(
        terms["total"], 10.0 * terms["forward"] + terms["backward"] + 10.0 * terms["dwfuse"]
    )


def test_slot_flags_tell_heads_whether_a_slot_is_imputed() -> None:
    model = model_with(slot_flags=True, reliability="1")
    assert model.modality_heads is not None
    assert model.modality_heads[0][0].in_features == D + 1
    v, _ = embeddings_and_mask()
    mask = torch.ones(B, M, dtype=torch.bool)
    out = model.fuse(v, mask)
    # Feed the same slot content once as observed and once flagged as imputed.
    flagged = torch.cat([out.h, torch.ones(B, M, 1)], dim=-1)
    logits = model.modality_heads[0](flagged[:, 0])
    assert not torch.allclose(torch.log_softmax(logits, -1), out.modality_log_probs[:, 0])  # type: ignore[index]
    assert model_with(slot_flags=False).modality_heads[0][0].in_features == D  # type: ignore[index]


@pytest.mark.parametrize(
    ("joint_input", "width"), [("latents", 8), ("slots", M * D), ("both", 8 + M * D)]
)
def test_joint_head_input(joint_input: str, width: int) -> None:
    model = model_with(joint_input=joint_input)
    assert model.joint_head[0].in_features == width
    v, mask = embeddings_and_mask()
    assert model.fuse(v, mask).joint_log_probs.shape == (B, C)


# -- TLA minimum, selection score, configs ----------------------------------------------------


def test_tla_ignores_combinations_too_few_patients_have() -> None:
    cohort, data = tiny_cohort_data(n=60)
    model = model_with()
    idx = np.arange(len(cohort))
    every = mine_lazy(model, data, idx, device=torch.device("cpu"), batch_size=32)
    full = (0, 1, 2)
    have_all = int(cohort.present.all(axis=1).sum())
    assert 0 < have_all < 60 and not math.isnan(every[full])
    strict = mine_lazy(
        model, data, idx, device=torch.device("cpu"), batch_size=32, min_patients=have_all + 1
    )
    assert math.isnan(strict[full]) and strict[(0,)] == pytest.approx(every[(0,)])


def test_selection_key() -> None:
    a = {"macro_f1": 0.8, "loss": 0.6, "auroc": 0.90}
    b = {"macro_f1": 0.7, "loss": 0.5, "auroc": 0.92}
    assert selection_key(a, "macro_f1") > selection_key(b, "macro_f1")
    assert selection_key(b, "loss") > selection_key(a, "loss")
    assert selection_key(b, "auroc") > selection_key(a, "auroc")


def test_old_bundles_keep_the_papers_settings() -> None:
    raw = to_primitive(MethodConfig(dropout=0.2))
    for key in (
        "reliability",
        "slot_flags",
        "joint_input",
        "imputation_loss",
        "lambda0",
        "drop_full_view",
        "tla_min_patients",
        "cra_dropout",
        "linear_path",
    ):
        del raw[key]
    rebuilt = from_primitive(MethodConfig, raw)
    for key, value in PAPER_OPTIONS.items():
        assert getattr(rebuilt, key) == value, key
    assert rebuilt.cra_dropout == 0.2
    assert from_primitive(MethodConfig, to_primitive(MethodConfig())) == MethodConfig()


@pytest.mark.parametrize("value", ["auto", "0", "0.5", "1"])
def test_reliability_values(value: str) -> None:
    assert MethodConfig(reliability=value).reliability == value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reliability": "1.5"}, "--reliability"),
        ({"reliability": "sometimes"}, "--reliability"),
        ({"joint_input": "heads"}, "--joint-input"),
        ({"imputation_loss": "l1"}, "--imputation-loss"),
        ({"tla_min_patients": 0}, "--tla-min-patients"),
        ({"lambda0": -1.0}, "--lambda0"),
    ],
)
def test_bad_method_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MethodConfig(**kwargs)


def test_parse_widths() -> None:
    assert parse_widths("128, 32") == (128, 32)
    with pytest.raises(ConfigError, match="--ra-layers"):
        parse_widths("128,x")


def test_cli_options_reach_the_run(tiny_manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke(
        "train",
        tiny_manifest,
        "--out-dir",
        run,
        *TRAIN_ARGS,
        "--reliability",
        "0.5",
        "--joint-input",
        "both",
        "--select-by",
        "loss",
        "--ra-layers",
        "32,8",
        "--num-ra",
        "2",
        "--imputation-loss",
        "paper",
        "--lambda0",
        "1",
    )
    assert_ok(result)
    assert "best validation log-loss" in " ".join(result.output.split())
    meta = dict(
        line.split(",", 1)
        for line in (run / "meta.csv").read_text(encoding="utf-8").splitlines()[1:]
    )
    assert meta["reliability"] == "0.5" and meta["joint_input"] == "both"
    assert meta["select_metric"] == "log_loss" and meta["ra_layers"] == '"[32, 8]"'
    bad = invoke(
        "train", tiny_manifest, "--out-dir", tmp_path / "bad", *TRAIN_ARGS, "--reliability", "2"
    )
    assert_user_error(bad, "--reliability")
