"""Tests of the model folder's portable exports: model.onnx under ONNX Runtime and serving/1/ as TensorFlow
Serving loads it, against the Keras model, on both Keras backends; a failing export fails the save."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import FacenetError, InputError

tf = pytest.importorskip("tensorflow")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("tf2onnx")

from facenet_kfp import export, onnx_export  # noqa: E402  (after the importorskip guards)
from facenet_kfp.model import build_embedding_model  # noqa: E402
from facenet_kfp.preprocess import preprocess_array  # noqa: E402
from facenet_kfp.tf_input import preprocess_image  # noqa: E402
from tests.builders import face_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.7, embedding_dim=16,
                     loss="batch_all", margin=0.5, squared=False)
HISTORY = {"train": [], "val": []}
JPEGS = [face_image(i % 5, i) for i in range(7)]


def _png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(jpeg)) as image:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


PNGS = [_png(b) for b in JPEGS]

# Builds a model on the JAX backend and saves the artifact twice: argv = folder, failing folder, TrainConfig
# fields .json, pixels .npy, output .npy, a folder holding a tf2onnx that raises. The second save's child
# Python (KERAS_BACKEND=tensorflow) imports that tf2onnx; this process imported the real one already.
JAX_SAVE = """
import json, os, sys
import keras, numpy as np
from facenet_kfp import export
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import FacenetError
from facenet_kfp.model import build_embedding_model
folder, failing, config_path, pixels_path, out_path, broken = sys.argv[1:7]
with open(config_path) as handle:
    config = TrainConfig(**json.load(handle))
keras.utils.set_random_seed(0)
model = build_embedding_model((32, 32, 3), 16, "small_cnn")
rng = np.random.default_rng(0)
model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim else w for w in model.get_weights()])
export.save_model_artifact(model, folder, export.artifact_metadata(config, 5), {"train": [], "val": []})
np.save(out_path, keras.ops.convert_to_numpy(model(np.load(pixels_path), training=False)))
assert keras.backend.backend() == "jax", keras.backend.backend()
os.environ["PYTHONPATH"] = broken + os.pathsep + os.environ.get("PYTHONPATH", "")
try:
    export.save_model_artifact(model, failing, export.artifact_metadata(config, 5), {"train": [], "val": []})
except FacenetError as exc:
    print("save failed:", exc)
