"""Step 2: check a face dataset archive member by member and pack its valid images into shards.

The archive (tar, optionally gzip/bzip2/xz-compressed, or zip; detected by
content, not by name) is never unpacked onto the file system:

1. A compressed tar is decompressed once, by a child process, into a scratch
   file, so members can later be read by byte offset in any order. The tar
   headers are parsed while that file grows (the parser waits for bytes), so
   decompression and the safety scan run on two cores at once.
2. The whole member list is checked before anything is written: an absolute
   path, a ``..`` component, a link, a device or a fifo refuses the archive.
3. The layout is detected from the file paths (`detect_layout`), with the
   evidence that chose it recorded in ``dataset.json``:

   - ``lfw``: ``lfw/``, ``lfw-deepfunneled/`` or ``lfw-funneled/`` on top, or
     files named ``<identity>/<identity>_NNNN.<ext>`` (``root/<identity>/<file>``);
   - ``casia``: CASIA-WebFace, an image root named ``CASIA-WebFace`` or whose
     identity folders are all 7-digit ids (``CASIA-WebFace/0000045/001.jpg``);
   - ``vggface2``: ``train/`` and/or ``test/`` holding ``n<6 digits>`` identity
     folders, possibly below one folder (``vggface2/train/n000002/0001_01.jpg``);
     the splits' identities are disjoint and are merged. With a
     ``loose_bb_<split>.csv`` (in ``bb_landmark/`` or next to the split folders)
     each image is cut to the square of `BOX_SCALE` times its box's longer side
     around the box's centre (`square_box`), clipped to the image;
   - ``folders``: any other tree; each folder holding an image file is an
     identity, at any depth below the image root (the folder all identity
     folders share). Two identity folders with the same name refuse the archive.

   Every file becomes a candidate ``<identity>/<file>`` or is skipped with a
   reason (junk, outside the identity folders, too large, ...).
4. Candidates, sorted by identity then file name, are fully decoded with
   Pillow in a process pool; each worker reads its own bytes from the archive.
   For a tar only (reason, width, height) comes back and this process re-reads
   the bytes of valid images by offset (cheaper than pickling them); zip
   members are inflated once, in the worker, and sent back. JPEG (grey or
   RGB) and PNG bytes are stored as they are; every other accepted format
   (BMP, GIF, TIFF, WebP, CMYK JPEG), which TensorFlow's decoder misreads or
   cannot read (a 1-bit BMP fails, a palette BMP comes out as its indices),
   is re-encoded losslessly as PNG, so whatever extract accepts, training reads.
   An image cut to its box is re-encoded by the worker: a JPEG as JPEG
   (quality `BOX_JPEG_QUALITY`), anything else as PNG.

Only errors that say "this file is not a valid image" skip an image; so does
a size outside `facenet_kfp.image_limits` (a side under ``MIN_IMAGE_SIDE``,
more than ``MAX_IMAGE_PIXELS``; read from the header, before decoding), the
limits every later step shares. Any other error (a failed read of the
archive, no memory, a bug) fails the step. When more than
`max_skipped_fraction` of the images are unusable the step fails too: a mostly
broken archive is not a dataset. Images the layout leaves out (outside the
image root, e.g. ``CASIA-WebFace/`` next to ``lfw/``, or outside the identity
folders, e.g. VGGFace2's ``val/``) count as unusable; when they alone pass the
limit the archive is refused before decoding, naming their folders. Junk (OS
metadata, hidden files, files without an image suffix that are not images) is
skipped and reported but is not an unusable image. Identity and file names are
normalised to Unicode NFC (macOS writes "José" decomposed); two identity
folders equal after that refuse the archive.

Resources stay bounded: at most ``2 * workers`` chunks of at most
`_CHUNK_BYTES` each are in flight, no image member is larger than
`MAX_IMAGE_BYTES` and no face-box file larger than `MAX_BOX_FILE_BYTES` (it
is streamed line by line), and an extraction writes (scratch plus shards, and
the inflated face-box files of a zip) at most `max_expansion` times the
archive's size, at least `MIN_EXPANSION_BYTES`. Scratch lives in a locked
folder of the temporary folder, removed on any exception (SIGTERM included,
where the entry point turns it into one); child processes die with this
process, and a later run removes the scratch of a killed one, and the
temporary output folders (``.<out>.tmp-<pid>-*``) of a killed run
(`fsutil.remove_stale_temps`). A full disk fails the step with "no space
left on <folder>", naming the temporary or the output folder.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import csv
import fcntl
import io
import logging
import lzma
import math
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from isal import igzip, isal_zlib
from PIL import Image

from facenet_kfp.config import DataConfig
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import atomic_dir, no_space_named, remove_stale_temps, write_json
from facenet_kfp.image_limits import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, TOO_LARGE, TOO_SMALL, size_problem
from facenet_kfp.progress import Progress
from facenet_kfp.shards import ShardWriter, shard_files
from facenet_kfp.workers import available_cpus, become_child, mp_context

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
# Top folders of the published LFW variants, preferred when several top folders exist.
KNOWN_ROOTS = ("lfw", "lfw-deepfunneled", "lfw-funneled")
# The layouts `detect_layout` tells apart, as dataset.json names them.
LAYOUTS = ("lfw", "casia", "vggface2", "folders")
CASIA_ROOT = "CASIA-WebFace"
VGGFACE2_SPLITS = ("train", "test")
# VGGFace2's loose face boxes, one file per split; NAME_ID is "<identity>/<file name without suffix>".
BOX_FILES = {"train": "loose_bb_train.csv", "test": "loose_bb_test.csv"}
BOX_FOLDER = "bb_landmark"
BOX_COLUMNS = ("NAME_ID", "X", "Y", "W", "H")
# Side of the square cut around a loose box, in units of the box's longer side: the 0.3
# extension VGGFace2's authors apply to face boxes "to include the whole head".
BOX_SCALE = 1.3
BOX_JPEG_QUALITY = 95
# A face-box file is streamed line by line; these bound it. VGGFace2's loose_bb_train.csv is
# ~100 MB in lines of ~40 characters.
MAX_BOX_FILE_BYTES = 256 << 20
_MAX_BOX_LINE = 4096
# No accepted image has a side longer than this (image_limits.MAX_IMAGE_PIXELS over the shortest side).
MAX_BOX_COORDINATE = MAX_IMAGE_PIXELS // MIN_IMAGE_SIDE
# Formats Pillow may decode here; all but grey/RGB JPEG and PNG are stored re-encoded as PNG.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# Stored as they are: tf.io.decode_image reads these (modes as Pillow names them) correctly.
_KEPT = {"JPEG": ("L", "RGB"), "MPO": ("L", "RGB"), "PNG": None}   # None: every mode
# Modes a re-encoded PNG keeps (lossless); others become RGB, as TensorFlow would decode them.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
# A file with one of these suffixes in an identity folder is an image, even when it does not decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
# No face image is this large (LFW's are ~15 KB); refusing bigger members bounds memory.
MAX_IMAGE_BYTES = 64 << 20
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# The least an extraction may always write: tiny archives (tests, demos) need no max_expansion.
MIN_EXPANSION_BYTES = 64 << 20
SCRATCH_PREFIX = "facenet-extract-"
# How check_image's reasons start for a file whose format Pillow recognised (an image, if broken).
_DAMAGED = ("undecodable or truncated image", TOO_LARGE, TOO_SMALL)

_CHUNK_IMAGES = 32          # images per task sent to a worker
_CHUNK_BYTES = 8 << 20      # ... or fewer, so a chunk holds at most ~8 MB
_DECOMPRESS_CHUNK = 1 << 20   # bytes per progress message from the decompressing child
# gzip through ISA-L (isal): the same format and checks as the gzip module at about 1.7x the speed, which
# matters because a .tgz is decompressed in full before its images can be decoded.
_CODECS = {"gzip": igzip.open, "bzip2": bz2.open, "xz": lzma.open}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_DRIVE = re.compile(r"^[A-Za-z]:")
_CASIA_ID = re.compile(r"\d{7}")
_VGGFACE2_ID = re.compile(r"n\d{6}")
_LFW_FILE = re.compile(r"(.+)_\d{4}\.\w+")     # <identity>_NNNN.<ext>
# C0 and C1 control characters: never part of a real file name (C1 appear when latin-1 decodes junk).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Pillow raises these for a file that is not a valid image (its fuzz tests accept the same set,
# less MemoryError, which here means the machine is short of memory and fails the step);
# struct.error comes from headers too short for their fields. OSError only without an errno:
# Pillow's decoders raise bare OSError("image file is truncated"), real I/O errors carry one.
_BAD_IMAGE_ERRORS = (SyntaxError, ValueError, EOFError, NotImplementedError, OverflowError,
                     struct.error, Image.DecompressionBombError)


class _Member(NamedTuple):
    """One regular file of the archive: its name, where its bytes are and how many."""
    name: str          # the name as stored in the archive (reported when skipped)
    parts: tuple       # path components without "" and "." parts
    locator: int       # tar: byte offset of the data; zip: index in infolist()
    size: int          # uncompressed size in bytes
    problem: str = ""  # non-empty: skip the member with this reason (sparse, encrypted)


class _Candidate(NamedTuple):
    member: _Member
    identity: str
    file: str          # "<identity>/<file name>", the manifest's `file`
    split: str = ""    # vggface2: "train" or "test"
    box: tuple | None = None   # vggface2: the loose face box (x, y, w, h), when its csv has one


# --------------------------------------------------------------------------- public API

def extract_dataset(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                    shard_size_mb: int = DataConfig.shard_size_mb, workers: int | None = None,
                    max_skipped_fraction: float = 0.01, max_expansion: float = 20.0) -> dict:
    """Pack the valid images of `archive` into a sharded dataset at `out_dir`.

    Args:
        archive: a .tar, .tar.gz/.tgz (also bzip2/xz) or .zip file, detected by content.
        out_dir: output folder, replaced atomically when absent, empty or an
            earlier output of this step; gets ``manifest.jsonl``,
            ``shards/images-NNNNN.tar`` (about `shard_size_mb` MiB each) and
            ``dataset.json`` (the returned summary). A compressed tar needs its
            uncompressed size as scratch space in the temporary folder (TMPDIR).
        shard_size_mb: target shard size in MiB (>= 1).
        workers: decoding processes; None uses every CPU this process may run on,
            1 decodes in this process.
        max_skipped_fraction: fail when more than this fraction (0..1) of the
            images is unusable: unusable / (stored + unusable). An unusable image
            is a file in an identity folder that has an image suffix
            (`IMAGE_SUFFIXES`) or that Pillow recognises as an image, and that
            cannot be stored (undecodable, truncated, empty, too large, too
            small, ...), and so is an image file the layout leaves out (outside
            ``<root>/<identity>/``). Junk is skipped without counting: OS
            metadata, hidden files, and other files that are not images (``notes.txt``).
        max_expansion: an extraction may write (decompressed tar in TMPDIR plus
            shards) at most this many times the archive's size, and always
            `MIN_EXPANSION_BYTES`; more is refused as a likely decompression bomb.

    Returns:
        ``{"images", "identities", "image_root", "shards", "skipped", "unusable",
        "converted", "format", "layout"}``: counts of stored images and
        identities, the image root inside the archive ("." when identity
        folders are at the top), the number of shard files,
        ``[{"member", "reason"}, ...]`` sorted by member name, how many of
        those are unusable images, how many images were re-encoded as PNG,
        "tar" or "zip", and the layout (`_layout_summary`):
        ``{"name", "root", "evidence"}``, for vggface2 also ``"splits"`` and
        ``"boxes"``.

    Manifest rows are ``{identity, file: "<identity>/<name>", synthetic: False,
    width, height, shard, offset, size}``, sorted by identity then file name;
    a re-encoded image adds ``converted_from`` (its format, e.g. "BMP") and
    keeps its file name; an image cut to its face box adds ``crop``
    ([left, top, right, bottom] in the original's pixels) and its width and
    height are the cut's.

    Raises:
        InputError: the archive is missing, not a tar/zip, corrupt, empty, has
            an unsafe member (named in the message), no valid image, too many
            unusable images (or images in folders the layout leaves out), two
            identity folders with the same name (after NFC), a malformed or
            too large face-box file, or would write more than `max_expansion` allows.
        FacenetError: no space left on the temporary or the output folder.
    """
    archive = Path(archive)
    out_dir = Path(out_dir)
    if isinstance(shard_size_mb, bool) or not isinstance(shard_size_mb, int) or shard_size_mb < 1:
        raise InputError(f"shard_size_mb must be an integer >= 1, got {shard_size_mb!r}")
    if workers is None:
        workers = available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be an integer >= 1 or None, got {workers!r}")
    if not _is_number(max_skipped_fraction) or not 0 <= max_skipped_fraction <= 1:
        raise InputError(f"max_skipped_fraction must be a number from 0 to 1, got {max_skipped_fraction!r}")
    if not _is_number(max_expansion) or not 1 <= max_expansion < math.inf:
        raise InputError(f"max_expansion must be a finite number >= 1, got {max_expansion!r}")
    if not archive.is_file():
        raise InputError(f"{archive}: archive not found")

    fmt, codec = _detect_format(archive)
    budget = _Budget(archive, max_expansion)
    remove_stale_temps(out_dir)
    temp_dir = tempfile.gettempdir()
    with no_space_named(temp_dir, "the scratch copy of the decompressed archive (set TMPDIR to "
                                  "a folder with room for its uncompressed size)"), \
            _scratch_dir() as scratch:
        source = archive
        if fmt == "zip":
            members = _scan_zip(archive)
        elif codec:
            source = scratch / "archive.tar"
            with _GrowingTar(archive, codec, source, budget) as growing:
                members = _scan_tar(growing, archive)
                budget.spend(growing.finish(), "the decompressed tar")
        else:
            with open(archive, "rb") as handle:
                members = _scan_tar(handle, archive)
        skipped: list[dict] = []
        unusable: list[dict] = []
        layout, candidates, box_files = _plan(members, skipped, unusable, archive,
                                              max_skipped_fraction)
        log.info("%s: layout %s (%s), image root %r, %d candidate images in %d identity folders",
                 archive, layout.name, layout.evidence, layout.root_name, len(candidates),
                 len({c.identity for c in candidates}))

        converted = 0
        boxes = collections.Counter()
        with no_space_named(out_dir.absolute().parent, f"the extracted dataset {out_dir}"), \
                atomic_dir(out_dir, step="extract") as tmp, _Source(fmt, str(source)) as reader:
            if box_files:
                candidates, boxes["rows"] = _attach_boxes(reader, archive, box_files, candidates, budget)
            with ShardWriter(tmp, max_shard_bytes=shard_size_mb << 20) as writer, \
                    contextlib.closing(_decode_all(fmt, source, candidates, workers)) as results:
                for cand, (data, check) in results:
                    if check.reason:
                        _skip(skipped, cand.member.name, check.reason)
                        if _is_image(cand.file, check.reason):
                            unusable.append(skipped[-1])
                        continue
                    if check.encoded is not None:
                        data = check.encoded
                    elif data is None:
                        data, _ = reader.read(cand.member)
                    budget.spend(len(data) + 2 * tarfile.BLOCKSIZE, "the packed images")
                    extra = {}
                    if check.converted_from:
                        converted += 1
                        extra["converted_from"] = check.converted_from
                    if check.crop is not None:
                        extra["crop"] = list(check.crop)
                    boxes["applied" if check.crop is not None else
                          "outside_image" if cand.box is not None else "without_box"] += 1
                    writer.add(cand.identity, cand.file, data, synthetic=False,
                               width=check.width, height=check.height, **extra)
            if not writer.images:
                raise InputError(f"{archive}: no identity has a valid image "
                                 f"({len(skipped)} files skipped, e.g. {skipped[0]['member']}: "
                                 f"{skipped[0]['reason']})")
            _check_unusable(archive, unusable, writer.images, max_skipped_fraction)
            summary = {
                "images": writer.images,
                "identities": len(writer.identities),
                "image_root": layout.root_name,
                "shards": len(shard_files(tmp)),
                "skipped": sorted(skipped, key=lambda item: item["member"]),
                "unusable": len(unusable),
                "converted": converted,
                "format": fmt,
                "layout": _layout_summary(layout, writer.identities, candidates, box_files, boxes),
            }
            write_json(tmp / DATASET_JSON, summary)
    log.info("%s: %d images of %d identities in %d shards, %d files skipped (%d unusable images), "
             "%d re-encoded as PNG", out_dir, summary["images"], summary["identities"],
             summary["shards"], len(skipped), len(unusable), converted)
    if box_files:
        log.info("%s: %d images cut to their face box, %d without a box, %d whose box misses the "
                 "image (both kept uncut)", out_dir, boxes["applied"], boxes["without_box"],
                 boxes["outside_image"])
    return summary


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_image(file: str, reason: str) -> bool:
    """Whether a skipped file in an identity folder counts as an unusable image (not as junk):
    it has an image suffix, or Pillow recognised its format but could not decode it."""
    return file.lower().endswith(IMAGE_SUFFIXES) or reason.startswith(_DAMAGED)


def _check_unusable(archive: Path, unusable: list[dict], stored: int, max_fraction: float) -> None:
    """InputError when more than `max_fraction` of the images could not be stored."""
    total = stored + len(unusable)
    if len(unusable) <= max_fraction * total:
        return
    examples = "; ".join(f"{item['member']}: {item['reason']}"
                         for item in sorted(unusable, key=lambda item: item["member"])[:5])
    raise InputError(f"{archive}: {len(unusable)} of {total} images are unusable "
                     f"({len(unusable) / total:.1%}, more than max_skipped_fraction "
                     f"{max_fraction:g}), e.g. {examples}; repair or replace the archive, or "
                     f"raise max_skipped_fraction (config data.max_skipped_fraction, pipeline "
                     f"parameter max_skipped_fraction, facenet-kfp extract --max-skipped-fraction) "
                     f"to keep only its valid images")


class _Budget:
    """Bytes an extraction may write: `max_expansion` x the archive's size, at least MIN_EXPANSION_BYTES."""

    def __init__(self, archive: Path, max_expansion: float):
        self.archive, self.max_expansion = archive, max_expansion
        self.archive_bytes = archive.stat().st_size
        self.limit = max(int(self.archive_bytes * max_expansion), MIN_EXPANSION_BYTES)
        self.used = 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def spend(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise self.exceeded(what)

    def exceeded(self, what: str) -> InputError:
        return InputError(
            f"{self.archive}: {what} would take the extraction past {self.limit:,} bytes, the most "
            f"it may write (max_expansion {self.max_expansion:g} x the archive's "
            f"{self.archive_bytes:,} bytes, and at least {MIN_EXPANSION_BYTES >> 20} MiB); face "
            f"image archives expand about 1.1x, so this looks like a decompression bomb; if the "
            f"archive is genuine, raise max_expansion (config data.max_expansion, pipeline "
            f"parameter max_expansion, facenet-kfp extract --max-expansion)")


# --------------------------------------------------------------------------- scratch and children

@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A new folder in the temporary folder, removed when the block ends, however it ends.

    The folder holds a lock file, locked for the block's lifetime (and by forked
    children, which die with this process): a folder whose lock is free belongs
    to a process that was killed (SIGKILL, out of memory) and is removed here
    before a new one is made.
    """
    _remove_stale_scratch(Path(tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    fd = None
    try:
        # Locked before it gets its name, so no other run ever sees it unlocked.
        fd = os.open(path / ".lock.new", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path / ".lock.new", path / ".lock")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _remove_stale_scratch(temp_dir: Path) -> None:
    """Remove the scratch folders in `temp_dir` whose lock no process holds."""
    for folder in temp_dir.glob(SCRATCH_PREFIX + "*"):
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except OSError:
            continue  # not locked yet (being made), or another user's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use by a running extraction
        finally:
            os.close(fd)
        log.warning("removing %s, scratch left by an extraction that was killed", folder)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- archive reading

def _detect_format(archive: Path) -> tuple[str, str]:
    """("tar", codec) with codec "" (plain), "gzip", "bzip2" or "xz"; or ("zip", "")."""
    with open(archive, "rb") as handle:
        magic = handle.read(8)
    if not magic:
        raise InputError(f"{archive}: archive is empty (0 bytes)")
    if tarfile.is_tarfile(archive):
        return "tar", next((codec for prefix, codec in _MAGIC if magic.startswith(prefix)), "")
    if zipfile.is_zipfile(archive):
        return "zip", ""
    raise InputError(f"{archive}: not a tar (plain, gzip, bzip2 or xz) or zip archive")


def _decompress_into(archive: str, codec: str, target: str, limit: int, parent: int, conn) -> None:
    """Child process: decompress `archive` into `target`, at most `limit` bytes, reporting each chunk.

    Messages: ("progress", bytes), then ("done", bytes), ("limit", bytes) when
    the output would pass `limit`, ("corrupt", text) for bad compressed data,
    or ("io", (errno, text)) when reading or writing fails (a full disk).
    """
    become_child(parent)
    total = 0
    try:
        with _CODECS[codec](archive, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(_DECOMPRESS_CHUNK):
                if total + len(chunk) > limit:
                    conn.send(("limit", total + len(chunk)))
                    return
                if os.getppid() != parent:
                    return  # the parent died (where no death signal exists)
                dst.write(chunk)
                dst.flush()  # the parent reads the bytes as soon as it hears of them
                total += len(chunk)
                conn.send(("progress", total))
        conn.send(("done", total))
    except OSError as exc:
        # gzip, bz2 and lzma report bad data as OSError without an errno; I/O errors have one.
        if exc.errno is not None:
            conn.send(("io", (exc.errno, f"{exc.strerror} ({exc.filename or target})")))
        else:
            conn.send(("corrupt", f"{type(exc).__name__}: {exc}"))
    except (EOFError, zlib.error, isal_zlib.error, lzma.LZMAError) as exc:
        conn.send(("corrupt", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _GrowingTar:
    """A file object over a tar being decompressed by a child process into `target`.

    `read` blocks until the child has written the requested bytes, so tarfile can
    parse headers (seeking over member data) while decompression goes on.
    """

    def __init__(self, archive: Path, codec: str, target: Path, budget: _Budget):
        self.archive = archive
        self._budget = budget
        self.written = 0
        self.done = False
        self._pos = 0
        target.touch()  # the child truncates this same file; open it now to read as it grows
        self._fd = os.open(target, os.O_RDONLY)
        ctx = mp_context()
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_decompress_into, name="decompress", daemon=True,
                                 args=(str(archive), codec, str(target), budget.left, os.getpid(),
                                       child_conn))
        self._proc.start()
        child_conn.close()
        self._progress = Progress(f"decompress {archive.name}", unit="MiB", scale=1 << 20)

    def __enter__(self) -> "_GrowingTar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self) -> None:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise FacenetError(f"{self.archive}: decompression process ended without a result "
                               f"(exit code {self._proc.exitcode})") from None
        if kind == "corrupt":
            raise InputError(f"{self.archive}: corrupt or truncated compressed archive ({value})")
        if kind == "limit":
            raise self._budget.exceeded("the decompressed tar")
        if kind == "io":
            raise OSError(value[0], f"decompressing {self.archive} failed: {value[1]}")
        self._progress.update(value - self.written)
        self.written = value
        if kind == "done":
            self.done = True
            self._progress.close()

    def finish(self) -> int:
        """Wait for the whole tar; returns its size in bytes."""
        while not self.done:
            self._receive()
        self._proc.join()
        return self.written

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.finish() - self._pos
        while self.written < self._pos + size and not self.done:
            self._receive()
        data = os.pread(self._fd, max(min(size, self.written - self._pos), 0), self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self.finish() + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()  # we stopped early (unsafe member, error, signal): its output is unused
        self._proc.join()
        self._conn.close()
        os.close(self._fd)


def _unsafe_name(name: str) -> str:
    """Why extracting a member with this name could escape the output folder ("" if safe)."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in name and ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    return ""


def _text(name: str) -> str:
    """A tar member name as text that any later step can store.

    tarfile keeps bytes that are not UTF-8 as lone surrogates, which JSON,
    TensorFlow strings and tar headers cannot hold; such a name (an archive made
    where names were latin-1, say ``b"Zo\\xeb"``) is decoded as latin-1 instead.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("latin-1")
    return name


def _parts(name: str) -> tuple:
    return tuple(part for part in name.split("/") if part not in ("", "."))


class _FastTarInfo(tarfile.TarInfo):
    """TarInfo whose header parsing has a fast path for the common member.

    tarfile's `frombuf` spends most of a scan in per-field helper calls and two
    checksums per header (~100 us each; LFW has ~19k headers). Here a plain
    POSIX/GNU header of a regular file or folder, with octal number fields and
    a matching unsigned checksum, is decoded inline with the same rules;
    anything else (links, devices, PAX/GNU extension headers, base-256
    numbers, signed checksums, V7 headers, malformed headers) goes to
    tarfile's own `frombuf`. Extension processing (PAX, GNU long names,
    sparse) is tarfile's in every case. Tests compare both on many headers.
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        fields = _fast_header_fields(buf)
        if fields is None:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chksum, kind, linkname, uname, gname,
         devmajor, devminor, prefix) = fields
        obj = cls()
        obj.name = name.decode(encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum = mode, uid, gid, size, mtime, chksum
        obj.type = kind
        obj.linkname = linkname.decode(encoding, errors)
        obj.uname = uname.decode(encoding, errors)
        obj.gname = gname.decode(encoding, errors)
        obj.devmajor, obj.devminor = devmajor, devminor
        if kind == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE  # V7-style folder: a regular file whose name ends in "/"
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix:
            obj.name = prefix.decode(encoding, errors) + "/" + obj.name
        return obj


_FAST_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE})
_FAST_MAGICS = frozenset({b"ustar\x0000", b"ustar  \x00"})
# name, mode, uid, gid, size, mtime, chksum, type, linkname, magic+version,
# uname, gname, devmajor, devminor, prefix (POSIX ustar layout; 12 bytes unused)
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def _fast_header_fields(buf: bytes):
    """The decoded fields of a common tar header, or None when tarfile must decide.

    Numbers follow tarfile's `nti` for octal fields (text up to the first NUL,
    stripped, base 8); strings its `nts` (bytes up to the first NUL).
    """
    if len(buf) != tarfile.BLOCKSIZE:
        return None
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, uname, gname,
     devmajor, devminor, prefix) = _HEADER.unpack(buf)
    if kind not in _FAST_TYPES or magic not in _FAST_MAGICS:
        return None
    numbers = []
    for field in (mode, uid, gid, size, mtime, chksum, devmajor, devminor):
        if field[0] & 0x80:
            return None  # base-256 number
        try:
            numbers.append(int(field.split(b"\0", 1)[0].strip() or b"0", 8))
        except ValueError:
            return None  # not octal: tarfile reports the invalid header
    if numbers[5] != 256 + sum(buf) - sum(buf[148:156]):
        return None  # maybe a signed-char checksum (or a bad header): tarfile checks both
    return (name.split(b"\0", 1)[0], *numbers[:5], numbers[5], kind,
            linkname.split(b"\0", 1)[0], uname.split(b"\0", 1)[0], gname.split(b"\0", 1)[0],
            numbers[6], numbers[7], prefix.split(b"\0", 1)[0])


