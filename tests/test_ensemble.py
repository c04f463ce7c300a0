"""`--preset best`'s ensemble: Caruana's greedy selection (engine/ensemble.py) and the bagged
classical members it weighs (engine/classical.py), on probabilities and small cohorts built
here: class-dependent words in English and Chinese, numbers with NaN."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio  # type: ignore[import-untyped]
from sklearn.model_selection import StratifiedKFold

from omnifuse_cli.config import ModalitySpec
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.engine.classical import (
    KINDS,
    ClassWeight,
    FittedMember,
    MemberInputs,
    OutOfTime,
    fit_bagged_member,
    member_inputs,
    usable_kinds,
)
from omnifuse_cli.engine.classical_io import MEMBERS_FILE, TRUSTED, load_members, save_members
from omnifuse_cli.engine.ensemble import (
    METRICS,
    EnsembleFit,
    Metric,
    combine,
    greedy_selection,
    score,
)
from omnifuse_cli.errors import BundleError

FOLDS = 3


def informed(y: np.ndarray, num_classes: int, noise: float, seed: int) -> np.ndarray:
    """Probabilities that lean towards the true class by an amount drowned in ``noise``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=noise, size=(len(y), num_classes))
    logits[np.arange(len(y)), y] += 1.0
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


# --- greedy selection ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_weights_are_a_distribution(metric: Metric) -> None:
    y = labels(90, 3)
    oof = [informed(y, 3, noise, seed) for seed, noise in enumerate((0.8, 1.0, 1.5, 3.0))]
    fit = greedy_selection(oof, y, metric, iterations=20)
    assert fit.weights.shape == (4,)
    assert (fit.weights >= 0).all()
    assert math.isclose(fit.weights.sum(), 1.0, abs_tol=1e-12)
    assert len(fit.history) == 20 and len(fit.member_scores) == 4
    assert fit.ensemble_score == pytest.approx(score(metric, y, combine(oof, fit.weights)))


@pytest.mark.parametrize("metric", ["auroc", "log_loss"])
def test_a_member_that_is_always_worse_gets_no_weight(metric: Metric) -> None:
    rng = np.random.default_rng(1)
    positive = 1 / (1 + np.exp(-rng.normal(scale=2.0, size=300)))
    y = (rng.random(300) < positive).astype(np.int64)  # drawn from it: good is calibrated
    good = np.stack([1 - positive, positive], axis=1)
    flipped = good[:, ::-1]  # as sure as the good one, and always the other way
    fit = greedy_selection([flipped, good], y, metric, names=["flipped", "good"])
    assert fit.weights.tolist() == [0.0, 1.0]
    uniform = combine([flipped, good], np.array([0.5, 0.5]))
    assert fit.ensemble_score > score(metric, y, uniform) + 0.1


def test_a_dominant_member_gets_all_the_weight() -> None:
    y = labels(200, 3)
    noise = [informed(y, 3, 50.0, seed) for seed in (1, 2)]  # next to no signal
    dominant = informed(y, 3, 0.3, seed=3)
    fit = greedy_selection([*noise, dominant], y, "log_loss")
    assert fit.weights.tolist() == [0.0, 0.0, 1.0]
    assert fit.ensemble_score == pytest.approx(fit.member_scores[2])


@pytest.mark.parametrize("metric", ["auroc", "log_loss"])
def test_complementary_members_share_the_weight(metric: Metric) -> None:
    y = labels(400, 2)
    half = np.arange(len(y)) < len(y) // 2
    sharp, blind = informed(y, 2, 0.7, seed=1), informed(y, 2, 30.0, seed=2)
    first = np.where(half[:, None], sharp, blind)  # knows the first half only
    second = np.where(half[:, None], blind, sharp)  # and this one the second
    fit = greedy_selection([first, second], y, metric)
    assert (fit.weights > 0).all()
    assert fit.ensemble_score >= max(fit.member_scores)
    assert fit.ensemble_score > max(fit.member_scores) + 0.01


def test_equal_members_tie_to_the_lower_index() -> None:
    y = labels(60, 2)
    same = informed(y, 2, 1.0, seed=0)
    assert greedy_selection([same, same.copy()], y, "auroc").weights.tolist() == [1.0, 0.0]


def test_ensemble_fit_round_trips_through_json() -> None:
    y = labels(60, 2)
    oof = [informed(y, 2, 1.0, seed) for seed in range(3)]
    fit = greedy_selection(oof, y, "macro_f1", iterations=10, names=["a", "b", "c"])
    fit = EnsembleFit(**{**fit.__dict__, "member_scores": [math.nan, *fit.member_scores[1:]]})
    back = EnsembleFit.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert back.names == ["a", "b", "c"] and back.metric == "macro_f1"
    np.testing.assert_array_equal(back.weights, fit.weights)
    assert math.isnan(back.member_scores[0]) and back.member_scores[1:] == fit.member_scores[1:]
    assert back.history == fit.history
    with pytest.raises(ValueError, match="not a distribution"):
        EnsembleFit.from_dict({**fit.to_dict(), "weights": [0.5, 0.2, 0.2]})
    with pytest.raises(ValueError, match="unknown ensemble metric"):
        EnsembleFit.from_dict({**fit.to_dict(), "metric": "f2"})


