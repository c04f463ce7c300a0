"""World size, rank and collective helpers; a no-op in one process.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `omnifuse train` started by it joins the process
group (gloo on CPU, nccl on CUDA) through ``session``. Code elsewhere asks `world_size()`,
`rank()`, `is_main()` and calls the collectives below without caring whether a process group
exists: with one process each returns its input unchanged.

Errors: a rank that fails alone would leave the others waiting in their next collective until
torchrun kills them, with the message lost among tracebacks. Setup work therefore runs inside
``together()``, which makes every rank raise the same error, naming the rank it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from omnifuse_cli import errors
from omnifuse_cli.errors import ConfigError, DataError, OmnifuseError

T = TypeVar("T")
_state: dict[str, Any] = {"device": torch.device("cpu")}


def active() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def launched_world() -> int:
    """WORLD_SIZE as torchrun set it (1 when not started by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@contextmanager
def session(device: torch.device, timeout_minutes: float = 30.0) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration of a run; yields this rank's device.

    gloo when the resolved device is the CPU, nccl on CUDA (each rank on the GPU LOCAL_RANK
    names). Without torchrun (WORLD_SIZE unset or 1), or when a group already exists, nothing
    is set up or torn down.
    """
    if launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield _own_device(device)
        return
    if not dist.is_available():
        raise ConfigError(
            "torchrun started several processes but this torch build has no torch.distributed",
            hint="run in one process (plain omnifuse)",
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            raise ConfigError(
                f"torchrun process LOCAL_RANK={local} has no GPU of its own: this machine has "
                f"{count}",
                hint=f"use --nproc-per-node {count} (one process per GPU), or --device cpu",
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", timeout=timedelta(minutes=timeout_minutes), device_id=device
        )
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    _state["device"] = device if device.type == "cuda" else torch.device("cpu")
    try:
        yield device
    finally:
        teardown()


def _own_device(device: torch.device) -> torch.device:
    """Inside an existing group on CUDA, a process uses the GPU it was given."""
    if active() and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _state["device"] = torch.device("cpu")


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank: decisions (best epoch, lazy combination) stay in step
    even if floating-point results ever differed between ranks."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (float64; on the GPU for nccl)."""
    if not active():
        return values
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_state["device"])
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def gather_rows(part: np.ndarray | None, total: int) -> np.ndarray | None:
    """Reassemble an array sharded as ``rows[rank::world]`` (see ``shard``) in the original
    row order; a rank whose shard was empty sends None. Nothing is padded, so no row is
    counted twice."""
    if not active():
        return part
    parts = all_gather_object(part)
    shapes = [p for p in parts if p is not None]
    if not shapes:
        return None
    out = np.empty((total, *shapes[0].shape[1:]), dtype=shapes[0].dtype)
    for r, p in enumerate(parts):
        if p is not None:
            out[r :: len(parts)] = p
    return out


def shard(indices: np.ndarray) -> np.ndarray:
    """This rank's interleaved share of ``indices`` (all of them in one process)."""
    return np.asarray(indices)[rank() :: world_size()]


class _Failure(OmnifuseError):
    pass


@contextmanager
def together(what: str = "") -> Iterator[None]:
    """Run a block on every rank and fail on every rank if it failed on any.

    The error raised is the failing rank's own (on that rank) or an error of the same class
    naming that rank (on the others); such errors carry ``all_ranks = True`` so the CLI prints
    them once, from rank 0. KeyboardInterrupt is not caught: torchrun stops every rank.
    """
    if not active():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # gathered and re-raised below on every rank
        error = err
    reports = all_gather_object(None if error is None else _describe(error))
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    first, (kind, message, hint) = failed[0]
    if error is not None and failed[0][0] == rank():
        error.all_ranks = True  # type: ignore[attr-defined]
        raise error
    same = all(rep == reports[first] for _, rep in failed) and len(failed) == world_size()
    text = message if same else f"rank {first} of {world_size()}: {message}"
    if what and not same:
        text = f"{text} (while {what})"
    cls = _ERRORS.get(kind, _Failure)
    raised = cls(text, hint=hint)
    raised.all_ranks = True  # type: ignore[attr-defined]
    raise raised from error


def _describe(error: Exception) -> tuple[str, str, str | None]:
    if isinstance(error, OmnifuseError):
        return type(error).__name__, error.message, error.hint
    return type(error).__name__, f"{type(error).__name__}: {error}", None


def _known_errors() -> dict[str, type[OmnifuseError]]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, OmnifuseError)
    }


_ERRORS = _known_errors()


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a 1M-row manifest takes a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digests(
    manifest: Path | str, labs_table: Path | str | None, settings: dict[str, Any]
) -> dict[str, str]:
    """What every process must agree on: the manifest's and labs table's bytes and the
    settings, given without paths (nodes may mount the same files under different names).
    Files the manifest points to (images, notes) are not read: hashing every image would cost
    as much as encoding it."""
    parts = {"the manifest": file_digest(manifest)}
    if labs_table:
        parts["the labs table"] = file_digest(labs_table)
    text = json.dumps(settings, sort_keys=True, default=str)
    parts["the settings"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return parts


def check_same_data(parts: dict[str, str]) -> None:
    """Every rank must train on the same data and settings.

    ``parts`` maps a name the user recognises ("the manifest", "the settings") to a digest of
    it; the first part on which a rank differs from rank 0 is named in the error, raised on
    every rank before any training step (a rank on other data would silently train another
    model, and DDP would average their gradients)."""
    if not active():
        return
    reports = all_gather_object(parts)
    reference = reports[0]
    for r, report in enumerate(reports[1:], start=1):
        for name in sorted(set(reference) | set(report)):
            mine, theirs = reference.get(name, "(none)"), report.get(name, "(none)")
            if mine != theirs:
                error = DataError(
                    f"the processes disagree on {name}: rank {r} has sha256 {theirs[:12]}, "
                    f"rank 0 has {mine[:12]}",
                    hint="every node must see the same manifest, labs table and options "
                    "(copy the files, or put them on a shared filesystem)",
                )
                error.all_ranks = True  # type: ignore[attr-defined]
                raise error


def check_world_fits(n_train: int, batch_size: int) -> None:
    """The global batch is split across processes: each needs patients to work on."""
    world = world_size()
    if world <= 1:
        return
    if world > n_train:
        raise DataError(
            f"torchrun started {world} processes but the training split has only {n_train} "
            "patient(s)",
            hint="use fewer processes (--nproc-per-node / --nnodes) or more data",
        )
    if batch_size < world:
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch, shared by {world} processes: each "
            "needs at least one patient per step",
            hint=f"use --batch-size {world} or more, or fewer processes",
        )
