"""Shared fixtures: a small demo archive generated once per test session, a GCS emulator."""

import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory) -> dict:
    """A 40-identity LFW-format demo archive: {'archive', 'pairs', 'sha256', 'dir'}."""
    from facenet_kfp.synth import generate_demo_archive

    out = tmp_path_factory.mktemp("demo")
    result = generate_demo_archive(out, identities=40, seed=3, workers=1)
    return {"archive": Path(result.archive), "pairs": Path(result.pairs), "sha256": result.sha256,
            "dir": out}


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator server on a free local port (in memory, bucket "test-bucket"): its URL."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    emulator = create_server("localhost", port, in_memory=True, default_bucket="test-bucket")
    emulator.start()
    yield f"http://localhost:{port}"
    emulator.stop()


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):
    """The emulator's "test-bucket", with STORAGE_EMULATOR_HOST set for the code under test."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return storage.Client(project="test").bucket("test-bucket")
