"""World size, rank and collective helpers; a no-op in one process.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `omnifuse train` started by it joins the process
group (gloo on CPU, nccl on CUDA). Code elsewhere asks `world_size()`, `rank()`, `is_main()` and
calls `barrier()` without caring whether a process group exists.
"""

from __future__ import annotations

import torch.distributed as dist


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