def _scan_tar(fileobj, archive: Path) -> list[_Member]:
    """Check every member header of an uncompressed tar; refuse the archive on the first unsafe one.

    Headers are read one at a time (data is seeked over, never read). The end of
    the member list must be tar's end-of-archive zero block: anything else
    (a broken header, no end marker) means a corrupt or truncated archive, which
    tarfile on its own would silently treat as the end.
    """
    members = []
    count = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_FastTarInfo)
        while (info := tar.next()) is not None:
            count += 1
            tar.members.clear()  # tarfile keeps every TarInfo otherwise; we keep our own list
            name = _text(info.name)
            why = _unsafe_name(name)
            if not why:
                if info.issym() or info.islnk():
                    why = f"{'symbolic' if info.issym() else 'hard'} link to {info.linkname!r}"
                elif info.ischr() or info.isblk():
                    why = "device file"
                elif info.isfifo():
                    why = "fifo"
                elif not (info.isreg() or info.isdir()):
                    why = f"unsupported member type {info.type!r}"
            if why:
                raise InputError(f"{archive}: refusing the whole archive: member {name!r} "
                                 f"is unsafe ({why})")
            if info.isreg():
                problem = "sparse tar member (not supported)" if info.issparse() else ""
                members.append(_Member(name, _parts(name), info.offset_data, info.size, problem))
        fileobj.seek(tar.offset)
        end = fileobj.read(tarfile.BLOCKSIZE)
    except tarfile.TarError as exc:
        raise InputError(f"{archive}: corrupt tar archive ({exc})") from exc
    if end != tarfile.NUL * tarfile.BLOCKSIZE:
        what = "a broken member header" if end else "no end-of-archive marker"
        raise InputError(f"{archive}: corrupt or truncated tar archive: {what} at byte {tar.offset:,}")
    if not count:
        raise InputError(f"{archive}: archive is empty (no members)")
    return members


