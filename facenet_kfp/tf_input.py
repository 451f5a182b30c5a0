"""TensorFlow input pipeline: split images from packed shards, P x K batches, tf.data preprocessing.

Everything that feeds images to a model goes through `preprocess_image`, so
training, validation, evaluation and serving see the same pixels:

1. decode the JPEG/PNG bytes to RGB uint8 (any size; LFW is 250 x 250);
2. keep the centre box of `crop_fraction` of the height and `crop_fraction` of
   the width: an H x W image of any size gives a round(f*H) x round(f*W) box,
   at least 1 pixel (LFW faces are centred, so 0.6 keeps the face and drops
   most background). The box has the image's aspect, and step 4 makes it
   square: a non-square image is stretched. Face crops that are square to
   begin with avoid that (VGGFace2's box cuts, made by extract);
3. training only: shift that box by up to +-6% of its size and scale it by
   up to +-6% (crop jitter), kept inside the image;
4. resize the box to `image_size` x `image_size` (area averaging);
5. training only: mirror left-right with probability 1/2, add a brightness
   offset uniform in [-0.1, 0.1] (on the [0, 1] scale); clip to [0, 1];
6. scale to [-1, 1]: x = 2 * pixel / 255 - 1.

This is `PREPROCESSING_VERSION`; the model artifact records it with the size
and crop so a loader can refuse a model preprocessed differently.

Training batches are P x K: P distinct identities, K images each, laid out
identity by identity (rows i*K .. i*K+K-1 share a label). Online triplet
mining needs that structure: a batch of consecutive images of one large
identity (how the original TF1 implementation fed its input) has no negatives
and gives zero loss.

The constants of this definition, the split index and `PKSampler` live in
`facenet_kfp.preprocess` and `facenet_kfp.numpy_input`, the TensorFlow-free pipeline that implements the same
preprocessing with Pillow and NumPy; they are re-exported here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from facenet_kfp.errors import InputError
from facenet_kfp.numpy_input import PKSampler, make_sampler, open_split  # noqa: F401
from facenet_kfp.preprocess import BRIGHTNESS, JITTER, PREPROCESSING_VERSION  # noqa: F401
from facenet_kfp.splits import SPLITS  # noqa: F401
from facenet_kfp.progress import Progress


# ----------------------------------------------------------------------------- preprocessing

def preprocess_image(image_bytes: tf.Tensor, image_size: int, crop_fraction: float,
                     augment: bool = False, seed: tf.Tensor | None = None) -> tf.Tensor:
    """One encoded image -> float32 [image_size, image_size, 3] in [-1, 1] (see module docstring).

    `seed` is a stateless-RNG seed, an int tensor of shape [2]; the same bytes
    and seed give the same augmented image. With `augment` and no seed a
    random one is drawn. Without `augment` the result is deterministic and the
    seed is ignored.
    """
    if augment:
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)

    def crop_box(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(top, left, height, width) of the crop inside an image of `shape` [H, W, ...]."""
        height = tf.cast(shape[0], tf.float32)
        width = tf.cast(shape[1], tf.float32)
        crop_h, crop_w = crop_fraction * height, crop_fraction * width
        centre_y, centre_x = height / 2.0, width / 2.0
        if augment:
            scale = 1.0 + tf.random.stateless_uniform([], seeds[0], -JITTER, JITTER)
            crop_h = tf.minimum(crop_h * scale, height)
            crop_w = tf.minimum(crop_w * scale, width)
            shift = tf.random.stateless_uniform([2], seeds[1], -JITTER, JITTER)
            centre_y += shift[0] * crop_h
            centre_x += shift[1] * crop_w
        # Integer box inside the image: a shifted box is pushed back in, never padded.
        box_h = tf.clip_by_value(tf.cast(tf.round(crop_h), tf.int32), 1, shape[0])
        box_w = tf.clip_by_value(tf.cast(tf.round(crop_w), tf.int32), 1, shape[1])
        top = tf.cast(tf.round(centre_y - tf.cast(box_h, tf.float32) / 2.0), tf.int32)
        left = tf.cast(tf.round(centre_x - tf.cast(box_w, tf.float32) / 2.0), tf.int32)
        return (tf.clip_by_value(top, 0, shape[0] - box_h), tf.clip_by_value(left, 0, shape[1] - box_w),
                box_h, box_w)

    def decode_jpeg() -> tf.Tensor:
        # Decoding only the crop window is ~1.5x faster than decoding the whole image.
        top, left, box_h, box_w = crop_box(tf.io.extract_jpeg_shape(image_bytes))
        return tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, box_h, box_w]), channels=3)

    def decode_other() -> tf.Tensor:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        top, left, box_h, box_w = crop_box(tf.shape(image))
        return image[top:top + box_h, left:left + box_w, :]

    image = tf.cond(tf.io.is_jpeg(image_bytes), decode_jpeg, decode_other)
    # "area" averages the source pixels under each output pixel: antialiased when
    # shrinking (the usual case) and as cheap as bilinear, unlike antialias=True.
    image = tf.image.resize(image, [image_size, image_size], method="area") / 255.0
    if augment:
        image = tf.image.stateless_random_flip_left_right(image, seeds[2])
        image = tf.image.stateless_random_brightness(image, BRIGHTNESS, seeds[3])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = image * 2.0 - 1.0
    return tf.ensure_shape(image, [image_size, image_size, 3])


# ----------------------------------------------------------------------------- split images

