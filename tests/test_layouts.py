"""Tests for the dataset layouts: synth archives in each layout, extract's detection, VGGFace2 face boxes,
and preprocessing of mixed-size, non-square images."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import extract
from facenet_kfp import preprocess as pipeline_input
from facenet_kfp.codec import decode_rgb
from facenet_kfp import synth
from facenet_kfp.errors import InputError
from facenet_kfp.extract import (BOX_SCALE, DATASET_JSON, Layout, check_image, detect_layout,
                                 extract_dataset, square_box)
from facenet_kfp.shards import ShardReader, read_manifest


def members(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of the files of a .tgz, .tar or .zip."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.suffix == ".tgz" else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def photo(seed: int, width: int, height: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A width x height image of smooth gradients and noise (so that a shifted cut looks different)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 97 * 2.6], axis=-1)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def stored(out: Path) -> dict[str, tuple[dict, bytes]]:
    with ShardReader(out) as reader:
        return {row["file"]: (row, reader.read(row)) for row in read_manifest(out)}


@pytest.fixture(scope="module")
def vggface2(tmp_path_factory):
    """A small synth VGGFace2 archive (zip) with face boxes, and its extraction."""
    work = tmp_path_factory.mktemp("vggface2")
    result = synth.generate_demo_archive(work / "synth", identities=10, seed=4, image_size=100, workers=1,
                                         layout="vggface2", archive_format="zip")
    summary = extract_dataset(result.archive, work / "out", workers=2)
    return result, summary, work / "out"


# --------------------------------------------------------------------------- each layout, end to end

EVIDENCE = {
    "lfw": "top folder lfw, a published LFW variant",
    "casia": "top folder CASIA-WebFace, identity folders are 7-digit ids",
    "nested": "identity folders (folders holding images) 2 to 3 levels below top folder faces "
              "(e.g. faces/set1/more/",
}


@pytest.mark.parametrize("layout, fmt", [("lfw", "tar"), ("casia", "tgz"), ("casia", "zip"),
                                         ("nested", "zip"), ("nested", "tgz"), ("vggface2", "tar")])
def test_each_synth_layout_is_detected_and_recorded(tmp_path, layout, fmt):
    result = synth.generate_demo_archive(tmp_path / "synth", identities=10, seed=1, image_size=64, workers=1,
                                         layout=layout, archive_format=fmt, pool=2)
    summary = extract_dataset(result.archive, tmp_path / "out", workers=1)
    assert json.loads((tmp_path / "out" / DATASET_JSON).read_text()) == summary
    recorded = summary["layout"]
    assert recorded["name"] == {"nested": "folders"}.get(layout, layout)
    assert recorded["root"] == summary["image_root"] == synth.TOP_FOLDERS[layout]
    if layout == "vggface2":
        assert recorded["evidence"].startswith("top folder vggface2 holds test/ and train/ with "
                                               "n-numbered identity folders (e.g. vggface2/")
    else:
        assert recorded["evidence"].startswith(EVIDENCE[layout])
    # Every image is stored, keyed <identity folder name>/<file name>, sorted.
    images = {name: data for name, data in members(result.archive).items() if name.endswith(".jpg")}
    expected = {"/".join(name.split("/")[-2:]): data for name, data in images.items()}
    rows = stored(tmp_path / "out")
    assert list(rows) == sorted(expected, key=lambda file: (file.split("/")[0], file))
    if layout != "vggface2":                              # (VGGFace2's are cut to their boxes)
        assert {file: data for file, (_, data) in rows.items()} == expected
    assert summary["images"] == result.images == len(rows) and summary["identities"] == 10
    assert summary["skipped"] == [] and summary["unusable"] == 0


def test_vggface2_records_splits_and_boxes(vggface2):
    result, summary, out = vggface2
    files = members(result.archive)
    split_of = {name.split("/")[2]: name.split("/")[1] for name in files if name.endswith(".jpg")}
    layout = summary["layout"]
    assert layout["splits"] == {
        split: {"identities": sum(s == split for s in split_of.values()),
                "images": sum(1 for name in files if name.startswith(f"vggface2/{split}/"))}
        for split in ("train", "test")}
    assert layout["splits"]["test"]["identities"] >= 1 and layout["splits"]["train"]["identities"] >= 1
    assert layout["boxes"] == {"files": ["vggface2/bb_landmark/loose_bb_test.csv",
                                         "vggface2/bb_landmark/loose_bb_train.csv"],
                               "rows": result.images, "scale": BOX_SCALE, "applied": result.images,
                               "without_box": 0, "outside_image": 0}


def _reference_cut(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The documented rule, step by step: a square of 1.3 x the longer side around the box's centre, clipped."""
    side = round(1.3 * max(w, h))
    centre_x, centre_y = x + w / 2, y + h / 2
    left, top = round(centre_x - side / 2), round(centre_y - side / 2)
    return max(0, left), max(0, top), min(width, left + side), min(height, top + side)


