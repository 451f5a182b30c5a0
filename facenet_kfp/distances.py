"""Distances between face embeddings (squared L2, plain L2, cosine), flip embeddings and seeded stratified folds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp import metrics as vm
from facenet_kfp import objectives
from facenet_kfp.errors import InputError

MODEL_JSON = "model.json"
# Embeddings whose norms are all within this of 1 count as unit vectors (float32 outputs of l2_normalize).
UNIT_TOLERANCE = 1e-3

# Names of the distance definitions, as written in every output (model.json's distance.name among them);
# "model" picks the model's own.
DISTANCES = objectives.DISTANCES
DISTANCE_SETTINGS = ("model", *DISTANCES)
DISTANCE_NAMES = {True: "squared_l2", False: "l2"}
DISTANCE_LABELS = {"squared_l2": "squared L2", "l2": "plain L2", "cosine": "cosine distance"}
DISTANCE_DEFINITIONS = {
    "squared_l2": "squared Euclidean distance ||a - b||^2 between the L2-normalised embeddings "
                  "(0 for identical faces, at most 4)",
    "l2": "Euclidean distance ||a - b|| between the L2-normalised embeddings "
          "(0 for identical faces, at most 2)",
    "cosine": "cosine distance 1 - a.b / (||a|| ||b||) between the embeddings "
              "(0 for identical directions, at most 2; half the squared L2 distance of unit vectors)",
}


def distance_name(squared: bool) -> str:
    """"squared_l2" or "l2" for the boolean ``distance.squared`` of model.json files of earlier versions."""
    return DISTANCE_NAMES[bool(squared)]


def resolve_distance(setting: str, own: str | bool) -> str:
    """The distance an evaluation uses: evaluate.distance, where "model" means the model's own, `own`
    (`model_distance`'s name; a bool is the ``distance.squared`` flag of earlier model.json files)."""
    if setting == "model":
        return _as_distance(own)
    if setting not in DISTANCES:
        raise InputError(f"evaluate.distance must be one of {', '.join(DISTANCE_SETTINGS)}; got {setting!r}")
    return setting


def _as_distance(distance: str | bool) -> str:
    """A distance name; a bool is model.json's ``distance.squared`` flag."""
    if isinstance(distance, (bool, np.bool_)):
        return distance_name(bool(distance))
    if distance not in DISTANCES:
        raise InputError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    return distance


def model_distance(metadata: dict[str, Any], model_dir: str | os.PathLike) -> str:
    """The name of the model's own distance (one of DISTANCES), from model.json's ``distance.name``.

    model.json files of earlier versions record a boolean ``distance.squared``
    instead (True: "squared_l2", False: "l2"); they are read as well.
    """
    from facenet_kfp.export import distance_of

    name = distance_of(metadata) if isinstance(metadata, dict) else None
    if name is None:
        distance = metadata.get("distance") if isinstance(metadata, dict) else None
        raise InputError(f"{Path(model_dir) / MODEL_JSON}: expected 'distance.name', one of "
                         f"{', '.join(DISTANCES)} (the distance the model was trained with), got {distance!r}")
    return name


def pair_distances(embeddings: np.ndarray, index_a: np.ndarray, index_b: np.ndarray,
                   distance: str | bool) -> np.ndarray:
    """Distances of pairs (index_a[i], index_b[i]) of rows of `embeddings` [N, D]: float64 [P].

    `distance` is a name of `DISTANCES`, or a bool as model.json's
    ``distance.squared`` (True: "squared_l2", False: "l2").

    * squared_l2: ``sum_k (a_k - b_k)^2``; l2: its square root;
    * cosine: ``1 - a.b / (|a| |b|)``, computed as ``|a/|a| - b/|b||^2 / 2``.

    Computed in float64 from the differences (not from dot products), so
    identical embeddings give exactly 0. A zero embedding has no cosine
    distance: InputError.
    """
    name = _as_distance(distance)
    e = np.asarray(embeddings, dtype=np.float64)
    if name == "cosine":
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        if not np.all(norms > 0):
            raise InputError(f"{int(np.sum(norms == 0))} embeddings are zero vectors: the cosine distance "
                             f"is undefined for them; use evaluate.distance squared_l2 or l2")
        e = e / norms
    diff = e[np.asarray(index_a)] - e[np.asarray(index_b)]
    d2 = np.einsum("ij,ij->i", diff, diff)
    if name == "cosine":
        return 0.5 * d2
    return d2 if name == "squared_l2" else np.sqrt(d2)


def unit_length(embeddings: np.ndarray) -> bool:
    """True when every row of `embeddings` [N, D] has L2 norm 1 within `UNIT_TOLERANCE`."""
    norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) <= UNIT_TOLERANCE))


