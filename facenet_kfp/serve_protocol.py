"""The KServe side of `facenet_kfp.serve`: its v1 and v2 (Open Inference Protocol) payloads, models and server.

Requests (`embed_items`, `verify_items`) become lists of `Item`: one encoded
image with the place in the request it came from, so every refusal names it.
`accept_image` is the bytes-level twin of `verify.read_image_file`: base64
decoded, then accepted as the extract step accepts a file (`codec.open_image`,
`codec.reencoded`). A request that breaks a rule raises kserve's
``InvalidInput`` (HTTP 400) with a message naming the input and element.

v2 (POST /v2/models/<name>/infer):

* embed: one input ``images``, datatype BYTES, shape [N], each element a
  base64 string of an encoded image (JPEG, PNG, GIF, BMP, TIFF, WebP); with
  KServe's binary tensor extension (header Inference-Header-Content-Length)
  too: kserve 0.21 reads binary BYTES elements as UTF-8 text, so raw image
  bytes cannot travel there. Output ``embeddings`` FP32 [N, D] (unit vectors).
* verify: inputs ``image_a`` and ``image_b``, BYTES [N] each (pair i is
  image_a[i], image_b[i]). Outputs ``distance`` FP32 [N] and ``same`` BOOL [N]
  (distance < threshold); the response's parameters carry ``threshold``
  (float), ``distance_definition`` (squared_l2 | l2 | cosine) and ``rule``.

v1 (POST /v1/models/<name>:predict):

* embed: ``{"instances": [{"b64": "..."}, ...]}`` ->
  ``{"predictions": [[e0, ..., eD-1], ...]}``
* verify: ``{"instances": [{"image_a": {"b64": ...}, "image_b": {"b64": ...}}]}``
  -> ``{"predictions": [{"distance", "threshold", "distance_definition", "same"}]}``
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import importlib.metadata
import json
import sys
import uuid
from typing import Any, Sequence

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.evaluate import pair_distances
from facenet_kfp.serve import (DEFAULT_MAX_BATCH, DEFAULT_MAX_IMAGES, DEFAULT_NAME, VERIFY_SUFFIX, EmbeddingBatcher,
                               Served, check_model_name)
from facenet_kfp.verify import align_photos, read_image_bytes

# kserve parses sys.argv when kserve.model_server is imported (its module-level `parser.parse_known_args()`
# sets ModelServer's defaults): an option of ours that abbreviates one of its own (--model for
# --model_name, say) would be taken, and an ambiguous one exits the process. It is imported here with
# an empty command line; every setting the server uses is passed to ModelServer explicitly.
KSERVE_VERSION = "0.21.0"     # the version the seam above and `ServingServer._serve` were written for
if importlib.metadata.version("kserve") != KSERVE_VERSION:
    raise InputError(f"facenet_kfp.serve was written for kserve {KSERVE_VERSION}, but kserve "
                     f"{importlib.metadata.version('kserve')} is installed (pip install kserve=={KSERVE_VERSION})")
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: E402
finally:
    sys.argv = _argv
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402

EMBED_INPUT = "images"
VERIFY_INPUTS = ("image_a", "image_b")
# One encoded image: far above any photo a person verifies; refused before its base64 is decoded.
MAX_IMAGE_BYTES = 20 * 2 ** 20
RULE = "same person when distance < threshold"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a request: its base64 text (JSON) or bytes (binary tensor data), and where it was."""
    payload: str | bytes
    where: str


def accept_image(item: Item) -> bytes:
    """The bytes the model's decoder reads for `item`, as `verify.read_image_file` reads a file.

    Base64 text is decoded strictly (bytes payloads are taken as they are);
    the image must pass `verify.read_image_bytes` (an image format, at least
    `codec.MIN_IMAGE_SIDE` pixels a side, at most `codec.MAX_IMAGE_PIXELS`
    pixels, checked before decoding; re-encoded as lossless PNG when
    TensorFlow cannot read it as it is). InvalidInput naming ``item.where``
    otherwise.
    """
    data = item.payload
    if isinstance(data, str):
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise InvalidInput(f"{item.where}: image too large ({len(data):,} base64 characters; at most "
                               f"{MAX_IMAGE_BYTES:,} bytes an image)")
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"{item.where}: not base64 ({exc}); send each image's bytes base64-encoded") from None
    elif len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{item.where}: image too large ({len(data):,} bytes; at most {MAX_IMAGE_BYTES:,})")
    try:
        return read_image_bytes(data, item.where)
    except InputError as exc:
        raise InvalidInput(str(exc)) from None


def _check_count(count: int, per_image: int, limit: int, what: str) -> None:
    if count == 0:
        raise InvalidInput(f"no {what} in the request")
    if count * per_image > limit:
        images = f" ({count * per_image} images)" if per_image > 1 else ""
        raise InvalidInput(f"too many {what} in one request: {count}{images}; at most {limit} images a request "
                           f"(a pair counts two); split the request")


# --- v2 -----------------------------------------------------------------------------------------

