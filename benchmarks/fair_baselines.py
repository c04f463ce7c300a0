"""Fair classical baselines: the same inputs, the same missingness augmentation, the same chance.

A review said the study's classical baselines "fight with one hand tied": they never saw the
modality dropout OmniFuse trains with, they got reduced features, and small grids chosen on one
validation split. This module gives every classical baseline

- the same per-patient frozen features OmniFuse's heads see (``Blocks``: labs, the mean image
  feature, the note's TF-IDF row), full width unless a constructor says otherwise;
- the same missingness augmentation where the learner cannot drop modalities itself
  (``augment``: each present modality hidden with probability ``rate``, at least one kept, the
  draw of ``omnifuse_cli.model.omnifuse.drop_modalities``), as ``copies`` extra rows per patient;
- hyper-parameters chosen by an inner stratified K-fold over the *training patients* (all copies
  of a patient in one fold, validation on the held-out patients' original rows only), then a
  refit on every training row.

Baselines (``fit(blocks, y, train_idx, seed)``, ``predict_proba(blocks, idx, masks=None)``,
``chosen``, ``name``; ``fit_all`` fits the four):

- ``HGBConcat``: HistGradientBoosting on the concatenation, NaN where a modality is hidden or
  absent, one 0/1 missing indicator per modality. Grid: learning_rate {0.05, 0.1} x
  max_leaf_nodes {15, 31} x min_samples_leaf {10, 30} x l2_regularization {0, 1}, up to
  ``max_iter`` = 300 iterations. The inner CV picks the grid point *and* the number of
  iterations: each inner fit records the held-out patients' log loss after every iteration
  (staged predictions) and stops early once that loss has not improved for ``patience`` = 20
  iterations (HistGradientBoosting's own early stopping, but on the fold's held-out *patients*
  (``X_val``), not on a random fraction of rows, which would hold copies of training patients);
  a stopped curve is carried to 300 at its last value. The point and iteration count with the
  lowest mean curve win (log loss: a proper score, so the choice is also the best calibrated;
  ties to the earlier grid point and the fewer iterations), and the refit on all training rows
  runs exactly that many iterations, without early stopping. ``patience=None`` fits every point
  to 300 iterations (same choice on our synthetic check, about five times slower). A modality
  wider than ``reduce_above`` (256) columns is reduced to ``reduce`` (64) components (PCA for
  dense blocks, TruncatedSVD for sparse ones) fitted on the fold's training patients who have
  the modality (labels unused); ``reduce=None`` keeps full features. ``chosen["reduced"]``
  records what was reduced. ``max_bins`` (255, the default) is passed through.
- ``LogRegConcat``: per-block scaling fitted on the training patients who have the block
  (StandardScaler for dense blocks, MaxAbsScaler for sparse ones), zeros for hidden modalities
  (for a standardised block: mean imputation), missing indicators, LogisticRegression
  (lbfgs, max_iter 2000, multinomial for more than two classes) on full features, C from
  ``Cs`` by inner-CV log loss. The design is sparse CSR.
- ``LateFusionMean``: one standardised logistic regression per modality, trained on every
  training patient who has the modality (no augmentation needed: each unimodal model sees every
  patient with its modality), C per modality by inner-CV log loss on those patients; prediction
  = mean of the probabilities of the modalities shown, the training class prior for a patient
  shown none. This is modality dropout with mean late fusion in its classical form.
- ``BestSingle``: the unimodal models of ``LateFusionMean``; the modality is chosen by the
  out-of-fold macro one-vs-rest AUROC over *all* training patients, a patient without the
  modality scored with the fold's training class prior (so a rarely present modality is not
  favoured). At test time a patient without the chosen modality gets the training prior.

All randomness comes from ``seed``; the inner CV sees only ``train_idx`` (labels and features
of other patients are never read). ``predict_proba`` always returns C columns in class order,
C = ``num_classes`` or ``y.max() + 1`` over the full ``y`` given at fit; a class absent from a
(fold's) training set gets probability 0. ``masks`` at prediction time are ANDed with
``blocks.present`` (a modality a patient lacks is never shown). ``n_jobs`` caps the threads
(OpenMP for HistGradientBoosting, BLAS for the rest) through threadpoolctl.

Memory: ``design(dense=True)`` materialises the full (rows, sum D_m) float64 matrix, sparse
blocks included (``.toarray()``): 1,200 rows x (10 + 1280 + 800) columns is about 20 MB; with
``reduce=64`` HistGradientBoosting sees only 10 + 64 + 64 + 3 columns.

Fit times (``n_jobs=1``; a shared 2-core AMD EPYC VM whose load average was 3 to 4.6 from
other jobs, so an idle core is faster; 400 training patients, 3 classes, labs 10 dense + image
1280 dense + note 800 sparse columns, ~36% of modalities missing, ``augment_copies=2`` so 1,200
rows; ``python benchmarks/fair_baselines.py [--seed S] [--no-patience] [--max-bins B]``):

    baseline      seed 0   seed 1   notes
    hgb           40.5 s   36.0 s   16 points x 3 folds, PCA/SVD to 10+64+64+3 columns;
                                    patience=None (all to 300 iterations) 210.6 s, same choice;
                                    max_bins=63 26.7 s; reduce=16 17.6 s
    logreg         1.1 s    1.1 s   2,093 columns (full features), 4 Cs x 3 folds, warm starts
    late_mean      0.3 s    0.2 s   3 modalities x 4 Cs x 3 folds
    best_single    0.3 s    0.2 s   the same unimodal fits, plus the out-of-fold AUROCs

The synthetic cohort (``synthetic_blocks``) is linear in its features, so its test AUROCs
(printed by the script) say nothing about which baseline is better on real data.
With more than one OpenMP thread on that loaded machine one HistGradientBoosting fit took 68 s
instead of 2.3 s: keep ``n_jobs=1`` unless the cores are idle.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import MaxAbsScaler, StandardScaler
from threadpoolctl import threadpool_limits

Matrix = np.ndarray | sp.csr_matrix

DEFAULT_HGB_GRID: dict[str, tuple] = {
    "learning_rate": (0.05, 0.1),
    "max_leaf_nodes": (15, 31),
    "min_samples_leaf": (10, 30),
    "l2_regularization": (0.0, 1.0),
}
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
_EPS = 1e-15


@dataclass(frozen=True)
class Blocks:
    """Per-patient features of each modality, the same frozen features OmniFuse's heads see."""

    names: tuple[str, ...]  # modality names, e.g. ("labs", "us", "note")
    x: dict[str, Matrix]  # (N, D_m) per modality; rows of absent modalities hold anything
    present: np.ndarray  # (N, M) bool, which modalities each patient has

    def __post_init__(self) -> None:
        present = np.asarray(self.present, dtype=bool)
        if present.ndim != 2 or present.shape[1] != len(self.names):
            raise ValueError(f"present must be (N, {len(self.names)}), got {present.shape}")
        for name in self.names:
            if name not in self.x:
                raise ValueError(f"no block for modality {name!r}")
            if self.x[name].shape[0] != present.shape[0]:
                raise ValueError(
                    f"block {name!r} has {self.x[name].shape[0]} rows, "
                    f"present has {present.shape[0]}"
                )
        object.__setattr__(self, "present", present)

    @property
    def n(self) -> int:
        return int(self.present.shape[0])


