"""Every use of kfp's private API in this project, checked against the kfp versions it was written for.

- `observe_local_tasks` (the run table and task logs of `make run` / `make rerun`):
  kfp.local reports a task's cache hit only as a log line and prints every
  task's output through its own logging, so `execute_single_task` (each task's
  output is captured around it) and `LocalCache.get` are wrapped during a run.
- `replace_docker_run`, `image_with_tag` (pipelines/docker_runner.py): kfp's
  DockerRunner races with podman's Docker API and can report a failed step as
  SUCCESS (kubeflow/pipelines#13332, fix PRs #13402 and #13907); delete these
  once the kfp pinned in pyproject.toml has the fix.
- `ui_base` (`make submit`'s run link): the UI address kfp.Client resolved.

Each first checks that the installed kfp is in the range pyproject.toml pins
and that the attribute exists, and otherwise fails naming the kfp version.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
from typing import Any, Callable, Iterator

import kfp
from packaging.requirements import Requirement

from facenet_kfp.errors import FacenetError

DISTRIBUTION = "facenet-kfp"


def supported_kfp() -> str:
    """The kfp version range of this package's requirements (pyproject.toml), e.g. ``<2.18,>=2.17``."""
    for text in importlib.metadata.requires(DISTRIBUTION) or ():
        requirement = Requirement(text)
        if requirement.name == "kfp" and requirement.marker is None:
            return str(requirement.specifier)
    raise FacenetError(f"the installed {DISTRIBUTION} package names no kfp requirement; reinstall it (make install)")


def _check(feature: str, owner: Any, attribute: str) -> Any:
    spec = supported_kfp()
    if not Requirement(f"kfp{spec}").specifier.contains(kfp.__version__, prereleases=True):
        raise FacenetError(f"{feature} uses kfp's private API written for kfp {spec} (pyproject.toml), but kfp "
                           f"{kfp.__version__} is installed; install kfp{spec} (make install) or port "
                           f"pipelines/kfp_internals.py to kfp {kfp.__version__}")
    if not hasattr(owner, attribute):
        name = getattr(owner, "__name__", type(owner).__name__)
        raise FacenetError(f"{feature}: kfp {kfp.__version__} has no {name}.{attribute}; port "
                           f"pipelines/kfp_internals.py to it")
    return getattr(owner, attribute)


@contextlib.contextmanager
def observe_local_tasks(wrap: Callable[[str, str, Callable[[], tuple[Any, bool, bool]]], Any],
                        cache_lookup: Callable[[bool], None] | None = None) -> Iterator[None]:
    """Inside the block kfp.local executes each task through `wrap(task_name, display_name, run)`;
    `wrap` calls `run()` once, which executes the task and returns (outputs, failed, cached).
    `cache_lookup(hit)`, when given, is called inside `run()` as soon as kfp.local has looked the
    task up in its cache (before it logs a hit or starts the task); not at all with caching off."""
    from kfp.local.cache import LocalCache
    from kfp.local.orchestrator import task_executor

    original = _check("the local run table", task_executor, "execute_single_task")
    original_get = _check("the local run table", LocalCache, "get")
    hit = threading.local()

    def observed_get(self: Any, key: str) -> Any:
        found = original_get(self, key)
        hit.value = hit.value or found is not None
        if cache_lookup is not None:
            cache_lookup(found is not None)
        return found

    def execute(*args: Any, **kwargs: Any) -> Any:
        spec = kwargs["task_spec"]
        result: list[Any] = []

        def run() -> tuple[Any, bool, bool]:
            hit.value = False
            outputs, status = original(*args, **kwargs)
            result.append((outputs, status))
            return outputs, getattr(status, "name", str(status)) == "FAILURE", hit.value

        wrap(kwargs["task_name"], spec.task_info.name or kwargs["task_name"], run)
        return result[0]

    task_executor.execute_single_task, LocalCache.get = execute, observed_get
    try:
        yield
    finally:
        task_executor.execute_single_task, LocalCache.get = original, original_get


@contextlib.contextmanager
def replace_docker_run(run: Callable[..., int]) -> Iterator[None]:
    """Inside the block kfp's DockerRunner starts each step with `run(client, image, command, volumes,
    **run_args) -> exit code` (kubeflow/pipelines#13332)."""
    from kfp.local import docker_task_handler

    original = _check("the Docker runner", docker_task_handler, "run_docker_container")
    docker_task_handler.run_docker_container = run
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def image_with_tag(image: str) -> str:
    """The image reference as kfp's DockerRunner would pull it (``:latest`` added when untagged)."""
    from kfp.local import docker_task_handler

    return _check("the Docker runner", docker_task_handler, "add_latest_tag_if_not_present")(image)


def ui_base(client: Any) -> str:
    """The UI base URL a kfp.Client resolved, without a trailing slash."""
    return str(_check("the run link", client, "_uihost") or "").rstrip("/")
