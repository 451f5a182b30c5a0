"""Decoding candidate images with Pillow in a process pool: which are valid, and what bytes each stores.

Candidates, sorted by identity then file name, are fully decoded with
Pillow in a process pool; each worker reads its own bytes from the archive.
For a tar only (reason, width, height) comes back and this process re-reads
the bytes of valid images by offset (cheaper than pickling them); zip
members are inflated once, in the worker, and sent back. Which files are
images, and which are stored as they are or re-encoded as PNG, is
`facenet_kfp.codec`'s rule. An image cut to its box is re-encoded by the
worker: a JPEG as JPEG (quality `BOX_JPEG_QUALITY`), anything else as PNG.
"""

from __future__ import annotations

import collections
import contextlib
import io
import lzma
import os
import zipfile
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

from PIL import Image

from facenet_kfp.codec import DAMAGED as _DAMAGED  # noqa: F401 (re-exported to facenet_kfp.extract)
from facenet_kfp.codec import IMAGE_FORMATS  # noqa: F401 (re-exported to facenet_kfp.extract)
from facenet_kfp.codec import UnusableImage, encode_jpeg, encode_png, open_image, reencoded, size_problem
from facenet_kfp.errors import InputError
from facenet_kfp.extract.archive import _Member
from facenet_kfp.extract.boxes import BOX_JPEG_QUALITY, square_box
from facenet_kfp.extract.layout import _Candidate
from facenet_kfp.progress import Progress
from facenet_kfp.workers import become_child, mp_context

_CHUNK_IMAGES = 32          # images per task sent to a worker
_CHUNK_BYTES = 8 << 20      # ... or fewer, so a chunk holds at most ~8 MB


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
    """Fully decode `data` (`codec.open_image`); re-encode it as PNG unless it is stored as it is.

    A file the codec refuses gets its `reason`; any other error (no memory, an
    I/O error, a bug) propagates. An accepted image keeps its bytes
    (`encoded` is None) or comes back as the codec's lossless PNG
    (`codec.reencoded`). With a loose face `box` (x, y, w, h) the image is cut
    to `square_box` (unless that misses the image) and re-encoded: a JPEG as
    grey or RGB JPEG of quality `BOX_JPEG_QUALITY`, any other format as PNG.
    A cut outside `codec.size_problem`'s limits gets a `reason` too.
    """
    try:
        img = open_image(data)
    except UnusableImage as exc:
        return ImageCheck(exc.reason)
    with img:
        crop = None if box is None else square_box(box, *img.size)
        if crop is not None:
            if problem := size_problem(crop[2] - crop[0], crop[3] - crop[1]):
                return ImageCheck(f"{problem} once cut to its face box "
                                  f"(X,Y,W,H = {','.join(map(str, box))})")
            return _cut(img, crop)
        encoded = reencoded(img)
        return ImageCheck("", *img.size, encoded, "" if encoded is None else img.format)


def _cut(img: Image.Image, crop: tuple[int, int, int, int]) -> ImageCheck:
    """`img` cut to `crop`, re-encoded as `check_image` describes."""
    part = img.crop(crop)
    if img.format in ("JPEG", "MPO"):
        encoded, converted_from = encode_jpeg(part, BOX_JPEG_QUALITY), ""
    else:
        encoded, converted_from = encode_png(part), "" if img.format == "PNG" else img.format
    return ImageCheck("", part.width, part.height, encoded, converted_from, crop)


def _decode_members(source: _Source, items: list[tuple[_Member, tuple | None]]
                    ) -> list[tuple[bytes | None, ImageCheck]]:
    """(original bytes or None, ImageCheck) per (member, face box or None).

    Original bytes come back only for valid, kept zip images: a tar member is
    cheaper to re-read by offset than to pickle between processes, a zip member
    would be inflated twice. An unexpected error names the member.
    """
    results = []
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