def seed_threshold_in(distance: str | bool, seed_threshold_l2: float, unit: bool = True) -> float | None:
    """The fixed plain-L2 threshold t (evaluate.seed_threshold) in `distance`, or None where it has no equivalent.

    squared_l2: t^2; l2: t; cosine: t^2 / 2 (``|a - b|^2 = 2 - 2 cos`` for unit
    vectors), defined only when the embeddings are unit length (`unit`).
    """
    name = _as_distance(distance)
    if name == "l2":
        return float(seed_threshold_l2)
    if name == "squared_l2":
        return vm.l2_to_squared(seed_threshold_l2)
    return vm.l2_to_squared(seed_threshold_l2) / 2.0 if unit else None


def flip_embeddings(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Flip embeddings float32 [N, D]: ``(e + m) / |e + m|`` of each image's embedding e and its mirror's m."""
    total = np.asarray(plain, dtype=np.float64) + np.asarray(mirrored, dtype=np.float64)
    norms = np.linalg.norm(total, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise InputError(f"{int(np.sum(norms == 0))} images have opposite embeddings for the image and its "
                         f"mirror, so their flip embedding is undefined; set evaluate.flip false")
    return (total / norms).astype(np.float32)


class MirrorPairModel:
    """A model whose embedding of x is ``[f(x), f(mirror(x))]``: the wrapped model's of x and of x mirrored.

    Batches are float32 [B, S, S, 3] (preprocessed images, NHWC); the mirror
    reverses the width axis, which is the mirror of the source image's crop.
    One call of the wrapped model embeds both halves ([2B, S, S, 3]). It has
    what `export.embed_images` uses of a Keras model (``predict_on_batch``,
    ``output_shape``), so the image and its mirror are read and preprocessed
    exactly as every other embedding is.
    """

    def __init__(self, model: Any):
        self.model = model
        *batch, dim = model.output_shape
        self.output_shape = (*batch, 2 * int(dim))

    def predict_on_batch(self, batch: Any) -> np.ndarray:
        x = np.asarray(batch)
        both = np.asarray(self.model.predict_on_batch(np.concatenate((x, x[:, :, ::-1, :]))))
        return np.concatenate((both[:len(x)], both[len(x):]), axis=1)


def far_key(far: float) -> str:
    """A FAR target as it appears in metric names: 1e-3 -> "0.001", 0.01 -> "0.01"."""
    return np.format_float_positional(float(far), trim="-")


def stratified_folds(same: np.ndarray, folds: int, seed: int, where: str) -> np.ndarray:
    """Fold id (int64 [N]) per pair: same and different pairs each shuffled (seeded) and dealt round-robin.

    Every fold then holds about N/folds pairs with the overall share of same
    pairs, as LFW's folds do, so each fold can measure VAL and FAR.
    """
    same = np.asarray(same, dtype=bool)
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if min(n_same, n_diff) < folds:
        raise InputError(f"{where}: {folds}-fold cross-validation needs at least {folds} same and "
                         f"{folds} different pairs, got {n_same} and {n_diff}; lower evaluate.folds "
                         f"or use more identities")
    rng = np.random.default_rng(seed)
    ids = np.empty(same.size, dtype=np.int64)
    for mask in (same, ~same):
        members = np.flatnonzero(mask)
        ids[rng.permutation(members)] = np.arange(members.size) % folds
    return ids