"""


def _perturbed_model():
    """A small_cnn whose weights and batch-norm statistics are off their initial values."""
    keras.utils.set_random_seed(1)
    model = build_embedding_model((32, 32, 3), 16, "small_cnn")
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim else w
                       for w in model.get_weights()])
    return model


def _tf_pixels(images):
    return np.stack([preprocess_image(b, 32, 0.7).numpy() for b in images])


def _onnx_embeddings(path, pixels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (source,), (result,) = session.get_inputs(), session.get_outputs()
    assert (source.name, source.type, result.name, result.type) \
        == ("images", "tensor(float)", "embeddings", "tensor(float)")
    return session.run(["embeddings"], {"images": pixels})[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _perturbed_model()
    folder = tmp_path_factory.mktemp("artifact") / "model"
    export.save_model_artifact(model, folder, export.artifact_metadata(CONFIG, 30), HISTORY)
    return model, folder


def test_onnx_gives_the_keras_embeddings(saved):
    model, folder = saved
    pixels = _tf_pixels(JPEGS)
    embeddings = _onnx_embeddings(folder / "model.onnx", pixels)
    assert embeddings.shape == (7, 16) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, np.asarray(model.predict_on_batch(pixels)), atol=1e-4)
    loaded, metadata = export.load_model_artifact(folder)
    np.testing.assert_allclose(embeddings, export.embed_images(loaded, metadata, JPEGS), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # A batch of one and a batch of another size: the batch dimension is free.
    np.testing.assert_allclose(_onnx_embeddings(folder / "model.onnx", pixels[:1]), embeddings[:1], atol=1e-6)


def test_onnx_follows_the_documented_preprocessing_without_tensorflow(saved):
    """An ONNX user preprocesses with the NumPy definition model.json names; PNGs decode the same everywhere."""
    _, folder = saved
    loaded, metadata = export.load_model_artifact(folder)
    pre = json.loads((folder / "model.json").read_text())["onnx"]["preprocessing"]
    pixels = np.stack([preprocess_array(b, pre["image_size"], pre["crop_fraction"]) for b in PNGS])
    np.testing.assert_allclose(_onnx_embeddings(folder / "model.onnx", pixels),
                               export.embed_images(loaded, metadata, PNGS), atol=1e-4)


def test_model_json_describes_the_onnx_file_and_the_serving_model(saved):
    _, folder = saved
    info = json.loads((folder / "model.json").read_text())
    assert sorted(info["files"]) == ["curves.png", "history.json", "model.json", "model.keras", "model.onnx",
                                     "saved_model/", "serving/"]
    assert sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if not p.name.startswith(".")) \
        == sorted(info["files"])
    assert info["onnx"] == {
        "file": "model.onnx",
        "input": {"name": "images", "shape": [None, 32, 32, 3], "layout": "NHWC", "dtype": "float32"},
        "output": {"name": "embeddings", "shape": [None, 16], "dtype": "float32"},
        "preprocessing": info["preprocessing"], "opset": onnx_export.OPSET}
    assert info["preprocessing"] == {"version": "centre-crop-v1", "image_size": 32, "crop_fraction": 0.7,
                                     "scale": "[-1,1]"}
    assert info["onnx_missing"] is None
    assert info["serving"]["saved_model"] == "serving/1" and info["serving"]["signature"] == "serving_default"
    assert {k: v for k, v in info["serving"]["input"].items() if k != "content"} \
        == {"name": "images", "dtype": "string", "shape": [None]}
    assert "JPEG or PNG" in info["serving"]["input"]["content"]
    assert info["serving"]["output"] == {"name": "embeddings", "dtype": "float32", "shape": [None, 16]}
    assert [p.name for p in (folder / "serving").iterdir()] == ["1"]          # TF Serving's version folder
    # The file is float32 throughout: its weights, and no cast to a half-precision type.
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert onnx_export._half_precision(graph) == []


def test_serving_default_takes_image_bytes(saved):
    model, folder = saved
    loaded, metadata = export.load_model_artifact(folder)
    expected = export.embed_images(loaded, metadata, JPEGS)
    serving = tf.saved_model.load(str(folder / "serving" / "1"))
    default = serving.signatures["serving_default"]
    assert default.structured_input_signature[1]["images"].dtype == tf.string
    got = default(images=tf.constant(JPEGS))["embeddings"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    mixed = JPEGS[:2] + PNGS[2:4]
    np.testing.assert_allclose(default(images=tf.constant(mixed))["embeddings"].numpy(),
                               export.embed_images(loaded, metadata, mixed), atol=1e-5)
    # The pixel signature is there too, and saved_model/ keeps the pixel signature as its default.
    pixels = _tf_pixels(JPEGS)
    np.testing.assert_allclose(serving.signatures["serve"](images=tf.constant(pixels))["embeddings"].numpy(),
                               expected, atol=1e-5)
    assert sorted(serving.signatures) == ["serve", "serve_image_bytes", "serving_default"]
    plain = tf.saved_model.load(str(folder / "saved_model"))
    assert plain.signatures["serving_default"].structured_input_signature[1]["images"].dtype == tf.float32


def test_tensorflow_serving_sees_a_bytes_default_signature(saved):
    """TensorFlow Serving reads the SignatureDefs of saved_model.pb, not the object graph tf.saved_model.load uses."""
    from tensorflow.core.protobuf import saved_model_pb2

    _, folder = saved
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((folder / "serving" / "1" / "saved_model.pb").read_bytes())
    (graph,) = proto.meta_graphs
    assert "serve" in graph.meta_info_def.tags                  # the tag set TF Serving loads
    default = graph.signature_def["serving_default"]
    assert list(default.inputs) == ["images"] and list(default.outputs) == ["embeddings"]
    assert default.inputs["images"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1]
    assert default.outputs["embeddings"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in default.outputs["embeddings"].tensor_shape.dim] == [-1, 16]
    assert default.method_name == "tensorflow/serving/predict"


def test_a_failing_onnx_export_fails_the_save_and_leaves_no_folder(monkeypatch, tmp_path):
    def broken(model, path):
        raise RuntimeError("converter broke")

    monkeypatch.setattr(onnx_export, "convert", broken)
    with pytest.raises(RuntimeError, match="converter broke"):
        export.save_model_artifact(_perturbed_model(), tmp_path / "model", export.artifact_metadata(CONFIG, 1),
                                   HISTORY)
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_float32_is_refused(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_embedding_model((32, 32, 3), 16, "small_cnn")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(InputError, match=r"model.keras and model.onnx hold a float32 model; layers computing in "
                                         r"another dtype: image \(float16\), block1_conv \(float16\)"):
        export.save_model_artifact(mixed, tmp_path / "model", export.artifact_metadata(CONFIG, 1), HISTORY)
    assert list(tmp_path.iterdir()) == []


def test_onnx_entry_refuses_a_file_that_is_not_the_export(saved, tmp_path):
    _, folder = saved
    proto = onnx.load(str(folder / "model.onnx"))
    proto.graph.input[0].name = "input"
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(FacenetError, match=r"renamed.onnx: input 'input' \[None, 32, 32, 3\], expected 'images'"):
        onnx_export.onnx_entry(tmp_path / "renamed.onnx", {"image_size": 32})
    with pytest.raises(FacenetError, match=r"model.onnx: input 'images' \[None, 32, 32, 3\], expected 'images' "
                                           r"\[None, 64, 64, 3\]"):
        onnx_export.onnx_entry(folder / "model.onnx", {"image_size": 64})


@pytest.mark.slow
def test_the_child_python_failure_names_the_file_and_quotes_its_stderr(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a keras file")
    with pytest.raises(FacenetError, match=r"(?s)model.keras: the ONNX export \(KERAS_BACKEND=tensorflow python -m "
                                           r"facenet_kfp.onnx_export .*/model.keras .*/model.onnx\) failed with "
                                           r"exit status 1; its stderr ends: .*model.keras: File not found"):
        onnx_export.convert_file(tmp_path / "model.keras", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_the_command_converts_a_model_file(saved, tmp_path):
    model, folder = saved
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run([sys.executable, "-m", "facenet_kfp.onnx_export", str(folder / "model.keras"),
                           str(tmp_path / "again.onnx")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pixels = _tf_pixels(JPEGS)
    np.testing.assert_allclose(_onnx_embeddings(tmp_path / "again.onnx", pixels),
                               np.asarray(model.predict_on_batch(pixels)), atol=1e-4)
    done = subprocess.run([sys.executable, "-m", "facenet_kfp.onnx_export", str(folder / "model.keras"),
                           str(tmp_path / "jax.onnx")], env={**env, "KERAS_BACKEND": "jax"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1 and "runs on the tensorflow backend" in done.stderr
    assert not (tmp_path / "jax.onnx").exists()


@pytest.mark.slow
def test_a_model_saved_on_jax_gets_both_exports_through_a_tensorflow_child(tmp_path):
    pixels = _tf_pixels(JPEGS)
    np.save(tmp_path / "pixels.npy", pixels)
    fields = {f: getattr(CONFIG, f) for f in ("architecture", "image_size", "crop_fraction", "embedding_dim",
                                               "loss", "margin", "squared")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tf2onnx.py").write_text("raise RuntimeError('this tf2onnx is broken on purpose')\n")
    folder, failing = tmp_path / "model", tmp_path / "failing"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", JAX_SAVE, str(folder), str(failing), str(tmp_path / "config.json"),
                           str(tmp_path / "pixels.npy"), str(tmp_path / "jax.npy"), str(broken)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    jax_embeddings = np.load(tmp_path / "jax.npy")
    info = json.loads((folder / "model.json").read_text())
    assert info["backend"] == "jax" and info["onnx_missing"] is None
    assert {"model.onnx", "serving/", "saved_model/"} <= set(info["files"])
    assert info["onnx"]["input"]["shape"] == [None, 32, 32, 3] and info["onnx"]["output"]["shape"] == [None, 16]
    np.testing.assert_allclose(_onnx_embeddings(folder / "model.onnx", pixels), jax_embeddings, atol=1e-4)
    loaded, metadata = export.load_model_artifact(folder)
    np.testing.assert_allclose(_onnx_embeddings(folder / "model.onnx", pixels),
                               export.embed_images(loaded, metadata, JPEGS), atol=1e-4)
    serving = tf.saved_model.load(str(folder / "serving" / "1"))
    np.testing.assert_allclose(serving.signatures["serving_default"](images=tf.constant(JPEGS))["embeddings"].numpy(),
                               export.embed_images(loaded, metadata, JPEGS), atol=1e-5)
    # The second save's child failed: the save failed with the child's stderr, and left no folder.
    assert "save failed:" in done.stdout and "this tf2onnx is broken on purpose" in done.stdout
    assert "failed with exit status" in done.stdout
    assert not failing.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
