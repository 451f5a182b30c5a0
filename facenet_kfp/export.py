"""The model artifact: the folder `train` writes and `evaluate`, `verify` and serving load.

Layout of a model folder::

    model.keras      the embedding network, Keras 3 native format (float32 weights), built-in
                     layers only: plain `keras.saving.load_model("model.keras")` loads it on the
                     TensorFlow or JAX backend, no facenet_kfp import needed (`load_model_artifact`
                     also checks it against model.json)
    model.json       everything needed to use it (below)
    history.json     training curves: {"train": [{step, loss, fraction_positive_triplets,
                     mean_positive_distance, mean_negative_distance, ...}, ...], "val": [...]}
    curves.png       loss, fraction of positive triplets and mean distances, train and val
    saved_model/     TensorFlow SavedModel for serving stacks (TF Serving, Vertex AI), written
                     whenever TensorFlow is importable, on either Keras backend; two signatures:
                       serve(images: float32 [N, S, S, 3], preprocessed) -> {embeddings: [N, D]}
                       serve_image_bytes(images: string [N], JPEG/PNG bytes) -> {embeddings: [N, D]}
                     the second applies `tf_input.preprocess_image` inside the graph (serving_default
                     is `serve`). Without TensorFlow the folder has no saved_model/ and model.json
                     says why; `export_saved_model` writes one later where TensorFlow is installed.
    serving/1/       the same SavedModel, whose default signature is the bytes one:
                       serving_default(images: string [N], JPEG/PNG bytes) -> {embeddings: [N, D]}
                     (serve and serve_image_bytes too), in the integer version folder TensorFlow
                     Serving wants: KServe's `tensorflow` runtime serves it with storageUri
                     <model>/serving. Written with saved_model/, from the same traced functions.
    model.onnx       the embedding network as float32 ONNX (`onnx_export`): input "images" float32
                     [N, S, S, 3] NHWC, preprocessed as "preprocessing" says; output "embeddings"
                     float32 [N, D]. Written whenever TensorFlow and tf2onnx are importable; a model
                     trained on JAX is converted from model.keras in a child Python on the
                     TensorFlow backend. Otherwise model.json's onnx_missing says why.

model.json keys::

    format          "facenet-kfp-model/1"
    file            "model.keras"
    files           what the folder holds: model.keras, model.json, history.json, curves.png
                    and, when written, saved_model/, serving/ and model.onnx
    load            how to load model.keras (plain keras.saving.load_model)
    saved_model     "saved_model" or null
    saved_model_missing  null, or why there is no saved_model/ (TensorFlow not importable)
    serving         {saved_model: "serving/1", signature: "serving_default",
                     input: {name: "images", dtype: "string", shape: [null], content: ...},
                     output: {name: "embeddings", dtype: "float32", shape: [null, D]}}, or null
                    when saved_model is (no TensorFlow)
    onnx            {file: "model.onnx", input: {name: "images", shape: [null, S, S, 3],
                     layout: "NHWC", dtype: "float32"}, output: {name: "embeddings",
                     shape: [null, D], dtype: "float32"}, preprocessing (as below), opset}, or null
    onnx_missing    null, or why there is no model.onnx (TensorFlow or tf2onnx not importable)
    architecture    nn4_small2 | small_cnn
    input_shape     [S, S, 3]
    embedding_dim   D (embeddings are L2-normalised, float32)
    preprocessing   {version: "centre-crop-v1", image_size: S, crop_fraction, scale: "[-1,1]"}
    distance        {name: "squared_l2" | "l2" | "cosine", definition: "...", margin}: how two
                    embeddings compare, the training objective's distance (`objectives.Objective`;
                    model.json files of earlier versions have a boolean `squared` instead of `name`)
    alignment       how the faces it was trained on were aligned: the aligned dataset's
                    dataset.json "alignment" (`align.alignment_info`: {method: "mtcnn", detector,
                    size, template, margin, ...}), or {method: "none"} for images used as
                    extracted. verify and embed align each photo the same way before
                    preprocessing (`align.align_photo`); the SavedModel's serve_image_bytes
                    takes the aligned crops (it does not detect faces). A model.json without
                    the key (earlier versions) is read as {method: "none"} (`alignment_of`)
    loss, margin, trained_steps, keras_version, backend, created (UTC ISO 8601)
    start_step      the step training began at: 0, or the checkpoint step it resumed from
    ...             whatever else train adds (input fingerprints, config, final metrics)
"""

from __future__ import annotations

import datetime
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facenet_kfp import objectives
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

