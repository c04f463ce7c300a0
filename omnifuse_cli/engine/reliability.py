"""The reliability gate r_m of each imputed modality (method.md Sec. 5.1): where it is
estimated during training (ReliabilityPlan), the estimate itself, and the run's record of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omnifuse_cli.config import TrainConfig
from omnifuse_cli.data.prepared import PreparedCohort, move_to
from omnifuse_cli.data.splits import training_patients
from omnifuse_cli.engine.inference import autocast, loader
from omnifuse_cli.model.omnifuse import OmniFuse

RELIABILITY_MIN_PATIENTS = 10  # fewer eligible held-out patients: the estimate is not made
RELIABILITY_HOLDOUT_SHARE = 0.2  # of the eligible training patients, when validation is short


@dataclass
class ReliabilityPlan:
    """Where each imputed modality's reliability r_m is estimated after every epoch: on the
    validation patients who have m and another modality when there are at least
    RELIABILITY_MIN_PATIENTS of them; otherwise on held-out training slots: a fixed
    RELIABILITY_HOLDOUT_SHARE of the training patients (labelled and unlabeled) with two or
    more modalities, drawn from the run's seed, whose slots are never imputation targets (the
    CRA has not learnt them), together with the validation patients: both are out of sample.
    Held-out patients still train every label term. A modality with too few patients in both
    keeps r_m = 0 and says so."""

    names: list[str]
    source: dict[str, str]  # modality -> "validation", "held-out training slots" or "none"
    counts: dict[str, int]  # modality -> eligible patients in its source
    val: np.ndarray
    held: np.ndarray  # held-out training patients and validation (empty when not needed)
    mask: np.ndarray | None  # (N,) bool over the cohort: held-out rows (None when not needed)
    messages: list[str]

    def update(
        self,
        model: OmniFuse,
        data: PreparedCohort,
        *,
        device: torch.device,
        batch_size: int,
        amp: bool,
    ) -> None:
        by_val = [k for k, n in enumerate(self.names) if self.source[n] == "validation"]
        by_held = [
            k for k, n in enumerate(self.names) if self.source[n] == "held-out training slots"
        ]
        if by_val:
            estimate_reliability(
                model, data, self.val, device=device, batch_size=batch_size, amp=amp, only=by_val
            )
        if by_held:
            estimate_reliability(
                model, data, self.held, device=device, batch_size=batch_size, amp=amp, only=by_held
            )


def _eligible(present: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(M,) patients of ``idx`` who have each modality and at least one other."""
    rows = present[idx]
    return (rows & (rows.sum(axis=1, keepdims=True) >= 2)).sum(axis=0)


def reliability_plan(
    model: OmniFuse, data: PreparedCohort, splits: dict[str, np.ndarray], seed: int
) -> ReliabilityPlan | None:
    """The run's ReliabilityPlan (None without imputation or with a fixed --reliability)."""
    if model.cra_forward is None or model.config.method.reliability != "auto":
        return None
    present = data.present.numpy() if torch.is_tensor(data.present) else np.asarray(data.present)
    names = list(model.names)
    val = np.asarray(splits["val"])
    on_val = _eligible(present, val)
    short = [k for k in range(len(names)) if on_val[k] < RELIABILITY_MIN_PATIENTS]
    held = val[:0]
    mask = None
    if short:
        pool = training_patients(splits)
        pool = pool[present[pool].sum(axis=1) >= 2]
        take = int(round(RELIABILITY_HOLDOUT_SHARE * len(pool)))
        held = np.sort(np.random.default_rng([seed, 0xA11]).choice(pool, take, replace=False))
        mask = np.zeros(len(present), dtype=bool)
        mask[held] = True
    # The held-out slots join the validation patients (both out of sample for the CRA).
    held = np.union1d(held, val) if len(held) else held
    on_held = _eligible(present, held)
    source, counts, messages = {}, {}, []
    for k, name in enumerate(names):
        if k not in short:
            source[name], counts[name] = "validation", int(on_val[k])
        elif on_held[k] >= RELIABILITY_MIN_PATIENTS:
            source[name], counts[name] = "held-out training slots", int(on_held[k])
        else:
            source[name], counts[name] = "none", int(on_held[k])
    moved = [n for n in names if source[n] == "held-out training slots"]
    if moved:
        messages.append(
            f"reliability of {', '.join(moved)}: validation has fewer than "
            f"{RELIABILITY_MIN_PATIENTS} patients with the modality and another, so it is "
            f"estimated on {len(held) - len(val):,} held-out training patients (their slots "
            "are not imputation targets) and the validation patients"
        )
    lost = [n for n in names if source[n] == "none"]
    if lost:
        messages.append(
            f"reliability of {', '.join(lost)} stays 0 (its imputation never votes): fewer "
            f"than {RELIABILITY_MIN_PATIENTS} patients have it and another modality in "
            "validation or the held-out training patients"
        )
    return ReliabilityPlan(names, source, counts, val, held, mask, messages)


