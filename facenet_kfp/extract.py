"""Step 2: check an LFW-style archive member by member and pack its valid images into shards.

The archive (tar, optionally gzip/bzip2/xz-compressed, or zip; detected by
content, not by name) is never unpacked onto the file system:

1. A compressed tar is decompressed once into a scratch file so members can be
   read by byte offset (and in any order) without decompressing twice.
2. The whole member list is checked before anything is written: an absolute
   path, a ``..`` component, a link, a device or a fifo refuses the archive.
3. The image root is found (``lfw/``, ``lfw-deepfunneled/``, ``lfw-funneled/``,
   another single top folder holding identity folders, or identity folders at
   the top) and every file becomes a candidate ``<root>/<identity>/<file>`` or
   is skipped with a reason (junk, wrong depth, too large, ...).
4. Candidates, sorted by identity then file name, are fully decoded with
   Pillow in a process pool; worker processes read their own bytes from the
   archive, so only valid images travel back. The original bytes (never
   re-encoded) go into tar shards through `ShardWriter`.

Memory stays bounded: at most ``2 * workers`` chunks of at most
`_CHUNK_BYTES` each are in flight.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import logging
import lzma
import multiprocessing
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir, write_json
from facenet_kfp.progress import Progress
from facenet_kfp.shards import ShardWriter, shard_files

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
# Top folders of the published LFW variants, preferred when several top folders exist.
KNOWN_ROOTS = ("lfw", "lfw-deepfunneled", "lfw-funneled")
# Formats tf.io.decode_image reads: anything else would fail later, inside training.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
# No face image is this large (LFW's are ~15 KB); refusing bigger members bounds memory.
MAX_IMAGE_BYTES = 64 << 20
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

_CHUNK_IMAGES = 32          # images per task sent to a worker
_CHUNK_BYTES = 8 << 20      # ... or fewer, so a chunk holds at most ~8 MB
_COMPRESSED_TAR_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class _Member:
    """One regular file of the archive: its name, where its bytes are and how many."""
    name: str          # the name as stored in the archive (reported when skipped)
    parts: tuple       # path components without "" and "." parts
    locator: int       # tar: byte offset of the data; zip: index in infolist()
    size: int          # uncompressed size in bytes
    problem: str = ""  # non-empty: skip the member with this reason (sparse, encrypted)


@dataclass(frozen=True)
class _Candidate:
    member: _Member
    identity: str
    file: str          # "<identity>/<file name>", the manifest's `file`


# --------------------------------------------------------------------------- public API

def extract_dataset(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                    shard_size_mb: int = 64, workers: int | None = None) -> dict:
    """Pack the valid images of `archive` into a sharded dataset at `out_dir`.

    Args:
        archive: a .tar, .tar.gz/.tgz (also bzip2/xz) or .zip file, detected by content.
        out_dir: output folder, replaced atomically; gets ``manifest.jsonl``,
            ``shards/images-NNNNN.tar`` (about `shard_size_mb` MiB each) and
            ``dataset.json`` (the returned summary).
        shard_size_mb: target shard size in MiB (>= 1).
        workers: decoding processes; None uses every CPU this process may run on,
            1 decodes in this process.

    Returns:
        ``{"images", "identities", "image_root", "shards", "skipped", "format"}``:
        counts of stored images and identities, the image root inside the
        archive ("." when identity folders are at the top), the number of
        shard files, ``[{"member", "reason"}, ...]`` sorted by member name,
        and "tar" or "zip".

    Manifest rows are ``{identity, file: "<identity>/<name>", synthetic: False,
    width, height, shard, offset, size}``, sorted by identity then file name.

    Raises:
        InputError: the archive is missing, not a tar/zip, corrupt, empty, has
            an unsafe member (named in the message), or no valid image.
    """
    archive = Path(archive)
    out_dir = Path(out_dir)
    if isinstance(shard_size_mb, bool) or not isinstance(shard_size_mb, int) or shard_size_mb < 1:
        raise InputError(f"shard_size_mb must be an integer >= 1, got {shard_size_mb!r}")
    if workers is None:
        workers = _available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be an integer >= 1 or None, got {workers!r}")
    if not archive.is_file():
        raise InputError(f"{archive}: archive not found")

    fmt, opener = _detect_format(archive)
    with tempfile.TemporaryDirectory(prefix="facenet-extract-") as scratch:
        source = archive
        if opener is not None:
            source = Path(scratch) / "archive.tar"
            _decompress(archive, opener, source)
        members, skipped = _scan_tar(source, archive) if fmt == "tar" else _scan_zip(archive)
        root, candidates = _plan(members, skipped, archive)
        log.info("%s: image root %r, %d candidate images in %d identity folders", archive, root,
                 len(candidates), len({c.identity for c in candidates}))

        with atomic_dir(out_dir) as tmp:
            with ShardWriter(tmp, max_shard_bytes=shard_size_mb << 20) as writer:
                for cand, (data, reason, width, height) in _decode_all(fmt, source, candidates, workers):
                    if reason:
                        _skip(skipped, cand.member.name, reason)
                    else:
                        writer.add(cand.identity, cand.file, data, synthetic=False,
                                   width=width, height=height)
            rows = writer.records
            if not rows:
                raise InputError(f"{archive}: no identity has a valid image "
                                 f"({len(skipped)} files skipped, e.g. {skipped[0]['member']}: "
                                 f"{skipped[0]['reason']})")
            summary = {
                "images": len(rows),
                "identities": len({row["identity"] for row in rows}),
                "image_root": root,
                "shards": len(shard_files(tmp)),
                "skipped": sorted(skipped, key=lambda item: item["member"]),
                "format": fmt,
            }
            write_json(tmp / DATASET_JSON, summary)
    log.info("%s: %d images of %d identities in %d shards, %d files skipped", out_dir,
             summary["images"], summary["identities"], summary["shards"], len(skipped))
    return summary


# --------------------------------------------------------------------------- archive reading

def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _detect_format(archive: Path):
    """Return ("tar", decompressor or None) or ("zip", None) from the file's content."""
    with open(archive, "rb") as handle:
        magic = handle.read(8)
    if not magic:
        raise InputError(f"{archive}: archive is empty (0 bytes)")
    if tarfile.is_tarfile(archive):
        opener = next((op for prefix, op in _COMPRESSED_TAR_MAGIC if magic.startswith(prefix)), None)
        return "tar", opener
    if zipfile.is_zipfile(archive):
        return "zip", None
    raise InputError(f"{archive}: not a tar (plain, gzip, bzip2 or xz) or zip archive")