def _scan_zip(archive: Path) -> list[_Member]:
    """Check every member of a zip; refuse the archive on the first unsafe one."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{archive}: corrupt zip archive ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{archive}: refusing the whole archive: member name {exc.object!r} is "
                         f"marked as UTF-8 but is not ({exc.reason}); repack the archive") from None
    if not infos:
        raise InputError(f"{archive}: archive is empty (no members)")
    members = []
    for index, info in enumerate(infos):
        why = _unsafe_name(info.filename)
        # Unix zips keep st_mode in the high 16 bits of external_attr.
        mode = info.external_attr >> 16
        if not why and mode:
            if stat.S_ISLNK(mode):
                why = "symbolic link"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                why = "device file"
            elif stat.S_ISFIFO(mode):
                why = "fifo"
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                why = f"unsupported file type {stat.S_IFMT(mode):o}"
        if why:
            raise InputError(f"{archive}: refusing the whole archive: member {info.filename!r} is unsafe ({why})")
        if info.is_dir():
            continue
        problem = "encrypted zip member" if info.flag_bits & 0x1 else ""
        members.append(_Member(info.filename, _parts(info.filename), index, info.file_size, problem))
    return members


# --------------------------------------------------------------------------- planning

def _junk(parts: tuple) -> str:
    """Why a path is OS metadata or a hidden file ("" if it is not)."""
    if "__MACOSX" in parts:
        return "junk: macOS resource fork (__MACOSX)"
    if parts[-1] in JUNK_NAMES:
        return f"junk: {parts[-1]}"
    if any(part.startswith(".") for part in parts):
        return "junk: hidden file or folder"
    return ""


@dataclass(frozen=True)
class Layout:
    """How an archive holds its images, as `detect_layout` found it."""
    name: str                  # one of LAYOUTS
    root: tuple                # the image root's path components; () for the archive's top
    evidence: str              # what chose this layout, in words
    splits: tuple = ()         # vggface2: the split folders between the root and identity folders
    nested: bool = False       # folders: identity folders at any depth below the root

    @property
    def root_name(self) -> str:
        """The root as dataset.json's image_root gives it: "a/b", or "." for the archive's top."""
        return "/".join(self.root) or "."

    def identity_folder(self, parts: tuple, image_folders: set[tuple]) -> tuple | str:
        """The identity folder (path components) holding the file `parts`, or why it is in none.

        `parts` starts with the root; `image_folders` are the folders holding a file
        with an image suffix (what makes a folder an identity in a nested tree).
        """
        r = "/".join(self.root) + "/" if self.root else ""
        depth = len(self.root) + (3 if self.splits else 2)
        if self.splits:
            if len(parts) != depth or parts[len(self.root)] not in self.splits:
                return (f"not inside an identity folder (expected "
                        f"{' or '.join(f'{r}{split}/<identity>/<file>' for split in self.splits)})")
        elif not self.nested:
            if len(parts) != depth:
                return f"not directly inside an identity folder (expected {r}<identity>/<file>)"
        elif len(parts) < depth:
            return f"not inside an identity folder (expected {r}[<folder>/...]<identity>/<file>)"
        elif parts[:-1] not in image_folders:
            return "junk: no file with an image suffix in its folder, so not an identity folder"
        return parts[:-1]


def _where(root: tuple) -> str:
    return f"top folder {root[0]}" if len(root) == 1 else f"folder {'/'.join(root)}" if root \
        else "the archive's top"


def _common_root(images: list[tuple]) -> tuple:
    """The folder all identity folders of a tree share: the longest common prefix of the
    images' folders, less its last part when every image is in that one folder."""
    folders = [parts[:-1] for parts in images]
    prefix = os.path.commonprefix(folders)
    return tuple(prefix[:-1]) if all(folder == prefix for folder in folders) else tuple(prefix)


