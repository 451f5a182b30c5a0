"""Tests for facenet_kfp.download against a local HTTP server, local files and a GCS emulator."""

from __future__ import annotations

import hashlib
import http.server
import logging
import random
import re
import socket
import threading
from pathlib import Path

import pytest

from facenet_kfp.download import DownloadResult, download
from facenet_kfp.errors import DownloadError, InputError

DATA = random.Random(0).randbytes(300_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()
FAST = {"backoff": 0.001, "chunk_size": 16 * 1024}  # keep retry sleeps and reads small


class _State:
    """What the test server has seen and how often each failure still has to happen."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.failures: dict[str, int] = {}  # path -> failures left
        self.release = threading.Event()  # unblocks a stalled handler at teardown

    def fail_once_more(self, path: str) -> bool:
        with self.lock:
            left = self.failures.get(path, 0)
            if left:
                self.failures[path] = left - 1
            return left > 0


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA under paths that pick a behaviour; `self.server.state` records requests."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        state = self.server.state
        path = self.path.split("?")[0]
        with state.lock:
            state.requests.append((path, self.headers.get("Range")))
        if path == "/missing":
            return self._error(404)
        if path in ("/flaky", "/always-500"):
            if path == "/always-500" or state.fail_once_more(path):
                return self._error(500)
        if path == "/busy" and state.fail_once_more(path):
            return self._error(429)
        if path in ("/drop", "/drop-norange", "/stall", "/wrong-range") and state.fail_once_more(path):
            return self._send_partial(path == "/stall")
        if path == "/wrong-range" and self.headers.get("Range"):
            return self._send_range(DATA, start=0)
        if path in ("/trickle", "/hang", "/endless", "/liar"):
            return self._send_slowly(path)
        if path == "/no-length":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(DATA)
            self.close_connection = True
            return None
        if path in ("/file.bin", "/drop", "/stall", "/flaky", "/busy", "/wrong-range"):
            range_start = self._range_start()
            if range_start is not None:
                return self._send_range(DATA, range_start)
            return self._send_full(DATA)
        if path == "/drop-norange":
            return self._send_full(DATA)  # this server ignores Range headers
        return self._error(404)

    def _range_start(self) -> int | None:
        header = self.headers.get("Range")
        if not header:
            return None
        match = re.fullmatch(r"bytes=(\d+)-", header)
        assert match, f"unexpected Range header {header!r}"
        return int(match.group(1))

    def _error(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_full(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data)

    def _send_range(self, data: bytes, start: int):
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def _send_partial(self, stall: bool):
        """Announce the whole body, send half, then close (or stall past the client timeout)."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(DATA[: len(DATA) // 2])
        self.wfile.flush()
        if stall:
            self.server.state.release.wait(10)
        self.close_connection = True


    def _send_slowly(self, path: str):
        """/trickle: one byte per 20 ms; /hang: half the body, then nothing; /endless: chunks
        forever, no declared size; /liar: declares 1,000 bytes, then chunks forever."""
        release = self.server.state.release
        self.send_response(200)
        if path in ("/trickle", "/hang"):
            self.send_header("Content-Length", str(len(DATA)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
            if path == "/liar":
                self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            if path == "/hang":
                self.wfile.write(DATA[: len(DATA) // 2])
                self.wfile.flush()
                release.wait(60)
            elif path == "/trickle":
                for byte in DATA:
                    if release.wait(0.02):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            else:
                chunk = DATA[:16 * 1024]
                while not release.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:   # the client gave up: what these tests want
            pass
        self.close_connection = True


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.state.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- HTTP -------------------------------------------------------------------------------------


def test_http_download_verifies_and_reports(server, tmp_path, caplog):
    dest = tmp_path / "deep" / "er" / "file.bin"  # parents created
    with caplog.at_level(logging.INFO, logger="facenet_kfp.download"):
        result = download(f"{server.url}/file.bin", dest, DATA_SHA.upper(), **FAST)
    assert result == DownloadResult(path=dest, source=f"{server.url}/file.bin",
                                    size=len(DATA), sha256=DATA_SHA)
    assert dest.read_bytes() == DATA
    assert result.metadata() == {"source": f"{server.url}/file.bin", "size": len(DATA),
                                 "sha256": DATA_SHA}
    assert _leftovers(dest.parent) == ["file.bin"]
    assert server.state.requests == [("/file.bin", None)]
    progress_lines = [r.getMessage() for r in caplog.records if "MiB" in r.getMessage()]
    assert progress_lines and "0.3/0.3 MiB (100%)" in progress_lines[-1]


def test_http_404_fails_at_once_naming_url_and_status(server, tmp_path):
    dest = tmp_path / "out.bin"
    with pytest.raises(DownloadError, match=r"/missing: HTTP 404") as info:
        download(f"{server.url}/missing", dest, retries=3, **FAST)
    assert server.url in str(info.value)
    assert server.state.requests == [("/missing", None)]  # no retry on 404
    assert _leftovers(tmp_path) == []


def test_http_500_then_200_retries(server, tmp_path):
    server.state.failures["/flaky"] = 2
    result = download(f"{server.url}/flaky", tmp_path / "out.bin", DATA_SHA, retries=3, **FAST)
    assert result.sha256 == DATA_SHA
    assert server.state.requests == [("/flaky", None)] * 3


def test_http_429_is_retried(server, tmp_path):
    server.state.failures["/busy"] = 1
    result = download(f"{server.url}/busy", tmp_path / "out.bin", DATA_SHA, **FAST)
    assert result.size == len(DATA)
    assert len(server.state.requests) == 2


def test_http_gives_up_after_retries(server, tmp_path):
    with pytest.raises(DownloadError, match=r"after 3 attempts.*HTTP 500"):
        download(f"{server.url}/always-500", tmp_path / "out.bin", retries=2, **FAST)
    assert len(server.state.requests) == 3
    assert _leftovers(tmp_path) == []


def test_http_dropped_connection_resumes_with_range(server, tmp_path):
    server.state.failures["/drop"] = 1
    dest = tmp_path / "out.bin"
    result = download(f"{server.url}/drop", dest, DATA_SHA, **FAST)
    assert result.size == len(DATA) and result.sha256 == DATA_SHA
    assert dest.read_bytes() == DATA
    half = len(DATA) // 2
    assert server.state.requests == [("/drop", None), ("/drop", f"bytes={half}-")]


def test_http_read_timeout_resumes_with_range(server, tmp_path):
    server.state.failures["/stall"] = 1
    dest = tmp_path / "out.bin"
    result = download(f"{server.url}/stall", dest, DATA_SHA, timeout=2.0, **FAST)
    assert result.sha256 == DATA_SHA and dest.read_bytes() == DATA
    (first, second) = server.state.requests
    assert first == ("/stall", None)
    # A read that times out part-way through a chunk loses that partial chunk, so the
    # resume may start a little before the half the server sent; never after it.
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second[1]).group(1))
    assert 0 < resumed_at <= len(DATA) // 2


def test_http_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.state.failures["/drop-norange"] = 1
    dest = tmp_path / "out.bin"
    result = download(f"{server.url}/drop-norange", dest, DATA_SHA, **FAST)
    assert result.size == len(DATA) and result.sha256 == DATA_SHA
    assert dest.read_bytes() == DATA  # not the first half twice
    half = len(DATA) // 2
    assert server.state.requests == [("/drop-norange", None),
                                     ("/drop-norange", f"bytes={half}-")]


def test_http_range_answer_at_wrong_offset_restarts(server, tmp_path):
    # Dropped half way; the 206 resume answer then starts at byte 0 instead of `half`.
    server.state.failures["/wrong-range"] = 1
    dest = tmp_path / "out.bin"
    result = download(f"{server.url}/wrong-range", dest, DATA_SHA, **FAST)
    assert result.sha256 == DATA_SHA and dest.read_bytes() == DATA
    half = len(DATA) // 2
    assert server.state.requests == [("/wrong-range", None), ("/wrong-range", f"bytes={half}-"),
                                     ("/wrong-range", None)]


def test_http_without_content_length(server, tmp_path):
    result = download(f"{server.url}/no-length", tmp_path / "out.bin", DATA_SHA, **FAST)
    assert result.size == len(DATA)


def test_http_connection_refused_retries_then_fails(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match=r"after 2 attempts.*connection failed"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "out.bin", retries=1, **FAST)


def test_trickling_server_fails_naming_url_and_rate(server, tmp_path):
    url = f"{server.url}/trickle"
    with pytest.raises(DownloadError, match=r"after 2 attempts.*too slow: .* bytes/s.*min_rate 10000") \
            as info:
        download(url, tmp_path / "out.bin", retries=1, min_rate=10_000, rate_window=0.2, **FAST)
    assert url in str(info.value)
    assert [p for p, _ in server.state.requests] == ["/trickle", "/trickle"]
    assert server.state.requests[1][1] is not None   # the retry resumed where the first stopped
    assert _leftovers(tmp_path) == []


def test_endless_body_is_capped_at_max_download_gb(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/endless: more than max_download_gb = 0.0002 GB "
                                            r"received .*declared no size.*data\.max_download_gb"):
        download(f"{server.url}/endless", tmp_path / "out.bin", max_download_gb=0.0002, **FAST)
    assert len(server.state.requests) == 1   # not retried
    assert _leftovers(tmp_path) == []


def test_body_longer_than_declared_stops(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/liar: received more than the 1,000 bytes the source"):
        download(f"{server.url}/liar", tmp_path / "out.bin", **FAST)
    assert _leftovers(tmp_path) == []


def test_declared_size_over_max_download_gb_fails_before_writing(server, tmp_path):
    with pytest.raises(DownloadError, match=r"300,000 bytes, more than max_download_gb = 0.0001 GB"):
        download(f"{server.url}/file.bin", tmp_path / "out.bin", max_download_gb=0.0001, **FAST)
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    with pytest.raises(DownloadError, match="more than max_download_gb"):
        download(src, tmp_path / "out.bin", max_download_gb=0.0001)
    assert _leftovers(tmp_path) == ["src.bin"]


@pytest.mark.parametrize("path", ["/file.bin", "/no-length", "local"])
def test_download_keeps_a_free_space_reserve(server, tmp_path, path):
    import shutil

    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(DATA)
    out = tmp_path / "out"
    out.mkdir()
    reserve = shutil.disk_usage(out).free + 10 * 2 ** 30   # more than this disk can keep free
    source = str(src) if path == "local" else f"{server.url}{path}"
    with pytest.raises(DownloadError, match=rf"not enough disk space in {re.escape(str(out))}"):
        download(source, out / "out.bin", min_free_bytes=reserve, **FAST)
    assert _leftovers(out) == []


def test_unreachable_host_stops_retrying_after_give_up_after(tmp_path, monkeypatch):
    """Retries of a host that never answers stop after give_up_after seconds, not after `retries`."""
    import facenet_kfp.download as module

    clock = {"now": 0.0}
    sleeps = []
    monkeypatch.setattr(module.time, "monotonic", lambda: clock["now"])

    def sleep(seconds):
        sleeps.append(seconds)
        clock["now"] += seconds
    monkeypatch.setattr(module.time, "sleep", sleep)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(DownloadError, match=r"connection failed.*give_up_after 20 s") as info:
        download(url, tmp_path / "out.bin", retries=50, backoff=1.0, give_up_after=20)
    assert url in str(info.value)
    assert sum(sleeps) <= 20 and len(sleeps) < 50


def test_name_resolution_failure_names_url_and_error(tmp_path):
    url = "http://host.invalid/lfw.tgz"   # .invalid never resolves (RFC 6761)
    with pytest.raises(DownloadError, match=r"connection failed") as info:
        download(url, tmp_path / "out.bin", retries=1, **FAST)
    assert url in str(info.value)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("entry", ["cli", "run_step"])
def test_sigterm_removes_the_scratch_file(server, tmp_path, entry):
    """A download stopped with SIGTERM (a stopped pod or run) leaves no temporary file behind."""
    import signal
    import subprocess
    import sys
    import time

    dest, url = tmp_path / "out.bin", f"{server.url}/hang"
    if entry == "cli":
        argv = [sys.executable, "-m", "facenet_kfp.cli", "download", url, "--out", str(dest)]
    else:
        argv = [sys.executable, "-c", "import sys; from facenet_kfp.kfp_io import run_step; "
                "from facenet_kfp.download import download; "
                "run_step('download', download, sys.argv[1], sys.argv[2])", url, str(dest)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120   # a generous wait for the first bytes, not a timing check
        while not any(p.stat().st_size for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "received SIGTERM" in err
    assert _leftovers(tmp_path) == []


def test_wrong_sha256_leaves_no_file(server, tmp_path):
    dest = tmp_path / "out.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(f"{server.url}/file.bin", dest, wrong, **FAST)
    message = str(info.value)
    assert wrong in message and DATA_SHA in message and f"{server.url}/file.bin" in message
    assert not dest.exists()
    assert _leftovers(tmp_path) == []  # the temp file is gone too


# --- local files ------------------------------------------------------------------------------


def test_plain_path_and_file_uri(tmp_path):
    src = tmp_path / "src dir" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(DATA)
    by_path = download(str(src), tmp_path / "a.bin", DATA_SHA, chunk_size=7_000)
    by_uri = download(src.as_uri(), tmp_path / "b.bin", DATA_SHA)
    assert src.as_uri().startswith("file:///") and "%20" in src.as_uri()
    for result, name in ((by_path, "a.bin"), (by_uri, "b.bin")):
        assert result.size == len(DATA) and result.sha256 == DATA_SHA
        assert (tmp_path / name).read_bytes() == DATA
    assert by_uri.source == src.as_uri()


def test_empty_local_file(tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    result = download(src, tmp_path / "copy")
    assert result.size == 0 and result.sha256 == hashlib.sha256(b"").hexdigest()


def test_existing_dest_is_replaced_only_after_verification(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(src, dest, "f" * 64)
    assert dest.read_bytes() == b"old"
    download(src, dest, DATA_SHA)
    assert dest.read_bytes() == DATA


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "0" * 63, "0" * 65, "g" * 64, "0" * 32 + " " + "0" * 31])
def test_bad_sha256_format(tmp_path, bad):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    with pytest.raises(InputError, match="sha256 must be 64 hex digits"):
        download(src, tmp_path / "out.bin", bad)


@pytest.mark.parametrize("uri", ["ftp://example.com/lfw.tgz", "s3://bucket/key"])
def test_unknown_scheme(tmp_path, uri):
    with pytest.raises(InputError, match=re.escape(uri)):
        download(uri, tmp_path / "out.bin")


def test_missing_local_source(tmp_path):
    missing = tmp_path / "nope.tgz"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        download(str(missing), tmp_path / "out.bin")
    with pytest.raises(InputError, match="not found"):
        download(missing.as_uri(), tmp_path / "out.bin")
    with pytest.raises(InputError, match="is not a file"):
        download(str(tmp_path), tmp_path / "out.bin")
    assert _leftovers(tmp_path) == []


def test_bad_arguments(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    with pytest.raises(InputError, match="non-empty"):
        download("", tmp_path / "out.bin")
    with pytest.raises(InputError, match="retries"):
        download(src, tmp_path / "out.bin", retries=-1)
    with pytest.raises(InputError, match="timeout"):
        download(src, tmp_path / "out.bin", timeout=0)
    with pytest.raises(InputError, match="is a folder"):
        download(src, tmp_path)
    with pytest.raises(InputError, match="gs://bucket/object"):
        download("gs://only-bucket", tmp_path / "out.bin")


# --- gs:// ------------------------------------------------------------------------------------


def test_gs_download(gcs, tmp_path):
    gcs.blob("lfw/data.bin").upload_from_string(DATA)
    dest = tmp_path / "out" / "data.bin"
    result = download("gs://test-bucket/lfw/data.bin", dest, DATA_SHA)
    assert result.size == len(DATA) and result.sha256 == DATA_SHA
    assert dest.read_bytes() == DATA


def test_gs_wrong_sha256_leaves_no_file(gcs, tmp_path):
    gcs.blob("lfw/other.bin").upload_from_string(DATA[:1000])
    dest = tmp_path / "out.bin"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download("gs://test-bucket/lfw/other.bin", dest, DATA_SHA)
    assert _leftovers(tmp_path) == []


def test_gs_missing_object(gcs, tmp_path):
    uri = "gs://test-bucket/lfw/absent.tgz"
    with pytest.raises(DownloadError, match=re.escape(uri) + ".*not found"):
        download(uri, tmp_path / "out.bin")
    assert _leftovers(tmp_path) == []


def test_gs_client_is_anonymous_without_credentials(monkeypatch, tmp_path):
    from google.auth.credentials import AnonymousCredentials

    from facenet_kfp.fsutil import gcs_client

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    # A credentials file that does not exist makes google.auth.default() fail at once.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    client = gcs_client()
    assert isinstance(client._credentials, AnonymousCredentials)
