"""The method's parts on hand-built tensors: CRA masking, DWFuse, label-free rule, losses, TLA."""

from __future__ import annotations

import inspect
import math

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
    TrainConfig,
)
from omnifuse_cli.data.prepared import PreparedCohort, Preprocessor
from omnifuse_cli.data.splits import stratified_split
from omnifuse_cli.engine.demo import SynthConfig, synth_cohort
from omnifuse_cli.engine.fitting import fit_model, mine_lazy
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.model import laziness
from omnifuse_cli.model.fusion import (
    dwfuse_loss,
    dwfuse_weights,
    label_free_log_probs,
    weights_at,
)
from omnifuse_cli.model.omnifuse import OmniFuse, drop_modalities

DIMS = (4, 5, 6)
NAMES = ("a", "b", "c")
B, M, D, C = 16, 3, 8, 3


def tiny_model(**method: object) -> OmniFuse:
    """Three vector modalities, small CRA (K=2, 16-4), no dropout so train/eval agree; the
    paper's equations unless an option says otherwise."""
    torch.manual_seed(0)
    cfg = MethodConfig(
        **{
            "embed_dim": D,
            "ra_layers": (16, 4),
            "num_ra": 2,
            "head_hidden": 8,
            "dropout": 0.0,
            "cra_dropout": 0.0,
            **PAPER_OPTIONS,
            **method,
        }
    )  # type: ignore[arg-type]
    specs = tuple(ModalitySpec(n, "vector") for n in NAMES)
    return build_model(ModelConfig(specs, C, DIMS, cfg), ImageConfig(), {})


def batch(seed: int = 1, size: int = B) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        n: {"x": torch.randn(size, d, generator=g), "mask": torch.rand(size, d, generator=g) > 0.1}
        for n, d in zip(NAMES, DIMS, strict=True)
    }
    present = torch.rand(size, M, generator=g) > 0.35
    present[:, 0] |= ~present.any(dim=1)
    y = torch.randint(0, C, (size,), generator=g)
    return inputs, present, y


def random_mask(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, M, generator=g) > 0.4
    mask[:, 1] |= ~mask.any(dim=1)
    return mask


# -- fuse: shapes and masks -------------------------------------------------------------------


def test_fuse_shapes() -> None:
    model = tiny_model()
    v = torch.randn(B, M, D)
    out = model.fuse(v, random_mask())
    assert out.v_in.shape == (B, M, D)
    assert out.v_fwd is not None and out.v_fwd.shape == (B, M, D)
    assert out.h.shape == (B, M, D)
    assert out.modality_log_probs is not None and out.modality_log_probs.shape == (B, M, C)
    assert out.joint_log_probs.shape == (B, C)
    torch.testing.assert_close(out.modality_log_probs.exp().sum(-1), torch.ones(B, M))
    torch.testing.assert_close(out.joint_log_probs.exp().sum(-1), torch.ones(B))
    pred = model.predict_from(out)
    assert pred.log_probs.shape == (B, C)
    assert pred.weights is not None and pred.weights.shape == (B, M, C)


def test_imputed_representation_keeps_observed_slots_and_imputes_masked_ones() -> None:
    model = tiny_model()
    v = torch.randn(B, M, D)
    mask = random_mask()
    assert mask.any() and (~mask).any()
    out = model.fuse(v, mask)
    assert out.v_fwd is not None
    assert torch.equal(out.h[mask], v[mask])
    assert torch.equal(out.h[~mask], out.v_fwd[~mask])
    # Eq. 2: the CRA input holds the learned missing embedding in masked slots.
    miss = model.missing.detach().unsqueeze(0).expand(B, M, D)
    assert torch.equal(out.v_in[~mask], miss[~mask])
    assert torch.equal(out.v_in[mask], v[mask])
    # The imputed slot is not just the missing embedding (the CRA adds a residual).
    assert not torch.allclose(out.h[~mask], miss[~mask])


def test_without_imputation_masked_slots_hold_the_missing_embedding() -> None:
    model = tiny_model(use_imputation=False)
    assert model.cra_forward is None and model.cra_backward is None
    v = torch.randn(B, M, D)
    mask = random_mask()
    out = model.fuse(v, mask)
    assert out.v_fwd is None
    assert torch.equal(out.h[mask], v[mask])
    miss = model.missing.detach().unsqueeze(0).expand(B, M, D)
    assert torch.equal(out.h[~mask], miss[~mask])


