"""TensorFlow-free input pipeline: split images read from packed shards by offset, P x K batches, Pillow/NumPy.

It imports no TensorFlow, so any Keras backend can train with it;
`data.py` builds the tf.data pipeline on the same sampler, split index and
constants. A split's images are read lazily (`open_split`): the manifests
are streamed and only the split's index stays in memory (shard, offset,
size and key per image, about 100 bytes each), the encoded bytes are read
from the shards when a batch needs them, through a small LRU cache
(`ByteCache`), so memory does not grow with the dataset beyond that index.
Batches are decoded by worker processes (`TrainBatches`,
`embedding_batches`) straight into shared memory, a few batches ahead.

Preprocessing (`preprocess_array`) is the definition `data.preprocess_image`
implements in TensorFlow for serving and for the tf.data path, step by step:

1. decode the JPEG/PNG bytes to RGB uint8 (grey and palette images expanded,
   alpha dropped, 16-bit samples reduced to their high byte);
2. keep the centre box of `crop_fraction` of the height and width;
3. training only: shift that box by up to +-6% of its size and scale it by
   up to +-6% (`JITTER`), kept inside the image;
4. resize the box to `image_size` x `image_size` by area averaging: output
   pixel i covers input span [i*s, (i+1)*s) with s = box / image_size, and
   averages the input pixels weighted by their overlap with it;
5. training only: mirror left-right with probability 1/2, add a brightness
   offset uniform in [-0.1, 0.1] (`BRIGHTNESS`, on the [0, 1] scale); clip;
6. scale to [-1, 1]: x = 2 * pixel / 255 - 1.

The box arithmetic follows TensorFlow's in float32 with round-half-to-even,
and the area resize is the same formula, so PNG inputs give the same pixels
as `data.preprocess_image` to float precision. JPEGs differ by the decoder's
inverse DCT only: TensorFlow's default is libjpeg's fast integer one, Pillow
uses the accurate one (about one grey level on average).

Augmentation draws come from `numpy.random.default_rng((seed, batch))`, row j
for the image at position j, so batch n is the same whether a run got there
without a break or resumed at n.
"""

from __future__ import annotations

import array
import collections
import functools
import io
import logging
import mmap
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.image_limits import size_problem
from facenet_kfp.labels import LABELS_JSON, load_labels
from facenet_kfp.shards import MANIFEST, ShardReader, iter_manifest
from facenet_kfp.splits import SPLITS, read_split
from facenet_kfp.workers import available_cpus, become_child, mp_context

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = "centre-crop-v1"
JITTER = 0.06        # crop jitter: shift and scale of the crop box, as a fraction of its size
BRIGHTNESS = 0.1     # brightness offset range on the [0, 1] pixel scale
DEFAULT_CACHE_BYTES = 32 << 20    # encoded images kept by a split's LRU cache (LFW's are ~15 KB each)
# Columns of an augmentation array, one row per image (see `draw_augmentation`).
AUGMENTATION_FIELDS = ("scale", "shift_y", "shift_x", "mirror", "brightness")
_TASKS_PER_WORKER = 2    # chunks in flight per worker process: one running, one queued
_MIN_CHUNK = 8           # images per worker task at least, so task overhead stays small


# ----------------------------------------------------------------------------- lazy split images

