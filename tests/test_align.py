"""Face detection and five-point alignment (facenet_kfp/align.py) on two real photos and their variants."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

pytest.importorskip("mtcnn")
skimage_data = pytest.importorskip("skimage.data")

from facenet_kfp import align  # noqa: E402
from facenet_kfp.errors import InputError  # noqa: E402
from facenet_kfp.fsutil import STEP_MARKER  # noqa: E402
from facenet_kfp.shards import ShardReader, ShardWriter, read_manifest  # noqa: E402

# Measured with mtcnn 1.0.0 over the 7 variants of each photo at 112 px (the slow test prints them):
# eye error (the original's eyes carried into the variant, then aligned) at most 3.0 px (astronaut),
# 2.4 px (grace_hopper); the variant's own eyes after its least-squares fit at most 3.6 px and 2.6 px
# from the template, and at most 1.4 px and 1.3 px from the carried ones (detection jitter);
# pixel correlation with the original's crop at least 0.966 and 0.745 (Grace Hopper's hat and
# wrinkles are fine texture that twice-resampled variants blur), and after a 2 px Gaussian blur
# (the scale of landmark jitter) at least 0.989 and 0.946.
MAX_EYE_ERROR_PX = 4.0
MAX_EYE_RESIDUAL_PX = 4.5
MAX_EYE_JITTER_PX = 2.5
MIN_CORRELATION = 0.70
MIN_BLURRED_CORRELATION = 0.93

# Mirroring swaps left and right: the variant's point i is the original's point MIRRORED[i].
MIRRORED = [1, 0, 2, 4, 3]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _photos() -> dict[str, Image.Image]:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        grace = Image.open(handle).convert("RGB")
    return {"astronaut": Image.fromarray(skimage_data.astronaut()), "grace_hopper": grace}


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _variant(image: Image.Image, angle: float = 0.0, scale: float = 1.0, mirror: bool = False,
             pad: tuple[int, int, int, int] = (0, 0, 0, 0), seed: int | None = None):
    """`image` mirrored, rotated by `angle` degrees (counter-clockwise on screen), scaled, and placed
    with `pad` (left, top, right, bottom) pixels around its bounding box on a grey or (with `seed`)
    noise canvas. Returns (variant, F): F [2, 3] maps the original's pixel indices to the variant's."""
    w, h = image.size
    theta = math.radians(angle)
    linear = scale * np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    if mirror:
        linear = linear @ np.array([[-1.0, 0.0], [0.0, 1.0]])
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=float) @ linear.T
    low, high = corners.min(axis=0), corners.max(axis=0)
    shift = np.array([pad[0], pad[1]]) - low
    forward = np.hstack([linear, shift[:, None]])
    size = (int(math.ceil(high[0] - low[0])) + 1 + pad[0] + pad[2],
            int(math.ceil(high[1] - low[1])) + 1 + pad[1] + pad[3])
    canvas = _noise(*size, seed) if seed is not None else Image.new("RGB", size, (128, 128, 128))
    canvas.paste(_render(image, forward, size), (0, 0), _render(Image.new("L", image.size, 255), forward, size))
    return canvas, forward


def _render(image: Image.Image, forward: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """`image` carried by the index-coordinate affine `forward` onto a `size` canvas (bilinear)."""
    inverse = np.linalg.inv(forward[:, :2])
    offset = inverse @ (-0.5 - forward[:, 2]) + 0.5
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return image.transform(size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


# name -> _variant keywords: rotations up to +-20 degrees, scales 0.5-2x, shifts, mirroring,
# and a noisy canvas larger than the photo with the photo off its centre.
VARIANTS = {
    "original": None,
    "rotate+20": {"angle": 20},
    "rotate-20": {"angle": -20},
    "scale0.5": {"scale": 0.5},
    "scale2": {"scale": 2.0},
    "shift": {"pad": (90, 10, 20, 70)},
    "mirror": {"mirror": True},
    "noisy canvas": {"angle": -10, "scale": 0.8, "pad": (300, 60, 120, 240), "seed": 7},
}


def _correlation(a: Image.Image, b: Image.Image, blur: float = 0.0) -> float:
    """Pearson correlation of two crops' grey pixels, after a Gaussian blur of `blur` pixels."""
    if blur:
        a, b = a.filter(ImageFilter.GaussianBlur(blur)), b.filter(ImageFilter.GaussianBlur(blur))
    x = np.asarray(a.convert("L"), dtype=np.float64).ravel()
    y = np.asarray(b.convert("L"), dtype=np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


@pytest.fixture(scope="module")
def detector():
    return align.FaceDetector()


@pytest.fixture(scope="module")
def photos():
    return _photos()


# --------------------------------------------------------------------------- geometry, no detector

def _reference_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least squares over (a, b, tx, ty) with x' = a x - b y + tx, y' = b x + a y + ty."""
    rows, values = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        values += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("seed", range(12))
def test_similarity_transform_matches_the_least_squares_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    src = rng.normal(0, 50, (n, 2))
    dst = rng.normal(0, 30, (n, 2)) + rng.normal(0, 100, 2)
    if seed % 3 == 0:          # a mirrored target: the best similarity is still a rotation
        dst = src * [-1, 1] + rng.normal(0, 2, (n, 2))
    matrix = align.similarity_transform(src, dst)
    np.testing.assert_allclose(matrix, _reference_similarity(src, dst), atol=1e-8)
    assert np.linalg.det(matrix[:, :2]) >= 0
    assert np.isclose(matrix[0, 0], matrix[1, 1]) and np.isclose(matrix[0, 1], -matrix[1, 0])


@pytest.mark.parametrize("angle, scale, shift", [(0, 1, (0, 0)), (33, 0.4, (12, -7)),
                                                  (-170, 2.5, (-300, 41)), (90, 1.0, (5, 5))])
def test_similarity_transform_recovers_a_known_transform(angle, scale, shift):
    theta = math.radians(angle)
    known = np.array([[scale * math.cos(theta), -scale * math.sin(theta), shift[0]],
                      [scale * math.sin(theta), scale * math.cos(theta), shift[1]]])
    src = np.random.default_rng(1).uniform(0, 200, (5, 2))
    np.testing.assert_allclose(align.similarity_transform(src, align.apply_transform(known, src)),
                               known, atol=1e-9)


def test_similarity_transform_refuses_degenerate_points():
    with pytest.raises(ValueError, match="one point"):
        align.similarity_transform(np.ones((5, 2)), align.TEMPLATE_112)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        align.similarity_transform(np.ones((5, 3)), np.ones((5, 3)))


def test_template_scales_with_the_size():
    np.testing.assert_allclose(align.template(112), align.TEMPLATE_112)
    np.testing.assert_allclose(align.template(224), 2 * align.TEMPLATE_112)
    info = align.alignment_info(160)
    assert info["method"] == "mtcnn" and info["detector"] == "mtcnn 1.0.0" and info["size"] == 160
    np.testing.assert_allclose(info["template"], align.template(160), atol=1e-4)
    assert "eye" in info["margin"] and info["fallback"] == "centre crop"


def test_warp_face_puts_the_landmarks_on_the_template():
    """Bright dots at five points carried by a known similarity land on the template after warping."""
    size = 112
    truth = np.array([[0.7, -0.5, 140.0], [0.5, 0.7, 60.0]])       # template -> image
    points = align.apply_transform(truth, align.template(size))
    yy, xx = np.mgrid[0:300, 0:300]
    pixels = np.zeros((300, 300))
    for x, y in points:
        pixels += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
    image = Image.fromarray((255 * pixels / pixels.max()).astype(np.uint8)).convert("RGB")
    crop = align.warp_face(image, points, size)
    assert crop.mode == "RGB" and crop.size == (size, size)
    grey = np.asarray(crop.convert("L"), dtype=np.float64)
    for x, y in align.template(size):
        x0, y0 = int(round(x)), int(round(y))
        window = grey[y0 - 4:y0 + 5, x0 - 4:x0 + 5]
        wy, wx = np.mgrid[y0 - 4:y0 + 5, x0 - 4:x0 + 5]
        centroid = ((window * wx).sum() / window.sum(), (window * wy).sum() / window.sum())
        assert np.hypot(centroid[0] - x, centroid[1] - y) < 0.3


def _face(x, y, w, h, score=0.99):
    return align.Face(box=(x, y, w, h), score=score, landmarks=np.zeros((5, 2)))


def test_choose_face_rules_and_ties():
    small_central = _face(90, 90, 20, 20)
    large_corner = _face(0, 0, 60, 60)
    faces = [large_corner, small_central]
    assert align.choose_face(faces, 200, 200, "central") is small_central
    assert align.choose_face(faces, 200, 200, "largest") is large_corner
    assert align.choose_face([], 200, 200) is None
    # Equal distance: the larger wins "central"; equal area: the nearer wins "largest"; then the score.
    left, right_big = _face(40, 90, 20, 20), _face(130, 80, 40, 40)
    assert align.choose_face([left, right_big], 200, 200, "central") is right_big
    near, far = _face(80, 80, 40, 40), _face(0, 0, 40, 40)
    assert align.choose_face([far, near], 200, 200, "largest") is near
    low, high = _face(80, 80, 40, 40, 0.9), _face(80, 80, 40, 40, 0.95)
    assert align.choose_face([low, high], 200, 200) is high
    assert align.choose_face([high, low], 200, 200) is high
    with pytest.raises(InputError, match="rule"):
        align.choose_face(faces, 200, 200, "first")


# --------------------------------------------------------------------------- the real detector

@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_variants_of_a_photo_align_alike(name, photos, detector):
    """Every variant's crop puts the photo's eyes on the template and looks like the original's crop."""
    photo = photos[name]
    size = align.DEFAULT_ALIGN_SIZE
    target = align.template(size)
    base_crop, base = align.align_photo(_png(photo), size, detector, where=name)
    base_points = np.array(base["landmarks"])
    report = []
    for variant_name, spec in VARIANTS.items():
        if spec is None:
            image, forward, crop, info = photo, np.hstack([np.eye(2), np.zeros((2, 1))]), base_crop, base
        else:
            image, forward = _variant(photo, **spec)
            crop, info = align.align_photo(_jpeg(image), size, detector, where=f"{name} {variant_name}")
        assert crop.size == (size, size) and crop.mode == "RGB"
        assert info["faces"] >= 1 and info["score"] > 0.9
        mirrored = spec is not None and spec.get("mirror", False)
        order = MIRRORED if mirrored else list(range(5))
        transform = np.array(info["transform"])
        # The original's detected eyes, carried into the variant, then by the variant's alignment.
        carried = align.apply_transform(transform, align.apply_transform(forward, base_points[order]))
        eye_error = float(np.hypot(*(carried[:2] - target[:2]).T).max())
        # The variant's own eyes under its own transform (the least-squares residual).
        own = align.apply_transform(transform, np.array(info["landmarks"]))
        residual = float(np.hypot(*(own[:2] - target[:2]).T).max())
        # Detection jitter: where the variant's own eyes and the carried ones land in the crop.
        jitter = float(np.hypot(*(own[:2] - carried[:2]).T).max())
        compared = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else crop
        correlation = _correlation(base_crop, compared)
        blurred = _correlation(base_crop, compared, blur=2.0)
        report.append((variant_name, eye_error, residual, jitter, correlation, blurred))
        print(f"{name:13s} {variant_name:13s} eye error {eye_error:4.2f} px, own-eye residual "
              f"{residual:4.2f} px, jitter {jitter:4.2f} px, correlation with the original's crop {correlation:.3f} "
              f"(blurred {blurred:.3f})")
    for variant_name, eye_error, residual, jitter, correlation, blurred in report:
        assert eye_error < MAX_EYE_ERROR_PX, (variant_name, eye_error)
        assert residual < MAX_EYE_RESIDUAL_PX, (variant_name, residual)
        assert jitter < MAX_EYE_JITTER_PX, (variant_name, jitter)
        assert correlation > MIN_CORRELATION, (variant_name, correlation)
        assert blurred > MIN_BLURRED_CORRELATION, (variant_name, blurred)


@pytest.mark.parametrize("what", ["noise", "flat"])
def test_a_photo_without_a_face_is_refused(what, detector):
    image = _noise(320, 240, 3) if what == "noise" else Image.new("RGB", (320, 240), (200, 180, 160))
    with pytest.raises(InputError, match=f"nofacehere-{what}.png: no face found"):
        align.align_photo(_png(image), detector=detector, where=f"nofacehere-{what}.png")


def test_an_undecodable_file_is_refused_naming_it(detector):
    with pytest.raises(InputError, match="broken.jpg: cannot align it: not an image"):
        align.align_photo(b"not an image at all", detector=detector, where="broken.jpg")


def test_two_faces_central_and_largest(photos, detector):
    """The astronaut's (smaller) face at the canvas centre, Grace Hopper's (larger) beside it."""
    astronaut, grace = photos["astronaut"], photos["grace_hopper"]
    width, height = 1700, 700
    canvas = _noise(width, height, 11)
    canvas.paste(astronaut, (width // 2 - 223, height // 2 - 117))   # its face centre ~ (223, 117)
    canvas.paste(grace, (width // 2 - 223 + 512 + 10, 50))
    rgb = np.asarray(canvas)
    faces = detector.detect(rgb)
    assert len(faces) >= 2
    central = align.choose_face(faces, width, height, "central")
    largest = align.choose_face(faces, width, height, "largest")
    assert abs(central.centre[0] - width / 2) < 60 and abs(central.centre[1] - height / 2) < 60
    assert largest.centre[0] > width / 2 + 400 and largest.area > 2 * central.area
    # align_photo applies the same rules.
    _, info = align.align_photo(_png(canvas), detector=detector, choose="largest")
    assert info["faces"] == len(faces) and info["chosen"] == "largest"
    np.testing.assert_allclose(info["box"], largest.box, atol=0.01)


def test_large_images_are_detected_shrunk_with_landmarks_in_full_size_pixels(photos):
    """Detection on a copy shrunk to max_side gives the same landmarks, in the full image's pixels."""
    photo = photos["astronaut"]
    full = align.FaceDetector().detect(np.asarray(photo))[0]
    shrunk = align.FaceDetector(max_side=256).detect(np.asarray(photo))[0]
    assert np.abs(shrunk.landmarks - full.landmarks).max() < 4.0
    assert abs(shrunk.centre[0] - full.centre[0]) < 6 and abs(shrunk.centre[1] - full.centre[1]) < 6


# --------------------------------------------------------------------------- the align step

def _packed(root, photos, faceless: int = 2, faces: tuple[str, ...] = ("rotate+20", "shift", "mirror")):
    """A packed dataset as extract writes it: each photo's variants (shrunk to keep detection quick)
    as one identity, and `faceless` images (noise, flat) of a third identity."""
    dataset = root / "dataset"
    with ShardWriter(dataset, max_shard_bytes=60_000) as writer:
        for name in sorted(photos):
            for j, variant in enumerate(faces):
                image, _ = _variant(photos[name].resize((256, 256 * photos[name].height // photos[name].width)),
                                    **VARIANTS[variant])
                writer.add(name, f"{name}/{name}_{j + 1:04d}.jpg", _jpeg(image), width=image.width,
                           height=image.height)
        for j in range(faceless):
            image = _noise(200, 150, j) if j % 2 == 0 else Image.new("RGB", (150, 200), (90, 90, 90))
            data = _png(image)
            writer.add("nobody", f"nobody/nobody_{j + 1:04d}.png", data, width=image.width,
                       height=image.height)
    (dataset / "dataset.json").write_text(json.dumps(
        {"images": writer.images, "identities": len(writer.identities), "image_root": "lfw",
         "format": "tar", "layout": {"name": "lfw"}, "skipped": [], "unusable": 0, "converted": 1}))
    return dataset


@pytest.mark.slow
def test_align_dataset_writes_an_aligned_packed_dataset(tmp_path, photos, detector):
    dataset = _packed(tmp_path, photos)
    out = tmp_path / "aligned"
    summary = align.align_dataset(dataset, out, size=96, detector=detector, workers=4)
    assert summary["images"] == 8 and summary["identities"] == 3
    assert summary["align_fallbacks"] == 2
    assert summary["align_fallback_examples"] == ["nobody/nobody_0001.png", "nobody/nobody_0002.png"]
    assert summary["alignment"] == align.alignment_info(96)
    assert summary["shards"] >= 1
    written = json.loads((out / "dataset.json").read_text())
    assert written == {**summary, "image_root": "lfw", "format": "tar", "layout": {"name": "lfw"},
                       "skipped": [], "unusable": 0}            # "converted" no longer holds
    assert (out / STEP_MARKER).read_text().strip() == "align"
    rows = read_manifest(out)
    source = read_manifest(dataset)
    assert [(r["identity"], r["file"], r["synthetic"]) for r in rows] == \
        [(r["identity"], r["file"], r["synthetic"]) for r in source]
    with ShardReader(out) as reader:
        for row in rows:
            image = Image.open(io.BytesIO(reader.read(row)))
            assert image.format == "JPEG" and image.size == (96, 96) and image.mode == "RGB"
            assert row["width"] == row["height"] == 96
            info = row["align"]
            if row["identity"] == "nobody":
                assert info == {"score": None, "landmarks": None, "fallback": True}
            else:
                assert info["fallback"] is False and info["score"] > 0.9
                assert np.array(info["landmarks"]).shape == (5, 2)
                assert all(v == round(v, 2) for point in info["landmarks"] for v in point)
    # The fallback is the centre square: the flat grey image stays flat grey.
    with ShardReader(out) as reader:
        flat = np.asarray(Image.open(io.BytesIO(reader.read(rows[-1]))), dtype=float)
    assert np.abs(flat - 90).max() < 3


class _Scripted(align.FaceDetector):
    """A detector that finds the astronaut's face (scaled to the image) in images wider than 250 px
    (the shifted photos of `_packed`, not its faceless images)."""

    def detect(self, rgb):
        height, width = rgb.shape[:2]
        if width <= 250:
            return []
        s = width / 512
        points = np.array([[203.5, 100.1], [245.4, 102.2], [224.2, 126.4], [201.8, 138.6], [244.4, 140.4]])
        return [align.Face(box=(181.6 * s, 63.7 * s, 83.0 * s, 107.4 * s), score=0.99, landmarks=points * s)]


def test_align_dataset_fails_above_the_fallback_fraction_naming_examples(tmp_path, photos):
    dataset = _packed(tmp_path, photos, faceless=7, faces=("shift",))
    out = tmp_path / "aligned"
    with pytest.raises(InputError) as caught:
        align.align_dataset(dataset, out, max_fallback_fraction=0.5, detector=_Scripted())
    message = str(caught.value)
    assert "no face found in 7 of 9 images" in message and "max_fallback_fraction 0.5" in message
    named = [f"nobody/nobody_{j:04d}.png" for j in range(1, 8)]
    assert all(name in message for name in named[:5]) and named[5] not in message
    assert not out.exists()
    assert not list(tmp_path.glob(".aligned.tmp-*"))
    # At the limit it passes; rerunning onto its own output is allowed.
    for _ in range(2):
        summary = align.align_dataset(dataset, out, max_fallback_fraction=7 / 9, detector=_Scripted())
        assert summary["align_fallbacks"] == 7 and len(summary["align_fallback_examples"]) == 5


def test_align_dataset_refuses_bad_parameters_and_foreign_outputs(tmp_path, photos):
    dataset = _packed(tmp_path, photos, faceless=1, faces=("shift",))
    for kwargs, match in (({"size": 8}, "align size"), ({"max_fallback_fraction": 1.5}, "max_fallback_fraction"),
                          ({"workers": 0}, "workers"), ({"choose": "first"}, "choose")):
        with pytest.raises(InputError, match=match):
            align.align_dataset(dataset, tmp_path / "out", detector=_Scripted(), **kwargs)
    with pytest.raises(InputError, match="inside the input"):
        align.align_dataset(dataset, dataset / "aligned", detector=_Scripted())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace it"):
        align.align_dataset(dataset, foreign, detector=_Scripted())
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="manifest not found"):
        align.align_dataset(tmp_path / "missing", tmp_path / "out", detector=_Scripted())
