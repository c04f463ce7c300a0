"""The training path beyond the frozen default: warm-up then fine-tuning (which parameters move,
at which learning rate), --resume across the warm-up -> fine-tune switch, the saved model being
the best validation epoch, and imputation targets that receive no gradient."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from omnifuse_cli.config import (
    PAPER_OPTIONS,
    ImageConfig,
    MethodConfig,
    ModalitySpec,
    ModelConfig,
)
from omnifuse_cli.data.manifest import read_manifest
from omnifuse_cli.engine import fitting as training
from omnifuse_cli.engine.bundle import load_bundle
from omnifuse_cli.engine.inference import infer
from omnifuse_cli.engine.metrics import classification_metrics
from omnifuse_cli.engine.modelling import build_model
from omnifuse_cli.engine.runs import TrainRequest, read_split_assignment
from omnifuse_cli.engine.runs import load_train_request as load_request
from omnifuse_cli.engine.training import TrainResult, run_training
from omnifuse_cli.errors import TrainingInterrupted
from omnifuse_cli.model.omnifuse import FuseOutput, OmniFuse, drop_modalities

from .conftest import NUM_CLASSES, tiny_bert, tiny_request
from .helpers import TINY_RUN, invoke

IMAGE_BACKBONE = "encoders.us.backbone."
TEXT_BACKBONE = "encoders.text.backbone."


@dataclasses.dataclass
class EpochTrace:
    changed: set[str]  # parameters whose values moved during the epoch
    lrs: list[float]  # learning rate of each optimizer group
    group_sizes: list[int]  # tensors in each optimizer group


@contextmanager
def trace_epochs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EpochTrace]]:
    """Record, for every training epoch, which parameters changed and the optimizer's groups."""
    traces: list[EpochTrace] = []
    real = training.train_epoch

    def traced(
        model: OmniFuse,
        data: Any,
        train_idx: Any,
        optimizer: torch.optim.Optimizer,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, float]:
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        out = real(model, data, train_idx, optimizer, *args, **kwargs)
        changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
        traces.append(
            EpochTrace(
                changed,
                [g["lr"] for g in optimizer.param_groups],
                [len(g["params"]) for g in optimizer.param_groups],
            )
        )
        return out

    with monkeypatch.context() as patch:
        patch.setattr(training, "train_epoch", traced)
        yield traces


def with_train(request: TrainRequest, **train: Any) -> TrainRequest:
    return dataclasses.replace(request, train=dataclasses.replace(request.train, **train))