FORMAT = "facenet-kfp-model/1"
MODEL_FILE = "model.keras"
MODEL_JSON = "model.json"
HISTORY_JSON = "history.json"
CURVES_PNG = "curves.png"
SAVED_MODEL_DIR = "saved_model"
SERVING_DIR = "serving"                 # TensorFlow Serving's model base path: <model>/serving/<version>/
SERVING_VERSION = "1"
SERVING_SIGNATURE = "serving_default"   # the signature TensorFlow Serving and KServe call by default
DATASET_JSON = "dataset.json"           # a packed dataset's summary (extract's, or the align step's)
NO_ALIGNMENT = {"method": "none"}       # model.json "alignment" of a model trained on unaligned images
SCALE = "[-1,1]"
LOAD_HINT = ("keras.saving.load_model('model.keras') in plain Keras 3, TensorFlow or JAX backend; "
             "no facenet_kfp import needed")
DISTANCE_DEFINITIONS = {
    "squared_l2": "squared L2 between L2-normalised embeddings: sum_k (a_k - b_k)^2, in [0, 4]",
    "l2": "plain L2 between L2-normalised embeddings: sqrt(sum_k (a_k - b_k)^2), in [0, 2]",
    "cosine": "cosine distance between L2-normalised embeddings: 1 - sum_k a_k b_k, in [0, 2]",
}
# What a caller of save_model_artifact must say; the rest is derived from the model.
REQUIRED_METADATA = ("architecture", "preprocessing", "distance", "loss", "margin", "trained_steps",
                     "start_step")


def artifact_metadata(config: Any, trained_steps: int, start_step: int = 0,
                      alignment: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """model.json content derived from a `TrainConfig` (architecture, preprocessing, distance, loss).

    The distance is the training objective's (`objectives.Objective.distance`, by
    name). start_step > 0 says the model continued a checkpoint at that step.
    `alignment` is the training images' dataset.json "alignment" entry
    (`dataset_alignment`); None: {"method": "none"}.
    """
    from facenet_kfp.preprocess import PREPROCESSING_VERSION

    distance = objectives.for_config(config).distance(config)

    metadata = {
        "architecture": config.architecture,
        "preprocessing": {"version": PREPROCESSING_VERSION, "image_size": int(config.image_size),
                          "crop_fraction": float(config.crop_fraction), "scale": SCALE},
        "distance": {"name": distance, "definition": DISTANCE_DEFINITIONS[distance],
                     "margin": float(config.margin)},
        "loss": config.loss,
        "margin": float(config.margin),
        "trained_steps": int(trained_steps),
        "start_step": int(start_step),
        "alignment": dict(alignment) if alignment is not None else dict(NO_ALIGNMENT),
    }
    metadata.update(extra)
    return metadata


def _checked_alignment(alignment: Any, where: str) -> dict[str, Any]:
    """`alignment` when it is {"method": "none", ...} or {"method": "mtcnn", "size": int >= 1, ...};
    InputError naming `where` otherwise."""
    method = alignment.get("method") if isinstance(alignment, dict) else None
    if method == "none":
        return alignment
    if method != "mtcnn":
        raise InputError(f"{where}: alignment must be an object with method \"none\" or \"mtcnn\", "
                         f"got {alignment!r}")
    size = alignment.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"{where}: alignment of method mtcnn needs an integer size >= 1 (the aligned crop's "
                         f"side in pixels), got {size!r}")
    return alignment


