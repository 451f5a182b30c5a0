"""Step 7: embed validation and test faces, choose the verification threshold on validation, measure test.

Protocol (the verification protocol face-recognition papers report):

1. Only REAL images are used (manifest rows with ``synthetic`` false): the
   completion step's flipped copies would make "same person" pairs trivially
   easy. Validation and test identities come from the splits folder and are
   disjoint from training identities.
2. Per split, balanced pairs come from `pairs.make_pairs`: every same-person
   image pair (subsampled to ``max_positive_pairs``) and as many different-person
   pairs, seeded.
3. Embeddings come from the trained model with its recorded preprocessing
   (`export.embed_images`); a pair's distance is computed in the model's own
   definition, squared L2 ``‖a − b‖²`` (0..4 on the unit sphere) or plain L2
   ``‖a − b‖`` (0..2), as recorded in model.json. Every output names it.
4. The threshold maximises accuracy on the VALIDATION pairs
   (`metrics.select_threshold`); it is then applied unchanged to the TEST
   pairs. A pair is "same person" when ``distance < threshold``.
5. Test metrics: accuracy at that threshold; 10-fold cross-validated accuracy
   (threshold from 9 folds, applied to the 10th; pairs are shuffled into
   folds with the seed, stratified so each fold holds same and different
   pairs); ROC AUC and equal error rate; VAL at each target FAR, where the
   threshold reaching that FAR is interpolated on the validation pairs and
   applied to test (``test_val_at_far_<far>``, with the FAR it actually gives
   on test in ``test_far_at_far_<far>``), and the k-fold variant on test alone
   (``test_kfold_val_at_far_<far>_mean``); and the accuracy of the seed
   project's fixed threshold 1.242 (plain L2) converted to the model's distance.
6. Optionally the LFW View 2 pairs.txt (``pairs_uri``): 10-fold accuracy with
   the folds of the file, k-fold VAL at each FAR, AUC. Those pairs may name
   training identities when the model was trained on the same archive.
"""

from __future__ import annotations

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
from facenet_kfp.fsutil import read_json, write_json, write_text
from facenet_kfp.pairs import check_pairs_exist, make_pairs, parse_pairs_file
from facenet_kfp.progress import Progress
from facenet_kfp.provenance import check_inputs, check_recorded
from facenet_kfp.shards import MANIFEST, ShardReader, read_manifest
from facenet_kfp.splits import read_split

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
THRESHOLD_JSON = "threshold.json"
RULE = "same person when distance < threshold"
CHOSEN_ON = "validation pairs, max accuracy"
ROC_POINTS = 300          # the KFP UI draws a ROC of at most a few hundred points comfortably

# Names of the two distance definitions, as written in every output.
DISTANCE_NAMES = {True: "squared_l2", False: "l2"}
DISTANCE_LABELS = {"squared_l2": "squared L2", "l2": "plain L2"}
DISTANCE_DEFINITIONS = {
    "squared_l2": "squared Euclidean distance ||a - b||^2 between the L2-normalised embeddings "
                  "(0 for identical faces, at most 4)",
    "l2": "Euclidean distance ||a - b|| between the L2-normalised embeddings "
          "(0 for identical faces, at most 2)",
}


# ----------------------------------------------------------------------------- distances

def distance_name(squared: bool) -> str:
    """"squared_l2" or "l2": the key every output uses for the distance definition."""
    return DISTANCE_NAMES[bool(squared)]


def model_distance_squared(metadata: dict[str, Any], model_dir: str | os.PathLike) -> bool:
    """True when the model's distances are squared L2, from model.json's ``distance.squared``."""
    distance = metadata.get("distance") if isinstance(metadata, dict) else None
    squared = distance.get("squared") if isinstance(distance, dict) else None
    if not isinstance(squared, bool):
        raise InputError(f"{Path(model_dir) / MODEL_JSON}: expected a boolean 'distance.squared' "
                         f"(squared or plain L2 distances), got {distance!r}")
    return squared


