"""Atomic file and folder writes: a crashed, stopped or retried step never leaves half an artifact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it onto `target` on success.

    On an exception the temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


STEP_MARKER = ".facenet-kfp-step"   # inside every folder atomic_dir(step=...) writes; holds the step name


def _marker_step(folder: Path) -> str | None:
    """The step named by `folder`'s marker file, or None when it has none."""
    marker = folder / STEP_MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        return marker.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def check_replaceable(target: str | os.PathLike, step: str) -> None:
    """InputError unless `step` may write its output folder at `target`.

    Allowed: nothing at `target`, an empty folder (KFP creates output folders
    before a step runs), or a folder holding `step`'s own marker (its earlier
    output). Anything else, a user's file or folder, another step's output, a
    symlink, is refused so that no run replaces what this step did not write.
    """
    from facenet_kfp.errors import InputError

    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink():
        why = "it is a symbolic link"
    elif not target.is_dir():
        why = "it is a file, not an output folder of this step"
    elif not any(target.iterdir()):
        return
    elif (found := _marker_step(target)) == step:
        return
    elif found:
        why = f"it is the output of step {found!r}, not of step {step!r}"
    else:
        why = f"it is a folder that step {step!r} did not write (no {STEP_MARKER} marker)"
    raise InputError(f"{target}: refusing to replace it: {why}; choose a new or empty output "
                     f"path, or remove it yourself")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, step: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` (whole-folder swap).

    KFP creates output folders before a step runs, so an existing `target` is
    removed only after the new content is complete. On an exception the
    temporary folder is deleted and `target` is untouched.

    With `step`, `target` must pass `check_replaceable` (checked before the
    body runs, and again before the swap) and the new folder gets a marker
    file naming the step, so the next run of that step may replace it.
    """
    target = Path(target)
    if step is not None:
        if not step.strip() or "\n" in step:
            raise ValueError(f"atomic_dir: step must be a one-line name, got {step!r}")
        check_replaceable(target, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if step is not None:
            (tmp / STEP_MARKER).write_text(step + "\n")
            check_replaceable(target, step)
        if target.is_dir() and not target.is_symlink():
            old = _temp_sibling(target)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left next to `target`; returns the removed paths.

    `atomic_file` and `atomic_dir` write ``.<name>.tmp-<pid>-<hex>`` beside
    their target; a process killed with SIGKILL (or out of memory) cannot
    remove its own. Here those whose process id no longer runs on this machine
    are removed (files and folders alike); those of a running process, this
    one included, are kept. An output path is written from one machine at a
    time (a pipeline task, a command), so a process id is enough to tell.
    """
    import logging

    target = Path(target)
    prefix = f".{target.name}.tmp-"
    try:
        siblings = [path for path in target.parent.iterdir() if path.name.startswith(prefix)]
    except OSError:
        return []  # no folder to clean (missing, a file, unreadable): writing there fails by itself
    removed = []
    for path in siblings:
        pid_text, _, tag = path.name[len(prefix):].partition("-")
        if not pid_text.isdigit() or len(tag) != 8 or _process_runs(int(pid_text)):
            continue
        logging.getLogger(__name__).warning("removing %s, left by process %s, which was killed while "
                                            "writing %s", path, pid_text, target)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    """Whether a process with this id exists on this machine (any user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False  # not a process id at all
    return True


def no_space_error(exc: BaseException) -> OSError | None:
    """The "no space left on device" (or disk quota) OSError that `exc` is, or was raised from or
    while handling (cleanup after a full disk often fails the same way); None when there is none."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


@contextlib.contextmanager
def no_space_named(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Within the block, a full disk raises FacenetError "no space left on <folder>" saying `what`
    needed the space, instead of the OSError (often several nested ones) that reported it."""
    try:
        yield
    except Exception as exc:
        full = no_space_error(exc)
        if full is None:
            raise
        from facenet_kfp.errors import FacenetError

        try:
            free = f", {shutil.disk_usage(folder).free:,} bytes free now"
        except OSError:
            free = ""
        where = f" (writing {full.filename})" if full.filename else ""
        raise FacenetError(f"no space left on {folder}{free}: {what} did not fit{where} "
                           f"[{full.strerror or full}]; free space there or choose another "
                           f"location") from None


def check_outputs_apart(outputs: dict[str, str | os.PathLike | None],
                        inputs: dict[str, str | os.PathLike | None]) -> None:
    """InputError when an output path is an input, a folder holding one, or inside one.

    `outputs` and `inputs` map a name for messages (an option or argument) to a
    local path; None, empty values and URIs with a scheme other than file://
    are skipped. Paths are compared after resolving symbolic links.
    """
    from facenet_kfp.errors import InputError

    def resolved(value) -> Path | None:
        if value is None or not str(value).strip():
            return None
        text = os.fspath(value)
        if "://" in text:
            if not text.lower().startswith("file://"):
                return None
            from urllib.parse import unquote, urlsplit
            text = unquote(urlsplit(text).path)
        return Path(text).expanduser().resolve()

    for out_name, out_value in outputs.items():
        out = resolved(out_value)
        if out is None:
            continue
        for in_name, in_value in inputs.items():
            inp = resolved(in_value)
            if inp is None:
                continue
            if out == inp:
                why = f"is the input {in_name}"
            elif inp.is_relative_to(out):
                why = f"holds the input {in_name} ({in_value})"
            elif out.is_relative_to(inp):
                why = f"is inside the input {in_name} ({in_value})"
            else:
                continue
            raise InputError(f"{out_name} {out_value}: the output {why}; writing it would replace "
                             f"or change the input; choose an output path outside the inputs")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) instead of killing the process at once.

    Kubernetes stops a pod, and a runner a task, with SIGTERM; Python's default
    ends the process without unwinding, so atomic_file / atomic_dir would leave
    their temporary files. Raised as an exception, it runs every `finally` and
    `except BaseException` on the way out, then exits with the usual status
    128 + 15. Outside the main thread (where handlers cannot be set) a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print("received SIGTERM: stopping and removing temporary files", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (sorted keys stay as given)."""
    with atomic_file(path, "w") as handle:
        json.dump(obj, handle, indent=indent)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path, "w") as handle:
        handle.write(text)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising InputError that names the file when it is missing or malformed."""
    from facenet_kfp.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- local paths or gs:// URIs
# Checkpoints, their JSON and TensorBoard events go to a local folder or a gs:// prefix.

def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def local_path(uri: str) -> Path | None:
    """The host path a `file://` URI or plain path names; None for "" and remote URIs (https, gs, ...)."""
    from urllib.parse import unquote, urlsplit

    if not uri:
        return None
    if urlsplit(uri).scheme.lower() == "file":
        return Path(unquote(urlsplit(uri).path))
    return None if is_uri(uri) else Path(uri)


