"""Tests for facenet_kfp.extract on small archives generated here."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import stat
import struct
import subprocess
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facenet_kfp import extract
from facenet_kfp.augment import sample_params
from facenet_kfp.codec import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, decode_rgb, size_problem
from facenet_kfp.complete import generate_image
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.extract import (DATASET_JSON, MIN_EXPANSION_BYTES, ImageCheck, check_image,
                                 extract_dataset)
from facenet_kfp.fsutil import STEP_MARKER
from facenet_kfp.shards import ShardReader, ShardWriter, read_manifest, shard_files
from facenet_kfp.verify import read_image_file


def jpeg(seed: int, size: int = 24, noise: bool = False) -> bytes:
    """A small, distinct JPEG; `noise` makes it large (~1/3 byte per pixel or more)."""
    rng = np.random.default_rng(seed)
    if noise:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        pixels[: size // 2] //= 2
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (7, 5), seed % 256).save(buf, "PNG")
    return buf.getvalue()


def lfw_files(root: str = "lfw/") -> dict[str, bytes]:
    """Three identities with 1, 2 and 3 images (one a PNG), keyed by member name."""
    files = {
        f"{root}Carl_Cox/Carl_Cox_0001.jpg": jpeg(1),
        f"{root}Ann_Bell/Ann_Bell_0002.jpg": jpeg(2),
        f"{root}Ann_Bell/Ann_Bell_0001.jpg": jpeg(3),
        f"{root}Bo_Diddley/Bo_Diddley_0003.png": png(4),
        f"{root}Bo_Diddley/Bo_Diddley_0001.jpg": jpeg(5),
        f"{root}Bo_Diddley/Bo_Diddley_0002.jpg": jpeg(6),
    }
    return files


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", dirs: bool = True) -> Path:
    with tarfile.open(path, mode) as tar:
        if dirs:
            for folder in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def add_special(path: Path, info: tarfile.TarInfo, files: dict[str, bytes]) -> Path:
    """A tar.gz with the normal `files` and one special member `info` in the middle."""
    with tarfile.open(path, "w:gz") as tar:
        items = list(files.items())
        for index, (name, data) in enumerate(items):
            if index == len(items) // 2:
                tar.addfile(info)
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def stored(out: Path) -> dict[str, bytes]:
    rows = read_manifest(out)
    with ShardReader(out) as reader:
        return {row["file"]: reader.read(row) for row in rows}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


# --------------------------------------------------------------------------- formats and roots

@pytest.mark.parametrize("kind", ["tar.gz", "tar", "tar.bz2", "tar.xz", "zip"])
@pytest.mark.parametrize("root", ["lfw/", "lfw-deepfunneled/", "", "./faces/"])
def test_formats_and_roots(tmp_path, kind, root):
    files = lfw_files(root)
    # The name says nothing about the format: detection is by content.
    archive = tmp_path / "download.bin"
    if kind == "zip":
        write_zip(archive, files)
    else:
        write_tar(archive, files, {"tar.gz": "w:gz", "tar": "w", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind])
    out = tmp_path / "dataset"
    summary = extract_dataset(archive, out, workers=1)

    expected_root = {"lfw/": "lfw", "lfw-deepfunneled/": "lfw-deepfunneled", "": ".", "./faces/": "faces"}[root]
    evidence = {"lfw/": "top folder lfw, a published LFW variant",
                "lfw-deepfunneled/": "top folder lfw-deepfunneled, a published LFW variant",
                "": "the archive's top, identity folders hold <identity>_NNNN files",
                "./faces/": "top folder faces, identity folders hold <identity>_NNNN files"}[root]
    assert summary == {"images": 6, "identities": 3, "image_root": expected_root, "shards": 1,
                       "skipped": [], "unusable": 0, "converted": 0,
                       "format": "zip" if kind == "zip" else "tar",
                       "layout": {"name": "lfw", "root": expected_root, "evidence": evidence}}
    assert json.loads((out / DATASET_JSON).read_text()) == summary
    rows = read_manifest(out)
    assert [row["file"] for row in rows] == [
        "Ann_Bell/Ann_Bell_0001.jpg", "Ann_Bell/Ann_Bell_0002.jpg",
        "Bo_Diddley/Bo_Diddley_0001.jpg", "Bo_Diddley/Bo_Diddley_0002.jpg",
        "Bo_Diddley/Bo_Diddley_0003.png", "Carl_Cox/Carl_Cox_0001.jpg"]
    assert [row["identity"] for row in rows] == ["Ann_Bell"] * 2 + ["Bo_Diddley"] * 3 + ["Carl_Cox"]
    assert all(row["synthetic"] is False for row in rows)
    sizes = {row["file"]: (row["width"], row["height"]) for row in rows}
    assert sizes["Bo_Diddley/Bo_Diddley_0003.png"] == (7, 5)
    assert sizes["Ann_Bell/Ann_Bell_0001.jpg"] == (24, 24)
    originals = {name.split("/", 1)[1] if root else name: data for name, data in files.items()}
    if root == "./faces/":
        originals = {name.removeprefix("./faces/"): data for name, data in files.items()}
    assert stored(out) == originals


def test_pool_matches_inline_and_stores_original_bytes(tmp_path):
    files = {f"lfw/P{i % 7}/P{i % 7}_{i:04d}.jpg": jpeg(i, size=40) for i in range(60)}
    archive = write_tar(tmp_path / "lfw.tgz", files)
    inline = extract_dataset(archive, tmp_path / "one", workers=1)
    pooled = extract_dataset(archive, tmp_path / "two", workers=2)
    assert inline == pooled
    assert (tmp_path / "one/manifest.jsonl").read_bytes() == (tmp_path / "two/manifest.jsonl").read_bytes()
    data = stored(tmp_path / "two")
    assert data == {name[len("lfw/"):]: blob for name, blob in files.items()}
    for blob in data.values():
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            assert img.size == (40, 40)


def test_output_does_not_depend_on_member_order(tmp_path):
    files = lfw_files()
    items = list(files.items())
    random.Random(3).shuffle(items)
    a = extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "a", workers=1)
    b = extract_dataset(write_tar(tmp_path / "b.tgz", dict(items), dirs=False), tmp_path / "b", workers=1)
    assert a == b
    assert (tmp_path / "a/manifest.jsonl").read_bytes() == (tmp_path / "b/manifest.jsonl").read_bytes()
    assert shard_files(tmp_path / "a")[0].read_bytes() == shard_files(tmp_path / "b")[0].read_bytes()


def test_two_hundred_images_fill_a_few_shards(tmp_path):
    files = {f"lfw/Person_{i % 20:02d}/Person_{i % 20:02d}_{i:04d}.jpg": jpeg(i, size=96, noise=True)
             for i in range(200)}
    total = sum(len(data) for data in files.values())
    archive = write_zip(tmp_path / "lfw.zip", files)
    out = tmp_path / "dataset"
    summary = extract_dataset(archive, out, shard_size_mb=1, workers=2)
    assert summary["images"] == 200 and summary["identities"] == 20
    shards = shard_files(out)
    assert summary["shards"] == len(shards)
    # Each shard holds about 1 MiB of image bytes (plus tar headers).
    assert total // (1 << 20) <= len(shards) <= total // (1 << 20) + 2
    assert all(path.stat().st_size <= (1 << 20) + 200 * 2048 for path in shards)
    assert stored(out) == {name[len("lfw/"):]: data for name, data in files.items()}


def test_earlier_output_is_replaced_and_other_folders_are_refused(tmp_path):
    out = tmp_path / "dataset"
    extract_dataset(write_tar(tmp_path / "one.tgz", {"lfw/A/A_0001.jpg": jpeg(1)}), out, workers=1)
    extract_dataset(write_tar(tmp_path / "lfw.tgz", lfw_files()), out, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [STEP_MARKER, DATASET_JSON, "manifest.jsonl", "shards"]
    assert len(read_manifest(out)) == 6
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(InputError, match="refusing to replace"):
        extract_dataset(tmp_path / "lfw.tgz", mine, workers=1)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- refused archives

def _special(name: str, kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "lfw/Ann_Bell/Ann_Bell_0001.jpg"
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    elif kind == "chardev":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "blockdev":
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
    return info


@pytest.mark.parametrize("name, kind, why", [
    ("lfw/Ann_Bell/link.jpg", "symlink", "symbolic link"),
    ("lfw/Ann_Bell/hard.jpg", "hardlink", "hard link"),
    ("lfw/Ann_Bell/pipe.jpg", "fifo", "fifo"),
    ("lfw/Ann_Bell/null.jpg", "chardev", "device"),
    ("lfw/Ann_Bell/disk.jpg", "blockdev", "device"),
])
def test_tar_with_special_member_is_refused(tmp_path, name, kind, why):
    archive = add_special(tmp_path / "lfw.tgz", _special(name, kind), lfw_files())
    out = tmp_path / "dataset"
    with pytest.raises(InputError, match=why) as err:
        extract_dataset(archive, out, workers=1)
    assert repr(name) in str(err.value) and "refusing the whole archive" in str(err.value)
    assert_nothing_written(out)


@pytest.mark.parametrize("name, why", [
    ("lfw/../../x", r"'\.\.' path component"),
    ("lfw/Ann_Bell/../../../evil.jpg", r"'\.\.' path component"),
    ("/etc/x", "absolute path"),
    ("C:/Windows/x.jpg", "absolute path"),
])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_path_escaping_member_is_refused(tmp_path, name, why, kind):
    files = lfw_files()
    files[name] = jpeg(99)
    out = tmp_path / "dataset"
    archive = (write_zip(tmp_path / "a.zip", files) if kind == "zip"
               else write_tar(tmp_path / "a.tgz", files, dirs=False))
    with pytest.raises(InputError, match=why) as err:
        extract_dataset(archive, out, workers=1)
    assert repr(name) in str(err.value)
    assert_nothing_written(out)


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "lfw.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in lfw_files().items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("lfw/Ann_Bell/Ann_Bell_0009.jpg")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../../etc/passwd")
    out = tmp_path / "dataset"
    with pytest.raises(InputError, match="symbolic link") as err:
        extract_dataset(archive, out, workers=1)
    assert "'lfw/Ann_Bell/Ann_Bell_0009.jpg'" in str(err.value)
    assert_nothing_written(out)


def test_refused_archive_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    archive = add_special(tmp_path / "lfw.tgz", _special("lfw/x", "symlink"), lfw_files())
    with pytest.raises(InputError):
        extract_dataset(archive, out, workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    earlier = tmp_path / "earlier"
    extract_dataset(write_tar(tmp_path / "good.tgz", lfw_files()), earlier, workers=1)
    before = {path: path.read_bytes() for path in earlier.rglob("*") if path.is_file()}
    with pytest.raises(InputError, match="unsafe"):
        extract_dataset(archive, earlier, workers=1)
    assert {path: path.read_bytes() for path in earlier.rglob("*") if path.is_file()} == before


# --------------------------------------------------------------------------- skipped files

@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_bad_and_junk_files_are_skipped_with_reasons(tmp_path, kind):
    good = jpeg(7, size=64)
    files = lfw_files()
    bad = {
        "lfw/Ann_Bell/Ann_Bell_0003.jpg": good[: len(good) // 2],          # truncated JPEG
        "lfw/Ann_Bell/Ann_Bell_0004.jpg": b"",                               # zero bytes
        "lfw/Carl_Cox/Carl_Cox_0002.jpg": b"this is a text file, not a JPEG\n",
        "lfw/Carl_Cox/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "lfw/Carl_Cox/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "__MACOSX/lfw/Carl_Cox/._Carl_Cox_0001.jpg": b"\x00\x05\x16\x07",
        "lfw/Carl_Cox/._Carl_Cox_0001.jpg": b"\x00\x05\x16\x07",
        "lfw/README.txt": b"read me",
        "lfw/Carl_Cox/extra/Carl_Cox_0009.jpg": jpeg(8),
        "lfw-names.txt": b"Ann_Bell\t2\n",
    }
    files.update(bad)
    archive = write_zip(tmp_path / "a.zip", files) if kind == "zip" else write_tar(tmp_path / "a.tgz", files)
    out = tmp_path / "dataset"
    # 3 of 9 images are damaged: far above the default limit for a dataset this small.
    summary = extract_dataset(archive, out, workers=2, max_skipped_fraction=0.5)

    reasons = {item["member"]: item["reason"] for item in summary["skipped"]}
    assert sorted(reasons) == sorted(bad)
    assert [item["member"] for item in summary["skipped"]] == sorted(bad)
    assert "truncated" in reasons["lfw/Ann_Bell/Ann_Bell_0003.jpg"]
    assert reasons["lfw/Ann_Bell/Ann_Bell_0004.jpg"] == "empty file (0 bytes)"
    assert reasons["lfw/Carl_Cox/Carl_Cox_0002.jpg"].startswith("not an image")
    assert reasons["lfw/Carl_Cox/.DS_Store"] == "junk: .DS_Store"
    assert reasons["lfw/Carl_Cox/Thumbs.db"] == "junk: Thumbs.db"
    assert "__MACOSX" in reasons["__MACOSX/lfw/Carl_Cox/._Carl_Cox_0001.jpg"]
    assert "hidden" in reasons["lfw/Carl_Cox/._Carl_Cox_0001.jpg"]
    assert "identity folder" in reasons["lfw/README.txt"]
    assert reasons["lfw/Carl_Cox/extra/Carl_Cox_0009.jpg"].startswith(
        "image left out: not directly inside an identity folder")
    assert "outside the image root 'lfw/'" == reasons["lfw-names.txt"]
    assert summary["images"] == 6 and summary["identities"] == 3
    # The truncated, empty and text .jpg files, and the image outside the identity folders; the
    # rest is junk.
    assert summary["unusable"] == 4
    assert json.loads((out / DATASET_JSON).read_text())["skipped"] == summary["skipped"]
    assert stored(out) == {name[len("lfw/"):]: data for name, data in lfw_files().items()}


def test_identity_without_valid_images_is_dropped(tmp_path):
    files = lfw_files()
    files["lfw/Dee_Dee/Dee_Dee_0001.jpg"] = b"not an image"
    summary = extract_dataset(write_tar(tmp_path / "a.tar", files, "w"), tmp_path / "out", workers=1,
                              max_skipped_fraction=0.2)
    assert summary["identities"] == 3
    assert {row["identity"] for row in read_manifest(tmp_path / "out")} == {"Ann_Bell", "Bo_Diddley", "Carl_Cox"}


def test_duplicate_member_keeps_the_last(tmp_path):
    files = lfw_files()
    archive = tmp_path / "a.tar"
    write_tar(archive, files, "w")
    with tarfile.open(archive, "a") as tar:
        data = jpeg(42)
        info = tarfile.TarInfo("lfw/Ann_Bell/Ann_Bell_0001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    summary = extract_dataset(archive, tmp_path / "out", workers=1)
    assert summary["images"] == 6
    assert summary["skipped"] == [{"member": "lfw/Ann_Bell/Ann_Bell_0001.jpg",
                                   "reason": "replaced by a later member with the same name"}]
    assert stored(tmp_path / "out")["Ann_Bell/Ann_Bell_0001.jpg"] == data


# --------------------------------------------------------------------------- unusable archives

def test_empty_archives_are_errors(tmp_path):
    for archive in (write_tar(tmp_path / "e.tgz", {}), write_tar(tmp_path / "e.tar", {}, "w"),
                    write_zip(tmp_path / "e.zip", {})):
        with pytest.raises(InputError, match="empty") as err:
            extract_dataset(archive, tmp_path / "out", workers=1)
        assert str(archive) in str(err.value)
    (tmp_path / "zero.tgz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        extract_dataset(tmp_path / "zero.tgz", tmp_path / "out", workers=1)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_with_only_junk_is_an_error(tmp_path, kind):
    files = {"lfw/.DS_Store": b"x", "__MACOSX/lfw/._A": b"y", "lfw/A/Thumbs.db": b"z"}
    archive = write_zip(tmp_path / "a.zip", files) if kind == "zip" else write_tar(tmp_path / "a.tgz", files)
    with pytest.raises(InputError, match="no identity has a valid image") as err:
        extract_dataset(archive, tmp_path / "out", workers=1)
    assert str(archive) in str(err.value)
    assert_nothing_written(tmp_path / "out")


def test_archive_with_only_bad_images_is_an_error(tmp_path):
    archive = write_tar(tmp_path / "a.tgz", {"lfw/A/A_0001.jpg": b"", "lfw/B/B_0001.jpg": b"text"})
    with pytest.raises(InputError, match="no identity has a valid image") as err:
        extract_dataset(archive, tmp_path / "out", workers=1)
    assert str(archive) in str(err.value)
    assert_nothing_written(tmp_path / "out")


def test_not_an_archive_and_missing_file(tmp_path):
    (tmp_path / "lfw.tgz").write_text("<html>404 Not Found</html>")
    with pytest.raises(InputError, match="not a tar .* or zip archive"):
        extract_dataset(tmp_path / "lfw.tgz", tmp_path / "out")
    with pytest.raises(InputError, match="not found"):
        extract_dataset(tmp_path / "missing.tgz", tmp_path / "out")


def test_truncated_archives_are_errors(tmp_path):
    files = {f"lfw/P/P_{i:04d}.jpg": jpeg(i, size=64, noise=True) for i in range(20)}
    blob = write_tar(tmp_path / "a.tgz", files).read_bytes()
    (tmp_path / "cut.tgz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="truncated"):
        extract_dataset(tmp_path / "cut.tgz", tmp_path / "out", workers=1)
    blob = write_tar(tmp_path / "a.tar", files, "w").read_bytes()
    (tmp_path / "cut.tar").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError):
        extract_dataset(tmp_path / "cut.tar", tmp_path / "out", workers=1)
    assert_nothing_written(tmp_path / "out")


def _gzip_with_a_bad_block(tar: bytes, good: int) -> bytes:
    """A gzip file whose deflate stream stores the first `good` bytes of `tar` and then holds a
    block of the reserved type 3: readable up to there, then invalid deflate data (made by hand,
    so that it does not depend on the zlib that compresses)."""
    stored = b"\x00" + struct.pack("<HH", good, good ^ 0xFFFF) + tar[:good]   # BFINAL=0, BTYPE=00
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + stored + b"\x07" + bytes(64)


@pytest.mark.parametrize("where", ["deflate data", "crc"])
def test_corrupt_gzip_archive_is_named_corrupt(tmp_path, where):
    files = {f"lfw/P/P_{i:04d}.jpg": jpeg(i, size=64) for i in range(20)}
    if where == "crc":
        blob = bytearray(write_tar(tmp_path / "a.tgz", files).read_bytes())
        blob[-8] ^= 0xFF                         # the trailer's CRC-32 of the uncompressed data
    else:
        blob = _gzip_with_a_bad_block(write_tar(tmp_path / "a.tar", files, "w").read_bytes(), 20_000)
    (tmp_path / "bad.tgz").write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"bad\.tgz: corrupt or truncated compressed archive"):
        extract_dataset(tmp_path / "bad.tgz", tmp_path / "out", workers=1)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kwargs, match", [
    ({"shard_size_mb": 0}, "shard_size_mb"), ({"shard_size_mb": 1.5}, "shard_size_mb"),
    ({"workers": 0}, "workers"), ({"workers": True}, "workers"),
    ({"max_skipped_fraction": -0.1}, "max_skipped_fraction"),
    ({"max_skipped_fraction": 1.5}, "max_skipped_fraction"),
    ({"max_skipped_fraction": float("nan")}, "max_skipped_fraction"),
    ({"max_skipped_fraction": "0.1"}, "max_skipped_fraction"),
    ({"max_expansion": 0.5}, "max_expansion"), ({"max_expansion": float("inf")}, "max_expansion"),
])
def test_bad_parameters(tmp_path, kwargs, match):
    archive = write_tar(tmp_path / "a.tgz", lfw_files())
    with pytest.raises(InputError, match=match):
        extract_dataset(archive, tmp_path / "out", **kwargs)


def test_check_image():
    good = jpeg(1, size=32)
    assert check_image(good) == ImageCheck("", 32, 32)
    assert check_image(good[:-200]).reason.startswith("undecodable or truncated image")
    assert check_image(b"").reason == "empty file (0 bytes)"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PPM")  # Pillow reads it, but it is not an accepted format
    assert check_image(buf.getvalue()).reason.startswith("not an image in a supported format")


def test_tar_without_end_marker_or_with_a_broken_header_is_an_error(tmp_path):
    files = lfw_files()
    blob = write_tar(tmp_path / "a.tar", files, "w", dirs=False).read_bytes()
    last = max(i for i in range(0, len(blob), 512) if blob[i:i + 512].strip(b"\0"))
    data_end = last + 512  # the last member's data ends here (one block of padding)
    (tmp_path / "no_end.tar").write_bytes(blob[:data_end])
    with pytest.raises(InputError, match="no end-of-archive marker"):
        extract_dataset(tmp_path / "no_end.tar", tmp_path / "out", workers=1)
    # Garbage where the third header should be: tarfile alone would stop there silently.
    with tarfile.open(tmp_path / "a.tar") as tar:
        third = tar.getmembers()[2].offset
    broken = bytearray(blob)
    broken[third:third + 512] = b"\x07" * 512
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    with pytest.raises(InputError, match="broken member header"):
        extract_dataset(tmp_path / "broken.tar", tmp_path / "out", workers=1)
    assert_nothing_written(tmp_path / "out")


def test_refusal_stops_the_decompressing_process(tmp_path):
    import multiprocessing

    # An unsafe member first, then ~6 MB more: the refusal comes before decompression ends.
    files = {"/etc/passwd": b"root:x:0:0"}
    files.update({f"lfw/P/P_{i:04d}.jpg": jpeg(i, size=160, noise=True) for i in range(100)})
    archive = write_tar(tmp_path / "a.tgz", files, dirs=False)
    before = set(multiprocessing.active_children())
    with pytest.raises(InputError, match="'/etc/passwd'.*absolute path"):
        extract_dataset(archive, tmp_path / "out", workers=1)
    assert set(multiprocessing.active_children()) <= before
    assert_nothing_written(tmp_path / "out")


def test_cgroup_cpu_limit(tmp_path):
    from facenet_kfp.workers import cgroup_cpu_limit as _cgroup_cpu_limit

    assert _cgroup_cpu_limit(tmp_path) is None                       # no cgroup files
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None                       # v2, unlimited
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 2.5                        # v2, limits.cpu: 2.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None                       # v1, unlimited
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("50000\n")
    assert _cgroup_cpu_limit(tmp_path) == 0.5                        # v1, limits.cpu: 500m


# --------------------------------------------------------------------------- fast tar headers

_FIELDS = ("name", "size", "type", "mode", "uid", "gid", "mtime", "chksum", "linkname", "uname",
           "gname", "devmajor", "devminor")


def _parse(cls, buf):
    """Fields of cls.frombuf(buf), or the exception type tarfile raises for it."""
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return type(exc)
    return tuple(getattr(info, key) for key in _FIELDS)


def _random_headers(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = "abcXYZ_-.0129 éü/"
    kinds = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
             tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE]
    headers = []
    for _ in range(count):
        info = tarfile.TarInfo("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 99))))
        info.type = rng.choice(kinds)
        info.size = rng.choice([0, 1, 511, 13_233, 8**11 - 1]) if info.type in (b"0", b"\0", b"7") else 0
        info.mode = rng.randint(0, 0o7777)
        info.uid, info.gid = rng.randint(0, 2**21 - 1), rng.randint(0, 2**21 - 1)
        info.mtime = rng.randint(0, 8**11 - 1)
        info.uname, info.gname = rng.choice(["", "root", "ann"]), rng.choice(["", "staff"])
        info.linkname = rng.choice(["", "target", "../up"])
        info.devmajor, info.devminor = rng.randint(0, 255), rng.randint(0, 255)
        fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
        try:
            blob = info.tobuf(fmt, "utf-8", "surrogateescape")
        except ValueError:  # a name ustar cannot hold
            continue
        headers += [blob[i:i + 512] for i in range(0, len(blob), 512)]
    return headers


def _signed_checksum(buf: bytes) -> bytes:
    signed = 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(buf) if not 148 <= i < 156)
    return buf[:148] + b"%06o\0 " % (signed & 0o777777) + buf[156:]


def test_fast_tar_header_parsing_matches_tarfile():
    from facenet_kfp.extract.archive import _FastTarInfo

    headers = _random_headers(0, 400)
    rng = random.Random(1)
    variants = []
    for buf in headers[:150]:
        pos = rng.randrange(512)
        variants.append(buf[:pos] + bytes([buf[pos] ^ 0x41]) + buf[pos + 1:])   # corrupted byte
        variants.append(buf[:124] + b"0000000008\0\0" + buf[136:])                # non-octal size
        variants.append(buf[:124] + b"\x80" + b"\0" * 7 + b"\x01\x00\x00\x00" + buf[136:])  # base-256
        variants.append(buf[:257] + b"\0" * 8 + buf[265:])                         # V7: no magic
        variants.append(_signed_checksum(buf))
        variants.append(buf[:300])                                                 # truncated
    variants.append(b"\0" * 512)
    checked = 0
    for buf in headers + variants:
        assert _parse(_FastTarInfo, buf) == _parse(tarfile.TarInfo, buf), buf
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_tar_members_match_tarfile(tmp_path, fmt):
    from facenet_kfp.extract.archive import _FastTarInfo

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=fmt) as tar:
        for i, name in enumerate(["lfw", "lfw/Ann", "lfw/Ann/Ann_0001.jpg", "lfw/Zoë/Zoë_0001.jpg",
                                  "lfw/" + "Long_Name_" * 12 + "/x_0001.jpg",
                                  "lfw/Ann/" + "long_file_name_" * 6 + ".jpg"]):
            info = tarfile.TarInfo(name)
            if name.count("/") < 2:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = jpeg(i)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("lfw/Ann/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "Ann_0001.jpg"
        tar.addfile(link)
    keys = _FIELDS + ("offset", "offset_data", "pax_headers")
    with tarfile.open(archive) as plain, tarfile.open(archive, tarinfo=_FastTarInfo) as fast:
        expected = [[getattr(m, k) for k in keys] for m in plain.getmembers()]
        assert [[getattr(m, k) for k in keys] for m in fast.getmembers()] == expected
    assert len(expected) == 7


# --------------------------------------------------------------------------- which errors skip an image

def _raising_load(exc: BaseException):
    def load(self):
        raise exc
    return load


@pytest.mark.parametrize("exc", [OSError("image file is truncated"), SyntaxError("broken PNG file"),
                                 ValueError("unsupported BMP compression"), EOFError(),
                                 struct.error("unpack requires a buffer of 4 bytes")])
def test_decode_errors_skip_the_image(monkeypatch, exc):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raising_load(exc))
    assert check_image(jpeg(1)).reason == f"undecodable or truncated image ({type(exc).__name__}: {exc})"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("exc", [MemoryError(), TypeError("a bug"),
                                 OSError(errno.EIO, "Input/output error")])
def test_other_errors_while_decoding_fail_the_step(tmp_path, monkeypatch, exc, workers):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _raising_load(exc))  # forked workers inherit it
    archive = write_tar(tmp_path / "a.tgz", lfw_files())
    with pytest.raises(type(exc)) as err:
        extract_dataset(archive, tmp_path / "out", workers=workers)
    assert any("while checking archive member 'lfw/" in note for note in err.value.__notes__)
    assert_nothing_written(tmp_path / "out")


def test_failing_archive_read_fails_the_step(tmp_path, monkeypatch):
    real_pread = os.pread

    def pread(fd, size, offset):
        if size > 600:  # a member's bytes, not a tar header
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(OSError) as err:
        extract_dataset(write_tar(tmp_path / "a.tar", lfw_files(), "w"), tmp_path / "out", workers=1)
    assert err.value.errno == errno.EIO
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------- max_skipped_fraction

def _many(count: int) -> dict[str, bytes]:
    return {f"lfw/P{i % 10}/P{i % 10}_{i:04d}.jpg": jpeg(i, size=8) for i in range(count)}


def test_mostly_corrupt_archive_fails_naming_counts_and_examples(tmp_path):
    files = _many(10)
    good = jpeg(0, size=32)
    files.update({f"lfw/Q{i}/Q{i}_0001.jpg": good[: len(good) // 3] for i in range(30)})
    files["lfw/Q0/notes.txt"] = b"junk is not counted"
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        extract_dataset(write_tar(tmp_path / "a.tgz", files), out, workers=2)
    message = str(err.value)
    assert "30 of 40 images are unusable (75.0%, more than max_skipped_fraction 0.01)" in message
    assert "lfw/Q0/Q0_0001.jpg: undecodable or truncated image" in message
    assert "max_skipped_fraction" in message and str(tmp_path / "a.tgz") in message
    assert_nothing_written(out)


def test_a_handful_of_damaged_images_and_junk_pass(tmp_path):
    files = _many(300)
    files.update({"lfw/P1/P1_9998.jpg": b"", "lfw/P2/P2_9999.png": b"\x89PNG\r\n\x1a\n trunc",
                  "lfw/P1/.DS_Store": b"\0\0\0\1Bud1", "lfw/P2/notes.txt": b"not an image",
                  "lfw/README": b"read me", "lfw/P3/info": b""})
    summary = extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "out", workers=2)
    assert summary["images"] == 300 and summary["unusable"] == 2
    assert {item["member"] for item in summary["skipped"]} == set(files) - set(_many(300))


@pytest.mark.parametrize("limit, passes", [(0.25, True), (0.24, False), (0.0, False), (1.0, True)])
def test_max_skipped_fraction_is_a_strict_upper_bound(tmp_path, limit, passes):
    files = _many(3)
    files["lfw/P0/P0_0009.jpg"] = b"text"   # 1 of 4 images unusable
    archive = write_tar(tmp_path / "a.tgz", files)
    if passes:
        assert extract_dataset(archive, tmp_path / "out", workers=1, max_skipped_fraction=limit)["unusable"] == 1
    else:
        with pytest.raises(InputError, match="1 of 4 images are unusable"):
            extract_dataset(archive, tmp_path / "out", workers=1, max_skipped_fraction=limit)


# --------------------------------------------------------------------------- what training reads

def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _sample_images() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, format stored as: "" kept, else the original format re-encoded as PNG)}."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    grey16 = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (9, 11)).astype(np.uint16))
    return {
        "bmp_1bit.bmp": (_encode(rgb.convert("1"), "BMP"), "BMP"),
        "bmp_palette.bmp": (_encode(rgb.convert("P"), "BMP"), "BMP"),  # TF reads the indices as grey
        "bmp_rgb.bmp": (_encode(rgb, "BMP"), "BMP"),
        "gif.gif": (_encode(rgb, "GIF"), "GIF"),
        "tiff.tif": (_encode(rgb, "TIFF"), "TIFF"),
        "webp.webp": (_encode(rgb, "WEBP", lossless=True), "WEBP"),
        "jpeg_cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), "JPEG"),
        "jpeg_grey.jpg": (_encode(rgb.convert("L"), "JPEG"), ""),
        "jpeg_rgb.jpg": (_encode(rgb, "JPEG"), ""),
        "png_16bit.png": (_encode(grey16, "PNG"), ""),
        "png_1bit.png": (_encode(rgb.convert("1"), "PNG"), ""),
        "png_palette.png": (_encode(rgb.convert("P"), "PNG"), ""),
        "png_rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), ""),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_every_stored_image_is_one_training_decodes(tmp_path, workers):
    tf = pytest.importorskip("tensorflow")
    from facenet_kfp.tf_input import preprocess_image

    samples = _sample_images()
    files = {f"lfw/A/{name}": data for name, (data, _) in samples.items()}
    summary = extract_dataset(write_zip(tmp_path / "a.zip", files) if workers == 2
                              else write_tar(tmp_path / "a.tgz", files), tmp_path / "out", workers=workers)
    assert summary["images"] == len(samples) and summary["skipped"] == []
    assert summary["converted"] == sum(1 for _, fmt in samples.values() if fmt)
    rows = {row["file"]: row for row in read_manifest(tmp_path / "out")}
    for file, data in stored(tmp_path / "out").items():
        original, converted_from = samples[file.split("/")[1]]
        assert rows[file].get("converted_from", "") == converted_from, file
        if not converted_from:
            assert data == original, file
            continue
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), file
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        with Image.open(io.BytesIO(original)) as img:
            assert np.array_equal(decoded, np.asarray(img.convert("RGB"))), file
            assert (rows[file]["width"], rows[file]["height"]) == img.size
    for file, data in stored(tmp_path / "out").items():
        assert preprocess_image(tf.constant(data), 16, 0.6).shape == (16, 16, 3), file


# --------------------------------------------------------------------------- names that are not UTF-8

@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_latin1_member_names_are_decoded_as_latin1(tmp_path, fmt):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=fmt, encoding="latin-1") as tar:
        for name, data in {"lfw/Zoë_Ló/Zoë_Ló_0001.jpg": jpeg(1), "lfw/Ann/Ann_0001.jpg": jpeg(2)}.items():
            if fmt == tarfile.PAX_FORMAT:  # a PAX writer that stores the raw bytes (hdrcharset=BINARY)
                name = name.encode("latin-1").decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(archive, encoding="utf-8") as tar:
        assert any("\udceb" in name for name in tar.getnames())  # what tarfile itself makes of it
    summary = extract_dataset(archive, tmp_path / "out", workers=1)
    assert summary["identities"] == 2
    assert {row["identity"] for row in read_manifest(tmp_path / "out")} == {"Ann", "Zoë_Ló"}
    assert stored(tmp_path / "out")["Zoë_Ló/Zoë_Ló_0001.jpg"] == jpeg(1)
    with tarfile.open(shard_files(tmp_path / "out")[0]) as tar:
        assert "Zoë_Ló/Zoë_Ló_0001.jpg" in tar.getnames()


def test_zip_name_marked_utf8_that_is_not_is_refused(tmp_path):
    archive = write_zip(tmp_path / "a.zip", {"lfw/Zoë/Zoë_0001.jpg": jpeg(1)})
    archive.write_bytes(archive.read_bytes().replace("ë".encode(), b"\xeb\xeb"))
    with pytest.raises(InputError, match=r"member name b'lfw/Zo\\xeb\\xeb.*is marked as UTF-8 but is not"):
        extract_dataset(archive, tmp_path / "out", workers=1)


# --------------------------------------------------------------------------- bounded disk

def write_bomb(path: Path, zeros: int, files: dict[str, bytes] | None = None) -> Path:
    """A .tgz with `files` then `lfw/A/blob.bin` of `zeros` zero bytes (about 1000:1), streamed."""
    raw = io.BytesIO()
    tar = tarfile.open(fileobj=raw, mode="w")
    for name, data in (files or {}).items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = tarfile.TarInfo("lfw/A/blob.bin")
    blob.size = zeros
    prefix = raw.getvalue()[:tar.offset] + blob.tobuf(tarfile.USTAR_FORMAT)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip container
    left = zeros + -zeros % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE    # data, padding, end marker
    chunk = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(compressor.compress(prefix))
        while left > 0:
            out.write(compressor.compress(chunk[:left]))
            left -= len(chunk)
        out.write(compressor.flush())
    return path


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """The temporary folder extract uses for scratch, empty, under tmp_path."""
    folder = tmp_path / "scratch-root"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_decompression_bomb_is_refused_naming_the_cap(tmp_path, temp_dir):
    zeros = MIN_EXPANSION_BYTES + (8 << 20)
    archive = write_bomb(tmp_path / "bomb.tgz", zeros, lfw_files())
    assert archive.stat().st_size * 1000 < zeros * 2  # a thousandfold, give or take
    cap = MIN_EXPANSION_BYTES
    with pytest.raises(InputError) as err:
        extract_dataset(archive, tmp_path / "out", workers=1)
    message = str(err.value)
    assert f"the decompressed tar would take the extraction past {cap:,} bytes" in message
    assert "max_expansion 20 x the archive's" in message
    assert "raise max_expansion (config data.max_expansion" in message
    assert list(temp_dir.iterdir()) == []
    assert_nothing_written(tmp_path / "out")
    # A genuine archive that expands this much passes when the cap is raised.
    summary = extract_dataset(archive, tmp_path / "out", workers=1, max_expansion=10_000)
    assert summary["images"] == 6 and summary["unusable"] == 0
    assert {item["member"] for item in summary["skipped"]} == {"lfw/A/blob.bin"}
    assert list(temp_dir.iterdir()) == []


# --------------------------------------------------------------------------- interrupted extractions

# Runs an extraction whose decompression writes one chunk and then hangs, like a huge archive
# on a slow disk, so the test can stop it at a known point. SIGTERM becomes SystemExit, as the
# command line and the KFP entry point arrange.
_STALLED_EXTRACT = """
import signal, sys, time
from facenet_kfp import extract

signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
gzip_open = extract.archive._CODECS["gzip"]

class Stalling:
    def __init__(self, path, mode):
        self.file, self.reads = gzip_open(path, mode), 0
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def read(self, size):
        self.reads += 1
        if self.reads > 1:
            time.sleep(3600)
        return self.file.read(size)

extract.archive._CODECS["gzip"] = Stalling
extract.extract_dataset(sys.argv[1], sys.argv[2], workers=1)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopped_extraction_leaves_no_child_and_no_scratch(tmp_path, temp_dir, how):
    import signal
    import subprocess
    import sys

    archive = write_tar(tmp_path / "a.tgz", lfw_files())
    script = tmp_path / "stalled.py"
    script.write_text(_STALLED_EXTRACT)
    env = {**os.environ, "TMPDIR": str(temp_dir)}
    proc = subprocess.Popen([sys.executable, str(script), str(archive), str(tmp_path / "out")],
                            env=env, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        _wait_for(lambda: any(path.stat().st_size for path in temp_dir.glob("facenet-extract-*/archive.tar")),
                  "the scratch file")
        children = _children(proc.pid)
        assert children, "no decompressing child process"
        proc.send_signal(getattr(signal, how))
        returncode = proc.wait(timeout=120)
        _wait_for(lambda: not any(_running(pid) for pid in children), "the child processes to end")
    finally:
        for pid in [proc.pid] + children:  # whatever failed above, leave no process behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert_nothing_written(tmp_path / "out")
    if how == "SIGTERM":
        assert returncode == 143, proc.stderr.read().decode()
        assert list(temp_dir.iterdir()) == []
    else:
        assert returncode == -signal.SIGKILL
        [stale] = temp_dir.iterdir()  # no process could clean up after SIGKILL ...
        assert (stale / "archive.tar").is_file()
        extract_dataset(archive, tmp_path / "out", workers=1)  # ... so the next run does
        assert list(temp_dir.iterdir()) == []


# --------------------------------------------------------------------------- image sizes every step can use

def _png_of(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 1).save(buf, "PNG")
    return buf.getvalue()


def test_size_problem_bounds():
    assert size_problem(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE) == ""
    assert size_problem(MIN_IMAGE_SIDE, MAX_IMAGE_PIXELS // MIN_IMAGE_SIDE) == ""   # exactly the limit
    assert size_problem(MIN_IMAGE_SIDE, MAX_IMAGE_PIXELS // MIN_IMAGE_SIDE + 1).startswith("too many pixels")
    for width, height in ((1, 1), (1, 5000), (5000, 1), (0, 10)):
        assert size_problem(width, height).startswith(f"too small ({width}x{height} pixels")
    assert size_problem(12_000, 12_000) == ("too many pixels (12000x12000 = 144,000,000 pixels, more than "
                                            f"the limit of {MAX_IMAGE_PIXELS:,}; resize the image)")


@pytest.mark.parametrize("workers", [1, 2])
def test_images_too_small_for_a_later_step_are_skipped_and_counted(tmp_path, workers):
    files = _many(300)
    files.update({"lfw/P1/P1_9001.png": _png_of(1, 1), "lfw/P2/P2_9002.png": _png_of(1, 5000),
                  "lfw/P3/P3_9003.gif": _png_of(5000, 1),     # a PNG named .gif: decided by content
                  "lfw/P4/P4_9004.png": _png_of(2, 2)})       # the smallest usable image
    summary = extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "out", workers=workers)
    reasons = {item["member"]: item["reason"] for item in summary["skipped"]}
    assert reasons == {"lfw/P1/P1_9001.png": "too small (1x1 pixels; every side needs at least 2 pixels)",
                       "lfw/P2/P2_9002.png": "too small (1x5000 pixels; every side needs at least 2 pixels)",
                       "lfw/P3/P3_9003.gif": "too small (5000x1 pixels; every side needs at least 2 pixels)"}
    assert summary["unusable"] == 3 and summary["images"] == 301
    # Every stored image is one completion can augment.
    params = sample_params(np.random.default_rng(0))
    for file, data in stored(tmp_path / "out").items():
        generate_image(data, params, file)
    # Counted against max_skipped_fraction like any unusable image.
    with pytest.raises(InputError, match=r"3 of 304 images are unusable .*lfw/P1/P1_9001\.png: too small"):
        extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "out2", workers=workers,
                        max_skipped_fraction=0.005)


def test_image_over_the_pixel_limit_is_refused_by_every_step_without_decoding(tmp_path, monkeypatch):
    big = _png_of(12_000, 12_000, "1")        # 144 megapixels in a few kilobytes
    assert len(big) < 100_000
    files = {**_many(300), "lfw/P1/P1_9001.png": big}
    archive = write_tar(tmp_path / "a.tgz", files)
    assert archive.stat().st_size < 200_000
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # no Pillow DecompressionBombWarning either
        summary = extract_dataset(archive, tmp_path / "out", workers=1)
    assert (12_000, 12_000) not in loads       # refused from its header
    reason = {item["member"]: item["reason"] for item in summary["skipped"]}["lfw/P1/P1_9001.png"]
    assert reason.startswith("too many pixels (12000x12000 = 144,000,000 pixels, more than the limit")
    assert summary["unusable"] == 1 and summary["images"] == 300
    # The same limit in verify/embed, in the input pipeline and in completion.
    path = tmp_path / "big.png"
    path.write_bytes(big)
    with pytest.raises(InputError, match=r"big\.png: image too large to decode safely \(too many pixels"):
        read_image_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # Pillow's, on opening
        with pytest.raises(ValueError, match="too many pixels"):
            decode_rgb(big)
        with pytest.raises(InputError, match=r"shard-x: P1/P1_9001\.png: cannot generate images from it: "
                                             r"too many"):
            generate_image(big, sample_params(np.random.default_rng(0)), "shard-x: P1/P1_9001.png")
    assert (12_000, 12_000) not in loads
    # ... and the smallest accepted size passes them all.
    small = tmp_path / "small.png"
    small.write_bytes(_png_of(2, 2))
    assert read_image_file(small) == small.read_bytes()
    assert decode_rgb(small.read_bytes()).size == (2, 2)


def test_verify_refuses_a_too_small_image(tmp_path):
    path = tmp_path / "dot.png"
    path.write_bytes(_png_of(1, 1))
    with pytest.raises(InputError, match=r"dot\.png: image too small to use \(too small \(1x1 pixels"):
        read_image_file(path)


# --------------------------------------------------------------------------- nothing left out silently

def test_second_dataset_next_to_the_image_root_is_refused_naming_both(tmp_path):
    files = {**lfw_files(), **{f"CASIA-WebFace/{i:07d}/001.jpg": jpeg(i) for i in range(45, 54)}}
    archive = write_tar(tmp_path / "a.tgz", files)
    with pytest.raises(InputError) as err:
        extract_dataset(archive, tmp_path / "out", workers=1)
    message = str(err.value)
    assert ("9 of 15 images lie outside the identity folders of the lfw layout (lfw/<identity>/, "
            "6 files) and would be left out, more than max_skipped_fraction 0.01: CASIA-WebFace/ "
            "(9 images, e.g. CASIA-WebFace/0000045/001.jpg)") in message
    assert_nothing_written(tmp_path / "out")
    # Allowed explicitly, they are reported as unusable images, never dropped as junk.
    summary = extract_dataset(archive, tmp_path / "out", workers=1, max_skipped_fraction=0.7)
    assert summary["images"] == 6 and summary["unusable"] == 9
    reasons = {item["member"]: item["reason"] for item in summary["skipped"]}
    assert reasons["CASIA-WebFace/0000045/001.jpg"] == "image left out: outside the image root 'lfw/'"


def test_a_stray_image_outside_the_root_counts_against_the_limit(tmp_path):
    files = {**_many(300), "cover.jpg": jpeg(1)}
    summary = extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "out", workers=1)
    assert summary["images"] == 300 and summary["unusable"] == 1
    with pytest.raises(InputError, match=r"1 of 301 images lie outside .* the archive's top \(1 image, "
                                         r"e\.g\. cover\.jpg\)"):
        extract_dataset(write_tar(tmp_path / "a.tgz", files), tmp_path / "out2", workers=1,
                        max_skipped_fraction=0.001)


