"""Tests of the TensorFlow-free input pipeline: lazy split images, preprocessing parity, P x K batches, workers."""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import numpy_input as fin
from facenet_kfp import preprocess as pre
from facenet_kfp.codec import decode_rgb
from facenet_kfp.errors import InputError
from facenet_kfp.synth import render_jpeg
from tests.builders import build_tiny_dataset

# Real images per identity (train split) and the generated images completion adds.
TRAIN = {"Ann_A": 5, "Bob_B": 2, "Cat_C": 3, "Dan_D": 4, "Eve_E": 1, "Fay_F": 6}
VAL = {"Gus_G": 3, "Hal_H": 2}
COMPLETED = {"Bob_B": 2, "Cat_C": 1, "Ann_A": 3, "Fay_F": 2}
LEVEL = 2.0 / 255.0          # one grey level on the [-1, 1] scale


def _render(identity: int, variant: int, size: int) -> bytes:
    return render_jpeg(1, identity, variant, size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("input"), TRAIN, VAL, VAL, COMPLETED, image=_render,
                              completion_variant=50, max_shard_bytes=15_000)


def open_train(tiny, **kwargs) -> fin.SplitImages:
    return fin.open_split(tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train", **kwargs)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- parity with tf_input.preprocess_image

def test_area_resize_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for h, w, size in ((150, 150, 96), (143, 157, 96), (38, 38, 96), (250, 187, 32), (7, 10, 4), (96, 96, 96)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = pre.area_resize(pixels, size)
        reference = tf.image.resize(pixels, [size, size], method="area").numpy()
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference, atol=5e-3)        # grey levels, float32 rounding
        # Mirror and scale are folded into the weights: the same as flipping and scaling afterwards.
        np.testing.assert_allclose(pre.area_resize(pixels, size, mirror=True, scale=0.5),
                                   0.5 * reference[:, ::-1], atol=5e-3)


def test_preprocess_matches_tensorflow_exactly_on_pngs():
    """PNG decoding is lossless in both: crop box, resize and scaling agree to float precision."""
    tf = pytest.importorskip("tensorflow")
    from facenet_kfp.tf_input import preprocess_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (120, 90), dtype=np.uint8)
    deep = Image.frombytes("I;16", (50, 40), rng.integers(0, 65536, (40, 50), dtype="<u2").tobytes())
    cases = [png(Image.fromarray(rgb)), png(Image.fromarray(rgb[:33, :45])), png(Image.fromarray(grey)),
             png(Image.fromarray(np.dstack([rgb, rgb[..., :1]]))),
             png(deep), png(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE))]
    assert [Image.open(io.BytesIO(data)).mode for data in cases] == ["RGB", "RGB", "L", "RGBA", "I;16", "P"]
    for data in cases:
        for size, crop in ((96, 0.6), (32, 1.0), (17, 0.45), (9, 0.5)):
            ours = pre.preprocess_array(data, size, crop)
            reference = preprocess_image(tf.constant(data), size, crop).numpy()
            assert ours.shape == (size, size, 3) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, reference, atol=1e-4, err_msg=f"{Image.open(io.BytesIO(data)).mode}")


def test_preprocess_matches_tensorflow_on_jpegs():
    """250x250 face JPEGs: the same crop and resize; the decoders' inverse DCT differs by about a grey level."""
    tf = pytest.importorskip("tensorflow")
    from facenet_kfp.tf_input import preprocess_image

    diffs = []
    for identity in range(6):
        data = render_jpeg(2, identity, identity % 3)
        # With the accurate inverse DCT (Pillow's), TensorFlow decodes the same pixels.
        accurate = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
        np.testing.assert_array_equal(np.asarray(decode_rgb(data)), accurate)
        ours = pre.preprocess_array(data, 96, 0.6)
        reference = preprocess_image(tf.constant(data), 96, 0.6).numpy()
        assert ours.min() >= -1.0 and ours.max() <= 1.0
        diffs.append(np.abs(ours - reference) / LEVEL)
    diffs = np.stack(diffs)
    assert diffs.mean() < 1.5, diffs.mean()
    assert np.percentile(diffs, 99) < 5.0, np.percentile(diffs, 99)


