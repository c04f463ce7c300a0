"""What follows the epoch loop, on the restored best model: the linear path (linear_path.py)
and the post-hoc fit (posthoc.py) on the validation split, and their lines in meta.csv."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.prepared import PreparedCohort
from omnifuse_cli.engine.fitting import infer_all
from omnifuse_cli.engine.linear_path import LinearFit, fit_linear_path
from omnifuse_cli.engine.posthoc import PostHoc, class_weights, fit_posthoc
from omnifuse_cli.model.omnifuse import OmniFuse


def fit_linear(
    model: OmniFuse,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
) -> LinearFit | None:
    """Fit the model's linear path (engine/linear_path.py) after the best epoch is restored:
    scikit-learn on the training split, the blend on validation."""
    if model.linear is None:
        return None
    val = infer_all(
        model, data, splits["val"], device=device, batch_size=max(cfg.batch_size, 256), amp=cfg.amp
    )
    assert data.labels is not None
    weights = class_weights(
        cfg.class_weight, data.labels[splits["train"]].numpy(), model.config.num_classes
    )
    return fit_linear_path(
        model,
        data,
        splits["train"],
        splits["val"],
        val,
        seed=cfg.seed,
        class_weight=None if weights is None else dict(enumerate(weights)),
    )


def fit_finish(
    model: OmniFuse,
    data: PreparedCohort,
    splits: dict[str, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
    class_names: list[str],
    linear: LinearFit | None = None,
) -> PostHoc:
    """Temperature, operating point and conformal scores on the validation split
    (engine/posthoc.py), after the best epoch and the linear path. With a linear path, on its
    validation predictions before its refit on training + validation patients: after the refit
    the validation patients are in-sample, their predictions too confident to calibrate on."""
    assert data.labels is not None
    if linear is not None and linear.val_log_probs is not None:
        index = linear.val_index
        log_probs = linear.val_log_probs
    else:
        val = infer_all(
            model,
            data,
            splits["val"],
            device=device,
            batch_size=max(cfg.batch_size, 256),
            amp=cfg.amp,
        )
        index, log_probs = val.index, val.log_probs
    return fit_posthoc(log_probs, data.labels[index].numpy(), cfg, class_names)


def posthoc_meta(posthoc: PostHoc) -> dict[str, Any]:
    """The run's record of its post-hoc fit (meta.csv)."""
    return {
        "calibration": posthoc.calibration,
        "temperature": round(posthoc.temperature, 6),
        "positive_class": "" if posthoc.positive is None else posthoc.positive,
        "threshold_rule": posthoc.rule or "",
        "threshold": "" if posthoc.threshold is None else round(posthoc.threshold, 6),
    }


def linear_state(model: OmniFuse) -> dict[str, torch.Tensor]:
    """The linear path's buffers as state-dict entries (to add to a saved best state)."""
    assert model.linear is not None
    return {f"linear.{k}": v for k, v in model.linear.state_dict().items()}


def linear_summary(fit: LinearFit) -> str:
    return (
        f"linear path: logistic regression C={fit.C:g} on {fit.features:,} features; "
        f"blend {fit.blend_omnifuse:.2f} x OmniFuse + {fit.blend_linear:.2f} x linear "
        f"(validation log loss {fit.val_log_loss_omnifuse:.3f} -> "
        f"{fit.val_log_loss_blend:.3f})"
    )


def linear_meta(fit: LinearFit) -> dict[str, Any]:
    return {
        "linear_C": fit.C,
        "linear_blend_omnifuse": round(fit.blend_omnifuse, 4),
        "linear_blend_linear": round(fit.blend_linear, 4),
        "linear_features": fit.features,
        "val_log_loss_omnifuse": round(fit.val_log_loss_omnifuse, 4),
        "val_log_loss_blend": round(fit.val_log_loss_blend, 4),
    }
