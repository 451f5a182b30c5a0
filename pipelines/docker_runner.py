"""Run the pipeline's steps in their images with kfp.local.DockerRunner, against Docker or podman.

What it adds to kfp 2.17's DockerRunner:
1. **No auto-remove race** (kubeflow/pipelines#13332; fix PRs #13402 and #13907: delete this part, and its
   seam in pipelines/kfp_internals.py, once the kfp pinned in pyproject.toml has the fix). kfp starts
   containers with ``auto_remove=True``; against podman's Docker API a short step is removed before its log
   stream starts, so the run crashes or ``wait()`` answers 404, which kfp reads as exit code 0.
2. **Inputs mounted, outputs writable** (`make_docker_runner`), at the same paths as on the host.
   The images run as 1000:1000: as root, the writable folders are chowned to it; otherwise the
   containers run as this process's uid:gid (a rootful engine; rootless ones map ids differently).
3. **The local run's progress cadence**: ``$FACENET_PROGRESS_EVERY`` (set by pipelines/run_local.py
   for its steps, `facenet_kfp.progress`) reaches the containers as it reaches subprocess steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import docker
from kfp import local

from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import local_path, write_json
from facenet_kfp.progress import EVERY_ENV
from pipelines.kfp_internals import image_with_tag, replace_docker_run

log = logging.getLogger(__name__)

IMAGE_UID = 1000   # USER 1000:1000 in both Dockerfiles (tests/test_docker_runner.py checks)
IMAGE_GID = 1000
RUN_LABEL = "io.github.facenet-kfp.pipeline-root"   # value: the pipeline root of the run
CONTAINERS_FILE = "containers.json"


@dataclasses.dataclass(frozen=True)
class ContainerRun:
    """One step's container, as the Docker API reported it."""
    container_id: str
    image: str
    function: str          # the component function it executed ('' when not a KFP component)
    exit_code: int         # from wait(); 0 = the step succeeded
    start_seconds: float   # create + start request until the API answered (s): per-step overhead
    seconds: float         # create request until the container was removed (s)


def with_progress_every(environment: Any) -> Any:
    """A container's `environment` (a mapping, a ``KEY=VALUE`` list or None) with this process's
    ``$FACENET_PROGRESS_EVERY`` added when it is set; the step's own value wins."""
    value = os.environ.get(EVERY_ENV)
    if not value:
        return environment
    if environment is None or isinstance(environment, Mapping):
        return {EVERY_ENV: value, **(environment or {})}
    return [f"{EVERY_ENV}={value}", *environment]


def step_function(command: list[str]) -> str:
    """The function a KFP component command executes (after ``--function_to_execute``; '' if none)."""
    return next((value for flag, value in zip(command, command[1:]) if flag == "--function_to_execute"), "")


class ContainerRecorder:
    """`run` is kfp's `run_docker_container` without auto-remove; `runs`, saved to `path`, lists the containers."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.runs: list[ContainerRun] = []
        self._live: dict[str, Any] = {}   # id -> container not yet removed (steps may run in threads)
        self._lock = threading.Lock()
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, [dataclasses.asdict(r) for r in self.runs])

    def run(self, client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any) -> int:
        """Run one step: pull if missing, create and start, stream the log, wait, remove; the exit code."""
        if run_args.pop("auto_remove", False):
            raise FacenetError("auto_remove=True in the DockerRunner's arguments brings back the "
                               "race this runner avoids (see pipelines/docker_runner.py); drop it")
        image = image_with_tag(image)
        if (environment := with_progress_every(run_args.pop("environment", None))) is not None:
            run_args["environment"] = environment
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            print(f"Pulling image {image!r}")
            client.images.pull(image)
        started = time.monotonic()
        container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                          volumes=volumes, auto_remove=False, **run_args)
        start_seconds = time.monotonic() - started
        with self._lock:
            self._live[container.id] = container
        try:
            _print_log(container.logs(stream=True, follow=True))
            result = container.wait()
        except BaseException:   # interrupted, or the API failed: do not leave the container running
            self._remove(container, force=True)
            raise
        self._remove(container)
        if result.get("Error"):
            print(f"container {container.id[:12]} ({image}): {result['Error']}")
        record = ContainerRun(container_id=container.id, image=image, function=step_function(command),
                              exit_code=int(result["StatusCode"]), start_seconds=round(start_seconds, 3),
                              seconds=round(time.monotonic() - started, 3))
        with self._lock:
            self.runs.append(record)
            self._save()
        return record.exit_code

    def _remove(self, container: Any, force: bool = False) -> None:
        try:
            container.remove(force=force)
        except docker.errors.NotFound:   # removed meanwhile by remove_live in another thread
            log.warning("container %s was already removed", container.id[:12])
        with self._lock:
            self._live.pop(container.id, None)

    def remove_live(self) -> None:
        """Force-remove the containers still running (an interrupted run)."""
        with self._lock:
            live = list(self._live.values())
        for container in live:
            log.warning("removing container %s of the interrupted step", container.id[:12])
            self._remove(container, force=True)


def _print_log(chunks: Iterable[bytes]) -> None:
    """Print a container's log stream line by line (a chunk may end inside a line or a UTF-8 character)."""
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            print(line.decode(errors="replace"))
    if pending:
        print(pending.decode(errors="replace"))