def test_an_aligned_face_crop_preprocesses_alike_in_numpy_and_tensorflow():
    """The align step's output (a real photo warped onto the template, stored as its JPEG) goes through the
    same definition in both: the crop's pixels to float precision; its JPEG up to the decoders' inverse DCT
    (about two grey levels on average here: a 112 px crop is averaged less than a 250 px LFW image)."""
    tf = pytest.importorskip("tensorflow")
    from matplotlib import cbook

    from facenet_kfp import align, codec
    from facenet_kfp.tf_input import preprocess_image

    # grace_hopper.jpg's five landmarks (as MTCNN finds them), template order.
    landmarks = np.array([[220.4, 190.2], [308.2, 186.1], [268.3, 237.4], [231.7, 277.0], [303.6, 272.9]])
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        crop = align.warp_face(photo, landmarks, 112)
    assert crop.size == (112, 112) and crop.mode == "RGB"
    jpeg = codec.encode_jpeg(crop, align.ALIGN_JPEG_QUALITY)
    accurate = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE").numpy()
    np.testing.assert_array_equal(np.asarray(decode_rgb(jpeg)), accurate)
    for size, crop_fraction in ((96, 1.0), (96, 0.875), (64, 0.6)):
        for pixels in (png(crop), png(Image.fromarray(accurate))):    # the crop, and its JPEG as decoded
            ours = pre.preprocess_array(pixels, size, crop_fraction)
            reference = preprocess_image(tf.constant(pixels), size, crop_fraction).numpy()
            assert ours.shape == (size, size, 3)
            np.testing.assert_allclose(ours, reference, atol=1e-4)
        ours = pre.preprocess_array(jpeg, size, crop_fraction)
        diffs = np.abs(ours - preprocess_image(tf.constant(jpeg), size, crop_fraction).numpy()) / LEVEL
        assert diffs.mean() < 2.5 and np.percentile(diffs, 99) < 10.0, (diffs.mean(), np.percentile(diffs, 99))
    # The crop is the face: eyes on the template's eye line, not the photo's background.
    eyes = align.apply_transform(align.similarity_transform(landmarks, align.template(112)), landmarks[:2])
    np.testing.assert_allclose(eyes, align.TEMPLATE_112[:2], atol=2.0)


def test_crop_box_follows_tensorflow_rounding():
    # Centre box: round-half-to-even in float32, as tf.round.
    assert pre.crop_box(250, 250, 0.6) == (50, 50, 150, 150)
    assert pre.crop_box(61, 97, 0.6) == (12, 20, 37, 58)       # box 36.6 -> 37, 58.2 -> 58; left 19.5 -> 20
    assert pre.crop_box(5, 5, 0.5) == (2, 2, 2, 2)             # box 2.5 -> 2, top 1.5 -> 2: half to even
    assert pre.crop_box(10, 10, 0.5) == (2, 2, 5, 5)           # top 2.5 -> 2
    assert pre.crop_box(33, 45, 0.5) == (8, 12, 16, 22)        # box 16.5 -> 16, 22.5 -> 22; top 8.5 -> 8
    # Jitter: scale 1.05 gives a 63 box at 0.6 of 100, shifted by 0.05 of it, then pushed inside.
    augmentation = np.array([1.05, 0.05, -0.05, 0.0, 0.0])
    assert pre.crop_box(100, 100, 0.6, augmentation) == (22, 15, 63, 63)
    assert pre.crop_box(100, 100, 1.0, np.array([1.06, 0.06, -0.06, 0.0, 0.0])) == (0, 0, 100, 100)