def test_masked_slot_content_never_reaches_the_prediction() -> None:
    model = tiny_model().eval()
    v = torch.randn(B, M, D)
    mask = random_mask()
    garbage = torch.where(mask.unsqueeze(-1), v, torch.full_like(v, 1e6))
    with torch.no_grad():
        a = model.predict_from(model.fuse(v, mask)).log_probs
        b = model.predict_from(model.fuse(garbage, mask)).log_probs
    assert torch.equal(a, b)


def test_without_dwfuse_the_concat_head_predicts() -> None:
    model = tiny_model(use_dwfuse=False)
    out = model.fuse(torch.randn(B, M, D), random_mask())
    assert out.modality_log_probs is None
    pred = model.predict_from(out)
    assert pred.weights is None
    assert torch.equal(pred.log_probs, out.joint_log_probs)


def test_inference_rules_joint_and_mean() -> None:
    model = tiny_model()
    out = model.fuse(torch.randn(B, M, D), random_mask())
    assert out.modality_log_probs is not None
    assert torch.equal(model.predict_from(out, "joint").log_probs, out.joint_log_probs)
    mean = model.predict_from(out, "mean").log_probs.exp()
    torch.testing.assert_close(mean, out.modality_log_probs.exp().mean(dim=1))
    label_free = model.predict_from(out, "label-free").log_probs
    assert not torch.allclose(label_free, out.joint_log_probs)


# -- drop_modalities --------------------------------------------------------------------------


def test_drop_modalities_invariants_on_a_mixed_batch() -> None:
    g = torch.Generator().manual_seed(0)
    present = torch.rand(5000, 4, generator=g) > 0.4
    present[:, 2] |= ~present.any(dim=1)
    mask = drop_modalities(present, 0.5, torch.Generator().manual_seed(1))
    assert not (mask & ~present).any(), "an absent modality was turned on"
    assert mask.any(dim=1).all(), "a patient was left with no modality"
    assert (mask != present).any()
    single = present.sum(dim=1) == 1
    assert torch.equal(mask[single], present[single])


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_drop_modalities_drops_about_rate_of_present_ones(rate: float) -> None:
    present = torch.ones(20000, 3, dtype=torch.bool)
    mask = drop_modalities(present, rate, torch.Generator().manual_seed(3))
    dropped = 1 - mask.float().mean().item()
    # Patients who lost all three get one back: rate - rate^3/3 are dropped in expectation.
    assert dropped == pytest.approx(rate - rate**3 / 3, abs=0.01)


def test_drop_modalities_is_deterministic_with_a_seeded_generator() -> None:
    present = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) > 0.2
    present[:, 0] |= ~present.any(dim=1)
    a = drop_modalities(present, 0.3, torch.Generator().manual_seed(7))
    b = drop_modalities(present, 0.3, torch.Generator().manual_seed(7))
    c = drop_modalities(present, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(drop_modalities(present, 0.0), present)


# -- DWFuse weights ---------------------------------------------------------------------------


def hand_weights(p: np.ndarray, beta: float) -> np.ndarray:
    """w_m(c) = prod_{n != m} (1 - p_n[c]) ** (beta / (M - 1)), written out with loops."""
    m, c = p.shape
    w = np.ones((m, c))
    for i in range(m):
        for k in range(c):
            prod = 1.0
            for n in range(m):
                if n != i:
                    prod *= 1.0 - p[n, k]
            w[i, k] = prod ** (beta / (m - 1))
    return w


def test_dwfuse_weights_match_hand_computation() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    log_probs = torch.log(torch.tensor(p, dtype=torch.float64)).unsqueeze(0)  # (1, 3, 3)
    for beta in (0.5, 1.0, 2.0):
        w = dwfuse_weights(log_probs, beta)
        assert w.shape == (1, 3, 3)
        np.testing.assert_allclose(w[0].numpy(), hand_weights(p, beta), rtol=1e-10)
    # One number by hand: w_0(0) = ((1 - 0.5)(1 - 0.1)) ** (0.5 / 2)
    assert dwfuse_weights(log_probs, 0.5)[0, 0, 0].item() == pytest.approx(0.45**0.25)


def test_dwfuse_weights_single_modality_are_ones() -> None:
    log_probs = torch.log_softmax(torch.randn(4, 1, 5), dim=-1)
    assert torch.equal(dwfuse_weights(log_probs, 0.5), torch.ones(4, 1, 5))


def test_dwfuse_weights_lower_when_others_are_confident_and_right() -> None:
    # Modality 0 is judged at the true class 0; the others are either sure of it or unsure.
    confident = torch.tensor([[[0.4, 0.3, 0.3], [0.95, 0.03, 0.02], [0.9, 0.05, 0.05]]])
    unsure = torch.tensor([[[0.4, 0.3, 0.3], [0.35, 0.35, 0.3], [0.3, 0.4, 0.3]]])
    w_conf = dwfuse_weights(confident.log(), 0.5)[0, 0, 0]
    w_unsure = dwfuse_weights(unsure.log(), 0.5)[0, 0, 0]
    assert w_conf < 0.3 < 0.6 < w_unsure
    w = dwfuse_weights(torch.log_softmax(torch.randn(8, 3, 4), -1), 0.5)
    assert bool(((w > 0) & (w <= 1)).all())


def test_dwfuse_weights_stay_finite_when_a_head_is_certain() -> None:
    log_probs = torch.log(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]).clamp(min=1e-30))
    w = dwfuse_weights(log_probs, 0.5)
    assert torch.isfinite(w).all()
    assert w[0, 0, 0].item() < 1e-2


