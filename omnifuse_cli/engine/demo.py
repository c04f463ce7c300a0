"""`omnifuse synth`: the seed's feature-level demo, in memory, no files.

Three vector modalities with different amounts of class signal (strong, medium, weak) and
missing modalities, so every term of the objective (forward and backward imputation, DWFuse, TLA)
is exercised and its fall can be watched epoch by epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnifuse_cli.config import (
    ImageConfig,
    MethodConfig,
    ModalitySpec,
    ModelConfig,
    TextConfig,
    TrainConfig,
)
from omnifuse_cli.data.cohort import Cohort
from omnifuse_cli.data.prepared import Preprocessor
from omnifuse_cli.data.splits import stratified_split
from omnifuse_cli.engine.events import EventFn
from omnifuse_cli.engine.fitting import EpochRecord, fit_model
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.machine import set_threads
from omnifuse_cli.engine.metrics import classification_metrics
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.errors import ConfigError


@dataclass(frozen=True)
class SynthConfig:
    n: int = 600
    num_classes: int = 3
    dims: tuple[int, ...] = (32, 64, 48)  # feature size of each modality
    signal: tuple[float, ...] = (0.25, 0.15, 0.08)  # class separation of each modality
    missing_rate: float = 0.3  # per patient and modality, keeping at least one
    seed: int = 42
    epochs: int = 15
    threads: int | None = None  # torch's CPU threads (None: the usable cores)

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.signal):
            raise ConfigError("dims and signal need one value per modality")
        if not 0 <= self.missing_rate < 1:
            raise ConfigError(f"--missing-rate must be in [0, 1), got {self.missing_rate}")
        if self.n < 10 * self.num_classes:
            raise ConfigError(f"--n must be at least {10 * self.num_classes}, got {self.n}")


@dataclass
class SynthResult:
    records: list[EpochRecord]
    test: dict[str, float]
    modality_names: list[str]
    split_counts: dict[str, int] = field(default_factory=dict)


def synth_cohort(cfg: SynthConfig) -> Cohort:
    rng = np.random.default_rng(cfg.seed)
    labels = rng.permutation(np.arange(cfg.n) % cfg.num_classes)
    names = [f"m{i + 1}" for i in range(len(cfg.dims))]
    present = rng.random((cfg.n, len(names))) >= cfg.missing_rate
    empty = ~present.any(axis=1)
    present[empty, rng.integers(0, len(names), empty.sum())] = True
    cohort = Cohort(
        source=Path("<synth>"),
        ids=[f"p{i:05d}" for i in range(cfg.n)],
        labels=labels,
        modalities=tuple(ModalitySpec(n, "vector") for n in names),
        present=present,
    )
    for m, (name, dim, signal) in enumerate(zip(names, cfg.dims, cfg.signal, strict=True)):
        centers = rng.normal(size=(cfg.num_classes, dim))
        x = signal * centers[labels] + rng.normal(size=(cfg.n, dim))
        x[~present[:, m]] = np.nan
        cohort.vectors[name] = x.astype(np.float32)
        cohort.vector_columns[name] = [f"{name}_{j}" for j in range(dim)]
    return cohort


def run_synth(
    cfg: SynthConfig, method: MethodConfig, on_event: EventFn | None = None
) -> SynthResult:
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cohort = synth_cohort(cfg)
    assert cohort.labels is not None
    splits = stratified_split(cohort.labels, train=0.7, val=0.15, test=0.15, seed=cfg.seed)
    pre = Preprocessor.fit(cohort.subset(splits["train"]), ImageConfig(), TextConfig())
    dims = tuple(pre.input_dim(spec) for spec in cohort.modalities)
    model = build_model(
        ModelConfig(cohort.modalities, cfg.num_classes, dims, method), ImageConfig(), {}
    )
    data = pre.prepare(cohort)
    train = TrainConfig(epochs=cfg.epochs, seed=cfg.seed, device="cpu", batch_size=64)
    records, _, best = fit_model(
        model, data, splits, train, cfg.num_classes, on_event or (lambda e: None)
    )
    model.load_state_dict(best)
    result = infer(model, data, splits["test"], device=torch.device("cpu"))
    test = classification_metrics(
        cohort.labels[result.index], np.exp(result.log_probs), cfg.num_classes
    )
    return SynthResult(records, test, cohort.names, {k: len(v) for k, v in splits.items()})