def test_augmentation_semantics():
    data = render_jpeg(3, 1, 0, size=100)
    plain = pre.preprocess_array(data, 24, 0.6)
    identity = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(pre.preprocess_array(data, 24, 0.6, identity), plain)
    mirrored = pre.preprocess_array(data, 24, 0.6, np.array([1.0, 0.0, 0.0, 1.0, 0.0]))
    np.testing.assert_allclose(mirrored, plain[:, ::-1], atol=1e-6)
    brighter = pre.preprocess_array(data, 24, 0.6, np.array([1.0, 0.0, 0.0, 0.0, 0.08]))
    np.testing.assert_allclose(brighter, np.clip(plain + 0.16, -1.0, 1.0), atol=1e-5)
    # Scale and shift move the box: the result is the area resize of that box.
    augmentation = np.array([1.05, 0.05, -0.05, 0.0, 0.0])
    top, left, box_h, box_w = pre.crop_box(100, 100, 0.6, augmentation)
    pixels = np.asarray(decode_rgb(data))[top:top + box_h, left:left + box_w]
    np.testing.assert_allclose(pre.preprocess_array(data, 24, 0.6, augmentation),
                               pre.area_resize(pixels, 24) / 127.5 - 1.0, atol=1e-5)

    draws = pre.draw_augmentation(5, 3, 4000)
    assert draws.shape == (4000, len(pre.AUGMENTATION_FIELDS))
    scale, shift_y, shift_x, mirror, brightness = draws.T
    assert (abs(scale - 1) <= pre.JITTER).all() and (abs(shift_y) <= pre.JITTER).all()
    assert (abs(shift_x) <= pre.JITTER).all() and (abs(brightness) <= pre.BRIGHTNESS).all()
    assert set(np.unique(mirror)) == {0.0, 1.0} and 0.45 < mirror.mean() < 0.55
    np.testing.assert_array_equal(pre.draw_augmentation(5, 3, 10), draws[:10])      # row j: (seed, batch, j)
    assert not np.array_equal(pre.draw_augmentation(5, 4, 10), draws[:10])
    assert not np.array_equal(pre.draw_augmentation(6, 3, 10), draws[:10])


# ----------------------------------------------------------------------------- split images read by offset

def test_open_split_reads_bytes_by_offset(tiny):
    with open_train(tiny) as split:
        expected = {tiny["ids"][n]: c + COMPLETED.get(n, 0) for n, c in TRAIN.items()}
        assert dict(zip(*np.unique(split.labels, return_counts=True))) == expected
        assert split.labels.dtype == np.int32 and len(split) == len(split.keys) == len(split.synthetic)
        assert int(split.synthetic.sum()) == sum(COMPLETED.values())
        first = split.keys.index("Ann_A/Ann_A_0001.jpg")
        assert split[first] == render_jpeg(1, tiny["ids"]["Ann_A"], 0, 64)
        assert split[first:first + 2] == [split[first], split[first + 1]]
        with pytest.raises(IndexError):
            split[len(split)]
    real = fin.open_split(tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], "train",
                          include_synthetic=False)
    assert len(real) == sum(TRAIN.values()) and not real.synthetic.any()


def _reference_split(tiny, split: str, sources: tuple[str, ...]) -> list[tuple[str, int, bool, bytes]]:
    """Slow, obvious reading of a split: (key, label, synthetic, bytes) of each image, identity by identity."""
    from facenet_kfp.shards import ShardReader, read_manifest
    from facenet_kfp.splits import read_split

    out = []
    for name, _ in read_split(tiny["splits"], split):
        for source in sources:
            with ShardReader(tiny[source]) as reader:
                out += [(row["file"], tiny["ids"][name], row["synthetic"], reader.read(row))
                        for row in read_manifest(tiny[source]) if row["identity"] == name]
    return out


@pytest.mark.parametrize("split, include_synthetic", [("train", True), ("train", False), ("val", True)])
def test_open_split_matches_a_slow_reference(tiny, split, include_synthetic):
    sources = ("dataset", "completion") if include_synthetic else ("dataset",)
    with fin.open_split(tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], split,
                        include_synthetic=include_synthetic) as images:
        got = [(images.keys[i], int(images.labels[i]), bool(images.synthetic[i]), images[i])
               for i in range(len(images))]
    assert got == _reference_split(tiny, split, sources)


