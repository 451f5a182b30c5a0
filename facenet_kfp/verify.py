"""Use a trained model on image files: verify one pair of faces, or write embeddings of many."""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.evaluate import (DISTANCE_LABELS, DISTANCES, MODEL_JSON, THRESHOLD_JSON, distance_name,
                                  model_distance_squared, pair_distances)
from facenet_kfp.fsutil import atomic_file, read_json
from facenet_kfp.progress import Progress

log = logging.getLogger(__name__)

EMBEDDING_FORMATS = (".npz", ".csv", ".tsv")


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file as the model's decoder reads them; InputError naming the file otherwise.

    The same check as the extract step (`extract.check_image`): the file is
    fully decoded with Pillow, and a format TensorFlow's decoder cannot read
    as it is (a 1-bit BMP, a CMYK JPEG, TIFF, WebP) comes back as lossless PNG.
    Images over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``, about 89
    megapixels) are refused before their pixels are decoded: a small file can
    declare a huge image (a decompression bomb).
    """
    from PIL import Image

    from facenet_kfp.extract import check_image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            check = check_image(data)
    except Image.DecompressionBombWarning as exc:
        raise InputError(f"{path}: image too large to decode safely ({exc}); resize it") from exc
    if check.reason.startswith("too many pixels"):
        raise InputError(f"{path}: image too large to decode safely ({check.reason}); resize it")
    if check.reason:
        raise InputError(f"{path}: not a readable image ({check.reason})")
    return check.encoded or data


def _check_model_dir(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")
    if not (model_dir / MODEL_JSON).is_file():
        raise InputError(f"{model_dir / MODEL_JSON}: not found; is {model_dir} a model folder from train?")
    return model_dir


def _load_model(model_dir: str | os.PathLike) -> tuple[Any, dict[str, Any], bool]:
    """(Keras model, model.json metadata, squared distances?) after checking model.json is there."""
    model_dir = _check_model_dir(model_dir)
    from facenet_kfp import export

    model, metadata = export.load_model_artifact(model_dir)
    return model, metadata, model_distance_squared(metadata, model_dir)


def find_threshold_file(model_dir: str | os.PathLike, threshold_file: str | os.PathLike | None = None
                        ) -> Path | None:
    """The threshold.json to use: `threshold_file` when given (it must exist), else
    ``<model_dir>/threshold.json``, else a ``threshold.json`` next to the model folder; None if none."""
    if threshold_file is not None:
        path = Path(threshold_file)
        if not path.is_file():
            raise InputError(f"{path}: threshold file not found")
        return path
    model_dir = Path(model_dir)
    for path in (model_dir / THRESHOLD_JSON, model_dir.parent / THRESHOLD_JSON):
        if path.is_file():
            return path
    return None


def read_threshold_file(path: str | os.PathLike) -> tuple[float, str]:
    """(threshold, distance name) of a threshold.json from evaluate; the distance is one of DISTANCES."""
    path = Path(path)
    info = read_json(path)
    if not isinstance(info, dict) or "threshold" not in info or "distance" not in info:
        raise InputError(f"{path}: expected a threshold.json from evaluate with keys 'threshold' and 'distance'")
    threshold = info["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InputError(f"{path}: 'threshold' must be a finite number, got {threshold!r}")
    if info["distance"] not in DISTANCES:
        raise InputError(f"{path}: 'distance' must be one of {', '.join(DISTANCES)}, got {info['distance']!r}")
    return float(threshold), info["distance"]


def verify_pair(model_dir: str | os.PathLike, image_a: str | os.PathLike, image_b: str | os.PathLike,
                threshold: float | None = None, threshold_file: str | os.PathLike | None = None
                ) -> dict[str, Any]:
    """Are two face images the same person? Distance between their embeddings against a threshold.

    The threshold is, in order: `threshold` (in the model's own distance,
    model.json: squared L2 ``‖a − b‖²`` or plain L2 ``‖a − b‖``), the file
    `threshold_file`, ``<model_dir>/threshold.json``, or ``threshold.json`` next
    to the model folder; a file's threshold comes with the distance evaluate used
    (squared_l2, l2 or cosine), and that distance is computed. Same person when
    ``distance < threshold``.

    Returns ``{"distance", "threshold", "threshold_source", "distance_definition":
    "squared_l2" | "l2" | "cosine", "squared", "same", "verdict": "same person" |
    "different people", "image_a", "image_b"}``.
    """
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise InputError(f"threshold must be a finite number, got {threshold!r}")
    # Cheap checks first: the (slow) model load comes after the images, model.json and threshold.
    data_a, data_b = read_image_file(image_a), read_image_file(image_b)
    model_dir = _check_model_dir(model_dir)
    squared = model_distance_squared(read_json(model_dir / MODEL_JSON), model_dir)
    source_path = None if threshold is not None else find_threshold_file(model_dir, threshold_file)
    if threshold is None and source_path is None:
        raise InputError(f"no threshold: neither {model_dir / THRESHOLD_JSON} nor "
                         f"{model_dir.parent / THRESHOLD_JSON} exists; pass --threshold VALUE or "
                         f"--threshold-file threshold.json (from the evaluate step)")
    name = distance_name(squared)
    if source_path is not None:
        threshold, name = read_threshold_file(source_path)

    model, metadata, _ = _load_model(model_dir)
    from facenet_kfp import export

    embeddings = np.asarray(export.embed_images(model, metadata, [data_a, data_b], 2), dtype=np.float32)
    distance = float(pair_distances(embeddings, np.array([0]), np.array([1]), name)[0])
    same = distance < float(threshold)
    log.info("%s vs %s: distance %.4f (%s), threshold %.4f: %s", image_a, image_b, distance,
             DISTANCE_LABELS[name], threshold, "same person" if same else "different people")
    return {"distance": distance, "threshold": float(threshold),
            "threshold_source": "argument" if source_path is None else str(source_path),
            "distance_definition": name, "squared": name == "squared_l2", "same": bool(same),
            "verdict": "same person" if same else "different people",
            "image_a": str(image_a), "image_b": str(image_b)}


def embed_files(model_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                out_file: str | os.PathLike, batch_size: int = 64) -> dict[str, Any]:
    """Embed image files with the model and its preprocessing; write them to `out_file` atomically.

    Format by extension: ``.npz`` holds ``embeddings`` (float32 [N, D]) and
    ``paths`` (str [N]); ``.csv`` / ``.tsv`` have a header ``path,e0,...,e{D-1}``
    and one row per image (comma or tab separated). Rows follow `paths`.
    Returns ``{"images": N, "dim": D, "out": str(out_file)}``.
    """
    out_file = Path(out_file)
    suffix = out_file.suffix.lower()
    if suffix not in EMBEDDING_FORMATS:
        raise InputError(f"{out_file}: output must end in {', '.join(EMBEDDING_FORMATS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no image files to embed")
    _check_embeddings_replaceable(out_file)
    # Check every file before the (slow) model load, so a typo fails at once.
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: image file not found")
    model, metadata, _ = _load_model(model_dir)
    from facenet_kfp import export

    chunk = max(batch_size * 8, 256)
    parts = []
    with Progress("embedding images", total=len(paths), unit="images", logger=log) as progress:
        for start in range(0, len(paths), chunk):
            images = [read_image_file(p) for p in paths[start:start + chunk]]
            parts.append(np.asarray(export.embed_images(model, metadata, images, batch_size), dtype=np.float32))
            progress.update(len(images))
    embeddings = np.concatenate(parts)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
        raise InputError(f"model returned embeddings of shape {embeddings.shape} for {len(paths)} images")
    dim = int(embeddings.shape[1])

    if suffix == ".npz":
        with atomic_file(out_file, "wb") as handle:
            np.savez(handle, embeddings=embeddings, paths=np.asarray(paths, dtype=str))
    else:
        with atomic_file(out_file, "w") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
            writer.writerow(["path"] + [f"e{i}" for i in range(dim)])
            for path, row in zip(paths, embeddings):
                # 9 significant digits print any float32 exactly (it reads back bit for bit).
                writer.writerow([path] + [f"{v:.9g}" for v in row.tolist()])
    log.info("wrote %d embeddings of dimension %d to %s", len(paths), dim, out_file)
    return {"images": len(paths), "dim": dim, "out": str(out_file)}


def _check_embeddings_replaceable(out_file: Path) -> None:
    """InputError unless `out_file` is absent or an earlier embeddings file of this format.

    Recognised: an .npz holding exactly the arrays ``embeddings`` and ``paths``,
    or a .csv / .tsv whose header is ``path,e0,...``. Anything else may be a
    user's file and is not replaced.
    """
    if not out_file.exists() and not out_file.is_symlink():
        return
    why = "is not a regular file"
    if out_file.is_file() and not out_file.is_symlink():
        why = "is not an embeddings file written by embed"
        try:
            if out_file.suffix.lower() == ".npz":
                with np.load(out_file, allow_pickle=False) as npz:
                    if sorted(npz.files) == ["embeddings", "paths"]:
                        return
            else:
                delimiter = "\t" if out_file.suffix.lower() == ".tsv" else ","
                with open(out_file, newline="", encoding="utf-8") as handle:
                    header = next(csv.reader(handle, delimiter=delimiter), [])
                if header[:2] == ["path", "e0"] and header[1:] == [f"e{i}" for i in range(len(header) - 1)]:
                    return
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, csv.Error) as exc:
            why = f"is not an embeddings file written by embed ({exc})"
    raise InputError(f"{out_file}: refusing to replace it: it {why}; remove it or choose "
                     f"another --out")
