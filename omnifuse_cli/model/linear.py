"""The linear path: a logistic regression on the sparse inputs, blended with OmniFuse's output.

On a few thousand patients a well-regularised linear model on tf-idf n-grams and standardised
lab values is what a neural fusion model loses to (method.md Sec. 5.6). The path holds such a
model, fitted after training by scikit-learn (engine/linear_path.py), and the blend
log p = log_softmax(a log p_OmniFuse + b z_linear + c) whose a, b and c are fitted on validation
patients by log loss: the blend leans on whichever part predicts better, and scales the result
the way temperature scaling would. Everything here is a buffer: the optimiser never trains it,
and until it is fitted (b = 0, a = 1, c = 0) the model's output is exactly OmniFuse's.

Features, per patient (B patients, C classes), the same that scikit-learn was fitted on:
  text modalities (simple encoder): the tf-idf row of the note (ids, weights)    -> vocab x C
  vector modalities: standardised values (0 where missing) and the presence mask -> 2D x C
  every modality: whether it is present                                           -> M x C
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearPath(nn.Module):
    # Buffers registered in __init__, declared so type checkers see tensors, not Module | Tensor.
    presence: torch.Tensor
    intercept: torch.Tensor
    blend: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self, *, names: list[str], kinds: list[str], dims: list[int], num_classes: int
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.kinds = list(kinds)
        c = num_classes
        # text_<name>: (vocab, C); vector_<name>: (2 D, C); only these kinds have linear terms.
        self.terms = [
            (i, n, k)
            for i, (n, k) in enumerate(zip(names, kinds, strict=True))
            if k in ("text", "vector")
        ]
        for i, name, kind in self.terms:
            rows = dims[i] if kind == "text" else 2 * dims[i]
            self.register_buffer(f"{kind}_{name}", torch.zeros(rows, c))
        self.register_buffer("presence", torch.zeros(len(names), c))
        self.register_buffer("intercept", torch.zeros(c))
        self.register_buffer("blend", torch.tensor([1.0, 0.0]))  # a (OmniFuse), b (linear)
        self.register_buffer("bias", torch.zeros(c))  # c

    @property
    def fitted(self) -> bool:
        return bool(self.blend[1] != 0) or bool(self.bias.any()) or bool(self.blend[0] != 1)

    def logits(
        self, inputs: dict[str, dict[str, torch.Tensor]], present: torch.Tensor
    ) -> torch.Tensor:
        """z_linear: (B, C) from the batch's inputs; absent modalities contribute nothing."""
        fed = present.to(self.intercept.dtype)  # (B, M)
        z = self.intercept + fed @ self.presence
        for i, name, kind in self.terms:
            weight = getattr(self, f"{kind}_{name}")
            part = inputs[name]
            if kind == "text":
                if "ids" not in part:  # an hf text encoder: no sparse features
                    continue
                ids, w = part["ids"], part["weights"]  # (B, L) 0 = padding, (B, L) tf-idf
                term = F.embedding_bag(
                    ids, weight, per_sample_weights=w.to(weight.dtype), mode="sum", padding_idx=0
                )
            else:
                x, mask = part["x"], part["mask"]  # (B, D) standardised, (B, D) bool
                x = torch.where(mask, x, torch.zeros_like(x)).to(weight.dtype)
                term = torch.cat([x, mask.to(weight.dtype)], dim=1) @ weight
            z = z + fed[:, i : i + 1] * term
        return z

    def combine(
        self,
        log_probs: torch.Tensor,
        inputs: dict[str, dict[str, torch.Tensor]],
        present: torch.Tensor,
    ) -> torch.Tensor:
        """The blended class log-probabilities; OmniFuse's own until the path is fitted."""
        if not self.fitted:
            return log_probs
        z = self.logits(inputs, present).float()
        a, b = self.blend.float()
        return torch.log_softmax(a * log_probs.float() + b * z + self.bias.float(), dim=-1)