def test_open_split_memory_follows_the_split_not_the_dataset(tiny, tmp_path):
    """Rows of identities outside the split are streamed past: opening costs the same with 20,000 more."""
    import shutil
    import tracemalloc

    big = tmp_path / "dataset"
    shutil.copytree(tiny["dataset"], big)
    row = json.loads((big / "manifest.jsonl").read_text().splitlines()[0])
    with open(big / "manifest.jsonl", "a") as handle:
        for i in range(20_000):
            handle.write(json.dumps(row | {"identity": "Zed_Z", "file": f"Zed_Z/Zed_Z_{i:05d}.jpg"}) + "\n")

    def peak(dataset) -> int:
        tracemalloc.start()
        with fin.open_split(dataset, None, tiny["labels"], tiny["splits"], "train", include_synthetic=False):
            pass
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    small, large = peak(tiny["dataset"]), peak(big)
    assert large < small + 1_000_000            # holding the 20,000 rows as dicts would take ~20 MB


def test_byte_cache_is_lru_and_bounded():
    loads = []

    def load(i):
        loads.append(i)
        return bytes(10 * (i + 1))

    cache = fin.ByteCache(max_bytes=60)
    for i in (0, 1, 2, 0, 3):          # 10 + 20 + 30 = 60; 0 is used again, so 3 (40 B) evicts 1 and 2
        cache.get(i, load)
    assert loads == [0, 1, 2, 3] and len(cache) == 2 and cache.nbytes == 50
    cache.get(1, load)
    assert loads[-1] == 1 and cache.nbytes <= 60 and (cache.hits, cache.misses) == (1, 5)
    cache.get(9, load)                # 100 bytes: larger than the cache, returned but not kept
    assert 9 not in cache._items and cache.nbytes <= 60
    none = fin.ByteCache(0)
    none.get(0, load)
    assert len(none) == 0 and none.nbytes == 0
    with pytest.raises(InputError, match="cache size"):
        fin.ByteCache(-1)


def test_cache_stays_bounded_while_training(tiny):
    with open_train(tiny, cache_bytes=0) as split:
        sizes = [len(split[i]) for i in range(len(split))]
    assert sum(sizes) > 4 * 8_000                              # the split does not fit in the cache
    with open_train(tiny, cache_bytes=8_000) as split:
        with fin.TrainBatches(split, split.labels, 3, 4, 16, 0.6, True, 0, workers=0) as stream:
            for _ in range(30):
                next(stream)
                assert split.cache.nbytes <= 8_000 and len(split.cache) <= 8_000 // min(sizes)
        assert split.cache.misses > len(split)                 # images are read again, not all kept


# ----------------------------------------------------------------------------- P x K batches

def test_train_batches_follow_the_sampler(tiny):
    with open_train(tiny) as split:
        sampler = fin.PKSampler(split.labels, 3, 4, 7).batches()
        batches = []
        with fin.TrainBatches(split, split.labels, 3, 4, 20, 0.7, True, 7, workers=0) as stream:
            for b in range(4):
                images, labels = next(stream)
                index = next(sampler)
                assert images.shape == (12, 20, 20, 3) and images.dtype == np.float32 and labels.dtype == np.int32
                np.testing.assert_array_equal(labels, split.labels[index])
                augmentation = pre.draw_augmentation(7, b, 12)
                for j in (0, 5, 11):
                    np.testing.assert_array_equal(images[j], pre.preprocess_array(split[index[j]], 20, 0.7,
                                                                                  augmentation[j]))
                assert -1.0 <= images.min() and images.max() <= 1.0
                batches.append(images)
        # Worker processes give the same batches as decoding in this process.
        with fin.TrainBatches(split, split.labels, 3, 4, 20, 0.7, True, 7, workers=2) as stream:
            for expected in batches:
                np.testing.assert_array_equal(next(stream)[0], expected)
        # Without augmentation every batch is the centre crop.
        index = next(fin.PKSampler(split.labels, 3, 4, 7).batches())
        with fin.TrainBatches(split, split.labels, 3, 4, 20, 0.7, False, 7, workers=0) as stream:
            np.testing.assert_array_equal(next(stream)[0][2], pre.preprocess_array(split[index[2]], 20, 0.7))


