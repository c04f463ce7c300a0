"""torchrun / DistributedDataParallel on CPU with gloo: two processes train like one.

The cohort is tiny and every dropout is off (_request), so one process and two
must give the same per-epoch losses: both draw the same global batches and DDP's averaged
gradient equals one process's (engine/training.py, _train_epoch_ddp). Batch size 21 on 64
training patients gives uneven slices (11/10) and a last batch of one patient, which leaves
rank 1 with none (it trains on a repeated patient with weight 0).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.multiprocessing as mp

from omnifuse_cli.config import DataConfig, MethodConfig, ModalitySpec, TrainConfig
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.engine.training import TrainRequest, run_training
from omnifuse_cli.errors import TrainingInterrupted
from omnifuse_cli.synthetic import CohortSpec, make_cohort

EPOCHS, BATCH = 3, 21
LOSS_COLUMNS = [
    "train_loss",
    "loss_forward",
    "loss_backward",
    "loss_dwfuse",
    "loss_tla",
    "val_loss",
    "val_macro_f1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "OMNIFUSE_DEBUG": "0"}


def _torchrun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def _request(manifest: Path, out_dir: Path) -> TrainRequest:
    """Every dropout off (the heads' has no CLI option), tiny model, CPU."""
    return TrainRequest(
        manifest=manifest,
        num_classes=3,
        out_dir=out_dir,
        overwrite=True,
        data=DataConfig(modalities=(ModalitySpec("labs", "vector"), ModalitySpec("text", "text"))),
        method=MethodConfig(
            embed_dim=16,
            dropout=0.0,
            cra_dropout=0.0,
            modality_drop=0.0,
            ra_layers=(16, 8),
            num_ra=2,
            tla_min_patients=3,
        ),
        train=TrainConfig(epochs=EPOCHS, batch_size=BATCH, seed=5, device="cpu", cache=False),
    )


def _rank(
    rank: int,
    world: int,
    port: int,
    manifest: Path,
    out_dir: Path,
    resume: bool,
    stop: tuple[int, int] | None,
) -> None:
    """One process as torchrun starts it: the same environment variables, then the engine.
    ``stop`` = (epoch, batch) raises KeyboardInterrupt there on every rank (Ctrl-C)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    done = [0]

    def on_event(event: ProgressEvent) -> None:
        if event.kind == "epoch":
            done[0] = event.done
        elif event.kind == "batch" and stop == (done[0] + 1, event.done):
            raise KeyboardInterrupt

    if rank > 0 and not resume:
        # Other ranks are pointed elsewhere: that folder must never appear (only rank 0 writes).
        out_dir = out_dir.with_name(f"{out_dir.name}-rank{rank}")
    try:
        run_training(_request(manifest, out_dir), on_event, resume=resume)
    except TrainingInterrupted:
        Path(out_dir.parent, f"interrupted-{rank}").touch()


def _train(
    manifest: Path,
    out_dir: Path,
    *,
    processes: int,
    resume: bool = False,
    stop: tuple[int, int] | None = None,
) -> None:
    """Two processes forked from this one (no interpreter start-up: the test stays quick)."""
    if processes == 1:
        run_training(_request(manifest, out_dir), resume=resume)
        return
    mp.start_processes(
        _rank,
        args=(processes, _free_port(), manifest, out_dir, resume, stop),
        nprocs=processes,
        join=True,
        start_method="fork",
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    make_cohort(CohortSpec(n=80, labs_dim=5, ultrasound=False, inline_notes=True, seed=3), root)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def runs(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("ddp_runs")
    out = {}
    for processes in (1, 2):
        out[processes] = root / f"p{processes}"
        _train(manifest, out[processes], processes=processes)
    assert not (root / "p2-rank1").exists()
    return out


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")


def test_two_processes_train_like_one(runs: dict[int, Path]) -> None:
    one, two = _metrics(runs[1]), _metrics(runs[2])
    assert len(one) == len(two) == EPOCHS
    np.testing.assert_allclose(
        two[LOSS_COLUMNS].to_numpy(), one[LOSS_COLUMNS].to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert two["lazy_combo"].fillna("").tolist() == one["lazy_combo"].fillna("").tolist()
    assert (one["loss_tla"].iloc[1:] > 0).all()  # TLA is active, and matched too
    assert two["best"].tolist() == one["best"].tolist()
    meta = dict(pd.read_csv(runs[2] / "meta.csv").itertuples(index=False))
    assert meta["processes"] == "2"


def test_two_processes_train_like_one_with_unlabeled_patients(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Unlabeled patients join the batches (training.MixedBatches) and the label terms are
    weighted by each rank's share of the labelled patients: two processes still match one."""
    root = tmp_path_factory.mktemp("ddp_unlabeled")
    make_cohort(
        CohortSpec(n=80, unlabeled=50, labs_dim=5, ultrasound=False, inline_notes=True, seed=3),
        root / "data",
    )
    manifest = root / "data" / "manifest.csv"
    for processes in (1, 2):
        _train(manifest, root / f"p{processes}", processes=processes)
    one, two = _metrics(root / "p1"), _metrics(root / "p2")
    assert pd.read_csv(root / "p1" / "split.csv").set_index("split")["n"]["unlabeled"] == 50
    np.testing.assert_allclose(
        two[LOSS_COLUMNS].to_numpy(), one[LOSS_COLUMNS].to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert two["best"].tolist() == one["best"].tolist()


def test_only_rank_zero_writes_and_the_bundles_predict_alike(
    runs: dict[int, Path], manifest: Path
) -> None:
    from omnifuse_cli.engine.prediction import PredictRequest, predict_patients

    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    assert files(runs[2]) == files(runs[1])
    assert not [f for f in files(runs[2]) if f.endswith(".tmp")]
    one = predict_patients(PredictRequest(runs[1], manifest, device="cpu")).frame
    two = predict_patients(PredictRequest(runs[2], manifest, device="cpu")).frame
    probs = [c for c in one.columns if c.startswith("prob")]
    assert probs and len(one) == 80
    np.testing.assert_allclose(two[probs].to_numpy(float), one[probs].to_numpy(float), atol=1e-5)
    pd.testing.assert_frame_equal(
        pd.read_csv(runs[2] / "test.csv"), pd.read_csv(runs[1] / "test.csv"), rtol=1e-5
    )


def test_resume_after_ctrl_c_under_ddp_matches_the_uninterrupted_run(
    runs: dict[int, Path], manifest: Path, tmp_path: Path
) -> None:
    run = tmp_path / "stopped"
    _train(manifest, run, processes=2, stop=(2, 2))
    assert (tmp_path / "interrupted-0").is_file() and (tmp_path / "interrupted-1").is_file()
    assert not (tmp_path / "stopped-rank1").exists()
    assert len(_metrics(run)) == 1  # epoch 1 saved; epoch 2 was cut short
    assert not (run / "test.csv").exists()  # nothing looks like a finished run
    _train(manifest, run, processes=2, resume=True)
    np.testing.assert_allclose(
        _metrics(run)[LOSS_COLUMNS].to_numpy(),
        _metrics(runs[2])[LOSS_COLUMNS].to_numpy(),
        rtol=1e-7,
    )
    pd.testing.assert_frame_equal(pd.read_csv(run / "test.csv"), pd.read_csv(runs[2] / "test.csv"))


def test_torchrun_cli_rejects_a_global_batch_smaller_than_the_world_once(
    manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = _torchrun(
        "-m",
        "omnifuse_cli",
        "train",
        manifest,
        "--num-classes",
        "3",
        "--modality",
        "labs=vector",
        "--modality",
        "text=text",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--no-cache",
        "--out-dir",
        out,
    )
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert text.count("--batch-size 1 is the global batch, shared by 2 processes") == 1, text
    assert not out.exists()  # no partial run left behind


def _collectives(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the helpers' check (a forked process)."""
    import torch.distributed as dist

    from omnifuse_cli.engine import distributed
    from omnifuse_cli.errors import DataError, OmnifuseError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen: dict[str, object] = {}

    def error_of(fn) -> str:  # type: ignore[no-untyped-def]
        try:
            fn()
        except OmnifuseError as err:
            assert getattr(err, "all_ranks", False)
            return f"{type(err).__name__}: {err}"
        return ""

    def rank1_fails() -> None:
        with distributed.together("reading the data"):
            if rank == 1:
                raise DataError("manifest.csv is not readable here")

    seen["together"] = error_of(rank1_fails)
    seen["data"] = error_of(
        lambda: distributed.check_same_data(
            {"the manifest": "aaa", "the settings": "s" if rank == 0 else "t"}
        )
    )

    def world_fits() -> None:
        with distributed.together():
            distributed.check_world_fits(1, 32)  # the same error on both ranks: said once

    seen["world"] = error_of(world_fits)
    idx = np.arange(7)
    part = distributed.shard(idx)
    seen["gather"] = distributed.gather_rows(part * 10, len(idx)).tolist()  # type: ignore[union-attr]
    seen["sum"] = distributed.all_reduce_sum(np.array([rank + 1.0])).tolist()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


def test_collective_helpers_agree_and_name_the_culprit(tmp_path: Path) -> None:
    mp.start_processes(
        _collectives,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    # Rank 0 did nothing wrong but stops too, told which rank failed; rank 1 keeps its error.
    assert ranks[0]["together"] == (
        "DataError: rank 1 of 2: manifest.csv is not readable here (while reading the data)"
    )
    assert ranks[1]["together"] == "DataError: manifest.csv is not readable here"
    for seen in ranks:
        assert seen["data"] == (
            "DataError: the processes disagree on the settings: rank 1 has sha256 t, rank 0 has s"
        )
        assert seen["world"] == (
            "DataError: torchrun started 2 processes but the training split has only 1 patient(s)"
        )
        assert seen["gather"] == [0, 10, 20, 30, 40, 50, 60]
        assert seen["sum"] == [3.0]


def test_data_digests_see_the_data_and_settings_not_the_paths(
    manifest: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from omnifuse_cli.config import DataConfig, ModalitySpec, TrainConfig
    from omnifuse_cli.engine.training import TrainRequest, data_digests

    data = DataConfig(modalities=(ModalitySpec("labs", "vector"), ModalitySpec("text", "text")))
    base = TrainRequest(manifest, 3, tmp_path / "a", data=data)
    copy = tmp_path / "copy.csv"
    copy.write_bytes(manifest.read_bytes())
    assert data_digests(replace(base, manifest=copy, out_dir=tmp_path / "b")) == data_digests(base)
    copy.write_bytes(manifest.read_bytes() + b"\n")
    changed = data_digests(replace(base, manifest=copy))
    assert changed["the manifest"] != data_digests(base)["the manifest"]
    other = data_digests(replace(base, train=TrainConfig(seed=1)))
    assert other["the settings"] != data_digests(base)["the settings"]