# --------------------------------------------------------------------------- one person, one name

def test_identity_names_are_nfc_and_nfc_collisions_are_refused(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
    assert nfc != nfd
    files = {f"faces/{nfd}/1.jpg": jpeg(1), f"faces/{nfd}/{nfd}.jpg": jpeg(2), "faces/Ann/1.jpg": jpeg(3)}
    summary = extract_dataset(write_tar(tmp_path / "a.tar", files, "w"), tmp_path / "out", workers=1)
    assert summary["identities"] == 2
    rows = read_manifest(tmp_path / "out")
    assert sorted((row["identity"], row["file"]) for row in rows) == [
        ("Ann", "Ann/1.jpg"), (nfc, f"{nfc}/1.jpg"), (nfc, f"{nfc}/{nfc}.jpg")]

    files[f"faces/{nfc}/2.jpg"] = jpeg(4)
    for kind in ("tar", "zip"):
        archive = write_zip(tmp_path / "b.zip", files) if kind == "zip" else \
            write_tar(tmp_path / "b.tar", files, "w")
        with pytest.raises(InputError) as err:
            extract_dataset(archive, tmp_path / "out2", workers=1)
        assert (f"two identity folders are both named {nfc!r} once their names are in Unicode NFC: "
                f"'faces/Jose\\u0301/' and 'faces/Jos\\xe9/'") in str(err.value)
        assert_nothing_written(tmp_path / "out2")


# --------------------------------------------------------------------------- a full disk, and leftovers

class _FullDiskWriter(ShardWriter):
    """A shard writer on a full disk: adding fails, and so does closing its files while cleaning up."""

    def add(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out_dir / "manifest.jsonl"))