def test_resume_at_batch_n_equals_the_uninterrupted_stream(tiny):
    with open_train(tiny) as split:
        with fin.TrainBatches(split, split.labels, 3, 4, 16, 0.6, True, 11, workers=2) as stream:
            uninterrupted = [next(stream) for _ in range(7)]
        for workers in (0, 2):
            with fin.TrainBatches(split, split.labels, 3, 4, 16, 0.6, True, 11, start_batch=4,
                                  workers=workers) as resumed:
                for images, labels in uninterrupted[4:]:
                    got_images, got_labels = next(resumed)
                    np.testing.assert_array_equal(got_images, images)
                    np.testing.assert_array_equal(got_labels, labels)


def test_embedding_batches_keep_order(tiny):
    val = fin.open_split(tiny["dataset"], None, tiny["labels"], tiny["splits"], "val")
    images = [val[i] for i in range(len(val))]
    expected = np.stack([pre.preprocess_array(data, 16, 0.6) for data in images])
    for source, workers in ((val, 0), (images, 2)):
        batches = list(fin.embedding_batches(source, 16, 0.6, batch_size=2, workers=workers))
        assert [len(b) for b in batches] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(batches), expected)
    assert list(fin.embedding_batches([], 16, 0.6, batch_size=4, workers=0)) == []
    val.close()


# ----------------------------------------------------------------------------- no TensorFlow, workers, errors

def test_imports_and_runs_without_tensorflow(tmp_path):
    images = [render_jpeg(4, i % 3, i, 64) for i in range(12)]
    (tmp_path / "images.json").write_text(json.dumps([data.hex() for data in images]))
    script = f"""
import json, sys
sys.modules["tensorflow"] = None     # any import of TensorFlow (or Keras) now fails
sys.modules["keras"] = None
import numpy as np
from facenet_kfp import numpy_input as fin
from facenet_kfp import preprocess as pre
images = [bytes.fromhex(h) for h in json.load(open({str(tmp_path / "images.json")!r}))]
labels = np.arange(12) % 3
with fin.TrainBatches(images, labels, 3, 2, 24, 0.6, True, 0, workers=2) as stream:
    batch, batch_labels = next(stream)
assert batch.shape == (6, 24, 24, 3) and batch_labels.shape == (6,)
print(len(list(fin.embedding_batches(images, 24, 0.6, 5, workers=1))), pre.PREPROCESSING_VERSION)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", pre.PREPROCESSING_VERSION]


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = _children(todo.pop()) - found
        found |= children
        todo.extend(children)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _shm(name: str) -> Path:
    return Path("/dev/shm") / name.lstrip("/")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_their_parent():
    script = """