def test_vggface2_cut_is_a_direct_pillow_crop_of_the_box(vggface2):
    result, _, out = vggface2
    files = members(result.archive)
    boxes = {}
    for split in ("train", "test"):
        reader = csv.DictReader(io.StringIO(files[f"vggface2/bb_landmark/loose_bb_{split}.csv"].decode()))
        boxes.update({f"{split}/{row['NAME_ID']}": tuple(int(row[k]) for k in "XYWH") for row in reader})
    rows = stored(out)
    assert len(rows) == len(boxes)
    errors, shifted_errors = [], []
    for key, box in boxes.items():
        split, identity, stem = key.split("/")
        original = Image.open(io.BytesIO(files[f"vggface2/{split}/{identity}/{stem}.jpg"]))
        cut = _reference_cut(*box, *original.size)
        row, data = rows[f"{identity}/{stem}.jpg"]
        assert row["crop"] == list(cut) and (row["width"], row["height"]) == (cut[2] - cut[0], cut[3] - cut[1])
        reference = original.crop(cut)
        buf = io.BytesIO()
        reference.save(buf, "JPEG", quality=95)
        assert data == buf.getvalue(), key
        got = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
        errors.append(np.abs(got - np.asarray(reference, dtype=np.float64)).mean())
        # A cut 4 px to the side looks different: comparing pixels tells the right box from a wrong one.
        moved = original.crop((cut[0] + 4, cut[1], cut[2] + 4, cut[3]))
        shifted_errors.append(np.abs(got - np.asarray(moved, dtype=np.float64)).mean())
    assert max(errors) < 4 and np.median(shifted_errors) > 3 * np.median(errors)


def test_vggface2_without_top_folder_with_partial_boxes(tmp_path):
    files = {
        "train/n000002/0001_01.jpg": photo(1, 120, 160),
        "train/n000002/0003_01.jpg": photo(2, 90, 130),
        "train/n000009/0001_01.png": photo(3, 100, 100, "PNG"),
        "test/n000001/0002_01.jpg": photo(4, 150, 180),
        "loose_bb_train.csv": (b'NAME_ID,X,Y,W,H\n"n000002/0001_01",30,40,50,70\n'
                               b'"n000009/0001_01",500,500,20,20\n"n000404/0001_01",1,1,5,5\n'),
        "identity_meta.csv": b"Class_ID,Name\n",
    }
    summary = extract_dataset(write_tar(tmp_path / "vgg.tar", files), tmp_path / "out", workers=1)
    assert summary["layout"] == {
        "name": "vggface2", "root": ".",
        "evidence": "the archive's top holds test/ and train/ with n-numbered identity folders "
                    "(e.g. test/n000001)",
        "splits": {"train": {"identities": 2, "images": 3}, "test": {"identities": 1, "images": 1}},
        "boxes": {"files": ["loose_bb_train.csv"], "rows": 3, "scale": 1.3, "applied": 1,
                  "without_box": 2, "outside_image": 1}}
    assert [item["member"] for item in summary["skipped"]] == ["identity_meta.csv"]
    rows = stored(tmp_path / "out")
    assert list(rows) == ["n000001/0002_01.jpg", "n000002/0001_01.jpg", "n000002/0003_01.jpg",
                          "n000009/0001_01.png"]
    # 91 px (1.3 x 70) around the centre (55, 75): corner (9.5, 29.5) rounds to even, clipped at x = 120.
    assert rows["n000002/0001_01.jpg"][0]["crop"] == [10, 30, 101, 121]
    for file in ("n000001/0002_01.jpg", "n000002/0003_01.jpg", "n000009/0001_01.png"):
        row, data = rows[file]
        assert "crop" not in row and data == files[f"{'test' if file.startswith('n000001') else 'train'}/{file}"]


