"""What the machine grants a process, and what a process holds: the cores it may use (its CPU set
capped by a cgroup CPU quota), the cgroup's memory limit, a process's resident memory, and the peak
resident memory of a piece of work. Linux first; elsewhere the answers fall back (all cores, no
limit, 0 bytes)."""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU set, further capped by a cgroup CPU quota. A Kubernetes
    CPU limit is a quota, not a CPU set, so a pod limited to 2 CPUs on a 64-core node sees all 64
    cores in its affinity; starting 64 workers there would thrash."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def worker_count(configured: int) -> int:
    """Worker processes a server starts: ``configured``, or one per available core when it is 0.
    The server's configuration and the load tests that size their runs both ask this."""
    return configured or available_cores()


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota in whole cores (rounded up), from cgroup v2 ``cpu.max`` or cgroup v1
    ``cpu.cfs_quota_us``; None when there is none or it cannot be read."""
    root = Path(cgroup_root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def cgroup_memory_limit(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``; None when unlimited or unreadable."""
    root = Path(cgroup_root)
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:  # v1 says "unlimited" with a huge number
            return None
        return int(text)
    return None


def resident_bytes(pid: int | None = None) -> int:
    """RSS of one process (from /proc; 0 where there is none)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def peak_above_rest(run) -> int:
    """Peak resident bytes above the resting ones while ``run()`` runs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    except OSError:
        rest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rest
    rest = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - rest
