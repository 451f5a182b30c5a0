"""NumPy input pipeline (no TensorFlow): split images read from packed shards by offset, P x K batches, Pillow/NumPy.

It imports no TensorFlow, so any Keras backend can train with it;
`tf_input.py` builds the tf.data pipeline on the same sampler, split index and
constants. A split's images are read lazily (`open_split`): the manifests
are streamed and only the split's index stays in memory (shard, offset,
size and key per image, about 100 bytes each), the encoded bytes are read
from the shards when a batch needs them, through a small LRU cache
(`ByteCache`), so memory does not grow with the dataset beyond that index.
Batches are decoded by worker processes (`TrainBatches`,
`embedding_batches`) straight into shared memory, a few batches ahead.

Workers and /dev/shm. The trainer's JAX or TensorFlow runtime has started
threads (and CUDA) by the time batches are drawn, so the workers are not
forked from it: they come from a forkserver (`workers.safe_context`) that
imports NumPy, Pillow and this module, never JAX, TensorFlow or Keras. They
write into named POSIX shared memory (`multiprocessing.shared_memory`, on
Linux a file in /dev/shm) that this process creates, the workers attach by
name and this process unlinks when the stream is closed, collected or left by
an exception (and the multiprocessing resource tracker if it is killed). Its
size is `_Batcher.depth` batches: depth x P*K x S x S x 3 bytes for uint8
pixels, 4x that for float32 (e.g. 4 x 64 x 96 x 96 x 3 = 7 MB, 28 MB). A
container needs /dev/shm of at least that: Docker's default is 64 MB, and
the pipeline gives the train step a memory-backed /dev/shm
(`cluster.shm_size`).

Pixels. `TrainBatches(pixels="float32")` gives the [-1, 1] floats of
`preprocess.preprocess_array`; ``pixels="uint8"`` gives the same pixels
quantised after the resize, augmentation and clip, `to_uint8`:
u = rint((x + 1) * 127.5), 4x fewer bytes to copy to a GPU, where the
trainer maps them back (`from_uint8`: u / 127.5 - 1, within half a grey
level, 1/255, of x).

Each image goes through `preprocess.preprocess_array`; augmentation draws
come from `preprocess.draw_augmentation` keyed by (seed, batch, row), so batch
n is the same whether a run got there without a break or resumed at n.
"""

from __future__ import annotations

import array
import collections
import logging
import os
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from facenet_kfp.codec import UnusableImage
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.labels import LABELS_JSON, load_labels
from facenet_kfp.shards import MANIFEST, ShardReader, iter_manifest
from facenet_kfp.splits import SPLITS, read_split
from facenet_kfp.preprocess import check_preprocessing, draw_augmentation, preprocess_array
from facenet_kfp.workers import available_cpus, become_worker, safe_context

log = logging.getLogger(__name__)


PIXEL_TYPES = ("float32", "uint8")    # what `TrainBatches` and `embedding_batches` deliver
DEFAULT_CACHE_BYTES = 32 << 20    # encoded images kept by a split's LRU cache (LFW's are ~15 KB each)
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


