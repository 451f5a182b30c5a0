"""Face-safe image augmentation for completion: mirror, small rotation/scale/shift, brightness/contrast.

Faces stay upright: there is no vertical flip and rotations are limited to
±10°, so a generated image is a plausible photo of the same person (the
upside-down copies of the original TF1 implementation were not). Every function is pure: the same image
and parameters give the same pixels, so completion is reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from facenet_kfp.errors import InputError

# Ranges of the parameters, inclusive; `sample_params` draws uniformly from them
# and `apply_augmentation` refuses anything outside, so no caller can ask for an
# upside-down face.
MAX_ROTATE_DEG = 10.0          # rotation about the image centre, degrees
SCALE_RANGE = (0.9, 1.1)       # zoom factor about the centre (>1 enlarges the face)
MAX_SHIFT_PX = 8.0             # translation along each axis, pixels
MAX_JITTER = 0.2               # brightness and contrast factors lie in [1 - j, 1 + j]
MIRROR_PROBABILITY = 0.5       # chance of a horizontal (left-right) mirror

PARAM_KEYS = ("mirror", "rotate_deg", "scale", "shift_x_px", "shift_y_px", "brightness", "contrast")

_RANGES = {
    "rotate_deg": (-MAX_ROTATE_DEG, MAX_ROTATE_DEG),
    "scale": SCALE_RANGE,
    "shift_x_px": (-MAX_SHIFT_PX, MAX_SHIFT_PX),
    "shift_y_px": (-MAX_SHIFT_PX, MAX_SHIFT_PX),
    "brightness": (1.0 - MAX_JITTER, 1.0 + MAX_JITTER),
    "contrast": (1.0 - MAX_JITTER, 1.0 + MAX_JITTER),
}
# Rounding of the drawn values: what a manifest records is exactly what was applied.
_DECIMALS = {"rotate_deg": 3, "scale": 4, "shift_x_px": 2, "shift_y_px": 2,
             "brightness": 4, "contrast": 4}


def sample_params(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one augmentation: a mirror with probability 0.5, the other values uniform in their range.

    Returns a JSON-friendly dict with keys `PARAM_KEYS`: ``mirror`` (bool),
    ``rotate_deg`` (degrees, counter-clockwise on screen), ``scale`` (unitless),
    ``shift_x_px``/``shift_y_px`` (pixels, +x right, +y down), ``brightness`` and
    ``contrast`` (multiplicative factors). Values are rounded (see `_DECIMALS`).
    """
    params: dict[str, Any] = {"mirror": bool(rng.random() < MIRROR_PROBABILITY)}
    for key in PARAM_KEYS[1:]:
        low, high = _RANGES[key]
        params[key] = round(float(rng.uniform(low, high)), _DECIMALS[key])
    return params


def validate_params(params: dict[str, Any]) -> None:
    """Raise InputError naming the key when `params` lacks a key, has an unknown one or leaves a range."""
    if not isinstance(params, dict):
        raise InputError(f"augmentation parameters must be a mapping, got {type(params).__name__}")
    missing = [key for key in PARAM_KEYS if key not in params]
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if missing or unknown:
        raise InputError(f"augmentation parameters: missing {missing or 'none'}, unknown {unknown or 'none'}; "
                         f"expected keys {', '.join(PARAM_KEYS)}")
    if not isinstance(params["mirror"], bool):
        raise InputError(f"augmentation parameter mirror must be true or false, got {params['mirror']!r}")
    for key, (low, high) in _RANGES.items():
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"augmentation parameter {key} must be a finite number, got {value!r}")
        if not low <= value <= high:
            raise InputError(f"augmentation parameter {key}={value} is outside the face-safe range "
                             f"[{low}, {high}]")


