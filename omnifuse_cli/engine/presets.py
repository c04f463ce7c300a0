"""Settings that follow the cohort: the --eval-metric "auto" choice and the cohort-size rule for
the batch size, learning rate, epochs and patience (issue 22; README "Presets").

The rule, for settings neither the user nor the preset gave (TrainConfig.cohort_defaults):
- up to SMALL training patients nothing changes: batch 32, lr 3e-4, 30 epochs, no early
  stopping, the settings the synthetic and real-data benchmarks chose;
- beyond, the batch grows with the cohort (the power of two nearest n / 1000, at most 1024), so
  an epoch is a few hundred optimizer steps rather than n / 32 of them (at a million patients:
  ~780 steps instead of 25,000, the difference between 3 and 30 minutes per epoch);
- the learning rate follows the batch by the square-root rule for Adam (lr x sqrt(B / 32)),
  at most 3e-3;
- epochs shrink as 30 x sqrt(SMALL / n) (at least 5): a large cohort sees as many updates of
  each weight in fewer passes; patience 3 stops a run whose validation score has settled.
The modalities do not enter the rule: no benchmark has shown a setting that should depend on
them at a given cohort size.
"""

from __future__ import annotations

import dataclasses
import math

from omnifuse_cli.config import TrainConfig

SMALL = 20_000
MAX_BATCH = 1024
MAX_LR = 3e-3


def resolve_metric(metric: str, num_classes: int, bagged: bool) -> str:
    """--eval-metric auto. A bagged run (--bag-folds) judges each model on its out-of-fold part
    (a fifth of the training patients) and the ensemble on all of them: AUROC for two classes
    (what a binary risk score is judged on, and AutoGluon's eval_metric in the comparison), log
    loss for more. A single model is judged on its small validation split (10%), where macro-F1
    picked better epochs with the linear path on: on held-out validation patients of both real
    cohorts (benchmarks/results/selection_blend.md) and on 20 real test splits of issue 22
    (AUROC - macro-F1 -0.004 [-0.0085, +0.0005]; benchmarks/real/results/presets-real.md)."""
    if metric == "auto":
        if not bagged:
            return "macro_f1"
        return "auroc" if num_classes == 2 else "log_loss"
    return "log_loss" if metric == "loss" else metric


def cohort_values(n_train: int) -> dict[str, float | int]:
    """The rule's batch size, learning rate, epochs and patience for ``n_train`` training
    patients."""
    if n_train <= SMALL:
        return {"batch_size": 32, "lr": 3e-4, "epochs": 30, "patience": 0}
    batch = int(min(MAX_BATCH, 2 ** round(math.log2(n_train / 1000))))
    batch = max(batch, 32)
    lr = float(min(MAX_LR, 3e-4 * math.sqrt(batch / 32)))
    epochs = max(5, round(30 * math.sqrt(SMALL / n_train)))
    return {"batch_size": batch, "lr": round(lr, 6), "epochs": epochs, "patience": 3}


def adapt_to_cohort(cfg: TrainConfig, n_train: int, num_classes: int) -> tuple[TrainConfig, str]:
    """``cfg`` with the metric resolved and the cohort rule's values for the settings it leaves
    to the rule; and a line saying what was chosen (logged at the start of training)."""
    chosen = cohort_values(n_train)
    values = {name: chosen[name] for name in cfg.cohort_defaults if name in chosen}
    metric = resolve_metric(cfg.select_metric, num_classes, cfg.bag_folds >= 2)
    out = dataclasses.replace(cfg, select_metric=metric, cohort_defaults=(), **values)  # type: ignore[arg-type]
    said = ", ".join(f"{k} {v:g}" for k, v in values.items())
    line = f"settings for {n_train:,} training patients: eval metric {metric}" + (
        f"; from the cohort-size rule: {said}" if said else ""
    )
    return out, line


class Budget:
    """--time-limit as deadlines (time.monotonic() values; None without a limit): the networks
    stop starting epochs and folds at ``models``, the ensemble's classical members at
    ``members``; what is left after them is for the post-hoc fit, the test split and the files
    (a few seconds on thousands of patients)."""

    def __init__(self, started: float, limit: float, *, ensemble: bool) -> None:
        self.started, self.limit = started, limit
        share = MODELS_SHARE_ENSEMBLE if ensemble else MODELS_SHARE
        self.models: float | None = started + limit * share if limit else None
        self.members: float | None = started + limit * MEMBERS_SHARE if limit else None

    def meta(self, finished: float) -> dict[str, object]:
        if not self.limit:
            return {}
        return {"time_limit": self.limit, "time_used": round(finished - self.started, 1)}


MODELS_SHARE = 0.85
MODELS_SHARE_ENSEMBLE = 0.7
MEMBERS_SHARE = 0.9