def reliability_values(model: OmniFuse) -> dict[str, float]:
    """Each modality's current reliability (empty without imputation or when it is fixed)."""
    if model.cra_forward is None or model.config.method.reliability != "auto":
        return {}
    values = model.reliability.detach().cpu().tolist()
    return {n: round(float(v), 6) for n, v in zip(model.names, values, strict=True)}


def reliability_meta(
    model: OmniFuse, data: PreparedCohort, splits: dict[str, np.ndarray], cfg: TrainConfig
) -> dict[str, Any]:
    """The best epoch's reliabilities and where they were estimated (meta.csv, bundle)."""
    plan = reliability_plan(model, data, splits, cfg.seed)
    if plan is None:
        return {}
    out: dict[str, Any] = {f"reliability_{k}": v for k, v in reliability_values(model).items()}
    out["reliability_source"] = ";".join(
        f"{n}={plan.source[n]} ({plan.counts[n]})" for n in plan.names
    )
    return out


@torch.no_grad()
def estimate_reliability(
    model: OmniFuse,
    data: PreparedCohort,
    indices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool = True,
    min_patients: int = RELIABILITY_MIN_PATIENTS,
    only: list[int] | None = None,
) -> np.ndarray:
    """r_m = clip(R^2, 0, 1) of the forward imputation of modality m on held-out patients who
    have m and another modality: m is hidden, imputed from the rest, and compared with its
    real embedding (method.md Sec. 5.1). Sets and returns the model's reliability buffer; a
    modality with fewer than ``min_patients`` such patients, or not in ``only``, keeps its
    previous value."""
    assert model.cra_forward is not None
    model.eval()
    m = len(model.names)
    sse, total, sq, count = np.zeros(m), None, np.zeros(m), np.zeros(m)
    for batch in loader(data, indices, batch_size=max(batch_size, 256)):
        batch = move_to(batch, device)
        present = batch["present"]
        with autocast(device, amp):
            v = model.embed(batch["inputs"], present).float()
            for k in range(m):
                if only is not None and k not in only:
                    continue
                rows = present[:, k] & (present.sum(dim=1) >= 2)
                if not rows.any():
                    continue
                mask = present[rows].clone()
                mask[:, k] = False
                out = model.fuse(v[rows], mask)
                assert out.v_fwd is not None
                real, imputed = v[rows, k], out.v_fwd[:, k].float()
                sse[k] += float(((imputed - real) ** 2).sum())
                sums = real.sum(dim=0).double().cpu().numpy()
                if total is None:
                    total = np.zeros((m, len(sums)))
                total[k] += sums
                sq[k] += float((real.double() ** 2).sum())
                count[k] += int(rows.sum())
    reliability = model.reliability.detach().cpu().numpy().copy()
    for k in range(m):
        if count[k] < min_patients or total is None or (only is not None and k not in only):
            continue
        sst = sq[k] - float((total[k] ** 2).sum()) / count[k]  # sum ||v - mean v||^2
        if sst > 0:
            reliability[k] = float(np.clip(1.0 - sse[k] / sst, 0.0, 1.0))
    model.reliability.copy_(torch.as_tensor(reliability, dtype=model.reliability.dtype))
    return reliability