def test_vggface2_without_box_files_keeps_images_as_they_are(tmp_path):
    files = {"vggface2/train/n000003/0001_01.jpg": photo(5, 80, 120),
             "vggface2/train/n000003/0002_01.jpg": photo(6, 200, 240)}
    summary = extract_dataset(write_tar(tmp_path / "v.tgz", files), tmp_path / "out", workers=1)
    assert summary["layout"]["boxes"] is None
    assert summary["layout"]["splits"] == {"train": {"identities": 1, "images": 2},
                                           "test": {"identities": 0, "images": 0}}
    assert {file: data for file, (_, data) in stored(tmp_path / "out").items()} == \
        {name.split("/", 2)[2]: data for name, data in files.items()}


@pytest.mark.parametrize("text, match", [
    (b"NAME,X,Y,W,H\n", "header 'NAME,X,Y,W,H', expected 'NAME_ID,X,Y,W,H'"),
    (b'NAME_ID,X,Y,W,H\n"n000002/0001_01",1,2,three,4\n', r"line 2: expected NAME_ID and four integers"),
    (b'NAME_ID,X,Y,W,H\n"n000002/0001_01",1,2,0,4\n', r"line 2: a box needs a NAME_ID and W, H >= 1"),
    (b'NAME_ID,X,Y,W,H\n"n000002/0001_01",1,2,3,4\n"n000002/0001_01",1,2,3,4\n', "has two boxes"),
])
def test_malformed_box_file_fails_naming_it(tmp_path, text, match):
    files = {"train/n000002/0001_01.jpg": photo(1, 60, 80), "bb_landmark/loose_bb_train.csv": text}
    with pytest.raises(InputError, match=match) as err:
        extract_dataset(write_tar(tmp_path / "v.tar", files), tmp_path / "out", workers=1)
    assert "bb_landmark/loose_bb_train.csv" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_same_identity_in_train_and_test_is_refused(tmp_path):
    files = {"train/n000002/0001_01.jpg": photo(1, 60, 80), "test/n000002/0002_01.jpg": photo(2, 60, 80)}
    with pytest.raises(InputError, match="two identity folders are both named 'n000002': "
                                         "test/n000002/ and train/n000002/"):
        extract_dataset(write_tar(tmp_path / "v.tar", files), tmp_path / "out", workers=1)


# --------------------------------------------------------------------------- nested trees

