"""Shared fixtures: a small demo archive generated once per test session."""

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