def detect_layout(paths: list[tuple]) -> Layout:
    """The layout of an archive from its files' path components (junk already removed).

    In order: a published LFW top folder (`KNOWN_ROOTS`) is lfw; ``train/`` or
    ``test/`` folders holding ``n<6 digits>`` folders are vggface2 (their parent
    is the root); otherwise the root is the folder the image files' folders
    share (`_common_root`) and the tree is casia when the root is named
    CASIA-WebFace or every identity folder directly below it is a 7-digit id,
    lfw when every image sits directly in an identity folder and is named
    ``<identity>_NNNN``, else folders (identity folders at any depth).
    Only files with an image suffix decide, or every file when none has one.

    Raises:
        InputError: several LFW top folders, or several VGGFace2 roots.
    """
    tops = {parts[0] for parts in paths if len(parts) >= 2}
    known = [name for name in KNOWN_ROOTS if name in tops]
    if len(known) > 1:
        raise InputError(f"several image roots in one archive: {', '.join(known)}; "
                         f"repack it with one of them")
    if known:
        return Layout("lfw", (known[0],), f"top folder {known[0]}, a published LFW variant")
    images = [parts for parts in paths if parts[-1].lower().endswith(IMAGE_SUFFIXES)] or paths

    vgg: dict[tuple, tuple] = {}   # root -> its first identity folder, as an example
    for parts in images:
        if len(parts) >= 3 and parts[-3] in VGGFACE2_SPLITS and _VGGFACE2_ID.fullmatch(parts[-2]):
            vgg[parts[:-3]] = min(vgg.get(parts[:-3], parts[:-1]), parts[:-1])
    if len(vgg) > 1:
        where = ", ".join(sorted("/".join(root) + "/" if root else "the archive's top" for root in vgg))
        raise InputError(f"several VGGFace2 roots (folders holding train/ or test/) in one "
                         f"archive: {where}; repack it with one of them")
    if vgg:
        (root, example), = vgg.items()
        splits = sorted({parts[len(root)] for parts in images if len(parts) == len(root) + 3
                         and parts[:len(root)] == root and parts[len(root)] in VGGFACE2_SPLITS})
        return Layout("vggface2", root, f"{_where(root)} holds {' and '.join(f'{s}/' for s in splits)} "
                                        f"with n-numbered identity folders (e.g. {'/'.join(example)})",
                      splits=VGGFACE2_SPLITS)

    root = _common_root(images)
    flat = [parts for parts in images if len(parts) == len(root) + 2]
    folders = sorted({parts[-2] for parts in flat})
    named = bool(root) and root[-1].lower() == CASIA_ROOT.lower()
    numbered = bool(folders) and all(_CASIA_ID.fullmatch(name) for name in folders)
    if named or numbered:
        other = next((name for name in folders if not _CASIA_ID.fullmatch(name)), "")
        ids = f"identity folders are not all 7-digit ids (e.g. {other})" if other else \
            "identity folders are 7-digit ids"
        return Layout("casia", root, f"{_where(root)}, {ids}")
    if len(flat) == len(images) and all((match := _LFW_FILE.fullmatch(parts[-1])) and match[1] == parts[-2]
                                        for parts in flat):
        return Layout("lfw", root, f"{_where(root)}, identity folders hold <identity>_NNNN files")
    depths = sorted({len(parts) - len(root) - 1 for parts in images if len(parts) >= len(root) + 2} or {1})
    deepest = max(images, key=len)
    shape = f"directly below {_where(root)}" if depths == [1] else \
        f"{depths[0]} to {depths[-1]} levels below {_where(root)} (e.g. {'/'.join(deepest[:-1])})"
    return Layout("folders", root, f"identity folders (folders holding images) {shape}", nested=True)


