"""Multi-process JAX training: the process group from the environment, and local process groups for a test.

Kubeflow Trainer's `jax-distributed` runtime starts one process per node and
sets JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID in each (`ENV_VARS`). `cluster_from_env` reads them (all three
or none), `initialize` hands them to `keras.distribution.initialize` (which
calls `jax.distributed.initialize`) once per process, before any JAX work;
`keras.distribution.DataParallel` then spans every device of every process.

`run_local` is what `facenet-kfp train --processes N` does: N child processes
of the same command on this machine, with the three variables set
(coordinator 127.0.0.1 on a free port); the group fails when one child fails,
and the others are then stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from facenet_kfp.errors import FacenetError, InputError

log = logging.getLogger(__name__)

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_VARS = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
POLL_SECONDS = 0.2          # how often run_local looks at its children
STOP_SECONDS = 10.0         # how long a stopped child gets to end before it is killed


@dataclass(frozen=True)
class Cluster:
    """One process of a process group: the coordinator's host:port, the number of processes, this one's id."""
    coordinator: str
    num_processes: int
    process_id: int


_initialized: Cluster | None = None


def _integer(environ: Mapping[str, str], name: str) -> int:
    text = environ[name].strip()
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def cluster_from_env(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The process group the environment names (default os.environ), or None when it names none.

    Reads JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES (>= 1) and
    JAX_PROCESS_ID (0 <= id < JAX_NUM_PROCESSES). InputError naming the
    variable when only some of the three are set (an empty value counts as
    unset), a number is not an integer or out of range, or the address has no
    port.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in ENV_VARS if environ.get(name, "").strip()]
    if not present:
        return None
    if len(present) < len(ENV_VARS):
        missing = [name for name in ENV_VARS if name not in present]
        raise InputError(f"environment variable {', '.join(missing)} not set, but {', '.join(present)} is: "
                         f"a JAX process group needs all of {', '.join(ENV_VARS)}, or none of them")
    coordinator = environ[COORDINATOR].strip()
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"environment variable {COORDINATOR}={coordinator!r} is not host:port")
    num_processes, process_id = _integer(environ, NUM_PROCESSES), _integer(environ, PROCESS_ID)
    if num_processes < 1:
        raise InputError(f"environment variable {NUM_PROCESSES}={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise InputError(f"environment variable {PROCESS_ID}={process_id} must be in 0..{num_processes - 1} "
                         f"({NUM_PROCESSES}={num_processes})")
    return Cluster(coordinator, num_processes, process_id)


def initialize(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """Join the process group the environment names (`cluster_from_env`), once per process; None when it
    names none. Must run before any JAX work (jax.distributed.initialize refuses to run after it).

    InputError as `cluster_from_env`, and when the backend is not jax, or when a second call names
    another group than the first.
    """
    global _initialized
    cluster = cluster_from_env(environ)
    if cluster is None or cluster == _initialized:
        return cluster
    if _initialized is not None:
        raise InputError(f"this process already joined the JAX process group {_initialized}, not {cluster}")
    import keras
    if keras.backend.backend() != "jax":
        raise InputError(f"{', '.join(ENV_VARS)} are set, but the Keras backend is {keras.backend.backend()}: "
                         f"multi-process training needs KERAS_BACKEND=jax")
    log.info("joining the JAX process group at %s as process %d of %d", cluster.coordinator,
             cluster.process_id, cluster.num_processes)
    keras.distribution.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    _initialized = cluster
    return cluster


def process_index() -> int:
    """This process's id in the group `initialize` joined (0 without one)."""
    return _initialized.process_id if _initialized else 0


def process_count() -> int:
    """The number of processes of the group `initialize` joined (1 without one)."""
    return _initialized.num_processes if _initialized else 1


def is_chief() -> bool:
    """Whether this process writes the outputs (checkpoints, TensorBoard events, the model): process 0."""
    return process_index() == 0


def check_agree(value: int, what: str) -> None:
    """FacenetError unless every process of the group passes the same integer (a collective: every process
    calls it at the same point); nothing without a group. `what` names the value in the message."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    values = [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64))).ravel()]
    if len(set(values)) > 1:
        raise FacenetError(f"the {len(values)} processes disagree on {what}: {values} (by process id); every "
                           f"process must see the same files")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(children: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to the children still running, SIGKILL to those still running STOP_SECONDS later."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for child in running:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_local(argv: Sequence[str], processes: int, environ: Mapping[str, str] | None = None,
              program: Sequence[str] | None = None) -> int:
    """Run `python -m facenet_kfp.cli *argv` (or `*program, *argv`) as `processes` local processes of one
    JAX process group.

    Each child gets the environment (default os.environ) plus JAX_COORDINATOR_ADDRESS=127.0.0.1:<free
    port>, JAX_NUM_PROCESSES=processes and JAX_PROCESS_ID=i. Returns 0 when every child ends with 0,
    else the exit status of the first child that failed (the others are stopped then: SIGTERM, then
    SIGKILL after STOP_SECONDS). InputError when processes < 1 or the environment already names a group.
    """
    environ = dict(os.environ if environ is None else environ)
    if processes < 1:
        raise InputError(f"--processes {processes}: must be at least 1")
    if cluster_from_env(environ) is not None:
        raise InputError(f"--processes {processes}: {', '.join(ENV_VARS)} are already set (this process is "
                         f"one of a process group); start the group with one or the other")
    program = list(program or [sys.executable, "-m", "facenet_kfp.cli"])
    coordinator = f"127.0.0.1:{free_port()}"
    children = []
    try:
        for i in range(processes):
            env = {**environ, COORDINATOR: coordinator, NUM_PROCESSES: str(processes), PROCESS_ID: str(i)}
            children.append(subprocess.Popen([*program, *argv], env=env))
        while True:
            codes = [c.poll() for c in children]
            failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)]
            if failed:
                i, rc = failed[0]
                log.error("process %d of %d failed (exit status %d); stopping the others", i, processes, rc)
                return rc if rc > 0 else 128 - rc      # killed by signal -rc: the shell's status
            if all(rc == 0 for rc in codes):
                return 0
            time.sleep(POLL_SECONDS)
    finally:
        _stop(children)
