"""torchrun / DistributedDataParallel on CPU with gloo: two processes train like one.

The cohort is tiny and every dropout is off (_request), so one process and two
must give the same per-epoch losses: both draw the same global batches and DDP's averaged
gradient equals one process's (engine/training.py, _train_epoch_ddp). Batch size 21 on 64
training patients gives uneven slices (11/10) and a last batch of one patient, which leaves
rank 1 with none (it trains on a repeated patient with weight 0). Equal losses cannot show a
gradient off by a constant factor (AdamW ignores it), so the gradients themselves are compared
too, step by step, under a real torchrun; and a real SIGINT to torchrun leaves a resumable run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import omnifuse_cli
from omnifuse_cli.config import DataConfig, MethodConfig, ModalitySpec, TrainConfig
from omnifuse_cli.engine import fitting
from omnifuse_cli.engine.events import ProgressEvent
from omnifuse_cli.engine.runs import TrainRequest
from omnifuse_cli.engine.training import run_training
from omnifuse_cli.errors import TrainingInterrupted
from omnifuse_cli.model.omnifuse import OmniFuse
from omnifuse_cli.synthetic import CohortSpec, make_cohort

EPOCHS, BATCH = 3, 21
ROOT = Path(__file__).resolve().parents[1]  # torchrun starts this module from here (grad test)
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


def _torchrun_cmd(*args: str | Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        *map(str, args),
    ]


def _torchrun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _torchrun_cmd(*args), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300
    )


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
def mixed_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 80 labelled patients and 50 unlabeled ones (training.MixedBatches)."""
    root = tmp_path_factory.mktemp("ddp_unlabeled_data")
    make_cohort(
        CohortSpec(n=80, unlabeled=50, labs_dim=5, ultrasound=False, inline_notes=True, seed=3),
        root,
    )
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
    meta: dict[str, str] = dict(pd.read_csv(runs[2] / "meta.csv").itertuples(index=False))
    assert meta["processes"] == "2"


def test_two_processes_train_like_one_with_unlabeled_patients(
    mixed_manifest: Path, tmp_path: Path
) -> None:
    """Unlabeled patients join the batches (training.MixedBatches) and the label terms are
    weighted by each rank's share of the labelled patients: two processes still match one."""
    root = tmp_path
    for processes in (1, 2):
        _train(mixed_manifest, root / f"p{processes}", processes=processes)
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


# == One step's gradients with the imputation losses on: two processes against one ============
# Equal per-epoch losses (above) cannot show a gradient that is off by a constant factor: AdamW
# divides each gradient by its own running scale, so a run that lost the world-size factor
# trains exactly as well. These tests therefore swap the optimizer for plain SGD that records
# the gradient DDP hands it at every step, and compare those with one process's.

GRAD_EPOCHS = 2  # TLA trains from epoch 2, on the combination mined after epoch 1
GRAD_TOLERANCE = 1e-6  # of the step's largest gradient; seen: below 2e-7 (float32 sums)


def _recording_sgd(
    steps: list[dict[str, torch.Tensor]],
) -> Callable[[OmniFuse, TrainConfig], torch.optim.Optimizer]:
    """A stand-in for fitting._optimizer: SGD that appends every step's gradients to ``steps``,
    by parameter name, before it applies them."""

    def make(model: OmniFuse, cfg: TrainConfig) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([p for _, p in named], lr=cfg.lr)

        def record(*_: object) -> None:
            # Outside a step's graph a parameter has no gradient in one process and a zero one
            # under DDP (wrap_ddp): the same step either way.
            steps.append(
                {
                    n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                    for n, p in named
                }
            )

        optimizer.register_step_pre_hook(record)
        return optimizer

    return make


def _grad_request(manifest: Path, out_dir: Path, imputation_loss: str) -> TrainRequest:
    """_request's run for GRAD_EPOCHS epochs. The paper's L_forward averages over the batch's
    present slots (the normalized one, without modality dropout, has no dropped slot to average
    over and is 0). The linear path, fitted after training, is off: no gradient of its own."""
    base = _request(manifest, out_dir)
    return replace(
        base,
        method=replace(base.method, imputation_loss=imputation_loss, linear_path=False),
        train=replace(base.train, epochs=GRAD_EPOCHS),
    )


def _grad_worker(manifest: str, out_dir: str, imputation_loss: str) -> None:
    """One torchrun process of the gradient test (``python -m tests.test_distributed``): the
    whole run with the recording SGD; its gradients go to grads-RANK.pt beside the run."""
    steps: list[dict[str, torch.Tensor]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fitting, "_optimizer", _recording_sgd(steps))
        run_training(_grad_request(Path(manifest), Path(out_dir), imputation_loss))
    torch.save(steps, Path(out_dir).parent / f"grads-{os.environ['RANK']}.pt")


