"""Fixtures of the container tests: a reachable Docker API and the three built images.

These tests run through `make test-containers`, which builds the images, starts
podman's Docker-compatible service (images/podman.sh) and sets DOCKER_HOST,
FACENET_LIGHT_IMAGE, FACENET_TRAINER_IMAGE and FACENET_TRAINER_JAX_IMAGE. They
fail, rather than skip, when any of that is missing: a skipped CI check would look green.
"""

from __future__ import annotations

import os
from typing import Any

import docker
import pytest

from components import Images

MEASURED: dict[str, str] = {}   # label -> value, printed at the end of the session


@pytest.fixture(scope="session")
def engine() -> Any:
    """A Docker API client (DOCKER_HOST, else the default socket) that answers."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker API at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(default socket)')}: "
                    f"{exc}; run 'make test-containers' (it starts podman's service)")
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(engine: Any) -> Images:
    """The light and trainer images under test, present in the engine's store."""
    refs = {name: os.environ.get(f"FACENET_{name.upper()}_IMAGE", "") for name in ("light", "trainer")}
    missing = [f"FACENET_{name.upper()}_IMAGE" for name, ref in refs.items() if not ref]
    if missing:
        pytest.fail(f"set {' and '.join(missing)} to the built images (make test-containers does)")
    for ref in refs.values():
        try:
            engine.images.get(ref)
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {ref} is not in the engine's store; build it (make images)")
    return Images(light=refs["light"], trainer=refs["trainer"])


@pytest.fixture(scope="session")
def trainer_jax_image(engine: Any) -> str:
    """The JAX trainer image under test (FACENET_TRAINER_JAX_IMAGE), present in the engine's store."""
    ref = os.environ.get("FACENET_TRAINER_JAX_IMAGE", "")
    if not ref:
        pytest.fail("set FACENET_TRAINER_JAX_IMAGE to the built JAX trainer image (make test-containers does)")
    try:
        engine.images.get(ref)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {ref} is not in the engine's store; build it (make images)")
    return ref


@pytest.fixture(scope="session")
def measured() -> dict[str, str]:
    """Figures to report (timings, start overhead), printed in the terminal summary."""
    return MEASURED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("measured")
        for label, value in MEASURED.items():
            terminalreporter.write_line(f"{label}: {value}")
