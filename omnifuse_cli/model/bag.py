"""A bag of OmniFuse models (--bag-folds K): K members trained on K folds of the training
patients, whose prediction is the mean of their probabilities.

The members share their frozen pretrained backbones (one module, one copy of the weights in
memory and in the bundle): a backbone is never trained in a bag (engine/bagging.py refuses
fine-tuning), so the K copies would be identical. ``encoders``, ``config`` and ``names`` are the
first member's, so the code that encodes frozen features (engine/frozen_features.py) treats a bag
like one model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omnifuse_cli.config import ModelConfig
from omnifuse_cli.model.omnifuse import OmniFuse, Prediction

BACKBONE = "backbone"


class BaggedOmniFuse(nn.Module):
    def __init__(self, members: list[OmniFuse]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a bag needs at least one member")
        self.members = nn.ModuleList(members)
        share_backbones(members)

    @property
    def first(self) -> OmniFuse:
        member = self.members[0]
        assert isinstance(member, OmniFuse)
        return member

    @property
    def config(self) -> ModelConfig:
        return self.first.config

    @property
    def encoders(self) -> nn.ModuleDict:
        return self.first.encoders

    @property
    def names(self) -> list[str]:
        return self.first.names

    @property
    def linear(self) -> None:
        """A bag has no linear path of its own: each member blends its own."""
        return None

    def forward(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
        mask: torch.Tensor | None = None,
        rule: str | None = None,
    ) -> Prediction:
        """log of the members' mean probability; DWFuse weights averaged over the members."""
        preds = [member(inputs, present, mask=mask, rule=rule) for member in self.members]
        stacked = torch.stack([p.log_probs.float() for p in preds])
        log_probs = torch.logsumexp(stacked, dim=0) - math.log(len(preds))
        weights = None
        if all(p.weights is not None for p in preds):
            weights = torch.stack([p.weights.float() for p in preds if p.weights is not None])
            weights = weights.mean(dim=0)
        return Prediction(log_probs, weights)

    def bag_state(self) -> dict[str, torch.Tensor]:
        """The state dict without the shared backbones' second and later copies."""
        return {k: v for k, v in self.state_dict().items() if not _shared_copy(k)}

    def load_bag_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what bag_state saved (strict on everything else)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _shared_copy(k)]
        if missing or unexpected:
            raise RuntimeError(
                f"bag state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        share_backbones(list(self.members))  # type: ignore[arg-type]


def share_backbones(members: list[OmniFuse]) -> None:
    """Every member's pretrained backbones become the first member's modules."""
    first = members[0]
    for member in members[1:]:
        for name, encoder in member.encoders.items():
            if hasattr(encoder, BACKBONE) and isinstance(getattr(encoder, BACKBONE), nn.Module):
                setattr(encoder, BACKBONE, getattr(first.encoders[name], BACKBONE))


def _shared_copy(key: str) -> bool:
    """``members.K.encoders.NAME.backbone.*`` for K >= 1."""
    parts = key.split(".")
    return (
        len(parts) > 4
        and parts[0] == "members"
        and parts[1] != "0"
        and parts[2] == "encoders"
        and parts[4] == BACKBONE
    )
