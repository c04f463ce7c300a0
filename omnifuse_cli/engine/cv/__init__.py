"""`omnifuse cv`: stratified k-fold cross-validation by patient, pooled out-of-fold results, and
variants of the model compared on the same folds.

Design (nothing in a test fold chooses anything):
- Folds are stratified by label (StratifiedKFold), or by label within groups (StratifiedGroupKFold
  with ``group_col``: every row of a patient or site lands in one fold); ``repeats`` draws new
  folds with seed + repeat - 1. The assignment is saved in folds.csv before any training.
- Inside each training fold an inner validation split (stratified, a share of
  val_ratio / (train_ratio + val_ratio) of the fold's training patients) picks the epoch, exactly
  as `train`'s validation split does. Lab normalisation, the text vocabulary and the image feature
  standardisation are fitted on the inner training patients only (build_for_cohort and fit_model,
  the code `train` runs).
- Frozen backbones encode every view once for the whole cross-validation: the backbone is built
  once per image/text setting (seeded with the base seed) and each fold's model gets a copy of
  its weights and the cached features. Fine-tuning variants re-read images after warm-up as
  `train` does.
- Fold k of repeat r trains with seed + 1000 (r - 1) + k; the final --refit model with the seed.
- After every fold its predictions and epochs are on disk (folds/<variant>/rep<r>-fold<k>/), so
  Ctrl-C loses at most the fold in progress and --resume continues from the next one.
- Pooled results read those files back: metrics of the out-of-fold predictions (the mean over
  repeats) with percentile bootstrap intervals over patients, per-fold mean and SD, metrics per
  missing pattern, the confusion matrix (summed over repeats) and, for each variant, paired
  differences from the base model: the same bootstrap resamples score both models.
"""

from omnifuse_cli.engine.cv.folds import assign_folds, assign_folds_labelled, inner_split
from omnifuse_cli.engine.cv.request import (
    BASE,
    CVRequest,
    Variant,
    load_cv_request,
    save_cv_request,
)
from omnifuse_cli.engine.cv.run import run_cv
from omnifuse_cli.engine.cv.summary import CVResult, FoldResult

__all__ = [
    "BASE",
    "CVRequest",
    "CVResult",
    "FoldResult",
    "Variant",
    "assign_folds",
    "assign_folds_labelled",
    "inner_split",
    "load_cv_request",
    "run_cv",
    "save_cv_request",
]
