"""Timing helpers shared by the benchmarks: medians over >= 0.1 s intervals, re-measured while
other processes use the CPU (the machines are shared; see docs/benchmarks.md), with glibc's
allocator set so that no path page-faults on every call (`keep_freed_memory`)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import statistics
import sys
import time
from typing import Callable

HZ = os.sysconf("SC_CLK_TCK")
FOREIGN_LIMIT = 0.15     # cores used by other processes during a measurement, at most


def busy_seconds() -> float:
    """CPU seconds all processes on this machine have spent busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)       # idle + iowait
    return (sum(fields[:8]) - idle) / HZ


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class _Foreign:
    """Cores other processes use from now until `cores()` is called."""

    def __init__(self):
        self.busy, self.own, self.wall = busy_seconds(), own_seconds(), time.perf_counter()

    def cores(self) -> float:
        wall = time.perf_counter() - self.wall
        return max(0.0, ((busy_seconds() - self.busy) - (own_seconds() - self.own)) / wall)


def keep_freed_memory() -> bool:
    """Set glibc's malloc so that freed blocks stay in the process; says on stderr if it cannot.

    By default glibc adjusts its mmap and trim thresholds as blocks come and go, so whether a
    4 MB temporary is served from the heap or mmap-ed afresh (about 1,000 page faults, 2-3x the
    time of a 576 x 1536 layer) depends on what the process allocated before: measured, the same
    `quantize_dynamic` layer took 0.58 ms in most fresh processes and 1.5-2.1 ms in 6 of 27.
    Fixed thresholds make every path's timing independent of what ran before it.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        reason = f"no glibc mallopt in {name!r}"
    else:
        m_trim_threshold, m_mmap_threshold = -1, -3          # glibc's malloc.h
        # 32 MB is the largest mmap threshold glibc accepts; blocks below it come from the heap,
        # which is never trimmed (1 GB) while the benchmark runs.
        if mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1:
            return True
        reason = "mallopt refused the thresholds"
    print(f"# allocator left as it is ({reason}): timings may include page faults", file=sys.stderr)
    return False


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, the high-water mark of its own address
    space. Not ``ru_maxrss``: Linux carries that over fork and exec, so a worker started by a large
    parent reports at least the parent's size (measured: every zquant engine of bench_decode.py showed
    its parent's 1,245 MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], object], min_time: float = 0.3, min_calls: int = 5, warmup: int = 3,
            retries: int = 6, wait: float = 2.0, log: Callable[[str], None] | None = None) -> dict:
    """Median seconds per call of ``fn``; repeated while foreign CPU use exceeds FOREIGN_LIMIT.

    Returns {"median", "foreign" (cores used by others), "calls", "faults" (minor page faults per
    call)}; ``foreign`` above the limit means every retry was disturbed (reported, not hidden).
    """
    for _ in range(warmup):
        fn()
    best = None
    for attempt in range(retries):
        times = []
        others, faults = _Foreign(), minor_faults()
        while len(times) < min_calls or sum(times) < min_time:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        foreign, faults = others.cores(), (minor_faults() - faults) / len(times)
        result = {"median": statistics.median(times), "foreign": foreign, "calls": len(times), "faults": faults}
        if best is None or foreign < best["foreign"]:
            best = result
        if foreign <= FOREIGN_LIMIT:
            return result
        if log:
            log(f"  contention: others used {foreign:.2f} cores; re-measuring")
        time.sleep(wait * (attempt + 1))
    return best


def wait_for_quiet(max_wait: float = 900.0, window: float = 3.0, log: Callable[[str], None] | None = None) -> float:
    """Wait (up to ``max_wait`` s) until other processes use at most FOREIGN_LIMIT cores over a
    ``window``; returns the load seen last (above the limit if the wait timed out)."""
    deadline = time.monotonic() + max_wait
    while True:
        others = _Foreign()
        time.sleep(window)
        load = others.cores()
        if load <= FOREIGN_LIMIT or time.monotonic() > deadline:
            return load
        if log:
            log(f"  waiting for a quiet machine: others use {load:.2f} cores")