def inverse_affine(size: tuple[int, int], rotate_deg: float, scale: float,
                   shift_x_px: float, shift_y_px: float) -> tuple[float, ...]:
    """Coefficients (a, b, c, d, e, f) mapping an output point to its input point.

    Coordinates are continuous with pixel (i, j) covering [i, i+1) x [j, j+1),
    centre c = (w/2, h/2), shift t, scale s, angle θ. The forward map, a
    counter-clockwise turn on screen (y points down), is

        p_out = c + t + s · [[cos θ, sin θ], [-sin θ, cos θ]] · (p_in - c)

    and its inverse, in PIL's AFFINE form x_in = a·x + b·y + c, y_in = d·x + e·y + f, is

        p_in = c + (1/s) · [[cos θ, -sin θ], [sin θ, cos θ]] · (p_out - c - t).
    """
    width, height = size
    cx, cy = width / 2.0, height / 2.0
    theta = math.radians(rotate_deg)
    a, b = math.cos(theta) / scale, -math.sin(theta) / scale
    d, e = math.sin(theta) / scale, math.cos(theta) / scale
    ox, oy = cx + shift_x_px, cy + shift_y_px
    return a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy


def reflect_pad(arr: np.ndarray, pad: int) -> np.ndarray:
    """Pad an (h, w, ...) array by `pad` pixels on each side, mirrored about the edge pixels.

    Same result as ``np.pad(..., mode="reflect")`` but built from a few slice
    copies, several times faster for the common case pad <= min(h, w) - 2.
    """
    h, w = arr.shape[:2]
    if pad > min(h, w) - 2:   # the reflection would run past the far edge: numpy repeats it
        return np.pad(arr, ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
    out = np.empty((h + 2 * pad, w + 2 * pad) + arr.shape[2:], arr.dtype)
    out[pad:pad + h, pad:pad + w] = arr
    out[pad:pad + h, :pad] = arr[:, pad:0:-1]
    out[pad:pad + h, pad + w:] = arr[:, w - 2:w - 2 - pad:-1]
    out[:pad] = out[2 * pad:pad:-1]
    out[pad + h:] = out[pad + h - 2:h - 2:-1]
    return out


def _affine_reflect(image: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    """Resample `image` through `coeffs` (bilinear), filling uncovered areas by reflection.

    PIL can only fill with a constant colour, so the input is first padded by
    reflection (numpy "reflect": mirrored about the edge pixel) just far enough
    to cover where the output corners land, plus 2 pixels for the bilinear taps.
    """
    width, height = image.size
    a, b, c, d, e, f = coeffs
    corners = [(a * x + b * y + c, d * x + e * y + f) for x in (0, width) for y in (0, height)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    overshoot = max(-min(xs), max(xs) - width, -min(ys), max(ys) - height, 0.0)
    pad = math.ceil(overshoot) + 2
    return Image.fromarray(reflect_pad(np.asarray(image), pad)).transform(
        (width, height), Image.Transform.AFFINE, (a, b, c + pad, d, e, f + pad),
        resample=Image.Resampling.BILINEAR)


def jitter_lut(mean: float, brightness: float, contrast: float) -> np.ndarray:
    """The 256-entry uint8 table v -> clip(round(((v - mean) · contrast + mean) · brightness), 0, 255).

    `mean` is the image's mean grey level, as PIL's ImageEnhance.Contrast uses:
    contrast stretches around it, then brightness scales everything.
    """
    values = np.arange(256, dtype=np.float64)
    return np.clip(np.rint(((values - mean) * contrast + mean) * brightness), 0, 255).astype(np.uint8)


def apply_augmentation(image: Image.Image, params: dict[str, Any]) -> Image.Image:
    """Apply `params` (see `sample_params`) to `image`; returns an RGB image of the same size.

    Order: mirror left-right, then rotate/scale/shift about the centre (bilinear,
    borders filled by reflection, never black), then contrast and brightness.
    """
    validate_params(params)
    if image.width < 2 or image.height < 2:
        raise InputError(f"cannot augment a {image.width}x{image.height} image: need at least 2x2 pixels")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if params["mirror"]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    geometric = (params["rotate_deg"], params["scale"], params["shift_x_px"], params["shift_y_px"])
    if geometric != (0, 1, 0, 0):
        image = _affine_reflect(image, inverse_affine(image.size, *geometric))
    if (params["brightness"], params["contrast"]) != (1, 1):
        mean = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
        lut = jitter_lut(mean, params["brightness"], params["contrast"])
        image = image.point(lut.tolist() * 3)
    return image