def pair_distances(embeddings: np.ndarray, index_a: np.ndarray, index_b: np.ndarray,
                   squared: bool) -> np.ndarray:
    """Distances of pairs (index_a[i], index_b[i]) of rows of `embeddings` [N, D]: float64 [P].

    squared: ``sum_k (a_k - b_k)^2``; otherwise its square root. Computed in
    float64 from the differences (not from dot products), so identical
    embeddings give exactly 0.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    diff = e[np.asarray(index_a)] - e[np.asarray(index_b)]
    d2 = np.einsum("ij,ij->i", diff, diff)
    return d2 if squared else np.sqrt(d2)


def seed_threshold_in(squared: bool, seed_threshold_l2: float) -> float:
    """The seed project's plain-L2 threshold expressed in the model's distance definition."""
    return vm.l2_to_squared(seed_threshold_l2) if squared else float(seed_threshold_l2)


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
    """Pairs of one split: image keys, and per pair the two key indices and the label."""
    name: str
    keys: list[str]
    index_a: np.ndarray      # int64 [P]
    index_b: np.ndarray      # int64 [P]
    same: np.ndarray         # bool [P]
    identities: int
    fold_ids: np.ndarray | None = None
    distances: np.ndarray | None = None   # float64 [P], filled after embedding

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
    """Balanced pairs of one split's identities (real images only)."""
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
    if not any(len(keys) >= 2 for keys in images.values()):
        raise InputError(f"{split_file}: no identity has 2 real images, so split {split!r} has no "
                         f"same-person pair to evaluate")
    try:
        keys, index_a, index_b, same = make_pairs(images, config.max_positive_pairs, config.seed)
    except InputError as exc:
        raise InputError(f"{split_file}: cannot make {split} pairs: {exc}") from exc
    log.info("%s: %d identities, %d pairs (%d same)", split, len(entries), same.size, int(same.sum()))
    return SplitPairs(split, keys, index_a, index_b, same, len(entries))


def lfw_pairs(pairs_uri: str, pairs_sha256: str, rows: dict[str, dict[str, Any]],
              dataset_dir: Path, folder: Path) -> SplitPairs:
    """Download, parse and check an LFW pairs.txt; every image it names must be a real dataset image."""
    from facenet_kfp.download import download

    result = download(pairs_uri, folder / "pairs.txt", sha256=pairs_sha256)
    pairs = parse_pairs_file(result.path)
    try:
        check_pairs_exist(pairs, set(rows))
    except InputError as exc:
        first = next(p for p in pairs if p.file1 not in rows or p.file2 not in rows)
        content = result.path.read_text(encoding="utf-8").splitlines()[first.line - 1]
        raise InputError(f"{pairs_uri}: pairs name images missing from {dataset_dir}: {exc} "
                         f"(first: line {first.line}: {content!r})") from exc
    keys = sorted({f for p in pairs for f in (p.file1, p.file2)})
    index = {key: i for i, key in enumerate(keys)}
    split = SplitPairs(
        name="lfw_pairs", keys=keys,
        index_a=np.asarray([index[p.file1] for p in pairs], dtype=np.int64),
        index_b=np.asarray([index[p.file2] for p in pairs], dtype=np.int64),
        same=np.asarray([p.same for p in pairs], dtype=bool),
        identities=len({name for p in pairs for name in (p.name1, p.name2)}),
        fold_ids=np.asarray([p.fold for p in pairs], dtype=np.int64))
    return split