@contextlib.contextmanager
def race_free_containers(path: str | os.PathLike | None = None) -> Iterator[ContainerRecorder]:
    """Inside the block kfp's Docker steps run through a `ContainerRecorder` saving to `path` (reset to ``[]``).

    At exit, also by Ctrl-C or SIGTERM (SystemExit(143) in the main thread), running containers are force-removed.
    """
    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    recorder = ContainerRecorder(path)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm) if in_main_thread else None
    try:
        with replace_docker_run(recorder.run):
            yield recorder
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        recorder.remove_live()


def container_user(uid: int | None = None, gid: int | None = None) -> str | None:
    """The `user` containers run as: None (the image's 1000:1000) for root, else `uid:gid`."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    return None if uid == 0 else f"{uid}:{gid}"


def make_docker_runner(pipeline_root: str | os.PathLike, inputs: Mapping[str, str] | None = None,
                       output_dirs: Mapping[str, str] | None = None, user: str | None = None) -> local.DockerRunner:
    """A kfp DockerRunner whose step containers see the run's local inputs and can write its outputs.

    `inputs` and `output_dirs` map config keys to URIs; local ones outside the pipeline root are mounted
    at the same path: inputs read-only (they must exist), output folders read-write (created).
    `user`: `uid:gid` the containers run as, default `container_user()`. Use it in `race_free_containers()`.
    """
    root = Path(pipeline_root)
    if not root.is_absolute():
        raise InputError(f"pipeline root {pipeline_root} must be an absolute path")
    user = user if user is not None else container_user()

    read_only: dict[Path, bool] = {}   # local path -> mounted read-only
    for uris, is_input in ((inputs, True), (output_dirs, False)):
        for key, uri in (uris or {}).items():
            if (path := local_path(uri)) is None:
                continue
            if not path.is_absolute():
                raise InputError(f"{key}={uri!r}: a local path must be absolute to be mounted into the step "
                                 "containers (they see host paths only at the same absolute path)")
            path = Path(os.path.normpath(path))
            if not is_input:
                path.mkdir(parents=True, exist_ok=True)
            elif not path.is_relative_to(root) and not path.exists():
                raise InputError(f"{key}={uri!r}: {path} not found")
            read_only[path] = is_input
    if user is None:
        for folder in [root, *(path for path, ro in read_only.items() if not ro)]:
            if (folder.stat().st_uid, folder.stat().st_gid) != (IMAGE_UID, IMAGE_GID):
                log.info("chown %d:%d %s (the images' user writes there)", IMAGE_UID, IMAGE_GID, folder)
                os.chown(folder, IMAGE_UID, IMAGE_GID)

    run_args: dict[str, Any] = {"labels": {RUN_LABEL: str(root)}}
    mounts = [docker.types.Mount(str(path), str(path), type="bind", read_only=ro)
              for path, ro in read_only.items() if not path.is_relative_to(root)]
    if mounts:
        run_args["mounts"] = mounts
    if user is not None:
        run_args["user"] = user
    return local.DockerRunner(**run_args)
