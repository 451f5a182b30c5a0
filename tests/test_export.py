"""Tests of the model artifact: save -> load round trip, embeddings, SavedModel signatures, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError

tf = pytest.importorskip("tensorflow")
export = pytest.importorskip("facenet_kfp.export")

from facenet_kfp.data import preprocess_image  # noqa: E402  (after the importorskip guards)
from facenet_kfp.model import build_embedding_model  # noqa: E402
from tests.test_data import face_image  # noqa: E402

CONFIG = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.7, embedding_dim=16,
                     loss="batch_all", margin=0.5, squared=False)
HISTORY = {"train": [{"step": s, "loss": 1.0 / s, "fraction_positive_triplets": 0.5 / s,
                      "mean_positive_distance": 0.5, "mean_negative_distance": 1.0 + s / 100}
                     for s in (10, 20, 30)],
           "val": [{"step": 30, "loss": 0.1, "fraction_positive_triplets": 0.02,
                    "mean_positive_distance": 0.6, "mean_negative_distance": 1.1}]}
IMAGES = [face_image(i % 5, i) for i in range(7)]


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
    assert info["architecture"] == "small_cnn" and info["input_shape"] == [32, 32, 3]
    assert info["embedding_dim"] == 16 and info["trained_steps"] == 30 and info["note"] == "test"
    assert info["start_step"] == 0                                     # trained from scratch
    assert info["loss"] == "batch_all" and info["margin"] == 0.5
    assert info["distance"]["squared"] is False and info["distance"]["definition"].startswith("plain L2")
    assert info["preprocessing"] == {"version": "centre-crop-v1", "image_size": 32, "crop_fraction": 0.7,
                                     "scale": "[-1,1]"}
    assert info["backend"] == "tensorflow" and info["keras_version"] and info["created"].endswith("+00:00")
    assert info["saved_model"] == "saved_model"
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
    with pytest.raises(InputError, match=r"corrupt/model.keras: cannot load the Keras model"):
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
    with pytest.raises(InputError, match="distance.squared must be a boolean"):
        export.load_model_artifact(edit("distance", lambda i: i.update(distance={})))
    with pytest.raises(InputError, match="missing key 'preprocessing'"):
        export.load_model_artifact(edit("nopre", lambda i: i.pop("preprocessing")))


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
