"""Tests of the model artifact: save -> load round trip, embeddings, SavedModel signatures, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError

tf = pytest.importorskip("tensorflow")
export = pytest.importorskip("facenet_kfp.export")

from facenet_kfp.tf_input import preprocess_image  # noqa: E402  (after the importorskip guards)
from facenet_kfp.model import L2Normalize, build_embedding_model  # noqa: E402
from tests.builders import face_image  # noqa: E402

CONFIG = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.7, embedding_dim=16,
                     loss="batch_all", margin=0.5, squared=False)
HISTORY = {"train": [{"step": s, "loss": 1.0 / s, "fraction_positive_triplets": 0.5 / s,
                      "mean_positive_distance": 0.5, "mean_negative_distance": 1.0 + s / 100}
                     for s in (10, 20, 30)],
           "val": [{"step": 30, "loss": 0.1, "fraction_positive_triplets": 0.02,
                    "mean_positive_distance": 0.6, "mean_negative_distance": 1.1}]}
IMAGES = [face_image(i % 5, i) for i in range(7)]

# Loads model.keras with plain Keras and embeds pixels: argv = model.keras, pixels .npy, output .npy.
# facenet_kfp is never imported, so the file must hold only built-in layers.
PLAIN_KERAS_EMBED = """
import os, sys
import keras, numpy as np
model_path, pixels_path, out_path = sys.argv[1:]
model = keras.saving.load_model(model_path)
np.save(out_path, keras.ops.convert_to_numpy(model(np.load(pixels_path), training=False)))
assert keras.backend.backend() == os.environ["KERAS_BACKEND"], keras.backend.backend()
assert not [name for name in sys.modules if name.split(".")[0] == "facenet_kfp"]
"""

# Builds a model on the JAX backend and saves the artifact: argv = folder, TrainConfig fields .json,
# pixels .npy, output .npy, "no-tensorflow" (make `import tensorflow` fail) or "tensorflow".
JAX_SAVE = """
import sys
if sys.argv[5] == "no-tensorflow":
    sys.modules["tensorflow"] = None                  # `import tensorflow` now raises ImportError
import json, logging
logging.basicConfig(level=logging.INFO)
import keras, numpy as np
from facenet_kfp import export
from facenet_kfp.config import TrainConfig
from facenet_kfp.model import build_embedding_model
folder, config_path, pixels_path, out_path = sys.argv[1:5]
with open(config_path) as handle:
    config = TrainConfig(**json.load(handle))
keras.utils.set_random_seed(0)
model = build_embedding_model((32, 32, 3), 16, "small_cnn")
export.save_model_artifact(model, folder, export.artifact_metadata(config, 5), {"train": [], "val": []})
np.save(out_path, keras.ops.convert_to_numpy(model(np.load(pixels_path), training=False)))
assert keras.backend.backend() == "jax", keras.backend.backend()
print("tensorflow modules:", sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "tensorflow" and v))
"""


def _python(script, backend, *args):
    """Run `script` in a fresh Python with KERAS_BACKEND=backend; the completed process (checked)."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _pixels(images):
    return np.stack([preprocess_image(b, 32, 0.7).numpy() for b in images])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_embedding_model((32, 32, 3), 16, "small_cnn")
    # Move the batch-norm statistics and weights off their initial values so the round trip means something.
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim else w
                       for w in model.get_weights()])
    folder = tmp_path_factory.mktemp("artifact") / "model"
    export.save_model_artifact(model, folder, export.artifact_metadata(CONFIG, 30, note="test"), HISTORY)
    return model, folder


def _reference_embeddings(model, images):
    """Slow reference: preprocess one image at a time, call the model in inference mode."""
    pixels = np.stack([preprocess_image(b, 32, 0.7).numpy() for b in images])
    return np.asarray(model(pixels, training=False))


