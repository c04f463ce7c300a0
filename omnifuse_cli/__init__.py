"""omnifuse: OmniFuse multimodal learning on low-quality medical data, from the command line and
from Python (``omnifuse_cli.api``: train, cv, make_data, Run; ``OmniFuseClassifier`` of
omnifuse_cli.estimator; ``tune``, the hyperparameter search of omnifuse_cli.tuning)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "OmniFuseClassifier",
    "Run",
    "__version__",
    "cv",
    "make_data",
    "resume",
    "resume_cv",
    "train",
    "tune",
]
_API = frozenset(__all__) - {"__version__", "tune", "OmniFuseClassifier"}

if TYPE_CHECKING:
    from omnifuse_cli.api import Run, cv, make_data, resume, resume_cv, train
    from omnifuse_cli.estimator import OmniFuseClassifier
    from omnifuse_cli.tuning.front import tune


def __getattr__(name: str) -> Any:
    # The API is imported on first use: `omnifuse --help` imports this package and must not pay
    # for torch.
    if name in _API:
        from omnifuse_cli import api

        return getattr(api, name)
    if name == "OmniFuseClassifier":  # the estimator is built on the API, one layer above it
        from omnifuse_cli.estimator import OmniFuseClassifier

        return OmniFuseClassifier
    if name == "tune":  # the search is built on the API, one layer above it
        from omnifuse_cli.tuning.front import tune

        return tune
    raise AttributeError(f"module 'omnifuse_cli' has no attribute {name!r}")
