"""Tests for facenet_kfp.extract on small archives generated here."""

from __future__ import annotations

import io
import json
import random
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp.errors import InputError
from facenet_kfp.extract import DATASET_JSON, check_image, extract_dataset
from facenet_kfp.shards import ShardReader, read_manifest, shard_files


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
    assert summary == {"images": 6, "identities": 3, "image_root": expected_root, "shards": 1,
                       "skipped": [], "format": "zip" if kind == "zip" else "tar"}
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


def test_existing_output_folder_is_replaced(tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    extract_dataset(write_tar(tmp_path / "lfw.tgz", lfw_files()), out, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [DATASET_JSON, "manifest.jsonl", "shards"]


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
    summary = extract_dataset(archive, out, workers=2)

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
    assert "identity folder" in reasons["lfw/Carl_Cox/extra/Carl_Cox_0009.jpg"]
    assert "outside the image root 'lfw/'" == reasons["lfw-names.txt"]
    assert summary["images"] == 6 and summary["identities"] == 3
    assert json.loads((out / DATASET_JSON).read_text())["skipped"] == summary["skipped"]
    assert stored(out) == {name[len("lfw/"):]: data for name, data in lfw_files().items()}


def test_identity_without_valid_images_is_dropped(tmp_path):
    files = lfw_files()
    files["lfw/Dee_Dee/Dee_Dee_0001.jpg"] = b"not an image"
    summary = extract_dataset(write_tar(tmp_path / "a.tar", files, "w"), tmp_path / "out", workers=1)
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


@pytest.mark.parametrize("kwargs, match", [
    ({"shard_size_mb": 0}, "shard_size_mb"), ({"shard_size_mb": 1.5}, "shard_size_mb"),
    ({"workers": 0}, "workers"), ({"workers": True}, "workers"),
])
def test_bad_parameters(tmp_path, kwargs, match):
    archive = write_tar(tmp_path / "a.tgz", lfw_files())
    with pytest.raises(InputError, match=match):
        extract_dataset(archive, tmp_path / "out", **kwargs)


def test_check_image():
    good = jpeg(1, size=32)
    assert check_image(good) == ("", 32, 32)
    assert check_image(good[:-200])[0].startswith("undecodable or truncated image")
    assert check_image(b"")[0] == "empty file (0 bytes)"
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "TIFF")  # decodable, but not a format training reads
    assert check_image(buf.getvalue())[0].startswith("not an image in a supported format")


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
    with pytest.raises(InputError, match="'/etc/passwd'.*absolute path"):
        extract_dataset(archive, tmp_path / "out", workers=1)
    assert multiprocessing.active_children() == []
    assert_nothing_written(tmp_path / "out")


def test_cgroup_cpu_limit(tmp_path):
    from facenet_kfp.extract import _cgroup_cpu_limit

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
    from facenet_kfp.extract import _FastTarInfo

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
    from facenet_kfp.extract import _FastTarInfo

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