class ByteCache:
    """Least-recently-used cache of image bytes by index, holding at most `max_bytes` bytes.

    `get(i, load)` returns the cached bytes of image i or calls `load(i)` and
    keeps the result, evicting the least recently used entries to stay within
    the bound; an item larger than the bound is returned but not kept. 0
    disables caching.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError(f"cache size must be an integer number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = self.hits = self.misses = 0
        self._items: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int, load) -> bytes:
        data = self._items.get(index)
        if data is not None:
            self._items.move_to_end(index)
            self.hits += 1
            return data
        self.misses += 1
        data = load(index)
        if len(data) <= self.max_bytes:
            self._items[index] = data
            self.nbytes += len(data)
            while self.nbytes > self.max_bytes:
                self.nbytes -= len(self._items.popitem(last=False)[1])
        return data


class SplitImages(Sequence):
    """The encoded images of one split as a sequence of bytes, read from the shards by offset on access.

    Attributes: `labels` int32 [N] (ids from labels.json), `keys` (the manifest
    `file` of each image), `synthetic` bool [N], `cache` (a `ByteCache`);
    images are grouped by identity in split order. `shards` lists the
    (folder number in `folders`, shard path) pairs, `index` is int64 [N, 3]:
    (shard number in `shards`, offset, size) of each image. Close it (or use
    `with`) to release the shard handles.
    """

    def __init__(self, folders: Sequence[Path], shards: Sequence[tuple[int, str]], index: np.ndarray,
                 keys: list[str], synthetic: np.ndarray, labels: np.ndarray,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.folders = [Path(folder) for folder in folders]
        self.labels = np.asarray(labels, dtype=np.int32)
        self.keys = keys
        self.synthetic = np.asarray(synthetic, dtype=bool)
        self._shards = list(shards)
        self._index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        if not len(self.keys) == len(self.synthetic) == len(self.labels) == len(self._index):
            raise InputError(f"split index of {len(self._index)} images has {len(self.keys)} keys, "
                             f"{len(self.synthetic)} synthetic flags and {len(self.labels)} labels")
        self.cache = ByteCache(cache_bytes)
        self._readers = [ShardReader(folder) for folder in self.folders]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for a split of {len(self)} images")
        return self.cache.get(index, self._read)

    def _read(self, index: int) -> bytes:
        shard, offset, size = (int(value) for value in self._index[index])
        source, path = self._shards[shard]
        return self._readers[source].read({"shard": path, "offset": offset, "size": size,
                                           "file": self.keys[index]})

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> "SplitImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_split(dataset_dir: str | os.PathLike, completion_dir: str | os.PathLike | None,
               labels_dir: str | os.PathLike, splits_dir: str | os.PathLike, split: str,
               include_synthetic: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> SplitImages:
    """The images of one split's identities, indexed from the manifests; bytes are read on access.

    Real images come from `dataset_dir` (the extracted dataset), generated
    ones from `completion_dir` when `include_synthetic` (None: no completion).
    Every identity of the split (``<splits_dir>/<split>.txt``) must be in
    `labels.json` and have exactly the number of real images the split file
    records; errors name the file at fault. The manifests are streamed and
    only the split's rows are kept, as compact columns (about 100 bytes per
    image with its key), so opening a split costs memory in proportion to
    the split, not to the dataset.
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, folder in (("dataset", dataset_dir), ("labels", labels_dir), ("splits", splits_dir)):
        if not Path(folder).is_dir():
            raise InputError(f"{folder}: {name} folder not found")
    if include_synthetic and completion_dir is not None and not Path(completion_dir).is_dir():
        raise InputError(f"{completion_dir}: completion folder not found")
    entries = read_split(splits_dir, split)          # InputError when missing, malformed or empty
    label_ids, _ = load_labels(labels_dir)
    missing = [name for name, _ in entries if name not in label_ids]
    if missing:
        raise InputError(f"{Path(labels_dir) / LABELS_JSON}: {len(missing)} identities of split {split!r} "
                         f"have no label, e.g. {', '.join(missing[:3])}")

    sources = [(Path(dataset_dir), False)]
    if include_synthetic and completion_dir is not None:
        sources.append((Path(completion_dir), True))
    position = {name: i for i, (name, _) in enumerate(entries)}     # identity -> its place in the split
    shard_ids: dict[tuple[int, str], int] = {}
    found = array.array("q")          # per image, in manifest order: identity position, shard number,
    keys: list[str] = []              # offset, size (flattened); its key and whether it is synthetic
    synthetic = array.array("b")
    for source, (folder, expect_synthetic) in enumerate(sources):
        for row in iter_manifest(folder):
            where = position.get(row["identity"])
            if where is None:
                continue
            if bool(row["synthetic"]) != expect_synthetic:
                kind = "generated" if row["synthetic"] else "real"
                raise InputError(f"{folder}: manifest row {row['file']} is a {kind} image; "
                                 f"expected only {'generated' if expect_synthetic else 'real'} images here")
            shard = shard_ids.setdefault((source, row["shard"]), len(shard_ids))
            found.extend((where, shard, row["offset"], row["size"]))
            keys.append(row["file"])
            synthetic.append(expect_synthetic)
    columns = np.frombuffer(found, dtype=np.int64).reshape(-1, 4)
    flags = np.frombuffer(synthetic, dtype=np.int8).astype(bool)
    real_counts = np.bincount(columns[~flags, 0], minlength=len(entries))
    for (name, real_count), count in zip(entries, real_counts):
        if count != real_count:
            raise InputError(f"{dataset_dir}: identity {name} of split {split!r} has {count} real images "
                             f"in the dataset but {real_count} in the split file")
    for source, shard in shard_ids:
        folder = sources[source][0]    # a missing shard fails here, not in the middle of training
        if not (folder / shard).is_file():
            raise InputError(f"{folder / shard}: shard named in {folder / MANIFEST} is missing; "
                             f"re-run the step that wrote {folder}")
    # Grouped by identity in split order; within one, real images then generated ones, each in
    # manifest order (a stable sort keeps the streaming order).
    order = np.argsort(columns[:, 0], kind="stable")
    identity_labels = np.array([label_ids[name] for name, _ in entries], dtype=np.int32)
    images = SplitImages([folder for folder, _ in sources], list(shard_ids), columns[order, 1:],
                         [keys[i] for i in order], flags[order], identity_labels[columns[order, 0]], cache_bytes)
    log.info("split %s: %d identities, %d images (%d generated)", split, len(entries), len(images),
             int(images.synthetic.sum()))
    return images


