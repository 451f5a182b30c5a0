"""Embedding models: unit-norm outputs, no collapse at init, OpenFace size, .keras round trip, mixed precision."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

from facenet_kfp import config
from facenet_kfp.errors import InputError
from facenet_kfp.model import (
    ARCHITECTURES,
    NN4_SMALL2_PARAMETERS,
    NN4_SMALL2_TRAINABLE,
    L2Normalize,
    build_embedding_model,
)

SHAPES = {"nn4_small2": (96, 96, 3), "small_cnn": (64, 64, 3)}


def face_like_images(n, shape, seed=0):
    """Images that differ in structure, not just in pixel noise (which global pooling averages away)."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    coarse = rng.random((n, 4, 4, c)).astype(np.float32)
    # Blow each 4x4 pattern up to the full size, plus a little pixel noise.
    images = np.repeat(np.repeat(coarse, -(-h // 4), axis=1), -(-w // 4), axis=2)[:, :h, :w]
    return images + 0.05 * rng.standard_normal((n, h, w, c)).astype(np.float32)


def embed(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def mean_pairwise_distance(emb):
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    return d[np.triu_indices(len(emb), 1)].mean()


def test_architectures_match_the_config_choices():
    assert set(ARCHITECTURES) == set(config.ARCHITECTURES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_embeddings_have_unit_norm_and_do_not_collapse(architecture):
    keras.utils.set_random_seed(0)
    model = build_embedding_model(SHAPES[architecture], 64, architecture)
    assert model.name == f"facenet_{architecture}"
    n = 2 if architecture == "nn4_small2" else 8
    emb = embed(model, face_like_images(n, SHAPES[architecture]))
    assert emb.shape == (n, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The original TF1 implementation's ReLU + whole-batch normalisation gave near-identical embeddings; a
    # per-embedding normalisation of a linear layer spreads different images apart.
    assert mean_pairwise_distance(emb) > 0.05
    # No ReLU before the normalisation: components take both signs.
    assert (emb < 0).any() and (emb > 0).any()


@pytest.mark.parametrize("shape", [(32, 32, 3), (48, 40, 1), (100, 72, 3)])
def test_small_cnn_accepts_any_input_of_at_least_32(shape):
    model = build_embedding_model(shape, 16, "small_cnn")
    emb = embed(model, face_like_images(3, shape))
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_nn4_small2_has_openface_size():
    model = build_embedding_model((96, 96, 3), 128, "nn4_small2")
    assert abs(model.count_params() - NN4_SMALL2_PARAMETERS) <= 0.05 * NN4_SMALL2_PARAMETERS
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert abs(trainable - NN4_SMALL2_PARAMETERS) <= 0.05 * NN4_SMALL2_PARAMETERS
    # The final normalisation has no weights: the documented counts hold exactly.
    assert trainable == NN4_SMALL2_TRAINABLE == 3_729_312
    assert model.count_params() - trainable == 9_312          # batch-norm moving means and variances
    # 96x96 ends as 3x3x736 before the global pooling, as in OpenFace.
    assert tuple(model.get_layer("inception_5b_concat").output.shape) == (None, 3, 3, 736)
    assert tuple(model.get_layer("inception_3c_concat").output.shape) == (None, 6, 6, 640)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_keras_file_round_trip_gives_the_same_embeddings(architecture, tmp_path):
    keras.utils.set_random_seed(1)
    model = build_embedding_model(SHAPES[architecture], 32, architecture)
    images = face_like_images(2, SHAPES[architecture], seed=1)
    path = tmp_path / "model.keras"
    model.save(path)
    # Only built-in layers in the file, so plain Keras loads it (tests/test_export.py loads it in a
    # Python that never imports facenet_kfp, on both backends).
    with zipfile.ZipFile(path) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    assert all(layer["module"].startswith("keras.") for layer in layers)
    assert "facenet_kfp" not in json.dumps(layers)
    loaded = keras.saving.load_model(path)
    assert loaded.name == model.name
    assert isinstance(loaded.layers[-1], keras.layers.UnitNormalization)
    assert loaded.layers[-1].dtype_policy.name == "float32"
    np.testing.assert_allclose(embed(loaded, images), embed(model, images), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_outputs_float32_unit_vectors(policy, tmp_path):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_embedding_model((64, 64, 3), 32, "small_cnn")
        assert model.get_layer("embedding_dense").compute_dtype == policy.removeprefix("mixed_")
        emb = model(face_like_images(4, (64, 64, 3)), training=False)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    emb = keras.ops.convert_to_numpy(emb)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model.output.dtype == "float32"
    assert model.layers[-1].dtype_policy.name == "float32"
    # The float32 normalisation is part of the saved config: loaded under the default policy, the
    # final layer still computes in float32 while the trunk keeps the mixed policy it was saved with.
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].dtype_policy.name == "float32"
    assert loaded.get_layer("embedding_dense").dtype_policy.name == policy


def test_normalisation_is_per_embedding():
    x = np.array([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0]], np.float32)
    model = build_embedding_model((32, 32, 3), 2, "small_cnn")
    for layer in (model.layers[-1], L2Normalize()):       # today's final layer and the earlier one
        got = keras.ops.convert_to_numpy(layer(x))
        # Each row on its own (the original TF1 implementation normalised the whole batch); a zero row stays 0.
        np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]], atol=1e-7)
    # Models saved with the earlier layer give the same embeddings as today's.
    scales = np.repeat([1e-3, 1.0, 1e3, 1.0], 4)[:, None]
    rows = (np.random.default_rng(0).normal(size=(16, 8)) * scales).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[-1](rows)),
                               keras.ops.convert_to_numpy(L2Normalize()(rows)), rtol=1e-6, atol=1e-7)
    layer = L2Normalize.from_config(L2Normalize(axis=1, epsilon=1e-6, name="n").get_config())
    assert (layer.axis, layer.epsilon, layer.name) == (1, 1e-6, "n")