# --------------------------------------------------------------------------------------------
# Augmentation, design matrices, folds


def augment(
    present: np.ndarray, idx: np.ndarray, *, copies: int, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Missingness augmentation for learners that cannot drop modalities themselves.

    Returns ``(rows, masks)``: ``rows`` is ``idx`` (the originals, first, with their own
    ``present`` pattern) followed by ``copies`` copies of ``idx``; in each copy every present
    modality is hidden with probability ``rate`` and, where that hides all, the present one with
    the highest draw is kept (``drop_modalities``'s rule). ``masks`` is (len(rows), M) bool.
    Deterministic in ``seed``."""
    if copies < 0:
        raise ValueError("copies must be >= 0")
    if not 0.0 <= rate <= 1.0:
        raise ValueError("rate must be in [0, 1]")
    present = np.asarray(present, dtype=bool)
    idx = np.asarray(idx, dtype=np.int64)
    base = present[idx]
    rng = np.random.default_rng(seed)
    out_masks = [base]
    for _ in range(copies):
        noise = rng.random(base.shape)
        mask = base & (noise >= rate)
        empty = ~mask.any(axis=1)
        if empty.any():
            scores = np.where(base, noise, -1.0)
            keep = np.zeros_like(mask)
            keep[np.arange(len(mask)), scores.argmax(axis=1)] = True
            mask = np.where(empty[:, None], keep & base, mask)
        out_masks.append(mask)
    rows = np.tile(idx, copies + 1)
    return rows, np.concatenate(out_masks, axis=0)


def _place(values: Matrix, shown: np.ndarray, n: int, *, dense: bool) -> Matrix:
    """Put the rows ``values`` (one per True of ``shown``) into an (n, d) block whose other rows
    are NaN (dense) or empty (sparse)."""
    d = values.shape[1]
    if dense:
        out = np.full((n, d), np.nan)
        out[shown] = values.toarray() if sp.issparse(values) else np.asarray(values)
        return out
    where = np.flatnonzero(shown)
    placer = sp.csr_matrix(
        (np.ones(len(where)), (where, np.arange(len(where)))), shape=(n, len(where))
    )
    values = sp.csr_matrix(values)
    return sp.csr_matrix(placer @ values)


def _design(
    blocks: Blocks,
    rows: np.ndarray,
    masks: np.ndarray,
    *,
    dense: bool,
    indicators: bool,
    transforms: Mapping[str, object] | None = None,
) -> Matrix:
    rows = np.asarray(rows, dtype=np.int64)
    masks = np.asarray(masks, dtype=bool) & blocks.present[rows]
    n = len(rows)
    parts: list[Matrix] = []
    for j, name in enumerate(blocks.names):
        shown = masks[:, j]
        values = blocks.x[name][rows[shown]]
        transform = (transforms or {}).get(name)
        if transform is not None:
            if shown.any():
                values = transform.transform(values)  # type: ignore[attr-defined]
            else:
                width = _output_width(transform, blocks.x[name].shape[1])
                values = np.zeros((0, width))
        parts.append(_place(values, shown, n, dense=dense))
    if indicators:
        missing = (~masks).astype(np.float64)
        parts.append(missing if dense else sp.csr_matrix(missing))
    if dense:
        return np.concatenate(parts, axis=1)
    return sp.hstack(parts, format="csr")


def _output_width(transform: object, width: int) -> int:
    if hasattr(transform, "n_components_"):
        return int(transform.n_components_)  # type: ignore[attr-defined]
    if hasattr(transform, "components_"):
        return int(transform.components_.shape[0])  # type: ignore[attr-defined]
    return width


def design(
    blocks: Blocks, rows: np.ndarray, masks: np.ndarray, *, dense: bool, indicators: bool = True
) -> np.ndarray | sp.csr_matrix:
    """The concatenated matrix of ``blocks`` for ``rows`` with ``masks`` applied (ANDed with
    ``blocks.present``): a hidden or absent modality's columns are NaN (``dense=True``, for
    HistGradientBoosting's native NaN handling; sparse blocks go through ``.toarray()``, so the
    result holds len(rows) x sum(D_m) float64) or empty/0 (``dense=False``: CSR, for linear
    models), followed, with ``indicators``, by one 0/1 column per modality (1 = missing)."""
    return _design(blocks, rows, masks, dense=dense, indicators=indicators)


def inner_folds(
    rows: np.ndarray, y_rows: np.ndarray, n_original: int, *, cv: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped stratified folds over augmented rows.

    ``rows`` holds patient ids (the originals first, ``n_original`` of them, as ``augment``
    returns them), ``y_rows`` their labels. The distinct patients are split by StratifiedKFold
    (shuffled with ``seed``); each fold is (fit positions: every row, copies included, of the
    fold's training patients; validation positions: the held-out patients' original rows only),
    positions indexing ``rows``. All rows of one patient are on one side of every fold."""
    rows = np.asarray(rows, dtype=np.int64)
    y_rows = np.asarray(y_rows)
    patients = rows[:n_original]
    if len(np.unique(patients)) != n_original:
        raise ValueError("the original rows must be distinct patients")
    if not np.isin(rows, patients).all():
        raise ValueError("every row must be a copy of an original row")
    y_patients = y_rows[:n_original]
    splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(np.zeros(n_original), y_patients))
    for _, val in splits:
        held_out = patients[val]
        out = np.isin(rows, held_out)
        fit_pos = np.flatnonzero(~out)
        val_pos = np.flatnonzero(out[:n_original])
        folds.append((fit_pos, val_pos))
    return folds