def _unstorable(member: _Member, parts: tuple) -> str:
    """Why a file in an identity folder cannot be stored without decoding it ("" if it may be)."""
    if _CONTROL.search(parts[-2]) or _CONTROL.search(parts[-1]):
        return "control character (tab, newline, ...) in the name"
    if member.problem:
        return member.problem
    if member.size > MAX_IMAGE_BYTES:
        return f"too large for an image ({member.size:,} bytes, limit {MAX_IMAGE_BYTES:,})"
    return ""


def _skip(skipped: list[dict], member: str, reason: str) -> None:
    level = logging.INFO if reason.startswith("junk") else logging.WARNING
    log.log(level, "skipping %s: %s", member, reason)
    skipped.append({"member": member, "reason": reason})


def _plan(members: list[_Member], skipped: list[dict], unusable: list[dict], archive: Path,
          max_skipped_fraction: float) -> tuple[Layout, list[_Candidate], dict[str, _Member]]:
    """Detect the layout and choose the candidate images, sorted by identity then file name.

    Returns (layout, candidates, vggface2 face-box files by split). Skipped
    members go to `skipped`; those that are images in an identity folder also to `unusable`,
    and so do images the layout leaves out (outside the image root or outside
    any identity folder: a second dataset, VGGFace2's ``val/``). When those are
    more than `max_skipped_fraction` of the images, the archive is refused
    naming their folders (`_refuse_left_out`). Identity and file names are
    normalised to Unicode NFC; two identity folders whose names are equal
    after that refuse the archive.
    """
    if not members:
        raise InputError(f"{archive}: archive holds no files (only folders)")
    kept = []
    for member in members:
        reason = _junk(member.parts) if member.parts else "empty name"
        if reason:
            _skip(skipped, member.name, reason)
        else:
            kept.append(member)
    if not kept:
        raise InputError(f"{archive}: no identity has a valid image "
                         f"(only {len(skipped)} junk or empty-named files)")
    try:
        layout = detect_layout([member.parts for member in kept])
    except InputError as exc:
        raise InputError(f"{archive}: {exc}") from exc
    root = layout.root
    root_text = "/".join(root) + "/" if root else ""
    box_files = _box_files(layout, kept, archive)
    image_folders = {member.parts[:-1] for member in kept
                     if member.parts[-1].lower().endswith(IMAGE_SUFFIXES)} if layout.nested else set()

    by_file: dict[str, _Candidate] = {}
    folder_of: dict[str, tuple] = {}    # identity -> its folder: two folders may not share a name
    left_out: list[tuple[_Member, str]] = []   # images outside the layout's identity folders
    box_parts = {member.parts for member in box_files.values()}
    for member in kept:
        parts = member.parts
        if parts in box_parts:
            if member not in box_files.values():
                _skip(skipped, member.name, "replaced by a later member with the same name")
            continue
        if parts[:len(root)] != root:
            folder = f"outside the image root {root_text!r}"
        else:
            folder = layout.identity_folder(parts, image_folders)
        if isinstance(folder, str):
            if parts[-1].lower().endswith(IMAGE_SUFFIXES) and not folder.startswith("junk"):
                left_out.append((member, folder))
            else:
                _skip(skipped, member.name, folder)
            continue
        identity = _nfc(folder[-1])
        other = folder_of.setdefault(identity, folder)
        if other != folder:
            _refuse_same_identity(archive, identity, other, folder)
        if reason := _unstorable(member, parts):
            _skip(skipped, member.name, reason)
            if parts[-1].lower().endswith(IMAGE_SUFFIXES):
                unusable.append(skipped[-1])
            continue
        file = f"{identity}/{_nfc(parts[-1])}"
        earlier = by_file.get(file)
        if earlier is not None:
            # Extracting would let the later member overwrite the earlier one: do the same.
            _skip(skipped, earlier.member.name, "replaced by a later member with the same name")
        by_file[file] = _Candidate(member, identity, file, folder[len(root)] if layout.splits else "")
    candidates = sorted(by_file.values(), key=lambda cand: (cand.identity, cand.file))
    images = len(candidates) + len(unusable) + len(left_out)
    if left_out and len(left_out) > max_skipped_fraction * images:
        _refuse_left_out(archive, layout, left_out, images, len(candidates), max_skipped_fraction)
    for member, reason in left_out:
        _skip(skipped, member.name, f"image left out: {reason}")
        unusable.append(skipped[-1])
    if not candidates:
        raise InputError(f"{archive}: no identity has a valid image: no file is inside an identity "
                         f"folder of the {layout.name} layout below {root_text or 'the top'!r} "
                         f"({len(skipped)} files skipped)")
    return layout, candidates, box_files