class UniformSampler:
    """Index batches of `batch_size` images drawn uniformly (train.sampling uniform); deterministic per seed.

    An epoch is one pass over every image in a fresh random order, cut into
    batches; the images left over at an epoch's end (fewer than a batch) open
    the next batch, which the next epoch's order completes, so every image is
    drawn once per pass and a batch may hold any number of images of one
    identity (the margin-softmax objectives compare each image with class
    centres, not with the batch).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise InputError(f"UniformSampler needs a non-empty 1-D label array, got shape {labels.shape}")
        if batch_size < 1:
            raise InputError(f"UniformSampler needs batch_size >= 1, got {batch_size}")
        self.size, self.batch_size, self.seed = len(labels), int(batch_size), int(seed)

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """Infinite stream of int64 index arrays [batch_size]; skips the first `start` (one permutation
        per epoch skipped, not per batch), so `batches(start=n)` continues where a run stopped after n."""
        rng = np.random.default_rng(self.seed)
        drawn = start * self.batch_size               # images drawn before batch `start`
        for _ in range(drawn // self.size):
            rng.permutation(self.size)
        order = rng.permutation(self.size)[drawn % self.size:]
        while True:
            while len(order) < self.batch_size:
                order = np.concatenate([order, rng.permutation(self.size)])
            yield order[:self.batch_size].astype(np.int64)
            order = order[self.batch_size:]


def make_sampler(labels: np.ndarray, p: int, k: int, seed: int, sampling: str = "pk"):
    """The batch sampler of train.sampling: `PKSampler(labels, p, k, seed)` ("pk") or
    `UniformSampler(labels, p * k, seed)` ("uniform"); both have `batch_size` and `batches(start)`."""
    if sampling == "pk":
        return PKSampler(labels, p, k, seed)
    if sampling == "uniform":
        return UniformSampler(labels, p * k, seed)
    raise InputError(f"train.sampling must be one of pk, uniform; got {sampling!r}")


# ----------------------------------------------------------------------------- decoding a batch

def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] float pixels -> uint8 u = rint((x + 1) * 127.5) (half to even); `from_uint8` inverts it to
    within 0.5 / 127.5 = 1/255."""
    return np.rint((np.asarray(pixels, dtype=np.float32) + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 u / 127.5 - 1 in [-1, 1], what the trainer computes on the device."""
    return np.asarray(pixels, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def _preprocess_into(out: np.ndarray, images: list[bytes], names: list[str], image_size: int,
                     crop_fraction: float, augmentation: np.ndarray | None) -> None:
    """Fill out [len(images), S, S, 3] (float32, or uint8: `to_uint8`); an image that cannot be decoded
    fails naming it."""
    for i, data in enumerate(images):
        try:
            pixels = preprocess_array(data, image_size, crop_fraction,
                                      None if augmentation is None else augmentation[i])
            out[i] = pixels if out.dtype == np.float32 else to_uint8(pixels)
        except UnusableImage as exc:
            raise InputError(f"{names[i]}: cannot decode the image ({exc.reason}); re-run extract on its "
                             f"source") from exc


# ----------------------------------------------------------------------------- worker processes

def worker_count(workers: int | None) -> int:
    """Worker processes to start: None means one per available CPU, 0 means none (decode in this process)."""
    if workers is None:
        return available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be an integer >= 0 (0: decode in this process), got {workers!r}")
    return workers


_worker_memory: SharedMemory | None = None   # in a worker: the parent's output slots, attached by name
_worker_slots: np.ndarray | None = None


def _init_worker(owner: int, name: str, shape: tuple[int, ...], dtype: str) -> None:
    global _worker_memory, _worker_slots
    become_worker(owner)
    _worker_memory = SharedMemory(name=name)
    _worker_slots = np.ndarray(shape, dtype=dtype, buffer=_worker_memory.buf)


def _release(memory: SharedMemory) -> None:
    """Unlink the shared slots (their /dev/shm name) and unmap them once no array uses the mapping."""
    try:
        memory.unlink()
    except FileNotFoundError:
        pass
    try:
        memory.close()
    except BufferError:
        pass  # an array still views the slots: the mapping goes with it; the name is gone already


def _preprocess_task(slot: int, start: int, *args) -> None:
    _preprocess_into(_worker_slots[slot, start:start + len(args[0])], *args)


class _Batcher:
    """Preprocesses batches in order into a ring of output slots, up to `depth` batches ahead of the reader.

    With workers, each batch is split into chunks of about batch_size /
    workers images (at least `_MIN_CHUNK`) that worker processes write
    straight into named shared memory (module docstring), so no pixels are
    pickled; the reader gets a copy of the slot. Memory: `depth` batches of
    `pixels` ("float32" or "uint8"), whatever the stream's length. Workers
    come from `workers.safe_context` and end with this process
    (`workers.become_worker`); the shared memory is unlinked by `close`, or
    when the batcher is collected, or at exit.
    """

    def __init__(self, workers: int, batch_size: int, image_size: int, crop_fraction: float,
                 pixels: str = "float32"):
        if pixels not in PIXEL_TYPES:
            raise InputError(f"pixels must be one of {', '.join(PIXEL_TYPES)}, got {pixels!r}")
        self.workers, self.image_size, self.crop_fraction = workers, image_size, crop_fraction
        self.chunk = max(_MIN_CHUNK, -(-batch_size // max(1, workers)))
        self.depth = max(2, -(-_TASKS_PER_WORKER * workers // -(-batch_size // self.chunk)))
        shape = (self.depth, batch_size, image_size, image_size, 3)
        self._pool = self._memory = None
        if workers:
            nbytes = int(np.prod(shape)) * np.dtype(pixels).itemsize
            self._memory = SharedMemory(create=True, size=nbytes)
            self._release = weakref.finalize(self, _release, self._memory)
            try:
                self._slots = np.ndarray(shape, dtype=pixels, buffer=self._memory.buf)
                self._pool = ProcessPoolExecutor(workers, mp_context=safe_context(), initializer=_init_worker,
                                                 initargs=(os.getpid(), self._memory.name, shape, pixels))
            except BaseException:
                self.close()
                raise
        else:
            self._slots = np.empty(shape, dtype=pixels)
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
        """(pixels [n, S, S, 3], float32 or uint8, extra) of the oldest queued batch."""
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
        if self._memory is not None:
            self._slots = None          # the last view of the mapping here, so it can be unmapped
            self._release()


def _names(images: Sequence[bytes], indices) -> list[str]:
    keys = getattr(images, "keys", None)
    return [keys[i] if keys is not None else f"image {i}" for i in indices]


class TrainBatches:
    """Infinite P x K batches: (images [P*K, S, S, 3], labels int32 [P*K]); P*K images drawn uniformly with
    sampling="uniform" (`make_sampler`).

    Images are float32 in [-1, 1] (`pixels="float32"`) or uint8 (``"uint8"``,
    `to_uint8` of the same floats; module docstring).

    Indices come from `make_sampler(labels, p, k, seed, sampling).batches(start_batch)`;
    the bytes of each batch are taken from `images` (a list, or a
    `SplitImages` that reads them from the shards), then decoded and
    augmented by `workers` processes (None: one per available CPU, 0: in this
    process). Batch b is augmented with `draw_augmentation(seed, b, P*K)`, so
    a run resumed at start_batch = steps done sees the same batches as an
    uninterrupted one. Close it (or use `with`) to stop the workers and free
    their shared memory.

    part = (i, n): this stream yields only rows [i * P*K/n, (i + 1) * P*K/n)
    of each global batch, i.e. P/n whole identities (what process i of n feeds
    in multi-process training; the sampler and the augmentation are those of the
    global batch, so the batches are the same for any n). InputError when n
    does not divide p or i is not in 0..n-1.
    """

    def __init__(self, images: Sequence[bytes], labels: np.ndarray, p: int, k: int, image_size: int,
                 crop_fraction: float, augment: bool, seed: int, start_batch: int = 0,
                 workers: int | None = None, pixels: str = "float32", part: tuple[int, int] = (0, 1),
                 sampling: str = "pk"):
        self.labels = np.asarray(labels, dtype=np.int32)
        index, count = part
        if count < 1 or p % count or not 0 <= index < count:
            raise InputError(f"part {index} of {count}: the parts must divide p={p} identities and the part "
                             f"must be in 0..{count - 1}")
        if len(images) != len(self.labels):
            raise InputError(f"{len(images)} images but {len(self.labels)} labels")
        check_preprocessing(image_size, crop_fraction)
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
            raise InputError(f"start_batch must be an integer >= 0, got {start_batch!r}")
        self.images, self.augment, self.seed = images, bool(augment), int(seed)
        self.sampler = make_sampler(self.labels, p, k, seed, sampling)
        self.workers = worker_count(workers)
        self._indices = self.sampler.batches(start_batch)
        self._next_batch = start_batch           # the batch submitted next
        rows = self.sampler.batch_size // count
        self._rows = slice(index * rows, (index + 1) * rows)
        self._batcher = _Batcher(self.workers, rows, int(image_size), float(crop_fraction), pixels)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._batcher is None:
            raise StopIteration
        while not self._batcher.full():
            index = next(self._indices)
            augmentation = draw_augmentation(self.seed, self._next_batch, len(index)) if self.augment else None
            index = index[self._rows]
            augmentation = None if augmentation is None else augmentation[self._rows]
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
                      workers: int | None = None, pixels: str = "float32") -> Iterator[np.ndarray]:
    """Batches of preprocessed images in order, no augmentation: [<=batch_size, S, S, 3] of `pixels`
    (as in `TrainBatches`).

    The last batch is smaller when len(images) is not a multiple of
    batch_size. `workers` as in `TrainBatches`; they start with the first
    batch asked for and stop when the generator ends or is closed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be an integer > 0, got {batch_size!r}")
    check_preprocessing(image_size, crop_fraction)
    if pixels not in PIXEL_TYPES:
        raise InputError(f"pixels must be one of {', '.join(PIXEL_TYPES)}, got {pixels!r}")
    return _embedding_stream(images, int(image_size), float(crop_fraction), batch_size, worker_count(workers),
                             pixels)


def _embedding_stream(images: Sequence[bytes], image_size: int, crop_fraction: float, batch_size: int,
                      workers: int, pixels: str) -> Iterator[np.ndarray]:
    batcher = _Batcher(workers, batch_size, image_size, crop_fraction, pixels)
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