import os, signal, time, numpy as np
from facenet_kfp import numpy_input as fin
from facenet_kfp import preprocess as pre
from facenet_kfp.synth import render_jpeg
from tests.builders import build_tiny_dataset
images = [render_jpeg(0, i % 2, i, 64) for i in range(8)]
stream = fin.TrainBatches(images, np.arange(8) % 2, 2, 2, 8, 0.6, False, 0, workers=2)
next(stream)
print("ready", stream._batcher._memory.name, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        ready, name = parent.stdout.readline().split()
        assert ready == "ready"
        segment = _shm(name)
        # The workers (children of the forkserver, itself a child), the forkserver, the resource tracker.
        descendants = _descendants(parent.pid)
        assert len(descendants) >= 4
        assert segment.is_file()                     # the output slots the workers write into
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(_alive(pid) for pid in descendants) or segment.exists()):
        time.sleep(0.1)
    assert not [pid for pid in descendants if _alive(pid)]
    assert not segment.exists()                   # unlinked by the resource tracker once its holders ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_reader_its_workers_and_frees_the_shared_memory():
    """Ctrl-C in a terminal signals the whole process group: the workers and the forkserver ignore it, the
    reader gets KeyboardInterrupt, its `with` closes the stream, and nothing is left running or in /dev/shm."""
    script = """
import numpy as np
from facenet_kfp import numpy_input as fin
from facenet_kfp.synth import render_jpeg
images = [render_jpeg(0, i % 2, i, 64) for i in range(8)]
with fin.TrainBatches(images, np.arange(8) % 2, 2, 2, 8, 0.6, True, 0, workers=2) as stream:
    next(stream)
    print("ready", stream._batcher._memory.name, flush=True)
    while True:
        next(stream)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        ready, name = parent.stdout.readline().split()
        assert ready == "ready"
        descendants = _descendants(parent.pid)
        assert len(descendants) >= 4
        os.killpg(parent.pid, signal.SIGINT)
        _, stderr = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode != 0 and stderr.rstrip().endswith("KeyboardInterrupt")
    assert "Process" not in stderr                     # no worker reported the signal
    assert not _shm(name).exists()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in descendants):
        time.sleep(0.1)
    assert not [pid for pid in descendants if _alive(pid)]


def test_shared_memory_is_unlinked_on_close_collection_and_errors():
    images = [render_jpeg(0, i % 3, i, 64) for i in range(12)]
    labels = np.arange(12) % 3
    with fin.TrainBatches(images, labels, 3, 2, 16, 0.6, True, 0, workers=2) as stream:
        next(stream)
        name = stream._batcher._memory.name
        assert _shm(name).is_file()
    assert not _shm(name).exists()
    stream = fin.TrainBatches(images, labels, 3, 2, 16, 0.6, True, 0, workers=2)
    kept = next(stream)[0]                        # a copy: it does not keep the segment
    name = stream._batcher._memory.name
    del stream
    gc.collect()
    assert not _shm(name).exists() and kept.shape == (6, 16, 16, 3)
    damaged = images[:5] + [b"not an image"] + images[6:]
    with pytest.raises(InputError, match="image 5: cannot decode"):
        with fin.TrainBatches(damaged, labels, 3, 2, 16, 0.6, True, 0, workers=2) as stream:
            name = stream._batcher._memory.name
            for _ in range(6):
                next(stream)
    assert not _shm(name).exists()
    with pytest.raises(InputError, match="pixels must be one of float32, uint8, got 'float16'"):
        fin.TrainBatches(images, labels, 3, 2, 16, 0.6, True, 0, workers=2, pixels="float16")


WORKER_MODULES = """
import warnings
warnings.simplefilter("error")            # JAX warns (RuntimeWarning) when the process forks after it started
import jax, jax.numpy as jnp
import numpy as np
jnp.ones(4).block_until_ready()
from facenet_kfp import numpy_input as fin
from facenet_kfp.synth import render_jpeg
images = [render_jpeg(0, i % 2, i, 64) for i in range(8)]
with fin.TrainBatches(images, np.arange(8) % 2, 2, 2, 16, 0.6, True, 0, workers=2, pixels="uint8") as stream:
    batch = next(stream)[0]
    loaded = stream._batcher._pool.submit(eval, "sorted(__import__('sys').modules)").result()
    main = stream._batcher._pool.submit(eval, "getattr(__import__('sys').modules['__main__'], '__file__', 0)")
    main = main.result()
print(batch.dtype, "jax" in loaded, "tensorflow" in loaded, "keras" in loaded, main == __file__,
      "facenet_kfp.numpy_input" in loaded)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver")
def test_workers_start_without_forking_jax_and_never_import_it(tmp_path):
    """With JAX started in the parent, no fork of it happens (JAX's warning would be an error here) and the
    workers load neither JAX, TensorFlow, Keras nor the parent's main script."""
    script = tmp_path / "main.py"
    script.write_text(WORKER_MODULES)        # an unguarded script: the workers must not run it again
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["uint8", "False", "False", "False", "False", "True"]
    assert "fork" not in result.stderr.lower()