@pytest.mark.parametrize(
    ("imputation_loss", "cohort"),
    [
        # Unlabeled patients in every batch: the label terms' shares differ from the rows'.
        ("normalized", "mixed_manifest"),
        # The last batch of one patient leaves rank 1 with none (weight 0).
        ("paper", "manifest"),
    ],
)
def test_torchrun_gradients_with_imputation_equal_one_process(
    imputation_loss: str,
    cohort: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every step's gradient of every trainable parameter under torchrun (gloo, 2 processes)
    equals one process's on the same global batch, with L_backward (and, in the paper's
    variant, L_forward), DWFuse and TLA in the loss."""
    manifest: Path = request.getfixturevalue(cohort)
    one: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(fitting, "_optimizer", _recording_sgd(one))
    run_training(_grad_request(manifest, tmp_path / "p1", imputation_loss))
    done = _torchrun("-m", "tests.test_distributed", manifest, tmp_path / "p2", imputation_loss)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [torch.load(tmp_path / f"grads-{r}.pt", weights_only=True) for r in (0, 1)]

    metrics = _metrics(tmp_path / "p1")
    assert (metrics["loss_backward"] > 0).all()
    forward = metrics["loss_forward"]
    assert (forward > 0).all() if imputation_loss == "paper" else (forward == 0).all()
    assert metrics["loss_tla"].iloc[-1] > 0
    # Validation is too small to estimate any reliability on, so a share of the training
    # patients is held out of the imputation targets (reliability.py): that path is in play too.
    meta: dict[str, str] = dict(pd.read_csv(tmp_path / "p1" / "meta.csv").itertuples(index=False))
    assert "validation" not in meta["reliability_source"]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == GRAD_EPOCHS * 4  # 64 patients, 21 each
    for step, (mine, rank0, rank1) in enumerate(zip(one, *ranks, strict=True)):
        assert rank0.keys() == rank1.keys() == mine.keys()
        scale = max(float(g.abs().max()) for g in mine.values())
        for name, grad in mine.items():
            # DDP's all-reduce leaves every rank the same averaged gradient, bit for bit.
            assert torch.equal(rank0[name], rank1[name]), (step, name)
            error = float((rank0[name] - grad).abs().max())
            assert error <= GRAD_TOLERANCE * scale, (
                f"step {step + 1}, {name}: two processes' gradient is off by {error:.3g} "
                f"(largest gradient {scale:.3g}; ratio to one process's "
                f"{float(rank0[name].norm() / grad.norm()):.4f})"
            )
    np.testing.assert_allclose(
        _metrics(tmp_path / "p2")[LOSS_COLUMNS].to_numpy(),
        metrics[LOSS_COLUMNS].to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


# == A real Ctrl-C under torchrun ==============================================================

SIGINT_EPOCHS = 12  # ~0.5 s each: the signal, sent once epoch 1 is saved, lands well before


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX-only")
def test_sigint_to_torchrun_leaves_a_run_that_resume_finishes(
    manifest: Path, tmp_path: Path
) -> None:
    """SIGINT to torchrun itself (what it passes on to every process, README "Ctrl-C"): the
    command stops, omnifuse says once that it was interrupted and how to resume, the run folder
    holds the last complete epoch, and `train --resume` under torchrun finishes the run."""
    run = tmp_path / "run"
    cmd = _torchrun_cmd(
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
        "--embed-dim",
        "16",
        "--epochs",
        str(SIGINT_EPOCHS),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        "--no-cache",
        "--out-dir",
        run,
    )
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=_env(),
            cwd=tmp_path,
            # A background job inherits SIGINT ignored, and Python then never raises
            # KeyboardInterrupt: give torchrun (and so its workers) the default, as a terminal.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                if (run / "checkpoint.pt").is_file():
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "training ended before it could be interrupted:\n" + (
                stderr.read_text() + stdout.read_text()
            )
            os.kill(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err_text = stderr.read_text()
    # torchrun ends with its own SignalException traceback and exit code 1 (README); omnifuse's
    # part is one "interrupted" line from rank 0 and no traceback of its own.
    assert code != 0, err_text
    lines = err_text.splitlines()
    assert sum(line.startswith("interrupted: ") for line in lines) == 1, err_text
    assert f"--resume {run}" in err_text
    own = f'File "{Path(omnifuse_cli.__file__).parent}'
    assert not [line for line in lines if line.lstrip().startswith(own)], err_text

    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    saved = int(checkpoint["epoch"])
    assert 1 <= saved < SIGINT_EPOCHS
    for name in ("request.json", "metrics.csv", "model/bundle.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "meta.csv").exists() and not (run / "test.csv").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    before = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    # Epoch saved + 1 may be in metrics.csv when Ctrl-C hit while its checkpoint was written.
    assert len(before) in (saved, saved + 1)

    resumed = _torchrun("-m", "omnifuse_cli", "train", "--resume", run)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    assert after["epoch"].tolist() == [str(e) for e in range(1, SIGINT_EPOCHS + 1)]
    pd.testing.assert_frame_equal(after.iloc[:saved], before.iloc[:saved])  # continued, not redone
    for name in ("meta.csv", "test.csv", "model/bundle.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    meta: dict[str, str] = dict(pd.read_csv(run / "meta.csv").itertuples(index=False))
    assert meta["processes"] == "2" and meta["epochs"] == str(SIGINT_EPOCHS)


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
    from omnifuse_cli.engine.runs import TrainRequest
    from omnifuse_cli.engine.training import data_digests

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


if __name__ == "__main__":
    _grad_worker(*sys.argv[1:])
