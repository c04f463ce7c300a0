"""Per-modality encoders e_m (Eq. 1), each split timm-style into features and head.

``forward_features`` runs the (possibly frozen, cacheable) backbone on raw inputs;
``forward_head`` is always trained and maps backbone features to the d-dim embedding. Encoders
without a heavy backbone (vectors, the simple text encoder) have an identity feature step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class VectorEncoder(nn.Module):
    """MLP over standardised values and their presence mask (a missing value is never a 0)."""

    cacheable = False

    def __init__(self, *, in_dim: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        hidden = max(64, embed_dim)
        self.net = nn.Sequential(
            nn.Linear(2 * in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
        )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x, mask = inputs["x"], inputs["mask"]  # (B, D) standardised, (B, D) bool
        x = torch.where(mask, x, torch.zeros_like(x))
        return self.net(torch.cat([x, mask.to(x.dtype)], dim=1))  # (B, d)


class SimpleTextEncoder(nn.Module):
    """tf-idf weighted sum of trained n-gram embeddings (vocabulary and idf fitted on the
    training split), then an MLP."""

    cacheable = False

    def __init__(self, *, vocab_size: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, embed_dim, mode="sum", padding_idx=0)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, embed_dim), nn.ReLU(),
                                 nn.Linear(embed_dim, embed_dim))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, weights = inputs["ids"], inputs["weights"]  # (B, L) 0 = padding, (B, L) tf-idf
        return self.net(self.bag(ids, per_sample_weights=weights.to(self.bag.weight.dtype)))


def _masked_mean(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    weights = attention.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class HFTextEncoder(nn.Module):
    """A transformers AutoModel with attention-mask mean pooling (not CLS), then a projection."""

    cacheable = True

    def __init__(self, *, backbone: nn.Module, hidden_size: int, embed_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = hidden_size
        self.head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Dropout(dropout),
                                  nn.Linear(hidden_size, embed_dim))

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return _masked_mean(out.last_hidden_state, inputs["attention_mask"])  # (B, H)

    def forward_head(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(inputs["feats"])  # (B, d)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "feats" not in inputs:
            inputs = {"feats": self.forward_features(inputs)}
        return self.forward_head(inputs)

    def trainable_tail(self, last_n: int) -> list[nn.Parameter]:
        """Parameters of the last n transformer layers (what --finetune-text-last-n unfreezes)."""
        if last_n <= 0:
            return []
        layers = _largest_module_list(self.backbone)
        if layers is None:
            return list(self.backbone.parameters())
        return [p for layer in list(layers)[-last_n:] for p in layer.parameters()]


def _largest_module_list(module: nn.Module) -> nn.ModuleList | None:
    best: nn.ModuleList | None = None
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and (best is None or len(sub) > len(best)):
            best = sub
    return best


class ImageEncoder(nn.Module):
    """ResNet trunk per image, projection, then masked attention pooling over a patient's views."""

    cacheable = True

    def __init__(self, *, trunk: nn.Module, feature_dim: int, embed_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.backbone = trunk
        self.feature_dim = feature_dim
        # Backbone features are standardised with training-split statistics (set_feature_stats),
        # not per image: a per-image LayerNorm would erase overall activation strength, which is
        # where lesion area and echogenicity show up.
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embed_dim),
                                  nn.GELU())
        self.attn = nn.Sequential(nn.Linear(embed_dim, embed_dim // 2), nn.Tanh(),
                                  nn.Linear(embed_dim // 2, 1))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone(pixels), 1)  # (N, 3, S, S) -> (N, F)

    def forward_head(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats, mask = inputs["feats"], inputs["mask"]  # (B, I, F), (B, I) bool
        h = self.proj((feats - self.feat_mean) / self.feat_std)  # (B, I, d)
        scores = self.attn(h).squeeze(-1)  # (B, I)
        # A patient without images gets uniform weights over padding; the slot is masked upstream.
        scores = scores.masked_fill(~mask, -1e4)
        weights = torch.softmax(scores.float(), dim=1).to(h.dtype)
        return (weights.unsqueeze(-1) * h).sum(1)  # (B, d)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "feats" not in inputs:
            pixels, mask = inputs["pixels"], inputs["mask"]  # (B, I, 3, S, S), (B, I)
            b, i = mask.shape
            feats = torch.zeros(b, i, self.feature_dim, device=pixels.device, dtype=pixels.dtype)
            if mask.any():
                feats[mask] = self.forward_features(pixels[mask]).to(feats.dtype)
            inputs = {"feats": feats, "mask": mask}
        return self.forward_head(inputs)

    @torch.no_grad()
    def set_feature_stats(self, feats: torch.Tensor) -> None:
        """Standardisation statistics from backbone features of training images (N, F)."""
        if len(feats) < 2:
            return
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp(min=1e-4))

    def set_trainable_scope(self, scope: str) -> None:
        """Unfreeze none, layer4, layer3+ (layer3 and layer4) or all of the trunk."""
        names = {"none": (), "layer4": ("7",), "layer3+": ("6", "7"), "all": None}[scope]
        for name, param in self.backbone.named_parameters():
            param.requires_grad = names is None or name.split(".")[0] in names


def resnet_trunk(name: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its fc layer (children up to avgpool), randomly initialised."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    feature_dim = net.fc.in_features
    trunk = nn.Sequential(*list(net.children())[:-1])  # ... layer4, avgpool -> (N, F, 1, 1)
    return trunk, feature_dim


def resnet_state_for_trunk(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map a torchvision ResNet state dict (conv1.*, layer1.*, ...) onto the Sequential trunk."""
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in order:
            out[f"{order.index(head)}.{rest}"] = value
    return out
