"""Packed image datasets: images stored in a few uncompressed tar shards plus `manifest.jsonl`.

On a cluster every file of an artifact is one object-storage request in every
step that reads it, so images are never stored one object per file. Layout of a
packed dataset folder::

    manifest.jsonl              one JSON object per image, in shard order
    shards/images-00000.tar     plain tar files; members are "<identity>/<file name>"
    ...

Each manifest row has at least ``identity``, ``file`` (path relative to the
image root, e.g. ``Person/Person_0001.jpg``), ``synthetic`` (bool), ``shard``
(path relative to the dataset folder), ``offset`` and ``size`` (byte range of
the image inside the shard, so a reader seeks instead of scanning the tar).
Steps may add fields (``source`` for generated images, ``width``, ``height``).
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from facenet_kfp.errors import InputError

MANIFEST = "manifest.jsonl"
SHARD_DIR = "shards"
REQUIRED_FIELDS = ("identity", "file", "synthetic", "shard", "offset", "size")


class ShardWriter:
    """Appends images to tar shards of about `max_shard_bytes` each and writes the manifest as it goes.

    Rows go to ``manifest.jsonl`` as they are added, so memory does not grow
    with the images; `images` counts them and `identities` counts them per
    identity. Use inside an `atomic_dir` so a failed step leaves nothing behind::

        with atomic_dir(out) as tmp, ShardWriter(tmp) as writer:
            writer.add("Ann", "Ann/Ann_0001.jpg", jpeg_bytes)
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 64 << 20,
                 prefix: str = "images"):
        if max_shard_bytes <= 0:
            raise InputError(f"shard size must be > 0 bytes, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.images = 0
        self.identities: collections.Counter[str] = collections.Counter()
        self._manifest = open(self.out_dir / MANIFEST, "w", encoding="utf-8")
        self._tar: Any = None
        self._shard_name = ""
        self._shard_bytes = 0
        self._shard_index = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._manifest.close()
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def _open_next(self) -> None:
        self._finish_shard()
        self._shard_name = f"{SHARD_DIR}/{self.prefix}-{self._shard_index:05d}.tar"
        self._shard_index += 1
        self._tar = open(self.out_dir / self._shard_name, "wb")
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        # End of archive: two zero blocks, then padding to a whole record, as tarfile writes.
        self._tar.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        position = self._tar.tell()
        self._tar.write(b"\0" * (-position % tarfile.RECORDSIZE))
        self._tar.close()
        self._tar = None

    def add(self, identity: str, file: str, data: bytes, synthetic: bool = False,
            **fields: Any) -> dict[str, Any]:
        """Store one image's bytes; returns its manifest row.

        `identity` and `file` must be text that UTF-8 can hold: a lone surrogate
        (an undecoded byte of a file name) is refused, as JSON, TensorFlow and
        tar readers elsewhere could not use it.
        """
        for key, text in (("identity", identity), ("file", file)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(f"{self.out_dir}: {key} {text!r} holds bytes that are not text "
                                 f"({exc.reason}); decode the name (e.g. as latin-1) before "
                                 f"storing it") from None
        if self._tar is None or (self._shard_bytes and self._shard_bytes + len(data) > self.max_shard_bytes):
            self._open_next()
        header = _member_header(file, len(data))
        self._tar.write(header)
        offset = self._tar.tell()
        self._tar.write(data)
        self._tar.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        row = {"identity": identity, "file": file, "synthetic": bool(synthetic),
               "shard": self._shard_name, "offset": offset, "size": len(data)}
        row.update(fields)
        self._manifest.write(json.dumps(row, sort_keys=True) + "\n")
        self.images += 1
        self.identities[identity] += 1
        self._shard_bytes += len(data) + len(header)
        return row

    def close(self) -> int:
        """Finish the last shard and `manifest.jsonl`; returns the number of images."""
        self._finish_shard()
        self._manifest.close()
        return self.images


def _member_header(name: str, size: int) -> bytes:
    """Tar header of a regular file (mode 0644, mtime 0, owner 0).

    Short ASCII names get a plain ustar header built here (tarfile's TarInfo.tobuf
    costs ~10x more, which shows at 13k images); anything else goes through
    tarfile's PAX encoder so long and non-ASCII names stay intact.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) >= 100 or not name.isascii() or size >= 8 ** 11:
        info = tarfile.TarInfo(name=name)
        info.size, info.mode = size, 0o644
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(
        encoded.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0"
        + b"%011o\0" % size + b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100
        + b"ustar\x0000" + b"\0" * 32 + b"\0" * 32 + b"\0" * 16)
    header.extend(b"\0" * (tarfile.BLOCKSIZE - len(header)))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def read_manifest(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a packed dataset's manifest; errors name the file, line and key.

    Each row's shard must be a file path inside `dataset_dir` (no absolute
    path, no ``..``, no symbolic link leading out) and its offset and size
    non-negative integers, so a manifest never makes a step read elsewhere.
    A row costs about 1 KB as a dict: where the manifest can be large, use
    `iter_manifest` and keep only what is needed.
    """
    return list(iter_manifest(dataset_dir))


def iter_manifest(dataset_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a packed dataset's manifest one at a time, validated as `read_manifest` does.

    The manifest's absence is reported when the iteration starts; a bad row
    when it is reached, after the rows before it were yielded. Shard paths
    come out as one shared string per shard.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: manifest not found; is {dataset_dir} a packed image dataset?")
    checked: dict[str, str] = {}   # shard -> why it is refused ("" if it is fine)
    shards: dict[str, str] = {}    # one string object per shard path, however many rows name it
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: not a JSON object")
            missing = [key for key in REQUIRED_FIELDS if key not in row]
            if missing:
                raise InputError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
            for key in ("offset", "size"):
                value = row[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InputError(f"{path}:{number}: {key} must be an integer >= 0, got {value!r}")
            shard = row["shard"]
            if not isinstance(shard, str):
                raise InputError(f"{path}:{number}: shard must be a path string, got {shard!r}")
            if shard not in checked:
                checked[shard] = _outside(dataset_dir, shard)
            if checked[shard]:
                raise InputError(f"{path}:{number}: refusing shard {shard!r}: {checked[shard]}; a "
                                 f"manifest may only name shard files inside {dataset_dir}")
            row["shard"] = shards.setdefault(shard, shard)
            yield row


def _outside(dataset_dir: Path, shard: str) -> str:
    """Why `shard` (a manifest's path) does not name a file inside `dataset_dir` ("" if it does)."""
    if not shard or "\0" in shard:
        return "not a file path"
    if shard.startswith(("/", "\\")) or os.path.isabs(shard) or (len(shard) > 1 and shard[1] == ":"):
        return "an absolute path"
    if ".." in shard.replace("\\", "/").split("/"):
        return "a '..' path component"
    root = dataset_dir.resolve()
    target = (root / shard).resolve()
    if not target.is_relative_to(root):
        return f"a symbolic link leading to {target}, outside the dataset folder"
    return ""


class ShardReader:
    """Random access to image bytes by manifest row; keeps one open handle per shard."""

    def __init__(self, dataset_dir: str | os.PathLike):
        self.dataset_dir = Path(dataset_dir)
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, row: dict[str, Any]) -> bytes:
        handle = self._handles.get(row["shard"])
        if handle is None:
            path = self.dataset_dir / row["shard"]
            why = _outside(self.dataset_dir, row["shard"])
            if why:
                raise InputError(f"{self.dataset_dir / MANIFEST}: refusing shard {row['shard']!r} "
                                 f"of {row['file']!r}: {why}")
            if not path.is_file():
                raise InputError(f"{path}: shard named in the manifest is missing")
            handle = self._handles[row["shard"]] = open(path, "rb")
        handle.seek(row["offset"])
        data = handle.read(row["size"])
        if len(data) != row["size"]:
            raise InputError(f"{self.dataset_dir / row['shard']}: truncated at {row['file']}")
        return data

    def iter_images(self, rows: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bytes]]:
        for row in rows:
            yield row, self.read(row)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def shard_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """All shard files of a packed dataset, sorted."""
    return sorted((Path(dataset_dir) / SHARD_DIR).glob("*.tar"))
