"""The trainer on both Keras backends, each in a fresh Python: JAX without TensorFlow, exact resume, mixed precision.

KERAS_BACKEND is read once, when Keras is first imported, so every run here
is a subprocess (`run_on_backend`). On the JAX side `import tensorflow`
fails in that process (sys.modules["tensorflow"] = None before anything is
imported): a JAX training that imported TensorFlow anywhere fails the test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facenet_kfp import fsutil, tensorboard_log
from facenet_kfp.config import TrainConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax")
SMALL = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.8, embedding_dim=16, p=4, k=4,
                    loss="batch_hard", margin=0.5, squared=True, learning_rate=2e-3, lr_schedule="constant",
                    warmup_steps=0, max_steps=20, augment=True, validate_every=10, validation_batches=2,
                    checkpoint_every=10, log_every=5, precision="float32", seed=0)

PRELUDE = """
import json, logging, os, sys
from pathlib import Path
if os.environ["KERAS_BACKEND"] == "jax":
    sys.modules["tensorflow"] = None          # any import of TensorFlow on this path fails
logging.basicConfig(level=logging.INFO)
from facenet_kfp import train as train_mod
from facenet_kfp.config import TrainConfig
ARGS = json.loads(sys.argv[1])
D = {k: Path(v) for k, v in ARGS["inputs"].items()}
def run(out, checkpoint_dir=None, **changes):
    config = TrainConfig(**{**ARGS["config"], **changes})
    return train_mod.train(D["dataset"], D["completion"], D["labels"], D["splits"], Path(out), config,
                           checkpoint_dir=checkpoint_dir, run_key=ARGS.get("run_key"),
                           tensorboard_dir=ARGS.get("tensorboard_dir"))