def names_of(model: torch.nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{k}" for k, _ in model.named_parameters()}


def metrics_without_time(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False).drop(
        columns=["seconds"]
    )


# -- image fine-tuning and --resume across the switch from warm-up to fine-tuning ----------------


@pytest.fixture(scope="module")
def finetune_reference(
    tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainRequest, TrainResult, list[EpochTrace]]:
    """Three epochs, one of warm-up then layer3+ fine-tuning, never interrupted, traced."""
    request = with_train(
        tiny_request(tiny_manifest, tmp_path_factory.mktemp("ft") / "ref", epochs=3),
        warmup_epochs=1,
        finetune_image_scope="layer3+",
        lr=2e-3,
        lr_image=5e-4,
    )
    with pytest.MonkeyPatch.context() as patch, trace_epochs(patch) as traces:
        result = run_training(request)
    return request, result, traces


def test_warmup_keeps_the_image_backbone_frozen_then_layer3_plus_fine_tunes(
    finetune_reference: tuple[TrainRequest, TrainResult, list[EpochTrace]],
) -> None:
    request, _, traces = finetune_reference
    assert len(traces) == 3
    trunk = load_bundle(request.out_dir).model.encoders["us"].backbone
    backbone = names_of(trunk, IMAGE_BACKBONE)
    # The ResNet trunk is Sequential(conv1, bn1, relu, maxpool, layer1..layer4, avgpool).
    tail = {n for n in backbone if n.startswith((f"{IMAGE_BACKBONE}6.", f"{IMAGE_BACKBONE}7."))}
    assert tail and tail != backbone

    warmup, *finetune = traces
    assert not warmup.changed & backbone, "a backbone weight moved during warm-up"
    for trace in traces:
        for head in (
            "encoders.us.proj.1.weight",
            "encoders.labs.net.0.weight",
            "joint_head.0.weight",
            "cra_forward.blocks.0.encoder.0.weight",
        ):
            assert head in trace.changed, head
        # The heads at --lr, the image backbone at --lr-image, from the first epoch on.
        assert trace.lrs == [2e-3, 5e-4]
        assert trace.group_sizes[1] == len(backbone)
    for trace in finetune:
        assert trace.changed & backbone == tail  # layer3 and layer4, nothing below them
    phases = pd.read_csv(request.out_dir / "metrics.csv")["phase"].tolist()
    assert phases == ["warmup", "finetune", "finetune"]


@pytest.mark.parametrize("stop_in_epoch", [2, 3], ids=["first-finetune-epoch", "after-switch"])
def test_resume_across_the_finetune_switch_equals_an_uninterrupted_run(
    finetune_reference: tuple[TrainRequest, TrainResult, list[EpochTrace]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_in_epoch: int,
) -> None:
    """Ctrl-C in the first fine-tuning epoch (the checkpoint holds no backbone: it was frozen)
    or in the next one (the checkpoint holds the fine-tuned layers)."""
    reference, expected, _ = finetune_reference
    run = tmp_path / "run"
    real = training.train_epoch
    calls: list[int] = []

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == stop_in_epoch:
            raise KeyboardInterrupt  # Ctrl-C during this epoch
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "train_epoch", interrupted)
        with pytest.raises(TrainingInterrupted):
            run_training(dataclasses.replace(reference, out_dir=run))
    assert len(metrics_without_time(run)) == stop_in_epoch - 1

    resumed = run_training(load_request(run), resume=True)
    assert resumed.best_epoch == expected.best_epoch
    pd.testing.assert_frame_equal(
        metrics_without_time(run), metrics_without_time(reference.out_dir)
    )
    for name in ("test.csv", "confusion_matrix.csv"):
        assert (run / name).read_text() == (reference.out_dir / name).read_text(), name
    ours = load_file(str(run / "model" / "model.safetensors"))
    theirs = load_file(str(reference.out_dir / "model" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


# -- text fine-tuning and --freeze-text through the CLI -----------------------------------------

TINY = ["--num-classes", "3", *TINY_RUN, "--tla-min-patients", "1"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


@pytest.mark.parametrize("freeze", [False, True], ids=["last-layer", "freeze-text"])
def test_text_fine_tuning_moves_only_the_last_layers_and_freeze_text_none(
    tiny_manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bert: Path,
    freeze: bool,
) -> None:
    run = tmp_path / "run"
    with trace_epochs(monkeypatch) as traces:
        result = invoke(
            "train",
            tiny_manifest,
            "--out-dir",
            run,
            *TINY,
            "--epochs",
            2,
            "--text-encoder",
            "hf",
            "--text-model",
            bert,
            "--text-max-length",
            32,
            "--warmup-epochs",
            1,
            "--finetune-text-last-n",
            1,
            "--lr-text",
            1e-3,
            "--lr-image",
            4e-4,
            *(["--freeze-text"] if freeze else []),
        )
    assert result.exit_code == 0, result.output + repr(result.exception)
    bundle = load_bundle(run)
    text = names_of(bundle.model.encoders["text"].backbone, TEXT_BACKBONE)
    image = names_of(bundle.model.encoders["us"].backbone, IMAGE_BACKBONE)
    last_layer = {n for n in text if n.startswith(f"{TEXT_BACKBONE}encoder.layer.1.")}
    assert last_layer and last_layer != text
    assert len(traces) == 2
    for trace in traces:
        assert not trace.changed & image  # --finetune-image-scope none: frozen throughout
        # Groups: heads, image backbone, text backbone, each at its own learning rate.
        assert trace.lrs == [3e-4, 4e-4, 1e-3]
        assert trace.group_sizes[2] == len(text)
    assert not traces[0].changed & text, "the text model moved during warm-up"
    request = json.loads((run / "request.json").read_text(encoding="utf-8"))
    phases = pd.read_csv(run / "metrics.csv")["phase"].tolist()
    if freeze:
        assert not traces[1].changed & text
        assert request["train"]["finetune_text_last_n"] == 0
        assert phases == ["frozen", "frozen"]
    else:
        assert traces[1].changed & text == last_layer
        assert request["train"]["finetune_text_last_n"] == 1
        assert phases == ["warmup", "finetune"]
    # The bundle holds the text model as trained: the fine-tuned layer differs from the
    # downloaded one exactly when it was fine-tuned.
    from transformers import BertModel

    original = BertModel.from_pretrained(bert).state_dict()
    saved = bundle.model.encoders["text"].backbone.state_dict()
    moved = {k for k in original if not torch.equal(original[k], saved[k])}
    assert bool(moved) != freeze
    assert all(k.startswith("encoder.layer.1.") for k in moved)


# -- the saved model is the best validation epoch -------------------------------------------


def test_the_bundle_is_the_best_validation_epoch_and_reproduces_its_score(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    # A high learning rate over-fits 18 training patients within a few epochs, so the best
    # validation loss comes before the last epoch.
    request = tiny_request(tiny_manifest, tmp_path / "run", epochs=6)
    request = with_train(request, select_metric="loss", lr=3e-3)
    result = run_training(request)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    best = int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
    assert result.best_epoch == best
    assert best < len(metrics), "the test needs a best epoch before the last one"
    assert metrics.loc[metrics["best"] == 1, "epoch"].max() == best

    bundle = load_bundle(tmp_path / "run")
    assert bundle.meta["best_epoch"] == best
    cohort = read_manifest(tiny_manifest, bundle.model.config.modalities, num_classes=NUM_CLASSES)
    split = read_split_assignment(tmp_path / "run")
    val_ids = set(split.loc[split["split"] == "val", "id"])
    rows = np.array([i for i, pid in enumerate(cohort.ids) if pid in val_ids])
    data = bundle.preprocessor.prepare(cohort)
    out = infer(bundle.model, data, rows, device=torch.device("cpu"))
    assert cohort.labels is not None
    score = classification_metrics(cohort.labels[out.index], np.exp(out.log_probs), NUM_CLASSES)
    row = metrics.set_index("epoch").loc[best]
    assert score["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert score["acc"] == pytest.approx(row["val_acc"])
    assert score["macro_f1"] == pytest.approx(row["val_macro_f1"])
    last = metrics.iloc[-1]
    assert score["loss"] != pytest.approx(last["val_loss"], rel=1e-5)


# -- imputation targets get no gradient ---------------------------------------------------------

D = 8
DIMS = (4, 5, 6)


def small_model(imputation_loss: str) -> OmniFuse:
    torch.manual_seed(0)
    method = MethodConfig(
        **{
            **PAPER_OPTIONS,
            "embed_dim": D,
            "ra_layers": (16, 4),
            "num_ra": 2,
            "head_hidden": 8,
            "dropout": 0.0,
            "cra_dropout": 0.0,
            "imputation_loss": imputation_loss,
        }
    )
    specs = tuple(ModalitySpec(n, "vector") for n in ("a", "b", "c"))
    return build_model(ModelConfig(specs, 3, DIMS, method), ImageConfig(), {})


def tiny_batch(seed: int = 1, size: int = 12) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        n: {"x": torch.randn(size, d, generator=g), "mask": torch.ones(size, d, dtype=bool)}
        for n, d in zip("abc", DIMS, strict=True)
    }
    present = torch.ones(size, 3, dtype=torch.bool)
    present[::4, 2] = False
    return inputs, present, torch.randint(0, 3, (size,), generator=g)


@pytest.mark.parametrize("imputation_loss", ["normalized", "paper"])
def test_imputation_targets_get_no_gradient(imputation_loss: str) -> None:
    """The forward imputation loss trains the CRA to reach the real embedding of a dropped slot;
    it must not move that embedding (the encoder) towards the imputation."""
    model = small_model(imputation_loss)
    inputs, present, y = tiny_batch()
    v = model.embed(inputs, present).detach().requires_grad_(True)  # (B, M, d) leaf
    model.embed = lambda *_: v  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(3)
    terms = model.losses(inputs, present, y, lazy=None, generator=generator)
    mask = drop_modalities(
        present, model.config.method.modality_drop, torch.Generator().manual_seed(3)
    )
    dropped = present & ~mask
    assert dropped.any() and mask.any()

    (grad_v,) = torch.autograd.grad(terms["forward"], v, retain_graph=True)
    # A dropped slot enters the CRA as the missing embedding: its only path to the loss would be
    # as the target, which is detached.
    assert torch.count_nonzero(grad_v[dropped]) == 0
    assert torch.count_nonzero(grad_v[mask]) > 0  # fed slots: through the CRA's input
    cra = [p for p in model.cra_forward.parameters() if p.requires_grad]  # type: ignore[union-attr]
    grads = torch.autograd.grad(terms["forward"], cra, allow_unused=True)
    assert all(g is not None for g in grads) and any(torch.count_nonzero(g) for g in grads)


@pytest.mark.parametrize("imputation_loss", ["normalized", "paper"])
def test_cycle_target_gets_no_gradient(imputation_loss: str) -> None:
    """L_backward compares the backward CRA's output with the forward CRA's input: only the
    backward CRA (and what produced the imputation) learn from it, never the input itself."""
    model = small_model(imputation_loss)
    inputs, present, _ = tiny_batch()
    v = model.embed(inputs, present).detach()
    mask = drop_modalities(present, 0.3, torch.Generator().manual_seed(3))
    out = model.fuse(v, mask)
    v_in = out.v_in.detach().requires_grad_(True)  # the cycle's target, as its own leaf
    target_only = FuseOutput(
        v_in, out.v_fwd, out.h, out.gate, out.modality_log_probs, out.joint_log_probs
    )
    forward, backward = model._imputation_losses(v, present, mask, target_only)
    assert float(backward.detach()) > 0
    (grad_target,) = torch.autograd.grad(backward, v_in, allow_unused=True)
    assert grad_target is None
    assert model.cra_backward is not None
    grads = torch.autograd.grad(backward, list(model.cra_backward.parameters()))
    assert any(torch.count_nonzero(g) for g in grads)
