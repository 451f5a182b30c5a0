"""Run the pipeline's steps in their images with kfp.local.DockerRunner, against Docker or podman.

Two things kfp 2.17's DockerRunner does not do:

1. **No auto-remove race** (kubeflow/pipelines#13332; fix PRs #13402 and #13907:
   delete this part, and its seam in pipelines/kfp_internals.py, once the kfp
   pinned in pyproject.toml has the fix). kfp starts containers with
   ``auto_remove=True``; against podman's Docker API a short step is removed
   before its log stream starts, so the run crashes or ``wait()`` answers 404,
   which kfp reads as exit code 0. `ContainerRecorder.run` creates and starts
   without auto-remove, streams the log, waits for the real exit code, removes
   the container and records it in ``<pipeline root>/containers.json``.
2. **Inputs mounted, outputs writable.** kfp mounts only the pipeline root;
   `make_docker_runner` adds local inputs read-only and checkpoint/TensorBoard
   roots read-write, at the same paths. The images run as 1000:1000: as root,
   the pipeline root is chowned to it; otherwise containers run as this
   process's uid:gid (a rootful engine; rootless ones map ids differently).
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import docker
from kfp import local

from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import local_path, write_json
from pipelines.kfp_internals import image_with_tag, replace_docker_run

log = logging.getLogger(__name__)

IMAGE_UID = 1000   # USER 1000:1000 in both Dockerfiles (tests/test_docker_runner.py checks)
IMAGE_GID = 1000
RUN_LABEL = "io.github.facenet-kfp.pipeline-root"   # value: the pipeline root of the run
CONTAINERS_FILE = "containers.json"


@dataclass(frozen=True)
class ContainerRun:
    """One step's container, as the Docker API reported it."""
    container_id: str
    image: str
    function: str          # the component function it executed ('' when not a KFP component)
    exit_code: int         # from wait(); 0 = the step succeeded
    start_seconds: float   # create + start request until the API answered (s): per-step overhead
    seconds: float         # create request until the container was removed (s)


def step_function(command: list[str]) -> str:
    """The component function a KFP lightweight-component command executes ('' if none).

    KFP's command ends with `... --executor_input JSON --function_to_execute NAME`.
    """
    for flag, value in zip(command, command[1:]):
        if flag == "--function_to_execute":
            return value
    return ""


class ContainerRecorder:
    """Runs step containers without auto-remove and records each one.

    `run` has the signature of kfp's `docker_task_handler.run_docker_container`
    (returns the container's exit code); `runs` lists the containers of this
    run in order, and `path` (when given) holds them as JSON after each one.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.runs: list[ContainerRun] = []
        self._live: dict[str, Any] = {}   # id -> container not yet removed (steps may run in threads)
        self._lock = threading.Lock()
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, [dataclasses.asdict(r) for r in self.runs])

    def run(self, client: Any, image: str, command: list[str], volumes: dict[str, Any],
            **run_args: Any) -> int:
        """Run one step: create and start, stream the log, wait, remove; the exit code."""
        if run_args.get("auto_remove"):
            raise FacenetError("auto_remove=True in the DockerRunner's arguments brings back the "
                               "race this runner avoids (see pipelines/docker_runner.py); drop it")
        run_args = {k: v for k, v in run_args.items() if k != "auto_remove"}
        image = image_with_tag(image)
        _ensure_image(client, image)

        started = time.monotonic()
        container = client.containers.run(image=image, command=command, detach=True, stdout=True,
                                          stderr=True, volumes=volumes, auto_remove=False,
                                          **run_args)
        start_seconds = time.monotonic() - started
        with self._lock:
            self._live[container.id] = container
        try:
            _print_log(container.logs(stream=True, follow=True))
            result = container.wait()
        except BaseException:
            # Interrupted or the API failed: do not leave the container running.
            self._remove(container, force=True)
            raise
        self._remove(container)
        exit_code = int(result["StatusCode"])
        if result.get("Error"):
            print(f"container {container.id[:12]} ({image}): {result['Error']}")
        record = ContainerRun(container_id=container.id, image=image,
                              function=step_function(command), exit_code=exit_code,
                              start_seconds=round(start_seconds, 3),
                              seconds=round(time.monotonic() - started, 3))
        self.runs.append(record)
        self._save()
        log.debug("container %s (%s) exited %d", container.id[:12], image, exit_code)
        return exit_code

    def _remove(self, container: Any, force: bool = False) -> None:
        try:
            container.remove(force=force)
        except docker.errors.NotFound:
            # Removed meanwhile (remove_live from another thread): gone is what was wanted.
            log.warning("container %s was already removed", container.id[:12])
        with self._lock:
            self._live.pop(container.id, None)

    def remove_live(self) -> list[str]:
        """Force-remove the containers still running (an interrupted run); their ids."""
        with self._lock:
            live = list(self._live.values())
        for container in live:
            log.warning("removing container %s of the interrupted step", container.id[:12])
            self._remove(container, force=True)
        return [c.id for c in live]


def _ensure_image(client: Any, image: str) -> None:
    """Pull `image` unless the engine already has it (as kfp does, with one lookup, not a listing)."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        print(f"Pulling image {image!r}")
        client.images.pull(image)
        print("Image pull complete\n")
    else:
        print(f"Found image {image!r}\n")


