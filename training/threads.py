"""Training threads that stay fast when another process is busy on the machine.

torch splits every operator over its intra-op threads and each operator waits for the slowest one.
With one thread per core and another process busy on one core, the thread sharing that core runs
only when the scheduler gives it a slice, so every operator waits for that slice: training ran
10-20x slower beside a package install here. ``ThreadGovernor`` measures how much CPU the rest of
the machine uses (``/proc/stat`` busy time minus this process's own) and keeps torch's thread count
at the cores left free, re-checking every few seconds, so training uses both cores when the
machine is quiet and steps aside when it is not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def machine_busy_seconds(proc_stat: Path = PROC_STAT) -> float | None:
    """CPU seconds all cores have spent busy since boot (user+nice+system+irq+softirq+steal), or
    None where /proc/stat cannot be read (not Linux)."""
    try:
        first = proc_stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


def threads_for(cores: int, others_busy_cores: float, max_threads: int) -> int:
    """Threads to run when other processes keep ``others_busy_cores`` cores busy: the cores left
    free, rounded so that a process using most of a core counts as taking it."""
    free = cores - others_busy_cores
    return max(1, min(max_threads, int(free + 0.35)))


class ThreadGovernor:
    """Call ``poll()`` once per training step; it changes ``torch.set_num_threads`` when the
    machine's load changes. ``max_threads`` 0 means one per available core."""

    def __init__(self, max_threads: int = 0, interval_s: float = 5.0, clock=time.monotonic,
                 machine_busy=machine_busy_seconds, own_busy=own_busy_seconds, set_threads=None):
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.max_threads = max_threads or self.cores
        self.interval_s = interval_s
        self._clock, self._machine_busy, self._own_busy = clock, machine_busy, own_busy
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self._set_threads = set_threads
        self.threads = self.max_threads
        self._set_threads(self.threads)
        self.changes: list[tuple[float, int]] = []  # (seconds since start, threads) whenever it changed
        self._started = clock()
        self._mark = (clock(), machine_busy(), own_busy())

    def poll(self) -> int:
        now = self._clock()
        last_time, last_machine, last_own = self._mark
        if now - last_time < self.interval_s:
            return self.threads
        machine, own = self._machine_busy(), self._own_busy()
        self._mark = (now, machine, own)
        if machine is None or last_machine is None:
            return self.threads
        others = max(0.0, (machine - last_machine) - (own - last_own)) / (now - last_time)
        wanted = threads_for(self.cores, others, self.max_threads)
        if wanted != self.threads:
            self.threads = wanted
            self._set_threads(wanted)
            self.changes.append((round(now - self._started, 1), wanted))
        return self.threads