def _v2_input(request: InferRequest, name: str) -> list[Item]:
    """The elements of the BYTES input `name` of a v2 request, checked against its shape."""
    found = request.get_input_by_name(name)
    if found is None:
        given = ", ".join(repr(i.name) for i in request.inputs) or "none"
        raise InvalidInput(f"missing input {name!r} (inputs given: {given}); expected {name!r} of datatype "
                           f"BYTES, shape [N], base64 strings of encoded images")
    if found.datatype != "BYTES":
        raise InvalidInput(f"input {name!r}: datatype must be BYTES (base64 strings of encoded images), got "
                           f"{found.datatype}")
    shape = list(found.shape)
    if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int) or shape[0] < 0:
        raise InvalidInput(f"input {name!r}: shape must be [N] (one image per element), got {shape}")
    values = found.data if isinstance(found.data, list) else []
    if len(values) != shape[0]:
        raise InvalidInput(f"input {name!r}: shape {shape} but {len(values)} data elements")
    items = []
    for i, value in enumerate(values):
        where = f"input {name!r} element {i}"
        if not isinstance(value, (str, bytes)):
            raise InvalidInput(f"{where}: expected a base64 string, got {type(value).__name__}")
        items.append(Item(value, where))
    return items


def v2_embed_items(request: InferRequest, limit: int) -> list[Item]:
    """The images of a v2 embed request (input `EMBED_INPUT`); at most `limit`."""
    items = _v2_input(request, EMBED_INPUT)
    _check_count(len(items), 1, limit, "images")
    return items


def v2_verify_items(request: InferRequest, limit: int) -> tuple[list[Item], list[Item]]:
    """(image_a items, image_b items) of a v2 verify request: as many of each; at most `limit` images in all."""
    first, second = (_v2_input(request, name) for name in VERIFY_INPUTS)
    if len(first) != len(second):
        raise InvalidInput(f"inputs {VERIFY_INPUTS[0]!r} and {VERIFY_INPUTS[1]!r} must have the same shape [N] "
                           f"(pair i is element i of each), got [{len(first)}] and [{len(second)}]")
    _check_count(len(first), 2, limit, "pairs")
    return first, second


def _response(request: InferRequest, model_name: str, outputs: list[InferOutput],
              parameters: dict[str, Any] | None = None) -> InferResponse:
    return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=model_name,
                         infer_outputs=outputs, parameters=parameters, requested_outputs=request.request_outputs,
                         use_binary_outputs=request.use_binary_outputs)


def v2_embed_response(request: InferRequest, model_name: str, embeddings: np.ndarray) -> InferResponse:
    """Output ``embeddings`` FP32 [N, D]."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    output = InferOutput("embeddings", list(embeddings.shape), "FP32")
    output.set_data_from_numpy(embeddings, binary_data=False)
    return _response(request, model_name, [output])


def v2_verify_response(request: InferRequest, model_name: str, distances: np.ndarray, threshold: float,
                       definition: str) -> InferResponse:
    """Outputs ``distance`` FP32 [N] and ``same`` BOOL [N]; parameters threshold, distance_definition, rule."""
    distances = np.asarray(distances, dtype=np.float64)
    distance = InferOutput("distance", [len(distances)], "FP32")
    distance.set_data_from_numpy(distances.astype(np.float32), binary_data=False)
    same = InferOutput("same", [len(distances)], "BOOL")
    same.set_data_from_numpy(distances < threshold, binary_data=False)
    return _response(request, model_name, [distance, same],
                     {"threshold": float(threshold), "distance_definition": definition, "rule": RULE})


# --- v1 -----------------------------------------------------------------------------------------

def _instances(body: Any, limit: int, per_image: int, what: str, example: str) -> list[Any]:
    if isinstance(body, (bytes, str)):      # kserve passes a body whose content-type is not JSON as it came
        try:
            body = json.loads(body)
        except ValueError:
            raise InvalidInput(f"the body is not JSON; expected {{\"instances\": [...]}} with {what} such as "
                               f"{example}") from None
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise InvalidInput(f"expected a JSON object {{\"instances\": [...]}} with {what} such as {example}")
    _check_count(len(body["instances"]), per_image, limit, what)
    return body["instances"]


def _b64_item(value: Any, where: str) -> Item:
    if not isinstance(value, dict) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InvalidInput(f"{where}: expected {{\"b64\": \"<base64 of an encoded image>\"}}, got "
                           f"{_shown(value)}")
    return Item(value["b64"], f"{where}.b64")


def _shown(value: Any) -> str:
    """A short description of a JSON value for an error message (never a whole image's base64)."""
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)}"
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:37]}..."


def v1_embed_items(body: Any, limit: int) -> list[Item]:
    """The images of a v1 embed request: ``{"instances": [{"b64": ...}, ...]}``."""
    instances = _instances(body, limit, 1, "images", '{"b64": "..."}')
    return [_b64_item(value, f"instances[{i}]") for i, value in enumerate(instances)]