def dataset_alignment(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """How the images of a packed dataset were aligned: its dataset.json's "alignment" entry (the align
    step's `align.alignment_info`), or {"method": "none"} when it has no dataset.json or no such entry
    (extract's output). InputError naming the file for an entry that is not an alignment."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        return dict(NO_ALIGNMENT)
    info = read_json(path)
    if not isinstance(info, dict) or "alignment" not in info:
        return dict(NO_ALIGNMENT)
    return _checked_alignment(info["alignment"], f"{path}: 'alignment'")


def alignment_of(metadata: dict[str, Any], where: str | os.PathLike = MODEL_JSON) -> dict[str, Any] | None:
    """The alignment the model was trained with, from model.json `metadata`: the "alignment" entry when
    its method is mtcnn (it has the crop "size"), None for unaligned images (method "none", or no entry:
    model.json files of earlier versions). InputError naming `where` for a malformed entry."""
    if "alignment" not in metadata:
        return None
    alignment = _checked_alignment(metadata["alignment"], f"{where}: 'alignment'")
    return None if alignment["method"] == "none" else alignment


def _complete_metadata(model: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """Check the caller's metadata against the model and add the derived keys."""
    import keras

    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise InputError(f"model metadata lacks {', '.join(missing)} (needed in {MODEL_JSON})")
    input_shape = [int(v) for v in model.input_shape[1:]]
    embedding_dim = int(model.output_shape[-1])
    pre = dict(metadata["preprocessing"])
    pre.setdefault("scale", SCALE)
    if not {"version", "image_size", "crop_fraction"} <= set(pre):
        raise InputError(f"model metadata preprocessing needs version, image_size and crop_fraction "
                         f"(artifact_metadata gives them), got {pre}")
    if input_shape[:2] != [pre["image_size"], pre["image_size"]]:
        raise InputError(f"model input {input_shape} does not match preprocessing image_size "
                         f"{pre['image_size']}")
    distance = dict(metadata["distance"])
    if distance.get("name") not in objectives.DISTANCES:
        raise InputError(f"model metadata distance.name must be one of {', '.join(objectives.DISTANCES)}, "
                         f"got {distance}")
    distance.setdefault("definition", DISTANCE_DEFINITIONS[distance["name"]])
    out = dict(metadata)
    out.update({
        "format": FORMAT,
        "file": MODEL_FILE,
        "input_shape": input_shape,
        "embedding_dim": embedding_dim,
        "preprocessing": pre,
        "distance": distance,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return out


def save_model_artifact(model: Any, out_dir: str | os.PathLike, metadata: dict[str, Any],
                        history: dict[str, Any]) -> None:
    """Write the model folder (see module docstring) atomically: all of it or nothing.

    `out_dir` may be replaced only when it is absent, empty or an earlier
    output of the train step (fsutil.atomic_dir's marker); anything else is
    refused with InputError.

    `metadata` needs REQUIRED_METADATA (see `artifact_metadata`); input_shape,
    embedding_dim, versions and the creation time are added here. `history`
    is {"train": [records], "val": [records]} as train records it. `model`
    computes in float32 (train saves a float32 copy of a mixed-precision model).

    saved_model/ and serving/1/ are written whenever TensorFlow is importable,
    model.onnx whenever TensorFlow and tf2onnx are (either backend); where
    they are not, model.json's saved_model_missing / onnx_missing say so and a
    warning is logged; nothing else in saving needs TensorFlow. InputError,
    before anything is written, for a model that is not float32; a failing
    export fails the save (FacenetError from the ONNX conversion's child
    Python) and leaves no folder.
    """
    from facenet_kfp import onnx_export

    info = _complete_metadata(model, metadata)
    onnx_export.check_float32(model)
    no_tensorflow = _why_no_tensorflow()
    no_onnx = onnx_export.why_no_onnx()
    with atomic_dir(out_dir, step="train") as tmp:
        model.save(tmp / MODEL_FILE)
        write_json(tmp / HISTORY_JSON, history)
        plot_curves(history, tmp / CURVES_PNG)
        files = [MODEL_FILE, MODEL_JSON, HISTORY_JSON, CURVES_PNG]
        if no_tensorflow is None:
            export_saved_model(model, info, tmp / SAVED_MODEL_DIR, serving_path=tmp / SERVING_DIR / SERVING_VERSION)
            files += [f"{SAVED_MODEL_DIR}/", f"{SERVING_DIR}/"]
        else:
            log.warning("%s: no %s/ or %s/ written: %s", out_dir, SAVED_MODEL_DIR, SERVING_DIR, no_tensorflow)
        if no_onnx is None:
            onnx_export.export_onnx(model, tmp / MODEL_FILE, tmp / onnx_export.ONNX_FILE)
            files.append(onnx_export.ONNX_FILE)
        else:
            log.warning("%s: no %s written: %s", out_dir, onnx_export.ONNX_FILE, no_onnx)
        info.update(files=files, load=LOAD_HINT, saved_model=None if no_tensorflow else SAVED_MODEL_DIR,
                    saved_model_missing=no_tensorflow,
                    serving=None if no_tensorflow else serving_entry(info["embedding_dim"]),
                    onnx=None if no_onnx else onnx_export.onnx_entry(tmp / onnx_export.ONNX_FILE,
                                                                     info["preprocessing"]),
                    onnx_missing=no_onnx)
        write_json(tmp / MODEL_JSON, info)
    log.info("saved model artifact %s (%s, %d-D embeddings, %s steps)", out_dir, info["architecture"],
             info["embedding_dim"], info["trained_steps"])


def serving_entry(embedding_dim: int) -> dict[str, Any]:
    """model.json's "serving" entry: where serving/1/ is and what its default signature takes and gives."""
    return {"saved_model": f"{SERVING_DIR}/{SERVING_VERSION}", "signature": SERVING_SIGNATURE,
            "input": {"name": "images", "dtype": "string", "shape": [None],
                      "content": "encoded JPEG or PNG images (aligned face crops when model.json "
                                 "alignment is mtcnn), preprocessed inside the graph"},
            "output": {"name": "embeddings", "dtype": "float32", "shape": [None, int(embedding_dim)]}}


def _why_no_tensorflow() -> str | None:
    """None when TensorFlow imports, else why saved_model/ cannot be written (for model.json and the log)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError as exc:
        return (f"TensorFlow is not importable where the model was saved ({exc}); "
                f"facenet_kfp.export.export_saved_model writes {SAVED_MODEL_DIR}/ where it is installed")
    return None


def export_saved_model(model: Any, info: dict[str, Any], path: str | os.PathLike,
                       serving_path: str | os.PathLike | None = None) -> None:
    """Write a SavedModel at `path` with a float-image and a raw-bytes signature (see module docstring).

    `info` is model.json's content (input_shape, preprocessing). With
    `serving_path`, the same traced functions are written there once more, the
    raw-bytes one as serving_default (serving/1/). Works on the TensorFlow and
    JAX Keras backends; needs TensorFlow installed. Not atomic on its own:
    callers write into a temporary folder (fsutil.atomic_dir).
    """
    import keras
    import tensorflow as tf

    from facenet_kfp.tf_input import preprocess_image

    size = info["preprocessing"]["image_size"]
    crop = info["preprocessing"]["crop_fraction"]
    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = archive.add_endpoint(
        name="serve", fn=lambda images: {"embeddings": model(images, training=False)},
        input_signature=[tf.TensorSpec([None, *info["input_shape"]], tf.float32, name="images")])

    # A tf.function of its own around `serve`: on the JAX backend `serve` is the jax2tf
    # conversion of the model, and TensorFlow's string ops cannot pass through jax2tf.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_bytes(images):
        pixels = tf.map_fn(lambda data: preprocess_image(data, size, crop), images,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return serve(pixels)

    from_bytes.get_concrete_function()
    archive.add_endpoint(name="serve_image_bytes", fn=from_bytes)
    archive.write_out(str(path), verbose=False)      # serving_default: the first endpoint, serve
    if serving_path is not None:
        # The archive's traced functions once more, with an explicit serving_default: no second trace
        # (nor, on JAX, a second jax2tf conversion) of the model.
        archive.add_endpoint(name=SERVING_SIGNATURE, fn=from_bytes)
        archive.write_out(str(serving_path), verbose=False)


def plot_curves(history: dict[str, Any], path: str | os.PathLike) -> None:
    """curves.png: loss, fraction of positive triplets and mean distances vs step (train and val); for a
    margin-softmax objective (records without fraction_positive_triplets) loss, accuracy and mean cosines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = (("loss", "triplet loss"), ("fraction_positive_triplets", "fraction of positive triplets"),
              ("mean_positive_distance", "mean distance: positive (solid) / negative (dashed)"))
    first = next(iter(history.get("train") or history.get("val") or []), {})
    if first and "fraction_positive_triplets" not in first:
        panels = (("loss", "margin-softmax loss"), ("accuracy", "accuracy of the nearest class centre"),
                  ("mean_true_cosine", "mean cosine: own centre (solid) / others (dashed)"))
    dashed = {"mean_positive_distance": ("mean_negative_distance", "positive", "negative"),
              "mean_true_cosine": ("mean_other_cosine", "own", "others")}
    figure = Figure(figsize=(15, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    for column, (key, title) in enumerate(panels):
        axes = figure.add_subplot(1, 3, column + 1)
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            records = history.get(split) or []
            steps = [r["step"] for r in records]
            if not steps:
                continue
            axes.plot(steps, [r[key] for r in records], color=colour, marker="." if split == "val" else None,
                      label=split if key not in dashed else f"{split} {dashed[key][1]}")
            if key in dashed:
                axes.plot(steps, [r[dashed[key][0]] for r in records], color=colour,
                          linestyle="--", label=f"{split} {dashed[key][2]}")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    with open(path, "wb") as handle:
        figure.savefig(handle, format="png")


def _check_keras_archive(model_path: Path) -> None:
    """InputError naming `model_path` unless it is a complete zip archive whose members pass their CRC
    check (a .keras file is a zip; Keras reports a truncated one as "File not found")."""
    import zlib

    try:
        with zipfile.ZipFile(model_path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise InputError(f"{model_path}: the model file is damaged or truncated ({model_path.stat().st_size:,} "
                         f"bytes, not a complete .keras zip archive: {exc}); copy it again from the train "
                         f"step's output") from exc
    if bad is not None:
        raise InputError(f"{model_path}: the model file is damaged: its member {bad} fails its CRC check; copy "
                         f"it again from the train step's output")


def distance_of(metadata: dict[str, Any]) -> str | None:
    """The model's distance name from model.json's ``distance.name`` (or, in files of earlier versions, the
    boolean ``distance.squared``: "squared_l2" or "l2"); None when it records neither."""
    distance = metadata.get("distance")
    if not isinstance(distance, dict):
        return None
    if "name" not in distance and isinstance(distance.get("squared"), bool):
        return "squared_l2" if distance["squared"] else "l2"
    return distance["name"] if distance.get("name") in objectives.DISTANCES else None


def load_model_artifact(model_dir: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(Keras model, model.json metadata) of a model folder; InputError names what is missing or wrong."""
    import keras

    import facenet_kfp.model  # noqa: F401  (registers L2Normalize, which older model files end in)
    from facenet_kfp.preprocess import PREPROCESSING_VERSION

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")
    json_path = model_dir / MODEL_JSON
    metadata = read_json(json_path)
    if not isinstance(metadata, dict):
        raise InputError(f"{json_path}: expected a JSON object")
    for key in ("file", "preprocessing", "distance", "embedding_dim"):
        if key not in metadata:
            raise InputError(f"{json_path}: missing key {key!r}; is {model_dir} a facenet-kfp model folder?")
    pre = metadata["preprocessing"]
    if not isinstance(pre, dict) or not {"version", "image_size", "crop_fraction"} <= set(pre):
        raise InputError(f"{json_path}: preprocessing must give version, image_size and crop_fraction, "
                         f"got {pre!r}")
    if pre["version"] != PREPROCESSING_VERSION:
        raise InputError(f"{json_path}: preprocessing version {pre['version']!r} is not the one this code "
                         f"implements ({PREPROCESSING_VERSION!r})")
    if distance_of(metadata) is None:
        raise InputError(f"{json_path}: distance.name must be one of {', '.join(objectives.DISTANCES)}, got "
                         f"{metadata['distance']!r}")
    model_path = model_dir / str(metadata["file"])
    if not model_path.is_file():
        raise InputError(f"{model_path}: model file named in {MODEL_JSON} not found")
    if model_path.suffix == ".keras":
        _check_keras_archive(model_path)
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except (ValueError, TypeError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{model_path}: cannot load the Keras model ({exc})") from exc
    if int(model.output_shape[-1]) != int(metadata["embedding_dim"]):
        raise InputError(f"{model_path}: model gives {model.output_shape[-1]}-D embeddings but "
                         f"{MODEL_JSON} says {metadata['embedding_dim']}")
    if list(model.input_shape[1:3]) != [pre["image_size"], pre["image_size"]]:
        raise InputError(f"{model_path}: model input {model.input_shape[1:]} does not match "
                         f"preprocessing image_size {pre['image_size']} in {MODEL_JSON}")
    return model, metadata


def embed_images(model: Any, metadata: dict[str, Any], images: Sequence[bytes],
                 batch_size: int = 128) -> np.ndarray:
    """Embeddings float32 [N, D] of encoded images, preprocessed as model.json records (no augmentation).

    Up to `batch_size` images (a served request, a verified pair) are preprocessed by one cached
    function (`tf_input.preprocess_batch`); more go through a tf.data pipeline that decodes in
    parallel (`tf_input.make_embedding_dataset`). Both give the same pixels to float32 rounding.
    """
    from facenet_kfp.tf_input import make_embedding_dataset, preprocess_batch

    pre = metadata["preprocessing"]
    dim = int(model.output_shape[-1])
    if len(images) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if len(images) <= batch_size:
        pixels = preprocess_batch(images, int(pre["image_size"]), float(pre["crop_fraction"]))
        return np.asarray(model.predict_on_batch(pixels), dtype=np.float32)
    parts = [np.asarray(model.predict_on_batch(batch), dtype=np.float32)
             for batch in make_embedding_dataset(images, int(pre["image_size"]), float(pre["crop_fraction"]),
                                                 batch_size)]
    return np.concatenate(parts, axis=0)
