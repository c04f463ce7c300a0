"""The classical members of `--preset best`'s ensemble: scikit-learn models bagged on the same
folds as OmniFuse, so their out-of-fold (OOF) probabilities can be weighed against its
(engine/ensemble.py). Both kinds read every patient's notes (the text modalities joined) and
numbers (every vector modality's columns, NaN where missing):

- "linear" (tfidf_logistic): tf-idf of word 1-2-grams beside the numbers (median-imputed, with
  missing indicators, standardised) into a logistic regression whose C is chosen by stratified
  3-fold CV inside the training part, scored by the ensemble's metric: the strong, cheap
  baseline of clinical notes.
- "hgb" (hist_gradient_boosting): gradient boosting on the numbers as they are (the trees route
  NaN themselves) beside a truncated SVD of the tf-idf and the tf-idf of the 200 n-grams most
  associated with the label (chi2 in the fold), so the notes reach the trees too.

Bagging as AutoGluon does it: fold k's model is fitted on the other folds and predicts fold k;
new patients get the mean of the K models, with no refit, so what the ensemble weighed is what
predicts. The models go into the bundle as skops files: loading never unpickles and builds only
the types in TRUSTED, so a bundle from elsewhere cannot run code (anything else is a
BundleError). skops is imported inside the two functions that write and read them: training
without the preset, and predicting without its members, never need it.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias, get_args

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.feature_selection import chi2
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.engine.ensemble import Metric, score
from omnifuse_cli.errors import DataError

MemberKind = Literal["linear", "hgb"]
KINDS: tuple[MemberKind, ...] = get_args(MemberKind)
NAMES: dict[MemberKind, str] = {"linear": "tfidf_logistic", "hgb": "hist_gradient_boosting"}
ClassWeight = dict[int, float] | Literal["balanced"] | None
Features: TypeAlias = np.ndarray | sp.csr_matrix  # dense, or sparse with tf-idf

TOKEN_PATTERN = r"(?u)\b\w+\b"  # one-character words too: Chinese runs and "x" in "3 x 2"
MAX_TEXT_FEATURES = 200_000
MIN_DOCS_FOR_MIN_DF = 20  # fewer notes: a word seen once is kept (min_df=1), or none may be
SVD_COMPONENTS = 100
SELECTED_NGRAMS = 200  # hgb: the strongest n-grams by chi2, as columns of their own
C_GRID = (0.1, 1.0, 10.0, 100.0)
C_SEARCH_FOLDS = 3
C_SEARCH_PATIENTS = 5_000  # C is chosen on a stratified sample: a decade of C is all it decides
LOGISTIC_MAX_ITER = 3000
SMALL = 5_000  # lbfgs's tolerance: scikit-learn's default up to here, 1e-3 beyond (linear_path)
_WORD = re.compile(TOKEN_PATTERN)


class OutOfTime(Exception):
    """The deadline passed before a fold started: the member is not finished and is dropped."""


@dataclass(frozen=True)
class MemberInputs:
    """What the classical members read of N patients."""

    texts: list[str]  # the text modalities' notes joined by "\n"; "" where none
    numbers: np.ndarray  # (N, D) float64, every vector modality's columns, NaN = missing
    number_names: list[str]  # "modality:column", D of them

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: np.ndarray) -> MemberInputs:
        rows = np.asarray(rows, dtype=np.int64)
        return MemberInputs([self.texts[i] for i in rows], self.numbers[rows], self.number_names)


def member_inputs(cohort: Cohort) -> MemberInputs:
    """The cohort's notes and numbers as the members read them; images are not read (a cohort
    of images only gives empty notes and no numbers, and usable_kinds says no member fits)."""
    text_names = [m.name for m in cohort.modalities if m.kind == "text" and m.name in cohort.texts]
    vector_names = [
        m.name for m in cohort.modalities if m.kind == "vector" and m.name in cohort.vectors
    ]
    # A modality the presence mask hides (evaluate --drop-modality/--missing-rate) is missing
    # for the members too.
    shown = {name: cohort.present[:, cohort.names.index(name)] for name in cohort.names}
    texts = [
        "\n".join(note for name in text_names if shown[name][i] and (note := cohort.texts[name][i]))
        for i in range(len(cohort))
    ]
    blocks = [
        np.where(shown[name][:, None], np.asarray(cohort.vectors[name], dtype=np.float64), np.nan)
        for name in vector_names
    ]
    numbers = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(cohort), 0))
    columns = {n: range(cohort.vectors[n].shape[1]) for n in vector_names} | cohort.vector_columns
    names = [f"{name}:{column}" for name in vector_names for column in columns[name]]
    return MemberInputs(texts=texts, numbers=numbers, number_names=names)


def usable_kinds(inputs: MemberInputs) -> tuple[MemberKind, ...]:
    """The kinds that can be fitted: both when there are notes with words (two at least, or
    tf-idf has nothing to learn) or a number that is not missing; none otherwise."""
    has_text = sum(1 for t in inputs.texts if _WORD.search(t)) >= 2
    has_numbers = inputs.numbers.shape[1] > 0 and bool(np.isfinite(inputs.numbers).any())
    return KINDS if has_text or has_numbers else ()


@dataclass(frozen=True)
class FoldModel:
    """One fold's fitted pieces. Plain scikit-learn objects side by side, not a Pipeline, so a
    skops file holds only the types in TRUSTED."""

    estimator: LogisticRegression | HistGradientBoostingClassifier
    tfidf: TfidfVectorizer | None = None
    svd: TruncatedSVD | None = None  # hgb: the tf-idf as dense components
    # hgb: the tf-idf columns of the n-grams most associated with the label (chi2 on the fold's
    # training part), read as they are beside the SVD: a few words carry most of a short note's
    # signal, and the SVD blurs them.
    selected: np.ndarray | None = None
    imputer: SimpleImputer | None = None  # linear: median + missing indicators
    scaler: StandardScaler | None = None
    raw_numbers: bool = False  # hgb: the numbers as they are, NaN included
    chosen: dict[str, float | int] = field(default_factory=dict)  # C, feature count, ...
    # The rows of the fitted inputs this model was trained on; None once loaded from a bundle.
    trained_on: np.ndarray | None = field(default=None, repr=False)

    def features(self, inputs: MemberInputs) -> Features:
        blocks: list[np.ndarray | sp.spmatrix] = []
        if self.tfidf is not None:
            text = self.tfidf.transform(inputs.texts)
            blocks.append(text if self.svd is None else self.svd.transform(text))
            if self.selected is not None:
                blocks.append(text[:, self.selected].toarray())
        if self.imputer is not None and self.scaler is not None:
            blocks.append(self.scaler.transform(self.imputer.transform(inputs.numbers)))
        elif self.raw_numbers:
            blocks.append(inputs.numbers)
        if not blocks:  # nothing to read in this fold: the model learns the class prior
            return np.zeros((len(inputs), 1))
        if any(sp.issparse(b) for b in blocks):
            return sp.hstack([sp.csr_matrix(b) for b in blocks], format="csr")
        return np.hstack(blocks)

    def predict_proba(self, inputs: MemberInputs, num_classes: int) -> np.ndarray:
        probs = self.estimator.predict_proba(self.features(inputs))
        return _expand(probs, self.estimator.classes_, num_classes)


@dataclass(frozen=True)
class FittedMember:
    """A bagged member: K fold models, their OOF probabilities and what fitting chose."""

    kind: MemberKind
    num_classes: int
    number_count: int  # D of the inputs it reads
    folds: tuple[FoldModel, ...]
    seconds: float
    oof_probs: np.ndarray | None = field(default=None, repr=False)  # (N, C); None once loaded

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    def predict_proba(self, inputs: MemberInputs, threads: int | None = None) -> np.ndarray:
        """The mean of the fold models' probabilities, (N, C) float64 (``threads``: as in
        fit_bagged_member)."""
        if inputs.numbers.shape[1] != self.number_count:
            raise DataError(
                f"{self.name} was fitted on {self.number_count} numbers, "
                f"these patients have {inputs.numbers.shape[1]}"
            )
        with threadpool_limits(limits=threads):
            probs = [fold.predict_proba(inputs, self.num_classes) for fold in self.folds]
        return np.mean(probs, axis=0)

    def meta(self) -> dict[str, object]:
        """JSON primitives for the run's records: what each fold chose, and the time taken."""
        chosen: dict[str, list[float | int]] = {}
        for fold in self.folds:
            for key, value in fold.chosen.items():
                chosen.setdefault(key, []).append(value)
        return {
            "name": self.name,
            "kind": self.kind,
            "folds": len(self.folds),
            "seconds": round(self.seconds, 3),
            "numbers": self.number_count,
            **chosen,
        }


