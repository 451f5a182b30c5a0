"""Face detection (MTCNN) and five-point similarity alignment onto a fixed template: the align step.

A face is aligned by the least-squares similarity transform (rotation,
uniform scale, translation; never a reflection) that carries its five
detected landmarks onto `TEMPLATE_112` scaled to the output size, then
warped bilinearly (`warp_face`). Landmark order, here and in every manifest:
left eye, right eye, nose, mouth left, mouth right, "left" being the smaller
x in the image (the subject's right).

Template and margin. `TEMPLATE_112` is the five-point template of ArcFace-
style 112 x 112 alignment (insightface's ``arcface_dst``); another size uses
it scaled by size / 112. Coordinates are pixel indices (pixel i's centre at
i), as OpenCV's warpAffine reads them. The eyes lie 35.2 px apart, 31.5 % of
the crop's width, on a line at 46 % of its height; the mouth at 82 %. So the
crop holds about 1.1 eye distances beside each eye, 1.47 above the eye line
and 1.71 below it: the forehead up to about the hairline, the whole chin and
the cheeks up to about the ears, but not the top of the head or the neck. It
is the tight crop ArcFace-style recognition models are trained on.

The detector is `mtcnn` (its weights ship inside the wheel: nothing is
downloaded), loaded once per process on first use (`FaceDetector`). Images
with a side above `DETECT_MAX_SIDE` are shrunk for detection only; the warp
reads the full image.

`align_dataset` is the align step: it reads a packed dataset (extract's
output) row by row and writes the aligned images as a packed dataset of the
same layout. An image without a face falls back to its centre square, resized
(LFW's and VGGFace2's extracted images hold their face near the centre), and
too many fallbacks fail the step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from facenet_kfp import codec
from facenet_kfp.config import ALIGN_METHODS  # noqa: F401  (data.align's choices; re-exported)
from facenet_kfp.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_ALIGN_SIZE = 112
CHOOSE_RULES = ("central", "largest")
# Left eye, right eye, nose, mouth left, mouth right in a 112 x 112 crop (pixel indices).
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
MARGIN = ("ArcFace 112x112 five-point template scaled by size/112: eyes 31.5% of the width apart on a "
          "line at 46% of the height, mouth at 82%; the crop holds ~1.1 eye distances beside each "
          "eye, 1.47 above the eye line and 1.71 below (hairline to chin, cheeks to about the ears)")
FALLBACK = "centre crop"
# Smallest output side: below it the five points are closer than a few pixels.
MIN_ALIGN_SIZE = 16
# Longest side MTCNN sees; a larger image is shrunk for detection (its pyramid cost grows with the
# pixels) and the landmarks scaled back. Faces in face datasets are far larger than
# 20 px (MTCNN's minimum face) at this size.
DETECT_MAX_SIDE = 1024
# Aligned crops are stored as JPEG of this quality, as extract stores the crops of face boxes.
ALIGN_JPEG_QUALITY = 95
# Fallback examples named in the summary and in the error message.
MAX_EXAMPLES = 5
# dataset.json fields of extract that describe the aligned dataset as well (the source archive,
# its layout, what it skipped); counts and "converted" (every image is now a JPEG) are recomputed.
KEPT_EXTRACT_FIELDS = ("image_root", "format", "layout", "skipped", "unusable")
DATASET_JSON = "dataset.json"


def template(size: int) -> np.ndarray:
    """`TEMPLATE_112` scaled for a `size` x `size` crop: [5, 2] float, pixel indices."""
    return TEMPLATE_112 * (size / DEFAULT_ALIGN_SIZE)


# --------------------------------------------------------------------------- detection

@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face: `box` (x, y, w, h) in pixels, `score` in 0..1, `landmarks` [5, 2] (x, y)
    in template order (`LANDMARK_NAMES`), pixel indices of the image the detector saw."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


@functools.lru_cache(maxsize=1)
def _load_mtcnn():
    """The process's one MTCNN (about 5 s to build; TensorFlow is imported here, not at import)."""
    from mtcnn import MTCNN

    log.info("loading the MTCNN face detector (mtcnn %s)", detector_version())
    return MTCNN(device="CPU:0")


