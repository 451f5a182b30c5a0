"""TensorBoard event files of a training run; no TensorFlow.

Event files are what `tf.summary` writes: TFRecord framing (uint64 length,
masked CRC-32C of the length, the record, masked CRC-32C of the record, all
little-endian) around `Event` protocol buffers. Each scalar is a
`Summary.Value` with a float32 scalar `TensorProto` and the "scalars" plugin
metadata, so `tensorboard --logdir` shows it as `tf.summary.scalar` does. The
few protobuf fields needed are encoded here by hand (their numbers are those of
tensorflow/core/util/event.proto and summary.proto), so the same writer serves
the TensorFlow and the JAX backend and needs neither TensorFlow nor the
tensorboard package.

Paths are local folders or gs:// URIs (google-cloud-storage); a gs:// event
file is uploaded whole at each flush (GCS objects cannot be appended to; event
files stay a few hundred KB).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import is_uri, join, list_names, read_bytes, read_json_any, write_bytes, write_json_any

log = logging.getLogger(__name__)

TENSORBOARD_RUN_JSON = "facenet-kfp-run.json"   # in a TensorBoard folder: the run its events belong to
TENSORBOARD_FORMAT = "facenet-kfp-tensorboard/1"
EVENT_FILE_PREFIX = "events.out.tfevents."


# ----------------------------------------------------------------------------- records and protobuf fields

def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def read_tfrecords(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file; a truncated or damaged tail ends the iteration (ValueError)."""
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"record at byte {pos} is cut short")
        length_bytes = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(length_bytes):
            raise ValueError(f"record at byte {pos}: bad length checksum")
        end = pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"record at byte {pos} is cut short")
        record = data[pos + 12:end]
        if struct.unpack("<I", data[end:end + 4])[0] != _masked_crc(record):
            raise ValueError(f"record at byte {pos}: bad data checksum")
        yield record
        pos = end + 4


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + (_varint(len(payload)) + payload if wire == 2 else payload)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """An Event {wall_time, step, summary {value {tag, tensor: float32 scalar, metadata: scalars plugin}}}."""
    tensor = _field(1, 0, _varint(1)) + _field(2, 2, b"") + _field(5, 2, struct.pack("<f", value))  # DT_FLOAT
    metadata = _field(1, 2, _field(1, 2, b"scalars")) + _field(4, 0, _varint(1))   # DATA_CLASS_SCALAR
    summary_value = _field(1, 2, tag.encode()) + _field(8, 2, tensor) + _field(9, 2, metadata)
    return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
            + _field(5, 2, _field(1, 2, summary_value)))


def _version_event(wall_time: float) -> bytes:
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(3, 2, b"brain.Event:2")


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: int for varints, bytes otherwise."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, data[pos:pos + 8]
            pos += 8
        elif wire == 2:
            length = varint()
            yield number, data[pos:pos + length]
            pos += length
        elif wire == 5:
            yield number, data[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} not expected in an event")


def event_tags(record: bytes) -> tuple[int, list[str]]:
    """(step, tags of its summary values) of one Event record."""
    step, tags = 0, []
    for number, value in _fields(record):
        if number == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5:
            for vnum, summary_value in _fields(value):
                if vnum == 1:
                    tags += [t.decode() for n, t in _fields(summary_value) if n == 1]
    return step, tags


def written_steps(folder: str, names: Sequence[str]) -> dict[str, int]:
    """{tag: last step} over the event files among `names` in `folder` (a truncated tail is skipped)."""
    last: dict[str, int] = {}
    for name in sorted(names):
        if not name.startswith(EVENT_FILE_PREFIX):
            continue
        path = join(folder, name)
        try:
            for record in read_tfrecords(read_bytes(path) or b""):
                step, tags = event_tags(record)
                for tag in tags:
                    last[tag] = max(last.get(tag, -1), step)
        except ValueError as exc:
            log.warning("%s: cut short after its last complete event (a stopped pod; %s); the rest is read",
                        path, exc)
    return last


# ----------------------------------------------------------------------------- the run's log

def claim_tensorboard_dir(folder: str, run_key: str) -> dict[str, int]:
    """Make `folder` run `run_key`'s TensorBoard folder; {tag: last step} of the events in it.

    A new or empty folder gets facenet-kfp-run.json naming the run; a folder whose
    facenet-kfp-run.json names this run is continued; anything else is refused, so that
    `tensorboard --logdir` never shows two runs' events mixed in one curve.
    """
    if not is_uri(folder) and (Path(folder).exists() or Path(folder).is_symlink()) and not Path(folder).is_dir():
        raise InputError(f"{folder}: the TensorBoard folder is a file, not a folder; give the path of a new "
                         f"or empty folder for the events, or move the file away")
    marker = join(folder, TENSORBOARD_RUN_JSON)
    names = list_names(folder)
    if not is_uri(folder) and Path(folder).is_dir() and not names:
        names = [p.name for p in Path(folder).iterdir()]          # sub-folders count as content too
    claimed = read_json_any(marker)
    if claimed is None:
        if names:
            raise InputError(f"{folder}: TensorBoard folder is not empty and has no {TENSORBOARD_RUN_JSON}, so "
                             f"it is not this trainer's; give an empty or new folder for the events")
        write_json_any(marker, {"format": TENSORBOARD_FORMAT, "run": run_key})
        return {}
    if not isinstance(claimed, dict) or claimed.get("run") != run_key:
        owner = claimed.get("run") if isinstance(claimed, dict) else claimed
        raise InputError(f"{marker}: the TensorBoard folder holds the events of run {owner!r}, not of "
                         f"{run_key!r}; give a new folder for this run's events, or delete {folder}")
    return written_steps(folder, names)


class TensorBoardLog:
    """TensorBoard scalars `<split>/<key>` of one run, written to one or more folders (paths or gs://).

    A folder holds one run: `claim_tensorboard_dir` gives it facenet-kfp-run.json naming the
    run key and refuses a folder of another run. Each call adds its own event file (TensorBoard
    merges a folder's files) and writes a (tag, step) only when the folder's events do not
    have it yet: a retried or resumed call fills in what the earlier attempt did not write
    (the restored history first) and never writes a step twice. Flushed at each write, so a
    killed pod loses at most the record being written; a truncated last record is skipped.
    """

    def __init__(self, folders: Sequence[str], run_key: str):
        self._outputs = []          # [path of this call's event file, {tag: last step}, bytes so far]
        name = (f"{EVENT_FILE_PREFIX}{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
                f"{uuid.uuid4().hex[:8]}.v2")
        for folder in folders:
            written = claim_tensorboard_dir(folder, run_key)
            self._outputs.append([join(folder, name), written, tfrecord(_version_event(time.time()))])
        self._flush()

    def write(self, split: str, record: dict[str, float]) -> None:
        """Each finite value of `record` but "step" as `<split>/<key>` at record["step"]."""
        step = int(record["step"])
        for output in self._outputs:
            _, written, _ = output
            for key, value in record.items():
                tag = f"{split}/{key}"
                if key != "step" and math.isfinite(value) and step > written.get(tag, -1):
                    output[2] += tfrecord(scalar_event(tag, float(value), step, time.time()))
                    written[tag] = step
        self._flush()

    def _flush(self) -> None:
        for path, _, data in self._outputs:
            if is_uri(path):
                write_bytes(path, data)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab") as handle:      # append what is new since the last flush
                    handle.seek(0, os.SEEK_END)
                    handle.write(data[handle.tell():])

    def close(self) -> None:
        self._flush()