@pytest.mark.parametrize("kwargs,match", [
    ({"architecture": "nn2"}, "nn2"),
    ({"embedding_dim": 0}, "embedding_dim.*0"),
    ({"embedding_dim": 12.5}, "12.5"),
    ({"embedding_dim": True}, "True"),
    ({"input_shape": (31, 64, 3), "architecture": "small_cnn"}, r"\(31, 64, 3\).*at least 32"),
    ({"input_shape": (96, 16, 3)}, r"\(96, 16, 3\)"),
    ({"input_shape": (96, 96)}, r"\(96, 96\)"),
    ({"input_shape": (96, 96, 0)}, r"\(96, 96, 0\)"),
    ({"input_shape": "96x96"}, "96x96"),
])
def test_invalid_arguments_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        build_embedding_model(**kwargs)


def test_calibrate_batch_norm_sets_the_mean_of_batch_statistics():
    """Two batch norms in a chain, against a NumPy forward pass in training mode (each batch normalised by its
    own statistics): the moving statistics become the mean over batches of each layer's batch mean and
    (biased) variance; the weights stay as they were."""
    from facenet_kfp.model import batch_norm_layers, calibrate_batch_norm

    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="d1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(2, name="d2")(x)
    outputs = keras.layers.BatchNormalization(epsilon=1e-5, name="bn2")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in batch_norm_layers(model):          # non-trivial gamma and beta
        layer.gamma.assign(rng.uniform(0.5, 2, layer.gamma.shape).astype(np.float32))
        layer.beta.assign(rng.normal(size=layer.beta.shape).astype(np.float32))
    kept = {name: [w.copy() for w in model.get_layer(name).get_weights()[:2]]
            for name in ("d1", "d2", "bn1", "bn2")}
    batches = [(rng.normal(size=(8, 3)) * (i + 1) + i).astype(np.float32) for i in range(3)]

    w1, b1 = (np.float64(v) for v in model.get_layer("d1").get_weights())
    w2, b2 = (np.float64(v) for v in model.get_layer("d2").get_weights())
    g1, be1 = (np.float64(v) for v in model.get_layer("bn1").get_weights()[:2])
    stats1, stats2 = [], []
    for batch in batches:
        h = batch @ w1 + b1
        stats1.append((h.mean(0), h.var(0)))
        h = np.maximum(g1 * (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) + be1, 0) @ w2 + b2
        stats2.append((h.mean(0), h.var(0)))

    assert calibrate_batch_norm(model, batches) == 3
    for name, stats in (("bn1", stats1), ("bn2", stats2)):
        layer = model.get_layer(name)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean),
                                   np.mean([m for m, _ in stats], axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_variance),
                                   np.mean([v for _, v in stats], axis=0), rtol=1e-4, atol=1e-5)
    trained = {name: model.get_layer(name).get_weights()[:2] for name in ("d1", "d2", "bn1", "bn2")}
    for name, (a, b) in trained.items():        # kernels and biases, gammas and betas: as before
        before_a, before_b = kept[name]
        np.testing.assert_array_equal(a, before_a)
        np.testing.assert_array_equal(b, before_b)
    # No batches, or no batch norm: nothing changes.
    before = [w.copy() for w in model.get_weights()]
    assert calibrate_batch_norm(model, []) == 0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert calibrate_batch_norm(plain, batches) == 0
