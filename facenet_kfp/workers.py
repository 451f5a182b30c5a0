"""Worker processes of the data steps: how many CPUs to use, how to start workers, and tying them to their parent.

Shared by extract (decompressing child and decoding pool) and the TensorFlow-free
input pipeline. Extract forks its workers (`mp_context`): it runs in a step of
its own, before any JAX or TensorFlow could start threads. The input pipeline
feeds a trainer whose JAX or TensorFlow runtime (and CUDA) has started, where a
fork can deadlock on a lock another thread held: it starts its workers from a
clean forkserver process instead (`safe_context`, `become_worker`).
"""

from __future__ import annotations

import ctypes
import io
import math
import multiprocessing
import os
import signal
import sys
from multiprocessing import context, forkserver, popen_forkserver, reduction, spawn, util
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
    # script would crash). Only for steps that start their workers before any
    # JAX or TensorFlow runs (extract, complete): a fork of a process with their
    # threads can deadlock on a lock one of them held (`safe_context` then).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


# Modules the forkserver imports once, so each worker forked from it starts ready. Never JAX, TensorFlow or
# Keras: the forkserver is started without them, whatever the parent has imported.
FORKSERVER_PRELOAD = ("numpy", "PIL.Image", "facenet_kfp.numpy_input")


def safe_context():
    """The multiprocessing context for workers of a process that may run JAX or TensorFlow: forkserver, else spawn.

    A worker is forked from a small server process started for the purpose
    (it imports `FORKSERVER_PRELOAD`), never from the caller, whose runtime
    threads may hold locks a forked child would wait on forever. What a
    worker needs comes to it by pickle (functions by name) or by name (shared
    memory). Unlike multiprocessing's own forkserver, the workers do not
    re-import the caller's ``__main__`` (`_LeanForkServerPopen`): an
    unguarded script does not run again in each worker, and a script that
    imports Keras does not load it there.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    # The seam below copies a private method of these CPython versions; on others multiprocessing's own
    # forkserver (the workers then import the caller's __main__, as under spawn).
    context = _LeanForkServerContext() if _LEAN_FORKSERVER_PYTHONS[0] <= sys.version_info[:2] <= \
        _LEAN_FORKSERVER_PYTHONS[1] else multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


_LEAN_FORKSERVER_PYTHONS = ((3, 11), (3, 11))    # where `_LeanForkServerPopen._launch` was checked against CPython


class _LeanForkServerPopen(popen_forkserver.Popen):
    """multiprocessing's forkserver Popen, less the ``__main__`` import in the child.

    `_launch` is `multiprocessing.popen_forkserver.Popen._launch` of CPython
    3.11 (the images' Python; `safe_context` uses it only there) with the two
    preparation keys that make the child import the parent's ``__main__``
    left out. The workers run functions of importable modules only, so they
    never need it.
    """

    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)      # the child's sentinel of this process, as in the original
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _LeanForkServerProcess(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _LeanForkServerPopen(process_obj)


class _LeanForkServerContext(context.ForkServerContext):
    Process = _LeanForkServerProcess


def become_worker(owner: int) -> None:
    """`become_child` for a worker of `safe_context`: it never outlives `owner`, the process that started it.

    Its parent is the forkserver (or `owner` itself under spawn): the death
    signal is armed on that parent, and the forkserver ends when the last
    holder of its "alive" pipe does. multiprocessing gives each forked child a
    copy too, which would keep the forkserver, and so the workers, alive after
    `owner` is killed; the worker closes its copy (it starts no process), so the
    forkserver ends with `owner`, also after a SIGKILL, and the worker with it.
    A worker whose owner is already gone exits at once.
    """
    become_child(os.getppid())
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None and os.getppid() != owner:
        os.close(alive)
        server._forkserver_alive_fd = None
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass  # the pid was reused by another user's process: the forkserver's pipe still ends us
