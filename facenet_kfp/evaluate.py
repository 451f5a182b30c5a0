"""Step 7: embed validation and test faces, choose the verification threshold on validation, measure test.

Protocol (the verification protocol face-recognition papers report):

1. Only REAL images are used (manifest rows with ``synthetic`` false): the
   completion step's flipped copies would make "same person" pairs trivially
   easy. Validation and test identities come from the splits folder and are
   disjoint from training identities.
2. Per split, pairs balanced across identities as LFW's pairs.txt is built
   (`pairs.make_pairs`): at most ``max_pairs_per_identity`` same-person pairs
   per identity and ``max_positive_pairs`` in all, and as many different-person
   pairs, each from two identities chosen uniformly, seeded. Every output says
   how many identities a split's figures rest on, and warns below
   `MIN_IDENTITIES`.
3. Embeddings come from the trained model with its recorded preprocessing
   (`export.embed_images`). With ``flip``, each image is also embedded
   mirrored left-right and the two embeddings are added and L2-normalised;
   every figure is then reported for those embeddings too, as ``flip_``
   variants (``test_flip_accuracy``, ``flip_threshold``). The distance is
   ``distance``: ``model`` (the model's own, squared L2 ``‖a − b‖²`` or plain
   L2 ``‖a − b‖`` as recorded in model.json), ``squared_l2``, ``l2`` or
   ``cosine`` (``1 − a·b / (‖a‖ ‖b‖)``). Every output names it.
4. The threshold maximises accuracy on the VALIDATION pairs
   (`metrics.select_threshold`); it is then applied unchanged to the TEST
   pairs. A pair is "same person" when ``distance < threshold``.
5. Test metrics: accuracy at that threshold; 10-fold cross-validated accuracy
   (threshold from 9 folds, applied to the 10th; pairs are shuffled into
   folds with evaluate.seed, stratified so each fold holds same and different
   pairs; a pairs file's pairs stay in the folds its header declares); ROC AUC
   and equal error rate; VAL at each target FAR, where the
   threshold reaching that FAR is interpolated on the validation pairs and
   applied to test (``test_val_at_far_<far>``, with the FAR it actually gives
   on test in ``test_far_at_far_<far>``), and the k-fold variant on test alone
   (``test_kfold_val_at_far_<far>_mean``), each only where the pairs can
   measure that FAR (`val_at_far_scores`); and the accuracy at the fixed
   threshold 1.242 (plain L2) of the original TF1 implementation, converted to the distance used
   (omitted, with a note, for cosine distances of embeddings that are not unit
   length, where no conversion exists).
6. Optionally the LFW View 2 pairs.txt (``pairs_uri``): k-fold accuracy with
   the folds of the file (`pairs_file_folds`: seeded stratified ones for a
   1-fold file), k-fold VAL at each FAR, AUC. Pairs naming a training
   identity (splits folder's train.txt) are counted; the figures are reported
   again on the pairs of held-out identities only (``lfw_pairs_heldout_``),
   or, when fewer than `MIN_HELDOUT_PAIRS` remain, a warning says the
   pairs.txt figures are not a held-out benchmark.
7. Every pair set's figures come with its counts (``<set>_same_pairs``,
   ``<set>_different_pairs``). A set with fewer than `metrics.MIN_CLASS_PAIRS`
   pairs of either class has ``<set>_accuracy_withheld`` 1: its accuracies are
   still in the metrics, but the report's and the run's headlines show the
   counts, AUC and EER and say why accuracy is withheld
   (`metrics.accuracy_withheld`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp import metrics as vm
from facenet_kfp.config import EvaluateConfig
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import file_sha256, read_json, write_json, write_text
from facenet_kfp.pairs import check_pairs_exist, check_pairs_source, make_pairs, read_checked_pairs
from facenet_kfp.progress import Progress
from facenet_kfp.provenance import check_inputs, check_recorded
from facenet_kfp.report import flip_key
from facenet_kfp.shards import MANIFEST, ShardReader, read_manifest
from facenet_kfp.splits import read_split

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
THRESHOLD_JSON = "threshold.json"
RULE = "same person when distance < threshold"
CHOSEN_ON = "validation pairs, max accuracy"
ROC_POINTS = 300          # the KFP UI draws a ROC of at most a few hundred points comfortably
# A split whose same-person pairs come from fewer identities is flagged: its
# threshold and figures describe a handful of people, not unseen faces at large.
MIN_IDENTITIES = 20
# Held-out LFW pairs needed for the held-out pairs.txt figures (10 folds of ~5 same + ~5 different).
MIN_HELDOUT_PAIRS = 100
# Embeddings whose norms are all within this of 1 count as unit vectors (float32 outputs of l2_normalize).
UNIT_TOLERANCE = 1e-3
FLIP_DEFINITION = ("each image embedded as is and mirrored left-right (the preprocessed input reversed "
                   "along its width), the two embeddings added and L2-normalised")

# Names of the distance definitions, as written in every output; "model" picks the model's own.
DISTANCES = ("squared_l2", "l2", "cosine")
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


# ----------------------------------------------------------------------------- distances

def distance_name(squared: bool) -> str:
    """"squared_l2" or "l2": the name of the model's own distance (model.json's ``distance.squared``)."""
    return DISTANCE_NAMES[bool(squared)]


def resolve_distance(setting: str, squared: bool) -> str:
    """The distance an evaluation uses: evaluate.distance, where "model" means the model's own (`distance_name`)."""
    if setting == "model":
        return distance_name(squared)
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


def model_distance_squared(metadata: dict[str, Any], model_dir: str | os.PathLike) -> bool:
    """True when the model's distances are squared L2, from model.json's ``distance.squared``."""
    distance = metadata.get("distance") if isinstance(metadata, dict) else None
    squared = distance.get("squared") if isinstance(distance, dict) else None
    if not isinstance(squared, bool):
        raise InputError(f"{Path(model_dir) / MODEL_JSON}: expected a boolean 'distance.squared' "
                         f"(squared or plain L2 distances), got {distance!r}")
    return squared


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