def _print_log(chunks: Any) -> None:
    """Print a container's log stream line by line (chunks may split lines and UTF-8 characters).

    `print` is looked up at call time: kfp indents step logs by replacing it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            builtins.print(line)
    pending += decoder.decode(b"", final=True)
    if pending:
        builtins.print(pending)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def race_free_containers(path: str | os.PathLike | None = None) -> Iterator[ContainerRecorder]:
    """Run kfp's Docker steps through a `ContainerRecorder` inside the `with` block.

    In the main thread, SIGTERM raises SystemExit(143) inside the block, so that,
    as after Ctrl-C, the containers still running are force-removed on the way
    out; the previous handler is restored after. `path`: where the container
    records go (``<pipeline root>/containers.json``); it is reset to ``[]`` on entry.
    """
    recorder = ContainerRecorder(path)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        with replace_docker_run(recorder.run):
            try:
                yield recorder
            finally:
                recorder.remove_live()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _mount_path(key: str, uri: str) -> Path | None:
    path = local_path(uri)
    if path is None:
        return None
    if not path.is_absolute():
        raise InputError(f"{key}={uri!r}: a local path must be absolute to be mounted into the "
                         "step containers (they see host paths only at the same absolute path)")
    return Path(os.path.normpath(path))


def container_user(uid: int | None = None, gid: int | None = None) -> str | None:
    """The `user` containers run as: None (the image's 1000:1000) for root, else `uid:gid`."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    return None if uid == 0 else f"{uid}:{gid}"


def make_docker_runner(pipeline_root: str | os.PathLike, inputs: Mapping[str, str] | None = None,
                       output_dirs: Mapping[str, str] | None = None,
                       user: str | None = None) -> local.DockerRunner:
    """A kfp DockerRunner whose step containers see the run's local inputs and can write outputs.

    `inputs` and `output_dirs` map config keys to URIs; local ones (absolute
    paths, file://) are mounted at the same path: inputs read-only (they must
    exist), output folders read-write (created). `user`: `uid:gid` the
    containers run as, default `container_user()`. Use it inside `race_free_containers()`.
    """
    root = Path(pipeline_root)
    if not root.is_absolute():
        raise InputError(f"pipeline root {pipeline_root} must be an absolute path")
    user = user if user is not None else container_user()

    mounts: dict[Path, docker.types.Mount] = {}
    for key, uri in (inputs or {}).items():
        path = _mount_path(key, uri)
        if path is None or path.is_relative_to(root):
            continue
        if not path.exists():
            raise InputError(f"{key}={uri!r}: {path} not found")
        mounts[path] = docker.types.Mount(target=str(path), source=str(path), type="bind",
                                          read_only=True)
    writable = [root]
    for key, uri in (output_dirs or {}).items():
        path = _mount_path(key, uri)
        if path is None:
            continue
        path.mkdir(parents=True, exist_ok=True)
        writable.append(path)
        if not path.is_relative_to(root):
            mounts[path] = docker.types.Mount(target=str(path), source=str(path), type="bind",
                                              read_only=False)
    if user is None:
        for folder in writable:
            if (folder.stat().st_uid, folder.stat().st_gid) != (IMAGE_UID, IMAGE_GID):
                log.info("chown %d:%d %s (the images' user writes the step outputs)",
                         IMAGE_UID, IMAGE_GID, folder)
                os.chown(folder, IMAGE_UID, IMAGE_GID)

    run_args: dict[str, Any] = {"labels": {RUN_LABEL: str(root)}}
    if mounts:
        run_args["mounts"] = list(mounts.values())
    if user is not None:
        run_args["user"] = user
    return local.DockerRunner(**run_args)
