"""Cascade residual autoencoders (method.md Sec. 1, Eqs. 4-6)."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(widths: list[int], *, dropout: float, last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_act:
            layers += [nn.LeakyReLU(0.2), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class ResidualAutoencoder(nn.Module):
    """phi_k: encoder -> bottleneck latent c_k -> decoder giving a residual of the input size."""

    def __init__(self, *, in_dim: int, layers: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        widths = [in_dim, *layers]
        self.encoder = _mlp(widths, dropout=dropout, last_act=True)
        # The decoder ends linear: a residual must be free to take any sign and size.
        self.decoder = _mlp(list(reversed(widths)), dropout=dropout, last_act=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)  # (B, layers[-1])
        return self.decoder(latent), latent  # (B, in_dim), (B, layers[-1])


class CascadeResidualAutoencoder(nn.Module):
    """K RAs: dz_1 = phi_1(v); dz_k = phi_k(v + sum_{j<k} dz_j); output v + sum_k dz_k (Eq. 5)."""

    def __init__(
        self, *, in_dim: int, layers: tuple[int, ...], num_ra: int, dropout: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualAutoencoder(in_dim=in_dim, layers=layers, dropout=dropout)
            for _ in range(num_ra)
        )
        self.latent_dim = layers[-1] * num_ra

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = v  # (B, M*d)
        latents = []
        for block in self.blocks:
            dz, latent = block(out)
            out = out + dz
            latents.append(latent)
        return out, torch.cat(latents, dim=1)  # (B, M*d), (B, K*c)