# ----------------------------------------------------------------------------- data

@dataclass
class SplitPairs:
    """Pairs of one split: image keys, and per pair the two key indices and the label.

    `identities` counts the identities that appear in the pairs,
    `positive_identities` those in same-person pairs: the people its figures
    rest on. For pairs.txt, `heldout` marks the pairs of two non-training
    identities and `train_identities` counts the training identities named.
    """
    name: str
    keys: list[str]
    index_a: np.ndarray      # int64 [P]
    index_b: np.ndarray      # int64 [P]
    same: np.ndarray         # bool [P]
    identities: int
    positive_identities: int = 0
    fold_ids: np.ndarray | None = None
    distances: np.ndarray | None = None        # float64 [P], filled after embedding
    flip_distances: np.ndarray | None = None   # float64 [P], of the flip embeddings
    heldout: np.ndarray | None = None          # bool [P], pairs.txt only
    train_identities: int = 0

    @property
    def used_keys(self) -> list[str]:
        used = np.unique(np.concatenate((self.index_a, self.index_b)))
        return [self.keys[i] for i in used]


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} folder not found")
    if not path.is_dir():
        raise InputError(f"{path}: {what} must be a folder")


def _check_inputs(model_dir: Path, dataset_dir: Path, splits_dir: Path) -> None:
    """The three folders exist, the splits come from this dataset and the model was trained on both.

    model.json's ``inputs`` (fingerprints of what the model was trained on)
    is compared when present; a model saved without it is only logged.
    """
    _check_folder(model_dir, "model")
    if not (model_dir / MODEL_JSON).is_file():
        raise InputError(f"{model_dir / MODEL_JSON}: not found; is {model_dir} a model folder from train?")
    _check_folder(dataset_dir, "image dataset")
    if not (dataset_dir / MANIFEST).is_file():
        raise InputError(f"{dataset_dir / MANIFEST}: not found; is {dataset_dir} a packed image dataset?")
    _check_folder(splits_dir, "splits")
    fingerprints = check_inputs(images=dataset_dir, splits=splits_dir)
    metadata = read_json(model_dir / MODEL_JSON)
    recorded = metadata.get("inputs") if isinstance(metadata, dict) else None
    if recorded is None:
        log.warning("%s: no 'inputs' fingerprints; cannot check that the model was trained on %s and %s",
                    model_dir / MODEL_JSON, dataset_dir, splits_dir)
    else:
        check_recorded(recorded, fingerprints, f"{model_dir / MODEL_JSON}", "trained")