def fit_bagged_member(
    kind: MemberKind,
    inputs: MemberInputs,
    y: np.ndarray,
    folds: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    metric: Metric = "auroc",
    class_weight: ClassWeight = None,
    deadline: float | None = None,
    threads: int | None = None,
) -> FittedMember:
    """Fit ``kind`` once per fold: ``folds`` (N,) gives each patient's fold 0..K-1; fold k's
    model is fitted on the other folds and predicts fold k into the OOF probabilities.

    ``metric`` scores the logistic regression's choice of C; ``class_weight`` weighs patients
    as --class-weight weighs the network's losses. ``deadline`` (a time.monotonic() value):
    OutOfTime when it has passed as a fold is about to start. ``threads`` caps scikit-learn's
    OpenMP and BLAS pools (the run's --threads): on a shared machine the boosting's threads
    otherwise spin for cores they never get (a hundred times slower on 2 busy cores)."""
    started = time.monotonic()
    y = np.asarray(y, dtype=np.int64)
    folds = np.asarray(folds, dtype=np.int64)
    if len(y) != len(inputs) or len(folds) != len(inputs):
        raise ValueError(f"{len(inputs)} patients, {len(y)} labels, {len(folds)} fold numbers")
    if ((y < 0) | (y >= num_classes)).any():
        raise DataError(f"labels must be 0..{num_classes - 1} for {NAMES[kind]}")
    k_folds = int(folds.max()) + 1 if len(folds) else 0
    if k_folds < 2 or folds.min() < 0 or len(np.unique(folds)) != k_folds:
        raise ValueError(f"folds must number 0..K-1 with K >= 2, got {np.unique(folds)}")
    weights = class_weight  # as plain ints and floats: numpy scalars are one more type to trust
    if isinstance(class_weight, dict):
        weights = {int(c): float(w) for c, w in class_weight.items()}
    oof = np.zeros((len(y), num_classes))
    models: list[FoldModel] = []
    for k in range(k_folds):
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime(f"{NAMES[kind]}: out of time before fold {k + 1} of {k_folds}")
        train, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        if len(np.unique(y[train])) < 2:
            raise DataError(f"{NAMES[kind]}: fold {k + 1}'s training part has a single class")
        task = _Task(num_classes, seed + k, metric, weights)
        with threadpool_limits(limits=threads):
            model = replace(_FITTERS[kind](inputs.subset(train), y[train], task), trained_on=train)
            oof[held] = model.predict_proba(inputs.subset(held), num_classes)
        models.append(model)
    return FittedMember(
        kind=kind,
        num_classes=num_classes,
        number_count=inputs.numbers.shape[1],
        folds=tuple(models),
        seconds=time.monotonic() - started,
        oof_probs=oof,
    )


