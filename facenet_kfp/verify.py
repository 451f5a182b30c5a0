"""Use a trained model on image files: verify one pair of faces, or write embeddings of many.

The model and its evaluated threshold come from a model folder and a
threshold.json, or from a pipeline run (`run_artifacts`: the pipeline root's
summary.json, or a run folder). A threshold.json is used only with the model it
was evaluated for (`check_threshold_for_model`).

A model trained on aligned faces (model.json's ``alignment``, method
"mtcnn") gets each photo aligned the way the align step aligned its training
images before preprocessing: the face detected, the one `face` picks (the most
central, or the largest) warped onto the template at the recorded size
(`align.align_photo`) and stored as the align step stores its crops (JPEG of
its quality). A photo without a face is refused, naming it; ``detect=False``
takes images that are aligned crops already. Other models see the photo as it
is.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.evaluate import (DISTANCE_LABELS, DISTANCE_NAMES, DISTANCES, MODEL_JSON, THRESHOLD_JSON,
                                  model_distance, pair_distances)
from facenet_kfp.fsutil import atomic_file, file_sha256, local_path, read_json
from facenet_kfp.objectives import MAX_DISTANCE   # a threshold lies in [0, this]
from facenet_kfp.progress import Progress

log = logging.getLogger(__name__)
DISTANCE_NAMES_OF_MODELS = tuple(DISTANCE_NAMES.values())   # a model's own distance: squared_l2 or l2

EMBEDDING_FORMATS = (".npz", ".csv", ".tsv")
# Where a local pipeline run keeps the model and the threshold (task folder, output name).
RUN_MODEL = ("train-model", "model")
RUN_THRESHOLDS = (("evaluate-model", "threshold"), ("evaluate-on-archive", "threshold"))
# Which face of a photo with several stands for it (`align.choose_face`'s rules; align imports TensorFlow
# only when it detects, but this module's import stays light).
FACE_RULES = ("central", "largest")


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file as the model's decoder reads them (`read_image_bytes`); InputError
    naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    return read_image_bytes(path.read_bytes(), str(path))


def read_image_bytes(data: bytes, where: str) -> bytes:
    """Encoded image `data` as the model's decoder reads it; InputError naming `where` otherwise.

    The extract step's rule (`codec.open_image`): the image is fully decoded
    with Pillow, and a format TensorFlow's decoder cannot read as it is (a
    1-bit BMP, a CMYK JPEG, TIFF, WebP) comes back as lossless PNG
    (`codec.reencoded`). An image over ``MAX_IMAGE_PIXELS`` is refused before
    its pixels are decoded (a small file can declare a huge image, a
    decompression bomb), and so is one with a side under ``MIN_IMAGE_SIDE``.
    The server (`serve_protocol.accept_image`) takes request images through it.
    """
    from facenet_kfp.codec import TOO_LARGE, TOO_SMALL, UnusableImage, open_image, reencoded

    try:
        with open_image(data) as image:
            return reencoded(image) or data
    except UnusableImage as exc:
        if exc.reason.startswith(TOO_LARGE):
            raise InputError(f"{where}: image too large to decode safely ({exc.reason})") from None
        if exc.reason.startswith(TOO_SMALL):
            raise InputError(f"{where}: image too small to use ({exc.reason})") from None
        raise InputError(f"{where}: not a readable image ({exc.reason})") from None


def check_image_path(path: str | os.PathLike) -> None:
    """InputError unless `path` is an image file (a folder or a missing path is named as such)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file; give the image files in it "
                         f"(e.g. {path}/*.jpg)")
    if not path.is_file():
        raise InputError(f"{path}: image file not found")