_DETECT_LOCK = threading.Lock()


def detector_version() -> str:
    return importlib.metadata.version("mtcnn")


class FaceDetector:
    """MTCNN faces of an RGB image; the network is built on the first `detect` and shared by every
    instance in the process.

    `min_face_size`: smallest face side MTCNN looks for, in pixels of the image it sees (its
    default, 20); `max_side`: longer images are shrunk to this side for detection.
    """

    def __init__(self, min_face_size: int = 20, max_side: int = DETECT_MAX_SIDE):
        self.min_face_size = min_face_size
        self.max_side = max_side

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in `rgb` ([H, W, 3] uint8), highest score first; [] when there is none."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"detect: expected an [H, W, 3] uint8 image, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        factor = min(1.0, self.max_side / max(height, width))
        seen = rgb
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            seen = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
            factor = seen.shape[1] / width
        model = _load_mtcnn()
        with _DETECT_LOCK:   # one graph, one caller at a time (TensorFlow spreads each call over the CPUs)
            rows = model.detect_faces(seen, box_format="xyxy", output_type="numpy",
                                      min_face_size=self.min_face_size)
        faces = [_face_of_row(np.asarray(row, dtype=np.float64), factor) for row in np.asarray(rows)]
        return sorted(faces, key=lambda face: (-face.score, face.box))


def _face_of_row(row: np.ndarray, factor: float) -> Face:
    """A Face from MTCNN's numpy row [image, x1, y1, x2, y2, score, 5 landmark x, 5 landmark y]
    (landmarks in template order, as mtcnn's own parse_landmarks reads them), its coordinates
    divided by the detection `factor`."""
    x1, y1, x2, y2 = row[1:5] / factor
    points = np.stack([row[6:11], row[11:16]], axis=1) / factor
    return Face(box=(float(x1), float(y1), float(x2 - x1), float(y2 - y1)), score=float(row[5]),
                landmarks=_template_order(points))


def _template_order(points: np.ndarray) -> np.ndarray:
    """Landmarks with each pair (eyes, mouth corners) ordered by x: the smaller x first."""
    points = np.array(points, dtype=np.float64)
    for a, b in ((0, 1), (3, 4)):
        if points[a, 0] > points[b, 0]:
            points[[a, b]] = points[[b, a]]
    return points


def choose_face(faces: Sequence[Face], width: int, height: int, rule: str = "central") -> Face | None:
    """The face an image stands for, None when `faces` is empty.

    "central": the face whose box centre is nearest the image centre (width / 2, height / 2) (LFW's
    labelled face is centred; extract cuts VGGFace2's images to their face box); "largest": the
    largest box area. Ties: the other criterion, then the higher score, then the box's x, y.
    """
    if rule not in CHOOSE_RULES:
        raise InputError(f"choose_face: rule must be one of {', '.join(CHOOSE_RULES)}, got {rule!r}")
    if not faces:
        return None

    def distance(face: Face) -> float:
        cx, cy = face.centre
        return math.hypot(cx - width / 2, cy - height / 2)

    if rule == "central":
        key = lambda face: (distance(face), -face.area, -face.score, face.box)  # noqa: E731
    else:
        key = lambda face: (-face.area, distance(face), -face.score, face.box)  # noqa: E731
    return min(faces, key=key)