def test_round_trip_gives_the_same_embeddings(saved):
    model, folder = saved
    loaded, metadata = export.load_model_artifact(folder)
    reference = _reference_embeddings(model, IMAGES)
    before = export.embed_images(model, metadata, IMAGES)
    after = export.embed_images(loaded, metadata, IMAGES, batch_size=3)     # batches of 3, 3, 1
    assert after.shape == (7, 16) and after.dtype == np.float32
    np.testing.assert_allclose(before, reference, atol=1e-5)
    np.testing.assert_allclose(after, before, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert export.embed_images(loaded, metadata, []).shape == (0, 16)


def test_model_json_history_and_curves(saved):
    _, folder = saved
    info = json.loads((folder / "model.json").read_text())
    assert info["format"] == "facenet-kfp-model/1" and info["file"] == "model.keras"
    assert sorted(info["files"]) == ["curves.png", "history.json", "model.json", "model.keras", "model.onnx",
                                     "saved_model/", "serving/"]
    assert sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if not p.name.startswith(".")) \
        == sorted(info["files"])
    assert "keras.saving.load_model('model.keras')" in info["load"] and "no facenet_kfp import" in info["load"]
    assert info["saved_model_missing"] is None
    assert info["architecture"] == "small_cnn" and info["input_shape"] == [32, 32, 3]
    assert info["embedding_dim"] == 16 and info["trained_steps"] == 30 and info["note"] == "test"
    assert info["start_step"] == 0                                     # trained from scratch
    assert info["loss"] == "batch_all" and info["margin"] == 0.5
    assert info["distance"] == {"name": "l2", "definition": export.DISTANCE_DEFINITIONS["l2"], "margin": 0.5}
    assert info["distance"]["definition"].startswith("plain L2")
    assert info["preprocessing"] == {"version": "centre-crop-v1", "image_size": 32, "crop_fraction": 0.7,
                                     "scale": "[-1,1]"}
    assert info["backend"] == "tensorflow" and info["keras_version"] and info["created"].endswith("+00:00")
    assert info["saved_model"] == "saved_model"
    assert info["serving"]["saved_model"] == "serving/1" and info["onnx"]["file"] == "model.onnx"
    assert info["onnx_missing"] is None                                # tests/test_onnx.py checks both exports
    assert json.loads((folder / "history.json").read_text()) == HISTORY
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]    # no temporary left


