"""Checkpoints in real local pipeline runs: a retried train task resumes, a new run starts at step 0.

The train task keys its checkpoint folder under `checkpoint_root` by its model
output URI (`kfp_io.checkpoint_dir_for`): kfp.local keeps that URI when it
retries a task and gives every run a new one.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from kfp.local.orchestrator import task_executor

from components import Images
from facenet_kfp.kfp_io import checkpoint_dir_for
from facenet_kfp.train import checkpoint_steps
from pipelines.run_local import DEFAULT_LIGHT_IMAGE, DEFAULT_TRAINER_IMAGE, run_pipeline

tf = pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, CHECKPOINT_EVERY = 20, 10
DATA_TASKS = ["download-archive", "extract-images", "make-labels", "complete-identities", "split-identities"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=MAX_STEPS, validate_every=CHECKPOINT_EVERY,
                           checkpoint_every=CHECKPOINT_EVERY, log_every=5, image_size=32, p=8,
                           validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=4)
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config, demo_archive, pipeline_root, checkpoint_root, trainer=DEFAULT_TRAINER_IMAGE):
    summary = run_pipeline(str(config), str(demo_archive["archive"]), demo_archive["sha256"], None,
                           str(pipeline_root), images=Images(light=DEFAULT_LIGHT_IMAGE, trainer=trainer),
                           overrides={"cluster": {"checkpoint_root": str(checkpoint_root)}})
    assert summary["status"] == "SUCCEEDED", summary.get("error")
    return summary


def train_outputs(outputs):
    """(metrics, model.json) of a train task's outputs {name: {"uri", ...}}."""
    return (json.loads(Path(outputs["metrics"]["uri"]).read_text()),
            json.loads((Path(outputs["model"]["uri"]) / "model.json").read_text()))


@pytest.fixture(scope="module")
def first(tmp_path_factory, demo_archive, tiny_config):
    """One pipeline run with a checkpoint root, and the keyword arguments of its train task's execution."""
    base = tmp_path_factory.mktemp("checkpoints")
    calls = {}
    real = task_executor.execute_single_task

    def capture(**kwargs):            # kfp.local's orchestrator passes keywords only
        calls[kwargs["task_name"]] = kwargs
        return real(**kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task_executor, "execute_single_task", capture)
        summary = run(tiny_config, demo_archive, base / "outputs", base / "ckpt")
    tasks = {t["name"]: t for t in summary["tasks"]}
    folders = sorted(p.name for p in (base / "ckpt").iterdir())
    return {"summary": summary, "train": tasks["train-model"], "call": calls["train-model"], "execute": real,
            "base": base, "ckpt": base / "ckpt", "folders": folders,
            "checkpoints": [Path(p).name for _, p in checkpoint_steps(str(base / "ckpt" / folders[0]))]}


@pytest.mark.slow
def test_first_run_trains_from_step_0_into_its_own_folder(first):
    metrics, info = train_outputs(first["train"]["outputs"])
    assert metrics["start_step"] == 0 and metrics["steps"] == MAX_STEPS
    assert info["start_step"] == 0 and info["trained_steps"] == MAX_STEPS
    folder = Path(checkpoint_dir_for(str(first["ckpt"]), first["train"]["outputs"]["model"]["uri"]))
    assert first["folders"] == [folder.name]
    assert first["checkpoints"] == [f"ckpt-{CHECKPOINT_EVERY}.npz", f"ckpt-{MAX_STEPS}.npz"]


@pytest.mark.slow
def test_retried_train_task_resumes_at_its_checkpoint(first):
    """The pod died after the step-10 checkpoint, before writing its outputs; kfp.local runs it again."""
    outputs = first["train"]["outputs"]
    folder = Path(checkpoint_dir_for(str(first["ckpt"]), outputs["model"]["uri"]))
    (folder / f"ckpt-{MAX_STEPS}.npz").unlink()
    assert [Path(p).name for _, p in checkpoint_steps(str(folder))] == [f"ckpt-{CHECKPOINT_EVERY}.npz"]
    shutil.rmtree(outputs["model"]["uri"])
    for name in ("metrics", "training_report"):
        Path(outputs[name]["uri"]).unlink()

    # The same execution again (what the retry loop of execute_single_task does), past the cache.
    call = dict(first["call"])
    spec = type(call["task_spec"])()
    spec.CopyFrom(call["task_spec"])
    spec.caching_options.enable_cache = False
    call["task_spec"] = spec
    retried, status = first["execute"](**call)
    assert status.name == "SUCCESS"
    assert retried["model"].uri == outputs["model"]["uri"]           # same run, same output URIs
    metrics, info = train_outputs({k: {"uri": v.uri} for k, v in retried.items()})
    assert metrics["start_step"] == CHECKPOINT_EVERY and metrics["steps"] == MAX_STEPS
    assert info["start_step"] == CHECKPOINT_EVERY and info["trained_steps"] == MAX_STEPS
    assert info["resumed_from"] == str(folder / f"ckpt-{CHECKPOINT_EVERY}.npz")
    assert [Path(p).name for _, p in checkpoint_steps(str(folder))][-1] == f"ckpt-{MAX_STEPS}.npz"


@pytest.mark.slow
def test_new_run_with_cached_data_steps_trains_from_step_0(first, demo_archive, tiny_config):
    """Same pipeline root, parameters and checkpoint root; a new trainer image makes train run again."""
    summary = run(tiny_config, demo_archive, first["base"] / "outputs", first["ckpt"],
                  trainer=DEFAULT_TRAINER_IMAGE + "-other")
    statuses = {t["name"]: t["status"] for t in summary["tasks"]}
    assert [statuses[name] for name in DATA_TASKS] == ["CACHED"] * len(DATA_TASKS)
    assert statuses["train-model"] == "SUCCEEDED"
    train = next(t for t in summary["tasks"] if t["name"] == "train-model")
    metrics, info = train_outputs(train["outputs"])
    assert metrics["start_step"] == 0 and metrics["steps"] == MAX_STEPS and info["start_step"] == 0
    assert train["outputs"]["model"]["uri"] != first["train"]["outputs"]["model"]["uri"]
    assert Path(checkpoint_dir_for(str(first["ckpt"]), train["outputs"]["model"]["uri"])).is_dir()


@pytest.mark.slow
def test_new_pipeline_root_with_the_same_checkpoint_root_trains_from_step_0(first, demo_archive, tiny_config,
                                                                           tmp_path):
    summary = run(tiny_config, demo_archive, tmp_path / "outputs", first["ckpt"])
    train = next(t for t in summary["tasks"] if t["name"] == "train-model")
    assert train["status"] == "SUCCEEDED"
    metrics, info = train_outputs(train["outputs"])
    assert metrics["start_step"] == 0 and metrics["steps"] == MAX_STEPS and info["start_step"] == 0