# ----------------------------------------------------------------------------- P x K sampling

class PKSampler:
    """Index batches of P distinct identities x K images each; pure NumPy, deterministic per seed.

    - An epoch is one pass over the identities in a fresh random order, cut
      into groups of P, so identities are drawn without replacement within
      an epoch. The last partial group is dropped: its identities are simply
      reshuffled into the next epoch.
    - Within an identity, images are taken in a shuffled order and cycled:
      each image is used once per cycle and the K images of one batch are
      distinct whenever the identity has at least K images.
    - An identity with fewer than K images (excluded from completion) gives
      all its images plus draws with replacement from them, so the batch
      still holds K rows per identity; augmentation makes the copies differ.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise InputError(f"PKSampler needs a non-empty 1-D label array, got shape {labels.shape}")
        if p < 1 or k < 1:
            raise InputError(f"PKSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.identities = np.unique(labels)
        if len(self.identities) < self.p:
            raise InputError(f"P x K sampling needs at least p={p} identities, got {len(self.identities)}")
        # Indices of each identity's images, in label order (np.unique sorts).
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], self.identities, side="left")
        self.members = np.split(order, bounds[1:])

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """Infinite stream of int64 index arrays [P*K], identity-major; skips the first `start`.

        Every call restarts the same stream, so `batches(start=n)` continues
        exactly where a run stopped after n batches.
        """
        rng = np.random.default_rng(self.seed)
        cycles = [rng.permutation(m) for m in self.members]
        cursors = np.zeros(len(self.members), dtype=np.int64)
        n_ident = len(self.identities)
        produced = 0
        while True:
            identity_order = rng.permutation(n_ident)
            for g in range(n_ident // self.p):
                group = identity_order[g * self.p:(g + 1) * self.p]
                batch = np.empty(self.batch_size, dtype=np.int64)
                for slot, ident in enumerate(group):
                    batch[slot * self.k:(slot + 1) * self.k] = self._take(rng, cycles, cursors, ident)
                if produced >= start:
                    yield batch
                produced += 1

    def _take(self, rng: np.random.Generator, cycles: list[np.ndarray], cursors: np.ndarray,
              ident: int) -> np.ndarray:
        members = self.members[ident]
        n, k = len(members), self.k
        if n < k:
            extra = rng.choice(members, size=k - n, replace=True)
            return np.concatenate([rng.permutation(members), extra])
        cursor = cursors[ident]
        if cursor + k <= n:
            cursors[ident] = cursor + k
            return cycles[ident][cursor:cursor + k]
        # Finish this cycle, then start a new one whose order puts the images just
        # taken last, so the K images of the batch stay distinct and every image
        # is still used exactly once per cycle.
        tail = cycles[ident][cursor:]
        fresh = rng.permutation(members)
        fresh = np.concatenate([fresh[~np.isin(fresh, tail)], fresh[np.isin(fresh, tail)]])
        cycles[ident] = fresh
        cursors[ident] = k - len(tail)
        return np.concatenate([tail, fresh[:k - len(tail)]])


# ----------------------------------------------------------------------------- preprocessing

def draw_augmentation(seed: int, batch: int, count: int) -> np.ndarray:
    """Augmentations of the `count` images of batch `batch`: float64 [count, 5], columns `AUGMENTATION_FIELDS`.

    scale in [1 - JITTER, 1 + JITTER), shift_y and shift_x in [-JITTER, JITTER)
    (fractions of the crop box), mirror 0 or 1 (probability 1/2), brightness
    in [-BRIGHTNESS, BRIGHTNESS). Row j depends only on (seed, batch, j).
    """
    if seed < 0 or batch < 0:
        raise InputError(f"augmentation seed and batch index must be >= 0, got seed={seed}, batch={batch}")
    u = np.random.default_rng((int(seed), int(batch))).random((count, 5))
    return np.stack([1.0 + JITTER * (2 * u[:, 0] - 1), JITTER * (2 * u[:, 1] - 1), JITTER * (2 * u[:, 2] - 1),
                     (u[:, 3] < 0.5).astype(np.float64), BRIGHTNESS * (2 * u[:, 4] - 1)], axis=1)


def crop_box(height: int, width: int, crop_fraction: float,
             augmentation: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the crop inside a `height` x `width` image.

    The centre box of `crop_fraction`, scaled and shifted by `augmentation`
    (a row of `draw_augmentation`), in float32 with round-half-to-even as
    TensorFlow computes it; a shifted box is pushed back inside, never padded.
    """
    f32 = np.float32
    h, w = f32(height), f32(width)
    crop_h, crop_w = f32(crop_fraction) * h, f32(crop_fraction) * w
    centre_y, centre_x = h / f32(2), w / f32(2)
    if augmentation is not None:
        scale = f32(augmentation[0])
        crop_h, crop_w = min(crop_h * scale, h), min(crop_w * scale, w)
        centre_y = centre_y + f32(augmentation[1]) * crop_h
        centre_x = centre_x + f32(augmentation[2]) * crop_w
    box_h = int(min(max(np.rint(crop_h), 1), height))
    box_w = int(min(max(np.rint(crop_w), 1), width))
    top = int(np.rint(centre_y - f32(box_h) / f32(2)))
    left = int(np.rint(centre_x - f32(box_w) / f32(2)))
    return min(max(top, 0), height - box_h), min(max(left, 0), width - box_w), box_h, box_w


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image -> decoded RGB Pillow image, the pixels TensorFlow's decoders give with channels=3.

    Grey and palette images are expanded to RGB, alpha is dropped and 16-bit
    grey samples keep their high byte (TensorFlow's uint16 -> uint8 conversion).
    ValueError, before decoding, for a size outside `image_limits.size_problem`'s limits.
    """
    image = Image.open(io.BytesIO(data))
    if problem := size_problem(*image.size):
        image.close()
        raise ValueError(problem)
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I"):
        grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=512)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(first input index [n_out], float32 weights [n_out] of it and of each next input it overlaps).

    Output pixel i covers [i*s, (i+1)*s) with s = n_in / n_out; input pixel
    [j, j+1) weighs its overlap with that span over s, so each output's
    weights sum to 1 (TensorFlow's "area" resize).
    """
    s = n_in / n_out
    low, high = np.arange(n_out) * s, np.arange(1, n_out + 1) * s
    first = np.floor(low).astype(np.intp)
    taps = int(np.max(np.ceil(high - 1e-9).astype(np.intp) - first))
    first = np.minimum(first, n_in - taps)
    weights = tuple((np.clip(np.minimum(high, first + t + 1) - np.maximum(low, first + t), 0, None) / s)
                    .astype(np.float32) for t in range(taps))
    return first, weights


@functools.lru_cache(maxsize=32)
def _row_weights(n_in: int, n_out: int, width: int, scale: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """`_area_taps` of the rows pass, times `scale`, each tap's weights spread to a float32 [n_out, width].

    A full array multiplies about 3x faster than a broadcast column; the cache
    covers the crop heights jitter gives one image size (up to ~1 MB each).
    """
    first, weights = _area_taps(n_in, n_out)
    return first, tuple(np.ascontiguousarray(np.broadcast_to((weight * np.float32(scale))[:, None], (n_out, width)))
                        for weight in weights)


@functools.lru_cache(maxsize=32)
def _column_weights(n_in: int, n_out: int, channels: int, mirror: bool
                    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Columns pass on [rows, n_in * channels]: per tap, the input column of each output value and its weight.

    Weights come spread to float32 [n_out, n_out * channels] (square output); with `mirror` the
    output columns are reversed.
    """
    first, weights = _area_taps(n_in, n_out)
    if mirror:
        first, weights = first[::-1], tuple(weight[::-1] for weight in weights)
    columns = tuple(((first + t)[:, None] * channels + np.arange(channels)).ravel() for t in range(len(weights)))
    spread = tuple(np.ascontiguousarray(np.broadcast_to(np.repeat(weight, channels), (n_out, n_out * channels)))
                   for weight in weights)
    return columns, spread


def area_resize(pixels: np.ndarray, size: int, mirror: bool = False, scale: float = 1.0) -> np.ndarray:
    """[H, W, C] (any real dtype) -> float32 [size, size, C]: area averaging (module docstring, step 4).

    The result is multiplied by `scale` and, with `mirror`, flipped
    left-right; both are folded into the weights. Rows are resized first,
    then columns on the [size, W*C] layout, which needs no transposed copy.
    """
    h, w, c = pixels.shape
    flat = pixels.reshape(h, w * c)
    first, weights = _row_weights(h, size, w * c, float(scale))
    rows = np.multiply(flat[first], weights[0], dtype=np.float32)
    for t in range(1, len(weights)):
        rows += flat[first + t] * weights[t]                               # [size, W*C]
    columns, weights = _column_weights(w, size, c, bool(mirror))
    out = rows[:, columns[0]] * weights[0]
    for t in range(1, len(weights)):
        out += rows[:, columns[t]] * weights[t]                            # [size, size*C]
    return out.reshape(size, size, c)


def preprocess_array(data: bytes, image_size: int, crop_fraction: float,
                     augmentation: np.ndarray | None = None) -> np.ndarray:
    """One encoded image -> float32 [image_size, image_size, 3] in [-1, 1] (see module docstring).

    `augmentation` is a row of `draw_augmentation` (training), None for the
    deterministic centre crop (evaluation, serving).
    """
    with decode_rgb(data) as image:
        top, left, box_h, box_w = crop_box(image.height, image.width, crop_fraction, augmentation)
        pixels = np.asarray(image.crop((left, top, left + box_w, top + box_h)))
    mirror, offset = False, -1.0
    if augmentation is not None:
        mirror, offset = bool(augmentation[3]), offset + 2.0 * augmentation[4]
    # clip(pixel / 255 + brightness, 0, 1) * 2 - 1 as one scaled resize, an offset and a clip.
    out = area_resize(pixels, image_size, mirror, scale=2.0 / 255.0)
    out += np.float32(offset)
    return np.clip(out, -1.0, 1.0, out=out)


def _preprocess_into(out: np.ndarray, images: list[bytes], names: list[str], image_size: int,
                     crop_fraction: float, augmentation: np.ndarray | None) -> None:
    """Fill out [len(images), S, S, 3]; an image that cannot be decoded fails naming it."""
    for i, data in enumerate(images):
        try:
            out[i] = preprocess_array(data, image_size, crop_fraction,
                                      None if augmentation is None else augmentation[i])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"{names[i]}: cannot decode the image ({exc}); re-run extract on its "
                             f"source") from exc


# ----------------------------------------------------------------------------- worker processes

def worker_count(workers: int | None) -> int:
    """Worker processes to start: None means one per available CPU, 0 means none (decode in this process)."""
    if workers is None:
        return available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be an integer >= 0 (0: decode in this process), got {workers!r}")
    return workers


_worker_slots: np.ndarray | None = None     # a worker's view of the parent's shared output slots


def _init_worker(parent: int, buffer: mmap.mmap, shape: tuple[int, ...]) -> None:
    global _worker_slots
    become_child(parent)
    _worker_slots = np.frombuffer(buffer, dtype=np.float32).reshape(shape)


def _preprocess_task(slot: int, start: int, *args) -> None:
    _preprocess_into(_worker_slots[slot, start:start + len(args[0])], *args)


class _Batcher:
    """Preprocesses batches in order into a ring of output slots, up to `depth` batches ahead of the reader.

    With workers, each batch is split into chunks of about batch_size /
    workers images (at least `_MIN_CHUNK`) that worker processes write
    straight into shared memory, so no pixels are pickled; the reader gets a
    copy of the slot. Memory: `depth` batches of float32 pixels, whatever
    the stream's length. Workers are forked (the slots are an anonymous
    shared mapping they inherit, not limited by /dev/shm) and end with this
    process (`workers.become_child`).
    """

    def __init__(self, workers: int, batch_size: int, image_size: int, crop_fraction: float):
        self.workers, self.image_size, self.crop_fraction = workers, image_size, crop_fraction
        self.chunk = max(_MIN_CHUNK, -(-batch_size // max(1, workers)))
        self.depth = max(2, -(-_TASKS_PER_WORKER * workers // -(-batch_size // self.chunk)))
        shape = (self.depth, batch_size, image_size, image_size, 3)
        self._pool = None
        if workers:
            if mp_context().get_start_method() != "fork":
                raise InputError("input worker processes need the 'fork' start method (Linux, macOS); "
                                 "use workers=0 to decode in this process")
            self._buffer = mmap.mmap(-1, int(np.prod(shape)) * 4)
            self._slots = np.frombuffer(self._buffer, dtype=np.float32).reshape(shape)
            self._pool = ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=_init_worker,
                                             initargs=(os.getpid(), self._buffer, shape))
        else:
            self._slots = np.empty(shape, dtype=np.float32)
        self._queue: collections.deque[tuple[int, int, list[Future], object]] = collections.deque()
        self._next_slot = 0

    def full(self) -> bool:
        return len(self._queue) >= self.depth

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, images: list[bytes], names: list[str], augmentation: np.ndarray | None,
               extra: object = None) -> None:
        """Queue one batch (at most batch_size images); `extra` comes back with its pixels."""
        slot, self._next_slot = self._next_slot, (self._next_slot + 1) % self.depth
        futures = []
        for start in range(0, len(images), self.chunk):
            part = slice(start, start + self.chunk)
            args = (images[part], names[part], self.image_size, self.crop_fraction,
                    None if augmentation is None else augmentation[part])
            if self._pool is None:
                _preprocess_into(self._slots[slot, part], *args)
            else:
                futures.append(self._pool.submit(_preprocess_task, slot, start, *args))
        self._queue.append((slot, len(images), futures, extra))

    def next(self) -> tuple[np.ndarray, object]:
        """(float32 [n, S, S, 3], extra) of the oldest queued batch."""
        slot, count, futures, extra = self._queue.popleft()
        try:
            for future in futures:
                future.result()
        except BrokenProcessPool as exc:
            raise FacenetError(f"an input worker process died ({exc}); the machine may be short of "
                               f"memory: use fewer workers") from exc
        return self._slots[slot, :count].copy(), extra

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._queue.clear()


def _names(images: Sequence[bytes], indices) -> list[str]:
    keys = getattr(images, "keys", None)
    return [keys[i] if keys is not None else f"image {i}" for i in indices]


class TrainBatches:
    """Infinite P x K batches: (images float32 [P*K, S, S, 3] in [-1, 1], labels int32 [P*K]).

    Indices come from `PKSampler(labels, p, k, seed).batches(start_batch)`;
    the bytes of each batch are taken from `images` (a list, or a
    `SplitImages` that reads them from the shards), then decoded and
    augmented by `workers` processes (None: one per available CPU, 0: in this
    process). Batch b is augmented with `draw_augmentation(seed, b, P*K)`, so
    a run resumed at start_batch = steps done sees the same batches as an
    uninterrupted one. Close it (or use `with`) to stop the workers.
    """

    def __init__(self, images: Sequence[bytes], labels: np.ndarray, p: int, k: int, image_size: int,
                 crop_fraction: float, augment: bool, seed: int, start_batch: int = 0,
                 workers: int | None = None):
        self.labels = np.asarray(labels, dtype=np.int32)
        if len(images) != len(self.labels):
            raise InputError(f"{len(images)} images but {len(self.labels)} labels")
        _check_preprocessing(image_size, crop_fraction)
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
            raise InputError(f"start_batch must be an integer >= 0, got {start_batch!r}")
        self.images, self.augment, self.seed = images, bool(augment), int(seed)
        self.sampler = PKSampler(self.labels, p, k, seed)
        self.workers = worker_count(workers)
        self._indices = self.sampler.batches(start_batch)
        self._next_batch = start_batch           # the batch submitted next
        self._batcher = _Batcher(self.workers, self.sampler.batch_size, int(image_size), float(crop_fraction))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._batcher is None:
            raise StopIteration
        while not self._batcher.full():
            index = next(self._indices)
            augmentation = draw_augmentation(self.seed, self._next_batch, len(index)) if self.augment else None
            self._batcher.submit([self.images[i] for i in index], _names(self.images, index), augmentation,
                                 self.labels[index])
            self._next_batch += 1
        return self._batcher.next()

    def close(self) -> None:
        batcher, self._batcher = getattr(self, "_batcher", None), None
        if batcher is not None:
            batcher.close()

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def embedding_batches(images: Sequence[bytes], image_size: int, crop_fraction: float, batch_size: int,
                      workers: int | None = None) -> Iterator[np.ndarray]:
    """Batches of preprocessed images in order, no augmentation: float32 [<=batch_size, S, S, 3].

    The last batch is smaller when len(images) is not a multiple of
    batch_size. `workers` as in `TrainBatches`; they start with the first
    batch asked for and stop when the generator ends or is closed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be an integer > 0, got {batch_size!r}")
    _check_preprocessing(image_size, crop_fraction)
    return _embedding_stream(images, int(image_size), float(crop_fraction), batch_size, worker_count(workers))


def _embedding_stream(images: Sequence[bytes], image_size: int, crop_fraction: float, batch_size: int,
                      workers: int) -> Iterator[np.ndarray]:
    batcher = _Batcher(workers, batch_size, image_size, crop_fraction)
    starts = iter(range(0, len(images), batch_size))
    try:
        while True:
            while not batcher.full() and (start := next(starts, None)) is not None:
                part = range(start, min(start + batch_size, len(images)))
                batcher.submit([images[i] for i in part], _names(images, part), None)
            if not len(batcher):
                return
            yield batcher.next()[0]
    finally:
        batcher.close()


def _check_preprocessing(image_size: int, crop_fraction: float) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise InputError(f"image_size must be an integer >= 1, got {image_size!r}")
    if not 0.0 < float(crop_fraction) <= 1.0:
        raise InputError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