"""


def run_on_backend(backend: str, script: str, args: dict, **env_vars: str) -> subprocess.CompletedProcess:
    """`script` after PRELUDE in a fresh Python with KERAS_BACKEND=backend; fails the test on rc != 0."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), **env_vars}
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), json.dumps(args)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def printed(result: subprocess.CompletedProcess, label: str):
    return json.loads(result.stdout.split(f"{label} ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from tests.builders import build_train_inputs

    d = build_train_inputs(tmp_path_factory.mktemp("inputs"))
    return {k: str(d[k]) for k in ("dataset", "completion", "labels", "splits")}


@pytest.mark.slow
def test_jax_training_runs_with_tensorflow_unimportable(inputs, tmp_path):
    run_key = str(tmp_path / "model")
    result = run_on_backend("jax", """
        import keras
        metrics = run(ARGS["out"])
        print("METRICS", json.dumps(metrics))
        print("BACKEND", json.dumps(keras.backend.backend()))
        print("TF", json.dumps(sorted(m for m in sys.modules if m.startswith("tensorflow") and sys.modules[m])))
    """, {"inputs": inputs, "config": to_dict(SMALL), "out": run_key, "run_key": run_key,
          "tensorboard_dir": str(tmp_path / "tb")})
    assert printed(result, "BACKEND") == "jax" and printed(result, "TF") == []
    assert "backend jax" in result.stderr
    metrics = printed(result, "METRICS")
    assert metrics["steps"] == 20 and metrics["start_step"] == 0 and metrics["images_per_second"] > 0
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [5, 10, 15, 20]
    assert [r["step"] for r in history["val"]] == [0, 10, 20]
    assert np.mean([r["loss"] for r in history["train"][-2:]]) < history["train"][0]["loss"]
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["backend"] == "jax" and info["trained_steps"] == 20
    assert (tmp_path / "model" / "model.keras").is_file()
    assert sorted(p.name for p in (tmp_path / "model.ckpt").glob("ckpt-*")) == ["ckpt-10.npz", "ckpt-20.npz"]
    # TensorBoard events without TensorFlow: every logged and validated step, read back here.
    names = fsutil.list_names(str(tmp_path / "tb"))
    written = tensorboard_log.written_steps(str(tmp_path / "tb"), names)
    assert written["train/loss"] == 20 and written["val/loss"] == 20 and written["train/learning_rate"] == 20


RESUME = dataclasses.replace(SMALL, max_steps=12, checkpoint_every=3, log_every=3, validate_every=6,
                             lr_schedule="cosine", warmup_steps=4, learning_rate=3e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(backend, inputs, tmp_path):
    """Killed after step 8 (last checkpoint: step 6), started again: the same weights and optimizer state
    at step 12 as a run without a break (same data order, optimizer moments, step counter and schedule)."""
    result = run_on_backend(backend, """
        if os.environ["KERAS_BACKEND"] == "tensorflow":
            import tensorflow as tf
            tf.config.experimental.enable_op_determinism()
        import numpy as np
        run(ARGS["out"] + "/whole")
        real = train_mod.TrainingProgress.on_train_batch_end
        class Killed(Exception):
            pass
        def killed_after_8(self, batch, logs=None):
            real(self, batch, logs)
            if self.state.step == 8:
                raise Killed()
        train_mod.TrainingProgress.on_train_batch_end = killed_after_8
        try:
            run(ARGS["out"] + "/broken", checkpoint_dir=ARGS["out"] + "/ckpt")
        except Killed:
            pass
        train_mod.TrainingProgress.on_train_batch_end = real
        print("AFTER_KILL", json.dumps(sorted(n for n in os.listdir(ARGS["out"] + "/ckpt")
                                              if n != train_mod.TRAIN_LOCK)))
        metrics = run(ARGS["out"] + "/resumed", checkpoint_dir=ARGS["out"] + "/ckpt")
        print("METRICS", json.dumps(metrics))
    """, {"inputs": inputs, "config": to_dict(RESUME), "out": str(tmp_path), "run_key": "resume-run"})
    assert printed(result, "AFTER_KILL")[:2] == ["ckpt-3.npz", "ckpt-6.npz"]
    assert printed(result, "METRICS")["start_step"] == 6
    with np.load(tmp_path / "whole.ckpt" / "ckpt-12.npz") as whole, np.load(tmp_path / "ckpt" / "ckpt-12.npz") as resumed:
        assert whole.files == resumed.files and int(resumed["step"]) == 12
        arrays = [k for k in whole.files if k.startswith(("model/", "optimizer/"))]
        assert any(k.startswith("optimizer/") for k in arrays)
        for key in arrays:
            np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
        moved = max(float(np.abs(whole[k]).max()) for k in arrays if k.startswith("optimizer/"))
        assert moved > 0                                       # the moments were trained, not zeros
    whole_history = json.loads((tmp_path / "whole" / "history.json").read_text())
    resumed_history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [r["step"] for r in resumed_history["train"]] == [3, 6, 9, 12]
    for a, b in zip(whole_history["train"], resumed_history["train"]):
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_trains_checkpoints_and_resumes_exactly(backend, tmp_path):
    """A test-only objective with a head, on either backend: the head trains (jitted on JAX), a checkpoint
    holds it, and a trainer restored from it continues exactly as the one that saved it."""
    result = run_on_backend(backend, """
        import math
        import numpy as np
        from facenet_kfp import checkpoints
        from tests.builders import HEADED as headed
        config = TrainConfig(**ARGS["config"])
        rng = np.random.default_rng(0)
        images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
        labels = np.repeat(np.arange(4), 4).astype(np.int32)
        def fit(trainer, steps):
            trainer.fit(images, labels, batch_size=16, epochs=steps, verbose=0, shuffle=False)
            checkpoints._sync(trainer)
        def state(trainer):
            checkpoints._sync(trainer)
            return [np.array(v.numpy()) for v in (*trainer.weights, *trainer.optimizer.variables)]
        trainer = train_mod.build_trainer(config, "float32", train_mod.Placement(), objective=headed)
        start = np.array(trainer.head.kernel.numpy())
        fit(trainer, 3)
        path = train_mod.save_checkpoint(ARGS["out"], trainer, 3)
        fresh = train_mod.build_trainer(TrainConfig(**{**ARGS["config"], "seed": 1}), "float32",
                                        train_mod.Placement(), objective=headed)
        assert train_mod.load_checkpoint(path, fresh) == 3
        restored = all(np.array_equal(a, b) for a, b in zip(state(trainer), state(fresh), strict=True))
        fit(trainer, 2)
        fit(fresh, 2)
        gap = max(float(np.abs(a - b).max()) for a, b in zip(state(trainer), state(fresh), strict=True))
        with np.load(path) as saved:
            head = json.loads(str(saved["names"]))["head"]
        print("HEAD", json.dumps({"moved": float(np.abs(trainer.head.kernel.numpy() - start).max()),
                                  "restored": restored, "gap": gap, "head": head}))
    """, {"inputs": {}, "config": to_dict(SMALL), "out": str(tmp_path)})
    out = printed(result, "HEAD")
    assert out["moved"] > 1e-4 and out["restored"] and out["head"] == ["test_head/kernel"]
    assert out["gap"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_trains_and_exports_float32(backend, inputs, tmp_path):
    result = run_on_backend(backend, """
        import keras
        out = {}
        for precision in ("mixed_float16", "mixed_bfloat16"):
            run(ARGS["out"] + "/" + precision, precision=precision)
            model = keras.saving.load_model(ARGS["out"] + "/" + precision + "/model.keras")
            out[precision] = sorted({str(w.dtype) for w in model.weights} | {model.output.dtype})
        print("DTYPES", json.dumps(out))
    """, {"inputs": inputs, "config": to_dict(dataclasses.replace(SMALL, validate_every=0)),
          "out": str(tmp_path), "run_key": None})
    assert printed(result, "DTYPES") == {"mixed_float16": ["float32"], "mixed_bfloat16": ["float32"]}
    for precision in ("mixed_float16", "mixed_bfloat16"):
        history = json.loads((tmp_path / precision / "history.json").read_text())["train"]
        losses = [r["loss"] for r in history]
        assert all(math.isfinite(v) for v in losses), (precision, losses)
        assert np.mean(losses[-2:]) < losses[0], (precision, losses)
        info = json.loads((tmp_path / precision / "model.json").read_text())
        assert info["precision"] == precision and info["backend"] == backend


@pytest.mark.slow
def test_jax_data_parallel_on_two_cpu_devices(inputs, tmp_path):
    """Several devices through keras.distribution.DataParallel (two host devices stand in for GPUs)."""
    result = run_on_backend("jax", """
        import jax, keras
        print("DEVICES", json.dumps(len(jax.devices())))
        metrics = run(ARGS["out"])
        print("METRICS", json.dumps(metrics))
    """, {"inputs": inputs, "config": to_dict(dataclasses.replace(SMALL, max_steps=4, log_every=2,
                                                                 validate_every=4, checkpoint_every=4)),
          "out": str(tmp_path / "model"), "run_key": None},
        XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert printed(result, "DEVICES") == 2 and "2 replica(s)" in result.stderr
    metrics = printed(result, "METRICS")
    assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert json.loads((tmp_path / "model" / "model.json").read_text())["replicas"] == 2
