"""Worker processes of the data steps: how many CPUs to use, how to start workers, and tying them to their parent.

Shared by extract (decompressing child and decoding pool), the TensorFlow-free
input pipeline and completion.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1       # linux/prctl.h


def become_child(parent: int) -> None:
    """Set up a forked child process so that it never outlives `parent` nor reports its signals.

    On Linux the kernel kills the child when the parent ends (PR_SET_PDEATHSIG,
    also after a SIGKILL); elsewhere callers check ``os.getppid()``. Ctrl-C is
    left to the parent, which stops its children; SIGTERM ends the child at once.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)  # the parent ended before the death signal was armed


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a container CPU limit (cgroup v2 cpu.max or v1 CFS quota); None if unlimited.

    A Kubernetes pod with ``limits.cpu: 2`` on a 64-core node sees all 64 cores
    in its affinity mask; 64 decoding processes would mostly wait and each cost memory.
    """
    for quota_file, period_file in (("cpu.max", None),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (root / quota_file).read_text().split()
            if period_file is not None:
                fields.append((root / period_file).read_text().strip())
        except OSError:
            continue  # this cgroup version is not mounted here: try the other one
        if len(fields) != 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a container CPU limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(cpus, 1)


def mp_context():
    """The multiprocessing context for workers: fork where the platform has it, else spawn."""
    # fork where there is one: it starts workers in milliseconds and, unlike
    # spawn/forkserver, does not re-import the caller's __main__ (an unguarded
    # script would crash). Workers only use Pillow and os.pread, never locks
    # that another thread of the caller (e.g. TensorFlow's) could hold at fork.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