def _nfc(name: str) -> str:
    """`name` in Unicode NFC, the form names are compared and stored in (macOS writes "José" as NFD)."""
    return name if name.isascii() else unicodedata.normalize("NFC", name)


def _refuse_same_identity(archive: Path, identity: str, one: tuple, other: tuple) -> None:
    """InputError: two identity folders `one` and `other` (path components) both name `identity`."""
    first, second = sorted(("/".join(one), "/".join(other)))
    if one[-1] == other[-1]:
        raise InputError(f"{archive}: two identity folders are both named {identity!r}: "
                         f"{first}/ and {second}/; identities are folder names, so these would "
                         f"merge into one person; rename one of them and repack the archive")
    raise InputError(f"{archive}: two identity folders are both named {identity!r} once their names "
                     f"are in Unicode NFC: {ascii(first + '/')} and {ascii(second + '/')} (the same letters, "
                     f"encoded differently); identities are folder names, so these would be one "
                     f"person under two labels; merge or rename them and repack the archive")


def _left_out_folder(parts: tuple, root: tuple) -> str:
    """The folder to name for an image the layout leaves out: the first folder below where its
    path leaves the image root (``CASIA-WebFace/`` next to ``lfw/``, ``vggface2/val/``)."""
    common = len(os.path.commonprefix([parts[:-1], root]))
    folder = parts[:min(common + 1, len(parts) - 1)]
    return "/".join(folder) + "/" if folder else "the archive's top"


def _refuse_left_out(archive: Path, layout: Layout, left_out: list[tuple[_Member, str]], images: int,
                     used: int, max_fraction: float) -> None:
    """InputError naming the folders whose images the layout would leave out, and the folders it uses."""
    counts = collections.Counter(_left_out_folder(member.parts, layout.root) for member, _ in left_out)
    examples = {}
    for member, _ in left_out:
        examples.setdefault(_left_out_folder(member.parts, layout.root), member.name)
    folders = ", ".join(f"{folder} ({count:,} image{'s' * (count != 1)}, e.g. {examples[folder]})"
                        for folder, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5])
    if len(counts) > 5:
        folders += f" and {len(counts) - 5} more folders"
    root_text = "/".join(layout.root) + "/" if layout.root else ""
    below = "[<folder>/...]" if layout.nested else ""
    places = " and ".join(f"{root_text}{split}/<identity>/" for split in layout.splits) if layout.splits \
        else f"{root_text}{below}<identity>/"
    raise InputError(
        f"{archive}: {len(left_out):,} of {images:,} images lie outside the identity folders of the "
        f"{layout.name} layout ({places}, {used:,} files) and would be left out, more than "
        f"max_skipped_fraction {max_fraction:g}: {folders}; repack the archive with one dataset in "
        f"one image root, or raise max_skipped_fraction (config "
        f"data.max_skipped_fraction, pipeline parameter max_skipped_fraction, facenet-kfp extract "
        f"--max-skipped-fraction) to leave them out")


# --------------------------------------------------------------------------- face boxes (VGGFace2)

def _box_files(layout: Layout, kept: list[_Member], archive: Path) -> dict[str, _Member]:
    """The loose-box csv of each vggface2 split, found in ``<root>/bb_landmark/`` or ``<root>/``."""
    if layout.name != "vggface2":
        return {}
    found: dict[str, _Member] = {}
    for split, name in BOX_FILES.items():
        places = (layout.root + (BOX_FOLDER, name), layout.root + (name,))
        matches = [member for member in kept if member.parts in places]
        if len({member.parts for member in matches}) > 1:
            raise InputError(f"{archive}: two face-box files for {split}/: "
                             f"{', '.join(sorted(m.name for m in matches))}; keep one")
        if matches:
            found[split] = matches[-1]  # a tar member stored twice: the later one wins, as on extraction
    return found


def square_box(box: tuple[int, int, int, int], width: int, height: int,
               scale: float = BOX_SCALE) -> tuple[int, int, int, int] | None:
    """The cut for a loose face box ``(x, y, w, h)``: ``(left, top, right, bottom)`` pixels, or None.

    The square of side s = round(scale * max(w, h)) centred on the box's centre
    (left = round(x + (w - s) / 2), top = round(y + (h - s) / 2), Python's
    rounding), clipped to the `width` x `height` image; None when nothing of it
    is inside the image. The result is not square where the square was clipped.
    """
    x, y, w, h = box
    side = round(scale * max(w, h))
    left, top = round(x + (w - side) / 2), round(y + (h - side) / 2)
    cut = (max(left, 0), max(top, 0), min(left + side, width), min(top + side, height))
    return cut if cut[0] < cut[2] and cut[1] < cut[3] else None


