"""Fitting the linear path (model/linear.py) after training: scikit-learn's logistic regression
on the sparse inputs, then the blend with OmniFuse on validation patients (method.md Sec. 5.6).

1. The regularisation C is chosen by stratified 5-fold cross-validation on the training split
   (AUROC, one-vs-rest for several classes), as a researcher tunes the scikit-learn baseline,
   and the model is fitted there.
2. On validation, OmniFuse's class log-probabilities and the linear logits are blended:
   log_softmax(a log p + b z + c), with a, b >= 0 and c minimising the log loss (convex).
3. The logistic regression is refitted with the same C on training and validation patients
   together, so it sees every labelled patient the baseline would.
Larger cohorts fit on a stratified sample (LINEAR_MAX_PATIENTS) and choose C on a smaller one
(LINEAR_CV_PATIENTS), with a looser solver tolerance: a linear model has long converged by
then, and the fit stays a fraction of an epoch's time at a million patients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, train_test_split

from omnifuse_cli.data.prepared import PreparedCohort
from omnifuse_cli.engine.inference import Inference
from omnifuse_cli.model.omnifuse import OmniFuse

C_GRID = np.logspace(-2, 3, 6)  # 0.01 .. 1000, decades
LINEAR_MAX_PATIENTS = 50_000
LINEAR_CV_PATIENTS = 5_000
# lbfgs's tolerance: scikit-learn's default up to SMALL training patients; beyond, 1e-3 (on
# 5,000 of 100,000 make-data patients: the same C, 114 instead of 630 iterations, 3-fold search
# 5.5 s instead of 40 s).
SMALL = 5_000
MIN_VALIDATION = 10  # fewer validation patients: b = 0 (OmniFuse alone, unblended)


@dataclass(frozen=True)
class LinearFit:
    """What the fit chose, for the run's records."""

    C: float  # noqa: N815 - scikit-learn's name for it
    blend_omnifuse: float  # a
    blend_linear: float  # b
    features: int
    patients: int  # the refit's (training + validation)
    val_log_loss_omnifuse: float
    val_log_loss_blend: float
    # The validation patients' blended log-probabilities before the refit on training +
    # validation: out-of-sample, so what calibration and conformal scores are fitted on.
    val_log_probs: np.ndarray | None = field(default=None, repr=False)
    val_index: np.ndarray | None = field(default=None, repr=False)


def design_matrix(model: OmniFuse, data: PreparedCohort, rows: np.ndarray) -> sp.csr_matrix:
    """The linear path's features of patients ``rows``: the same numbers its forward pass
    computes from a batch (tf-idf rows, standardised values with zeros where missing and the
    presence mask, each modality's presence), as one sparse matrix."""
    assert model.linear is not None
    rows = np.asarray(rows, dtype=np.int64)
    present = data.present[torch.from_numpy(rows)].numpy()
    blocks: list[sp.spmatrix] = []
    for i, name, kind in model.linear.terms:
        fed = present[:, i]
        if kind == "text":
            ids, weights = data.token_ids[name], data.token_weights[name]
            positions, mask = ids.positions(rows)  # (B, L) into the flat arrays, real entries
            keep = mask & fed[:, None]
            take = positions[keep]  # row by row, in order: CSR's layout
            indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
            vocab = getattr(model.linear, f"text_{name}").shape[0]
            blocks.append(
                sp.csr_matrix(
                    (
                        weights.values[take].astype(np.float64),
                        ids.values[take].astype(np.int64),
                        indptr,
                    ),
                    shape=(len(rows), vocab),
                )
            )
        else:
            x, mask_v = (t[torch.from_numpy(rows)].numpy() for t in data.vectors[name])
            dense = np.concatenate([np.where(mask_v, x, 0.0), mask_v], axis=1) * fed[:, None]
            blocks.append(sp.csr_matrix(dense.astype(np.float64)))
    blocks.append(sp.csr_matrix(present.astype(np.float64)))
    return sp.hstack(blocks, format="csr")


