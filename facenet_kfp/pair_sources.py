"""The pairs evaluate scores: a split's or an evaluation archive's balanced pairs, a pairs.txt; their embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp.config import EvaluateConfig
from facenet_kfp.distances import MODEL_JSON, MirrorPairModel, flip_embeddings
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import read_json
from facenet_kfp.pairs import check_pairs_exist, make_pairs, read_checked_pairs
from facenet_kfp.progress import Progress
from facenet_kfp.provenance import check_inputs, check_recorded
from facenet_kfp.shards import MANIFEST, ShardReader, read_manifest
from facenet_kfp.splits import read_split

log = logging.getLogger("facenet_kfp.evaluate")      # one logger for all of evaluate's lines


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