# --------------------------------------------------------------------------- geometry

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[2, 3] matrix M = [s R | t] minimising sum_i |s R src_i + t - dst_i|^2 (Umeyama 1991).

    R is a rotation (det +1: no reflection), s > 0 a uniform scale, t a
    translation; `src`, `dst`: [N, 2] points, N >= 2, `src` not all one point.
    dst_i ~ M @ [x_i, y_i, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_transform: expected two [N, 2] arrays with N >= 2, got "
                         f"{src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity_transform: points must be finite")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("similarity_transform: the source points are all (nearly) one point")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0               # the nearest rotation, not a reflection
    rotation = u @ np.diag(sign) @ vt
    scale = float((sigma * sign).sum() / src_var)
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[N, 2] points carried by a [2, 3] affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp_face(image: Image.Image, landmarks: np.ndarray, size: int = DEFAULT_ALIGN_SIZE) -> Image.Image:
    """The `size` x `size` RGB crop whose five landmarks sit on `template(size)`.

    `landmarks`: [5, 2] in template order, pixel indices of `image`. Pillow's
    AFFINE transform samples bilinearly at the inverse map of each output pixel;
    outside the image is black.
    """
    matrix = similarity_transform(landmarks, template(size))
    return Image.fromarray(_warp(image, matrix, size))