def _decompress(archive: Path, opener, target: Path) -> None:
    """Decompress a compressed tar into `target` so members can be read by offset."""
    try:
        with opener(archive, "rb") as src, open(target, "wb") as dst, \
                Progress(f"decompress {archive.name}", unit="MB", scale=1 << 20) as progress:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                progress.update(len(chunk))
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise InputError(f"{archive}: corrupt or truncated compressed archive ({exc})") from exc


def _unsafe_name(name: str) -> str:
    """Why extracting a member with this name could escape the output folder ("" if safe)."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    return ""


def _parts(name: str) -> tuple:
    return tuple(part for part in name.split("/") if part not in ("", "."))


def _scan_tar(path: Path, archive: Path) -> tuple[list[_Member], list[dict]]:
    """Check every member of a plain tar; refuse the archive on the first unsafe one."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            infos = tar.getmembers()
    except tarfile.TarError as exc:
        raise InputError(f"{archive}: corrupt tar archive ({exc})") from exc
    if not infos:
        raise InputError(f"{archive}: archive is empty (no members)")
    members, skipped = [], []
    for info in infos:
        why = _unsafe_name(info.name)
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
            raise InputError(f"{archive}: refusing the whole archive: member {info.name!r} is unsafe ({why})")
        if info.isdir():
            continue
        if info.offset_data + info.size > size:
            raise InputError(f"{archive}: truncated archive: member {info.name!r} extends past the end")
        problem = "sparse tar member (not supported)" if info.issparse() else ""
        members.append(_Member(info.name, _parts(info.name), info.offset_data, info.size, problem))
    return members, skipped