def test_nested_tree_identities_are_the_folders_holding_images(tmp_path):
    files = {
        "faces/set1/alice/1.jpg": photo(1, 40, 40),
        "faces/set1/alice/2.jpg": photo(2, 40, 40),
        "faces/set1/more/bob/1.png": photo(3, 30, 50, "PNG"),
        "faces/set2/carol/x.jpg": photo(4, 50, 30),
        "faces/set2/carol/notes.txt": b"not an image",
        "faces/set2/README.txt": b"read me",
        "faces/cover.jpg": photo(5, 40, 40),
        "faces/docs/LICENSE": b"license",
    }
    with pytest.raises(InputError, match=r"1 of 6 images lie outside the identity folders of the "
                                         r"folders layout \(faces/\[<folder>/\.\.\.\]<identity>/, 5 files\) "
                                         r".*faces/ \(1 image, e\.g\. faces/cover\.jpg\)"):
        extract_dataset(write_tar(tmp_path / "f.tgz", files), tmp_path / "refused", workers=1)
    summary = extract_dataset(write_tar(tmp_path / "f.tgz", files), tmp_path / "out", workers=1,
                              max_skipped_fraction=0.2)
    assert summary["layout"] == {
        "name": "folders", "root": "faces",
        "evidence": "identity folders (folders holding images) 2 to 3 levels below top folder faces "
                    "(e.g. faces/set1/more/bob)"}
    assert list(stored(tmp_path / "out")) == ["alice/1.jpg", "alice/2.jpg", "bob/1.png", "carol/x.jpg"]
    reasons = {item["member"]: item["reason"] for item in summary["skipped"]}
    assert reasons["faces/cover.jpg"].startswith("image left out: not inside an identity folder")
    assert reasons["faces/set2/README.txt"].startswith("junk: no file with an image suffix")
    assert reasons["faces/docs/LICENSE"].startswith("junk: no file with an image suffix")
    assert reasons["faces/set2/carol/notes.txt"].startswith("not an image")
    assert summary["unusable"] == 1   # the cover image: an image outside the identity folders


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_nested_identity_folders_with_the_same_name_are_refused(tmp_path, kind):
    files = {"faces/set1/alice/1.jpg": photo(1, 40, 40), "faces/set2/x/alice/1.jpg": photo(2, 40, 40),
             "faces/set2/bob/1.jpg": photo(3, 40, 40)}
    archive = tmp_path / f"f.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        write_tar(archive, files)
    with pytest.raises(InputError) as err:
        extract_dataset(archive, tmp_path / "out", workers=1)
    message = str(err.value)
    assert "two identity folders are both named 'alice'" in message
    assert "faces/set1/alice/ and faces/set2/x/alice/" in message and str(archive) in message
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- detection rules

@pytest.mark.parametrize("paths, expected", [
    (["lfw-funneled/Ann_Bell/Ann_Bell_0001.jpg"],
     Layout("lfw", ("lfw-funneled",), "top folder lfw-funneled, a published LFW variant")),
    (["data/people/Ann_Bell/Ann_Bell_0001.jpg", "data/people/Bo/Bo_0002.png", "data/README"],
     Layout("lfw", ("data", "people"), "folder data/people, identity folders hold <identity>_NNNN files")),
    (["CASIA-WebFace/0000045/001.jpg", "CASIA-WebFace/0000099/001.jpg"],
     Layout("casia", ("CASIA-WebFace",), "top folder CASIA-WebFace, identity folders are 7-digit ids")),
    (["0000045/001.jpg", "0000099/002.jpg"],
     Layout("casia", (), "the archive's top, identity folders are 7-digit ids")),
    (["mine/casia-webface/0000045/001.jpg", "mine/casia-webface/bob/001.jpg"],
     Layout("casia", ("mine", "casia-webface"),
            "folder mine/casia-webface, identity folders are not all 7-digit ids (e.g. bob)")),
    (["vggface2_test/test/n000001/0001_01.jpg"],
     Layout("vggface2", ("vggface2_test",), "top folder vggface2_test holds test/ with n-numbered identity "
                                            "folders (e.g. vggface2_test/test/n000001)", splits=("train", "test"))),
    (["faces/alice/1.jpg", "faces/bob/2.jpg"],
     Layout("folders", ("faces",), "identity folders (folders holding images) directly below top folder faces",
            nested=True)),
    (["alice/1.jpg"],
     Layout("folders", (), "identity folders (folders holding images) directly below the archive's top",
            nested=True)),
])
def test_detect_layout(paths, expected):
    assert detect_layout([tuple(path.split("/")) for path in paths]) == expected


@pytest.mark.parametrize("paths, match", [
    (["lfw/A/A_0001.jpg", "lfw-funneled/A/A_0001.jpg"], "several image roots in one archive: lfw, lfw-funneled"),
    (["a/train/n000001/1.jpg", "b/test/n000002/1.jpg"], "several VGGFace2 roots .*: a/, b/"),
])
def test_ambiguous_layouts_are_refused(paths, match):
    with pytest.raises(InputError, match=match):
        detect_layout([tuple(path.split("/")) for path in paths])


