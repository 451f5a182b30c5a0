"""The whole pipeline in its containers (kfp.local.DockerRunner + pipelines/docker_runner.py).

Needs a Docker API and the built images: `make test-containers` (not part of
`make test`). Checks that every step runs in its own image, that the results
equal a SubprocessRunner run on the same data and seeds, that a failing step
fails the run (the auto-remove race would report it as a success), and that no
container is left behind.
"""

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local

from components import COMPONENTS
from pipelines.docker_runner import (CONTAINERS_FILE, IMAGE_GID, IMAGE_UID, RUN_LABEL,
                                     make_docker_runner, race_free_containers)
from pipelines.facenet_pipeline import STEPS
from pipelines.run_local import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["download-archive", "extract-images", "make-labels", "complete-identities",
         "split-identities", "check-pairs", "train-model", "evaluate-model"]
DATA_TASKS = TASKS[:6]
# Verification figures in [0, 1] compared between the two runners. Same TensorFlow
# (2.21.0 from PyPI in the venv and in the stand-in trainer base), seeds and data give
# identical numbers on one machine; the tolerance leaves room for another TensorFlow
# build in the base image (e.g. tensorflow/tensorflow:2.21.0-gpu on a CPU), whose
# kernels may sum in another order, while still catching a step that trained or
# evaluated on other data: |delta| <= 0.05 is 16 of the 314 test pairs of this demo.
COMPARED = ["test_accuracy", "test_auc", "test_kfold_accuracy_mean", "val_accuracy",
            "lfw_pairs_kfold_accuracy_mean", "lfw_pairs_auc"]
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """The demo config cut to seconds: small_cnn at 32x32, 30 steps (as tests/test_e2e.py)."""
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=30, validate_every=15, checkpoint_every=15, log_every=5,
                           image_size=32, p=8, validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=4)
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def leftover_containers(engine, root: Path) -> list:
    return engine.containers.list(all=True, filters={"label": f"{RUN_LABEL}={root}"})


def expected_user() -> str:
    return f"{IMAGE_UID}:{IMAGE_GID}" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"


# ---- single components: the race ------------------------------------------------------------

# No `from __future__ import annotations` in this file: KFP reads these return annotations as types.
def raise_an_error() -> str:
    raise ValueError("this step fails on purpose")


def who_am_i() -> str:
    import os
    return f"{os.getuid()}:{os.getgid()}"


def test_failing_component_fails_and_a_passing_one_passes(tmp_path, engine, images):
    root = tmp_path / "root"
    root.mkdir()
    failing = dsl.component(raise_an_error, base_image=images.light, install_kfp_package=False)
    passing = dsl.component(who_am_i, base_image=images.light, install_kfp_package=False)
    local.init(runner=make_docker_runner(root), pipeline_root=str(root), raise_on_error=True)
    with race_free_containers(root / CONTAINERS_FILE) as recorder:
        # A step that exits at once is the race's worst case: the stock runner reported it as
        # SUCCESS or crashed on an HTTP 500. Several in a row, to not pass by luck of timing.
        for attempt in range(3):
            with pytest.raises(RuntimeError, match="FAILURE"):
                failing()
        assert passing().output == expected_user()
    assert [(r.function, r.exit_code) for r in recorder.runs] == \
        [("raise_an_error", 1)] * 3 + [("who_am_i", 0)]
    assert len({r.container_id for r in recorder.runs}) == 4
    assert leftover_containers(engine, root) == []


# ---- the whole pipeline -----------------------------------------------------------------------

def data_files(summary: dict) -> dict[str, bytes]:
    """Every file the six data steps wrote, by task and relative path (kfp's own files left out)."""
    files = {}
    for task in summary["tasks"]:
        if task["name"] not in DATA_TASKS:
            continue
        for name, output in task["outputs"].items():
            base = Path(output["uri"])
            paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
            for path in paths:
                files[f"{task['name']}/{name}/{path.relative_to(base)}"] = path.read_bytes()
    return files


def output_dir(summary: dict, task: str, name: str) -> Path:
    return Path(next(t for t in summary["tasks"] if t["name"] == task)["outputs"][name]["uri"])