def _scan_zip(archive: Path) -> tuple[list[_Member], list[dict]]:
    """Check every member of a zip; refuse the archive on the first unsafe one."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{archive}: corrupt zip archive ({exc})") from exc
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
    return members, []


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


def _find_root(paths: list[tuple]) -> tuple:
    """The image root as path components; () when identity folders are at the top.

    A known LFW top folder wins; otherwise a single top folder is the root when it
    holds files two levels down (``T/<identity>/<file>``).
    """
    tops = {parts[0] for parts in paths if len(parts) >= 2}
    known = [name for name in KNOWN_ROOTS if name in tops]
    if len(known) > 1:
        raise InputError(f"several image roots in one archive: {', '.join(known)}; "
                         f"repack it with one of them")
    if known:
        return (known[0],)
    if len(tops) == 1 and any(len(parts) >= 3 for parts in paths):
        return (next(iter(tops)),)
    return ()


def _skip(skipped: list[dict], member: str, reason: str) -> None:
    level = logging.INFO if reason.startswith("junk") else logging.WARNING
    log.log(level, "skipping %s: %s", member, reason)
    skipped.append({"member": member, "reason": reason})


def _plan(members: list[_Member], skipped: list[dict], archive: Path) -> tuple[str, list[_Candidate]]:
    """Choose the image root and the candidate images, sorted by identity then file name."""
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
        root = _find_root([member.parts for member in kept])
    except InputError as exc:
        raise InputError(f"{archive}: {exc}") from exc
    root_text = "/".join(root) + "/" if root else ""
    depth = len(root) + 2

    by_file: dict[str, _Candidate] = {}
    for member in kept:
        parts = member.parts
        if parts[:len(root)] != root:
            _skip(skipped, member.name, f"outside the image root {root_text!r}")
        elif len(parts) != depth:
            _skip(skipped, member.name, f"not directly inside an identity folder "
                                        f"(expected {root_text}<identity>/<file>)")
        elif _CONTROL.search(parts[-2]) or _CONTROL.search(parts[-1]):
            _skip(skipped, member.name, "control character (tab, newline, ...) in the name")
        elif member.problem:
            _skip(skipped, member.name, member.problem)
        elif member.size > MAX_IMAGE_BYTES:
            _skip(skipped, member.name, f"too large for an image ({member.size:,} bytes, "
                                        f"limit {MAX_IMAGE_BYTES:,})")
        else:
            file = f"{parts[-2]}/{parts[-1]}"
            earlier = by_file.get(file)
            if earlier is not None:
                # Extracting would let the later member overwrite the earlier one: do the same.
                _skip(skipped, earlier.member.name, "replaced by a later member with the same name")
            by_file[file] = _Candidate(member, parts[-2], file)
    candidates = sorted(by_file.values(), key=lambda cand: (cand.identity, cand.file))
    if not candidates:
        raise InputError(f"{archive}: no identity has a valid image: no file matches "
                         f"{root_text}<identity>/<file> ({len(skipped)} files skipped)")
    return (root_text.rstrip("/") or "."), candidates


# --------------------------------------------------------------------------- decoding

class _Source:
    """Reads member bytes: by offset from a plain tar, by index from a zip."""

    def __init__(self, fmt: str, path: str):
        self.fmt, self.path = fmt, path
        if fmt == "tar":
            self._fd = os.open(path, os.O_RDONLY)
        else:
            self._zip = zipfile.ZipFile(path)
            self._infos = self._zip.infolist()

    def read(self, member: _Member) -> tuple[bytes | None, str]:
        """(bytes, "") or (None, reason to skip the member)."""
        if self.fmt == "tar":
            data = os.pread(self._fd, member.size, member.locator)
            if len(data) != member.size:
                raise InputError(f"{self.path}: truncated archive at member {member.name!r}")
            return data, ""
        try:
            return self._zip.read(self._infos[member.locator]), ""
        except NotImplementedError as exc:
            return None, f"unsupported zip compression ({exc})"
        except zipfile.BadZipFile as exc:
            raise InputError(f"{self.path}: corrupt zip member {member.name!r} ({exc})") from exc

    def close(self) -> None:
        if self.fmt == "tar":
            os.close(self._fd)
        else:
            self._zip.close()


def check_image(data: bytes) -> tuple[str, int, int]:
    """Fully decode `data` with Pillow: ("", width, height) if valid, else (reason, 0, 0)."""
    if not data:
        return "empty file (0 bytes)", 0, 0
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.load()  # open() only parses the header; load() finds truncated/corrupt data
            width, height = img.size
    except Image.UnidentifiedImageError:
        return f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})", 0, 0
    except Image.DecompressionBombError as exc:
        return f"too many pixels ({exc})", 0, 0
    # Pillow's decoders report corrupt data as OSError, SyntaxError, ValueError,
    # EOFError and more; whatever the type, the file is skipped and the reason kept.
    except Exception as exc:  # noqa: BLE001
        return f"undecodable or truncated image ({type(exc).__name__}: {exc})", 0, 0
    return "", width, height


def _decode_members(source: _Source, members: list[_Member]) -> list[tuple]:
    """(bytes or None, reason, width, height) per member; bytes only for valid images."""
    results = []
    for member in members:
        data, reason = source.read(member)
        width = height = 0
        if not reason:
            reason, width, height = check_image(data)
        results.append((None if reason else data, reason, width, height))
    return results


_worker_source: _Source | None = None


def _init_worker(fmt: str, path: str) -> None:
    global _worker_source
    _worker_source = _Source(fmt, path)


def _decode_chunk(members: list[_Member]) -> list[tuple]:
    return _decode_members(_worker_source, members)


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


def _mp_context():
    # forkserver: workers fork from a clean server, not from a caller that may
    # hold TensorFlow threads (e.g. a test session); spawn where it is missing.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _decode_all(fmt: str, source_path: Path, candidates: list[_Candidate],
                workers: int) -> Iterator[tuple[_Candidate, tuple]]:
    """Yield (candidate, (bytes, reason, width, height)) in candidate order."""
    with Progress("decode images", total=len(candidates), unit="images") as progress:
        if workers == 1:
            source = _Source(fmt, str(source_path))
            try:
                for chunk in _chunks(candidates):
                    results = _decode_members(source, [cand.member for cand in chunk])
                    progress.update(len(chunk))
                    yield from zip(chunk, results)
            finally:
                source.close()
            return
        chunks = _chunks(candidates)
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                                 initargs=(fmt, str(source_path))) as pool:
            # A fixed window of tasks in flight keeps memory bounded and order intact.
            pending: collections.deque[tuple[list[_Candidate], Future]] = collections.deque()

            def submit() -> None:
                chunk = next(chunks, None)
                if chunk is not None:
                    pending.append((chunk, pool.submit(_decode_chunk, [c.member for c in chunk])))

            for _ in range(2 * workers):
                submit()
            while pending:
                chunk, future = pending.popleft()
                results = future.result()
                submit()
                progress.update(len(chunk))
                yield from zip(chunk, results)