def load_split_images(dataset_dir: str | os.PathLike, completion_dir: str | os.PathLike | None,
                      labels_dir: str | os.PathLike, splits_dir: str | os.PathLike, split: str,
                      include_synthetic: bool = True
                      ) -> tuple[list[bytes], np.ndarray, list[str], list[bool]]:
    """Encoded images of one split's identities, read from the packed shards into memory.

    Real images come from `dataset_dir` (the extracted dataset), generated
    ones from `completion_dir` when `include_synthetic` (None: no completion).
    Returns (image bytes, labels int32 [N] from `labels.json`, keys = the
    manifest `file` of each image, synthetic flags), grouped by identity in
    split order. Validation is `numpy_input.open_split`'s: every identity of the
    split must be in `labels.json` and have exactly the number of real images
    the split file records.
    """
    with open_split(dataset_dir, completion_dir, labels_dir, splits_dir, split, include_synthetic,
                    cache_bytes=0) as lazy:
        images: list[bytes] = []
        with Progress(f"reading {split} images", total=len(lazy), unit="images") as progress:
            for i in range(len(lazy)):
                images.append(lazy[i])
                progress.update()
        return images, lazy.labels, list(lazy.keys), lazy.synthetic.tolist()


# ----------------------------------------------------------------------------- tf.data

def make_train_dataset(images: Sequence[bytes], labels: np.ndarray, p: int, k: int, image_size: int,
                       crop_fraction: float, augment: bool, seed: int, start_batch: int = 0,
                       sampling: str = "pk", pixels: str = "float32") -> tf.data.Dataset:
    """Infinite P x K batches: (images float32 [P*K, S, S, 3] in [-1, 1], labels int32 [P*K]); P*K images
    drawn uniformly with sampling="uniform". With pixels="uint8" the images are uint8
    rint((x + 1) * 127.5), as `numpy_input.to_uint8` makes them (what a GPU is fed: a quarter of the
    bytes to copy; the trainer's step normalises them on the device).

    Indices come from `make_sampler(labels, p, k, seed, sampling).batches(start_batch)`; a
    Python generator gathers the encoded bytes of each batch (a list lookup,
    so no image tensor is embedded in the graph), then decoding and
    augmentation run in a parallel, order-preserving map. Image j of batch b
    is augmented with the stateless seed (seed, b * P * K + j), so a resumed
    run (start_batch = steps done) sees the same images as an uninterrupted one.
    """
    labels = np.asarray(labels, dtype=np.int32)
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} labels")
    sampler = make_sampler(labels, p, k, seed, sampling)
    batch_size = sampler.batch_size

    def generate():
        for b, idx in enumerate(sampler.batches(start_batch), start=start_batch):
            element = b * batch_size + np.arange(batch_size, dtype=np.int64)
            seeds = np.stack([np.full(batch_size, seed, dtype=np.int64), element], axis=1)
            yield np.array([images[i] for i in idx], dtype=object), labels[idx], seeds

    ds = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec([batch_size], tf.string),
        tf.TensorSpec([batch_size], tf.int32),
        tf.TensorSpec([batch_size, 2], tf.int64)))
    ds = ds.unbatch()
    ds = ds.map(lambda data, label, s: (preprocess_image(data, image_size, crop_fraction, augment, s), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pixels == "uint8":
        ds = ds.map(lambda x, label: (tf.cast(tf.round((tf.clip_by_value(x, -1.0, 1.0) + 1.0) * 127.5), tf.uint8),
                                      label), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif pixels != "float32":
        raise InputError(f"pixels must be float32 or uint8, got {pixels!r}")
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_embedding_dataset(images: Sequence[bytes], image_size: int, crop_fraction: float,
                           batch_size: int) -> tf.data.Dataset:
    """Ordered batches of preprocessed images (no augmentation): float32 [<=batch_size, S, S, 3].

    The last batch is smaller when len(images) is not a multiple of batch_size.
    """
    if batch_size <= 0:
        raise InputError(f"batch_size must be > 0, got {batch_size}")

    def generate():
        for start in range(0, len(images), batch_size):
            yield np.array(list(images[start:start + batch_size]), dtype=object)

    ds = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec([None], tf.string))
    ds = ds.unbatch()
    ds = ds.map(lambda data: preprocess_image(data, image_size, crop_fraction, augment=False),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


_BATCH_FUNCTIONS: dict[tuple[int, float], Any] = {}


def preprocess_batch(images: Sequence[bytes], image_size: int, crop_fraction: float) -> np.ndarray:
    """One batch of encoded images preprocessed as `make_embedding_dataset` does (no augmentation):
    float32 [N, S, S, 3], the same pixels to float32 rounding (graph
    optimisations of the two differ: at most 1.2e-7 seen, one unit in the last place).

    One traced function per (size, crop) is kept for the process, so a small
    batch (a served request, a verified pair) costs its decoding only, not the
    building of a tf.data pipeline (about 0.1 s a call).
    """
    key = (int(image_size), float(crop_fraction))
    function = _BATCH_FUNCTIONS.get(key)
    if function is None:
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def function(data):
            return tf.map_fn(lambda one: preprocess_image(one, key[0], key[1], augment=False), data,
                             fn_output_signature=tf.TensorSpec([key[0], key[0], 3], tf.float32))

        _BATCH_FUNCTIONS[key] = function
    return function(tf.constant(list(images), dtype=tf.string)).numpy()
