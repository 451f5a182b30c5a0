"""Tests of the input pipeline: split loading from shards, P x K sampling, preprocessing, tf.data."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from facenet_kfp.errors import InputError
from facenet_kfp.numpy_input import PKSampler
from tests.builders import COMPLETED, TRAIN, VAL, build_tiny_dataset, face_image

tf = pytest.importorskip("tensorflow")
tf_input = pytest.importorskip("facenet_kfp.tf_input")

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- load_split_images

def test_load_split_images_reads_only_the_split(tiny):
    images, labels, keys, synthetic = tf_input.load_split_images(
        tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train")
    expected = {tiny["ids"][n]: c + COMPLETED.get(n, 0) for n, c in TRAIN.items()}
    assert dict(Counter(labels.tolist())) == expected
    assert labels.dtype == np.int32 and len(images) == len(keys) == len(synthetic) == len(labels)
    assert sum(synthetic) == sum(COMPLETED.values())
    assert all(("_000C" in key) == flag for key, flag in zip(keys, synthetic))
    # Bytes are the stored JPEGs.
    first = keys.index("Ann_A/Ann_A_0001.jpg")
    assert images[first] == face_image(tiny["ids"]["Ann_A"], 0)

    real_only = tf_input.load_split_images(tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"],
                                       "train", include_synthetic=False)
    assert len(real_only[0]) == sum(TRAIN.values()) and not any(real_only[3])
    val = tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], tiny["splits"], "val")
    assert sorted(set(val[1].tolist())) == sorted(tiny["ids"][n] for n in VAL)


def test_load_split_images_errors(tiny, tmp_path):
    with pytest.raises(InputError, match="split must be one of"):
        tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], tiny["splits"], "training")
    with pytest.raises(InputError, match="dataset folder not found"):
        tf_input.load_split_images(tmp_path / "nope", None, tiny["labels"], tiny["splits"], "train")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("Ann_A\t9\n")
    with pytest.raises(InputError, match=r"Ann_A .*5 real images.*9"):
        tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], splits, "train")
    (splits / "train.txt").write_text("Zed_Z\t1\n")
    with pytest.raises(InputError, match=r"labels.json.*Zed_Z"):
        tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], splits, "train")
    # The completion folder given as the real dataset: its rows are generated images.
    with pytest.raises(InputError, match="generated image"):
        tf_input.load_split_images(tiny["completion"], None, tiny["labels"], tiny["splits"], "train")


# ----------------------------------------------------------------------------- PKSampler

def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_pk_batches_structure_and_determinism():
    labels = _labels([5, 2, 8, 4, 1, 6, 3, 4, 7])
    sampler = PKSampler(labels, p=3, k=4, seed=7)
    stream = sampler.batches()
    batches = [next(stream) for _ in range(30)]
    for batch in batches:
        assert batch.shape == (12,)
        groups = labels[batch].reshape(3, 4)
        assert (groups == groups[:, :1]).all()                 # K rows per identity, identity-major
        assert len(set(groups[:, 0])) == 3                      # P distinct identities
        for g, ident in zip(batch.reshape(3, 4), groups[:, 0]):
            n = int(np.sum(labels == ident))
            if n >= 4:
                assert len(set(g.tolist())) == 4                # distinct images when there are K
            else:
                assert set(g.tolist()) == set(np.flatnonzero(labels == ident).tolist())   # all, + repeats
    again = PKSampler(labels, p=3, k=4, seed=7).batches()
    assert all((next(again) == b).all() for b in batches)
    other = PKSampler(labels, p=3, k=4, seed=8).batches()
    assert any((next(other) != b).any() for b in batches)
    # Resuming after n batches continues the same stream.
    resumed = sampler.batches(start=11)
    assert all((next(resumed) == b).all() for b in batches[11:20])


def test_pk_identities_without_replacement_per_epoch():
    labels = _labels([6] * 10)
    stream = PKSampler(labels, p=3, k=4, seed=0).batches()
    # 10 identities / P=3: 3 batches per epoch, one identity left over each epoch.
    left_over = set()
    for _ in range(8):
        epoch = np.concatenate([labels[next(stream)].reshape(3, 4)[:, 0] for _ in range(3)])
        assert len(set(epoch.tolist())) == 9
        left_over |= set(range(10)) - set(epoch.tolist())
    assert len(left_over) > 1                                  # a different identity is dropped each epoch
    # Within an identity every image is used once per cycle: from the start, usage differs by at most one.
    stream = PKSampler(labels, p=3, k=4, seed=0).batches()
    usage = Counter(np.concatenate([next(stream) for _ in range(301)]).tolist())
    for ident in range(10):
        counts = [usage[i] for i in np.flatnonzero(labels == ident)]
        assert max(counts) - min(counts) <= 1, counts


def test_pk_uses_completion_images(tiny):
    images, labels, keys, synthetic = tf_input.load_split_images(
        tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train")
    stream = PKSampler(labels, p=4, k=4, seed=1).batches()
    used = set(np.concatenate([next(stream) for _ in range(40)]).tolist())
    assert set(np.flatnonzero(synthetic).tolist()) <= used
    assert used == set(range(len(labels)))


def test_pk_errors():
    with pytest.raises(InputError, match="at least p=4 identities"):
        PKSampler(_labels([3, 3, 3]), p=4, k=2, seed=0)
    with pytest.raises(InputError, match="non-empty"):
        PKSampler(np.array([], dtype=np.int32), p=2, k=2, seed=0)


# ----------------------------------------------------------------------------- preprocessing

def _reference_preprocess(jpeg: bytes, image_size: int, crop_fraction: float) -> np.ndarray:
    """Slow, obvious reference of the no-augmentation path: centre crop, area resize, [-1, 1]."""
    pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float64)
    h, w = pixels.shape[:2]
    bh, bw = int(round(crop_fraction * h)), int(round(crop_fraction * w))
    top, left = int(round(h / 2 - bh / 2)), int(round(w / 2 - bw / 2))
    crop = pixels[top:top + bh, left:left + bw]
    out = np.zeros((image_size, image_size, 3))
    # Area resize with an integer factor = mean over each block.
    fy, fx = bh // image_size, bw // image_size
    for i in range(image_size):
        for j in range(image_size):
            out[i, j] = crop[i * fy:(i + 1) * fy, j * fx:(j + 1) * fx].mean(axis=(0, 1))
    return out / 255.0 * 2.0 - 1.0


def test_preprocess_matches_reference_and_is_deterministic():
    jpeg = face_image(3, 0, size=100)
    out = tf_input.preprocess_image(jpeg, 16, 0.64)               # 64x64 centre crop, 4x4 blocks
    assert out.shape == (16, 16, 3) and out.dtype == tf.float32
    reference = _reference_preprocess(jpeg, 16, 0.64)
    # JPEGs are decoded only inside the crop window; libjpeg's chroma upsampling then
    # differs from a full decode by a grey level or two at the window's edge pixels.
    close = np.isclose(out.numpy(), reference, atol=1e-5)
    assert close.mean() > 0.9
    np.testing.assert_allclose(out.numpy(), reference, atol=2.5 * 2 / 255)
    np.testing.assert_array_equal(out.numpy(), tf_input.preprocess_image(jpeg, 16, 0.64).numpy())
    # PNG input takes the generic decoder (full decode, then crop): exactly the reference.
    buffer = io.BytesIO()
    Image.fromarray(tf.io.decode_jpeg(jpeg, channels=3).numpy()).save(buffer, "PNG")
    np.testing.assert_allclose(tf_input.preprocess_image(buffer.getvalue(), 16, 0.64).numpy(), reference,
                               atol=1e-5)


def test_preprocess_augmentation_is_seeded_and_bounded():
    jpeg = face_image(5, 1, size=100)
    seed = tf.constant([3, 4], tf.int64)
    a = tf_input.preprocess_image(jpeg, 24, 0.6, augment=True, seed=seed).numpy()
    b = tf_input.preprocess_image(jpeg, 24, 0.6, augment=True, seed=seed).numpy()
    np.testing.assert_array_equal(a, b)
    plain = tf_input.preprocess_image(jpeg, 24, 0.6).numpy()
    variants = [tf_input.preprocess_image(jpeg, 24, 0.6, augment=True, seed=tf.constant([3, s], tf.int64)).numpy()
                for s in range(12)]
    assert all(v.min() >= -1.0 and v.max() <= 1.0 for v in variants)
    assert sum(not np.allclose(v, plain) for v in variants) >= 10
    # Mirroring happens for some seeds: the mean of a mirrored image stays close, its columns flip.
    assert any(np.abs(v - plain[:, ::-1]).mean() < np.abs(v - plain).mean() for v in variants)
    # crop_fraction 1 with jitter stays inside the image (no padding, no error).
    full = tf_input.preprocess_image(jpeg, 24, 1.0, augment=True, seed=seed).numpy()
    assert np.isfinite(full).all()


# ----------------------------------------------------------------------------- datasets

def test_make_train_dataset_batches(tiny):
    images, labels, _, _ = tf_input.load_split_images(
        tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train")
    ds = tf_input.make_train_dataset(images, labels, p=4, k=4, image_size=32, crop_fraction=0.8,
                                 augment=True, seed=3)
    got = list(ds.take(3))
    sampler = PKSampler(labels, 4, 4, 3).batches()
    for batch_images, batch_labels in got:
        assert batch_images.shape == (16, 32, 32, 3) and batch_images.dtype == tf.float32
        assert batch_labels.dtype == tf.int32
        assert -1.0 <= float(tf.reduce_min(batch_images)) and float(tf.reduce_max(batch_images)) <= 1.0
        np.testing.assert_array_equal(batch_labels.numpy(), labels[next(sampler)])
    # Same seed, same batches (augmentation included); start_batch resumes the stream.
    again = list(tf_input.make_train_dataset(images, labels, 4, 4, 32, 0.8, True, 3).take(3))
    for (a, _), (b, _) in zip(got, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    resumed = next(iter(tf_input.make_train_dataset(images, labels, 4, 4, 32, 0.8, True, 3, start_batch=2)))
    np.testing.assert_array_equal(resumed[0].numpy(), got[2][0].numpy())


def test_uint8_batches_are_the_float_batches_quantised_as_on_the_jax_path(tiny):
    from facenet_kfp.numpy_input import from_uint8, to_uint8

    images, labels, _, _ = tf_input.load_split_images(
        tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train")
    floats = list(tf_input.make_train_dataset(images, labels, 4, 4, 32, 0.8, True, 3).take(2))
    small = list(tf_input.make_train_dataset(images, labels, 4, 4, 32, 0.8, True, 3, pixels="uint8").take(2))
    for (x, y), (u, v) in zip(floats, small):
        assert u.dtype == tf.uint8 and u.shape == x.shape
        np.testing.assert_array_equal(v.numpy(), y.numpy())
        np.testing.assert_array_equal(u.numpy(), to_uint8(x.numpy()))
        assert np.max(np.abs(from_uint8(u.numpy()) - x.numpy())) <= 0.5 / 127.5 + 1e-6
    with pytest.raises(InputError, match="pixels must be float32 or uint8, got 'float16'"):
        tf_input.make_train_dataset(images, labels, 4, 4, 32, 0.8, True, 3, pixels="float16")


def test_make_embedding_dataset_is_ordered(tiny):
    images, _, _, _ = tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], tiny["splits"], "val")
    batches = list(tf_input.make_embedding_dataset(images, 32, 0.8, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    stacked = np.concatenate([b.numpy() for b in batches])
    for i, jpeg in enumerate(images):
        np.testing.assert_array_equal(stacked[i], tf_input.preprocess_image(jpeg, 32, 0.8).numpy())


def test_preprocess_batch_gives_the_embedding_datasets_pixels(tiny):
    """The cached one-batch function (served requests, verified pairs) and the tf.data pipeline (long lists)
    preprocess alike: to float32 rounding, in order, for two sizes (each its own traced function)."""
    images, _, _, _ = tf_input.load_split_images(tiny["dataset"], None, tiny["labels"], tiny["splits"], "val")
    for size, crop in ((32, 0.8), (24, 1.0)):
        expected = np.concatenate([b.numpy() for b in tf_input.make_embedding_dataset(images, size, crop, 4)])
        got = tf_input.preprocess_batch(images, size, crop)
        assert got.shape == (len(images), size, size, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=2.5e-7)
        # Reversed input, reversed output: each image keeps its own pixels.
        np.testing.assert_allclose(tf_input.preprocess_batch(images[::-1], size, crop), expected[::-1], rtol=0,
                                   atol=2.5e-7)