@dataclass(frozen=True)
class _Task:
    """What one fold's fit is asked for, besides its patients."""

    num_classes: int
    seed: int
    metric: Metric  # scores the choice of C
    weights: ClassWeight


def _fit_linear(inputs: MemberInputs, y: np.ndarray, task: _Task) -> FoldModel:
    tfidf, _ = _fit_tfidf(inputs.texts)
    imputer = scaler = None
    if inputs.numbers.shape[1]:
        # Columns missing throughout this part are kept (as zeros) so every fold reads the same.
        imputer = SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)
        scaler = StandardScaler().fit(imputer.fit_transform(inputs.numbers))
    unfitted = LogisticRegression()
    pieces = FoldModel(estimator=unfitted, tfidf=tfidf, imputer=imputer, scaler=scaler)
    # The inner folds that choose C share this part's tf-idf and scaling: a small optimism,
    # the same for every C, instead of refitting the vocabulary 12 times.
    x = pieces.features(inputs)
    tol = 1e-4 if len(y) <= SMALL else 1e-3
    c_value = _choose_c(x, y, task, tol)
    estimator = _fit_logistic(c_value, tol, task.weights, x, y)
    return replace(pieces, estimator=estimator, chosen={"C": c_value, "features": x.shape[1]})


def _fit_hgb(inputs: MemberInputs, y: np.ndarray, task: _Task) -> FoldModel:
    """The trees stop early on their own validation loss (task.metric is the linear kind's)."""
    tfidf, text = _fit_tfidf(inputs.texts)
    svd = None
    if tfidf is not None and text is not None:
        components = min(SVD_COMPONENTS, text.shape[1] - 1, len(y) - 1)
        if components >= 1:
            svd = TruncatedSVD(n_components=components, random_state=task.seed).fit(text)
        else:
            tfidf = None  # a vocabulary of one word: nothing to decompose, and nothing to learn
    selected = None
    if svd is not None and text is not None:
        strength = np.nan_to_num(chi2(text, y)[0])
        keep = min(SELECTED_NGRAMS, text.shape[1])
        selected = np.sort(np.argsort(-strength, kind="stable")[:keep]).astype(np.int64)
    pieces = FoldModel(
        estimator=HistGradientBoostingClassifier(),  # replaced by the fitted one below
        tfidf=tfidf,
        svd=svd,
        selected=selected,
        raw_numbers=inputs.numbers.shape[1] > 0,
    )
    estimator = HistGradientBoostingClassifier(
        early_stopping="auto", random_state=task.seed, class_weight=task.weights
    ).fit(pieces.features(inputs), y)
    components = 0 if svd is None else int(svd.n_components)
    chosen: dict[str, float | int] = {"svd_components": components, "iterations": estimator.n_iter_}
    return replace(pieces, estimator=estimator, chosen=chosen)


