"""Serve a trained model over HTTP: face embeddings and face verification on KServe's Python model server.

`facenet-kfp serve` loads a model folder (and the threshold evaluate chose for
it), checks everything before the server starts (`load_served`: the model,
threshold.json evaluated for this model, the alignment the model was trained
with) and serves two KServe models in one `kserve.ModelServer`:

* ``<name>`` (`EmbedModel`): encoded images -> unit embeddings;
* ``<name>-verify`` (`VerifyModel`): pairs of images -> distance, the evaluated
  threshold, the distance definition and same / different.

Both speak KServe's v1 and v2 (Open Inference Protocol) REST payloads
(`facenet_kfp.serve_protocol` documents them and holds the KServe classes; this
module imports no kserve, so the command line loads fast); health and readiness are
KServe's own endpoints (GET /v2/health/live, /v2/health/ready,
/v2/models/<name>/ready, /v1/models/<name>). gRPC is not started.

Each image goes the way `facenet-kfp embed` and `verify` take a file: accepted
as `verify.read_image_file` accepts it (`serve_protocol.accept_image`), aligned
by `verify.align_photos` when model.json's alignment is mtcnn, and embedded by
`export.embed_images`, so an image's embedding is embed's. A request that
breaks a rule gets HTTP 400 naming the input and element; the server goes on.

Blocking work never runs on the event loop: decoding and face detection run in
the loop's thread pool, and one thread (`EmbeddingBatcher`) runs the model,
embedding together every request that queued while it was busy (dynamic
batching, up to ``max_batch`` images), which also keeps the Keras model to one
caller at a time. Without an evaluated threshold the server refuses to start
unless ``embed_only``: then only ``<name>`` is served.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.evaluate import MODEL_JSON, THRESHOLD_JSON
from facenet_kfp.fsutil import read_json
from facenet_kfp.verify import (_load_model, check_face_rule, check_threshold_for_model, find_threshold_file,
                                photo_alignment, read_threshold_info)

log = logging.getLogger(__name__)

DEFAULT_NAME = "facenet"
VERIFY_SUFFIX = "-verify"
DEFAULT_PORT = 8080              # KServe's container port
DEFAULT_MAX_IMAGES = 64          # images in one request (a verify pair counts two)
DEFAULT_MAX_BATCH = 64           # images the model embeds in one call, several requests together


@dataclasses.dataclass
class Served:
    """What the server serves, checked: the model, its metadata, the threshold and how photos are aligned.

    `threshold`, `distance_definition` and `threshold_file` are None when the
    server only embeds. `alignment` is `verify.photo_alignment`'s.
    """
    model_dir: Path
    model: Any
    metadata: dict[str, Any]
    alignment: dict[str, Any]
    threshold: float | None
    distance_definition: str | None
    threshold_file: Path | None

    @property
    def dim(self) -> int:
        return int(self.metadata["embedding_dim"])


def load_served(model_dir: str | os.PathLike, threshold_file: str | os.PathLike | None = None,
                embed_only: bool = False, detect: bool = True, face: str = "central") -> Served:
    """Check and load what the server serves; InputError naming the file or value at fault.

    The threshold is `threshold_file`, else ``<model_dir>/threshold.json``,
    else ``threshold.json`` next to the model folder (`verify.find_threshold_file`),
    and must have been evaluated for this model (`verify.check_threshold_for_model`).
    Without one, InputError naming the paths searched, unless `embed_only`
    (then no threshold is looked for). `detect` and `face` are verify's: how a
    photo is aligned for a model trained on aligned faces. The model is loaded
    last, then run once on a blank image, and for such a model the face
    detector is loaded, so the first request does not pay for either.
    """
    from facenet_kfp import codec
    from PIL import Image

    check_face_rule(face)
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_JSON).is_file():
        _load_model(model_dir)      # raises verify's InputError naming what is missing
    metadata = read_json(model_dir / MODEL_JSON)
    threshold = definition = path = None
    if not embed_only:
        path = find_threshold_file(model_dir, threshold_file)
        if path is None:
            raise InputError(f"no threshold to verify with: neither {model_dir / THRESHOLD_JSON} nor "
                             f"{model_dir.parent / THRESHOLD_JSON} exists; pass --threshold threshold.json (from "
                             f"the evaluate step, for this model), --run PIPELINE_ROOT (a run's model and "
                             f"threshold), or --embed-only to serve embeddings only")
        info = read_threshold_info(path)
        check_threshold_for_model(info, path, model_dir, metadata)
        threshold, definition = float(info["threshold"]), info["distance"]
    alignment = photo_alignment(metadata, model_dir, detect, face)
    model, metadata, _ = _load_model(model_dir)
    if alignment["method"] != "none" and detect:
        _load_face_detector(alignment)
    from facenet_kfp import export

    blank = codec.encode_jpeg(Image.new("RGB", (8, 8), (128, 128, 128)), 90)
    export.embed_images(model, metadata, [blank], 1)
    log.info("serving %s (%d-D embeddings, alignment %s; threshold %s)", model_dir, int(metadata["embedding_dim"]),
             alignment["method"], "none: embeddings only" if threshold is None else f"{threshold:.4f} {definition} "
             f"from {path}")
    return Served(model_dir, model, metadata, alignment, threshold, definition, path)


def _load_face_detector(alignment: dict[str, Any]) -> None:
    """Build the process's MTCNN detector now (about 5 s), so a missing package fails before serving."""
    try:
        from facenet_kfp import align

        align.FaceDetector().detect(np.zeros((64, 64, 3), dtype=np.uint8))
    except ImportError as exc:
        raise InputError(f"the model was trained on faces aligned by {alignment['method']}, whose detector "
                         f"cannot be loaded here ({exc}); install the package, or pass --no-detect when clients "
                         f"send aligned {alignment['size']}x{alignment['size']} crops") from exc


