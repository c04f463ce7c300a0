"""Per-modality encoders e_m (Eq. 1), each split timm-style into features and head.

``forward_features`` runs the (possibly frozen, cacheable) backbone on raw inputs;
``forward_head`` is always trained and maps backbone features to the d-dim embedding. Encoders
without a heavy backbone (vectors, the simple text encoder) have an identity feature step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
            nn.Linear(2 * in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
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
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(embed_dim, embed_dim),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, weights = inputs["ids"], inputs["weights"]  # (B, L) 0 = padding, (B, L) tf-idf
        return self.net(self.bag(ids, per_sample_weights=weights.to(self.bag.weight.dtype)))


def _masked_mean(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    weights = attention.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class HFTextEncoder(nn.Module):
    """A transformers AutoModel with attention-mask mean pooling (not CLS), then a projection."""

    cacheable = True

    def __init__(
        self, *, backbone: nn.Module, hidden_size: int, embed_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = hidden_size
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Dropout(dropout), nn.Linear(hidden_size, embed_dim)
        )

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
    """torchvision trunk per image (see image_trunk), projection, then masked attention pooling
    over a patient's views."""

    cacheable = True
    # Buffers registered in __init__, declared so type checkers see tensors, not Module | Tensor.
    feat_mean: torch.Tensor
    feat_std: torch.Tensor

    def __init__(
        self, *, trunk: nn.Module, feature_dim: int, embed_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = trunk
        self.feature_dim = feature_dim
        # Backbone features are standardised with training-split statistics (set_feature_stats),
        # not per image: a per-image LayerNorm would erase overall activation strength, which is
        # where lesion area and echogenicity show up.
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embed_dim), nn.GELU())
        self.attn = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.Tanh(), nn.Linear(embed_dim // 2, 1)
        )

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
        """Unfreeze none, layer4, layer3+ or all of the trunk.

        The trunk's blocks are the children of its ``features`` (torchvision's convolutional
        body in mobilenet, efficientnet, convnext, densenet, vgg, swin) or else its own
        children, counting only those with parameters. layer4 unfreezes the last block and
        layer3+ the last two: for a ResNet exactly layer4, or layer3 and layer4. Parameters
        outside ``features`` (convnext's final LayerNorm) come after every block, so they train
        with layer4 and layer3+ too.
        """
        if scope in ("none", "all"):
            self.backbone.requires_grad_(scope == "all")
            return
        features = getattr(self.backbone, "features", None)
        root, prefix = (
            (features, "features.") if isinstance(features, nn.Sequential) else (self.backbone, "")
        )
        blocks = [
            f"{prefix}{name}."
            for name, child in root.named_children()
            if any(True for _ in child.parameters())
        ]
        tail = tuple(blocks[-{"layer4": 1, "layer3+": 2}[scope] :])
        for name, param in self.backbone.named_parameters():
            param.requires_grad = name.startswith(tail) or not name.startswith(prefix)


class DroppedClassifier(nn.Identity):
    """Stands where a torchvision model's last Linear layer was: marks the weights that a
    full-model state dict holds and the trunk does not (see trunk_state)."""


def image_trunk(name: str) -> tuple[nn.Module, int]:
    """A torchvision classification model without its classifier, randomly initialised, and
    the width of the features it returns.

    ResNets become the Sequential of their children up to avgpool, so bundles and checkpoints
    saved when only ResNets were supported still load. Any other model keeps torchvision's own
    structure and key names, its last Linear layer replaced by a DroppedClassifier; the feature
    width is that layer's in_features.
    """
    import torchvision  # heavy: loaded only when an image modality is built

    net = torchvision.models.get_model(name, weights=None)
    if isinstance(net, torchvision.models.ResNet):
        # ... layer4, avgpool -> (N, F, 1, 1)
        return nn.Sequential(*list(net.children())[:-1]), net.fc.in_features
    linears = [(key, m) for key, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no Linear classifier to remove")
    key, head = linears[-1]
    parent, _, attr = key.rpartition(".")
    setattr(net.get_submodule(parent), attr, DroppedClassifier())
    return net, head.in_features


# torchvision's densenet ImageNet files still use the key names of torchvision < 0.3
# (denselayer1.norm.1.weight); its own loader renames them the same way.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def trunk_state(trunk: nn.Module, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a full torchvision state dict (an ImageNet file or the user's) onto a trunk from
    image_trunk, leaving out the classifier the trunk dropped."""
    if isinstance(trunk, nn.Sequential):  # image_trunk returns a Sequential for ResNets only
        return resnet_state_for_trunk(state)
    dropped = tuple(
        f"{key}." for key, m in trunk.named_modules() if isinstance(m, DroppedClassifier)
    )
    return {
        _DENSENET_LEGACY_KEY.sub(r"\1\2", key): value
        for key, value in state.items()
        if not key.startswith(dropped)
    }


def resnet_state_for_trunk(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map a torchvision ResNet state dict (conv1.*, layer1.*, ...) onto the Sequential trunk."""
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in order:
            out[f"{order.index(head)}.{rest}"] = value
    return out
