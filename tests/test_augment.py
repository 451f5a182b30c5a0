"""Tests of facenet_kfp.augment: ranges, no vertical flips, mirror, reflected borders, exact geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import augment
from facenet_kfp.augment import PARAM_KEYS, apply_augmentation, inverse_affine, sample_params
from facenet_kfp.errors import InputError

IDENTITY = {"mirror": False, "rotate_deg": 0.0, "scale": 1.0, "shift_x_px": 0.0, "shift_y_px": 0.0,
            "brightness": 1.0, "contrast": 1.0}


def params(**changes):
    return {**IDENTITY, **changes}


def halves(top_value: int, bottom_value: int, size=(250, 250), vertical=True) -> Image.Image:
    w, h = size
    arr = np.full((h, w, 3), bottom_value, np.uint8)
    if vertical:
        arr[: h // 2] = top_value
    else:
        arr[:, : w // 2] = top_value
    return Image.fromarray(arr)


def reference_geometry(arr: np.ndarray, p: dict) -> np.ndarray:
    """Slow per-pixel reference: mirror, inverse map, bilinear taps, numpy-"reflect" borders."""
    h, w, _ = arr.shape
    src = arr[:, ::-1].astype(np.float64) if p["mirror"] else arr.astype(np.float64)
    a, b, c, d, e, f = inverse_affine((w, h), p["rotate_deg"], p["scale"], p["shift_x_px"], p["shift_y_px"])

    def reflect(i, n):
        period = 2 * (n - 1)
        i = abs(i) % period
        return period - i if i >= n else i

    out = np.zeros(arr.shape, np.float64)
    for y in range(h):
        for x in range(w):
            # Pixel centres sit at i + 0.5; sample positions in pixel-index units.
            xi = a * (x + 0.5) + b * (y + 0.5) + c - 0.5
            yi = d * (x + 0.5) + e * (y + 0.5) + f - 0.5
            x0, y0 = math.floor(xi), math.floor(yi)
            fx, fy = xi - x0, yi - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    out[y, x] += wy * wx * src[reflect(y0 + dy, h), reflect(x0 + dx, w)]
    return out


def test_sample_params_stay_in_face_safe_ranges_and_mirror_half_the_time():
    draws = [sample_params(np.random.default_rng(seed)) for seed in range(2000)]
    for p in draws:
        assert tuple(p) == PARAM_KEYS
        assert isinstance(p["mirror"], bool)
        assert -10 <= p["rotate_deg"] <= 10
        assert 0.9 <= p["scale"] <= 1.1
        assert -8 <= p["shift_x_px"] <= 8 and -8 <= p["shift_y_px"] <= 8
        assert 0.8 <= p["brightness"] <= 1.2 and 0.8 <= p["contrast"] <= 1.2
        augment.validate_params(p)
    mirrored = sum(p["mirror"] for p in draws)
    assert 900 < mirrored < 1100
    # The ranges are used, not just a corner of them.
    assert min(p["rotate_deg"] for p in draws) < -9 and max(p["rotate_deg"] for p in draws) > 9
    assert min(p["scale"] for p in draws) < 0.91 and max(p["scale"] for p in draws) > 1.09


def test_sample_params_is_deterministic_per_rng_seed():
    assert sample_params(np.random.default_rng(7)) == sample_params(np.random.default_rng(7))
    assert sample_params(np.random.default_rng(7)) != sample_params(np.random.default_rng(8))


def test_output_is_rgb_and_same_size_for_any_input_mode():
    rng = np.random.default_rng(0)
    for mode, size in (("RGB", (250, 250)), ("L", (120, 80)), ("RGBA", (64, 96))):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        out = apply_augmentation(image, sample_params(np.random.default_rng(1)))
        assert out.mode == "RGB" and out.size == size


def test_identity_params_leave_pixels_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    out = np.asarray(apply_augmentation(Image.fromarray(arr), IDENTITY))
    np.testing.assert_array_equal(out, arr)


def test_never_flips_vertically():
    image = halves(255, 0)  # white top, black bottom
    for seed in range(300):
        out = np.asarray(apply_augmentation(image, sample_params(np.random.default_rng(seed))), np.float64)
        top, bottom = out[:125].mean(), out[125:].mean()
        assert top - bottom > 120, (seed, top, bottom)


def test_mirror_swaps_left_and_right_only_when_asked():
    image = halves(255, 0, vertical=False)  # white left, black right
    kept = np.asarray(apply_augmentation(image, params(mirror=False)), np.float64)
    mirrored = np.asarray(apply_augmentation(image, params(mirror=True)), np.float64)
    assert kept[:, :125].mean() == 255 and kept[:, 125:].mean() == 0
    assert mirrored[:, :125].mean() == 0 and mirrored[:, 125:].mean() == 255
    # Drawn parameters mirror some images, and then the sides really swap.
    drawn = [sample_params(np.random.default_rng(seed)) for seed in range(20)]
    assert any(p["mirror"] for p in drawn) and not all(p["mirror"] for p in drawn)
    for p in drawn:
        out = np.asarray(apply_augmentation(image, p), np.float64)
        left, right = out[:, :125].mean(), out[:, 125:].mean()
        assert (right > left) == p["mirror"]


def test_uncovered_border_is_filled_not_black():
    gray = Image.fromarray(np.full((250, 250, 3), 128, np.uint8))
    # The worst case of every geometric parameter: rotated, shrunk and shifted.
    for rot, shift in ((10.0, 8.0), (-10.0, -8.0)):
        out = np.asarray(apply_augmentation(gray, params(rotate_deg=rot, scale=0.9,
                                                         shift_x_px=shift, shift_y_px=shift)))
        np.testing.assert_array_equal(out, 128)


def test_geometry_matches_slow_reference():
    arr = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for seed in range(6):
        p = sample_params(np.random.default_rng(seed)) | {"brightness": 1.0, "contrast": 1.0}
        got = np.asarray(apply_augmentation(Image.fromarray(arr), p), np.float64)
        # PIL works in 8-bit fixed point and truncates: within one grey level of the exact value.
        assert np.abs(got - reference_geometry(arr, p)).max() < 1.0 + 1e-6, p


def test_a_point_moves_where_the_forward_map_says():
    # Positive angles turn counter-clockwise on screen, scale about the centre, shift +x right/+y down.
    arr = np.zeros((250, 250, 3), np.uint8)
    arr[87:94, 177:184] = 255     # a 7x7 blob centred at (180.5, 90.5)
    rot, s, tx, ty = 10.0, 1.1, 5.0, -3.0
    for mirror in (False, True):
        out = np.asarray(apply_augmentation(Image.fromarray(arr), params(
            mirror=mirror, rotate_deg=rot, scale=s, shift_x_px=tx, shift_y_px=ty)), np.float64)[..., 0]
        ys, xs = np.mgrid[0:250, 0:250] + 0.5
        cx_got, cy_got = (out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()
        x0 = 250 - 180.5 if mirror else 180.5
        dx, dy = x0 - 125, 90.5 - 125
        t = math.radians(rot)
        cx_want = 125 + tx + s * (math.cos(t) * dx + math.sin(t) * dy)
        cy_want = 125 + ty + s * (-math.sin(t) * dx + math.cos(t) * dy)
        assert abs(cx_got - cx_want) < 0.3 and abs(cy_got - cy_want) < 0.3


def test_positive_angle_turns_counter_clockwise_on_screen():
    arr = np.zeros((250, 250, 3), np.uint8)
    arr[122:128, 197:203] = 255   # centred at (200, 125): right of the centre, on the horizontal axis
    out = np.asarray(apply_augmentation(Image.fromarray(arr), params(rotate_deg=10.0)), np.float64)[..., 0]
    ys = np.mgrid[0:250, 0:250][0] + 0.5
    assert (out * ys).sum() / out.sum() == pytest.approx(125 - 75 * math.sin(math.radians(10)), abs=0.3)


def test_brightness_and_contrast_match_reference_formula():
    arr = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    brightness, contrast = 1.15, 0.85
    out = np.asarray(apply_augmentation(Image.fromarray(arr), params(brightness=brightness, contrast=contrast)))
    mean = np.asarray(Image.fromarray(arr).convert("L"), np.float64).mean()
    for y in range(arr.shape[0]):
        for x in range(arr.shape[1]):
            for ch in range(3):
                v = float(arr[y, x, ch])
                want = min(max(round(((v - mean) * contrast + mean) * brightness), 0), 255)
                assert abs(int(out[y, x, ch]) - want) <= 1   # round-half-even vs half-up


@pytest.mark.parametrize("bad, key", [
    (params(rotate_deg=180.0), "rotate_deg"),
    (params(scale=0.0), "scale"),
    (params(shift_x_px=20.0), "shift_x_px"),
    (params(brightness=float("nan")), "brightness"),
    (params(mirror=1), "mirror"),
    ({k: v for k, v in IDENTITY.items() if k != "contrast"}, "contrast"),
    (params(flip_vertical=True), "flip_vertical"),
])
def test_invalid_params_raise_naming_the_key(bad, key):
    with pytest.raises(InputError, match=key):
        apply_augmentation(halves(255, 0, size=(10, 10)), bad)


@pytest.mark.parametrize("shape, pad", [((250, 250, 3), 2), ((250, 250, 3), 90), ((5, 9, 3), 3),
                                        ((5, 9, 3), 4), ((5, 9, 3), 20), ((6, 4), 2)])
def test_reflect_pad_matches_numpy(shape, pad):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    want = np.pad(arr, ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
    np.testing.assert_array_equal(augment.reflect_pad(arr, pad), want)