def test_scores_survive_a_class_absent_from_y() -> None:
    y = np.array([0, 1, 0, 0, 1, 0])  # three classes predicted, two present
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]] * 2)
    for metric in METRICS:
        assert math.isfinite(score(metric, y, probs)), metric
    assert score("auroc", y, probs) == pytest.approx(1.0)
    assert math.isnan(score("auroc", np.zeros(6, dtype=int), probs))
    all_wrong = np.eye(3)[[1, 0, 1, 1, 0, 1]]
    assert score("log_loss", y, all_wrong) == pytest.approx(math.log(1e-12))  # clipped, finite


def test_combine_needs_no_probabilities_of_an_unused_member() -> None:
    p = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(combine([p, None], np.array([1.0, 0.0])), p)
    with pytest.raises(ValueError, match="non-zero weight"):
        combine([p, None], np.array([0.5, 0.5]))


# --- classical members -----------------------------------------------------------------------

WORDS = {
    0: ("cough", "stable", "咳嗽", "良性"),
    1: ("fever", "sepsis", "发热", "恶性"),
    2: ("rash", "itch", "皮疹", "瘙痒"),
}
FILLER = ("patient", "seen", "today", "患者", "复诊")


def make_cohort(n: int, num_classes: int, *, seed: int = 0) -> Cohort:
    """Notes (a tenth missing) that name their class's words more often than the others', and
    three lab values: the first tells the class, the others are noise, 20% NaN throughout."""
    rng = np.random.default_rng(seed)
    y = labels(n, num_classes, seed)
    notes: list[str | None] = []
    for label in y:
        if rng.random() < 0.1:
            notes.append(None)
            continue
        own = rng.choice(WORDS[int(label)], size=2)
        other = rng.choice(WORDS[int(rng.integers(num_classes))], size=1)
        notes.append(" ".join(rng.permutation([*own, *other, *rng.choice(FILLER, size=3)])))
    labs = rng.normal(size=(n, 3)).astype(np.float32)
    labs[:, 0] += 2 * y
    labs[rng.random(labs.shape) < 0.2] = np.nan
    modalities = (
        ModalitySpec("labs", "vector"),
        ModalitySpec("us", "image"),
        ModalitySpec("note", "text"),
    )
    return Cohort(
        source=Path("manifest.csv"),
        ids=[f"p{i}" for i in range(n)],
        labels=y.astype(np.int64),
        modalities=modalities,
        vectors={"labs": labs},
        vector_columns={"labs": ["crp", "wbc", "na"]},
        texts={"note": notes},
        present=np.ones((n, 3), dtype=bool),
    )


def fold_numbers(y: np.ndarray, seed: int = 0) -> np.ndarray:
    folds = np.zeros(len(y), dtype=np.int64)
    split = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(y, y)
    for k, (_, held) in enumerate(split):
        folds[held] = k
    return folds


@pytest.fixture(scope="module")
def binary() -> tuple[MemberInputs, np.ndarray, np.ndarray, list[FittedMember]]:
    cohort = make_cohort(150, 2)
    assert cohort.labels is not None
    inputs, y = member_inputs(cohort), cohort.labels
    folds, kinds = fold_numbers(y), usable_kinds(inputs)
    # One thread: OpenMP's spinning threads make the trees 10-100 times slower on a busy machine.
    members = [fit_bagged_member(k, inputs, y, folds, 2, seed=0, threads=1) for k in kinds]
    return inputs, y, folds, members


def test_member_inputs_join_notes_and_numbers() -> None:
    cohort = make_cohort(20, 2)
    cohort.texts["note"][0] = None
    inputs = member_inputs(cohort)
    assert inputs.texts[0] == "" and inputs.texts[1] == cohort.texts["note"][1]
    assert inputs.numbers.shape == (20, 3) and inputs.numbers.dtype == np.float64
    assert inputs.number_names == ["labs:crp", "labs:wbc", "labs:na"]
    assert np.isnan(inputs.numbers).any()
    assert usable_kinds(inputs) == KINDS
    images_only = Cohort(
        source=Path("m.csv"),
        ids=["a", "b"],
        labels=np.array([0, 1]),
        modalities=(ModalitySpec("us", "image"),),
        present=np.ones((2, 1), dtype=bool),
    )
    empty = member_inputs(images_only)
    assert empty.texts == ["", ""] and empty.numbers.shape == (2, 0)
    assert usable_kinds(empty) == ()


