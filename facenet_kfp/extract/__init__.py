"""Step 2: check a face dataset archive member by member and pack its valid images into shards.

The archive (tar, optionally gzip/bzip2/xz-compressed, or zip; detected by
content, not by name) is never unpacked onto the file system:

1. The archive is read in place and its whole member list checked before
   anything is written (`facenet_kfp.extract.archive`).
2. The layout is detected from the file paths and every file becomes a
   candidate ``<identity>/<file>`` or is skipped with a reason
   (`facenet_kfp.extract.layout`); VGGFace2 images are cut to their face
   boxes (`facenet_kfp.extract.boxes`).
3. Candidates are fully decoded with Pillow in a process pool
   (`facenet_kfp.extract.images`) and the valid ones packed into shards.

Only errors that say "this file is not a valid image" skip an image; so does
a size outside `facenet_kfp.codec`'s limits (a side under ``MIN_IMAGE_SIDE``,
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

import collections
import contextlib
import logging
import math
import os
import tarfile
import tempfile
from pathlib import Path

from facenet_kfp.config import DataConfig
from facenet_kfp.errors import InputError
from facenet_kfp.extract.archive import (SCRATCH_PREFIX, _detect_format, _GrowingTar, _scan_tar, _scan_zip,
                                         _scratch_dir)
from facenet_kfp.extract.boxes import (BOX_COLUMNS, BOX_FILES, BOX_FOLDER, BOX_JPEG_QUALITY, BOX_SCALE,
                                       MAX_BOX_COORDINATE, MAX_BOX_FILE_BYTES, _attach_boxes, _layout_summary,
                                       square_box)
from facenet_kfp.extract.images import IMAGE_FORMATS, _DAMAGED, ImageCheck, _decode_all, _Source, check_image
from facenet_kfp.extract.layout import (CASIA_ROOT, IMAGE_SUFFIXES, JUNK_NAMES, KNOWN_ROOTS, LAYOUTS,
                                        MAX_IMAGE_BYTES, VGGFACE2_SPLITS, Layout, _plan, _skip, detect_layout)
from facenet_kfp.fsutil import atomic_dir, no_space_named, remove_stale_temps, write_json
from facenet_kfp.shards import ShardWriter, shard_files
from facenet_kfp.workers import available_cpus

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
# The least an extraction may always write: tiny archives (tests, demos) need no max_expansion.
MIN_EXPANSION_BYTES = 64 << 20


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