def _warp(image: Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """`image` (any mode) warped by the index-coordinate affine `matrix` onto size x size RGB pixels.

    Pillow maps output point q to input point p in coordinates where pixel i's
    centre is i + 0.5; with q = A p + t in pixel indices that is
    p + 0.5 = A^-1 (q + 0.5 - 0.5 - t) + 0.5, hence the half-pixel terms.
    """
    a = np.asarray(matrix, dtype=np.float64)[:, :2]
    t = np.asarray(matrix, dtype=np.float64)[:, 2]
    inverse = np.linalg.inv(a)
    offset = inverse @ (-0.5 - t) + 0.5
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    warped = rgb.transform((size, size), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    return np.asarray(warped)


def centre_crop(image: Image.Image, size: int = DEFAULT_ALIGN_SIZE) -> Image.Image:
    """The fallback: the centred square of side min(width, height), resized to size x size RGB (bilinear)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


# --------------------------------------------------------------------------- one photo

def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_ALIGN_SIZE:
        raise InputError(f"align size must be an integer >= {MIN_ALIGN_SIZE} pixels, got {size!r}")


def _rounded(points: np.ndarray, digits: int = 2) -> list[list[float]]:
    return [[round(float(x), digits), round(float(y), digits)] for x, y in np.asarray(points)]


def align_photo(data: bytes, size: int = DEFAULT_ALIGN_SIZE, detector: FaceDetector | None = None,
                choose: str = "central", where: str = "image") -> tuple[Image.Image, dict[str, Any]]:
    """The aligned size x size RGB crop of the face `choose` picks in an encoded image, and what was found.

    Returns (crop, info) with info = {"score", "landmarks" ([5, 2] list, pixel
    indices of the image, template order), "box" ([x, y, w, h]), "faces"
    (number found), "chosen" (the rule), "transform" ([2, 3] list: image
    indices -> crop indices)}. InputError naming `where` when the image is not
    usable (`codec.open_image`'s rule) or holds no face.
    """
    _check_size(size)
    try:
        image = codec.decode_rgb(data)
    except codec.UnusableImage as exc:
        raise InputError(f"{where}: cannot align it: {exc.reason}") from None
    with image:
        crop, info = _align_image(image, size, detector or FaceDetector(), choose)
    if crop is None:
        raise InputError(f"{where}: no face found ({image.size[0]}x{image.size[1]} pixels); "
                         f"use a photo that shows one face clearly")
    return crop, info


def _align_image(image: Image.Image, size: int, detector: FaceDetector,
                 choose: str) -> tuple[Image.Image | None, dict[str, Any]]:
    """(crop, info) of a decoded RGB image; (None, {"faces": 0, ...}) when no face is found."""
    faces = detector.detect(np.asarray(image))
    face = choose_face(faces, image.size[0], image.size[1], choose)
    if face is None:
        return None, {"faces": 0, "chosen": choose}
    matrix = similarity_transform(face.landmarks, template(size))
    crop = Image.fromarray(_warp(image, matrix, size))
    info = {"score": round(face.score, 4), "landmarks": _rounded(face.landmarks),
            "box": [round(float(v), 2) for v in face.box], "faces": len(faces), "chosen": choose,
            "transform": [[round(float(v), 6) for v in row] for row in matrix]}
    return crop, info


def alignment_info(size: int = DEFAULT_ALIGN_SIZE, choose: str = "central") -> dict[str, Any]:
    """How the align step aligns, for dataset.json and provenance: method, detector, size, template, margin."""
    return {"method": "mtcnn", "detector": f"mtcnn {detector_version()}", "size": size,
            "template": _rounded(template(size), 4), "landmarks": list(LANDMARK_NAMES),
            "margin": MARGIN, "fallback": FALLBACK, "choose": choose,
            "jpeg_quality": ALIGN_JPEG_QUALITY}


# --------------------------------------------------------------------------- the align step

def align_dataset(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  size: int = DEFAULT_ALIGN_SIZE, max_fallback_fraction: float = 0.5,
                  workers: int | None = None, choose: str = "central", shard_size_mb: int | None = None,
                  detector: FaceDetector | None = None) -> dict[str, Any]:
    """Align every image of a packed dataset; write the crops as a packed dataset at `out_dir`.

    Args:
        dataset_dir: extract's output (``manifest.jsonl``, shards, optional ``dataset.json``).
        out_dir: replaced atomically when absent, empty or an earlier output of this
            step (marker "align"); gets the same layout: ``manifest.jsonl``,
            ``shards/images-NNNNN.tar`` and ``dataset.json``.
        size: side of the aligned crops in pixels (>= `MIN_ALIGN_SIZE`).
        max_fallback_fraction: fail when more than this fraction (0..1) of the images
            had no face and fell back to their centre square (`centre_crop`).
        workers: None or an integer >= 1, accepted as extract accepts it; detection
            runs in this process either way: MTCNN's TensorFlow graph already spreads
            each detection over the CPUs, and a second process would hold a second copy.
        choose: `choose_face` rule when an image holds several faces.
        shard_size_mb: target shard size in MiB; None: `DataConfig.shard_size_mb`.
        detector: the `FaceDetector` to use (tests pass their own); None: a default one.

    Rows are read and written one at a time (`iter_manifest`), so memory does not
    grow with the dataset. Each output row keeps the input row's fields (identity,
    file, synthetic, source, crop, ...) with width and height = `size`, the new
    shard position, and ``align``: ``{"score", "landmarks", "fallback"}`` (score
    and landmarks None for a fallback). Every crop is a JPEG of quality
    `ALIGN_JPEG_QUALITY`, whatever the file name's suffix.

    Returns (and writes to dataset.json, with extract's `KEPT_EXTRACT_FIELDS`):
    ``{"images", "identities", "align_fallbacks", "align_fallback_examples",
    "shards", "alignment"}``; examples are the first `MAX_EXAMPLES` fallback
    files in manifest order.

    Raises:
        InputError: a bad parameter, a missing or malformed input dataset, an empty
            one, out_dir inside the input (or the reverse), or more than
            `max_fallback_fraction` fallbacks (naming examples).
    """
    from facenet_kfp.config import DataConfig
    from facenet_kfp.fsutil import (atomic_dir, check_outputs_apart, no_space_named, read_json,
                                    remove_stale_temps, write_json)
    from facenet_kfp.shards import ShardReader, ShardWriter, iter_manifest, shard_files

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    _check_size(size)
    if isinstance(max_fallback_fraction, bool) or not isinstance(max_fallback_fraction, (int, float)) \
            or not 0 <= max_fallback_fraction <= 1:
        raise InputError(f"max_fallback_fraction must be a number from 0 to 1, got {max_fallback_fraction!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be an integer >= 1 or None, got {workers!r}")
    if choose not in CHOOSE_RULES:
        raise InputError(f"choose must be one of {', '.join(CHOOSE_RULES)}, got {choose!r}")
    if shard_size_mb is None:
        shard_size_mb = DataConfig.shard_size_mb
    if isinstance(shard_size_mb, bool) or not isinstance(shard_size_mb, int) or shard_size_mb < 1:
        raise InputError(f"shard_size_mb must be an integer >= 1, got {shard_size_mb!r}")
    check_outputs_apart({"out_dir": out_dir}, {"dataset_dir": dataset_dir})
    if workers and workers > 1:
        log.info("align: detecting in one process (TensorFlow uses the CPUs); workers=%d changes nothing",
                 workers)
    extract_summary = read_json(dataset_dir / DATASET_JSON) if (dataset_dir / DATASET_JSON).is_file() else {}
    detector = detector or FaceDetector()

    remove_stale_temps(out_dir)
    fallbacks = 0
    examples: list[str] = []
    with no_space_named(out_dir.absolute().parent, f"the aligned dataset {out_dir}"), \
            atomic_dir(out_dir, step="align") as tmp, ShardReader(dataset_dir) as reader, \
            ShardWriter(tmp, max_shard_bytes=shard_size_mb << 20) as writer:
        for row in iter_manifest(dataset_dir):
            where = f"{dataset_dir}: {row['file']}"
            crop, info = _align_row(reader.read(row), size, detector, choose, where)
            fallback = crop is None
            if fallback:
                fallbacks += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(row["file"])
            extra = {key: value for key, value in row.items()
                     if key not in ("identity", "file", "synthetic", "shard", "offset", "size")}
            extra.update(width=size, height=size, align={
                "score": None if fallback else info["score"],
                "landmarks": None if fallback else info["landmarks"], "fallback": fallback})
            image = info.pop("_fallback") if fallback else crop
            writer.add(row["identity"], row["file"], codec.encode_jpeg(image, ALIGN_JPEG_QUALITY),
                       synthetic=row["synthetic"], **extra)
            if writer.images % 1000 == 0:
                log.info("align: %d images, %d fell back to the centre crop", writer.images, fallbacks)
        if not writer.images:
            raise InputError(f"{dataset_dir}: the manifest lists no image to align")
        _check_fallbacks(dataset_dir, fallbacks, writer.images, examples, max_fallback_fraction)
        writer.close()
        summary = {"images": writer.images, "identities": len(writer.identities),
                   "align_fallbacks": fallbacks, "align_fallback_examples": examples,
                   "shards": len(shard_files(tmp)), "alignment": alignment_info(size, choose)}
        kept = {key: extract_summary[key] for key in KEPT_EXTRACT_FIELDS if key in extract_summary}
        write_json(tmp / DATASET_JSON, {**kept, **summary})
    log.info("%s: %d images of %d identities aligned to %dx%d, %d fell back to the centre crop",
             out_dir, summary["images"], summary["identities"], size, size, fallbacks)
    return summary


def _align_row(data: bytes, size: int, detector: FaceDetector, choose: str,
               where: str) -> tuple[Image.Image | None, dict[str, Any]]:
    """(crop, info) of one stored image; (None, {"_fallback": centre crop}) when it holds no face."""
    try:
        image = codec.decode_rgb(data)
    except codec.UnusableImage as exc:
        raise InputError(f"{where}: cannot align it: {exc.reason}") from None
    with image:
        crop, info = _align_image(image, size, detector, choose)
        if crop is None:
            info["_fallback"] = centre_crop(image, size)
    return crop, info


def _check_fallbacks(dataset_dir: Path, fallbacks: int, images: int, examples: list[str],
                     max_fraction: float) -> None:
    """InputError when more than `max_fraction` of the images fell back to the centre crop."""
    if fallbacks <= max_fraction * images:
        return
    raise InputError(f"{dataset_dir}: no face found in {fallbacks} of {images} images "
                     f"({fallbacks / images:.1%}, more than max_fallback_fraction {max_fraction:g}), "
                     f"e.g. {', '.join(examples)}; is it a face dataset? Raise max_fallback_fraction "
                     f"to keep their centre crops, or align with method 'none'")