def test_bagged_members_predict_out_of_fold(
    binary: tuple[MemberInputs, np.ndarray, np.ndarray, list[FittedMember]],
) -> None:
    inputs, y, folds, members = binary
    assert [m.name for m in members] == ["tfidf_logistic", "hist_gradient_boosting"]
    for member in members:
        assert member.oof_probs is not None
        assert member.oof_probs.shape == (len(y), 2)
        np.testing.assert_allclose(member.oof_probs.sum(axis=1), 1.0)
        assert len(member.folds) == FOLDS
        for k, fold in enumerate(member.folds):
            assert fold.trained_on is not None
            np.testing.assert_array_equal(fold.trained_on, np.flatnonzero(folds != k))
            held = np.flatnonzero(folds == k)  # its OOF rows: this model's, and it never saw them
            np.testing.assert_allclose(
                member.oof_probs[held], fold.predict_proba(inputs.subset(held), 2)
            )
        assert score("auroc", y, member.oof_probs) > 0.8, member.name
        assert member.meta()["folds"] == FOLDS
    assert members[0].meta()["C"] == [f.chosen["C"] for f in members[0].folds]


def test_members_save_and_load_with_trusted_types_only(
    binary: tuple[MemberInputs, np.ndarray, np.ndarray, list[FittedMember]], tmp_path: Path
) -> None:
    inputs, _, _, members = binary
    save_members(tmp_path, members)
    listing = json.loads((tmp_path / MEMBERS_FILE).read_text(encoding="utf-8"))
    assert [e["name"] for e in listing["members"]] == [m.name for m in members]
    assert listing["members"][0]["classes"] == [0, 1]
    for member in members:
        untrusted = set(sio.get_untrusted_types(file=tmp_path / f"{member.name}.skops"))
        assert untrusted <= set(TRUSTED), untrusted - set(TRUSTED)
    loaded = load_members(tmp_path)
    assert [m.name for m in loaded] == [m.name for m in members]
    for before, after in zip(members, loaded, strict=True):
        np.testing.assert_array_equal(
            before.predict_proba(inputs, 1), after.predict_proba(inputs, 1)
        )
        assert after.oof_probs is None and after.folds[0].trained_on is None


@pytest.mark.parametrize("keep", ["text", "numbers"])
def test_members_fit_one_kind_of_input_and_several_classes(keep: str, tmp_path: Path) -> None:
    """Text alone, numbers alone, three classes, class weights: every kind fits and predicts,
    and the bundle still needs no type beyond TRUSTED."""
    cohort = make_cohort(90, 3, seed=1)
    assert cohort.labels is not None
    full = member_inputs(cohort)
    inputs = (
        MemberInputs(full.texts, np.zeros((90, 0)), [])
        if keep == "text"
        else MemberInputs([""] * 90, full.numbers, full.number_names)
    )
    y, folds = cohort.labels, fold_numbers(cohort.labels, seed=1)
    # A dict with numpy scalars, as a caller may pass, and scikit-learn's "balanced".
    weights: list[ClassWeight] = [{0: np.float64(1.0), 1: 2.0, 2: 1.0}, "balanced"]
    members = [
        fit_bagged_member(
            kind, inputs, y, folds, 3, seed=1, metric="log_loss", class_weight=w, threads=1
        )
        for kind, w in zip(usable_kinds(inputs), weights, strict=True)
    ]
    save_members(tmp_path, members)
    for member in members:
        assert member.oof_probs is not None and member.oof_probs.shape == (90, 3)
        assert score("auroc", y, member.oof_probs) > 0.7, member.name
        untrusted = set(sio.get_untrusted_types(file=tmp_path / f"{member.name}.skops"))
        assert untrusted <= set(TRUSTED), untrusted - set(TRUSTED)
    for before, after in zip(members, load_members(tmp_path), strict=True):
        np.testing.assert_array_equal(
            before.predict_proba(inputs, 1), after.predict_proba(inputs, 1)
        )


class Payload:
    """A type no bundle may hold: skops would have to build an object of this module."""


def test_loading_refuses_untrusted_or_damaged_files(
    binary: tuple[MemberInputs, np.ndarray, np.ndarray, list[FittedMember]], tmp_path: Path
) -> None:
    save_members(tmp_path, binary[3])
    bad = tmp_path / "hist_gradient_boosting.skops"
    bad.write_bytes(sio.dumps({"kind": "hgb", "folds": [{"estimator": Payload()}]}))
    with pytest.raises(BundleError, match=r"hist_gradient_boosting\.skops holds types") as info:
        load_members(tmp_path)
    assert "test_ensemble.Payload" in str(info.value)
    bad.write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match=r"cannot read .*hist_gradient_boosting\.skops"):
        load_members(tmp_path)
    bad.write_bytes(sio.dumps({"kind": "hgb", "folds": [{"estimator": None}]}))
    with pytest.raises(BundleError, match="is not a HistGradientBoostingClassifier"):
        load_members(tmp_path)
    (tmp_path / MEMBERS_FILE).write_text('{"format": "x"}', encoding="utf-8")
    with pytest.raises(BundleError, match="not an omnifuse members file"):
        load_members(tmp_path)


def test_a_passed_deadline_stops_the_member(
    binary: tuple[MemberInputs, np.ndarray, np.ndarray, list[FittedMember]],
) -> None:
    inputs, y, folds, _ = binary
    with pytest.raises(OutOfTime, match="before fold 1 of 3"):
        fit_bagged_member("hgb", inputs, y, folds, 2, seed=0, deadline=time.monotonic() - 1)