def v1_verify_items(body: Any, limit: int) -> tuple[list[Item], list[Item]]:
    """(image_a items, image_b items) of a v1 verify request:
    ``{"instances": [{"image_a": {"b64": ...}, "image_b": {"b64": ...}}, ...]}``."""
    instances = _instances(body, limit, 2, "pairs", '{"image_a": {"b64": "..."}, "image_b": {"b64": "..."}}')
    pairs: tuple[list[Item], list[Item]] = ([], [])
    for i, value in enumerate(instances):
        if not isinstance(value, dict) or set(value) != set(VERIFY_INPUTS):
            raise InvalidInput(f"instances[{i}]: expected an object with keys {list(VERIFY_INPUTS)}, got "
                               f"{_shown(value)}")
        for side, name in zip(pairs, VERIFY_INPUTS):
            side.append(_b64_item(value[name], f"instances[{i}].{name}"))
    return pairs


def v1_embed_response(embeddings: np.ndarray) -> dict[str, Any]:
    return {"predictions": np.asarray(embeddings, dtype=np.float32).tolist()}


def v1_verify_response(distances: Sequence[float], threshold: float, definition: str) -> dict[str, Any]:
    return {"predictions": [{"distance": float(d), "threshold": float(threshold), "distance_definition": definition,
                             "same": bool(d < threshold)} for d in distances]}


# --- the KServe models and server -----------------------------------------------------------------

def prepare_images(items: Sequence[Item], alignment: dict[str, Any]) -> list[bytes]:
    """Each item's image as embed takes a file: accepted (`accept_image`), then aligned by
    `verify.align_photos` when the model was trained on aligned faces. InvalidInput naming the item."""
    images = [accept_image(item) for item in items]
    if alignment["method"] == "none" or not alignment.get("detect"):
        return images
    try:
        crops, _ = align_photos(images, [item.where for item in items], alignment,
                                hint="send a photo with a face in it")
    except InputError as exc:
        raise InvalidInput(str(exc)) from None
    return crops


class _ServedModel(kserve.Model):
    """A KServe model over `Served`: requests are parsed on the loop, decoded and aligned in its thread pool,
    embedded by the shared `EmbeddingBatcher`."""

    def __init__(self, name: str, served: Served, batcher: EmbeddingBatcher, max_images: int):
        super().__init__(name)
        self.served, self.batcher, self.max_images = served, batcher, max_images
        self.ready = True

    async def _embed(self, items: Sequence[Item]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(None, prepare_images, items, self.served.alignment)
        return await asyncio.wrap_future(self.batcher.submit(images))


class EmbedModel(_ServedModel):
    """``<name>``: images -> embeddings float32 [N, D] (the module docstring has the payloads)."""

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):
            items = v2_embed_items(payload, self.max_images)
            return v2_embed_response(payload, self.name, await self._embed(items))
        return v1_embed_response(await self._embed(v1_embed_items(payload, self.max_images)))

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": EMBED_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "embeddings", "datatype": "FP32", "shape": [-1, self.served.dim]}]


class VerifyModel(_ServedModel):
    """``<name>-verify``: pairs of images -> distance, threshold, distance definition, same (module docstring)."""

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        v2 = isinstance(payload, InferRequest)
        first, second = (v2_verify_items(payload, self.max_images) if v2
                         else v1_verify_items(payload, self.max_images))
        distances = self.distances(await self._embed([*first, *second]))
        threshold, definition = self.served.threshold, self.served.distance_definition
        if v2:
            return v2_verify_response(payload, self.name, distances, threshold, definition)
        return v1_verify_response(distances, threshold, definition)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Distances of pairs (i, N + i) of 2N embeddings, as `verify.verify_pair` computes them: float64 [N]."""
        count = len(embeddings) // 2
        return pair_distances(embeddings, np.arange(count), np.arange(count, 2 * count),
                              self.served.distance_definition)

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in VERIFY_INPUTS]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "distance", "datatype": "FP32", "shape": [-1]},
                {"name": "same", "datatype": "BOOL", "shape": [-1]}]


def build_models(served: Served, name: str = DEFAULT_NAME, max_images: int = DEFAULT_MAX_IMAGES,
                 max_batch: int = DEFAULT_MAX_BATCH) -> list[_ServedModel]:
    """The KServe models of `served`: `name` (embed) and, with a threshold, `name`-verify, sharing one batcher."""
    check_model_name(name)
    for value, option in ((max_images, "max_images"), (max_batch, "max_batch")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{option} must be a positive integer, got {value!r}")
    batcher = EmbeddingBatcher(served, max_batch)
    models: list[_ServedModel] = [EmbedModel(name, served, batcher, max_images)]
    if served.threshold is not None:
        models.append(VerifyModel(name + VERIFY_SUFFIX, served, batcher, max_images))
    return models


class ServingServer(kserve.ModelServer):
    """kserve.ModelServer on `host`:`port`, REST only (no gRPC), one process.

    kserve 0.21's RESTServer always binds 0.0.0.0; `_serve` (a private hook, see `KSERVE_VERSION`)
    sets the address before uvicorn starts listening.
    """

    def __init__(self, host: str, port: int):
        super().__init__(http_port=port, enable_grpc=False, workers=1, enable_docs_url=False)
        self.host = host

    async def _serve(self):
        # start() has built the REST server (not yet listening) and calls this inside asyncio.run.
        self._rest_server.config.host = self.host
        await super()._serve()


