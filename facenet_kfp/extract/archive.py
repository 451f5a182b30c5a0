"""Reading an archive in place: its format, a compressed tar's scratch copy, and its checked member list.

1. A compressed tar is decompressed once, by a child process, into a scratch
   file, so members can later be read by byte offset in any order. The tar
   headers are parsed while that file grows (the parser waits for bytes), so
   decompression and the safety scan run on two cores at once.
2. The whole member list is checked before anything is written: an absolute
   path, a ``..`` component, a link, a device or a fifo refuses the archive.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

from isal import igzip, isal_zlib

from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.progress import Progress
from facenet_kfp.workers import become_child, mp_context

if TYPE_CHECKING:
    from facenet_kfp.extract import _Budget

# One logger for the whole step: log lines name facenet_kfp.extract, whichever module writes them.
log = logging.getLogger(__package__)

SCRATCH_PREFIX = "facenet-extract-"
_DECOMPRESS_CHUNK = 1 << 20   # bytes per progress message from the decompressing child
# gzip through ISA-L (isal): the same format and checks as the gzip module at about 1.7x the speed, which
# matters because a .tgz is decompressed in full before its images can be decoded.
_CODECS = {"gzip": igzip.open, "bzip2": bz2.open, "xz": lzma.open}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Member(NamedTuple):
    """One regular file of the archive: its name, where its bytes are and how many."""
    name: str          # the name as stored in the archive (reported when skipped)
    parts: tuple       # path components without "" and "." parts
    locator: int       # tar: byte offset of the data; zip: index in infolist()
    size: int          # uncompressed size in bytes
    problem: str = ""  # non-empty: skip the member with this reason (sparse, encrypted)


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


def _nfc(name: str) -> str:
    """`name` in Unicode NFC, the form names are compared and stored in (macOS writes "José" as NFD)."""
    return name if name.isascii() else unicodedata.normalize("NFC", name)
