"""Training that diverges (NaN or infinite loss) ends cleanly: from the first epoch a known error
with a hint; later, early stopping at the best epoch so far, with a warning (a tune trial with a
too-high learning rate once crashed a whole search with sklearn's 'Input contains NaN')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omnifuse_cli.engine import fitting
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.engine.training import run_training
from omnifuse_cli.errors import TrainingDiverged

from .conftest import tiny_request


def _nan_from(epoch_nan: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fitting.train_epoch

    def train_epoch(*args: Any, **kwargs: Any) -> dict[str, float]:
        losses = real(*args, **kwargs)
        if kwargs["epoch"] >= epoch_nan:
            losses["total"] = float("nan")
        return losses

    monkeypatch.setattr(fitting, "train_epoch", train_epoch)


def test_divergence_in_the_first_epoch_is_a_known_error(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_from(1, monkeypatch)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1") as err:
        run_training(tiny_request(tiny_manifest, tmp_path / "r", epochs=3))
    assert err.value.hint and "lower --lr" in err.value.hint


def test_later_divergence_keeps_the_best_epoch_so_far(
    tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_from(3, monkeypatch)
    events: list[ProgressEvent] = []
    result = run_training(tiny_request(tiny_manifest, tmp_path / "r", epochs=5), events.append)
    assert [r.epoch for r in result.records] == [1, 2]
    assert result.best_epoch in (1, 2)
    warnings = [e.text for e in events if e.kind == "warning"]
    assert any("diverged in epoch 3" in w and "best epoch so far" in w for w in warnings)
    assert result.test  # the kept model was tested: finite metrics
    assert all(v == v for v in result.test.values())


def test_real_divergence_from_a_huge_learning_rate(tiny_manifest: Path, tmp_path: Path) -> None:
    """No monkeypatching: lr 1e8 blows the weights up in the first epoch."""
    from dataclasses import replace

    request = tiny_request(tiny_manifest, tmp_path / "r", epochs=2)
    request = replace(request, train=replace(request.train, lr=1e8))
    with pytest.raises(TrainingDiverged):
        run_training(request)