# --------------------------------------------------------------------------------------------
# Shared helpers


def _prepare(
    blocks: Blocks, y: np.ndarray, train_idx: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    y = np.asarray(y)
    if y.shape != (blocks.n,):
        raise ValueError(f"y must be ({blocks.n},), got {y.shape}")
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if len(np.unique(train_idx)) != len(train_idx):
        raise ValueError("train_idx has repeated patients")
    n_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    y_train = y[train_idx]
    if y_train.min() < 0 or y_train.max() >= n_classes:
        raise ValueError(f"training labels must be in 0..{n_classes - 1}")
    y = y.astype(np.int64, copy=True)
    return y, train_idx, n_classes


def _prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return counts / counts.sum()


def _full_proba(classes: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((proba.shape[0], n_classes))
    out[:, np.asarray(classes, dtype=np.int64)] = proba
    return out


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    p = np.clip(proba[np.arange(len(y)), y], _EPS, 1.0)
    return float(-np.mean(np.log(p)))


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes that have positives and negatives in ``y``
    (the positive-class AUROC for two classes)."""
    y = np.asarray(y)
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    values = [
        roc_auc_score(y == c, proba[:, c])
        for c in range(proba.shape[1])
        if 0 < (y == c).sum() < len(y)
    ]
    return float(np.mean(values)) if values else float("nan")


class _Prior:
    """A constant classifier: the class prior of its training labels."""

    def __init__(self, prior: np.ndarray) -> None:
        self.prior = prior

    def predict_proba(self, x: Matrix) -> np.ndarray:
        return np.tile(self.prior, (x.shape[0], 1))


def _scaler(block: Matrix) -> StandardScaler | MaxAbsScaler:
    return MaxAbsScaler() if sp.issparse(block) else StandardScaler()


def _fit_scalers(blocks: Blocks, patients: np.ndarray) -> dict[str, object]:
    """Per-block scalers fitted on the given patients who have the block."""
    scalers: dict[str, object] = {}
    for j, name in enumerate(blocks.names):
        have = patients[blocks.present[patients, j]]
        if len(have):
            scalers[name] = _scaler(blocks.x[name]).fit(blocks.x[name][have])
    return scalers


def _logreg(c: float, seed: int, warm: bool = False) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=2000, random_state=seed, warm_start=warm)


class _Baseline:
    name = ""
    augment_copies = 0  # augmented copies per training patient (set by the subclasses)
    rate = 0.0  # their modality dropout rate
    cv = 3  # inner folds

    def __init__(self) -> None:
        self.chosen: dict = {}
        self.n_classes_ = 0
        self.prior_ = np.zeros(0)
        self.fit_seconds_ = 0.0

    def _start(
        self, blocks: Blocks, y: np.ndarray, train_idx: np.ndarray, num_classes: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Checked labels and training rows; sets the class count and the training prior."""
        y, train_idx, n_classes = _prepare(blocks, y, train_idx, num_classes)
        self.n_classes_ = n_classes
        self.prior_ = _prior(y[train_idx], n_classes)
        return y, train_idx

    def _augmented(
        self, blocks: Blocks, y: np.ndarray, train_idx: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The training rows with their augmented copies, their masks and the patient-grouped
        inner folds (baselines with ``augment_copies``, ``rate`` and ``cv``)."""
        rows, masks = augment(
            blocks.present, train_idx, copies=self.augment_copies, rate=self.rate, seed=seed
        )
        folds = inner_folds(rows, y[rows], len(train_idx), cv=self.cv, seed=seed)
        return rows, masks, folds

    def _masks(self, blocks: Blocks, idx: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        present = blocks.present[idx]
        if masks is None:
            return present
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != present.shape:
            raise ValueError(f"masks must be {present.shape}, got {masks.shape}")
        return masks & present


# --------------------------------------------------------------------------------------------
# 1. HistGradientBoosting on the concatenation


class HGBConcat(_Baseline):
    """HistGradientBoosting on the NaN-filled concatenation plus missing indicators, trained on
    the training rows and ``augment_copies`` augmented copies; grid and number of iterations
    chosen by patient-grouped inner CV log loss on original rows (see the module docstring)."""

    name = "HistGradientBoosting (NaN, aug)"

    def __init__(
        self,
        augment_copies: int = 2,
        rate: float = 0.3,
        grid: Mapping[str, Sequence] | None = None,
        cv: int = 3,
        n_jobs: int = 1,
        reduce: int | None = 64,
        reduce_above: int = 256,
        max_iter: int = 300,
        patience: int | None = 20,
        max_bins: int = 255,
    ) -> None:
        super().__init__()
        self.augment_copies = augment_copies
        self.rate = rate
        self.grid = dict(DEFAULT_HGB_GRID if grid is None else grid)
        self.cv = cv
        self.n_jobs = n_jobs
        self.reduce = reduce
        self.reduce_above = reduce_above
        self.max_iter = int(max_iter)
        self.patience = patience
        self.max_bins = int(max_bins)

    def _points(self) -> list[dict]:
        keys = list(self.grid)
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(self.grid[k] for k in keys))
        ]

    def _reducers(self, blocks: Blocks, patients: np.ndarray, seed: int) -> dict[str, object]:
        reducers: dict[str, object] = {}
        if self.reduce is None:
            return reducers
        for j, name in enumerate(blocks.names):
            block = blocks.x[name]
            width = block.shape[1]
            if width <= self.reduce_above:
                continue
            have = patients[blocks.present[patients, j]]
            k = min(self.reduce, width - 1, len(have) - 1)
            if k < 1:
                continue
            if sp.issparse(block):
                reducer = TruncatedSVD(n_components=k, random_state=seed)
            else:
                reducer = PCA(n_components=k, random_state=seed)
            reducers[name] = reducer.fit(block[have])
        return reducers

    def _model(
        self, params: Mapping, max_iter: int, seed: int, *, stop: bool
    ) -> HistGradientBoostingClassifier:
        return HistGradientBoostingClassifier(
            max_iter=max_iter,
            early_stopping=stop,
            n_iter_no_change=self.patience or 10,
            tol=0.0,
            max_bins=self.max_bins,
            random_state=seed,
            **params,
        )

    def _curve(
        self,
        params: Mapping,
        x_fit: np.ndarray,
        y_fit: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        n_classes: int,
        seed: int,
    ) -> np.ndarray:
        """Validation log loss after each boosting iteration 1..max_iter. With ``patience``
        the fit stops once the held-out patients' loss has not improved for that many
        iterations, and the rest of the curve repeats its last value."""
        known = np.isin(y_val, np.unique(y_fit))
        stop = self.patience is not None and known.any()
        model = self._model(params, self.max_iter, seed, stop=bool(stop))
        if stop:
            model.fit(x_fit, y_fit, X_val=x_val[known], y_val=y_val[known])
        else:
            model.fit(x_fit, y_fit)
        curve = np.array(
            [
                _log_loss(y_val, _full_proba(model.classes_, proba, n_classes))
                for proba in model.staged_predict_proba(x_val)
            ]
        )
        return np.concatenate([curve, np.full(self.max_iter - len(curve), curve[-1])])

    def fit(
        self,
        blocks: Blocks,
        y: np.ndarray,
        train_idx: np.ndarray,
        seed: int,
        *,
        num_classes: int | None = None,
    ) -> HGBConcat:
        start = time.perf_counter()
        y, train_idx = self._start(blocks, y, train_idx, num_classes)
        n_classes = self.n_classes_
        rows, masks, folds = self._augmented(blocks, y, train_idx, seed)
        points = self._points()
        losses = np.zeros((len(points), self.max_iter))
        with threadpool_limits(limits=self.n_jobs):
            for fit_pos, val_pos in folds:
                fit_patients = rows[fit_pos[fit_pos < len(train_idx)]]
                reducers = self._reducers(blocks, fit_patients, seed)
                x_fit = _design(
                    blocks,
                    rows[fit_pos],
                    masks[fit_pos],
                    dense=True,
                    indicators=True,
                    transforms=reducers,
                )
                x_val = _design(
                    blocks,
                    rows[val_pos],
                    masks[val_pos],
                    dense=True,
                    indicators=True,
                    transforms=reducers,
                )
                y_fit, y_val = y[rows[fit_pos]], y[rows[val_pos]]
                for g, params in enumerate(points):
                    losses[g] += self._curve(
                        params, x_fit, y_fit, x_val, y_val, n_classes, seed
                    ) / len(folds)
            g, k = np.unravel_index(int(np.argmin(losses)), losses.shape)
            best, n_iter = points[g], int(k) + 1
            self.reducers_ = self._reducers(blocks, train_idx, seed)
            x_all = _design(
                blocks, rows, masks, dense=True, indicators=True, transforms=self.reducers_
            )
            self.model_ = self._model(best, n_iter, seed, stop=False).fit(x_all, y[rows])
        reduced = {
            name: f"{type(r).__name__} {blocks.x[name].shape[1]}->{_output_width(r, 0)}"
            for name, r in self.reducers_.items()
        }
        self.chosen = {
            **best,
            "max_iter": n_iter,
            "cv_log_loss": float(losses[g, k]),
            "reduced": reduced,
            "rows": len(rows),
            "columns": int(x_all.shape[1]),
        }
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(
        self, blocks: Blocks, idx: np.ndarray, masks: np.ndarray | None = None
    ) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        masks = self._masks(blocks, idx, masks)
        x = _design(blocks, idx, masks, dense=True, indicators=True, transforms=self.reducers_)
        with threadpool_limits(limits=self.n_jobs):
            proba = self.model_.predict_proba(x)
        return _full_proba(self.model_.classes_, proba, self.n_classes_)


# --------------------------------------------------------------------------------------------
# 2. Logistic regression on the concatenation


class LogRegConcat(_Baseline):
    """Scaled blocks, zeros for hidden modalities, missing indicators, LogisticRegression on
    full features over the training rows and their augmented copies; C by patient-grouped inner
    CV log loss on original rows."""

    name = "LogisticRegression (indicators, aug)"

    def __init__(
        self,
        augment_copies: int = 2,
        rate: float = 0.3,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 3,
        n_jobs: int = 1,
    ) -> None:  # noqa: N803
        super().__init__()
        self.augment_copies = augment_copies
        self.rate = rate
        self.Cs = tuple(sorted(float(c) for c in Cs))
        self.cv = cv
        self.n_jobs = n_jobs

    def fit(
        self,
        blocks: Blocks,
        y: np.ndarray,
        train_idx: np.ndarray,
        seed: int,
        *,
        num_classes: int | None = None,
    ) -> LogRegConcat:
        start = time.perf_counter()
        y, train_idx = self._start(blocks, y, train_idx, num_classes)
        n_classes = self.n_classes_
        rows, masks, folds = self._augmented(blocks, y, train_idx, seed)
        losses = np.zeros(len(self.Cs))
        unconverged = 0
        with threadpool_limits(limits=self.n_jobs), warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always", ConvergenceWarning)
            for fit_pos, val_pos in folds:
                scalers = _fit_scalers(blocks, rows[fit_pos[fit_pos < len(train_idx)]])
                x_fit = _design(
                    blocks,
                    rows[fit_pos],
                    masks[fit_pos],
                    dense=False,
                    indicators=True,
                    transforms=scalers,
                )
                x_val = _design(
                    blocks,
                    rows[val_pos],
                    masks[val_pos],
                    dense=False,
                    indicators=True,
                    transforms=scalers,
                )
                y_fit, y_val = y[rows[fit_pos]], y[rows[val_pos]]
                if len(np.unique(y_fit)) < 2:
                    full = np.tile(_prior(y_fit, n_classes), (len(y_val), 1))
                    losses += _log_loss(y_val, full) / len(folds)
                    continue
                model = _logreg(self.Cs[0], seed, warm=True)  # warm starts along the C path
                for i, c in enumerate(self.Cs):
                    model.set_params(C=c).fit(x_fit, y_fit)
                    full = _full_proba(model.classes_, model.predict_proba(x_val), n_classes)
                    losses[i] += _log_loss(y_val, full) / len(folds)
            best = self.Cs[int(np.argmin(losses))]
            self.scalers_ = _fit_scalers(blocks, train_idx)
            x_all = _design(
                blocks, rows, masks, dense=False, indicators=True, transforms=self.scalers_
            )
            self.model_: LogisticRegression | _Prior
            if len(np.unique(y[rows])) < 2:
                self.model_ = _Prior(self.prior_)
            else:
                self.model_ = _logreg(best, seed).fit(x_all, y[rows])
            unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in log)
        self.chosen = {
            "C": best,
            "cv_log_loss": float(losses.min()),
            "rows": len(rows),
            "columns": int(x_all.shape[1]),
            "convergence_warnings": unconverged,
        }
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(
        self, blocks: Blocks, idx: np.ndarray, masks: np.ndarray | None = None
    ) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        masks = self._masks(blocks, idx, masks)
        x = _design(blocks, idx, masks, dense=False, indicators=True, transforms=self.scalers_)
        if isinstance(self.model_, _Prior):
            return self.model_.predict_proba(x)
        with threadpool_limits(limits=self.n_jobs):
            proba = self.model_.predict_proba(x)
        return _full_proba(self.model_.classes_, proba, self.n_classes_)


# --------------------------------------------------------------------------------------------
# 3 and 4. Unimodal models: mean late fusion and the best single modality


@dataclass
class _Unimodal:
    """One modality's scaled logistic regression, its chosen C and out-of-fold predictions."""

    scaler: object | None
    model: object  # LogisticRegression or _Prior
    c: float | None
    n_train: int
    cv_log_loss: float
    oof: np.ndarray  # (len(train_idx), C): patients without the modality get the fold prior

    def predict_proba(self, block: Matrix, n_classes: int) -> np.ndarray:
        if isinstance(self.model, _Prior):
            return self.model.predict_proba(block)
        x = self.scaler.transform(block)  # type: ignore[union-attr]
        return _full_proba(
            self.model.classes_,
            self.model.predict_proba(x),  # type: ignore[attr-defined]
            n_classes,
        )


def _fit_unimodal(
    blocks: Blocks,
    y: np.ndarray,
    train_idx: np.ndarray,
    j: int,
    folds: list[tuple[np.ndarray, np.ndarray]],
    cs: tuple[float, ...],
    n_classes: int,
    seed: int,
) -> _Unimodal:
    """Modality ``j``'s model: C by inner-CV log loss over the training patients who have it
    (pooled over the folds' held-out patients), refit on all of them."""
    name = blocks.names[j]
    block = blocks.x[name]
    has = blocks.present[train_idx, j]
    oof = {c: np.zeros((len(train_idx), n_classes)) for c in cs}
    for fit_pos, val_pos in folds:
        fold_prior = _prior(y[train_idx[fit_pos]], n_classes)
        fit_m, val_m = fit_pos[has[fit_pos]], val_pos[has[val_pos]]
        val_without = val_pos[~has[val_pos]]
        y_fit = y[train_idx[fit_m]]
        for c in cs:
            oof[c][val_without] = fold_prior
        if len(val_m) == 0:
            continue
        if len(np.unique(y_fit)) < 2:
            prior = _prior(y_fit, n_classes) if len(y_fit) else fold_prior
            for c in cs:
                oof[c][val_m] = prior
            continue
        scaler = _scaler(block).fit(block[train_idx[fit_m]])
        x_fit = scaler.transform(block[train_idx[fit_m]])
        x_val = scaler.transform(block[train_idx[val_m]])
        model = _logreg(cs[0], seed, warm=True)
        for c in cs:
            model.set_params(C=c).fit(x_fit, y_fit)
            oof[c][val_m] = _full_proba(model.classes_, model.predict_proba(x_val), n_classes)
    y_has = y[train_idx[has]]
    if has.any():
        losses = [_log_loss(y_has, oof[c][has]) for c in cs]
    else:
        losses = [float("nan")] * len(cs)
    best = cs[int(np.nanargmin(losses))] if has.any() else None
    chosen_oof = oof[best] if best is not None else oof[cs[0]]
    if len(np.unique(y_has)) < 2:
        prior = _prior(y_has, n_classes) if has.any() else _prior(y[train_idx], n_classes)
        return _Unimodal(None, _Prior(prior), None, int(has.sum()), float("nan"), chosen_oof)
    scaler = _scaler(block).fit(block[train_idx[has]])
    model = _logreg(best, seed).fit(scaler.transform(block[train_idx[has]]), y_has)
    return _Unimodal(scaler, model, best, int(has.sum()), float(np.nanmin(losses)), chosen_oof)


class _UnimodalBaseline(_Baseline):
    def __init__(
        self,
        base: str = "logreg",
        Cs: Sequence[float] = DEFAULT_CS,  # noqa: N803
        cv: int = 3,
        n_jobs: int = 1,
    ) -> None:
        super().__init__()
        if base != "logreg":
            raise ValueError(f"base {base!r} is not supported (only 'logreg')")
        self.base = base
        self.Cs = tuple(sorted(float(c) for c in Cs))
        self.cv = cv
        self.n_jobs = n_jobs

    def _fit_all(
        self,
        blocks: Blocks,
        y: np.ndarray,
        train_idx: np.ndarray,
        seed: int,
        num_classes: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        y, train_idx = self._start(blocks, y, train_idx, num_classes)
        n_classes = self.n_classes_
        folds = inner_folds(train_idx, y[train_idx], len(train_idx), cv=self.cv, seed=seed)
        self.units_: dict[str, _Unimodal] = {}
        with threadpool_limits(limits=self.n_jobs), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for j, name in enumerate(blocks.names):
                self.units_[name] = _fit_unimodal(
                    blocks, y, train_idx, j, folds, self.Cs, n_classes, seed
                )
        return y, train_idx

    def _unit_proba(self, blocks: Blocks, name: str, idx: np.ndarray) -> np.ndarray:
        with threadpool_limits(limits=self.n_jobs):
            return self.units_[name].predict_proba(blocks.x[name][idx], self.n_classes_)


class LateFusionMean(_UnimodalBaseline):
    """One scaled logistic regression per modality (each trained on every training patient who
    has it, C by inner CV); the mean of the probabilities of the modalities shown, the training
    prior for a patient shown none."""

    name = "Late fusion (mean of unimodal LR)"

    def fit(
        self,
        blocks: Blocks,
        y: np.ndarray,
        train_idx: np.ndarray,
        seed: int,
        *,
        num_classes: int | None = None,
    ) -> LateFusionMean:
        start = time.perf_counter()
        self.names_ = tuple(blocks.names)
        self._fit_all(blocks, y, train_idx, seed, num_classes)
        self.chosen = {
            "C": {n: u.c for n, u in self.units_.items()},
            "cv_log_loss": {n: u.cv_log_loss for n, u in self.units_.items()},
            "n_train": {n: u.n_train for n, u in self.units_.items()},
        }
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(
        self, blocks: Blocks, idx: np.ndarray, masks: np.ndarray | None = None
    ) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        masks = self._masks(blocks, idx, masks)
        total = np.zeros((len(idx), self.n_classes_))
        count = np.zeros(len(idx))
        for j, name in enumerate(blocks.names):
            shown = masks[:, j]
            if shown.any():
                total[shown] += self._unit_proba(blocks, name, idx[shown])
                count[shown] += 1
        out = np.tile(self.prior_, (len(idx), 1))
        some = count > 0
        out[some] = total[some] / count[some, None]
        return out


class BestSingle(_UnimodalBaseline):
    """The unimodal model of the modality with the best out-of-fold macro AUROC over all the
    training patients (those without it scored with the fold's prior); patients without the
    chosen modality get the training prior."""

    name = "Best single modality (LR)"

    def fit(
        self,
        blocks: Blocks,
        y: np.ndarray,
        train_idx: np.ndarray,
        seed: int,
        *,
        num_classes: int | None = None,
    ) -> BestSingle:
        start = time.perf_counter()
        y, train_idx = self._fit_all(blocks, y, train_idx, seed, num_classes)
        aurocs = {n: macro_auroc(y[train_idx], u.oof) for n, u in self.units_.items()}
        ranked = [n for n in blocks.names if not np.isnan(aurocs[n])]
        self.modality_ = max(
            ranked or list(blocks.names),
            key=lambda n: aurocs[n] if not np.isnan(aurocs[n]) else -1.0,
        )
        self.index_ = blocks.names.index(self.modality_)
        unit = self.units_[self.modality_]
        self.chosen = {
            "modality": self.modality_,
            "C": unit.c,
            "cv_auroc": aurocs,
            "n_train": unit.n_train,
        }
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(
        self, blocks: Blocks, idx: np.ndarray, masks: np.ndarray | None = None
    ) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        masks = self._masks(blocks, idx, masks)
        out = np.tile(self.prior_, (len(idx), 1))
        shown = masks[:, self.index_]
        if shown.any():
            out[shown] = self._unit_proba(blocks, self.modality_, idx[shown])
        return out


# --------------------------------------------------------------------------------------------


def fit_all(
    blocks: Blocks,
    y: np.ndarray,
    train_idx: np.ndarray,
    seed: int,
    *,
    reduce: int | None = 64,
    n_jobs: int = 1,
    num_classes: int | None = None,
) -> dict[str, object]:
    """The four baselines with their defaults, fitted: "hgb", "logreg", "late_mean",
    "best_single". ``reduce`` applies to HistGradientBoosting only (the linear models get full
    features)."""
    models: dict[str, object] = {
        "hgb": HGBConcat(reduce=reduce, n_jobs=n_jobs),
        "logreg": LogRegConcat(n_jobs=n_jobs),
        "late_mean": LateFusionMean(n_jobs=n_jobs),
        "best_single": BestSingle(n_jobs=n_jobs),
    }
    for model in models.values():
        model.fit(blocks, y, train_idx, seed, num_classes=num_classes)  # type: ignore[attr-defined]
    return models


def synthetic_blocks(
    n: int = 400,
    *,
    seed: int = 0,
    n_classes: int = 3,
    labs: int = 10,
    image: int = 1280,
    note: int = 800,
    missing: float = 0.4,
    strength: Mapping[str, float] | None = None,
) -> tuple[Blocks, np.ndarray]:
    """A synthetic cohort shaped like the real one (dense labs, dense non-negative image
    features, sparse TF-IDF-like note), each modality informative about y, ``missing`` of the
    modalities absent (at least one present per patient). For timings and tests."""
    rng = np.random.default_rng(seed)
    strength = {"labs": 0.4, "us": 0.1, "note": 0.5, **(strength or {})}
    y = rng.integers(0, n_classes, size=n)
    onehot = np.eye(n_classes)[y]
    x_labs = rng.normal(size=(n, labs)) + strength["labs"] * onehot @ rng.normal(
        size=(n_classes, labs)
    )
    x_us = np.maximum(
        rng.normal(size=(n, image)) * 0.5
        + 0.3 * strength["us"] * onehot @ rng.normal(size=(n_classes, image)),
        0.0,
    )
    shared = rng.gamma(0.5, size=note)
    specific = rng.gamma(0.5, size=(n_classes, note))
    word_p = shared + strength["note"] * specific
    word_p /= word_p.sum(axis=1, keepdims=True)
    counts = rng.poisson(40 * word_p[y]).astype(np.float64)  # about 40 words a note
    tf = counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1.0)
    x_note = sp.csr_matrix(tf)
    present = rng.random((n, 3)) >= missing
    empty = ~present.any(axis=1)
    present[empty, rng.integers(0, 3, size=int(empty.sum()))] = True
    blocks = Blocks(("labs", "us", "note"), {"labs": x_labs, "us": x_us, "note": x_note}, present)
    return blocks, y


def _time(argv: Sequence[str] | None = None) -> None:
    """Fit times of the four baselines on a synthetic cohort shaped like the target."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=_time.__doc__)
    parser.add_argument("--n", type=int, default=400, help="training patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-patience",
        action="store_true",
        help="HistGradientBoosting: every grid point to max_iter",
    )
    parser.add_argument("--max-bins", type=int, default=255)
    args = parser.parse_args(argv)
    n = args.n
    blocks, y = synthetic_blocks(n + 600, seed=args.seed)
    train, test = np.arange(n), np.arange(n, len(y))
    print(
        f"{n} training patients, {len(test)} test; present {blocks.present.mean():.2f}; "
        f"columns {[blocks.x[m].shape[1] for m in blocks.names]}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    hgb = HGBConcat(patience=None if args.no_patience else 20, max_bins=args.max_bins)
    for key, model in (
        ("hgb", hgb),
        ("logreg", LogRegConcat()),
        ("late_mean", LateFusionMean()),
        ("best_single", BestSingle()),
    ):
        model.fit(blocks, y, train, args.seed)
        auc = macro_auroc(y[test], model.predict_proba(blocks, test))
        print(
            f"{key:12s} fit {model.fit_seconds_:6.1f} s  test AUROC {auc:.3f}  "
            f"chosen {model.chosen}"
        )


if __name__ == "__main__":
    _time()
