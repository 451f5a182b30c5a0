"""Fetch one source file (https, http, gs, file or local path) to a local path, verified by sha256."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import math
import re
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from facenet_kfp import __version__
from facenet_kfp.errors import DownloadError, InputError
from facenet_kfp.fsutil import atomic_file, file_sha256, gcs_client
from facenet_kfp.progress import Progress

log = logging.getLogger(__name__)

MB = 1 << 20
GB = 10 ** 9
_FREE_CHECK_BYTES = 16 * MB   # free space is checked again after each this many bytes
_RAISE_CAP = ("if the archive is that large, raise max_download_gb (config data.max_download_gb, "
              "pipeline parameter max_download_gb, facenet-kfp download --max-download-gb)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class DownloadResult:
    """A verified local copy of `source`: `size` in bytes, `sha256` as lowercase hex."""

    path: Path
    source: str
    size: int
    sha256: str

    def metadata(self) -> dict:
        """Metadata for the KFP output artifact: source URI, size in bytes, sha256 hex."""
        return {"source": self.source, "size": self.size, "sha256": self.sha256}


class _Sink:
    """Writes downloaded bytes to the open temp file while hashing and counting them.

    A restart (server ignored Range, or answered for another offset) calls
    `reset`, which empties the file and the hash so they always describe
    bytes 0..size of the source. Every write is bounded: never more than
    `limit` bytes in all (max_download_gb, or the declared size once known),
    and never so much that less than `min_free_bytes` stays free in `folder`.
    `received` counts every byte ever written (restarts included): progress.
    """

    def __init__(self, handle, progress: Progress, source_uri: str, folder: Path, *,
                 max_download_gb: float, min_free_bytes: int, size_hint: str = _RAISE_CAP):
        self.handle, self.progress, self.source_uri, self.folder = handle, progress, source_uri, folder
        self.size_hint = size_hint
        self.max_download_gb, self.min_free_bytes = max_download_gb, min_free_bytes
        self.max_bytes = int(max_download_gb * GB)
        self.limit, self.declared = self.max_bytes, None
        self.hasher = hashlib.sha256()
        self.size = self.received = 0
        self._next_free_check = 0

    def declare(self, total: int) -> None:
        """The source says it is `total` bytes: refuse it now if it cannot fit, else cap at it."""
        if total > self.max_bytes:
            raise DownloadError(f"{self.source_uri}: the source is {total:,} bytes, more than "
                                f"max_download_gb = {self.max_download_gb:g} GB; {self.size_hint}")
        self.limit, self.declared = total, total
        self._check_free(total - self.size)

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self.limit:
            if self.declared is not None:
                raise DownloadError(f"{self.source_uri}: received more than the {self.declared:,} "
                                    f"bytes the source declared; stopped")
            raise DownloadError(f"{self.source_uri}: more than max_download_gb = "
                                f"{self.max_download_gb:g} GB received and the source declared no "
                                f"size; stopped; {self.size_hint}")
        if self.size + len(data) >= self._next_free_check:
            self._check_free(len(data))
            self._next_free_check = self.size + len(data) + _FREE_CHECK_BYTES
        self.handle.write(data)
        self.hasher.update(data)
        self.size += len(data)
        self.received += len(data)
        self.progress.update(len(data))
        return len(data)

    def _check_free(self, more: int) -> None:
        """DownloadError when writing `more` bytes would leave less than min_free_bytes free."""
        free = shutil.disk_usage(self.folder).free
        if free - more < self.min_free_bytes:
            raise DownloadError(f"{self.source_uri}: not enough disk space in {self.folder}: "
                                f"{free / MB:,.0f} MB free, {more / MB:,.0f} MB more to write, "
                                f"and {self.min_free_bytes / MB:,.0f} MB must stay free; free some "
                                f"space or download to another disk")

    def reset(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0
        self._next_free_check = 0
        self.progress.done = 0


class _Transient(Exception):
    """One HTTP attempt failed in a way worth retrying; the message says how."""


def download(source_uri: str | os.PathLike, dest: str | os.PathLike, sha256: str = "", *, retries: int = 5,
             timeout: float = 30.0, backoff: float = 1.0, give_up_after: float = 45.0,
             min_rate: float = 1024.0, rate_window: float = 60.0, max_download_gb: float = 20.0,
             min_free_bytes: int = 256 * MB, chunk_size: int = 1 << 20, size_hint: str = _RAISE_CAP) -> DownloadResult:
    """Copy `source_uri` to `dest` and return its size and sha256.

    `source_uri` is `https://...`, `http://...`, `gs://bucket/object`,
    `file:///abs/path` or a plain local path. The bytes are hashed while they
    stream into a temporary file next to `dest`, which is renamed onto `dest`
    only after the size (Content-Length / object size) and, when `sha256`
    (64 hex digits, any case) is given, the hash have been checked; on any
    failure `dest` is left as it was.

    Bounded time: HTTP(S) makes up to `retries` retries after connection
    errors, timeouts, 429, 5xx and too slow bodies, sleeping `backoff * 2**k`
    seconds before retry k+1; a connection dropped mid-body resumes with
    `Range: bytes=N-` (restarting from byte 0 when the server ignores it).
    Other 4xx fail at once. `timeout` (seconds) bounds each connect and each
    socket read; a body slower than `min_rate` bytes/s over `rate_window`
    seconds fails that attempt. No retry starts once `give_up_after` seconds
    passed without a byte received (each attempt's timeout is cut to what is
    left), so an unreachable host fails within about that long.

    Bounded disk: a source that declares its size (Content-Length, object
    size) may not send more; no source may exceed `max_download_gb` (GB,
    10**9 bytes); and the download stops before less than `min_free_bytes`
    would stay free next to `dest`. `size_hint` ends the message of a source
    over `max_download_gb` (by default: how to raise the archive's cap).

    gs://: credentials are the
    application default ones, or anonymous when none are found (public
    buckets, and the emulator named by STORAGE_EMULATOR_HOST); retries are
    google-cloud-storage's own, `timeout` applies per request.

    Raises InputError for a malformed `sha256`, unsupported scheme or missing
    local source; DownloadError when fetching fails, a bound is hit or the
    hash differs.
    """
    expected = _check_sha256(sha256)
    if isinstance(source_uri, os.PathLike):
        source_uri = os.fspath(source_uri)
    if not isinstance(source_uri, str) or not source_uri.strip():
        raise InputError(f"download source must be a non-empty URI or path, got {source_uri!r}")
    if retries < 0:
        raise InputError(f"download retries must be >= 0, got {retries}")
    if timeout <= 0:
        raise InputError(f"download timeout must be > 0 seconds, got {timeout}")
    if backoff < 0:
        raise InputError(f"download backoff must be >= 0 seconds, got {backoff}")
    for name, value in (("give_up_after", give_up_after), ("rate_window", rate_window),
                        ("max_download_gb", max_download_gb)):
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"download {name} must be a finite number > 0, got {value}")
    if not math.isfinite(min_rate) or min_rate < 0:
        raise InputError(f"download min_rate must be a finite number >= 0 bytes/s, got {min_rate}")
    if min_free_bytes < 0:
        raise InputError(f"download min_free_bytes must be >= 0, got {min_free_bytes}")
    if chunk_size <= 0:
        raise InputError(f"download chunk_size must be > 0 bytes, got {chunk_size}")
    dest = Path(dest)
    if dest.is_dir():
        raise InputError(f"download destination {dest} is a folder; expected a file path")

    scheme = urlsplit(source_uri).scheme.lower()
    if scheme in ("http", "https"):
        def fetch(sink: _Sink) -> None:
            _fetch_http(source_uri, sink, retries=retries, timeout=timeout, backoff=backoff,
                        give_up_after=give_up_after, min_rate=min_rate, rate_window=rate_window,
                        chunk_size=chunk_size)
    elif scheme == "gs":
        bucket, name = _split_gs_uri(source_uri)

        def fetch(sink: _Sink) -> None:
            _fetch_gcs(source_uri, bucket, name, sink, timeout=timeout)
    elif scheme == "file" or "://" not in source_uri:
        path = _local_path(source_uri, scheme)

        def fetch(sink: _Sink) -> None:
            _fetch_local(source_uri, path, sink, chunk_size=chunk_size)
    else:
        raise InputError(f"download source {source_uri}: unsupported scheme {scheme!r} "
                         "(expected https://, http://, gs://, file:// or a local path)")

    log.info("downloading %s -> %s", source_uri, dest)
    with atomic_file(dest, "wb") as handle:
        progress = Progress(f"download {dest.name}", unit="MiB", scale=MB, logger=log)
        sink = _Sink(handle, progress, source_uri, dest.parent, max_download_gb=max_download_gb,
                     min_free_bytes=min_free_bytes, size_hint=size_hint)
        fetch(sink)
        # Closed only on success, so a failed download does not log a "done" line.
        progress.close()
        digest = sink.hasher.hexdigest()
        if expected and digest != expected:
            raise DownloadError(f"{source_uri}: sha256 mismatch: expected {expected}, got {digest} "
                                f"({sink.size:,} bytes); nothing written to {dest}")
    log.info("downloaded %s: %d bytes, sha256 %s%s", dest, sink.size, digest,
             " (verified)" if expected else " (no checksum given)")
    return DownloadResult(path=dest, source=source_uri, size=sink.size, sha256=digest)


def check_replaceable_file(dest: str | os.PathLike, sha256: str = "") -> None:
    """InputError unless a download may write `dest`: nothing is there, or a verified copy is.

    A file at `dest` is replaced only when `sha256` is given and the file
    already has that hash (an earlier verified download of the same archive);
    anything else there may be a user's file and is left alone.
    """
    expected = _check_sha256(sha256)
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_file():
        why = "is a symbolic link" if dest.is_symlink() else "is not a regular file"
    elif not expected:
        why = "already exists and no sha256 was given to show it is an earlier copy of this archive"
    elif file_sha256(dest) != expected:
        why = f"already exists and its sha256 is not {expected}"
    else:
        return
    raise InputError(f"download destination {dest} {why}; refusing to replace it: remove it "
                     f"or choose another destination")


def _check_sha256(sha256: str) -> str:
    """Return `sha256` lowercased ("" when not given); InputError unless it is 64 hex digits."""
    if sha256 is None:
        return ""
    if not isinstance(sha256, str):
        raise InputError(f"sha256 must be a string of 64 hex digits, got {sha256!r}")
    value = sha256.strip().lower()
    if value and not _SHA256_RE.fullmatch(value):
        raise InputError(f"sha256 must be 64 hex digits or empty, got {sha256!r}")
    return value


# --- local files ----------------------------------------------------------------------------


def _local_path(source_uri: str, scheme: str) -> Path:
    """The file a `file://` URI or plain path names; InputError when it is not an existing file."""
    if scheme == "file":
        parts = urlsplit(source_uri)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"download source {source_uri}: file:// URIs on another host "
                             f"({parts.netloc}) are not supported")
        path = Path(urllib.request.url2pathname(unquote(parts.path)))
    else:
        path = Path(source_uri).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise InputError(f"download source {source_uri}: local file {path} {what}")
    return path


def _fetch_local(source_uri: str, path: Path, sink: _Sink, *, chunk_size: int) -> None:
    size = path.stat().st_size
    sink.progress.total = size
    sink.declare(size)
    try:
        with open(path, "rb") as src:
            while chunk := src.read(chunk_size):
                sink.write(chunk)
    except OSError as exc:
        raise DownloadError(f"{source_uri}: reading {path} failed: {exc}") from exc
    if sink.size != size:
        raise DownloadError(f"{source_uri}: read {sink.size:,} bytes but {path} was "
                            f"{size:,} bytes (changed while copying?)")


# --- HTTP(S) ----------------------------------------------------------------------------------


def _fetch_http(url: str, sink: _Sink, *, retries: int, timeout: float, backoff: float,
                give_up_after: float, min_rate: float, rate_window: float, chunk_size: int) -> None:
    """Stream `url` into `sink`, retrying transient failures and resuming with Range.

    Retries stop after `retries`, or once `give_up_after` seconds passed since
    the last byte arrived (or the start), whichever comes first.
    """
    progress_at, received = time.monotonic(), sink.received
    for attempt in range(retries + 1):
        left = give_up_after - (time.monotonic() - progress_at)
        try:
            _http_attempt(url, sink, timeout=min(timeout, max(left, 0.1)), min_rate=min_rate,
                          rate_window=rate_window, chunk_size=chunk_size)
            return
        except _Transient as exc:
            reason = str(exc)
        if sink.received > received:
            progress_at, received = time.monotonic(), sink.received
        delay = backoff * 2 ** attempt
        idle = time.monotonic() - progress_at
        if attempt == retries:
            break
        if idle + delay >= give_up_after:
            reason += f"; no data for {idle:.0f} s (give_up_after {give_up_after:g} s)"
            break
        log.warning("%s: %s; retry %d/%d in %.1f s (resuming at byte %d)",
                    url, reason, attempt + 1, retries, delay, sink.size)
        time.sleep(delay)
    attempts = f"{attempt + 1} attempt{'s' if attempt else ''}"
    raise DownloadError(f"{url}: download failed after {attempts}; last error: {reason}")


def _http_attempt(url: str, sink: _Sink, *, timeout: float, min_rate: float, rate_window: float,
                  chunk_size: int) -> None:
    """One request: from byte `sink.size` on (Range) or from 0; returns when the body is complete.

    Raises _Transient for what a retry may fix (connection errors, timeouts,
    429, 5xx, a short body, fewer than `min_rate` bytes/s over `rate_window`
    seconds) and DownloadError for what it cannot (other 4xx, TLS certificate
    failures, a body longer than announced or over the sink's bounds).
    """
    offset = sink.size
    # identity: Content-Length must count the bytes we store, not a compressed form of them.
    headers = {"User-Agent": f"facenet-kfp/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        # The default opener verifies TLS and takes proxies from the environment.
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 429 or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        if exc.code == 416 and offset:
            # The object changed size since the first response: start over.
            sink.reset()
            raise _Transient(f"HTTP 416 for Range bytes={offset}-, restarting from byte 0") from exc
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DownloadError(f"{url}: TLS certificate verification failed: {exc.reason}") from exc
        raise _Transient(f"connection failed: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"connection failed: {exc!r}") from exc

    with response:
        total = _expected_total(url, response, offset, sink)
        if total is not None:
            sink.progress.total = total
            sink.declare(total)
        window_start, window_size = time.monotonic(), sink.size
        while True:
            try:
                # read1: whatever has arrived (up to chunk_size), so a trickle is measured as it comes.
                chunk = response.read1(chunk_size)
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection dropped at byte {sink.size}: {exc!r}") from exc
            if not chunk:
                break
            sink.write(chunk)
            elapsed = time.monotonic() - window_start
            if elapsed >= rate_window:
                rate = (sink.size - window_size) / elapsed
                if rate < min_rate:
                    raise _Transient(f"too slow: {rate:,.1f} bytes/s over {elapsed:.0f} s, below "
                                     f"min_rate {min_rate:g} bytes/s")
                window_start, window_size = time.monotonic(), sink.size
    # http.client returns b"" (no error) when the peer closes before Content-Length bytes.
    if total is not None and sink.size < total:
        raise _Transient(f"connection closed at byte {sink.size} of {total}")
    if total is not None and sink.size > total:
        raise DownloadError(f"{url}: received {sink.size} bytes, more than the {total} announced")


def _expected_total(url: str, response, offset: int, sink: _Sink) -> int | None:
    """Full size of the resource in bytes (None if unknown); lines `sink` up with the body's start.

    206: the Content-Range start must equal `offset`; otherwise `sink` is
    emptied and _Transient raised so the next attempt fetches from byte 0.
    200 after a Range request means the server ignores Range: `sink` is
    emptied and this body is read from byte 0.
    """
    length = _content_length(url, response)
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        if not match or int(match.group(1)) != offset:
            sink.reset()
            raise _Transient(f"206 response with Content-Range {content_range!r} does not start "
                             f"at byte {offset}; restarting from byte 0")
        if match.group(3) != "*":
            return int(match.group(3))
        return None if length is None else offset + length
    if offset:
        log.info("%s: server ignored Range bytes=%d- (HTTP %d); restarting from byte 0",
                 url, offset, response.status)
        sink.reset()
    return length


def _content_length(url: str, response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        log.warning("%s: ignoring malformed Content-Length %r; size cannot be verified", url, value)
        return None
    return length


# --- Google Cloud Storage ---------------------------------------------------------------------


def _split_gs_uri(source_uri: str) -> tuple[str, str]:
    bucket, _, name = source_uri[len("gs://"):].partition("/")
    if not bucket or not name:
        raise InputError(f"download source {source_uri}: expected gs://bucket/object")
    return bucket, name


def _fetch_gcs(source_uri: str, bucket: str, name: str, sink: _Sink, *, timeout: float) -> None:
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud.storage.exceptions import DataCorruption

    client = gcs_client()
    try:
        blob = client.bucket(bucket).get_blob(name, timeout=timeout)
        if blob is None:
            raise DownloadError(f"{source_uri}: object not found (bucket {bucket!r}, "
                                f"object {name!r})")
        sink.progress.total = blob.size
        if blob.size is not None:
            sink.declare(blob.size)
        # raw_download: the bytes exactly as stored (no gzip transcoding), so
        # the size matches blob.size and the library checks its stored hash.
        blob.download_to_file(sink, raw_download=True, timeout=timeout)
    except GoogleAPICallError as exc:
        raise DownloadError(f"{source_uri}: {exc}") from exc
    except DataCorruption as exc:
        raise DownloadError(f"{source_uri}: downloaded bytes failed the server checksum: "
                            f"{exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{source_uri}: download failed: {exc!r}") from exc
    if blob.size is not None and sink.size != blob.size:
        raise DownloadError(f"{source_uri}: received {sink.size:,} bytes, object is "
                            f"{blob.size:,} bytes")