def test_weights_at_picks_each_patients_class() -> None:
    w = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    picked = weights_at(w, torch.tensor([1, 3]))
    assert picked.tolist() == [[1.0, 5.0, 9.0], [15.0, 19.0, 23.0]]


# -- DWFuse loss ------------------------------------------------------------------------------


def test_dwfuse_loss_equals_hand_computed_sum() -> None:
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(5, 3, 4, generator=g), dim=-1)
    joint = torch.log_softmax(torch.randn(5, 4, generator=g), dim=-1)
    y = torch.tensor([0, 3, 1, 1, 2])
    alpha, beta = 0.1, 0.5
    loss, w = dwfuse_loss(log_probs, joint, y, alpha=alpha, beta=beta)
    p = log_probs.exp().numpy()
    expected = 0.0
    for b in range(5):
        wb = hand_weights(p[b], beta)[:, y[b]]
        ce = -log_probs[b, :, y[b]].numpy()
        expected += float((wb * ce).sum()) + alpha * float(-joint[b, y[b]])
        np.testing.assert_allclose(w[b].numpy(), wb, rtol=1e-5)
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)


def test_dwfuse_loss_weights_are_detached() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, 4, generator=g, requires_grad=True)
    joint_logits = torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, w = dwfuse_loss(
        torch.log_softmax(logits, -1), torch.log_softmax(joint_logits, -1), y, alpha=0.1, beta=0.5
    )
    assert not w.requires_grad
    (grad,) = torch.autograd.grad(loss, logits)

    def hand(detach: bool) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, -1)
        source = log_probs.detach() if detach else log_probs
        rest = torch.log1p(-source.exp())
        weights = torch.exp((rest.sum(1, keepdim=True) - rest) * (0.5 / 2))
        w_y = weights.gather(2, y.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(2)
        nll = -log_probs.gather(2, y.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(2)
        joint = -torch.log_softmax(joint_logits, -1).gather(1, y.view(-1, 1)).squeeze(1)
        return ((w_y * nll).sum(1) + 0.1 * joint).mean()

    (analytic,) = torch.autograd.grad(hand(detach=True), logits)
    (through_w,) = torch.autograd.grad(hand(detach=False), logits)
    torch.testing.assert_close(grad, analytic)
    # The check can tell the two apart: letting gradient flow through w changes it.
    assert not torch.allclose(grad, through_w, atol=1e-4)


# -- label-free inference ---------------------------------------------------------------------


def test_forward_and_predict_from_take_no_labels() -> None:
    for fn in (OmniFuse.forward, OmniFuse.predict_from, label_free_log_probs):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"y", "label", "labels", "target", "targets"}, fn.__name__


def test_label_free_log_probs_match_the_formula() -> None:
    g = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(4, 3, 5, generator=g), dim=-1)
    joint = torch.log_softmax(torch.randn(4, 5, generator=g), dim=-1)
    alpha, beta = 0.3, 0.7
    out, w = label_free_log_probs(log_probs, joint, alpha=alpha, beta=beta)
    p, o = log_probs.exp().numpy(), joint.exp().numpy()
    for b in range(4):
        wb = hand_weights(p[b], beta)  # (M, C): w_m(c) for each candidate class c
        s = -((wb * -np.log(p[b])).sum(0) + alpha * -np.log(o[b]))
        expected = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(out[b].exp().numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(w[b].numpy(), wb, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))