def test_saved_model_signatures_match_keras(saved):
    model, folder = saved
    reloaded = tf.saved_model.load(str(folder / "saved_model"))
    expected = _reference_embeddings(model, IMAGES)
    from_bytes = reloaded.signatures["serve_image_bytes"](images=tf.constant(IMAGES))["embeddings"]
    np.testing.assert_allclose(from_bytes.numpy(), expected, atol=1e-5)
    pixels = np.stack([preprocess_image(b, 32, 0.7).numpy() for b in IMAGES])
    from_pixels = reloaded.signatures["serve"](images=tf.constant(pixels))["embeddings"]
    np.testing.assert_allclose(from_pixels.numpy(), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_plain_keras_loads_the_model_on_either_backend(saved, backend, tmp_path):
    model, folder = saved
    pixels = _pixels(IMAGES)
    np.save(tmp_path / "pixels.npy", pixels)
    _python(PLAIN_KERAS_EMBED, backend, folder / "model.keras", tmp_path / "pixels.npy", tmp_path / "emb.npy")
    embeddings = np.load(tmp_path / "emb.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape == (7, 16)
    np.testing.assert_allclose(embeddings, np.asarray(model(pixels, training=False)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tensorflow", [False, True], ids=["without-tensorflow", "with-tensorflow"])
def test_a_model_saved_on_jax_is_the_same_artifact(tensorflow, tmp_path):
    folder = tmp_path / "model"
    pixels = _pixels(IMAGES)
    np.save(tmp_path / "pixels.npy", pixels)
    fields = {f: getattr(CONFIG, f) for f in ("architecture", "image_size", "crop_fraction", "embedding_dim",
                                               "loss", "margin", "squared")}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    done = _python(JAX_SAVE, "jax", folder, tmp_path / "config.json", tmp_path / "pixels.npy",
                   tmp_path / "jax.npy", "tensorflow" if tensorflow else "no-tensorflow")
    info = json.loads((folder / "model.json").read_text())
    assert info["backend"] == "jax" and info["trained_steps"] == 5
    assert info["preprocessing"] == export.artifact_metadata(CONFIG, 5)["preprocessing"]
    # Loaded here on the TensorFlow backend, it embeds as it did on JAX.
    loaded, metadata = export.load_model_artifact(folder)
    jax_embeddings = np.load(tmp_path / "jax.npy")
    np.testing.assert_allclose(np.asarray(loaded(pixels, training=False)), jax_embeddings, atol=1e-5)
    np.testing.assert_allclose(export.embed_images(loaded, metadata, IMAGES), jax_embeddings, atol=1e-5)
    if not tensorflow:
        assert "tensorflow modules: []" in done.stdout
        assert info["saved_model"] is None and not (folder / "saved_model").exists()
        assert sorted(info["files"]) == ["curves.png", "history.json", "model.json", "model.keras"]
        assert "TensorFlow is not importable" in info["saved_model_missing"]
        assert "no saved_model/ or serving/ written: TensorFlow is not importable" in done.stderr   # the log too
        assert info["serving"] is None and info["onnx"] is None and not (folder / "model.onnx").exists()
        assert "TensorFlow, tf2onnx or onnx is not importable" in info["onnx_missing"]
        assert "no model.onnx written: TensorFlow, tf2onnx or onnx is not importable" in done.stderr
        # Where TensorFlow is installed, export_saved_model adds the serving signatures.
        export.export_saved_model(loaded, info, tmp_path / "saved_model")
        serving = tf.saved_model.load(str(tmp_path / "saved_model"))
    else:
        assert info["saved_model"] == "saved_model" and info["saved_model_missing"] is None
        assert {"saved_model/", "serving/", "model.onnx"} <= set(info["files"]) and info["onnx_missing"] is None
        serving = tf.saved_model.load(str(folder / "saved_model"))
    from_bytes = serving.signatures["serve_image_bytes"](images=tf.constant(IMAGES))["embeddings"]
    np.testing.assert_allclose(from_bytes.numpy(), jax_embeddings, atol=1e-5)
    from_pixels = serving.signatures["serve"](images=tf.constant(pixels))["embeddings"]
    np.testing.assert_allclose(from_pixels.numpy(), jax_embeddings, atol=1e-5)


def test_a_model_ending_in_the_earlier_l2normalize_layer_still_loads(tmp_path):
    """Model files written before the built-in UnitNormalization load through load_model_artifact."""
    model = build_embedding_model((32, 32, 3), 16, "small_cnn")
    earlier = keras.Model(model.input, L2Normalize(name="l2_normalize")(model.get_layer("embedding_dense").output),
                          name=model.name)
    export.save_model_artifact(earlier, tmp_path / "model", export.artifact_metadata(CONFIG, 1), HISTORY)
    loaded, metadata = export.load_model_artifact(tmp_path / "model")
    assert isinstance(loaded.layers[-1], L2Normalize)
    expected = _reference_embeddings(model, IMAGES)          # the same weights, today's final layer
    np.testing.assert_allclose(export.embed_images(loaded, metadata, IMAGES), expected, atol=1e-5)


def test_load_errors_name_the_file(saved, tmp_path):
    _, folder = saved
    with pytest.raises(InputError, match="model folder not found"):
        export.load_model_artifact(tmp_path / "nope")

    def copy(name):
        target = tmp_path / name
        shutil.copytree(folder, target)
        return target

    no_json = copy("no-json")
    (no_json / "model.json").unlink()
    with pytest.raises(InputError, match=r"no-json/model.json: file not found"):
        export.load_model_artifact(no_json)
    bad_json = copy("bad-json")
    (bad_json / "model.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad-json/model.json: not valid JSON"):
        export.load_model_artifact(bad_json)
    no_model = copy("no-model")
    (no_model / "model.keras").unlink()
    with pytest.raises(InputError, match=r"no-model/model.keras: model file named in model.json not found"):
        export.load_model_artifact(no_model)
    corrupt = copy("corrupt")
    (corrupt / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(InputError, match=r"corrupt/model.keras: the model file is damaged or truncated \(14 bytes, "
                                         r"not a complete .keras zip archive"):
        export.load_model_artifact(corrupt)

    def edit(name, change):
        target = copy(name)
        info = json.loads((target / "model.json").read_text())
        change(info)
        (target / "model.json").write_text(json.dumps(info))
        return target

    with pytest.raises(InputError, match="preprocessing version 'other-v9'"):
        export.load_model_artifact(edit("version", lambda i: i["preprocessing"].update(version="other-v9")))
    with pytest.raises(InputError, match="16-D embeddings but model.json says 32"):
        export.load_model_artifact(edit("dim", lambda i: i.update(embedding_dim=32)))
    with pytest.raises(InputError, match=r"distance.name must be one of squared_l2, l2, cosine, got \{\}"):
        export.load_model_artifact(edit("distance", lambda i: i.update(distance={})))
    with pytest.raises(InputError, match=r"distance.name must be one of squared_l2, l2, cosine, got \{'name': 'l1'"):
        export.load_model_artifact(edit("l1", lambda i: i["distance"].update(name="l1")))
    with pytest.raises(InputError, match="missing key 'preprocessing'"):
        export.load_model_artifact(edit("nopre", lambda i: i.pop("preprocessing")))


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.01])
def test_a_truncated_model_file_is_named_damaged(saved, tmp_path, keep):
    """Keras reports a truncated .keras file as "File not found"; the error says what it is."""
    _, folder = saved
    target = tmp_path / "truncated"
    shutil.copytree(folder, target)
    data = (target / "model.keras").read_bytes()
    (target / "model.keras").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(InputError, match=rf"^{target}/model\.keras: the model file is damaged or truncated "
                                         rf"\({int(len(data) * keep):,} bytes, not a complete \.keras zip archive: "
                                         r".*\); copy it again from the train step's output$"):
        export.load_model_artifact(target)


def test_a_model_file_with_a_corrupted_member_is_named_damaged(saved, tmp_path):
    """Bytes flipped inside a member: the zip's directory is intact, the member's CRC is not."""
    import zipfile

    _, folder = saved
    target = tmp_path / "flipped"
    shutil.copytree(folder, target)
    path = target / "model.keras"
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"^{path}: the model file is damaged"):
        export.load_model_artifact(target)


def test_a_model_json_of_an_earlier_version_with_distance_squared_still_loads(saved, tmp_path):
    _, folder = saved
    for squared, name in ((True, "squared_l2"), (False, "l2")):
        target = tmp_path / name
        shutil.copytree(folder, target)
        info = json.loads((target / "model.json").read_text())
        info["distance"] = {"squared": squared, "definition": "...", "margin": 0.5}     # as written before
        (target / "model.json").write_text(json.dumps(info))
        assert export.distance_of(export.load_model_artifact(target)[1]) == name


def test_the_distance_is_the_objectives_by_name():
    for squared, name in ((True, "squared_l2"), (False, "l2")):
        for loss in ("batch_all", "batch_hard", "semi_hard"):
            metadata = export.artifact_metadata(TrainConfig(loss=loss, squared=squared, margin=0.3), 1)
            assert metadata["distance"] == {"name": name, "definition": export.DISTANCE_DEFINITIONS[name],
                                            "margin": 0.3}
            assert export.distance_of(metadata) == name
    assert export.distance_of({"distance": {"name": "cosine"}}) == "cosine"
    assert export.distance_of({"distance": {"name": "l1"}}) is None
    assert export.distance_of({"distance": {"squared": "yes"}}) is None and export.distance_of({}) is None


def test_save_is_checked_and_atomic(saved, tmp_path):
    model, folder = saved
    with pytest.raises(InputError, match="lacks trained_steps"):
        metadata = export.artifact_metadata(CONFIG, 1)
        del metadata["trained_steps"]
        export.save_model_artifact(model, tmp_path / "m", metadata, HISTORY)
    with pytest.raises(InputError, match="does not match preprocessing image_size 64"):
        export.save_model_artifact(model, tmp_path / "m", export.artifact_metadata(
            TrainConfig(architecture="small_cnn", image_size=64), 1), HISTORY)
    # A failure while writing leaves an existing folder as it was.
    target = tmp_path / "existing"
    shutil.copytree(folder, target)
    before = (target / "model.json").read_text()
    with pytest.raises(TypeError):
        export.save_model_artifact(model, target, export.artifact_metadata(CONFIG, 99), {"train": [object()]})
    assert (target / "model.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    # A folder that is not a model written by train is never replaced.
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"work: refusing to replace it"):
        export.save_model_artifact(model, work, export.artifact_metadata(CONFIG, 1), HISTORY)
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    # An earlier model is.
    export.save_model_artifact(model, target, export.artifact_metadata(CONFIG, 99, start_step=90), HISTORY)
    assert json.loads((target / "model.json").read_text())["start_step"] == 90


def test_plot_curves_without_validation(tmp_path):
    export.plot_curves({"train": HISTORY["train"], "val": []}, tmp_path / "c.png")
    export.plot_curves({"train": [], "val": []}, tmp_path / "empty.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "empty.png").is_file()


def test_model_json_records_the_training_images_alignment(tmp_path):
    """train passes dataset_alignment(images) to artifact_metadata: the align step's entry, or method none."""
    entry = {"method": "mtcnn", "detector": "mtcnn 1.0.0", "size": 112, "template": [[38.3, 51.7]] * 5,
             "margin": "ArcFace 112x112 five-point template"}
    assert export.artifact_metadata(CONFIG, 1)["alignment"] == {"method": "none"}
    assert export.artifact_metadata(CONFIG, 1, alignment=entry)["alignment"] == entry

    dataset = tmp_path / "images"
    dataset.mkdir()
    assert export.dataset_alignment(dataset) == {"method": "none"}              # no dataset.json
    (dataset / "dataset.json").write_text(json.dumps({"images": 3, "identities": 2}))
    assert export.dataset_alignment(dataset) == {"method": "none"}              # extract's dataset.json
    (dataset / "dataset.json").write_text(json.dumps({"images": 3, "alignment": entry}))
    assert export.dataset_alignment(dataset) == entry
    (dataset / "dataset.json").write_text(json.dumps({"alignment": {"method": "dlib", "size": 112}}))
    with pytest.raises(InputError, match=r"images/dataset\.json: 'alignment': alignment must be an object "
                                         r"with method \"none\" or \"mtcnn\""):
        export.dataset_alignment(dataset)

    assert export.alignment_of({"alignment": entry}) == entry
    assert export.alignment_of({"alignment": {"method": "none"}}) is None
    assert export.alignment_of({}) is None                                      # model.json of earlier versions
    with pytest.raises(InputError, match=r"m/model\.json: 'alignment': .*needs an integer size >= 1"):
        export.alignment_of({"alignment": {"method": "mtcnn", "size": "112"}}, "m/model.json")


def test_the_alignment_entry_survives_the_save_load_round_trip(tmp_path):
    entry = {"method": "mtcnn", "detector": "mtcnn 1.0.0", "size": 96, "template": [[32.8, 44.3]] * 5}
    model = build_embedding_model((32, 32, 3), 16, architecture="small_cnn")
    export.save_model_artifact(model, tmp_path / "m", export.artifact_metadata(CONFIG, 1, alignment=entry), HISTORY)
    _, metadata = export.load_model_artifact(tmp_path / "m")
    assert metadata["alignment"] == entry
    assert export.alignment_of(metadata) == entry