def test_full_output_disk_names_the_folder(tmp_path, monkeypatch, temp_dir):
    monkeypatch.setattr(extract, "ShardWriter", _FullDiskWriter)
    out = tmp_path / "data" / "out"
    with pytest.raises(FacenetError) as err:
        extract_dataset(write_tar(tmp_path / "a.tgz", lfw_files()), out, workers=1)
    message = str(err.value)
    assert message.startswith(f"no space left on {out.parent}, ")
    assert f"the extracted dataset {out} did not fit" in message and "No space left on device" in message
    assert err.value.__suppress_context__              # one error, not a chain of OSErrors
    assert_nothing_written(out)
    assert list(temp_dir.iterdir()) == []


def _decompress_onto_full_disk(archive, codec, target, limit, parent, conn):
    conn.send(("io", (errno.ENOSPC, f"No space left on device ({target})")))
    conn.close()


def test_full_scratch_disk_names_the_temporary_folder(tmp_path, monkeypatch, temp_dir):
    monkeypatch.setattr(extract.archive, "_decompress_into", _decompress_onto_full_disk)
    with pytest.raises(FacenetError) as err:
        extract_dataset(write_tar(tmp_path / "a.tgz", lfw_files()), tmp_path / "out", workers=1)
    message = str(err.value)
    assert message.startswith(f"no space left on {temp_dir}, ")
    assert "the scratch copy of the decompressed archive (set TMPDIR" in message
    assert_nothing_written(tmp_path / "out")
    assert list(temp_dir.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_extraction_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    (dead / "shards").mkdir(parents=True)
    (dead / "shards" / "images-00000.tar").write_bytes(bytes(1000))
    dead_file = tmp_path / f".out.tmp-{_dead_pid()}-89abcdef"
    dead_file.write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getpid()}-00000000"      # a running process's: kept
    live.mkdir()
    other = tmp_path / ".other.tmp-1-00000000"                  # another output's: not ours to judge
    other.mkdir()
    extract_dataset(write_tar(tmp_path / "a.tgz", lfw_files()), out, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.tgz", "out", live.name, other.name])