def vector_cohort_data(n: int = 60, seed: int = 0) -> tuple[OmniFuse, PreparedCohort]:
    cohort = synth_cohort(SynthConfig(n=n, dims=(4, 5, 6), signal=(1.0, 0.5, 0.2), seed=seed))
    pre = Preprocessor.fit(cohort, ImageConfig(), TextConfig())
    dims = tuple(pre.input_dim(s) for s in cohort.modalities)
    torch.manual_seed(seed)
    method = MethodConfig(embed_dim=D, ra_layers=(16, 4), num_ra=2, head_hidden=8)
    model = build_model(ModelConfig(cohort.modalities, 3, dims, method), ImageConfig(), {})
    return model, pre.prepare(cohort)


def test_predictions_do_not_depend_on_labels() -> None:
    model, data = vector_cohort_data()
    rows = np.arange(len(data))
    cpu = torch.device("cpu")
    first = infer(model, data, rows, device=cpu, batch_size=16)
    assert data.labels is not None
    data.labels = data.labels[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]
    second = infer(model, data, rows, device=cpu, batch_size=16)
    data.labels = (data.labels + 1) % 3
    third = infer(model, data, rows, device=cpu, batch_size=16)
    data.labels = None
    fourth = infer(model, data, rows, device=cpu, batch_size=16)
    for other in (second, third, fourth):
        assert np.array_equal(first.log_probs, other.log_probs)
        assert first.weights is not None and other.weights is not None
        assert np.array_equal(first.weights, other.weights)
    assert np.array_equal(first.index, rows)


# -- losses -----------------------------------------------------------------------------------


def test_losses_total_is_the_weighted_sum() -> None:
    model = tiny_model(lambda1=2.0, lambda2=3.0, lambda3=0.7)
    inputs, present, y = batch()
    lazy = torch.tensor([True, False, False])
    terms = model.losses(inputs, present, y, lazy=lazy, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"forward", "backward", "dwfuse", "tla", "total"}
    for key in ("forward", "backward", "dwfuse", "tla"):
        assert terms[key].item() > 0, key
    expected = (
        terms["forward"] + 2.0 * terms["backward"] + 3.0 * terms["dwfuse"] + 0.7 * terms["tla"]
    )
    torch.testing.assert_close(terms["total"], expected)


def test_forward_loss_is_the_complementary_target_error_over_present_slots() -> None:
    model = tiny_model(modality_drop=0.5)
    inputs, present, y = batch()
    terms = model.losses(inputs, present, y, lazy=None, generator=torch.Generator().manual_seed(4))
    mask = drop_modalities(present, 0.5, torch.Generator().manual_seed(4))
    assert (mask != present).any()
    v = model.embed(inputs, present)
    out = model.fuse(v, mask)
    assert out.v_fwd is not None
    errors = []
    for b in range(B):
        for m in range(M):
            if not present[b, m]:
                continue  # never had it: nothing to supervise
            target = model.missing[m] if mask[b, m] else v[b, m]  # Eq. 3
            errors.append(((out.v_fwd[b, m] - target) ** 2).mean())
    torch.testing.assert_close(terms["forward"], torch.stack(errors).mean())
    back, _ = model.cra_backward(out.v_fwd.reshape(B, M * D))  # type: ignore[misc]
    torch.testing.assert_close(terms["backward"], F.mse_loss(back, out.v_in.reshape(B, M * D)))


def test_tla_term_is_zero_without_a_lazy_combination_or_without_tla() -> None:
    inputs, present, y = batch()
    lazy = torch.tensor([False, True, False])
    model = tiny_model()
    assert model.losses(inputs, present, y, lazy=None)["tla"].item() == 0.0
    assert tiny_model(use_tla=False).losses(inputs, present, y, lazy=lazy)["tla"].item() == 0.0
    # With a lazy combination, L_TLA is the CE of the label-free prediction from it alone.
    terms = model.losses(inputs, present, y, lazy=lazy)
    rows = present[:, 1]
    model_out = model.fuse(model.embed(inputs, present)[rows], lazy.expand(int(rows.sum()), -1))
    expected = F.nll_loss(model.predict_from(model_out).log_probs, y[rows])
    torch.testing.assert_close(terms["tla"], expected)


