"""Fitted preprocessing (lab statistics, text vocabularies) and the batches the model eats.

``Preprocessor.fit`` learns everything from the training split alone; ``state()`` is plain JSON
for the bundle. ``prepare`` turns any Cohort (train, test, or new patients) into per-patient
model inputs, and ``PatientDataset`` + ``collate`` batch them with explicit masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnifuse_cli.config import ImageConfig, ModalitySpec, TextConfig
from omnifuse_cli.data import text as simple_text
from omnifuse_cli.data.cache import FeatureArray, offsets_from_sizes
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.images import View, image_transform, load_image, select_views
from omnifuse_cli.errors import DataError


@dataclass
class Preprocessor:
    """Fitted, saved state needed to turn raw cells into model inputs."""

    modalities: tuple[ModalitySpec, ...]
    image: ImageConfig
    text: TextConfig
    # vector modality -> {"columns": [...], "mean": [...], "std": [...]}
    vector_stats: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    vocabularies: dict[str, list[str]] = field(default_factory=dict)  # simple text modality
    idf: dict[str, list[float]] = field(default_factory=dict)  # simple text: per vocabulary entry
    tokenizers: dict[str, Any] = field(default_factory=dict)  # hf text modality -> tokenizer

    @classmethod
    def fit(
        cls,
        train: Cohort,
        image: ImageConfig,
        text: TextConfig,
        tokenizers: dict[str, Any] | None = None,
    ) -> Preprocessor:
        pre = cls(train.modalities, image, text, tokenizers=dict(tokenizers or {}))
        for spec in train.modalities:
            if spec.kind == "vector":
                values = train.vectors[spec.name].astype(np.float64)
                counts = np.sum(~np.isnan(values), axis=0)
                with np.errstate(invalid="ignore"):
                    mean = np.where(counts > 0, np.nanmean(np.where(counts > 0, values, 0), 0), 0)
                    std = np.where(counts > 1, np.nanstd(np.where(counts > 0, values, 0), 0), 1)
                std = np.where(std > 1e-8, std, 1.0)
                pre.vector_stats[spec.name] = {
                    "columns": list(train.vector_columns[spec.name]),
                    "mean": [float(v) for v in mean],
                    "std": [float(v) for v in std],
                }
            elif spec.kind == "text" and text.encoder == "simple":
                pre.vocabularies[spec.name], pre.idf[spec.name] = simple_text.fit_vocabulary(
                    train.texts[spec.name],
                    size=text.vocab_size,
                    min_freq=text.min_freq,
                    ngrams=text.ngrams,
                )
        return pre

    def state(self) -> dict[str, Any]:
        return {
            "vector_stats": self.vector_stats,
            "vocabularies": self.vocabularies,
            "idf": self.idf,
        }

    @classmethod
    def from_state(
        cls,
        modalities: tuple[ModalitySpec, ...],
        image: ImageConfig,
        text: TextConfig,
        state: dict[str, Any],
        tokenizers: dict[str, Any] | None = None,
    ) -> Preprocessor:
        return cls(
            modalities,
            image,
            text,
            dict(state["vector_stats"]),
            dict(state["vocabularies"]),
            dict(state["idf"]),
            dict(tokenizers or {}),
        )

    def input_dim(self, spec: ModalitySpec) -> int:
        """Size the encoder needs to be built: vector length or vocabulary size (0 otherwise)."""
        if spec.kind == "vector":
            return len(self.vector_stats[spec.name]["columns"])
        if spec.kind == "text" and spec.name in self.vocabularies:
            return len(self.vocabularies[spec.name])
        return 0

    def check_compatible(self, cohort: Cohort) -> None:
        """New patients must carry the training data's modalities and lab columns."""
        for spec in self.modalities:
            if spec.kind != "vector":
                continue
            want = self.vector_stats[spec.name]["columns"]
            got = cohort.vector_columns.get(spec.name, [])
            if not cohort.present[:, cohort.names.index(spec.name)].any():
                continue
            if len(got) != len(want):
                raise DataError(
                    f"{cohort.source}: {spec.name} has {len(got)} values per patient, the model "
                    f"was trained on {len(want)}",
                    hint="give the same lab panel (same columns, same order) as in training",
                )
            named = [c for c in got if not c.startswith(f"{spec.name}_")]
            if named and got != want:
                diff = sorted(set(want) ^ set(got)) or ["(same names, different order)"]
                raise DataError(
                    f"{cohort.source}: {spec.name} columns differ from training: "
                    f"{', '.join(diff[:10])}",
                    hint=f"use the training columns in this order: {', '.join(want)}",
                )

    def prepare(self, cohort: Cohort) -> PreparedCohort:
        prepared = PreparedCohort(
            ids=list(cohort.ids),
            labels=None if cohort.labels is None else torch.as_tensor(cohort.labels),
            present=torch.as_tensor(cohort.present),
            names=cohort.names,
            kinds=[m.kind for m in cohort.modalities],
            image_size=self.image.image_size,
        )
        for spec in cohort.modalities:
            name = spec.name
            if spec.kind == "vector":
                stats = self.vector_stats[name]
                raw = cohort.vectors[name].astype(np.float64)
                if not cohort.present[:, cohort.names.index(name)].any():
                    # Nobody has it (e.g. no --labs-table at predict): the manifest cannot tell
                    # the panel's size, the training statistics can.
                    raw = np.full((len(cohort), len(stats["mean"])), np.nan)
                mask = ~np.isnan(raw)
                x = (np.nan_to_num(raw) - np.asarray(stats["mean"])) / np.asarray(stats["std"])
                prepared.vectors[name] = (
                    torch.as_tensor(np.where(mask, x, 0.0), dtype=torch.float32),
                    torch.as_tensor(mask),
                )
            elif spec.kind == "image":
                prepared.images[name] = [
                    select_views(p, self.image.max_images) for p in cohort.images[name]
                ]
            elif name in self.vocabularies:
                index = {t: i for i, t in enumerate(self.vocabularies[name])}
                ids, weights, offsets = simple_text.encode_many(
                    cohort.texts[name],
                    index,
                    self.idf[name],
                    self.text.max_ngrams,
                    ngrams=self.text.ngrams,
                    sublinear=self.text.sublinear_tf,
                )
                prepared.token_ids[name] = Ragged(ids, offsets)
                prepared.token_weights[name] = Ragged(weights, offsets)
            else:
                tokenizer = self.tokenizers[name]
                prepared.token_ids[name] = Ragged.from_lists(
                    [
                        tokenizer(t, truncation=True, max_length=self.text.max_length)["input_ids"]
                        if t
                        else []
                        for t in cohort.texts[name]
                    ],
                    np.int64,
                )
                prepared.pad_ids[name] = int(tokenizer.pad_token_id or 0)
        return prepared