def test_uint8_batches_are_the_float_batches_quantised(tiny):
    """uint8 pixels are rint((x + 1) * 127.5) of the float pipeline's x, the same with or without workers;
    mapped back (u / 127.5 - 1, as the trainer does) they are within half a grey level (1/255) of x."""
    with open_train(tiny) as split:
        with fin.TrainBatches(split, split.labels, 3, 4, 20, 0.7, True, 7, workers=0) as stream:
            floats = [next(stream)[0] for _ in range(3)]
        for workers in (0, 2):
            with fin.TrainBatches(split, split.labels, 3, 4, 20, 0.7, True, 7, workers=workers,
                                  pixels="uint8") as stream:
                quantised = [next(stream) for _ in range(3)]
            for (pixels, _), x in zip(quantised, floats):
                assert pixels.dtype == np.uint8 and pixels.nbytes * 4 == x.nbytes
                expected = np.rint((x.astype(np.float64) + 1.0) * 127.5)          # up to float32 rounding
                assert np.abs(pixels - expected).max() <= 1 and np.mean(pixels == expected) > 0.999
                error = np.abs(fin.from_uint8(pixels) - x)
                assert error.max() <= 0.5 / 127.5 + 1e-6
                assert 0.1 / 255 < error.mean() < 1.0 / 255     # a rounding error, not an offset
    val = [render_jpeg(1, i, i, 64) for i in range(5)]
    np.testing.assert_array_equal(np.concatenate(list(fin.embedding_batches(val, 16, 0.6, 2, workers=2,
                                                                            pixels="uint8"))),
                                  fin.to_uint8(np.concatenate(list(fin.embedding_batches(val, 16, 0.6, 2,
                                                                                         workers=0)))))


def test_errors_name_the_input(tiny, tmp_path):
    with pytest.raises(InputError, match="split must be one of train, val, test, got 'training'"):
        fin.open_split(tiny["dataset"], None, tiny["labels"], tiny["splits"], "training")
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'}: dataset folder not found"):
        fin.open_split(tmp_path / "nope", None, tiny["labels"], tiny["splits"], "train")
    empty_splits = tmp_path / "splits"
    empty_splits.mkdir()
    with pytest.raises(InputError, match=f"{empty_splits / 'train.txt'}: split file not found"):
        fin.open_split(tiny["dataset"], None, tiny["labels"], empty_splits, "train")
    (empty_splits / "train.txt").write_text("Zed_Z\t1\n")
    with pytest.raises(InputError, match=r"labels.json: 1 identities .* Zed_Z"):
        fin.open_split(tiny["dataset"], None, tiny["labels"], empty_splits, "train")

    # A shard named in the manifest is missing: the error names it when the split is opened.
    broken = tmp_path / "dataset"
    broken.mkdir()
    (broken / "manifest.jsonl").write_text((tiny["dataset"] / "manifest.jsonl").read_text())
    (broken / "shards").mkdir()
    shards = sorted((tiny["dataset"] / "shards").iterdir())
    for shard in shards[1:]:
        (broken / "shards" / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(InputError, match=f"{broken / 'shards' / shards[0].name}: shard named in .* is missing"):
        fin.open_split(broken, None, tiny["labels"], tiny["splits"], "train")

    # An undecodable image fails naming its key, from a worker process too.
    with open_train(tiny) as split:
        images = [split[i] for i in range(len(split))]
        bad = 0
        images[bad] = b"not an image"

        class Named(list):
            keys = split.keys

        for workers in (0, 1):
            stream = fin.TrainBatches(Named(images), split.labels, len(TRAIN), 4, 16, 0.6, False, 0,
                                      workers=workers)
            with pytest.raises(InputError, match=f"{split.keys[bad]}: cannot decode the image"):
                for _ in range(10):
                    next(stream)
            stream.close()
        for kwargs, message in ((dict(workers=-1), "workers must be an integer >= 0"),
                                (dict(workers=1.5), "workers must be an integer >= 0"),
                                (dict(start_batch=-2), "start_batch must be an integer >= 0"),
                                (dict(image_size=0), "image_size must be an integer >= 1"),
                                (dict(crop_fraction=1.5), r"crop_fraction must be in \(0, 1\]")):
            args = dict(image_size=16, crop_fraction=0.6, start_batch=0, workers=0) | kwargs
            with pytest.raises(InputError, match=message):
                fin.TrainBatches(split, split.labels, 3, 4, args["image_size"], args["crop_fraction"], True, 0,
                                 start_batch=args["start_batch"], workers=args["workers"])
        with pytest.raises(InputError, match="3 images but 2 labels"):
            fin.TrainBatches(images[:3], split.labels[:2], 1, 1, 16, 0.6, True, 0, workers=0)
        with pytest.raises(InputError, match="batch_size must be an integer > 0"):
            fin.embedding_batches(split, 16, 0.6, 0)