def _read_boxes(stream, where: str) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
    """(NAME_ID, (x, y, w, h)) of each row of a loose-box csv read from the binary `stream`.

    The file is read a block of lines at a time (`_line_blocks`): memory does not
    grow with it. A line longer than `_MAX_BOX_LINE` characters, a coordinate
    beyond ``±MAX_BOX_COORDINATE`` or any other malformed row raises InputError
    naming the line. NAME_IDs come back in Unicode NFC, as extract names images.
    """
    before = 0          # lines in the blocks already read
    header = None
    try:
        for lines in _line_blocks(stream, where):
            rows = csv.reader(lines)
            if header is None:
                header = next(rows, [])
                if tuple(field.strip() for field in header) != BOX_COLUMNS:
                    raise InputError(f"{where}: header {','.join(header)[:200]!r}, "
                                     f"expected {','.join(BOX_COLUMNS)!r}")
            for row in rows:
                if not row or row == [""]:
                    continue
                try:
                    name_id, x, y, w, h = row
                    box = (int(x), int(y), int(w), int(h))   # int() ignores surrounding blanks
                except ValueError:
                    raise InputError(f"{where}, line {before + rows.line_num}: expected NAME_ID and four "
                                     f"integers X,Y,W,H, got {','.join(row)[:200]!r}") from None
                if min(box) < -MAX_BOX_COORDINATE or max(box) > MAX_BOX_COORDINATE:
                    raise InputError(f"{where}, line {before + rows.line_num}: a box coordinate is out of "
                                     f"range (X, Y, W and H must lie within ±{MAX_BOX_COORDINATE:,}, the "
                                     f"most pixels an accepted image has), got {','.join(row)[:200]!r}")
                name_id = name_id.strip()
                if box[2] < 1 or box[3] < 1 or not name_id:
                    raise InputError(f"{where}, line {before + rows.line_num}: a box needs a NAME_ID and "
                                     f"W, H >= 1, got {','.join(row)!r}")
                yield _nfc(name_id), box
            before += rows.line_num
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{where}: not a readable csv file ({exc})") from None
    if header is None:
        raise InputError(f"{where}: header '', expected {','.join(BOX_COLUMNS)!r}")


def _line_blocks(stream, where: str, block_bytes: int = 1 << 20) -> Iterator[list[str]]:
    """The UTF-8 text of `stream` (a leading BOM dropped) as lists of whole lines without their
    newline, about `block_bytes` at a time. A line longer than `_MAX_BOX_LINE` raises InputError:
    a file that is one long line would otherwise be held in memory whole."""
    rest = b""
    number = 0          # lines in the blocks already yielded
    encoding = "utf-8-sig"
    while block := stream.read(block_bytes):
        data = rest + block
        cut = data.rfind(b"\n") + 1          # a newline byte is never part of a UTF-8 character
        rest = data[cut:]
        lines = data[:cut].decode(encoding).split("\n")[:-1] if cut else []
        if cut:
            encoding = "utf-8"
        long = len(lines) if len(rest) > _MAX_BOX_LINE else None
        if lines and max(map(len, lines)) > _MAX_BOX_LINE:
            long = next(i for i, line in enumerate(lines) if len(line) > _MAX_BOX_LINE)
        if long is not None:
            raise InputError(f"{where}, line {number + long + 1}: longer than {_MAX_BOX_LINE:,} "
                             f"characters; not a face-box file")
        number += len(lines)
        if lines:
            yield lines
    if rest:
        yield [rest.decode(encoding)]


def _attach_boxes(source: "_Source", archive: Path, box_files: dict[str, _Member],
                  candidates: list[_Candidate], budget: "_Budget") -> tuple[list[_Candidate], int]:
    """`candidates` with the box of each image its split's csv has; also the number of csv rows.

    A row names an image as ``<identity>/<file name without suffix>``; rows of
    images the archive does not hold are ignored, an image given two boxes
    refuses the file. Each file is streamed (`_Source.open`), under the same
    caps as every member: at most `MAX_BOX_FILE_BYTES`, and a zip member's
    inflated size counts against the expansion `budget`.
    """
    index = {(cand.split, cand.file.rsplit(".", 1)[0]): i for i, cand in enumerate(candidates)}
    boxes: dict[int, tuple] = {}
    rows = 0
    for split, member in sorted(box_files.items()):
        where = f"{archive}: {member.name}"
        if member.problem:
            raise InputError(f"{where}: cannot read the face-box file ({member.problem})")
        if member.size > MAX_BOX_FILE_BYTES:
            raise InputError(f"{where}: face-box file of {member.size:,} bytes, more than the limit "
                             f"of {MAX_BOX_FILE_BYTES:,} (VGGFace2's largest is about 100 MB)")
        if source.fmt == "zip":
            budget.spend(member.size, f"the face-box file {member.name}")
        with source.open(member) as stream:
            for name_id, box in _read_boxes(stream, where):
                rows += 1
                i = index.get((split, name_id))
                if i is None:
                    continue
                if i in boxes:
                    raise InputError(f"{where}: {name_id!r} has two boxes; keep one")
                boxes[i] = box
    log.info("%s: %d face boxes in %s, %d of them for images in the archive", archive, rows,
             ", ".join(m.name for m in box_files.values()), len(boxes))
    return [cand._replace(box=boxes[i]) if i in boxes else cand for i, cand in enumerate(candidates)], rows


def _layout_summary(layout: Layout, stored: collections.Counter, candidates: list[_Candidate],
                    box_files: dict[str, _Member], boxes: collections.Counter) -> dict:
    """dataset.json's ``layout``: ``{"name", "root", "evidence"}``; vggface2 adds

    ``"splits": {split: {"identities", "images"}}`` (stored, per split folder)
    and ``"boxes"``: None without a box file, else ``{"files", "rows", "scale",
    "applied", "without_box", "outside_image"}`` (member names, csv rows,
    `BOX_SCALE`, and stored images cut to their box, without a box, and
    with a box that misses the image; the last two are stored uncut).
    `stored` counts the stored images per identity.
    """
    out = {"name": layout.name, "root": layout.root_name, "evidence": layout.evidence}
    if layout.name != "vggface2":
        return out
    split_of = {cand.identity: cand.split for cand in candidates}
    images, identities = collections.Counter(), collections.Counter()
    for name, count in stored.items():
        images[split_of[name]] += count
        identities[split_of[name]] += 1
    out["splits"] = {split: {"identities": identities[split], "images": images[split]}
                     for split in layout.splits}
    out["boxes"] = None if not box_files else {
        "files": sorted(member.name for member in box_files.values()), "rows": boxes["rows"],
        "scale": BOX_SCALE, "applied": boxes["applied"], "without_box": boxes["without_box"],
        "outside_image": boxes["outside_image"]}
    return out


# --------------------------------------------------------------------------- decoding