# --- the model, one caller at a time, with dynamic batching --------------------------------------

class EmbeddingBatcher:
    """One thread runs the model; requests queued while it is busy are embedded in one call.

    `submit` queues a request's encoded images and returns a future of their
    embeddings (float32 [N, D]). The thread takes the oldest request and every
    one queued behind it while they fit in `max_batch` images (a larger
    request runs alone) and calls `export.embed_images` on them all, so under
    load the model sees batches, and alone a request waits for nothing.
    """

    def __init__(self, served: Served, max_batch: int = DEFAULT_MAX_BATCH):
        self.served = served
        self.max_batch = max_batch
        self.batches = 0            # model calls made, for the log and the benchmark
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="facenet-embed", daemon=True)
        self._thread.start()

    def submit(self, images: Sequence[bytes]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((list(images), future))
        return future

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        from facenet_kfp import export

        held = None
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is None:
                return
            jobs, count = [job], len(job[0])
            while count < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or count + len(nxt[0]) > self.max_batch:
                    held = nxt
                    break
                jobs.append(nxt)
                count += len(nxt[0])
            jobs = [(images, future) for images, future in jobs if future.set_running_or_notify_cancel()]
            try:
                embeddings = export.embed_images(self.served.model, self.served.metadata,
                                                 [image for images, _ in jobs for image in images], self.max_batch)
            except Exception as exc:   # noqa: BLE001  (handed to every waiting request, which reports it)
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for images, future in jobs:
                future.set_result(np.asarray(embeddings[start:start + len(images)], dtype=np.float32))
                start += len(images)


def check_model_name(name: str) -> None:
    """InputError unless `name` is a model name for URL paths: letters, digits, '-', '_', '.' (not first)."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise InputError(f"--name must be 1 to 63 letters, digits, '.', '_' or '-' (starting with a letter or "
                         f"digit), got {name!r}")


def serve(served: Served, name: str = DEFAULT_NAME, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
          max_images: int = DEFAULT_MAX_IMAGES, max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Serve `served` on http://`host`:`port` until SIGINT / SIGTERM (see module docstring)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"--port must be in 1..65535, got {port!r}")
    from facenet_kfp.serve_protocol import ServingServer, build_models

    models = build_models(served, name, max_images, max_batch)
    log.info("models: %s on http://%s:%d (v1: /v1/models/<model>:predict, v2: /v2/models/<model>/infer)",
             ", ".join(m.name for m in models), host, port)
    try:
        ServingServer(host, port).start(models)
    finally:
        models[0].batcher.close()
