"""TLA: modality combinations and the lazy-combination choice (method.md Sec. 3, Eqs. 15-17)."""

from __future__ import annotations

import itertools

import torch


def combinations(num_modalities: int) -> list[tuple[int, ...]]:
    """The 2^M - 1 non-empty modality subsets, smallest first."""
    return [
        combo
        for size in range(1, num_modalities + 1)
        for combo in itertools.combinations(range(num_modalities), size)
    ]


def combo_name(combo: tuple[int, ...], names: list[str]) -> str:
    return "+".join(names[i] for i in combo)


def combo_mask(combo: tuple[int, ...], num_modalities: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(num_modalities, dtype=torch.bool, device=device)
    mask[list(combo)] = True
    return mask  # (M,)


def available(present: torch.Tensor, combo: torch.Tensor) -> torch.Tensor:
    """Patients having every modality of the combination: (B, M), (M,) -> (B,)."""
    return (present | ~combo).all(dim=1)


def pick_lazy(distances: dict[tuple[int, ...], float]) -> tuple[int, ...] | None:
    """delta_lazy = the combination with the largest mean distance (Eq. 15); NaN ones skipped."""
    finite = {k: v for k, v in distances.items() if v == v}
    if not finite:
        return None
    return max(finite, key=lambda k: finite[k])