def real_rows_by_file(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    """Manifest rows of the real (not generated) images, by image key ``Name/Name_0001.jpg``."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_manifest(dataset_dir):
        if row["synthetic"]:
            continue
        if row["file"] in rows:
            raise InputError(f"{dataset_dir / MANIFEST}: image {row['file']} is listed twice")
        rows[row["file"]] = row
    return rows


def split_pairs(split: str, splits_dir: Path, dataset_dir: Path, rows: dict[str, dict[str, Any]],
                config: EvaluateConfig) -> SplitPairs:
    """Pairs of one split's identities balanced across identities (real images only; `pairs.make_pairs`)."""
    entries = read_split(splits_dir, split)
    split_file = splits_dir / f"{split}.txt"
    wanted = {name for name, _ in entries}
    images: dict[str, list[str]] = {name: [] for name in wanted}
    for key, row in rows.items():
        if row["identity"] in wanted:
            images[row["identity"]].append(key)
    for name, count in entries:
        if len(images[name]) != count:
            raise InputError(f"{split_file}: identity {name} has {count} real images in the split file "
                             f"but {len(images[name])} in {dataset_dir / MANIFEST}")
    return draw_pairs(split, images, rows, config, str(split_file), f"{len(entries)} identities in the split")


def archive_pairs(dataset_dir: Path, rows: dict[str, dict[str, Any]], config: EvaluateConfig) -> SplitPairs:
    """Pairs over every identity of a separate evaluation archive (when it comes without a pairs.txt)."""
    images: dict[str, list[str]] = {}
    for key, row in rows.items():
        images.setdefault(row["identity"], []).append(key)
    return draw_pairs("test", images, rows, config, str(dataset_dir / MANIFEST),
                      f"{len(images)} identities in the evaluation archive")


def draw_pairs(split: str, images: dict[str, list[str]], rows: dict[str, dict[str, Any]],
               config: EvaluateConfig, where: str, described: str) -> SplitPairs:
    """`pairs.make_pairs` over {identity: image keys}, as a SplitPairs named `split`."""
    if not any(len(keys) >= 2 for keys in images.values()):
        raise InputError(f"{where}: no identity has 2 real images, so split {split!r} has no "
                         f"same-person pair to evaluate")
    try:
        keys, index_a, index_b, same = make_pairs(images, max_positive=config.max_positive_pairs,
                                                  max_per_identity=config.max_pairs_per_identity,
                                                  seed=config.seed)
    except InputError as exc:
        raise InputError(f"{where}: cannot make {split} pairs: {exc}") from exc
    owner = [rows[key]["identity"] for key in keys]
    identities = len({owner[i] for i in np.concatenate((index_a, index_b))})
    positive_identities = len({owner[i] for i in index_a[same]})
    log.info("%s: %s, %d in its %d pairs, %d in its %d same-person pairs", split, described, identities,
             same.size, positive_identities, int(same.sum()))
    return SplitPairs(split, keys, index_a, index_b, same, identities, positive_identities)


def lfw_pairs(pairs_dir: Path, rows: dict[str, dict[str, Any]], dataset_dir: Path,
              train_names: set[str]) -> tuple[str, SplitPairs | None]:
    """(pairs URI, pairs) of a checked-pairs folder (`pairs.check_pairs_source`); ("", None) when none was given.

    Every image the pairs name must be a real image of `dataset_dir` (checked
    again: the folder may come from another run). `train_names` are the
    training identities: pairs naming one of them are not held out
    (`SplitPairs.heldout` is False for them). Errors name the pairs file's URI.
    """
    pairs_uri, pairs = read_checked_pairs(pairs_dir)
    if not pairs_uri:
        return "", None
    try:
        check_pairs_exist(pairs, set(rows), source=pairs_uri)
    except InputError as exc:
        raise InputError(f"{exc} (dataset {dataset_dir})") from exc
    keys = sorted({f for p in pairs for f in (p.file1, p.file2)})
    index = {key: i for i, key in enumerate(keys)}
    names = {name for p in pairs for name in (p.name1, p.name2)}
    split = SplitPairs(
        name="lfw_pairs", keys=keys,
        index_a=np.asarray([index[p.file1] for p in pairs], dtype=np.int64),
        index_b=np.asarray([index[p.file2] for p in pairs], dtype=np.int64),
        same=np.asarray([p.same for p in pairs], dtype=bool),
        identities=len(names), positive_identities=len({p.name1 for p in pairs if p.same}),
        fold_ids=np.asarray([p.fold for p in pairs], dtype=np.int64),
        heldout=np.asarray([p.name1 not in train_names and p.name2 not in train_names for p in pairs],
                           dtype=bool),
        train_identities=len(names & train_names))
    if split.train_identities:
        log.warning("%s: %d of %d pairs name %d training identities", pairs_uri, int((~split.heldout).sum()),
                    len(pairs), split.train_identities)
    return pairs_uri, split


def embed_keys(model: Any, metadata: dict[str, Any], dataset_dir: Path, rows: dict[str, dict[str, Any]],
               keys: list[str], batch_size: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, flip embeddings) float32 [len(keys), D] of the dataset images `keys`, read in chunks.

    The flip embeddings (`flip_embeddings`, `MirrorPairModel`) are None
    without `flip`. Images are read and embedded a chunk at a time, so memory
    holds one chunk of encoded images, not the dataset.
    """
    from facenet_kfp import export

    embedder = MirrorPairModel(model) if flip else model
    chunk = max(batch_size * 8, 512)
    parts: list[np.ndarray] = []
    with ShardReader(dataset_dir) as reader, \
            Progress("embedding images", total=len(keys), unit="images", logger=log) as progress:
        for start in range(0, len(keys), chunk):
            batch_keys = keys[start:start + chunk]
            images = [reader.read(rows[key]) for key in batch_keys]
            emb = np.asarray(export.embed_images(embedder, metadata, images, batch_size), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(images):
                raise InputError(f"model returned embeddings of shape {emb.shape} for {len(images)} images")
            parts.append(emb)
            progress.update(len(images))
    embeddings = np.concatenate(parts)
    if not np.isfinite(embeddings).all():
        raise InputError(f"the model produced non-finite embeddings for {int((~np.isfinite(embeddings)).any(1).sum())} "
                         f"images; the model is broken (check training diverged)")
    if not flip:
        return embeddings, None
    plain, mirrored = np.split(embeddings, 2, axis=1)
    return plain, flip_embeddings(plain, mirrored)


# ----------------------------------------------------------------------------- metrics

def verification_scores(val_distances: np.ndarray, val_same: np.ndarray, test_distances: np.ndarray,
                        test_same: np.ndarray, test_folds: np.ndarray | None, config: EvaluateConfig,
                        seed_threshold: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """The threshold chosen on validation pairs and what it gives on test pairs: (scores, thresholds).

    Scores are the flat ``threshold``, ``val_*``, ``test_*`` and
    ``threshold_at_far_*`` scalars (module docstring, steps 4 and 5);
    thresholds maps "accuracy" and "far_<far>" to the thresholds chosen on
    validation. `seed_threshold` (in the same distance) adds
    ``test_accuracy_at_seed_threshold``; None leaves it out.
    """
    vd, vs, td, ts = val_distances, val_same, test_distances, test_same
    threshold, val_accuracy = vm.select_threshold(vd, vs)
    m: dict[str, float] = {"threshold": threshold, "val_accuracy": val_accuracy,
                           "test_accuracy": vm.accuracy_at(td, ts, threshold)}
    # Given fold ids (a pairs file's own folds) set the fold count; evaluate.folds is for seeded folds.
    if test_folds is None:
        test_folds = vm.contiguous_folds(td.size, config.folds)
    n_folds = int(np.unique(test_folds).size)
    folds = vm.kfold_accuracy(td, ts, n_folds, fold_ids=test_folds)
    m["test_kfold_accuracy_mean"] = folds["mean"]
    m["test_kfold_accuracy_std"] = folds["std"]
    m["test_folds"] = n_folds
    m["test_auc"] = vm.roc_auc(td, ts)
    m["test_eer"], m["test_eer_threshold"] = vm.equal_error_rate(td, ts)
    m["val_auc"] = vm.roc_auc(vd, vs)
    thresholds = {"accuracy": threshold}
    for far in config.far_targets:
        key = far_key(far)
        far_threshold = vm.threshold_at_far(vd, vs, far)
        m[f"threshold_at_far_{key}"] = far_threshold
        thresholds[f"far_{key}"] = far_threshold
        m.update(val_at_far_scores("test_", td, ts, test_folds, far, far_threshold))
    if seed_threshold is not None:
        m["test_accuracy_at_seed_threshold"] = vm.accuracy_at(td, ts, seed_threshold)
    return m, thresholds


def val_at_far_scores(prefix: str, distances: np.ndarray, same: np.ndarray, fold_ids: np.ndarray | None,
                      far: float, threshold: float | None = None) -> dict[str, float]:
    """VAL at one target FAR, with the FAR actually reached, where the pairs can measure that FAR.

    Keys start with `prefix` and name the FAR by `far_key`:

    * with `threshold` (chosen on validation for this FAR): ``val_at_far_<far>``
      and ``far_at_far_<far>``, VAL and the FAR reached at that threshold on
      these pairs, when they hold at least `metrics.min_different_pairs` (far)
      different-person pairs; else only ``val_at_far_<far>_needs_different_pairs``;
    * k-fold (threshold from the other folds, `metrics.kfold_val_at_far`), with
      `fold_ids`: ``kfold_val_at_far_<far>_mean``/``_std`` and
      ``kfold_far_at_far_<far>_mean`` when the test part of every fold holds that
      many different-person pairs; else only ``kfold_val_at_far_<far>_needs_different_pairs``.
    """
    key, need = far_key(far), vm.min_different_pairs(far)
    m: dict[str, float] = {}
    if threshold is not None:
        if int(np.sum(~same)) >= need:
            m[f"{prefix}val_at_far_{key}"], m[f"{prefix}far_at_far_{key}"] = vm.val_far(distances, same, threshold)
        else:
            m[f"{prefix}val_at_far_{key}_needs_different_pairs"] = need
    if fold_ids is not None:
        if vm.fewest_in_a_fold(same, fold_ids)[1] >= need:
            n_folds = int(np.unique(fold_ids).size)
            kfold = vm.kfold_val_at_far(distances, same, far, n_folds, fold_ids=fold_ids)
            m[f"{prefix}kfold_val_at_far_{key}_mean"] = kfold["val_mean"]
            m[f"{prefix}kfold_val_at_far_{key}_std"] = kfold["val_std"]
            m[f"{prefix}kfold_far_at_far_{key}_mean"] = kfold["far_mean"]
        else:
            m[f"{prefix}kfold_val_at_far_{key}_needs_different_pairs"] = need
    return m


def count_metrics(split: SplitPairs) -> dict[str, int]:
    """What a split's figures rest on: pairs (in all, same-person, different-person), identities (in all and
    in same pairs), images; and ``<split>_accuracy_withheld`` (1 when either class has fewer than
    `metrics.MIN_CLASS_PAIRS` pairs, so that no accuracy of the split is a headline figure)."""
    return {**_class_counts(f"{split.name}_", split.same),
            f"{split.name}_identities": split.identities,
            f"{split.name}_positive_identities": split.positive_identities,
            f"{split.name}_images": len(split.used_keys)}


def split_metrics(val: SplitPairs, test: SplitPairs, config: EvaluateConfig, distance: str | bool,
                  unit: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
    """Validation/test scalars (flat): `verification_scores` of the distances, the counts and the distance name.

    Distances on `val` and `test` must be filled in, in `distance` (a name of
    `DISTANCES`, or model.json's squared flag). `unit` says whether the
    embeddings are unit length (`seed_threshold_in`). Returns (metrics,
    thresholds) as `verification_scores`.
    """
    name = _as_distance(distance)
    seed_threshold = seed_threshold_in(name, config.seed_threshold, unit)
    scores, thresholds = verification_scores(val.distances, val.same, test.distances, test.same,
                                             test.fold_ids, config, seed_threshold)
    m: dict[str, Any] = {"threshold": scores["threshold"], "distance": name, **scores}
    if seed_threshold is not None:
        m["seed_threshold"] = seed_threshold
    for split in (val, test):
        m.update(count_metrics(split))
    return m, thresholds


def flip_metrics(val: SplitPairs, test: SplitPairs, config: EvaluateConfig, distance: str, unit: bool
                 ) -> tuple[dict[str, float], float]:
    """`verification_scores` of the flip distances, named by `report.flip_key`, and the flip threshold."""
    seed_threshold = seed_threshold_in(distance, config.seed_threshold, unit)
    scores, thresholds = verification_scores(val.flip_distances, val.same, test.flip_distances, test.same,
                                             test.fold_ids, config, seed_threshold)
    return {flip_key(key): value for key, value in scores.items()}, thresholds["accuracy"]


def pair_scores(distances: np.ndarray, same: np.ndarray, fold_ids: np.ndarray, config: EvaluateConfig,
                threshold: float) -> dict[str, float]:
    """Scalars of a pairs file (keys without a prefix): k-fold accuracy and VAL@FAR over `fold_ids`,
    accuracy at `threshold` (chosen on validation), AUC and EER."""
    d, s = distances, same
    n_folds = int(np.unique(fold_ids).size)
    folds = vm.kfold_accuracy(d, s, n_folds, fold_ids=fold_ids)
    m = {"kfold_accuracy_mean": folds["mean"], "kfold_accuracy_std": folds["std"],
         "accuracy_at_threshold": vm.accuracy_at(d, s, threshold)}
    for far in config.far_targets:
        m.update(val_at_far_scores("", d, s, fold_ids, far))
    m["auc"] = vm.roc_auc(d, s)
    m["eer"], _ = vm.equal_error_rate(d, s)
    return m


def _class_counts(prefix: str, same: np.ndarray) -> dict[str, int]:
    """``<prefix>pairs``, ``same_pairs``, ``different_pairs`` and ``accuracy_withheld`` (`count_metrics`)."""
    n_same = int(np.sum(same))
    n_different = int(np.size(same)) - n_same
    return {f"{prefix}pairs": int(np.size(same)), f"{prefix}same_pairs": n_same,
            f"{prefix}different_pairs": n_different,
            f"{prefix}accuracy_withheld": int(bool(vm.accuracy_withheld(n_same, n_different)))}


def pairs_file_folds(same: np.ndarray, fold_ids: np.ndarray, config: EvaluateConfig, where: str
                     ) -> tuple[np.ndarray, bool]:
    """(fold id per pair, whether they are the file's own) for the pairs of a pairs file.

    The LFW protocol cross-validates over the folds the file's header declares
    (10 in View 2's pairs.txt; any count from 2 on is used as is). A file of one
    fold (View 1 style, a header of just the pair count) has nothing to
    cross-validate over: its pairs are dealt into ``config.folds`` seeded
    stratified folds (`stratified_folds`), and every output says so.
    """
    if np.unique(fold_ids).size >= 2:
        return np.asarray(fold_ids, dtype=np.int64), True
    return stratified_folds(same, config.folds, config.seed, f"{where} (one fold)"), False


def _prefixed(prefix: str, scores: dict[str, float], flip: bool = False) -> dict[str, float]:
    return {(flip_key(prefix + key) if flip else prefix + key): value for key, value in scores.items()}


def lfw_metrics(lfw: SplitPairs, config: EvaluateConfig, threshold: float, flip_threshold: float | None = None,
                source: str = "LFW pairs file") -> tuple[dict[str, Any], list[str]]:
    """LFW pairs.txt scalars and warnings: `pair_scores` with the file's folds, overlap with training, held-out figures.

    ``lfw_pairs_*``: every pair (flip variants when `flip_threshold` is given
    and the flip distances are filled in). ``lfw_pairs_train_identities`` and
    ``lfw_pairs_overlapping_pairs`` count the training identities named and
    the pairs naming one. When some pair does, ``lfw_pairs_heldout_*`` are the
    same scores on the pairs of two held-out identities, dealt into
    ``config.folds`` seeded stratified folds (removing pairs unbalances the
    file's folds); with fewer than `MIN_HELDOUT_PAIRS` such pairs (or too few of
    a label for the folds) they are left out and a warning says the pairs.txt
    figures are not a held-out benchmark. `source` names the pairs file in errors.
    """
    s = lfw.same
    fold_ids, from_file = pairs_file_folds(s, lfw.fold_ids, config, source)
    m: dict[str, Any] = _prefixed("lfw_pairs_", pair_scores(lfw.distances, s, fold_ids, config, threshold))
    if flip_threshold is not None:
        m.update(_prefixed("lfw_pairs_", pair_scores(lfw.flip_distances, s, fold_ids, config, flip_threshold),
                           flip=True))
    heldout = lfw.heldout
    m.update(_class_counts("lfw_pairs_", s))
    m["lfw_pairs_folds"] = int(np.unique(fold_ids).size)
    m["lfw_pairs_folds_from_file"] = int(from_file)
    m["lfw_pairs_identities"] = lfw.identities
    m["lfw_pairs_images"] = len(lfw.keys)
    m["lfw_pairs_train_identities"] = lfw.train_identities
    m["lfw_pairs_overlapping_pairs"] = int((~heldout).sum())
    m.update(_class_counts("lfw_pairs_heldout_", s[heldout]))
    # pairs.txt keys are Name/Name_NNNN.jpg.
    m["lfw_pairs_heldout_identities"] = len({lfw.keys[i].split("/")[0]
                                              for i in np.concatenate((lfw.index_a[heldout], lfw.index_b[heldout]))})
    warnings: list[str] = []
    if heldout.all():
        return m, warnings
    n_same, n_diff = int(s[heldout].sum()), int((~s[heldout]).sum())
    if heldout.sum() < MIN_HELDOUT_PAIRS or min(n_same, n_diff) < config.folds:
        warnings.append(
            f"LFW pairs.txt: {m['lfw_pairs_overlapping_pairs']:,} of {s.size:,} pairs name "
            f"{lfw.train_identities:,} training identities, and only {int(heldout.sum()):,} pairs of held-out "
            f"identities remain ({n_same} same, {n_diff} different; at least {MIN_HELDOUT_PAIRS} with "
            f"{config.folds} of each are needed for held-out figures): the pairs.txt figures are not a "
            f"held-out benchmark; the test split's are")
        return m, warnings
    held_same = s[heldout]
    folds = stratified_folds(held_same, config.folds, config.seed, "LFW pairs.txt, held-out identities")
    m.update(_prefixed("lfw_pairs_heldout_", pair_scores(lfw.distances[heldout], held_same, folds, config,
                                                         threshold)))
    if flip_threshold is not None:
        m.update(_prefixed("lfw_pairs_heldout_", pair_scores(lfw.flip_distances[heldout], held_same, folds, config,
                                                             flip_threshold), flip=True))
    m["lfw_pairs_heldout_folds"] = config.folds
    return m, warnings


def archive_overlap(train_rows: dict[str, dict[str, Any]], eval_rows: dict[str, dict[str, Any]],
                    train_names: set[str]) -> dict[str, int]:
    """How many identities of the evaluation archive the training archive also has, matched by name."""
    eval_names = {row["identity"] for row in eval_rows.values()}
    in_archive = eval_names & {row["identity"] for row in train_rows.values()}
    return {"eval_identities": len(eval_names), "eval_images": len(eval_rows),
            "eval_identities_in_training_archive": len(in_archive),
            "eval_identities_in_train_split": len(eval_names & train_names)}


def identity_warnings(splits: list[SplitPairs]) -> list[str]:
    """One warning per split whose same-person pairs come from fewer than `MIN_IDENTITIES` identities."""
    return [f"{s.name}: its figures rest on {s.positive_identities} identities in same-person pairs "
            f"({s.identities} in all its pairs), fewer than {MIN_IDENTITIES}; they describe those few people, "
            f"not unseen faces at large (use a larger dataset or a larger {s.name} fraction)"
            for s in splits if s.positive_identities < MIN_IDENTITIES]


def _roc_lists(distances: np.ndarray, same: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, thr = vm.downsample_roc(*vm.roc_curve(distances, same), max_points=ROC_POINTS)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def choose_examples(split: SplitPairs, threshold: float, count: int, seed: int) -> list[int]:
    """Indices of `count` pairs to show: about half wrongly classified (when there are), the rest right.

    Drawn at random with `seed`; wrong ones first, each group in pair order.
    """
    predicted = split.distances < threshold
    wrong = np.flatnonzero(predicted != split.same)
    right = np.flatnonzero(predicted == split.same)
    n_wrong = min(wrong.size, count // 2)
    n_right = min(right.size, count - n_wrong)
    n_wrong = min(wrong.size, count - n_right)
    rng = np.random.default_rng(seed)
    picked_wrong = np.sort(rng.choice(wrong, n_wrong, replace=False)) if n_wrong else wrong[:0]
    picked_right = np.sort(rng.choice(right, n_right, replace=False)) if n_right else right[:0]
    return [int(i) for i in np.concatenate((picked_wrong, picked_right))]


# ----------------------------------------------------------------------------- the step

def evaluate(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, splits_dir: str | os.PathLike,
             config: EvaluateConfig, *, report_path: str | os.PathLike,
             threshold_path: str | os.PathLike, pairs_uri: str = "", pairs_sha256: str = "",
             pairs_dir: str | os.PathLike | None = None, model_uri: str = "",
             metrics_path: str | os.PathLike | None = None,
             eval_dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Choose the threshold on validation pairs and measure it on test pairs (see the module docstring).

    With `eval_dataset_dir` (a packed dataset of a separate evaluation archive,
    LFW say) the test pairs come from that archive: the pairs of `pairs_uri`
    (its folds are the k-fold folds: LFW View 2), else pairs drawn over all its
    identities; the training archive's test split is not used. Identities
    present in both archives (by name) are counted (``eval_*`` metrics).

    The pairs file comes either checked by the pipeline's check pairs step
    (`pairs_dir`, its output folder) or as `pairs_uri` (with `pairs_sha256`),
    which is checked here the same way (`pairs.check_pairs_source`); errors
    about it name `pairs_uri` and the line.

    Inputs: the model folder from train (model.json + the Keras model), the
    packed image dataset (real images are used), the splits folder (val.txt,
    test.txt, and train.txt with a pairs file). Writes, each atomically:
    `report_path` (self-contained HTML), `threshold_path` (threshold.json, the
    serving threshold and its distance definition) and, when given,
    `metrics_path` (JSON of the metrics).

    Returns ``{"metrics": flat dict of every scalar, "roc": {"fpr", "tpr",
    "thresholds"} (test ROC, at most 300 points, thresholds in the distance
    used), "confusion_matrix": [[TN, FP], [FN, TP]] on test at the chosen
    threshold, "threshold": the threshold.json content, "warnings": [why some
    figures mean little]}``.
    """
    started = time.monotonic()
    model_dir, dataset_dir, splits_dir = Path(model_dir), Path(dataset_dir), Path(splits_dir)
    _check_inputs(model_dir, dataset_dir, splits_dir)
    eval_dir = Path(eval_dataset_dir) if eval_dataset_dir is not None else None
    if eval_dir is not None:
        _check_folder(eval_dir, "evaluation image dataset")
        if not (eval_dir / MANIFEST).is_file():
            raise InputError(f"{eval_dir / MANIFEST}: not found; is {eval_dir} a packed image dataset?")

    rows = real_rows_by_file(dataset_dir)
    test_dir, test_rows = (dataset_dir, rows) if eval_dir is None else (eval_dir, real_rows_by_file(eval_dir))
    train_names = {name for name, _ in read_split(splits_dir, "train")}
    val = split_pairs("val", splits_dir, dataset_dir, rows, config)
    lfw: SplitPairs | None = None
    if pairs_dir is not None:
        if pairs_uri or pairs_sha256:
            raise InputError(f"give either checked pairs ({pairs_dir}) or a pairs file to check ({pairs_uri}), "
                             f"not both")
        pairs_uri, lfw = lfw_pairs(Path(pairs_dir), test_rows, test_dir, train_names)
    elif pairs_uri:
        with tempfile.TemporaryDirectory(prefix="facenet-pairs-") as tmp:
            check_pairs_source(pairs_uri, pairs_sha256, test_dir, Path(tmp) / "pairs")
            _, lfw = lfw_pairs(Path(tmp) / "pairs", test_rows, test_dir, train_names)
    elif pairs_sha256:
        raise InputError("a pairs sha256 was given without a pairs file")
    test_folds_from_file = False
    if eval_dir is None:
        test = split_pairs("test", splits_dir, dataset_dir, rows, config)
    elif lfw is not None:
        # The evaluation archive's pairs.txt, in the folds its header declares (seeded ones for a 1-fold file).
        test = dataclasses.replace(lfw, name="test")
        test.fold_ids, test_folds_from_file = pairs_file_folds(test.same, lfw.fold_ids, config, pairs_uri)
    else:
        test = archive_pairs(eval_dir, test_rows, config)
    if test.fold_ids is None:
        # Folds shuffled with evaluate.seed (the pairs' own order comes from make_pairs).
        where = f"{splits_dir / 'test.txt'}" if eval_dir is None else f"pairs of the evaluation archive {eval_dir}"
        test.fold_ids = stratified_folds(test.same, config.folds, config.seed, where)
    if lfw is not None:
        pairs_file_folds(lfw.same, lfw.fold_ids, config, pairs_uri)   # a 1-fold file too small fails before embedding

    from facenet_kfp import export

    model, metadata = export.load_model_artifact(model_dir)
    squared = model_distance_squared(metadata, model_dir)
    name = resolve_distance(config.distance, squared)

    unit, dim = True, 0
    # The splits of each archive, embedded once per image (lfw is the test split of a separate archive).
    of_train = [val] if eval_dir is not None else [s for s in (val, test, lfw) if s is not None]
    of_eval = [s for s in (test, lfw) if s is not None] if eval_dir is not None else []
    for folder, folder_rows, splits in ((dataset_dir, rows, of_train), (test_dir, test_rows, of_eval)):
        if not splits:
            continue
        keys = sorted({key for s in splits for key in s.used_keys})
        embeddings, flipped = embed_keys(model, metadata, folder, folder_rows, keys, config.batch_size, config.flip)
        # The seed threshold is compared only where it converts for the model's own embeddings.
        unit, dim = unit and unit_length(embeddings), int(embeddings.shape[1])
        row_of = {key: i for i, key in enumerate(keys)}
        for s in splits:
            # Map the split's key indices to embedding rows (every key a pair uses was embedded).
            to_row = np.zeros(len(s.keys), dtype=np.int64)
            used = np.unique(np.concatenate((s.index_a, s.index_b)))
            to_row[used] = [row_of[s.keys[i]] for i in used]
            s.distances = pair_distances(embeddings, to_row[s.index_a], to_row[s.index_b], name)
            if flipped is not None:
                s.flip_distances = pair_distances(flipped, to_row[s.index_a], to_row[s.index_b], name)

    metrics, thresholds = split_metrics(val, test, config, name, unit)
    metrics["test_folds_from_file"] = int(test_folds_from_file)
    threshold, flip_threshold = thresholds["accuracy"], None
    if config.flip:
        flip_scores, flip_threshold = flip_metrics(val, test, config, name, unit)
        metrics.update(flip_scores)
    warnings = identity_warnings([val, test])
    if eval_dir is not None:
        metrics.update(archive_overlap(rows, test_rows, train_names))
    if lfw is not None:
        lfw_scores, lfw_warnings = lfw_metrics(lfw, config, threshold, flip_threshold, source=pairs_uri)
        metrics.update(lfw_scores)
        warnings += lfw_warnings
    metrics["embedding_dim"] = dim
    for warning in warnings:
        log.warning("%s", warning)

    threshold_info = {
        "threshold": threshold,
        "distance": name,
        "distance_definition": DISTANCE_DEFINITIONS[name],
        "rule": RULE,
        "chosen_on": CHOSEN_ON,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "model": model_uri or str(model_dir),
        # Which model the threshold belongs to (verify refuses it for any other): the model file's
        # sha256 and the model's own distance (`distance` may differ: evaluate.distance).
        "model_sha256": file_sha256(model_dir / str(metadata["file"])),
        "model_distance": distance_name(squared),
        "embedding_dim": dim,
        "preprocessing": metadata["preprocessing"],
    }
    if flip_threshold is not None:
        threshold_info.update(flip_threshold=flip_threshold, flip_definition=FLIP_DEFINITION,
                              flip_test_accuracy=metrics["test_flip_accuracy"])
    result = {
        "metrics": metrics,
        "roc": _roc_lists(test.distances, test.same),
        "confusion_matrix": vm.confusion_matrix(test.distances, test.same, threshold),
        "threshold": threshold_info,
        "warnings": warnings,
    }

    html = _build_report(model_dir, test_dir, test_rows, config, val, test, lfw, metrics, threshold,
                         name, squared, warnings, model_uri or str(model_dir), eval_dir is not None)
    write_json(threshold_path, threshold_info)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    write_text(report_path, html)
    withheld = vm.accuracy_withheld(metrics["test_same_pairs"], metrics["test_different_pairs"])
    accuracy = withheld or (f"test accuracy {metrics['test_accuracy']:.4f}, {metrics['test_folds']}-fold "
                            f"{metrics['test_kfold_accuracy_mean']:.4f} ± {metrics['test_kfold_accuracy_std']:.4f}")
    log.info("threshold %.4f (%s) chosen on %d validation pairs; on %d same and %d different test pairs: %s; "
             "AUC %.4f (%.1f s)", threshold, DISTANCE_LABELS[name], val.same.size, metrics["test_same_pairs"],
             metrics["test_different_pairs"], accuracy, metrics["test_auc"], time.monotonic() - started)
    return result


def _folds_text(folds: int, from_file: bool, evaluation_archive: bool = False) -> str:
    """How a pairs file's pairs were dealt into folds, for the report's notes."""
    file = "the evaluation archive's pairs.txt" if evaluation_archive else "the file"
    if from_file:
        return f"{folds} folds {file} declares (the LFW protocol)"
    return (f"{folds} seeded stratified folds (evaluate.folds, evaluate.seed): {file} declares one fold "
            f"(View 1 style), nothing to cross-validate over")


def _build_report(model_dir: Path, dataset_dir: Path, rows: dict[str, dict[str, Any]],
                  config: EvaluateConfig, val: SplitPairs, test: SplitPairs, lfw: SplitPairs | None,
                  metrics: dict[str, Any], threshold: float, name: str, squared: bool, warnings: list[str],
                  model: str, separate: bool = False) -> str:
    """The HTML report; `dataset_dir` and `rows` are those of the test pairs' images (`separate`:
    a separate evaluation archive)."""
    from facenet_kfp import report

    examples = []
    with ShardReader(dataset_dir) as reader:
        for i in choose_examples(test, threshold, config.report_examples, config.seed):
            key_a, key_b = test.keys[test.index_a[i]], test.keys[test.index_b[i]]
            examples.append(report.ExamplePair(
                key_a=key_a, key_b=key_b, image_a=reader.read(rows[key_a]), image_b=reader.read(rows[key_b]),
                distance=float(test.distances[i]), same=bool(test.same[i]),
                predicted_same=bool(test.distances[i] < threshold)))
    rocs = {"test pairs": vm.roc_curve(test.distances, test.same)[:2]}
    if test.flip_distances is not None:
        rocs["test pairs, flip"] = vm.roc_curve(test.flip_distances, test.same)[:2]
    pairs_file = separate and lfw is not None
    source = ("the model's own (model.json)" if config.distance == "model"
              else f"evaluate.distance; the model was trained with {DISTANCE_LABELS[distance_name(squared)]}")
    notes = [
        f"Distances are {DISTANCE_DEFINITIONS[name]} ({source}). A pair is judged the same person when its "
        f"distance is below the threshold.",
        f"The threshold maximises accuracy on {val.same.size:,} validation pairs "
        f"({val.positive_identities} identities in same-person pairs, {val.identities} in all) and is "
        f"applied unchanged to {test.same.size:,} test pairs ({test.positive_identities} and "
        f"{test.identities} identities); "
        + (f"the test pairs come from the separate evaluation archive ({metrics['eval_identities']:,} "
           f"identities, {metrics['eval_images']:,} images), {metrics['eval_identities_in_training_archive']:,} "
           f"of whose identity names also occur in the training archive, "
           f"{metrics['eval_identities_in_train_split']:,} of them in the train split. " if separate else
           "validation and test identities are disjoint from training identities. ")
        + "Only real images are used, never the generated completion images.",
        f"Pairs per split, balanced across identities as LFW's pairs.txt: at most "
        f"{config.max_pairs_per_identity:,} same-person pairs per identity (a seeded sample of its image "
        f"pairs) and at most {config.max_positive_pairs:,} in all (the per-identity cap lowered evenly to "
        f"fit), and as many different-person pairs, each from two identities chosen uniformly and one image "
        f"of each, without repeats; seed {config.seed}.",
        ("k-fold accuracy: the test pairs are in the " + _folds_text(metrics["test_folds"], True, pairs_file)
         if metrics.get("test_folds_from_file") else
         f"k-fold accuracy: the test pairs are shuffled (seed {config.seed}) into {metrics['test_folds']} folds, "
         f"stratified by label" + (" (the evaluation archive's pairs.txt declares one fold)" if pairs_file
                                   else ""))
        + "; each fold is scored with the threshold that maximises accuracy on the other folds; "
          "mean ± population std over folds.",
        f"Accuracy is a headline figure only for pairs with at least {vm.MIN_CLASS_PAIRS} of each class "
        f"(same person, different people); with fewer, answering the larger class for every pair can score "
        f"as well, so the headline gives the pair counts, AUC and EER and says why accuracy is withheld "
        f"(the accuracies stay in the table of all metrics, with <set>_accuracy_withheld = 1).",
        "VAL@FAR: VAL = accepted same pairs / same pairs, FAR = accepted different pairs / different "
        "pairs. 'test VAL at FAR' uses the threshold interpolated to that FAR on the validation pairs, "
        "applied to test; the FAR it actually reaches on test is shown beside it. The k-fold variant finds "
        "the threshold on the other test folds. A FAR f can be measured only on at least ceil(1/f) "
        "different-person pairs (1,000 for 1e-3): with fewer test pairs (for the k-fold variant, fewer in "
        "the test part of any fold) VAL@FAR is n/a and no VAL is recorded, only "
        "..._needs_different_pairs.",
    ]
    if "seed_threshold" in metrics:
        notes.append(f"Seed threshold: the original TF1 implementation's fixed plain-L2 threshold {config.seed_threshold:g}, "
                     f"i.e. {metrics['seed_threshold']:.4g} ({DISTANCE_LABELS[name]}).")
    else:
        notes.append(f"Seed threshold: the original TF1 implementation's fixed plain-L2 threshold {config.seed_threshold:g} "
                     f"has no {DISTANCE_LABELS[name]} equivalent here (the embeddings are not unit length), "
                     f"so its accuracy is not reported.")
    if test.flip_distances is not None:
        notes.append(f"Flip figures (flip_ metrics, 'with flip' column): {FLIP_DEFINITION}; their threshold "
                     f"is chosen on the validation pairs the same way. threshold.json's threshold is the plain one, "
                     f"for a service that embeds each image once; its flip_threshold is for one that embeds "
                     f"image and mirror.")
    if lfw is not None:
        rocs["LFW pairs.txt"] = vm.roc_curve(lfw.distances, lfw.same)[:2]
        text = (f"LFW pairs.txt: {metrics['lfw_pairs_pairs']:,} pairs ({metrics['lfw_pairs_same_pairs']:,} same, "
                f"{metrics['lfw_pairs_different_pairs']:,} different), {lfw.identities:,} identities, in the "
                f"{_folds_text(metrics['lfw_pairs_folds'], bool(metrics['lfw_pairs_folds_from_file']))}. ")
        if not metrics["lfw_pairs_train_identities"]:
            text += "None of them is a training identity, so these figures are held out."
        else:
            text += (f"{metrics['lfw_pairs_train_identities']:,} of them are TRAINING identities, named by "
                     f"{metrics['lfw_pairs_overlapping_pairs']:,} pairs, so the full figures are optimistic. ")
            if "lfw_pairs_heldout_kfold_accuracy_mean" in metrics:
                text += (f"The held-out figures (lfw_pairs_heldout_) use the "
                         f"{metrics['lfw_pairs_heldout_pairs']:,} pairs of two non-training identities "
                         f"({metrics['lfw_pairs_heldout_same_pairs']:,} same, "
                         f"{metrics['lfw_pairs_heldout_different_pairs']:,} different), "
                         f"in {config.folds} seeded stratified folds.")
                held = lfw.heldout
                rocs["LFW pairs.txt, held-out identities"] = vm.roc_curve(lfw.distances[held], lfw.same[held])[:2]
            else:
                text += (f"Only {metrics['lfw_pairs_heldout_pairs']:,} pairs of held-out identities remain, "
                         f"too few for figures of their own: the pairs.txt figures are NOT a held-out "
                         f"benchmark; the test-split figures are.")
        notes.append(text)
    history, curves_png = report.load_training_history(model_dir, required=False)
    return report.build_report_html(
        title="Face verification: threshold evaluation", model=model, metrics=metrics,
        distance_label=DISTANCE_LABELS[name], threshold=threshold,
        seed_threshold=metrics.get("seed_threshold"), test_distances=test.distances, test_same=test.same,
        rocs=rocs, history=history, curves_png=curves_png, examples=examples, notes=notes, warnings=warnings)