class Ragged:
    """Rows of different lengths stored flat (row i is ``values[offsets[i]:offsets[i + 1]]``):
    a million patients' token ids are two numpy arrays, not a million Python lists. Indexing
    gives a row as a numpy view; ``batch`` pads a whole batch of rows with numpy."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[Any]], dtype: Any) -> Ragged:
        flat = [v for r in rows for v in r]
        return cls(np.array(flat, dtype=dtype), offsets_from_sizes([len(r) for r in rows]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.offsets[rows + 1] - self.offsets[rows]

    def batch(self, rows: np.ndarray, fill: float | int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), max(1, longest)) padded with ``fill``, and the (B, L) mask of real
        entries, gathered with one fancy index instead of a loop over patients."""
        positions, mask = self.positions(rows)
        out = np.full(mask.shape, fill, dtype=self.values.dtype)
        out[mask] = self.values[positions[mask]]
        return out, mask

    def positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each entry of the padded batch lives in ``values`` (B, L), and the mask."""
        lengths = self.lengths(rows)
        width = max(1, int(lengths.max()) if len(lengths) else 1)
        mask = np.arange(width) < lengths[:, None]
        return self.offsets[rows][:, None] + np.arange(width), mask


@dataclass
class PreparedCohort:
    """Per-patient model inputs for a whole cohort, plus caches of frozen-backbone features."""

    ids: list[str]
    labels: torch.Tensor | None  # (N,)
    present: torch.Tensor  # (N, M) bool
    names: list[str]
    kinds: list[str]
    image_size: int
    vectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    images: dict[str, list[list[View]]] = field(default_factory=dict)
    token_ids: dict[str, Ragged] = field(default_factory=dict)  # per patient, flat storage
    token_weights: dict[str, Ragged] = field(default_factory=dict)  # simple text, same layout
    pad_ids: dict[str, int] = field(default_factory=dict)
    # Frozen-backbone features, indexed by patient (in memory or memory-mapped from the cache):
    # image modality -> [i] is (n_images, F); hf text -> [i] is (H,).
    image_cache: dict[str, FeatureArray] = field(default_factory=dict)
    image_feature_dims: dict[str, int] = field(default_factory=dict)
    text_cache: dict[str, FeatureArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


class PatientDataset(Dataset[dict[str, Any]]):
    """Patients of a PreparedCohort by index; images are read from disk unless cached."""

    def __init__(self, data: PreparedCohort, indices: np.ndarray | list[int]) -> None:
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.transform = image_transform(data.image_size) if data.images else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, ks: list[int]) -> dict[str, Any]:
        """A whole batch at once (the DataLoader calls this instead of ``__getitem__`` per
        patient): numpy/torch fancy indexing, so an epoch over a million patients does not
        spend its time in per-patient Python. Images read from disk take the per-patient
        path."""
        d = self.data
        if any(
            kind == "image" and name not in d.image_cache
            for name, kind in zip(d.names, d.kinds, strict=True)
        ):
            return make_collate(d)([self[k] for k in ks])
        rows = self.indices[np.asarray(ks, dtype=np.int64)]
        index = torch.from_numpy(rows)
        batch: dict[str, Any] = {"index": index, "present": d.present[index], "inputs": {}}
        if d.labels is not None:
            batch["y"] = d.labels[index].long()
        for name, kind in zip(d.names, d.kinds, strict=True):
            if kind == "vector":
                x, mask = d.vectors[name]
                batch["inputs"][name] = {"x": x[index], "mask": mask[index]}
            elif kind == "image":
                batch["inputs"][name] = _batch_image_features(d, name, rows)
            elif name in d.text_cache:
                feats = np.asarray(d.text_cache[name].array[rows], dtype=np.float32)
                batch["inputs"][name] = {"feats": torch.from_numpy(feats)}
            else:
                ids, real = d.token_ids[name].batch(rows, d.pad_ids.get(name, 0))
                if name in d.pad_ids:
                    attention = torch.from_numpy(real.astype(np.int64))
                    attention[:, 0] = 1  # see collate_tokens
                    batch["inputs"][name] = {
                        "input_ids": torch.from_numpy(ids.astype(np.int64)),
                        "attention_mask": attention,
                    }
                else:
                    weights, _ = d.token_weights[name].batch(rows, 0.0)
                    batch["inputs"][name] = {
                        "ids": torch.from_numpy(ids.astype(np.int64)),
                        "weights": torch.from_numpy(weights),
                    }
        return batch

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.indices[k])
        d = self.data
        item: dict[str, Any] = {"index": i, "present": d.present[i]}
        if d.labels is not None:
            item["y"] = d.labels[i]
        for name, kind in zip(d.names, d.kinds, strict=True):
            if kind == "vector":
                x, mask = d.vectors[name]
                item[name] = (x[i], mask[i])
            elif kind == "image":
                if name in d.image_cache:
                    item[name] = ("feats", d.image_cache[name][i])
                else:
                    assert self.transform is not None  # set: the cohort has an image modality
                    pixels = [load_image(p, self.transform) for p in d.images[name][i]]
                    item[name] = ("pixels", pixels)
            elif name in d.text_cache:
                item[name] = ("feats", d.text_cache[name][i])
            elif name in d.token_weights:
                item[name] = ("ids", (d.token_ids[name][i], d.token_weights[name][i]))
            else:
                item[name] = ("ids", (d.token_ids[name][i], None))
        return item


def make_collate(
    data: PreparedCohort,
) -> Callable[[list[dict[str, Any]] | dict[str, Any]], dict[str, Any]]:
    """Batch patient items into the nested input dict the model takes, with explicit masks."""

    def collate(items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        if isinstance(items, dict):  # PatientDataset.__getitems__ batched it already
            return items
        batch: dict[str, Any] = {
            "index": torch.tensor([it["index"] for it in items]),
            "present": torch.stack([it["present"] for it in items]),
            "inputs": {},
        }
        if "y" in items[0]:
            batch["y"] = torch.stack([it["y"] for it in items]).long()
        for name, kind in zip(data.names, data.kinds, strict=True):
            values = [it[name] for it in items]
            if kind == "vector":
                batch["inputs"][name] = {
                    "x": torch.stack([v[0] for v in values]),
                    "mask": torch.stack([v[1] for v in values]),
                }
            elif kind == "image":
                batch["inputs"][name] = _collate_images(
                    [v[1] for v in values],
                    values[0][0],
                    data.image_size,
                    data.image_feature_dims.get(name, 0),
                )
            elif values[0][0] == "feats":
                batch["inputs"][name] = {"feats": torch.stack([v[1] for v in values])}
            else:
                batch["inputs"][name] = collate_tokens(
                    [v[1][0] for v in values],
                    data.pad_ids.get(name, 0),
                    hf=name in data.pad_ids,
                    weights=None if name in data.pad_ids else [v[1][1] for v in values],
                )
        return batch

    return collate


def _batch_image_features(
    data: PreparedCohort, name: str, rows: np.ndarray
) -> dict[str, torch.Tensor]:
    """Cached image features of a batch: (B, n_max, F) and the (B, n_max) view mask."""
    cache = data.image_cache[name]
    assert cache.offsets is not None  # an image cache always has each patient's view offsets
    position, mask = Ragged(cache.array, cache.offsets).positions(rows)  # rows of the views
    feats = np.zeros((*mask.shape, cache.array.shape[1]), dtype=np.float32)
    feats[mask] = cache.array[position[mask]]
    return {"feats": torch.from_numpy(feats), "mask": torch.from_numpy(mask)}


def _collate_images(
    per_patient: Sequence[Any], mode: str, size: int, feature_dim: int
) -> dict[str, torch.Tensor]:
    """``per_patient``: an (n_i, F) feature tensor each ("feats") or a list of n_i (3, S, S)
    pixel tensors each ("pixels")."""
    n_max = max(1, max(len(p) for p in per_patient))
    mask = torch.zeros(len(per_patient), n_max, dtype=torch.bool)
    for b, p in enumerate(per_patient):
        mask[b, : len(p)] = True
    if mode == "feats":
        feats = torch.zeros(len(per_patient), n_max, feature_dim)
        for b, p in enumerate(per_patient):
            if len(p):
                feats[b, : len(p)] = p
        return {"feats": feats, "mask": mask}
    pixels = torch.zeros(len(per_patient), n_max, 3, size, size)
    for b, p in enumerate(per_patient):
        for j, img in enumerate(p):
            pixels[b, j] = img
    return {"pixels": pixels, "mask": mask}


def collate_tokens(
    seqs: list[list[int]], pad: int, *, hf: bool, weights: list[list[float]] | None = None
) -> dict[str, torch.Tensor]:
    length = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    attention = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention[b, : len(s)] = 1
    if hf:
        # A patient without a note still needs one attended token for the transformer.
        attention[:, 0] = 1
        return {"input_ids": ids, "attention_mask": attention}
    per_token = torch.zeros(len(seqs), length)
    for b, w in enumerate(weights or []):
        per_token[b, : len(w)] = torch.as_tensor(w, dtype=torch.float32)
    return {"ids": ids, "weights": per_token}


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch
