"""How many CPU threads torch may use: the cores this process can really run on.

torch's own default counts the machine's cores, not the ones a container, a cluster job or a
`taskset` leaves to the process; on a shared 2-core machine that made epochs several times
slower (threads waiting for cores they never get).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """Cores available to this process: OMP_NUM_THREADS when set (torchrun sets it), else the
    CPU affinity mask capped by the cgroup's CPU quota (containers, Slurm, Kubernetes)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup's CPU limit in whole cores (rounded up), or None when there is none."""
    try:
        text = (root / "cpu.max").read_text().split()  # cgroup v2: "quota period" or "max ..."
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def set_threads(threads: int | None) -> int:
    """Give torch ``threads`` CPU threads (None: usable_cpus()); returns the number set."""
    import torch  # heavy, and usable_cpus() and cgroup_cpu_quota() need none of it

    count = threads or usable_cpus()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
