"""benchmarks/fair_baselines.py: the missingness augmentation, the design matrices, the
patient-grouped inner folds and the four classical baselines given OmniFuse's chance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import load_benchmark

STRENGTH = {"labs": 0.5, "us": 0.3, "note": 0.8}
SMALL_GRID = {
    "learning_rate": [0.1],
    "max_leaf_nodes": [15],
    "min_samples_leaf": [10],
    "l2_regularization": [0.0, 1.0],
}
KEYS = ("hgb", "logreg", "late_mean", "best_single")


@pytest.fixture(scope="module")
def fb():
    return load_benchmark("fair_baselines", "omnifuse_fair_baselines")


def make(fb, key: str):
    if key == "hgb":
        return fb.HGBConcat(grid=SMALL_GRID, max_iter=100)
    return {
        "logreg": fb.LogRegConcat,
        "late_mean": fb.LateFusionMean,
        "best_single": fb.BestSingle,
    }[key]()


@pytest.fixture(scope="module")
def data(fb):
    """300 patients, 3 classes: 5-d dense labs, 40-d dense image, 30-column sparse note, each
    informative, ~40% of modalities missing, at least one present."""
    blocks, y = fb.synthetic_blocks(300, seed=1, labs=5, image=40, note=30, strength=STRENGTH)
    return blocks, y, np.arange(200), np.arange(200, 300)


@pytest.fixture(scope="module")
def fitted(fb, data):
    blocks, y, train, _ = data
    return {key: make(fb, key).fit(blocks, y, train, seed=0) for key in KEYS}


def test_synthetic_blocks_shape(data):
    blocks, y, _, _ = data
    assert blocks.names == ("labs", "us", "note")
    assert blocks.x["labs"].shape == (300, 5) and blocks.x["us"].shape == (300, 40)
    assert sp.issparse(blocks.x["note"]) and blocks.x["note"].shape == (300, 30)
    assert blocks.present.any(axis=1).all()
    assert 0.3 < 1 - blocks.present.mean() < 0.5
    assert set(np.unique(y)) == {0, 1, 2}


# --- augment ---------------------------------------------------------------------------------


def test_augment_keeps_originals_and_never_shows_absent_modalities(fb, data):
    blocks, _, train, _ = data
    rows, masks = fb.augment(blocks.present, train, copies=3, rate=0.5, seed=7)
    n = len(train)
    assert rows.shape == (4 * n,) and masks.shape == (4 * n, 3) and masks.dtype == bool
    np.testing.assert_array_equal(rows[:n], train)
    np.testing.assert_array_equal(masks[:n], blocks.present[train])
    np.testing.assert_array_equal(rows, np.tile(train, 4))
    assert not (masks & ~blocks.present[rows]).any()  # nothing a patient lacks is shown
    assert masks.any(axis=1).all()  # every row keeps at least one
    hidden = (blocks.present[rows] & ~masks)[n:].sum() / blocks.present[rows][n:].sum()
    assert 0.3 < hidden < 0.5  # about the rate, a little less for the kept ones


def test_augment_rate_zero_and_determinism(fb, data):
    blocks, _, train, _ = data
    rows, masks = fb.augment(blocks.present, train, copies=2, rate=0.0, seed=1)
    np.testing.assert_array_equal(masks, blocks.present[rows])
    a = fb.augment(blocks.present, train, copies=2, rate=0.3, seed=5)
    b = fb.augment(blocks.present, train, copies=2, rate=0.3, seed=5)
    c = fb.augment(blocks.present, train, copies=2, rate=0.3, seed=6)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    rows, masks = fb.augment(blocks.present, train, copies=0, rate=0.3, seed=5)
    np.testing.assert_array_equal(rows, train)


def test_augment_keeps_exactly_one_when_all_would_be_hidden(fb):
    present = np.array([[True, True, False], [True, True, True], [False, False, True]])
    rows, masks = fb.augment(present, np.arange(3), copies=20, rate=1.0, seed=0)
    assert (masks[3:].sum(axis=1) == 1).all()
    assert not (masks & ~present[rows]).any()


# --- design ----------------------------------------------------------------------------------


def test_design_dense_nan_where_hidden_and_indicators(fb, data):
    blocks, _, train, _ = data
    rows, masks = fb.augment(blocks.present, train[:50], copies=1, rate=0.5, seed=0)
    x = fb.design(blocks, rows, masks, dense=True)
    assert isinstance(x, np.ndarray) and x.shape == (100, 5 + 40 + 30 + 3)
    spans = {"labs": slice(0, 5), "us": slice(5, 45), "note": slice(45, 75)}
    for j, name in enumerate(blocks.names):
        part = x[:, spans[name]]
        shown = masks[:, j]
        assert np.isnan(part[~shown]).all()
        full = blocks.x[name][rows[shown]]
        full = full.toarray() if sp.issparse(full) else full
        np.testing.assert_array_equal(part[shown], full)
    np.testing.assert_array_equal(x[:, 75:], (~masks).astype(float))
    assert fb.design(blocks, rows, masks, dense=True, indicators=False).shape == (100, 75)


def test_design_sparse_zero_where_hidden(fb, data):
    blocks, _, train, _ = data
    rows, masks = fb.augment(blocks.present, train[:50], copies=1, rate=0.5, seed=0)
    x = fb.design(blocks, rows, masks, dense=False)
    assert sp.issparse(x) and x.format == "csr" and x.shape == (100, 78)
    dense = fb.design(blocks, rows, masks, dense=True)
    np.testing.assert_array_equal(x.toarray(), np.nan_to_num(dense, nan=0.0))
    # A mask that shows a modality the patient lacks is ignored.
    everything = np.ones_like(masks)
    np.testing.assert_array_equal(
        fb.design(blocks, rows, everything, dense=False).toarray()[:, 75:],
        (~blocks.present[rows]).astype(float),
    )


# --- inner folds -----------------------------------------------------------------------------


def test_inner_folds_never_split_a_patients_copies(fb, data):
    blocks, y, train, _ = data
    rows, _ = fb.augment(blocks.present, train, copies=2, rate=0.3, seed=0)
    n = len(train)
    folds = fb.inner_folds(rows, y[rows], n, cv=3, seed=4)
    assert len(folds) == 3
    seen = []
    for fit_pos, val_pos in folds:
        assert (val_pos < n).all()  # validation: original rows only
        fit_patients, val_patients = set(rows[fit_pos]), set(rows[val_pos])
        assert not fit_patients & val_patients
        assert fit_patients | val_patients == set(train)
        # every copy of every fitting patient is in the fit side
        assert len(fit_pos) == 3 * len(fit_patients)
        assert len(val_pos) == len(val_patients)
        seen.extend(val_patients)
        shares = np.bincount(y[rows[val_pos]], minlength=3) / len(val_pos)
        np.testing.assert_allclose(shares, np.bincount(y[train], minlength=3) / n, atol=0.05)
    assert sorted(seen) == sorted(train)  # each patient held out exactly once
    again = fb.inner_folds(rows, y[rows], n, cv=3, seed=4)
    for (a, b), (c, d) in zip(folds, again, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


# --- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_baseline_probabilities_and_auroc(fb, data, fitted, key):
    blocks, y, _, test = data
    model = fitted[key]
    assert model.name and isinstance(model.chosen, dict) and model.chosen
    proba = model.predict_proba(blocks, test)
    assert proba.shape == (len(test), 3)
    assert np.isfinite(proba).all() and (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert fb.macro_auroc(y[test], proba) > 0.75


@pytest.mark.parametrize("key", KEYS)
def test_baseline_test_time_missingness(fb, data, fitted, key):
    blocks, y, _, test = data
    model = fitted[key]
    for j in range(3):
        masks = np.zeros((len(test), 3), dtype=bool)
        masks[:, j] = True  # only modality j shown (to those who have it): the others hidden
        proba = model.predict_proba(blocks, test, masks=masks)
        assert proba.shape == (len(test), 3) and np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    nothing = model.predict_proba(blocks, test, masks=np.zeros((len(test), 3), dtype=bool))
    np.testing.assert_allclose(nothing.sum(axis=1), 1.0, atol=1e-9)
    assert np.allclose(nothing, nothing[0])  # no information: one answer for everyone
    if key in ("late_mean", "best_single"):
        np.testing.assert_allclose(nothing[0], np.bincount(y[:200], minlength=3) / 200)


def test_late_fusion_is_the_mean_of_the_unimodal_models(fb, data, fitted):
    blocks, _, _, test = data
    late = fitted["late_mean"]
    masks = blocks.present[test]
    proba = late.predict_proba(blocks, test)
    i = int(np.flatnonzero(masks.sum(axis=1) >= 2)[0])
    patient = test[i : i + 1]
    parts = [
        late.units_[n].predict_proba(blocks.x[n][patient], 3)
        for j, n in enumerate(blocks.names)
        if masks[i, j]
    ]
    np.testing.assert_allclose(proba[i], np.mean(parts, axis=0)[0])


@pytest.mark.parametrize("strong", ["labs", "us"])
def test_best_single_picks_the_strong_modality(fb, strong):
    strength = {"labs": 0.05, "us": 0.02, "note": 0.05, strong: 3.0}
    blocks, y = fb.synthetic_blocks(240, seed=2, labs=5, image=40, note=30, strength=strength)
    model = fb.BestSingle().fit(blocks, y, np.arange(180), seed=0)
    assert model.chosen["modality"] == strong
    assert max(model.chosen["cv_auroc"], key=model.chosen["cv_auroc"].get) == strong
    shown = np.arange(180, 240)
    has = blocks.present[shown, blocks.names.index(strong)]
    proba = model.predict_proba(blocks, shown)
    np.testing.assert_allclose(proba[~has], np.tile(model.prior_, ((~has).sum(), 1)))


def test_hgb_reduces_wide_blocks(fb, data):
    blocks, y, train, test = data
    model = fb.HGBConcat(grid=SMALL_GRID, max_iter=60, reduce=8, reduce_above=20)
    model.fit(blocks, y, train, seed=0)
    assert set(model.chosen["reduced"]) == {"us", "note"}
    assert model.chosen["columns"] == 5 + 8 + 8 + 3
    assert model.predict_proba(blocks, test).shape == (len(test), 3)
    full = fb.HGBConcat(grid=SMALL_GRID, max_iter=60, reduce=None, reduce_above=20)
    assert full.fit(blocks, y, train, seed=0).chosen["reduced"] == {}


def garbage(fb, blocks, y, train):
    """Labels out of range and features NaN / huge for every patient outside ``train``."""
    others = np.setdiff1d(np.arange(len(y)), train)
    y_bad = y.copy()
    y_bad[others] = 7
    x = {}
    for name, block in blocks.x.items():
        block = block.toarray() if sp.issparse(block) else block.copy()
        block[others] = np.nan if name == "labs" else 1e6
        x[name] = sp.csr_matrix(block) if sp.issparse(blocks.x[name]) else block
    present = blocks.present.copy()
    present[others] = ~present[others] | (np.arange(len(others)) % 2 == 0)[:, None]
    return fb.Blocks(blocks.names, x, present), y_bad


@pytest.mark.parametrize("key", KEYS)
def test_inner_cv_never_touches_other_patients(fb, data, fitted, key):
    blocks, y, train, test = data
    bad_blocks, y_bad = garbage(fb, blocks, y, train)
    with pytest.raises(ValueError, match="training labels"):
        make(fb, key).fit(bad_blocks, y_bad, np.arange(len(y)), seed=0, num_classes=3)
    model = make(fb, key).fit(bad_blocks, y_bad, train, seed=0, num_classes=3)
    assert model.chosen == fitted[key].chosen
    np.testing.assert_array_equal(
        model.predict_proba(blocks, test), fitted[key].predict_proba(blocks, test)
    )


@pytest.mark.parametrize("key", KEYS)
def test_deterministic_and_all_class_columns(fb, data, fitted, key):
    blocks, y, train, test = data
    again = make(fb, key).fit(blocks, y, train, seed=0)
    np.testing.assert_array_equal(
        again.predict_proba(blocks, test), fitted[key].predict_proba(blocks, test)
    )
    # A class that no training patient has still gets its (zero) column.
    y4 = y.copy()
    y4[test[:5]] = 3
    model = make(fb, key).fit(blocks, y4, train, seed=0)
    proba = model.predict_proba(blocks, test)
    assert proba.shape == (len(test), 4)
    np.testing.assert_allclose(proba[:, 3], 0.0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_fit_all(fb, data, monkeypatch):
    blocks, y, train, test = data
    monkeypatch.setattr(fb, "DEFAULT_HGB_GRID", SMALL_GRID)
    models = fb.fit_all(blocks, y, train, seed=0, reduce=16)
    assert tuple(models) == KEYS
    assert isinstance(models["hgb"], fb.HGBConcat) and models["hgb"].reduce == 16
    assert models["hgb"].chosen["reduced"] == {}  # no block here is wider than 256 columns
    assert isinstance(models["best_single"], fb.BestSingle)
    for model in models.values():
        assert model.predict_proba(blocks, test).shape == (len(test), 3)