def test_pipeline_in_containers_matches_the_subprocess_runner(tmp_path, engine, images,
                                                               demo_archive, tiny_config, measured):
    args = (str(tiny_config), str(demo_archive["archive"]), demo_archive["sha256"],
            str(demo_archive["pairs"]))
    docker_root, subprocess_root = tmp_path / "docker", tmp_path / "subprocess"

    start = time.monotonic()
    in_containers = run_pipeline(*args, str(docker_root), runner="docker", images=images)
    docker_seconds = time.monotonic() - start
    assert in_containers["status"] == "SUCCEEDED", in_containers.get("error")
    start = time.monotonic()
    in_venv = run_pipeline(*args, str(subprocess_root), runner="subprocess", images=images)
    subprocess_seconds = time.monotonic() - start
    assert in_venv["status"] == "SUCCEEDED", in_venv.get("error")

    # Every step ran, each in a container of its own image, and every container is gone.
    # The summary lists tasks in DAG order, whichever order kfp ran complete and splits in.
    assert [t["name"] for t in in_containers["tasks"]] == TASKS
    assert all(t["status"] == "SUCCEEDED" for t in in_containers["tasks"])
    runs = json.loads((docker_root / CONTAINERS_FILE).read_text())
    # The steps of the default DAG (no evaluation archive, so no evaluate_on_archive).
    expected = {COMPONENTS[step.name].__name__: getattr(images, step.policy.image) for step in STEPS}
    assert sorted((r["function"], r["image"]) for r in runs) == sorted(expected.items())
    assert all(r["exit_code"] == 0 for r in runs)
    assert len({r["container_id"] for r in runs}) == len(TASKS)
    assert leftover_containers(engine, docker_root) == []
    run_dir = output_dir(in_containers, "download-archive", "archive").parents[1]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in run_dir.rglob("*")}
    assert owners == {tuple(map(int, expected_user().split(":")))}, "written by the containers' user"

    # The same data, byte for byte: labels.json, the completion manifest, the split files,
    # the shards, every file of the five data steps.
    containers_files, venv_files = data_files(in_containers), data_files(in_venv)
    assert sorted(containers_files) == sorted(venv_files)
    for key in ("make-labels/labels/labels.json", "complete-identities/completion/manifest.jsonl",
                "split-identities/splits/train.txt", "split-identities/splits/val.txt",
                "split-identities/splits/test.txt", "extract-images/images/manifest.jsonl"):
        assert key in containers_files
    different = [key for key in containers_files if containers_files[key] != venv_files[key]]
    assert different == []

    # The same figures, within the tolerance.
    deltas = {}
    for key in COMPARED:
        a, b = in_containers["metrics"][key], in_venv["metrics"][key]
        deltas[key] = abs(a - b)
        assert deltas[key] <= TOLERANCE, f"{key}: containers {a} vs venv {b}"
    # Balanced pairs (at most evaluate.max_pairs_per_identity per identity) on a few test identities.
    assert in_containers["metrics"]["test_pairs"] == in_venv["metrics"]["test_pairs"] >= 40

    # summary.json as with the default runner, and the cache: a rerun starts no container.
    saved = json.loads((docker_root / "summary.json").read_text())
    assert saved["status"] == "SUCCEEDED" and saved["runner"] == "docker" and len(saved["tasks"]) == len(TASKS)
    again = run_pipeline(*args, str(docker_root), runner="docker", images=images)
    assert [t["status"] for t in again["tasks"]] == ["CACHED"] * len(TASKS)
    assert json.loads((docker_root / CONTAINERS_FILE).read_text()) == []
    assert again["metrics"]["test_accuracy"] == in_containers["metrics"]["test_accuracy"]

    starts = [r["start_seconds"] for r in runs]
    measured[f"pipeline, DockerRunner ({len(TASKS)} containers)"] = f"{docker_seconds:.1f} s"
    measured["pipeline, SubprocessRunner"] = f"{subprocess_seconds:.1f} s"
    measured["container create+start"] = (f"median {statistics.median(starts):.2f} s, "
                                          f"max {max(starts):.2f} s")
    container_seconds = {r["function"]: r["seconds"] for r in runs}
    measured["task time outside its container (kfp + API)"] = ", ".join(
        f"{t['name']} {t['seconds'] - container_seconds[t['name'].replace('-', '_')]:.1f} s"
        for t in in_containers["tasks"])
    measured["largest |delta| of the compared figures"] = f"{max(deltas.values()):.4f}"


def test_failing_step_fails_the_pipeline(tmp_path, engine, images, demo_archive, tiny_config):
    root = tmp_path / "root"
    summary = run_pipeline(str(tiny_config), str(demo_archive["archive"]), "0" * 64, None,
                           str(root), runner="docker", images=images)
    assert summary["status"] == "FAILED"
    assert [t["status"] for t in summary["tasks"]] == ["FAILED"]
    assert "download-archive" in summary["error"] and "sha256" in summary["error"]
    [run] = json.loads((root / CONTAINERS_FILE).read_text())
    assert run["function"] == "download_archive" and run["exit_code"] != 0
    assert json.loads((root / "summary.json").read_text())["status"] == "FAILED"
    assert leftover_containers(engine, root) == []