class _Source:
    """Reads member bytes: by offset from an uncompressed tar, by index from a zip."""

    def __init__(self, fmt: str, path: str):
        self.fmt, self.path = fmt, path
        self._fd: int | None = None
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, member: _Member) -> tuple[bytes | None, str]:
        """(bytes, "") or (None, reason to skip the member)."""
        if self.fmt == "tar":
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            data = os.pread(self._fd, member.size, member.locator)
            if len(data) != member.size:
                raise InputError(f"{self.path}: truncated archive at member {member.name!r}")
            return data, ""
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
            self._infos = self._zip.infolist()
        try:
            return self._zip.read(self._infos[member.locator]), ""
        except NotImplementedError as exc:
            return None, f"unsupported zip compression ({exc})"
        except OSError as exc:
            if exc.errno is not None:
                raise  # reading the archive failed: not the member's fault
            bad = exc  # bz2 reports bad data as OSError without an errno
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError) as exc:
            bad = exc
        raise InputError(f"{self.path}: corrupt zip member {member.name!r} "
                         f"({type(bad).__name__}: {bad})") from bad

    @contextlib.contextmanager
    def open(self, member: _Member) -> Iterator[io.BufferedIOBase]:
        """A binary stream over the member's bytes, read a block at a time (memory stays bounded).

        A corrupt zip member raises InputError naming it, whenever the damage is found.
        """
        if self.fmt == "tar":
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            with io.BufferedReader(_TarMemberReader(self._fd, member, self.path), 1 << 20) as stream:
                yield stream
            return
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
            self._infos = self._zip.infolist()
        try:
            with self._zip.open(self._infos[member.locator]) as stream:
                yield stream
        except NotImplementedError as exc:
            raise InputError(f"{self.path}: cannot read zip member {member.name!r} ({exc})") from None
        except OSError as exc:
            if exc.errno is not None:
                raise  # reading the archive failed: not the member's fault
            raise self._corrupt(member, exc) from exc
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError) as exc:
            raise self._corrupt(member, exc) from exc

    def _corrupt(self, member: _Member, exc: BaseException) -> InputError:
        return InputError(f"{self.path}: corrupt zip member {member.name!r} ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None


class _TarMemberReader(io.RawIOBase):
    """Raw reads of one member's bytes from an uncompressed tar, by offset (no shared file position)."""

    def __init__(self, fd: int, member: _Member, path: str):
        self._fd, self._member, self._path = fd, member, path
        self._pos, self._end = member.locator, member.locator + member.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._end - self._pos)
        if count <= 0:
            return 0
        data = os.pread(self._fd, count, self._pos)
        if not data:
            raise InputError(f"{self._path}: truncated archive at member {self._member.name!r}")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class ImageCheck(NamedTuple):
    """What decoding one file found."""
    reason: str = ""             # why the file is skipped; "" for a usable image
    width: int = 0               # of the stored image (the cut, when `crop` is set)
    height: int = 0
    encoded: bytes | None = None   # bytes to store instead of the original ones (PNG, or a cut JPEG)
    converted_from: str = ""     # the original format, when it was re-encoded as PNG
    crop: tuple[int, int, int, int] | None = None   # (left, top, right, bottom) cut out of the original


def check_image(data: bytes, box: tuple[int, int, int, int] | None = None) -> ImageCheck:
    """Fully decode `data` with Pillow; re-encode it as PNG unless TensorFlow reads it as it is.

    Grey or RGB JPEG and PNG keep their bytes (`encoded` is None); other formats
    (`IMAGE_FORMATS`) come back as PNG in the same mode when PNG has it
    (`_PNG_MODES`), else as RGB, the pixels TensorFlow would decode. With a
    loose face `box` (x, y, w, h) the image is cut to `square_box` (unless that
    misses the image) and re-encoded: a JPEG as grey or RGB JPEG of quality
    `BOX_JPEG_QUALITY`, any other format as PNG as above. A file that is not a
    valid image, or whose size (or the cut's) is outside `image_limits.size_problem`'s
    limits, gets a `reason`; any other error (no memory, an I/O error, a bug)
    propagates. The size is checked from the header, before decoding.
    """
    if not data:
        return ImageCheck("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        # open() only parses the header, which gives the size: an image of the wrong size is
        # refused before its pixels are decoded; load() finds truncated/corrupt data.
        problem = size_problem(*img.size)
        if not problem:
            img.load()
    except Image.UnidentifiedImageError:
        return ImageCheck(f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})")
    except Image.DecompressionBombError as exc:
        return ImageCheck(f"{TOO_LARGE} ({exc})")
    except OSError as exc:
        if exc.errno is not None:
            raise
        return ImageCheck(f"undecodable or truncated image ({type(exc).__name__}: {exc})")
    except _BAD_IMAGE_ERRORS as exc:
        return ImageCheck(f"undecodable or truncated image ({type(exc).__name__}: {exc})")
    with img:
        if problem:
            return ImageCheck(problem)
        crop = None if box is None else square_box(box, *img.size)
        if crop is not None:
            if problem := size_problem(crop[2] - crop[0], crop[3] - crop[1]):
                return ImageCheck(f"{problem} once cut to its face box "
                                  f"(X,Y,W,H = {','.join(map(str, box))})")
            return _cut(img, crop)
        kept = _KEPT.get(img.format, ())
        if kept is None or img.mode in kept:
            return ImageCheck("", *img.size)
        buf = io.BytesIO()
        (img if img.mode in _PNG_MODES else img.convert("RGB")).save(buf, "PNG")
        return ImageCheck("", *img.size, buf.getvalue(), img.format)


def _cut(img: Image.Image, crop: tuple[int, int, int, int]) -> ImageCheck:
    """`img` cut to `crop`, re-encoded as `check_image` describes."""
    part = img.crop(crop)
    buf = io.BytesIO()
    if img.format in ("JPEG", "MPO"):
        (part if part.mode in ("L", "RGB") else part.convert("RGB")).save(
            buf, "JPEG", quality=BOX_JPEG_QUALITY)
        converted_from = ""
    else:
        (part if part.mode in _PNG_MODES else part.convert("RGB")).save(buf, "PNG")
        converted_from = "" if img.format == "PNG" else img.format
    return ImageCheck("", part.width, part.height, buf.getvalue(), converted_from, crop)


def _decode_members(source: _Source, items: list[tuple[_Member, tuple | None]]
                    ) -> list[tuple[bytes | None, ImageCheck]]:
    """(original bytes or None, ImageCheck) per (member, face box or None).

    Original bytes come back only for valid, kept zip images: a tar member is
    cheaper to re-read by offset than to pickle between processes, a zip member
    would be inflated twice. An unexpected error names the member.
    """
    results = []
    with warnings.catch_warnings():
        # Pillow warns on opening an image over its own limit; check_image refuses it anyway.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for member, box in items:
            try:
                data, reason = source.read(member)
                check = ImageCheck(reason) if reason else check_image(data, box)
            except Exception as exc:
                exc.add_note(f"while checking archive member {member.name!r} of {source.path}")
                raise
            keep = not check.reason and check.encoded is None and source.fmt == "zip"
            results.append((data if keep else None, check))
    return results


_worker_source: _Source | None = None


def _init_worker(fmt: str, path: str, parent: int) -> None:
    global _worker_source
    become_child(parent)
    _worker_source = _Source(fmt, path)


def _decode_chunk(items: list[tuple[_Member, tuple | None]]) -> list[tuple]:
    return _decode_members(_worker_source, items)


def _chunks(candidates: list[_Candidate]) -> Iterator[list[_Candidate]]:
    chunk, nbytes = [], 0
    for cand in candidates:
        if chunk and (len(chunk) >= _CHUNK_IMAGES or nbytes + cand.member.size > _CHUNK_BYTES):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(cand)
        nbytes += cand.member.size
    if chunk:
        yield chunk


def _decode_all(fmt: str, source_path: Path, candidates: list[_Candidate],
                workers: int) -> Iterator[tuple[_Candidate, tuple[bytes | None, ImageCheck]]]:
    """Yield (candidate, (original bytes or None, ImageCheck)) in candidate order.

    Uses min(workers, number of chunks) processes; one decodes in this process.
    Closing the generator early (an error, a signal) cancels the queued chunks.
    """
    chunks = list(_chunks(candidates))
    workers = min(workers, len(chunks))
    with Progress("decode images", total=len(candidates), unit="images") as progress:
        if workers == 1:
            with _Source(fmt, str(source_path)) as source:
                for chunk in chunks:
                    results = _decode_members(source, [(cand.member, cand.box) for cand in chunk])
                    progress.update(len(chunk))
                    yield from zip(chunk, results)
            return
        todo = iter(chunks)
        pool = ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=_init_worker,
                                   initargs=(fmt, str(source_path), os.getpid()))
        try:
            # A fixed window of tasks in flight keeps memory bounded and order intact.
            pending: collections.deque[tuple[list[_Candidate], Future]] = collections.deque()

            def submit() -> None:
                chunk = next(todo, None)
                if chunk is not None:
                    pending.append((chunk, pool.submit(_decode_chunk, [(c.member, c.box) for c in chunk])))

            for _ in range(2 * workers):
                submit()
            while pending:
                chunk, future = pending.popleft()
                results = future.result()
                submit()
                progress.update(len(chunk))
                yield from zip(chunk, results)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