# --------------------------------------------------------------------------- cutting to a box

@pytest.mark.parametrize("box, size, cut", [
    ((50, 20, 30, 40), (200, 200), (39, 14, 91, 66)),       # side 52 around (65, 40)
    ((-20, -10, 40, 40), (100, 100), (0, 0, 26, 36)),       # clipped at the top left
    ((90, 90, 30, 30), (100, 100), (86, 86, 100, 100)),     # 85.5 rounds to even; clipped
    ((300, 10, 10, 10), (100, 100), None),                  # entirely outside
])
def test_square_box(box, size, cut):
    assert square_box(box, *size) == cut


@pytest.mark.parametrize("fmt, mode, stored_as, converted_from", [
    ("JPEG", "RGB", "JPEG", ""), ("JPEG", "L", "JPEG", ""), ("JPEG", "CMYK", "JPEG", ""),
    ("PNG", "RGBA", "PNG", ""), ("BMP", "RGB", "PNG", "BMP"),
])
def test_check_image_cuts_and_re_encodes(fmt, mode, stored_as, converted_from):
    data = photo(9, 90, 60, fmt, mode)
    check = check_image(data, (20, 10, 30, 30))
    assert check.reason == "" and check.crop == (16, 6, 55, 45) and (check.width, check.height) == (39, 39)
    assert check.converted_from == converted_from
    with Image.open(io.BytesIO(check.encoded)) as cut, Image.open(io.BytesIO(data)) as original:
        assert cut.format == stored_as and cut.size == (39, 39)
        expected = original.crop((16, 6, 55, 45))
        if stored_as == "JPEG":
            expected = expected if mode in ("L", "RGB") else expected.convert("RGB")
            buf = io.BytesIO()
            expected.save(buf, "JPEG", quality=95)
            assert check.encoded == buf.getvalue()
        else:
            assert np.array_equal(np.asarray(cut), np.asarray(expected))
    assert check_image(data, (500, 500, 10, 10)).crop is None      # a box outside keeps the image whole


# --------------------------------------------------------------------------- preprocessing any size

def _area_reference(pixels: np.ndarray, size: int) -> np.ndarray:
    """Area resize, one output pixel at a time: the overlap-weighted mean of the input pixels under it."""
    h, w = pixels.shape[:2]

    def weights(n_in: int, i: int) -> np.ndarray:
        low, high = i * n_in / size, (i + 1) * n_in / size
        edges = np.arange(n_in)
        return np.clip(np.minimum(high, edges + 1) - np.maximum(low, edges), 0, None) / (high - low)

    out = np.zeros((size, size, pixels.shape[2]))
    for i in range(size):
        for j in range(size):
            out[i, j] = np.einsum("y,x,yxc->c", weights(h, i), weights(w, j), pixels.astype(np.float64))
    return out


def test_preprocess_array_on_mixed_size_non_square_images(vggface2):
    result, _, _ = vggface2
    images = [data for name, data in members(result.archive).items() if name.endswith(".jpg")]
    sizes = {Image.open(io.BytesIO(data)).size for data in images}
    assert len(sizes) > 10 and any(w != h for w, h in sizes)
    augmentation = pipeline_input.draw_augmentation(seed=1, batch=0, count=len(images))
    for k, data in enumerate(images):
        for aug in (None, augmentation[k]):
            out = pipeline_input.preprocess_array(data, 24, 0.6, aug)
            assert out.shape == (24, 24, 3) and out.dtype == np.float32
            assert np.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    # The centre crop of a non-square image: 0.6 of each side, resized to a square (both axes
    # scaled separately), against the slow reference.
    for data in images[:4]:
        pixels = np.asarray(decode_rgb(data))
        h, w = pixels.shape[:2]
        box_h, box_w = int(np.rint(np.float32(0.6) * h)), int(np.rint(np.float32(0.6) * w))
        top = int(np.rint(np.float32(h) / 2 - np.float32(box_h) / 2))
        left = int(np.rint(np.float32(w) / 2 - np.float32(box_w) / 2))
        expected = _area_reference(pixels[top:top + box_h, left:left + box_w], 12) * 2 / 255 - 1
        np.testing.assert_allclose(pipeline_input.preprocess_array(data, 12, 0.6), expected, atol=1e-4)


