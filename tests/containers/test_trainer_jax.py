"""The JAX trainer image: a short multi-process training on the CPU, as a Kubeflow Trainer TrainJob runs it.

Needs a Docker API and the built image: `make test-containers` (not part of `make test`).
The inputs are generated on the host (tests/builders.py, as tests/test_multiprocess.py);
the image runs `facenet-kfp train --processes 2` on them (two local JAX processes of one
process group: the path of a TrainJob's nodes), then embeds a few faces with the model it
wrote, loaded by plain Keras and preprocessed by facenet_kfp.numpy_input (`facenet-kfp embed`
preprocesses with TensorFlow, which this image does not have). The image holds jax[cuda12]
and no TensorFlow; on this machine there is no GPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.docker_runner import IMAGE_GID, IMAGE_UID
from tests.builders import build_train_inputs, face_image

# tests/test_multiprocess.py's tiny run: 6 steps, validation and checkpoints every 3.
SETTINGS = {"architecture": "small_cnn", "image_size": 32, "crop_fraction": 0.8, "embedding_dim": 16, "p": 4,
            "k": 4, "loss": "batch_hard", "margin": 0.5, "squared": "true", "learning_rate": 2e-3,
            "lr_schedule": "constant", "warmup_steps": 0, "max_steps": 6, "augment": "true", "validate_every": 3,
            "validation_batches": 2, "checkpoint_every": 3, "log_every": 3, "precision": "float32", "seed": 0}
# JAX_PLATFORMS=cpu, as on a CPU-only node. Without it JAX does fall back to the CPU here, but first
# initialises its CUDA plugin, which on a machine without an NVIDIA driver logs "Jax plugin
# configuration error" with a traceback (cuInit failed) in every process. A GPU node leaves it unset.
ENVIRONMENT = {"JAX_PLATFORMS": "cpu"}
FACES = 4
# In the container: model.keras loaded as model.json's "load" says, the faces preprocessed as its
# "preprocessing" says (no augmentation), the embeddings saved beside the model.
EMBED = """
import json, sys
import keras, numpy as np
from facenet_kfp.numpy_input import embedding_batches
model_dir, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
pre = json.load(open(model_dir + "/model.json"))["preprocessing"]
model = keras.saving.load_model(model_dir + "/model.keras")
images = [open(f, "rb").read() for f in files]
batches = embedding_batches(images, pre["image_size"], pre["crop_fraction"], batch_size=len(images), workers=0)
np.savez(out, embeddings=np.concatenate([np.asarray(model.predict_on_batch(b)) for b in batches]))
print("backend", keras.backend.backend())
"""


def run_container(engine, image: str, command: list[str], volumes: dict, user: str | None) -> tuple[int, str, float]:
    """Run `command` in `image` to its end: (exit code, output, seconds); the container is removed."""
    start = time.monotonic()
    container = engine.containers.run(image, command, detach=True, volumes=volumes, environment=ENVIRONMENT,
                                      **({"user": user} if user else {}))
    try:
        code = container.wait(timeout=600)["StatusCode"]
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    return code, output, time.monotonic() - start


def first_json(text: str) -> dict:
    """The first JSON object in `text` (`train` prints its metrics once per process)."""
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


def test_two_jax_processes_train_in_the_jax_image(tmp_path, engine, trainer_jax_image, measured):
    inputs = build_train_inputs(tmp_path / "inputs")
    faces = tmp_path / "inputs" / "faces"
    faces.mkdir()
    for i in range(FACES):
        (faces / f"face_{i}.jpg").write_bytes(face_image(i % 2, 50 + i, size=64))
    out = tmp_path / "out"
    out.mkdir()
    # As pipelines/docker_runner.py: as root the containers run as the image's user, who must own the
    # output folder; otherwise as the calling user.
    if os.getuid() == 0:
        os.chown(out, IMAGE_UID, IMAGE_GID)
        user = None
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    volumes = {str(tmp_path / "inputs"): {"bind": "/inputs", "mode": "ro"}, str(out): {"bind": "/out", "mode": "rw"}}

    train = ["facenet-kfp", "train", *(f"/inputs/{inputs[name].name}" for name in ("dataset", "completion",
                                                                                     "labels", "splits")),
             "--out", "/out/model", "--checkpoint-dir", "/out/model.ckpt", "--processes", "2"]
    for key, value in SETTINGS.items():
        train += ["--set", f"{key}={value}"]
    code, output, train_seconds = run_container(engine, trainer_jax_image, train, volumes, user)
    assert code == 0, output[-4000:]
    assert "joining the JAX process group at 127.0.0.1:" in output
    assert "as process 1 of 2" in output and "as process 0 of 2" in output
    assert "is not a writable directory" not in output     # MPLCONFIGDIR is uid 1000's to make

    # The model folder: Keras archive and its description, no TensorFlow exports (none in the image).
    model = out / "model"
    made = json.loads((model / "model.json").read_text())
    assert {"model.keras", "model.json", "history.json"} <= set(made["files"])
    assert (model / "model.keras").stat().st_size > 0
    assert (made["backend"], made["replicas"], made["trained_steps"]) == ("jax", 2, 6)
    assert "saved_model/" not in made["files"] and "TensorFlow is not importable" in made["saved_model_missing"]
    assert sorted(p.name for p in (out / "model.ckpt").glob("ckpt-*.npz")) == ["ckpt-3.npz", "ckpt-6.npz"]

    # The metrics `train` printed: each process prints them, model.json holds process 0's; they agree
    # but for the timings each process measured itself.
    metrics = first_json(output)
    timings = {"train_seconds", "images_per_second"}
    assert sorted(metrics) == sorted(made["metrics"])
    assert {k: v for k, v in metrics.items() if k not in timings} == \
        {k: v for k, v in made["metrics"].items() if k not in timings}
    assert metrics["steps"] == 6 and metrics["start_step"] == 0 and metrics["images_per_second"] > 0
    for key in ("train_loss", "val_loss", "first_val_loss", "val_mean_positive_distance",
                "val_mean_negative_distance"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, (key, metrics[key])
    assert 0 <= metrics["val_fraction_positive"] <= 1

    # The trained model embeds: finite, unit-length 16-D embeddings, not all alike.
    embed = ["python3", "-c", EMBED, "/out/model", "/out/embeddings.npz",
             *(f"/inputs/faces/face_{i}.jpg" for i in range(FACES))]
    code, output, embed_seconds = run_container(engine, trainer_jax_image, embed, volumes, user)
    assert code == 0, output[-4000:]
    assert "backend jax" in output
    with np.load(out / "embeddings.npz") as saved:
        embeddings = saved["embeddings"]
    assert embeddings.shape == (FACES, 16)
    assert np.all(np.isfinite(embeddings))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    assert np.ptp(embeddings, axis=0).max() > 1e-3

    measured["JAX image: train --processes 2, 6 steps (container)"] = f"{train_seconds:.1f} s"
    measured["JAX image: embed 4 images (container)"] = f"{embed_seconds:.1f} s"