def fit_linear_path(
    model: OmniFuse,
    data: PreparedCohort,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    val_inference: Inference,
    *,
    seed: int,
    class_weight: dict[int, float] | None = None,
) -> LinearFit | None:
    """Fit the path's logistic regression and blend into ``model.linear`` (in place). None when
    the model has no linear path or a class is missing from training. ``class_weight``
    (--class-weight) weighs the logistic regression's patients as the network's losses."""
    if model.linear is None or data.labels is None:
        return None
    labels = data.labels.numpy()
    classes = model.config.num_classes
    if len(np.unique(labels[train_idx])) < classes:
        return None
    rng = np.random.default_rng(seed)
    fit_rows = _sample(train_idx, labels, LINEAR_MAX_PATIENTS, seed)
    cv_rows = _sample(fit_rows, labels, LINEAR_CV_PATIENTS, seed)
    x_cv = design_matrix(model, data, cv_rows)
    folds = min(5, int(np.bincount(labels[cv_rows], minlength=classes).min()))
    if folds >= 2:
        # C by discrimination, as a researcher tunes the baseline: the blend sets the scale.
        search = LogisticRegressionCV(
            Cs=C_GRID,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="roc_auc" if classes == 2 else "roc_auc_ovr",
            max_iter=3000,
            tol=_tolerance(len(train_idx)),
            random_state=int(rng.integers(2**31)),
            class_weight=class_weight,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8's API notices
            search.fit(x_cv, labels[cv_rows])
        c_value = float(np.atleast_1d(search.C_)[0])
    else:
        c_value = 1.0
    tol = _tolerance(len(train_idx))
    first = _logistic(c_value, tol, model, data, fit_rows, labels, class_weight)

    # The blend, on validation patients the logistic regression has not seen.
    omni = torch.as_tensor(val_inference.log_probs, dtype=torch.float64)
    y_val = torch.as_tensor(labels[val_inference.index], dtype=torch.long)
    z_val = torch.as_tensor(
        first.decision_function(design_matrix(model, data, val_inference.index))
    )
    z_val = _class_logits(z_val, classes)
    a, b, bias, loss_omni, loss_blend = _fit_blend(omni, z_val, y_val)
    val_log_probs = torch.log_softmax(a * omni + b * z_val + torch.as_tensor(bias), dim=1)

    all_rows = _sample(np.concatenate([train_idx, val_idx]), labels, LINEAR_MAX_PATIENTS, seed)
    final = _logistic(c_value, tol, model, data, all_rows, labels, class_weight)
    _store(model, final, classes, a, b, bias)
    return LinearFit(
        C=c_value,
        blend_omnifuse=a,
        blend_linear=b,
        features=int(final.coef_.shape[1]),
        patients=len(all_rows),
        val_log_loss_omnifuse=loss_omni,
        val_log_loss_blend=loss_blend,
        val_log_probs=val_log_probs.numpy(),
        val_index=np.asarray(val_inference.index),
    )


def _sample(rows: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return np.asarray(rows)
    kept, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=labels[rows])
    return np.sort(kept)


def _tolerance(training_patients: int) -> float:
    return 1e-4 if training_patients <= SMALL else 1e-3


def _logistic(
    c_value: float,
    tol: float,
    model: OmniFuse,
    data: PreparedCohort,
    rows: np.ndarray,
    labels: np.ndarray,
    class_weight: dict[int, float] | None = None,
) -> LogisticRegression:
    estimator = LogisticRegression(C=c_value, max_iter=3000, tol=tol, class_weight=class_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(design_matrix(model, data, rows), labels[rows])
    return estimator


def _class_logits(z: torch.Tensor, classes: int) -> torch.Tensor:
    """scikit-learn's decision function as per-class logits: binary gives one column (the
    positive class's log-odds), which is the logits (0, z)."""
    if classes == 2 and z.ndim == 1:
        return torch.stack([torch.zeros_like(z), z], dim=1)
    return z


def _fit_blend(
    omni: torch.Tensor, z: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, np.ndarray, float, float]:
    """a, b >= 0 and c minimising the validation log loss of log_softmax(a omni + b z + c).

    The weights may not be negative: on a small validation split a negative weight fits noise
    (one part used as evidence against the class it predicts), which no test split repeats.
    The problem is convex; the constraint is met by refitting with a negative weight at 0."""
    nll = torch.nn.functional.nll_loss
    classes = omni.shape[1]
    loss_omni = float(nll(torch.log_softmax(omni, dim=1), y))
    if len(y) < MIN_VALIDATION:
        return 1.0, 0.0, np.zeros(classes), loss_omni, loss_omni
    best = (loss_omni, 1.0, 0.0, np.zeros(classes))
    for free in ((True, True), (True, False), (False, True)):
        fit = _blend_loss(omni, z, y, free)
        if fit is not None and fit[0] < best[0] - 1e-9:
            best = fit
    loss, a, b, bias = best
    return a, b, bias, loss_omni, loss


def _blend_loss(
    omni: torch.Tensor, z: torch.Tensor, y: torch.Tensor, free: tuple[bool, bool]
) -> tuple[float, float, float, np.ndarray] | None:
    """The blend with the weights marked free fitted (the others 0), or None when a fitted
    weight comes out negative."""
    nll = torch.nn.functional.nll_loss
    parts = [x for x, f in zip((omni, z), free, strict=True) if f]
    weights = torch.ones(len(parts), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(omni.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe"
    )

    def logits() -> torch.Tensor:
        return sum(w * x for w, x in zip(weights, parts, strict=True)) + bias

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(torch.log_softmax(logits(), dim=1), y) + 1e-4 * (bias**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    values = iter(float(w) for w in weights.detach())
    a, b = (next(values) if f else 0.0 for f in free)
    if a < 0 or b < 0:
        return None
    with torch.no_grad():
        loss = float(nll(torch.log_softmax(logits(), dim=1), y))
    return (loss, a, b, bias.detach().numpy()) if np.isfinite(loss) else None


def _store(
    model: OmniFuse,
    estimator: LogisticRegression,
    classes: int,
    a: float,
    b: float,
    bias: np.ndarray,
) -> None:
    """The fitted coefficients into the path's buffers, split by feature block."""
    linear = model.linear
    assert linear is not None
    coef = estimator.coef_.T  # (features, 1 or C)
    intercept = estimator.intercept_
    if classes == 2 and coef.shape[1] == 1:
        coef = np.concatenate([np.zeros_like(coef), coef], axis=1)
        intercept = np.array([0.0, intercept[0]])
    start = 0
    with torch.no_grad():
        for _, name, kind in linear.terms:
            buffer = getattr(linear, f"{kind}_{name}")
            rows = buffer.shape[0]
            buffer.copy_(torch.as_tensor(coef[start : start + rows]))
            start += rows
        linear.presence.copy_(torch.as_tensor(coef[start : start + len(linear.names)]))
        linear.intercept.copy_(torch.as_tensor(intercept))
        linear.blend.copy_(torch.tensor([a, b]))
        linear.bias.copy_(torch.as_tensor(bias))