def test_tensorflow_preprocessing_matches_on_non_square_images():
    tf = pytest.importorskip("tensorflow")
    from facenet_kfp.tf_input import preprocess_image

    for seed, (w, h) in enumerate([(180, 260), (400, 410), (97, 61), (3, 200)]):
        data = photo(seed, w, h, "PNG")
        got = preprocess_image(tf.constant(data), 20, 0.6).numpy()
        np.testing.assert_allclose(got, pipeline_input.preprocess_array(data, 20, 0.6), atol=1e-4)


# --------------------------------------------------------------------------- hostile face-box files and folders

def test_box_of_one_pixel_skips_the_image_as_unusable(tmp_path):
    files = {f"train/n000002/{i:04d}_01.jpg": photo(i, 60, 80) for i in range(1, 200)}
    files["train/n000002/0500_01.jpg"] = photo(500, 60, 80)
    files["bb_landmark/loose_bb_train.csv"] = b'NAME_ID,X,Y,W,H\n"n000002/0500_01",10,10,1,1\n'
    summary = extract_dataset(write_tar(tmp_path / "v.tar", files), tmp_path / "out", workers=1)
    reasons = {item["member"]: item["reason"] for item in summary["skipped"]}
    assert reasons == {"train/n000002/0500_01.jpg": "too small (1x1 pixels; every side needs at least 2 "
                                                    "pixels) once cut to its face box (X,Y,W,H = 10,10,1,1)"}
    assert summary["unusable"] == 1 and summary["images"] == 199


@pytest.mark.parametrize("row, match", [
    ('"n000002/0001_01",' + "9" * 400 + ",2,3,4", r"line 3: a box coordinate is out of range"),
    ('"n000002/0001_01",1,2,' + "9" * 400 + ",4", r"line 3: a box coordinate is out of range"),
    ('"n000002/0001_01",-' + "9" * 400 + ",2,3,4", r"line 3: a box coordinate is out of range"),
    ('"n000002/0001_01",1,2,3,4e400', r"line 3: expected NAME_ID and four integers"),
    ('"n000002/0001_01",1,2,3,4' + " " * 5000, r"line 3: longer than 4,096 characters"),
])
def test_absurd_box_values_fail_naming_file_and_line(tmp_path, row, match):
    text = f'NAME_ID,X,Y,W,H\n"n000002/0002_01",1,2,3,4\n{row}\n'.encode()
    files = {"train/n000002/0001_01.jpg": photo(1, 60, 80), "bb_landmark/loose_bb_train.csv": text}
    with pytest.raises(InputError, match=match) as err:
        extract_dataset(write_tar(tmp_path / "v.tar", files), tmp_path / "out", workers=1)
    assert "v.tar: bb_landmark/loose_bb_train.csv, line 3" in str(err.value)
    assert len(str(err.value)) < 1000
    assert not (tmp_path / "out").exists()


SHORT_ROW = b'"n999999/0001_01",161,140,224,324\n'
# A row of a long name (under the line limit): a few rows per megabyte keep tracemalloc fast.
LONG_ROW = b'"n999999/' + b"x" * 4000 + b'",161,140,224,324\n'