_FITTERS: dict[MemberKind, Callable[[MemberInputs, np.ndarray, _Task], FoldModel]] = {
    "linear": _fit_linear,
    "hgb": _fit_hgb,
}


def _fit_tfidf(texts: list[str]) -> tuple[TfidfVectorizer | None, sp.csr_matrix | None]:
    """The vectorizer fitted on ``texts`` and their matrix, or (None, None) when they hold no
    word. A word must be in two notes (min_df=2) unless there are few notes, or when that would
    leave no word at all."""
    notes = sum(1 for t in texts if _WORD.search(t))
    if notes == 0:
        return None, None
    for min_df in dict.fromkeys((2 if notes >= MIN_DOCS_FOR_MIN_DF else 1, 1)):
        vectorizer = TfidfVectorizer(
            ngram_range=(1, 2),
            sublinear_tf=True,
            min_df=min_df,
            max_features=MAX_TEXT_FEATURES,
            token_pattern=TOKEN_PATTERN,
        )
        try:
            return vectorizer, vectorizer.fit_transform(texts)
        except ValueError:  # "empty vocabulary" / "no terms remain": try the looser min_df
            continue
    return None, None


def _choose_c(x: Features, y: np.ndarray, task: _Task, tol: float) -> float:
    """C of C_GRID scoring best by stratified 3-fold CV (the first, most regularised, of equal
    scores); 1.0 when a class has too few patients to cross-validate."""
    rows = np.arange(len(y))
    counts = np.bincount(y)
    if len(rows) > C_SEARCH_PATIENTS:
        stratify = y if counts[counts > 0].min() >= 2 else None  # a class of one cannot split
        rows, _ = train_test_split(
            rows, train_size=C_SEARCH_PATIENTS, random_state=task.seed, stratify=stratify
        )
    counts = np.bincount(y[rows])
    splits = min(C_SEARCH_FOLDS, int(counts[counts > 0].min()))
    if splits < 2:
        return 1.0
    search = StratifiedKFold(splits, shuffle=True, random_state=task.seed)
    best, best_score = C_GRID[0], -np.inf
    for c_value in C_GRID:
        probs = np.zeros((len(rows), task.num_classes))
        for inner, held in search.split(rows, y[rows]):
            fitted = _fit_logistic(c_value, tol, task.weights, x[rows[inner]], y[rows[inner]])
            raw = fitted.predict_proba(x[rows[held]])
            probs[held] = _expand(raw, fitted.classes_, task.num_classes)
        value = score(task.metric, y[rows], probs)
        if np.isfinite(value) and value > best_score:
            best, best_score = c_value, value
    return best


def _fit_logistic(
    c: float, tol: float, weights: ClassWeight, x: Features, y: np.ndarray
) -> LogisticRegression:
    """lbfgs (sparse rows, several classes at once) without its ConvergenceWarning: after
    LOGISTIC_MAX_ITER steps the coefficients have long stopped mattering to the probabilities."""
    estimator = LogisticRegression(C=c, max_iter=LOGISTIC_MAX_ITER, tol=tol, class_weight=weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(x, y)


def _expand(probs: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over the classes a model saw as (N, num_classes), 0 for classes it never
    saw (a fold can miss a rare class)."""
    out = np.zeros((probs.shape[0], num_classes))
    out[:, np.asarray(classes, dtype=np.int64)] = probs
    return out