def _check_model_dir(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise InputError(f"{model_dir}: is a file, not a model folder (give the folder train wrote, which "
                         f"holds {MODEL_JSON})")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")
    if not (model_dir / MODEL_JSON).is_file():
        raise InputError(f"{model_dir / MODEL_JSON}: not found; is {model_dir} a model folder from train?")
    return model_dir


def _load_model(model_dir: str | os.PathLike) -> tuple[Any, dict[str, Any], str]:
    """(Keras model, model.json metadata, the model's own distance name) after checking model.json is there."""
    model_dir = _check_model_dir(model_dir)
    from facenet_kfp import export

    model, metadata = export.load_model_artifact(model_dir)
    return model, metadata, model_distance(metadata, model_dir)


def find_threshold_file(model_dir: str | os.PathLike, threshold_file: str | os.PathLike | None = None
                        ) -> Path | None:
    """The threshold.json to use: `threshold_file` when given (it must exist), else
    ``<model_dir>/threshold.json``, else a ``threshold.json`` next to the model folder; None if none."""
    if threshold_file is not None:
        path = Path(threshold_file)
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a threshold file (give the threshold.json in it)")
        if not path.is_file():
            raise InputError(f"{path}: threshold file not found")
        return path
    model_dir = Path(model_dir)
    for path in (model_dir / THRESHOLD_JSON, model_dir.parent / THRESHOLD_JSON):
        if path.is_file():
            return path
    return None


def check_threshold_value(threshold: Any, distance: str, where: str) -> float:
    """`threshold` as a float; InputError naming `where` unless it is a number in [0, MAX_DISTANCE]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InputError(f"{where} must be a finite number, got {threshold!r}")
    if not 0 <= threshold <= MAX_DISTANCE[distance]:
        raise InputError(f"{where} must be in [0, {MAX_DISTANCE[distance]:g}] ({DISTANCE_LABELS[distance]} "
                         f"distances of unit vectors lie there), got {threshold:g}")
    return float(threshold)


def read_threshold_info(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a threshold.json from evaluate, its threshold and distance checked."""
    path = Path(path)
    info = read_json(path)
    if not isinstance(info, dict) or "threshold" not in info or "distance" not in info:
        raise InputError(f"{path}: expected a threshold.json from evaluate with keys 'threshold' and 'distance'")
    if info["distance"] not in DISTANCES:
        raise InputError(f"{path}: 'distance' must be one of {', '.join(DISTANCES)}, got {info['distance']!r}")
    check_threshold_value(info["threshold"], info["distance"], f"{path}: 'threshold'")
    return info


def read_threshold_file(path: str | os.PathLike) -> tuple[float, str]:
    """(threshold, distance name) of a threshold.json from evaluate; the distance is one of DISTANCES."""
    info = read_threshold_info(path)
    return float(info["threshold"]), info["distance"]


def check_threshold_for_model(info: dict[str, Any], path: str | os.PathLike, model_dir: str | os.PathLike,
                              metadata: dict[str, Any]) -> None:
    """InputError, naming both, unless threshold.json `info` (at `path`) was evaluated for this model.

    Compared with model.json `metadata`: the embedding size, the model's own
    distance (model.json's ``distance.name``; threshold.json's ``model_distance``), the
    preprocessing and the model file's sha256 (``model_sha256``), as far as
    threshold.json records them. A file that names no model (no
    ``embedding_dim``) cannot be checked and is refused. Without
    ``model_distance`` (written by earlier versions), a squared or plain L2
    `distance` must be the model's own.
    """
    model_dir = Path(model_dir)
    fix = (f"use the threshold.json evaluate wrote for {model_dir} (facenet-kfp verify --run "
           f"PIPELINE_ROOT takes a run's model and threshold together), or pass --threshold VALUE")
    owner = f"model {info['model']}" if isinstance(info.get("model"), str) else "another model"
    json_path = model_dir / MODEL_JSON
    if "embedding_dim" not in info:
        raise InputError(f"{path}: names no model (no 'embedding_dim'), so it cannot be checked against "
                         f"{model_dir}; {fix}")
    if info["embedding_dim"] != metadata.get("embedding_dim"):
        raise InputError(f"{path} was evaluated for {owner} with {info['embedding_dim']}-D embeddings, but "
                         f"{model_dir} gives {metadata.get('embedding_dim')}-D embeddings ({json_path}); {fix}")
    own = model_distance(metadata, model_dir)
    recorded = info.get("model_distance")
    if recorded is None and info["distance"] in DISTANCE_NAMES_OF_MODELS and info["distance"] != own:
        recorded = info["distance"]
    if recorded is not None and recorded != own:
        raise InputError(f"{path} was evaluated for {owner} trained with {DISTANCE_LABELS.get(recorded, recorded)} "
                         f"distances ({recorded}), but {model_dir} was trained with {DISTANCE_LABELS[own]} "
                         f"distances ({json_path}: distance.name {own}); {fix}")
    if "preprocessing" in info and info["preprocessing"] != metadata.get("preprocessing"):
        raise InputError(f"{path} was evaluated for {owner} with preprocessing {info['preprocessing']}, but "
                         f"{json_path} says {metadata.get('preprocessing')}; {fix}")
    if "model_sha256" in info:
        model_file = model_dir / str(metadata.get("file", "model.keras"))
        actual = file_sha256(model_file) if model_file.is_file() else "(missing)"
        if actual != info["model_sha256"]:
            raise InputError(f"{path} was evaluated for {owner} (model file sha256 {str(info['model_sha256'])[:16]}…), "
                             f"not for {model_file} (sha256 {actual[:16]}…); {fix}")


def verify_pair(model_dir: str | os.PathLike, image_a: str | os.PathLike, image_b: str | os.PathLike,
                threshold: float | None = None, threshold_file: str | os.PathLike | None = None,
                detect: bool = True, face: str = "central") -> dict[str, Any]:
    """Are two face images the same person? Distance between their embeddings against a threshold.

    The threshold is, in order: `threshold` (in the model's own distance,
    model.json's ``distance.name``: squared L2 ``‖a − b‖²``, plain L2 ``‖a − b‖``
    or cosine), the file
    `threshold_file`, ``<model_dir>/threshold.json``, or ``threshold.json`` next
    to the model folder; a file's threshold comes with the distance evaluate used
    (squared_l2, l2 or cosine), and that distance is computed. Same person when
    ``distance < threshold``. A threshold lies in [0, the distance's largest
    value between unit vectors] (`MAX_DISTANCE`); a file's must have been
    evaluated for this model (`check_threshold_for_model`).

    A model trained on aligned faces gets both photos aligned first (module
    docstring; `face`: "central" or "largest", the face used when a photo
    shows several; `detect=False`: the photos are aligned crops already).

    Returns ``{"distance", "threshold", "threshold_source", "distance_definition":
    "squared_l2" | "l2" | "cosine", "squared", "same", "verdict": "same person" |
    "different people", "image_a", "image_b"}``; for a model trained on aligned
    faces also ``"alignment"`` (`photo_alignment`) and, when detecting,
    ``"faces"``: what `align_photos` found in image_a and image_b.
    """
    check_face_rule(face)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise InputError(f"threshold must be a finite number, got {threshold!r}")
    # Cheap checks first: the (slow) model load comes after the images, model.json and threshold.
    for image in (image_a, image_b):
        check_image_path(image)
    data_a, data_b = read_image_file(image_a), read_image_file(image_b)
    model_dir = _check_model_dir(model_dir)
    metadata = read_json(model_dir / MODEL_JSON)
    name = model_distance(metadata, model_dir)
    source_path = None if threshold is not None else find_threshold_file(model_dir, threshold_file)
    if threshold is None and source_path is None:
        raise InputError(f"no threshold: neither {model_dir / THRESHOLD_JSON} nor "
                         f"{model_dir.parent / THRESHOLD_JSON} exists; pass --threshold VALUE, "
                         f"--threshold-file threshold.json (from the evaluate step) or --run PIPELINE_ROOT "
                         f"(a run's model and threshold)")
    if source_path is not None:
        info = read_threshold_info(source_path)
        check_threshold_for_model(info, source_path, model_dir, metadata)
        threshold, name = float(info["threshold"]), info["distance"]
    else:
        threshold = check_threshold_value(threshold, name, "threshold")

    # Faces are detected before the model load too: a photo without one fails at once.
    alignment = photo_alignment(metadata, model_dir, detect, face)
    faces = None
    if alignment["method"] != "none" and detect:
        (data_a, data_b), faces = align_photos([data_a, data_b], [image_a, image_b], alignment)

    model, metadata, _ = _load_model(model_dir)
    from facenet_kfp import export

    embeddings = np.asarray(export.embed_images(model, metadata, [data_a, data_b], 2), dtype=np.float32)
    distance = float(pair_distances(embeddings, np.array([0]), np.array([1]), name)[0])
    same = distance < float(threshold)
    log.info("%s vs %s: distance %.4f (%s), threshold %.4f: %s", image_a, image_b, distance,
             DISTANCE_LABELS[name], threshold, "same person" if same else "different people")
    result = {"distance": distance, "threshold": float(threshold),
              "threshold_source": "argument" if source_path is None else str(source_path),
              "distance_definition": name, "squared": name == "squared_l2", "same": bool(same),
              "verdict": "same person" if same else "different people",
              "image_a": str(image_a), "image_b": str(image_b)}
    if alignment["method"] != "none":
        result["alignment"] = alignment
        if faces is not None:
            result["faces"] = faces
    return result


# --- photos of a model trained on aligned faces -----------------------------------------------

def check_face_rule(face: str) -> None:
    """InputError unless `face` is one of FACE_RULES."""
    if face not in FACE_RULES:
        raise InputError(f"face must be one of {', '.join(FACE_RULES)}, got {face!r}")


def photo_alignment(metadata: dict[str, Any], model_dir: str | os.PathLike, detect: bool = True,
                    face: str = "central") -> dict[str, Any]:
    """What is done to each photo before preprocessing, from model.json `metadata` (`export.alignment_of`).

    ``{"method": "none"}`` for a model trained on unaligned images (photos used
    as they are; `detect` and `face` change nothing); else ``{"method":
    "mtcnn", "size": S, "detect": True, "face": "central" | "largest",
    "jpeg_quality": Q}`` (each photo aligned to an S x S crop stored as a JPEG
    of quality Q, the align step's), or with `detect` False ``{"method":
    "mtcnn", "size": S, "detect": False}`` (the photos are taken as aligned
    crops already).
    """
    from facenet_kfp import export

    alignment = export.alignment_of(metadata, Path(model_dir) / MODEL_JSON)
    if alignment is None:
        if not detect or face != "central":
            log.info("%s was trained on unaligned images: photos are used as they are (no face detection)",
                     model_dir)
        return {"method": "none"}
    if not detect:
        return {"method": alignment["method"], "size": int(alignment["size"]), "detect": False}
    from facenet_kfp import align

    quality = alignment.get("jpeg_quality", align.ALIGN_JPEG_QUALITY)
    return {"method": alignment["method"], "size": int(alignment["size"]), "detect": True, "face": face,
            "jpeg_quality": int(quality)}


def align_photos(images: Sequence[bytes], paths: Sequence[str | os.PathLike], alignment: dict[str, Any],
                 hint: str | None = None) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Each encoded photo's face aligned as the align step aligns it, and what was found in each.

    `alignment` is `photo_alignment`'s (method mtcnn, detecting):
    `align.align_photo` with its size and face rule, the crop encoded as a JPEG
    of its quality. Returns (the crops' bytes, one ``{"path", "faces" (number
    found), "chosen" (the rule), "score", "box" ([x, y, w, h] in the photo's
    pixels)}`` per photo). InputError naming the file when a photo shows no face; its advice is
    `hint` when given, else the command line's (--no-detect for aligned crops).
    """
    from facenet_kfp import align, codec

    detector = align.FaceDetector()
    crops, found = [], []
    for data, path in zip(images, paths):
        try:
            crop, info = align.align_photo(data, size=alignment["size"], detector=detector,
                                           choose=alignment["face"], where=str(path))
        except InputError as exc:
            advice = hint if hint is not None else (f"pass --no-detect for images that are aligned "
                                                    f"{alignment['size']}x{alignment['size']} crops already")
            raise InputError(f"{exc} (the model was trained on faces aligned by {alignment['method']}; "
                             f"{advice})") from None
        crops.append(codec.encode_jpeg(crop, alignment["jpeg_quality"]))
        found.append({"path": str(path), "faces": int(info["faces"]), "chosen": info["chosen"],
                      "score": info["score"], "box": info["box"]})
        log.info("%s: %d face(s) found, the %s one used (score %.3f)", path, info["faces"],
                 "most central" if info["chosen"] == "central" else "largest", info["score"])
    return crops, found


def embed_files(model_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                out_file: str | os.PathLike, batch_size: int = 64, detect: bool = True,
                face: str = "central") -> dict[str, Any]:
    """Embed image files with the model and its preprocessing; write them to `out_file` atomically.

    Format by extension: ``.npz`` holds ``embeddings`` (float32 [N, D]) and
    ``paths`` (str [N]); ``.csv`` / ``.tsv`` have a header ``path,e0,...,e{D-1}``
    and one row per image (comma or tab separated). Rows follow `paths`.
    Returns ``{"images": N, "dim": D, "out": str(out_file)}``. A model trained
    on aligned faces gets each photo aligned first (as `verify_pair`; `detect`,
    `face`), and the summary adds ``"alignment"`` (`photo_alignment`) and, when
    detecting, ``"faces"``: per image, what `align_photos` found.
    """
    out_file = Path(out_file)
    suffix = out_file.suffix.lower()
    if suffix not in EMBEDDING_FORMATS:
        raise InputError(f"{out_file}: output must end in {', '.join(EMBEDDING_FORMATS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_face_rule(face)
    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no image files to embed")
    _check_embeddings_replaceable(out_file)
    # Check every file before the (slow) model load, so a typo fails at once.
    for path in paths:
        check_image_path(path)
    alignment = photo_alignment(read_json(_check_model_dir(model_dir) / MODEL_JSON), model_dir, detect, face)
    model, metadata, _ = _load_model(model_dir)
    from facenet_kfp import export

    detecting = alignment["method"] != "none" and detect
    faces: list[dict[str, Any]] = []
    chunk = max(batch_size * 8, 256)
    parts = []
    with Progress("embedding images", total=len(paths), unit="images", logger=log) as progress:
        for start in range(0, len(paths), chunk):
            images = [read_image_file(p) for p in paths[start:start + chunk]]
            if detecting:
                images, found = align_photos(images, paths[start:start + chunk], alignment)
                faces.extend(found)
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
    summary: dict[str, Any] = {"images": len(paths), "dim": dim, "out": str(out_file)}
    if alignment["method"] != "none":
        summary["alignment"] = alignment
        if detecting:
            summary["faces"] = faces
    return summary


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


# --- the model and threshold of a pipeline run ------------------------------------------------

def run_artifacts(run: str | os.PathLike) -> tuple[Path, Path | None, str]:
    """(model folder, threshold.json or None, where they were found) of a local pipeline run.

    `run` is a pipeline root (its summary.json or rerun-summary.json: the
    newest that lists a model, ``metrics.model_uri`` or ``artifacts.model``,
    with ``metrics.threshold_uri`` of the same summary, else of an older one
    listing the same model), a summary file, or a run folder
    (``train-model/model`` and ``evaluate-model/threshold`` or
    ``evaluate-on-archive/threshold``, else the folder's threshold.json).
    The threshold is None when the run evaluated none for its model;
    InputError names what is missing.
    """
    from facenet_kfp.runs import RERUN_SUMMARY, SUMMARY

    path = Path(run).expanduser()
    if not path.exists():
        raise InputError(f"--run {run}: no such pipeline root, run folder or summary file")
    summaries = [path] if path.is_file() else [p for p in (path / SUMMARY, path / RERUN_SUMMARY) if p.is_file()]
    if summaries:
        return _from_summaries(sorted(summaries, key=lambda p: p.stat().st_mtime_ns, reverse=True))
    model_dir = path.joinpath(*RUN_MODEL)
    if not model_dir.is_dir():
        raise InputError(f"--run {path}: neither a pipeline root (no {SUMMARY} or {RERUN_SUMMARY}) nor a run "
                         f"folder with {'/'.join(RUN_MODEL)}/ (a task that was a cache hit has no folder in "
                         f"its run folder: pass the pipeline root instead)")
    for task, output in RUN_THRESHOLDS:
        if path.joinpath(task, output).is_file():
            return model_dir, path / task / output, f"run folder {path}"
    copy = path / THRESHOLD_JSON
    return model_dir, copy if copy.is_file() else None, f"run folder {path}"


def _listed_path(uri: Any, key: str, summary: Path) -> Path:
    """The local path of a URI a summary lists under `key`; InputError naming the summary otherwise."""
    path = local_path(uri) if isinstance(uri, str) else None
    if path is None:
        raise InputError(f"{summary}: {key} {uri!r} is not a local path (copy the artifact here and pass "
                         f"--model / --threshold-file)")
    return path.expanduser().resolve()


def _from_summaries(summaries: list[Path]) -> tuple[Path, Path | None, str]:
    """`run_artifacts` of summary files, newest first."""
    listed, seen = [], []
    for summary in summaries:
        content = read_json(summary)
        metrics = content.get("metrics") if isinstance(content, dict) else None
        if not isinstance(metrics, dict):
            raise InputError(f"{summary}: not a pipeline summary (no 'metrics')")
        artifacts = content.get("artifacts") if isinstance(content.get("artifacts"), dict) else {}
        model_uri = metrics.get("model_uri") or artifacts.get("model")
        if model_uri:
            listed.append((summary, content, model_uri, metrics.get("threshold_uri")))
        error = f": {content['error']}" if content.get("error") else ""
        seen.append(f"{summary} ({content.get('status', 'no status')}{error})")
    if not listed:
        raise InputError(f"--run: no trained model listed in {'; '.join(seen)}: the run did not get as far "
                         f"as training")
    def same(uri: Any) -> Any:   # a path and its file:// URI name the same model
        path = local_path(uri) if isinstance(uri, str) else None
        return path.expanduser().resolve() if path is not None else uri

    summary, content, model_uri, threshold_uri = listed[0]
    if not threshold_uri:   # an older summary may list this model with its threshold (a later rerun of splits)
        threshold_uri = next((t for _, _, m, t in listed[1:] if same(m) == same(model_uri) and t), None)
    model_dir = _listed_path(model_uri, "model_uri", summary)
    if not (model_dir / MODEL_JSON).is_file():
        raise InputError(f"{summary}: the run's model {model_dir} is gone ({model_dir / MODEL_JSON} not found)")
    if not threshold_uri:
        why = (f"the run failed: {content['error']}" if content.get("status") == "FAILED" and content.get("error")
               else "evaluate did not run on this model")
        log.info("%s lists model %s but no threshold (%s)", summary, model_dir, why)
        return model_dir, None, f"{summary} (no threshold: {why})"
    threshold_path = _listed_path(threshold_uri, "threshold_uri", summary)
    if not threshold_path.is_file():
        raise InputError(f"{summary}: the run's threshold {threshold_path} is gone (file not found)")
    return model_dir, threshold_path, str(summary)