def embed_keys(model: Any, metadata: dict[str, Any], dataset_dir: Path, rows: dict[str, dict[str, Any]],
               keys: list[str], batch_size: int) -> np.ndarray:
    """Embeddings float32 [len(keys), D] of the dataset images `keys`, read from the shards in chunks.

    Images are read and embedded a chunk at a time, so memory holds one chunk
    of encoded images, not the dataset.
    """
    from facenet_kfp import export

    chunk = max(batch_size * 8, 512)
    parts: list[np.ndarray] = []
    with ShardReader(dataset_dir) as reader, \
            Progress("embedding images", total=len(keys), unit="images", logger=log) as progress:
        for start in range(0, len(keys), chunk):
            batch_keys = keys[start:start + chunk]
            images = [reader.read(rows[key]) for key in batch_keys]
            emb = np.asarray(export.embed_images(model, metadata, images, batch_size), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(images):
                raise InputError(f"model returned embeddings of shape {emb.shape} for {len(images)} images")
            parts.append(emb)
            progress.update(len(images))
    embeddings = np.concatenate(parts)
    if not np.isfinite(embeddings).all():
        raise InputError(f"the model produced non-finite embeddings for {int((~np.isfinite(embeddings)).any(1).sum())} "
                         f"images; the model is broken (check training diverged)")
    return embeddings


# ----------------------------------------------------------------------------- metrics

def split_metrics(val: SplitPairs, test: SplitPairs, config: EvaluateConfig, squared: bool
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """All validation/test scalars (flat) and the thresholds chosen on validation.

    Distances on `val` and `test` must be filled in. Returns (metrics,
    thresholds) where thresholds maps "accuracy" and "far_<far>" to values in
    the model's distance definition.
    """
    vd, vs, td, ts = val.distances, val.same, test.distances, test.same
    threshold, val_accuracy = vm.select_threshold(vd, vs)
    m: dict[str, Any] = {"threshold": threshold, "distance": distance_name(squared),
                         "val_accuracy": val_accuracy,
                         "test_accuracy": vm.accuracy_at(td, ts, threshold)}
    folds = vm.kfold_accuracy(td, ts, config.folds, fold_ids=test.fold_ids)
    m["test_kfold_accuracy_mean"] = folds["mean"]
    m["test_kfold_accuracy_std"] = folds["std"]
    m["test_auc"] = vm.roc_auc(td, ts)
    m["test_eer"], m["test_eer_threshold"] = vm.equal_error_rate(td, ts)
    m["val_auc"] = vm.roc_auc(vd, vs)
    thresholds = {"accuracy": threshold}
    for far in config.far_targets:
        key = far_key(far)
        far_threshold = vm.threshold_at_far(vd, vs, far)
        m[f"threshold_at_far_{key}"] = far_threshold
        m[f"test_val_at_far_{key}"], m[f"test_far_at_far_{key}"] = vm.val_far(td, ts, far_threshold)
        kfold = vm.kfold_val_at_far(td, ts, far, config.folds, fold_ids=test.fold_ids)
        m[f"test_kfold_val_at_far_{key}_mean"] = kfold["val_mean"]
        m[f"test_kfold_val_at_far_{key}_std"] = kfold["val_std"]
        m[f"test_kfold_far_at_far_{key}_mean"] = kfold["far_mean"]
        thresholds[f"far_{key}"] = far_threshold
    seed_threshold = seed_threshold_in(squared, config.seed_threshold)
    m["seed_threshold"] = seed_threshold
    m["test_accuracy_at_seed_threshold"] = vm.accuracy_at(td, ts, seed_threshold)
    for split in (val, test):
        m[f"{split.name}_pairs"] = int(split.same.size)
        m[f"{split.name}_positive_pairs"] = int(split.same.sum())
        m[f"{split.name}_identities"] = split.identities
        m[f"{split.name}_images"] = len(split.used_keys)
    return m, thresholds


def lfw_metrics(lfw: SplitPairs, config: EvaluateConfig, threshold: float) -> dict[str, Any]:
    """LFW pairs.txt scalars: k-fold accuracy and VAL@FAR with the file's folds, AUC, EER."""
    d, s = lfw.distances, lfw.same
    n_folds = int(np.unique(lfw.fold_ids).size)
    fold_ids = lfw.fold_ids
    if n_folds < 2:
        # View 1 style files have one block: cross-validate on seeded stratified folds instead.
        fold_ids = stratified_folds(s, config.folds, config.seed, "LFW pairs file (one fold)")
        n_folds = config.folds
    m: dict[str, Any] = {}
    folds = vm.kfold_accuracy(d, s, n_folds, fold_ids=fold_ids)
    m["lfw_pairs_kfold_accuracy_mean"] = folds["mean"]
    m["lfw_pairs_kfold_accuracy_std"] = folds["std"]
    m["lfw_pairs_accuracy_at_threshold"] = vm.accuracy_at(d, s, threshold)
    for far in config.far_targets:
        key = far_key(far)
        kfold = vm.kfold_val_at_far(d, s, far, n_folds, fold_ids=fold_ids)
        m[f"lfw_pairs_val_at_far_{key}_mean"] = kfold["val_mean"]
        m[f"lfw_pairs_val_at_far_{key}_std"] = kfold["val_std"]
        m[f"lfw_pairs_far_at_far_{key}_mean"] = kfold["far_mean"]
    m["lfw_pairs_auc"] = vm.roc_auc(d, s)
    m["lfw_pairs_eer"], _ = vm.equal_error_rate(d, s)
    m["lfw_pairs_pairs"] = int(s.size)
    m["lfw_pairs_positive_pairs"] = int(s.sum())
    m["lfw_pairs_folds"] = n_folds
    m["lfw_pairs_identities"] = lfw.identities
    m["lfw_pairs_images"] = len(lfw.keys)
    return m


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
             model_uri: str = "", metrics_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Choose the threshold on validation pairs and measure it on test pairs (see the module docstring).

    Inputs: the model folder from train (model.json + the Keras model), the
    packed image dataset (real images are used), the splits folder (val.txt,
    test.txt). Writes, each atomically: `report_path` (self-contained HTML),
    `threshold_path` (threshold.json, the serving threshold and its distance
    definition) and, when given, `metrics_path` (JSON of the metrics).

    Returns ``{"metrics": flat dict of every scalar, "roc": {"fpr", "tpr",
    "thresholds"} (test ROC, at most 300 points, thresholds in the model's
    distance), "confusion_matrix": [[TN, FP], [FN, TP]] on test at the chosen
    threshold, "threshold": the threshold.json content}``.
    """
    started = time.monotonic()
    model_dir, dataset_dir, splits_dir = Path(model_dir), Path(dataset_dir), Path(splits_dir)
    _check_inputs(model_dir, dataset_dir, splits_dir)

    rows = real_rows_by_file(dataset_dir)
    val = split_pairs("val", splits_dir, dataset_dir, rows, config)
    test = split_pairs("test", splits_dir, dataset_dir, rows, config)
    # Folds shuffled with the seed (the pairs' own order comes from make_pairs).
    test.fold_ids = stratified_folds(test.same, config.folds, config.seed, f"{splits_dir / 'test.txt'}")
    lfw: SplitPairs | None = None
    if pairs_uri:
        with tempfile.TemporaryDirectory(prefix="facenet-pairs-") as tmp:
            lfw = lfw_pairs(pairs_uri, pairs_sha256, rows, dataset_dir, Path(tmp))

    from facenet_kfp import export

    model, metadata = export.load_model_artifact(model_dir)
    squared = model_distance_squared(metadata, model_dir)
    name = distance_name(squared)

    splits = [s for s in (val, test, lfw) if s is not None]
    keys = sorted({key for s in splits for key in s.used_keys})
    embeddings = embed_keys(model, metadata, dataset_dir, rows, keys, config.batch_size)
    row_of = {key: i for i, key in enumerate(keys)}
    for s in splits:
        # Map the split's key indices to embedding rows (every key a pair uses was embedded).
        to_row = np.zeros(len(s.keys), dtype=np.int64)
        used = np.unique(np.concatenate((s.index_a, s.index_b)))
        to_row[used] = [row_of[s.keys[i]] for i in used]
        s.distances = pair_distances(embeddings, to_row[s.index_a], to_row[s.index_b], squared)

    metrics, thresholds = split_metrics(val, test, config, squared)
    threshold = thresholds["accuracy"]
    if lfw is not None:
        metrics.update(lfw_metrics(lfw, config, threshold))
    metrics["embedding_dim"] = int(embeddings.shape[1])

    threshold_info = {
        "threshold": threshold,
        "distance": name,
        "distance_definition": DISTANCE_DEFINITIONS[name],
        "rule": RULE,
        "chosen_on": CHOSEN_ON,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "model": model_uri or str(model_dir),
        "embedding_dim": int(embeddings.shape[1]),
        "preprocessing": metadata["preprocessing"],
    }
    result = {
        "metrics": metrics,
        "roc": _roc_lists(test.distances, test.same),
        "confusion_matrix": vm.confusion_matrix(test.distances, test.same, threshold),
        "threshold": threshold_info,
    }

    html = _build_report(model_dir, dataset_dir, rows, config, val, test, lfw, metrics, threshold,
                         name, model_uri or str(model_dir))
    write_json(threshold_path, threshold_info)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    write_text(report_path, html)
    log.info("threshold %.4f (%s) chosen on %d validation pairs (accuracy %.4f); test accuracy %.4f, "
             "%d-fold %.4f ± %.4f, AUC %.4f (%.1f s)", threshold, DISTANCE_LABELS[name], val.same.size,
             metrics["val_accuracy"], metrics["test_accuracy"], config.folds,
             metrics["test_kfold_accuracy_mean"], metrics["test_kfold_accuracy_std"], metrics["test_auc"],
             time.monotonic() - started)
    return result


def _build_report(model_dir: Path, dataset_dir: Path, rows: dict[str, dict[str, Any]],
                  config: EvaluateConfig, val: SplitPairs, test: SplitPairs, lfw: SplitPairs | None,
                  metrics: dict[str, Any], threshold: float, name: str, model: str) -> str:
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
    notes = [
        f"Distances are {DISTANCE_DEFINITIONS[name]}. A pair is judged the same person when its "
        f"distance is below the threshold.",
        f"The threshold maximises accuracy on {val.same.size:,} validation pairs "
        f"({val.identities} identities) and is applied unchanged to {test.same.size:,} test pairs "
        f"({test.identities} identities); validation and test identities are disjoint from training "
        f"identities. Only real images are used, never the generated completion images.",
        f"Pairs per split: every same-person image pair (at most {config.max_positive_pairs:,}, a seeded "
        f"sample) and as many different-person pairs, drawn with seed {config.seed}.",
        f"k-fold accuracy: the test pairs are shuffled (seed {config.seed}) into {config.folds} folds, "
        f"stratified by label; each fold is scored with the threshold that maximises accuracy on the "
        f"other folds; mean ± population std over folds.",
        "VAL@FAR: VAL = accepted same pairs / same pairs, FAR = accepted different pairs / different "
        "pairs. 'test VAL at FAR' uses the threshold interpolated to that FAR on the validation pairs, "
        "applied to test (the FAR it actually gives on test is listed too); the k-fold variant finds the "
        "threshold on the other test folds.",
        f"Seed threshold: the seed project's fixed plain-L2 threshold {config.seed_threshold:g}, "
        f"i.e. {metrics['seed_threshold']:.4g} ({DISTANCE_LABELS[name]}).",
    ]
    if lfw is not None:
        rocs["LFW pairs.txt"] = vm.roc_curve(lfw.distances, lfw.same)[:2]
        notes.append(f"LFW pairs.txt: {lfw.same.size:,} pairs in {metrics['lfw_pairs_folds']} folds "
                     f"(the file's own folds), {lfw.identities} identities. These identities may also "
                     f"be TRAINING identities when the model was trained on the same archive, so these "
                     f"numbers can be optimistic; the test-split numbers are the held-out ones.")
    history, curves_png = report.load_training_history(model_dir, required=False)
    return report.build_report_html(
        title="Face verification: threshold evaluation", model=model, metrics=metrics,
        distance_label=DISTANCE_LABELS[name], threshold=threshold,
        seed_threshold=metrics["seed_threshold"], test_distances=test.distances, test_same=test.same,
        rocs=rocs, history=history, curves_png=curves_png, examples=examples, notes=notes)
