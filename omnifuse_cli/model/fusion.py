"""DWFuse: per-modality heads, dynamic weights and the label-free inference rule (Eqs. 9-14)."""

from __future__ import annotations

import torch
from torch import nn

# p_n[c] is clipped below 1 so log(1 - p) stays finite when a head is certain.
_P_MAX = 1.0 - 1e-6


def classifier(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """g_m / g_ra: a few FC layers."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def dwfuse_weights(
    log_probs: torch.Tensor, beta: float, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """w_m(c) = prod_{n != m} (1 - p_n[c]) ** (g_n * beta / (M - 1)) for every class c.

    log_probs: (B, M, C) per-modality log-probabilities; gate: (B, M) how much each slot counts
    (1 observed, the modality's reliability when imputed, 0 when not imputed; None = all 1, the
    paper's Eq. 10). Returns (B, M, C). With one modality there is nothing to weigh against, so
    every weight is 1.
    """
    _, m, _ = log_probs.shape
    if m == 1:
        return torch.ones_like(log_probs)
    log_rest = torch.log1p(-log_probs.exp().clamp(max=_P_MAX))  # log(1 - p_n[c])
    if gate is not None:
        # A slot that does not count must not down-weight the others either, so that gate 0
        # gives exactly the weights computed over the counted slots alone.
        log_rest = log_rest * gate.unsqueeze(-1).to(log_rest.dtype)
    others = log_rest.sum(dim=1, keepdim=True) - log_rest  # sum over n != m
    return torch.exp(others * (beta / (m - 1)))


def weights_at(weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Pick w_m(c_b) for each patient b: (B, M, C), (B,) -> (B, M)."""
    index = classes.view(-1, 1, 1).expand(-1, weights.shape[1], 1)
    return weights.gather(2, index).squeeze(2)


def dwfuse_loss(
    log_probs: torch.Tensor,
    joint_log_probs: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gate: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_DWFuse = sum_m g_m w_m CE(p_m, y) + alpha CE(o, y) (Eqs. 12-14), weights detached.

    gate: (B, M) as in dwfuse_weights (None = the paper's rule). sample_weight: (B,) each
    patient's class weight (--class-weight; None = 1). Returns the loss (mean over the batch)
    and the gated weights at the true class (B, M).
    """
    w = weights_at(dwfuse_weights(log_probs.detach(), beta, gate), y)  # (B, M), not trained
    if gate is not None:
        w = w * gate.to(w.dtype)
    nll = -log_probs.gather(2, y.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)).squeeze(2)
    enc = (w * nll).sum(dim=1)  # (B,)
    ra = -joint_log_probs.gather(1, y.view(-1, 1)).squeeze(1)
    per_patient = enc + alpha * ra
    if sample_weight is not None:
        per_patient = per_patient * sample_weight.to(per_patient.dtype)
    return per_patient.mean(), w


def label_free_log_probs(
    log_probs: torch.Tensor,
    joint_log_probs: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score each class c as if it were the label, without ever seeing a label.

    s(c) = -( sum_m g_m w_m(c) * (-log p_m[c]) + alpha * (-log o[c]) ); returns log softmax(s)
    (B, C) and the gated per-class weights g_m w_m(c) (B, M, C). Weights are detached as in
    training. gate (B, M): as in dwfuse_weights; a slot with gate 0 has no effect at all on
    the result (what its head says is ignored).
    """
    w = dwfuse_weights(log_probs.detach(), beta, gate)
    if gate is not None:
        w = w * gate.unsqueeze(-1).to(w.dtype)
    score = (w * log_probs).sum(dim=1) + alpha * joint_log_probs
    return torch.log_softmax(score, dim=1), w