def gcs_client():
    """A storage client: application default credentials, else anonymous (public data)."""
    # Imported here so local and http work does not pay for loading the Google client stack.
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        # No project is needed; with STORAGE_EMULATOR_HOST set the library itself
        # switches to the emulator and anonymous credentials.
        return storage.Client(project=None)
    except DefaultCredentialsError:
        import logging

        logging.getLogger(__name__).info("no Google application default credentials found; using an "
                                         "anonymous client (works for public buckets only)")
        return storage.Client.create_anonymous_client()


def _blob(uri: str):
    """The google-cloud-storage blob of a gs:// URI."""
    from facenet_kfp.errors import InputError

    if not str(uri).startswith("gs://"):
        raise InputError(f"{uri}: only local paths and gs:// URIs are supported")
    bucket, _, name = str(uri)[len("gs://"):].partition("/")
    return gcs_client().bucket(bucket).blob(name)


def join(folder: str, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def read_bytes(path: str) -> bytes | None:
    """The content of a file or gs:// object; None when it does not exist."""
    if not is_uri(path):
        return Path(path).read_bytes() if Path(path).is_file() else None
    from google.api_core.exceptions import NotFound

    try:
        return _blob(path).download_as_bytes()
    except NotFound:
        return None


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: a local file through `atomic_file`, a gs:// object in one upload."""
    if is_uri(path):
        _blob(path).upload_from_string(data)
        return
    with atomic_file(path) as handle:
        handle.write(data)


def list_names(folder: str) -> list[str]:
    """The names of the files directly in a folder (or under a gs:// prefix); [] when there is none."""
    if not is_uri(folder):
        return sorted(p.name for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []
    blob = _blob(str(folder).rstrip("/") + "/")
    names = (b.name[len(blob.name):] for b in blob.bucket.list_blobs(prefix=blob.name))
    return sorted(n for n in names if n and "/" not in n)


def delete(path: str) -> None:
    if is_uri(path):
        _blob(path).delete()
    else:
        Path(path).unlink(missing_ok=True)


def write_json_any(path: str, obj: Any) -> None:
    """Atomic JSON write to a local path or a gs:// URI."""
    if is_uri(path):
        write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
    else:
        write_json(path, obj)


def read_json_any(path: str) -> Any | None:
    """The JSON in a file or gs:// object; None when it does not exist; InputError when it is not JSON."""
    from facenet_kfp.errors import InputError

    data = read_bytes(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
