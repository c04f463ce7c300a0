"""When training stops and which epoch wins: the selection score (--eval-metric), the time
limit's check before each epoch (--time-limit) and the run's record of why it stopped."""

from __future__ import annotations

import math
import time

from omnifuse_cli.config import METRIC_KEYS, TrainConfig
from omnifuse_cli.engine import distributed


def selection_key(val: dict[str, float], metric: str) -> tuple[float, ...]:
    """Larger is better; ties (and an undefined score: AUROC on a split missing a class) go to
    the lower log loss. Log loss and AUROC vary less between epochs on small validation splits
    than macro-F1, whose every patient moves it by a step."""
    if metric in ("loss", "log_loss"):
        return (-val["loss"],)
    score = val[METRIC_KEYS.get(metric, metric)]
    return (score if math.isfinite(score) else -math.inf, -val["loss"])


def out_of_time(deadline: float | None, seconds: list[float], started: bool) -> bool:
    """Whether the next epoch, as long as the slowest so far, would end after ``deadline``
    (rank 0 decides under torchrun, so every rank stops at the same epoch)."""
    if deadline is None or not started or not seconds:
        return False
    slowest = max(seconds)
    return bool(distributed.broadcast_object(time.monotonic() + slowest > deadline))


def stop_reason(
    cfg: TrainConfig, last_epoch: int, best_epoch: int, time_limit: bool = False
) -> str:
    """Why training ended, for the run's records."""
    if time_limit:
        return (
            f"time limit after epoch {last_epoch} of {cfg.epochs} (best: epoch {best_epoch}; "
            f"--time-limit {cfg.time_limit:g} s)"
        )
    if last_epoch < cfg.epochs:
        return (
            f"early stopping after epoch {last_epoch} of {cfg.epochs}: no better validation "
            f"{cfg.select_metric.replace('_', '-')} for {cfg.patience} epochs (best: epoch "
            f"{best_epoch})"
        )
    return f"all {cfg.epochs} epochs (best: epoch {best_epoch})"