def _zip_with_large_box_file(path: Path, csv_bytes: int, row: bytes = SHORT_ROW) -> Path:
    """A VGGFace2 zip whose loose_bb_train.csv holds `csv_bytes` of rows for absent images, streamed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/n000002/0001_01.jpg", photo(1, 60, 80))
        with zf.open("bb_landmark/loose_bb_train.csv", "w", force_zip64=True) as out:
            out.write(b"NAME_ID,X,Y,W,H\n")
            block = row * ((1 << 20) // len(row))
            for _ in range(csv_bytes // len(block)):
                out.write(block)
    return path


def test_box_file_bomb_in_a_zip_is_refused_by_the_expansion_budget(tmp_path):
    archive = _zip_with_large_box_file(tmp_path / "bomb.zip", 96 << 20)
    assert archive.stat().st_size < 1 << 20                   # ~100x compressed
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            extract_dataset(archive, tmp_path / "out", workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "the face-box file bb_landmark/loose_bb_train.csv would take the extraction past" in str(err.value)
    assert peak < 8 << 20
    assert not (tmp_path / "out").exists()


def test_box_file_over_its_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(extract.boxes, "MAX_BOX_FILE_BYTES", 1 << 20)
    archive = _zip_with_large_box_file(tmp_path / "v.zip", 3 << 20)
    with pytest.raises(InputError, match=r"bb_landmark/loose_bb_train\.csv: face-box file of \d,\d{3},\d{3} "
                                         r"bytes, more than the limit of 1,048,576"):
        extract_dataset(archive, tmp_path / "out", workers=1, max_expansion=10_000)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_box_file_is_streamed_in_bounded_memory(tmp_path, kind):
    size = 24 << 20
    if kind == "zip":
        archive = _zip_with_large_box_file(tmp_path / "v.zip", size, LONG_ROW)
    else:
        text = b'NAME_ID,X,Y,W,H\n"n000002/0001_01",10,20,30,40\n' + LONG_ROW * (size // len(LONG_ROW))
        archive = write_tar(tmp_path / "v.tar", {"train/n000002/0001_01.jpg": photo(1, 60, 80),
                                                 "bb_landmark/loose_bb_train.csv": text})
    tracemalloc.start()
    try:
        summary = extract_dataset(archive, tmp_path / "out", workers=1, max_expansion=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["layout"]["boxes"]["rows"] > 6000
    assert peak < 8 << 20                                    # a third of the file, or less
    assert summary["layout"]["boxes"]["applied"] == (kind == "tar")


def test_vggface2_val_folder_is_refused_naming_it(tmp_path):
    files = {f"vggface2/train/n00000{i}/0001_01.jpg": photo(i, 60, 80) for i in range(1, 3)}
    files.update({f"vggface2/val/n00001{i}/0001_01.jpg": photo(10 + i, 60, 80) for i in range(8)})
    with pytest.raises(InputError) as err:
        extract_dataset(write_tar(tmp_path / "v.tar", files), tmp_path / "out", workers=1)
    assert ("8 of 10 images lie outside the identity folders of the vggface2 layout "
            "(vggface2/train/<identity>/ and vggface2/test/<identity>/, 2 files) and would be left out, "
            "more than max_skipped_fraction 0.01: vggface2/val/ (8 images, e.g. "
            "vggface2/val/n000010/0001_01.jpg)") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_box_rows_are_read_across_blocks_with_their_line_numbers():
    rows = b"".join(b'"n%06d/0001_01",%d,2,3,4\r\n' % (i, i) for i in range(90_000))
    text = b"\xef\xbb\xbfNAME_ID,X,Y,W,H\r\n" + rows             # a BOM, Windows line ends, ~3 MB
    read = list(extract.boxes._read_boxes(io.BufferedReader(io.BytesIO(text)), "f.csv"))
    assert read == [(f"n{i:06d}/0001_01", (i, 2, 3, 4)) for i in range(90_000)]
    with pytest.raises(InputError, match=r"^f\.csv, line 90002: expected NAME_ID and four integers"):
        list(extract.boxes._read_boxes(io.BufferedReader(io.BytesIO(text + b'"n1/1",x,2,3,4\r\n')), "f.csv"))
    with pytest.raises(InputError, match=r"^f\.csv, line 90002: longer than 4,096 characters"):
        list(extract.boxes._read_boxes(io.BufferedReader(io.BytesIO(text + b"9" * (3 << 20))), "f.csv"))
    with pytest.raises(InputError, match=r"^f\.csv: header '', expected 'NAME_ID,X,Y,W,H'"):
        list(extract.boxes._read_boxes(io.BufferedReader(io.BytesIO(b"")), "f.csv"))
