"""The OmniFuse model: encoders, forward/backward CRA, DWFuse and TLA (method.md).

Shapes: B patients, M modalities, d embedding size, C classes. ``present`` (B, M) says which
modalities a patient really has; ``mask`` (B, M) says which are fed to the model (training drops
some present ones to supervise imputation; TLA and mining restrict it to a combination).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_cli.config import ModelConfig
from omnifuse_cli.model.encoders import SimpleTextEncoder
from omnifuse_cli.model.fusion import classifier, dwfuse_loss, label_free_log_probs
from omnifuse_cli.model.imputation import CascadeResidualAutoencoder
from omnifuse_cli.model.laziness import available
from omnifuse_cli.model.linear import LinearPath


@dataclass
class FuseOutput:
    """Everything one pass through imputation and fusion produces."""

    v_in: torch.Tensor  # (B, M, d) observed embeddings, missing embeddings in masked slots
    v_fwd: torch.Tensor | None  # (B, M, d) forward imputation v' (None without imputation)
    h: torch.Tensor  # (B, M, d) observed slots where fed, gated imputations elsewhere
    gate: torch.Tensor  # (B, M) how much each slot counts: 1 fed, reliability when imputed
    modality_log_probs: torch.Tensor | None  # (B, M, C) log p_m (None without DWFuse)
    joint_log_probs: torch.Tensor  # (B, C) joint head o (or the concat head without DWFuse)


@dataclass
class Prediction:
    log_probs: torch.Tensor  # (B, C) under the configured inference rule
    weights: torch.Tensor | None  # (B, M, C) DWFuse weights w_m(c) (None without DWFuse)


class OmniFuse(nn.Module):
    # Buffers registered in __init__, declared so type checkers see tensors, not Module | Tensor.
    reliability: torch.Tensor
    class_weight: torch.Tensor | None

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
        # Reliability r_m of each modality's imputation (method.md Sec. 5.1): an imputed slot is
        # r_m v'_m + (1 - r_m) missing_m and counts r_m in DWFuse. "auto" starts at 0 (no
        # evidence yet) and is re-estimated after every epoch; a number fixes it.
        fixed = 0.0 if method.reliability == "auto" else float(method.reliability)
        self.register_buffer("reliability", torch.full((m,), fixed))
        # Per-class loss weights (--class-weight), set by training; not part of the bundle.
        self.register_buffer("class_weight", None, persistent=False)
        if method.use_imputation:
            make_cra = partial(
                CascadeResidualAutoencoder,
                in_dim=m * d,
                layers=method.ra_layers,
                num_ra=method.num_ra,
                dropout=method.cra_dropout,
            )
            self.cra_forward: CascadeResidualAutoencoder | None = make_cra()
            self.cra_backward: CascadeResidualAutoencoder | None = (
                make_cra() if method.use_backward else None
            )
            latent_dim = self.cra_forward.latent_dim
            joint_in = {"latents": latent_dim, "slots": m * d, "both": latent_dim + m * d}[
                method.joint_input
            ]
        else:
            self.cra_forward = None
            self.cra_backward = None
            joint_in = m * d
        h, p = method.head_hidden, method.dropout
        if method.use_dwfuse:
            head_in = d + 1 if method.slot_flags else d
            self.modality_heads: nn.ModuleList | None = nn.ModuleList(
                classifier(head_in, h, c, p) for _ in names
            )
            self.joint_head = classifier(joint_in, h, c, p)
        else:
            # Concat fusion: one classifier on the concatenated (imputed) representation.
            self.modality_heads = None
            self.joint_head = classifier(m * d, h, c, p)
        # Sparse text features exist only for the simple encoder; other encoders get no term.
        kinds = [
            spec.kind
            if spec.kind != "text" or isinstance(self.encoders[spec.name], SimpleTextEncoder)
            else "other"
            for spec in config.modalities
        ]
        self.linear = (
            LinearPath(names=names, kinds=kinds, dims=list(config.input_dims), num_classes=c)
            if method.linear_path
            else None
        )

    # -- embeddings ---------------------------------------------------------------------------
    def embed(
        self, inputs: dict[str, dict[str, torch.Tensor]], present: torch.Tensor
    ) -> torch.Tensor:
        """v_m = e_m(x_m) for every modality: (B, M, d). Slots of absent modalities hold
        whatever the encoder made of padding and are always masked downstream."""
        slots = [self.encoders[n](inputs[n]) for n in self.names]
        return torch.stack(slots, dim=1).to(self.missing.dtype)

    # -- imputation + fusion ------------------------------------------------------------------
    def fuse(self, v: torch.Tensor, mask: torch.Tensor) -> FuseOutput:
        cfg = self.config.method
        b, m, d = v.shape
        miss = self.missing.unsqueeze(0).expand(b, m, d)
        fed = mask.unsqueeze(-1)
        v_in = torch.where(fed, v, miss)  # Eq. 2
        if self.cra_forward is not None:
            flat, latents = self.cra_forward(v_in.reshape(b, m * d))  # Eqs. 4-5
            v_fwd = flat.view(b, m, d)
            r = self.reliability.to(v.dtype)
            # Reliability gate: r = 1 is the paper's imputed slot, r = 0 the missing embedding
            # of the model without imputation (method.md Sec. 5.1); both exactly, in floats.
            rr = r.view(1, m, 1)
            h = torch.where(fed, v_in, rr * v_fwd + (1 - rr) * miss)
            gate = torch.where(mask, torch.ones_like(mask, dtype=v.dtype), r.unsqueeze(0))
            slots = h.reshape(b, m * d)
            joint_in = {
                "latents": latents,
                "slots": slots,
                "both": torch.cat([latents, slots], dim=1),
            }[cfg.joint_input]
        else:
            v_fwd = None
            h = v_in
            gate = mask.to(v.dtype)  # nothing is imputed: a missing slot never votes
            joint_in = h.reshape(b, m * d)
        if self.modality_heads is not None:
            head_in = torch.cat([h, (~fed).to(h.dtype)], dim=-1) if cfg.slot_flags else h
            logits = torch.stack(
                [g(head_in[:, i]) for i, g in enumerate(self.modality_heads)], dim=1
            )
            modality_log_probs = torch.log_softmax(logits.float(), dim=-1)  # Eq. 9
            joint = torch.log_softmax(self.joint_head(joint_in).float(), dim=-1)  # Eq. 11
        else:
            modality_log_probs = None
            joint = torch.log_softmax(self.joint_head(h.reshape(b, m * d)).float(), dim=-1)
        return FuseOutput(v_in, v_fwd, h, gate, modality_log_probs, joint)

    def predict_from(self, out: FuseOutput, rule: str | None = None) -> Prediction:
        """Class log-probabilities without labels (method.md Sec. 2, inference)."""
        cfg = self.config.method
        rule = rule or cfg.inference_rule
        if out.modality_log_probs is None:
            return Prediction(out.joint_log_probs, None)
        gate = self._vote_gate(out)
        log_probs, weights = label_free_log_probs(
            out.modality_log_probs,
            out.joint_log_probs,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gate=gate,
        )
        if rule == "joint":
            log_probs = out.joint_log_probs
        elif rule == "mean":
            probs = out.modality_log_probs.exp()
            if gate is None:
                probs = probs.mean(dim=1)
            else:
                share = gate / gate.sum(dim=1, keepdim=True)  # fed slots count 1: sum >= 1
                probs = (share.unsqueeze(-1) * probs).sum(dim=1)
            log_probs = torch.log(probs.clamp(min=1e-12))
        return Prediction(log_probs, weights)

    def _vote_gate(self, out: FuseOutput) -> torch.Tensor | None:
        """Reliability fixed at 1 is the paper's rule: Eq. 10 untouched, every slot votes."""
        if self.config.method.reliability == "1":
            return None
        return out.gate.float()

    def forward(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
        mask: torch.Tensor | None = None,
        rule: str | None = None,
    ) -> Prediction:
        """The model's prediction from the modalities ``mask`` feeds (default: all present),
        blended with the linear path once it is fitted."""
        fed = present if mask is None else mask
        pred = self.predict_from(self.fuse(self.embed(inputs, present), fed), rule)
        if self.linear is not None:
            pred.log_probs = self.linear.combine(pred.log_probs, inputs, fed)
        return pred

    # -- training objective -------------------------------------------------------------------
    def losses(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
        y: torch.Tensor,
        *,
        lazy: torch.Tensor | None,
        generator: torch.Generator | None = None,
        holdout: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of Eq. 18 for one batch; ``total`` is their weighted sum.

        lazy: (M,) bool mask of the lazy combination mined after the previous epoch, or None.
        y: class per patient, -1 for an unlabeled patient: unlabeled patients enter the
        imputation terms (forward and backward) only; every label term (DWFuse, the plain
        head, TLA) averages over the batch's labelled patients (method.md Sec. 5.8).
        holdout: (B,) bool, patients whose slots are never imputation targets (they estimate
        the reliability gate out of sample when validation cannot, engine/training.py).
        """
        cfg = self.config.method
        v = self.embed(inputs, present)
        mask = drop_modalities(present, cfg.modality_drop, generator)
        # Modality dropout serves every variant (method.md Sec. 5.2): the dropped view trains
        # the heads for the patterns seen at test time and supervises imputation; the full view
        # keeps the patient's real pattern in training too. Every view of the batch (dropped,
        # full, TLA's lazy combination) goes through one fuse call: the same arithmetic as
        # separate calls, at a fraction of the per-call overhead on CPUs.
        views, masks = [v], [mask]
        if cfg.drop_full_view and cfg.modality_drop > 0 and bool((mask != present).any()):
            views.append(v)
            masks.append(present)
        rows = None
        if cfg.use_tla and lazy is not None:
            rows = available(present, lazy)
            if rows.any():
                views.append(v[rows])
                masks.append(lazy.unsqueeze(0).expand(int(rows.sum()), -1))
            else:
                rows = None
        stacked = self.fuse(torch.cat(views), torch.cat(masks))
        bounds = np.cumsum([0, *(len(x) for x in views)])
        outs = [
            _rows(stacked, slice(int(lo), int(hi)))
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        n_views = len(views) - (rows is not None)
        out = outs[0]
        zero = v.new_zeros(())
        terms: dict[str, torch.Tensor] = {"forward": zero, "backward": zero, "tla": zero}
        if out.v_fwd is not None:
            terms["forward"], terms["backward"] = self._imputation_losses(
                v, present, mask, out, None if holdout is None else ~holdout
            )
        labelled = y >= 0
        if bool(labelled.any()):
            terms["dwfuse"], tla = self._label_terms(
                outs[:n_views], y, labelled, None if rows is None else outs[-1], rows
            )
            terms["tla"] = zero if tla is None else tla
        else:  # a batch of unlabeled patients only: the graph still reaches every head
            terms["dwfuse"] = zero + 0.0 * out.joint_log_probs.sum()
        # loss_weights always has its four terms, so the sum is a tensor, never sum()'s start 0.
        terms["total"] = cast(torch.Tensor, sum(w * terms[k] for k, w in cfg.loss_weights.items()))
        return terms

    def _label_terms(
        self,
        views: list[FuseOutput],
        y: torch.Tensor,
        labelled: torch.Tensor,
        lazy_out: FuseOutput | None,
        lazy_rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L_DWFuse (Eq. 14, mean over the views) and L_TLA (Eq. 17, on the lazy view of the
        patients ``lazy_rows`` selects; None when none of them has a label), each a mean over
        the batch's labelled patients (unlabeled ones have y = -1)."""
        keep = None if bool(labelled.all()) else labelled.nonzero(as_tuple=True)[0]
        y_l = y if keep is None else y[keep]
        weight = self.sample_weight(y_l)
        dwfuse = torch.stack(
            [
                self._classification_loss(o if keep is None else _rows(o, keep), y_l, weight)
                for o in views
            ]
        ).mean()
        if lazy_out is None or lazy_rows is None:
            return dwfuse, None
        y_lazy, ok = y[lazy_rows], labelled[lazy_rows]
        if not bool(ok.any()):
            return dwfuse, None
        log_probs = self.predict_from(lazy_out).log_probs
        if keep is not None:
            log_probs, y_lazy = log_probs[ok], y_lazy[ok]
        nll = F.nll_loss(log_probs, y_lazy, reduction="none")
        w_lazy = self.sample_weight(y_lazy)
        return dwfuse, (nll if w_lazy is None else nll * w_lazy).mean()

    def sample_weight(self, y: torch.Tensor) -> torch.Tensor | None:
        """Each patient's loss weight, its class's --class-weight (None: all 1). The weights are
        scaled so the average training patient weighs 1, so every loss term stays a plain mean
        over the batch (which keeps DDP's per-rank shares exact)."""
        return None if self.class_weight is None else self.class_weight[y]

    def _classification_loss(
        self, out: FuseOutput, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if out.modality_log_probs is None:
            nll = F.nll_loss(out.joint_log_probs, y, reduction="none")
            return (nll if weight is None else nll * weight).mean()
        cfg = self.config.method
        loss, _ = dwfuse_loss(
            out.modality_log_probs,
            out.joint_log_probs,
            y,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gate=self._vote_gate(out),
            sample_weight=weight,
        )
        return loss

    def _imputation_losses(
        self,
        v: torch.Tensor,
        present: torch.Tensor,
        mask: torch.Tensor,
        out: FuseOutput,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_forward (Eq. 7) and L_backward (Eq. 8). Targets are detached. ``targets`` (B,)
        bool: the patients whose slots may serve as targets (None: all)."""
        assert out.v_fwd is not None
        b, m, d = v.shape
        if targets is not None:
            present = present & targets.unsqueeze(1)
        if self.config.method.imputation_loss == "paper":
            # Complementary target (Eq. 3): missing embedding where fed, the true embedding
            # where dropped; slots the patient never had carry no target.
            target = torch.where(mask.unsqueeze(-1), self.missing.expand_as(v), v).detach()
            slot_err = ((out.v_fwd - target) ** 2).mean(dim=-1)  # (B, M)
            weight = present.to(slot_err.dtype)
            forward = (slot_err * weight).sum() / weight.sum().clamp(min=1.0)
            backward = v.new_zeros(())
            if self.cra_backward is not None:
                back, _ = self.cra_backward(out.v_fwd.reshape(b, m * d))  # Eq. 6
                backward = F.mse_loss(back, out.v_in.reshape(b, m * d).detach())
            return forward, backward
        # normalized (method.md Sec. 5.3): each slot standardised over its d features, so the
        # error is on the cross-entropy's scale whatever the encoders' output scale, and only
        # where a target exists (the dropped slots).
        slot_err = ((_standardise(out.v_fwd) - _standardise(v.detach())) ** 2).mean(dim=-1)
        weight = (present & ~mask).to(slot_err.dtype)
        forward = (slot_err * weight).sum() / weight.sum().clamp(min=1.0)
        backward = v.new_zeros(())
        if self.cra_backward is not None:
            back, _ = self.cra_backward(out.v_fwd.reshape(b, m * d))
            cycle = (
                _standardise(back.view(b, m, d)) - _standardise(out.v_in.detach())
            ) ** 2  # (B, M, d)
            if targets is None:
                backward = cycle.mean()
            else:  # a plain batch mean with held-out rows at 0 (DDP's shares stay exact)
                backward = (cycle.mean(dim=(1, 2)) * targets.to(cycle.dtype)).mean()
        return forward, backward


def _rows(out: FuseOutput, index: slice | torch.Tensor) -> FuseOutput:
    """The patients ``index`` of a fuse output (every field is batch-first)."""
    return FuseOutput(
        v_in=out.v_in[index],
        v_fwd=None if out.v_fwd is None else out.v_fwd[index],
        h=out.h[index],
        gate=out.gate[index],
        modality_log_probs=(
            None if out.modality_log_probs is None else out.modality_log_probs[index]
        ),
        joint_log_probs=out.joint_log_probs[index],
    )


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def drop_modalities(
    present: torch.Tensor, rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
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
