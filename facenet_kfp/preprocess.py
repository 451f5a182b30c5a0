"""Image preprocessing in Pillow/NumPy: the definition every path that feeds a model follows.

`preprocess_array` is the definition `tf_input.preprocess_image` implements
in TensorFlow for serving and for the tf.data path, step by step:

1. decode the JPEG/PNG bytes to RGB uint8 (grey and palette images expanded,
   alpha dropped, 16-bit samples reduced to their high byte);
2. keep the centre box of `crop_fraction` of the height and width;
3. training only: shift that box by up to +-6% of its size and scale it by
   up to +-6% (`JITTER`), kept inside the image;
4. resize the box to `image_size` x `image_size` by area averaging: output
   pixel i covers input span [i*s, (i+1)*s) with s = box / image_size, and
   averages the input pixels weighted by their overlap with it;
5. training only: mirror left-right with probability 1/2, add a brightness
   offset uniform in [-0.1, 0.1] (`BRIGHTNESS`, on the [0, 1] scale); clip;
6. scale to [-1, 1]: x = 2 * pixel / 255 - 1.

The box arithmetic follows TensorFlow's in float32 with round-half-to-even,
and the area resize is the same formula, so PNG inputs give the same pixels
as `tf_input.preprocess_image` to float precision. JPEGs differ by the decoder's
inverse DCT only: TensorFlow's default is libjpeg's fast integer one, Pillow
uses the accurate one (about one grey level on average).

Aligned faces. When the images were aligned (the align step; model.json's
``alignment``), each image is the aligned `size` x `size` crop of
`align.align_photo`, stored as a JPEG, and the network sees it through this
same definition: the centre box of `crop_fraction` of the aligned crop,
resized to `image_size`, with the same augmentation when training. Nothing
here depends on alignment, so the NumPy pipeline, tf.data, the SavedModel and
verify / embed (which align each photo the align step's way first) give the
same pixels for it, JPEG decoding aside as above (about two grey levels on
average for a 112 px crop, which the resize averages less than LFW's 250 px);
the parity tests check it on an aligned crop of a real photo.

Augmentation draws come from `numpy.random.default_rng((seed, batch))`, row j
for the image at position j, so batch n is the same whether a run got there
without a break or resumed at n.
"""

from __future__ import annotations

import functools

import numpy as np

from facenet_kfp.codec import decode_rgb
from facenet_kfp.errors import InputError

PREPROCESSING_VERSION = "centre-crop-v1"
JITTER = 0.06        # crop jitter: shift and scale of the crop box, as a fraction of its size
BRIGHTNESS = 0.1     # brightness offset range on the [0, 1] pixel scale
# Columns of an augmentation array, one row per image (see `draw_augmentation`).
AUGMENTATION_FIELDS = ("scale", "shift_y", "shift_x", "mirror", "brightness")


def draw_augmentation(seed: int, batch: int, count: int) -> np.ndarray:
    """Augmentations of the `count` images of batch `batch`: float64 [count, 5], columns `AUGMENTATION_FIELDS`.

    scale in [1 - JITTER, 1 + JITTER), shift_y and shift_x in [-JITTER, JITTER)
    (fractions of the crop box), mirror 0 or 1 (probability 1/2), brightness
    in [-BRIGHTNESS, BRIGHTNESS). Row j depends only on (seed, batch, j).
    """
    if seed < 0 or batch < 0:
        raise InputError(f"augmentation seed and batch index must be >= 0, got seed={seed}, batch={batch}")
    u = np.random.default_rng((int(seed), int(batch))).random((count, 5))
    return np.stack([1.0 + JITTER * (2 * u[:, 0] - 1), JITTER * (2 * u[:, 1] - 1), JITTER * (2 * u[:, 2] - 1),
                     (u[:, 3] < 0.5).astype(np.float64), BRIGHTNESS * (2 * u[:, 4] - 1)], axis=1)


