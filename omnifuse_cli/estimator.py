"""``OmniFuseClassifier``: train and predict of the Python API (api.py) as a scikit-learn
estimator over manifest DataFrames, for ``cross_val_score``, ``GridSearchCV`` and pipelines."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError

from omnifuse_cli.api import train
from omnifuse_cli.settings import BY_NAME, check_names

__all__ = ["OmniFuseClassifier"]

# -- scikit-learn ------------------------------------------------------------------------------

# Where the classifier's defaults differ from train's: everything it is given trains the model
# (no internal test split; validation still picks the epoch and calibrates).
_CLASSIFIER_DEFAULTS = {"test_ratio": 0.0}


class OmniFuseClassifier(ClassifierMixin, BaseEstimator):
    """OmniFuse as a scikit-learn classifier over manifest DataFrames.

    ``X``: a DataFrame in the manifest format (an ``id`` column and one column per modality;
    relative file paths read against ``base_dir``, default the current folder); ``y``: the
    labels (any hashable values; ``classes_`` keeps their sorted order). Every training setting
    is a constructor parameter of the same name and default as the flag (``test_ratio`` is 0:
    a validation split of what ``fit`` gets picks the epoch). ``out_dir``: where ``fit`` writes
    its run (default a temporary folder removed with the estimator); ``run_`` is the
    fitted Run.
    """

    def __init__(self, **params: Any) -> None:
        for name, default in self._param_defaults().items():
            setattr(self, name, params.pop(name, default))
        if params:
            check_names(params, "OmniFuseClassifier")

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        return {
            **{name: _CLASSIFIER_DEFAULTS.get(name, s.default) for name, s in BY_NAME.items()},
            "out_dir": None,
            "base_dir": None,
        }

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in BY_NAME}

    def fit(self, X: pd.DataFrame, y: Any) -> OmniFuseClassifier:  # noqa: N803 (sklearn's name)
        frame = _as_manifest(X)
        labels = np.asarray(y)
        if len(labels) != len(frame):
            raise ValueError(f"X has {len(frame)} patients but y has {len(labels)} labels")
        self.classes_, codes = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("y needs at least two classes")
        frame = frame.assign(label=codes)
        if self.out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="omnifuse-fit-")
            folder = Path(self._tmp.name) / "run"
        else:
            folder = Path(self.out_dir)
        self.run_ = train(
            frame,
            num_classes=len(self.classes_),
            out_dir=folder,
            overwrite=self.out_dir is not None,
            base_dir=self.base_dir if self.base_dir is not None else Path.cwd(),
            **self._settings(),
        )
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:  # noqa: N803 (sklearn's name)
        """(n_patients, n_classes) probabilities in ``classes_`` order."""
        if not hasattr(self, "run_"):
            raise NotFittedError("OmniFuseClassifier is not fitted yet: call fit(X, y) first")
        frame = _as_manifest(X)
        out = self.run_.predict(
            frame,
            base_dir=self.base_dir if self.base_dir is not None else Path.cwd(),
            device=self.device,
            cache=self.cache,
            cache_dir=self.cache_dir,
            threads=self.threads,
        )
        columns = [c for c in out.columns if c.startswith("prob_")]
        probs = out[columns].to_numpy(dtype=float)
        unscored = np.isnan(probs).any(axis=1)
        if unscored.any():
            reasons = out.loc[unscored, ["id", "reason"]].head(3).to_dict("records")
            raise ValueError(f"{int(unscored.sum())} patient(s) could not be scored: {reasons}")
        return probs

    def predict(self, X: pd.DataFrame) -> np.ndarray:  # noqa: N803 (sklearn's name)
        """The most probable class of each patient (a label from ``y``)."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


# The estimator's signature lists every parameter, so get_params, clone and GridSearchCV see them.
OmniFuseClassifier.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in OmniFuseClassifier._param_defaults().items()
    ]
)


def _as_manifest(X: Any) -> pd.DataFrame:  # noqa: N803 (sklearn's name)
    if not isinstance(X, pd.DataFrame):
        raise TypeError(
            f"X must be a pandas DataFrame in the manifest format (id + modality columns), "
            f"not {type(X).__name__}"
        )
    if "id" not in X.columns:
        raise ValueError("X needs an 'id' column (one row per patient)")
    return X.drop(columns=["label"], errors="ignore").reset_index(drop=True)
