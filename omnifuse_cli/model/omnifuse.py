"""The OmniFuse model: encoders, forward/backward CRA, DWFuse and TLA (method.md).

Shapes: B patients, M modalities, d embedding size, C classes. ``present`` (B, M) says which
modalities a patient really has; ``mask`` (B, M) says which are fed to the model (training drops
some present ones to supervise imputation; TLA and mining restrict it to a combination).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_cli.engine.config import ModelConfig
from omnifuse_cli.model.fusion import classifier, dwfuse_loss, label_free_log_probs
from omnifuse_cli.model.imputation import CascadeResidualAutoencoder
from omnifuse_cli.model.laziness import available


@dataclass
class FuseOutput:
    """Everything one pass through imputation and fusion produces."""

    v_in: torch.Tensor  # (B, M, d) observed embeddings, missing embeddings in masked slots
    v_fwd: torch.Tensor | None  # (B, M, d) forward imputation v' (None without imputation)
    h: torch.Tensor  # (B, M, d) observed slots where fed, imputed (or missing emb.) elsewhere
    modality_log_probs: torch.Tensor | None  # (B, M, C) log p_m (None without DWFuse)
    joint_log_probs: torch.Tensor  # (B, C) joint head o (or the concat head without DWFuse)


@dataclass
class Prediction:
    log_probs: torch.Tensor  # (B, C) under the configured inference rule
    weights: torch.Tensor | None  # (B, M, C) DWFuse weights w_m(c) (None without DWFuse)


class OmniFuse(nn.Module):
    def __init__(self, config: ModelConfig, encoders: dict[str, nn.Module]) -> None:
        super().__init__()
        self.config = config
        names = [m.name for m in config.modalities]
        self.names = names
        self.encoders = nn.ModuleDict({n: encoders[n] for n in names})
        method = config.method
        m, d, c = len(names), method.embed_dim, config.num_classes
        # The paper's e_m(0) is a constant per modality; a learned constant is the cheap
        # equivalent for image and text encoders (method.md Sec. 1, decided).
        self.missing = nn.Parameter(torch.randn(m, d) * 0.02)
        if method.use_imputation:
            kwargs = {"in_dim": m * d, "layers": method.ra_layers, "num_ra": method.num_ra,
                      "dropout": method.dropout}
            self.cra_forward = CascadeResidualAutoencoder(**kwargs)
            self.cra_backward = (
                CascadeResidualAutoencoder(**kwargs) if method.use_backward else None
            )
            joint_in = self.cra_forward.latent_dim
        else:
            self.cra_forward = None
            self.cra_backward = None
            joint_in = m * d
        h, p = method.head_hidden, method.dropout
        if method.use_dwfuse:
            self.modality_heads = nn.ModuleList(classifier(d, h, c, p) for _ in names)
            self.joint_head = classifier(joint_in, h, c, p)
        else:
            # Concat fusion: one classifier on the concatenated (imputed) representation.
            self.modality_heads = None
            self.joint_head = classifier(m * d, h, c, p)

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, inputs: dict[str, dict[str, torch.Tensor]], present: torch.Tensor
              ) -> torch.Tensor:
        """v_m = e_m(x_m) for every modality: (B, M, d). Slots of absent modalities hold
        whatever the encoder made of padding and are always masked downstream."""
        slots = [self.encoders[n](inputs[n]) for n in self.names]
        return torch.stack(slots, dim=1).to(self.missing.dtype)

    # -- imputation + fusion ------------------------------------------------------------------
    def fuse(self, v: torch.Tensor, mask: torch.Tensor) -> FuseOutput:
        b, m, d = v.shape
        miss = self.missing.unsqueeze(0).expand(b, m, d)
        v_in = torch.where(mask.unsqueeze(-1), v, miss)  # Eq. 2
        if self.cra_forward is not None:
            flat, latents = self.cra_forward(v_in.reshape(b, m * d))  # Eqs. 4-5
            v_fwd = flat.view(b, m, d)
            h = torch.where(mask.unsqueeze(-1), v_in, v_fwd)
            joint_in = latents
        else:
            v_fwd = None
            h = v_in
            joint_in = h.reshape(b, m * d)
        if self.modality_heads is not None:
            logits = torch.stack([g(h[:, i]) for i, g in enumerate(self.modality_heads)], dim=1)
            modality_log_probs = torch.log_softmax(logits.float(), dim=-1)  # Eq. 9
            joint = torch.log_softmax(self.joint_head(joint_in).float(), dim=-1)  # Eq. 11
        else:
            modality_log_probs = None
            joint = torch.log_softmax(self.joint_head(h.reshape(b, m * d)).float(), dim=-1)
        return FuseOutput(v_in, v_fwd, h, modality_log_probs, joint)

    def predict_from(self, out: FuseOutput, rule: str | None = None) -> Prediction:
        """Class log-probabilities without labels (method.md Sec. 2, inference)."""
        cfg = self.config.method
        rule = rule or cfg.inference_rule
        if out.modality_log_probs is None:
            return Prediction(out.joint_log_probs, None)
        log_probs, weights = label_free_log_probs(
            out.modality_log_probs, out.joint_log_probs, alpha=cfg.alpha, beta=cfg.beta
        )
        if rule == "joint":
            log_probs = out.joint_log_probs
        elif rule == "mean":
            log_probs = torch.log(out.modality_log_probs.exp().mean(dim=1).clamp(min=1e-12))
        return Prediction(log_probs, weights)

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]], present: torch.Tensor,
                mask: torch.Tensor | None = None) -> Prediction:
        v = self.embed(inputs, present)
        return self.predict_from(self.fuse(v, present if mask is None else mask))

    # -- training objective -------------------------------------------------------------------
    def losses(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
        y: torch.Tensor,
        *,
        lazy: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of Eq. 18 for one batch; ``total`` is their weighted sum.

        lazy: (M,) bool mask of the lazy combination mined after the previous epoch, or None.
        """
        cfg = self.config.method
        v = self.embed(inputs, present)
        if self.cra_forward is not None:
            mask = drop_modalities(present, cfg.modality_drop, generator)
        else:
            mask = present
        out = self.fuse(v, mask)
        zero = v.new_zeros(())
        terms: dict[str, torch.Tensor] = {"forward": zero, "backward": zero, "tla": zero}
        if out.v_fwd is not None:
            # Complementary target (Eq. 3): missing embedding where fed, the true embedding where
            # dropped; slots the patient never had carry no target. Targets are detached.
            target = torch.where(mask.unsqueeze(-1), self.missing.expand_as(v), v).detach()
            slot_err = ((out.v_fwd - target) ** 2).mean(dim=-1)  # (B, M)
            weight = present.to(slot_err.dtype)
            terms["forward"] = (slot_err * weight).sum() / weight.sum().clamp(min=1.0)  # Eq. 7
            if self.cra_backward is not None:
                b, m, d = v.shape
                back, _ = self.cra_backward(out.v_fwd.reshape(b, m * d))  # Eq. 6
                terms["backward"] = F.mse_loss(back, out.v_in.reshape(b, m * d).detach())  # Eq. 8
        if out.modality_log_probs is not None:
            terms["dwfuse"], _ = dwfuse_loss(
                out.modality_log_probs, out.joint_log_probs, y, alpha=cfg.alpha, beta=cfg.beta
            )
        else:
            terms["dwfuse"] = F.nll_loss(out.joint_log_probs, y)
        if cfg.use_tla and lazy is not None:
            rows = available(present, lazy)
            if rows.any():
                lazy_mask = lazy.unsqueeze(0).expand(int(rows.sum()), -1)
                sub = self.fuse(v[rows], lazy_mask)
                terms["tla"] = F.nll_loss(self.predict_from(sub).log_probs, y[rows])  # Eq. 17
        terms["total"] = (
            terms["forward"] + cfg.lambda1 * terms["backward"] + cfg.lambda2 * terms["dwfuse"]
            + cfg.lambda3 * terms["tla"]
        )
        return terms


def drop_modalities(present: torch.Tensor, rate: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly hide present modalities (each with probability ``rate``), keeping at least one
    per patient, so the dropped ones can supervise imputation (method.md Sec. 1)."""
    if rate <= 0:
        return present
    noise = torch.rand(present.shape, generator=generator, device="cpu").to(present.device)
    mask = present & (noise >= rate)
    empty = ~mask.any(dim=1)
    if empty.any():
        # Keep the present modality with the highest draw for patients who lost everything.
        scores = torch.where(present, noise, torch.full_like(noise, -1.0))
        keep = torch.zeros_like(mask)
        keep[torch.arange(len(mask), device=mask.device), scores.argmax(dim=1)] = True
        mask = torch.where(empty.unsqueeze(1), keep & present, mask)
    return mask