def crop_box(height: int, width: int, crop_fraction: float,
             augmentation: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the crop inside a `height` x `width` image.

    The centre box of `crop_fraction`, scaled and shifted by `augmentation`
    (a row of `draw_augmentation`), in float32 with round-half-to-even as
    TensorFlow computes it; a shifted box is pushed back inside, never padded.
    """
    f32 = np.float32
    h, w = f32(height), f32(width)
    crop_h, crop_w = f32(crop_fraction) * h, f32(crop_fraction) * w
    centre_y, centre_x = h / f32(2), w / f32(2)
    if augmentation is not None:
        scale = f32(augmentation[0])
        crop_h, crop_w = min(crop_h * scale, h), min(crop_w * scale, w)
        centre_y = centre_y + f32(augmentation[1]) * crop_h
        centre_x = centre_x + f32(augmentation[2]) * crop_w
    box_h = int(min(max(np.rint(crop_h), 1), height))
    box_w = int(min(max(np.rint(crop_w), 1), width))
    top = int(np.rint(centre_y - f32(box_h) / f32(2)))
    left = int(np.rint(centre_x - f32(box_w) / f32(2)))
    return min(max(top, 0), height - box_h), min(max(left, 0), width - box_w), box_h, box_w


@functools.lru_cache(maxsize=512)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(first input index [n_out], float32 weights [n_out] of it and of each next input it overlaps).

    Output pixel i covers [i*s, (i+1)*s) with s = n_in / n_out; input pixel
    [j, j+1) weighs its overlap with that span over s, so each output's
    weights sum to 1 (TensorFlow's "area" resize).
    """
    s = n_in / n_out
    low, high = np.arange(n_out) * s, np.arange(1, n_out + 1) * s
    first = np.floor(low).astype(np.intp)
    taps = int(np.max(np.ceil(high - 1e-9).astype(np.intp) - first))
    first = np.minimum(first, n_in - taps)
    weights = tuple((np.clip(np.minimum(high, first + t + 1) - np.maximum(low, first + t), 0, None) / s)
                    .astype(np.float32) for t in range(taps))
    return first, weights


@functools.lru_cache(maxsize=32)
def _row_weights(n_in: int, n_out: int, width: int, scale: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """`_area_taps` of the rows pass, times `scale`, each tap's weights spread to a float32 [n_out, width].

    A full array multiplies about 3x faster than a broadcast column; the cache
    covers the crop heights jitter gives one image size (up to ~1 MB each).
    """
    first, weights = _area_taps(n_in, n_out)
    return first, tuple(np.ascontiguousarray(np.broadcast_to((weight * np.float32(scale))[:, None], (n_out, width)))
                        for weight in weights)


@functools.lru_cache(maxsize=32)
def _column_weights(n_in: int, n_out: int, channels: int, mirror: bool
                    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Columns pass on [rows, n_in * channels]: per tap, the input column of each output value and its weight.

    Weights come spread to float32 [n_out, n_out * channels] (square output); with `mirror` the
    output columns are reversed.
    """
    first, weights = _area_taps(n_in, n_out)
    if mirror:
        first, weights = first[::-1], tuple(weight[::-1] for weight in weights)
    columns = tuple(((first + t)[:, None] * channels + np.arange(channels)).ravel() for t in range(len(weights)))
    spread = tuple(np.ascontiguousarray(np.broadcast_to(np.repeat(weight, channels), (n_out, n_out * channels)))
                   for weight in weights)
    return columns, spread


def area_resize(pixels: np.ndarray, size: int, mirror: bool = False, scale: float = 1.0) -> np.ndarray:
    """[H, W, C] (any real dtype) -> float32 [size, size, C]: area averaging (module docstring, step 4).

    The result is multiplied by `scale` and, with `mirror`, flipped
    left-right; both are folded into the weights. Rows are resized first,
    then columns on the [size, W*C] layout, which needs no transposed copy.
    """
    h, w, c = pixels.shape
    flat = pixels.reshape(h, w * c)
    first, weights = _row_weights(h, size, w * c, float(scale))
    rows = np.multiply(flat[first], weights[0], dtype=np.float32)
    for t in range(1, len(weights)):
        rows += flat[first + t] * weights[t]                               # [size, W*C]
    columns, weights = _column_weights(w, size, c, bool(mirror))
    out = rows[:, columns[0]] * weights[0]
    for t in range(1, len(weights)):
        out += rows[:, columns[t]] * weights[t]                            # [size, size*C]
    return out.reshape(size, size, c)


def preprocess_array(data: bytes, image_size: int, crop_fraction: float,
                     augmentation: np.ndarray | None = None) -> np.ndarray:
    """One encoded image -> float32 [image_size, image_size, 3] in [-1, 1] (see module docstring).

    `augmentation` is a row of `draw_augmentation` (training), None for the
    deterministic centre crop (evaluation, serving). `codec.UnusableImage` (a
    ValueError whose reason names the problem) for bytes `codec.open_image`
    refuses: not an image, undecodable, or a size outside the codec's limits.
    """
    with decode_rgb(data) as image:
        top, left, box_h, box_w = crop_box(image.height, image.width, crop_fraction, augmentation)
        pixels = np.asarray(image.crop((left, top, left + box_w, top + box_h)))
    mirror, offset = False, -1.0
    if augmentation is not None:
        mirror, offset = bool(augmentation[3]), offset + 2.0 * augmentation[4]
    # clip(pixel / 255 + brightness, 0, 1) * 2 - 1 as one scaled resize, an offset and a clip.
    out = area_resize(pixels, image_size, mirror, scale=2.0 / 255.0)
    out += np.float32(offset)
    return np.clip(out, -1.0, 1.0, out=out)


def check_preprocessing(image_size: int, crop_fraction: float) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise InputError(f"image_size must be an integer >= 1, got {image_size!r}")
    if not 0.0 < float(crop_fraction) <= 1.0:
        raise InputError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