def test_without_imputation_forward_and_backward_are_zero() -> None:
    inputs, present, y = batch()
    terms = tiny_model(use_imputation=False).losses(inputs, present, y, lazy=None)
    assert terms["forward"].item() == 0.0 and terms["backward"].item() == 0.0
    assert terms["dwfuse"].item() > 0
    torch.testing.assert_close(terms["total"], 10.0 * terms["dwfuse"])
    no_back = tiny_model(use_backward=False)
    assert no_back.cra_backward is None
    terms = no_back.losses(inputs, present, y, lazy=None)
    assert terms["backward"].item() == 0.0 and terms["forward"].item() > 0


def test_backward_cycle_can_be_learned() -> None:
    model = tiny_model()
    inputs, present, y = batch(size=32)
    assert model.cra_backward is not None
    optimizer = torch.optim.Adam(model.cra_backward.parameters(), lr=1e-3)
    values = []
    for _ in range(200):
        terms = model.losses(
            inputs, present, y, lazy=None, generator=torch.Generator().manual_seed(5)
        )
        optimizer.zero_grad()
        terms["backward"].backward()
        optimizer.step()
        values.append(terms["backward"].item())
    assert values[-1] < values[0] / 5


# -- TLA --------------------------------------------------------------------------------------


def test_combinations_and_availability() -> None:
    assert laziness.combinations(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert len(laziness.combinations(4)) == 15
    assert laziness.combinations(1) == [(0,)]
    present = torch.tensor(
        [[True, True, False], [True, False, True], [True, True, True], [False, True, True]]
    )
    combo = laziness.combo_mask((0, 1), 3, torch.device("cpu"))
    assert combo.tolist() == [True, True, False]
    assert laziness.available(present, combo).tolist() == [True, False, True, False]
    full = laziness.combo_mask((0, 1, 2), 3, torch.device("cpu"))
    assert laziness.available(present, full).tolist() == [False, False, True, False]
    assert laziness.combo_name((0, 2), ["labs", "us", "text"]) == "labs+text"


def test_pick_lazy_takes_the_largest_distance_and_skips_nan() -> None:
    assert laziness.pick_lazy({(0,): 0.5, (1,): 1.2, (0, 1): math.nan}) == (1,)
    assert laziness.pick_lazy({(0,): math.nan, (0, 1): 0.1}) == (0, 1)
    assert laziness.pick_lazy({(0,): math.nan}) is None


@pytest.mark.parametrize("noisy", [0, 2])
def test_tla_mining_finds_the_noise_modality(noisy: int) -> None:
    signal = [1.5, 1.5, 1.5]
    signal[noisy] = 0.0  # pure noise, unrelated to the labels
    cohort = synth_cohort(
        SynthConfig(n=300, dims=(8, 8, 8), signal=tuple(signal), missing_rate=0.2, seed=noisy)
    )
    assert cohort.labels is not None
    splits = stratified_split(cohort.labels, train=0.7, val=0.15, test=0.15, seed=0)
    pre = Preprocessor.fit(cohort.subset(splits["train"]), ImageConfig(), TextConfig())
    dims = tuple(pre.input_dim(s) for s in cohort.modalities)
    torch.manual_seed(0)
    method = MethodConfig(embed_dim=16, ra_layers=(32, 8), num_ra=2, head_hidden=16)
    model = build_model(ModelConfig(cohort.modalities, 3, dims, method), ImageConfig(), {})
    data = pre.prepare(cohort)
    records, _, _ = fit_model(
        model, data, splits, TrainConfig(epochs=3, device="cpu", seed=0), 3, lambda event: None
    )
    names = cohort.names
    assert records[-1].lazy_combo == names[noisy]
    assert set(records[-1].tla_distances) == {
        laziness.combo_name(c, names) for c in laziness.combinations(3)
    }
    distances = mine_lazy(model, data, splits["train"], device=torch.device("cpu"), batch_size=64)
    assert laziness.pick_lazy(distances) == (noisy,)
    others = [v for k, v in distances.items() if k != (noisy,)]
    assert distances[(noisy,)] > max(others) + 0.01
