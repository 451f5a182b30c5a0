"""The container runner without a container engine: fake Docker clients and a fake podman."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker
import pytest
from kfp import local
from kfp.local import docker_task_handler, status

from facenet_kfp.errors import FacenetError, InputError
from pipelines import docker_runner
from facenet_kfp.fsutil import local_path
from pipelines.docker_runner import (IMAGE_GID, IMAGE_UID, RUN_LABEL, ContainerRecorder,
                                     container_user, make_docker_runner, race_free_containers,
                                     step_function)

ROOT = Path(__file__).resolve().parents[1]
PODMAN_SH = ROOT / "images" / "podman.sh"
IMAGE = "registry.example/facenet-kfp:1.0"
COMMAND = ["sh", "-c", "python3 -m kfp.dsl.executor_main", "--executor_input", "{}",
           "--function_to_execute", "download_archive"]


# ---- a fake Docker client ------------------------------------------------------------------

class FakeContainer:
    """A container that has already run: it printed `log` and exited with `exit_code`.

    With `auto_remove=True` it behaves as podman 4.3 does in the race: by the time
    the client asks, the container is gone, so the log and wait() answer 404.
    """

    def __init__(self, api: "FakeApi", log: list[bytes], exit_code: int, auto_remove: bool,
                 after_log=None):
        self.api, self.log, self.exit_code = api, log, exit_code
        self.auto_remove, self.after_log = auto_remove, after_log
        self.id = f"c{len(api.created):063d}"
        self.removed = False

    def logs(self, stream: bool = False, follow: bool | None = None):
        self.api.calls.append("logs")
        assert stream
        if self.auto_remove:
            raise docker.errors.NotFound("no such container")

        def chunks():
            yield from self.log
            if self.after_log is not None:   # what happens while the step still runs
                self.after_log()
        return chunks()

    def wait(self):
        self.api.calls.append("wait")
        if self.auto_remove or self.removed:
            raise docker.errors.NotFound("no such container")
        return {"StatusCode": self.exit_code, "Error": None}

    def remove(self, force: bool = False):
        self.api.calls.append("remove(force)" if force else "remove")
        if self.removed:
            raise docker.errors.NotFound("no such container")
        self.removed = True


class FakeImages:
    def __init__(self, api: "FakeApi", present: set[str]):
        self.api, self.present = api, present

    def get(self, ref: str):
        self.api.calls.append(f"images.get {ref}")
        if ref not in self.present:
            raise docker.errors.ImageNotFound(ref)
        return object()

    def list(self):   # what kfp's own run_docker_container asks
        return [type("Image", (), {"tags": sorted(self.present), "attrs": {"RepoDigests": []}})()]

    def pull(self, ref: str):
        self.api.calls.append(f"images.pull {ref}")
        self.present.add(ref)


class FakeContainers:
    def __init__(self, api: "FakeApi"):
        self.api = api

    def run(self, **kwargs):
        self.api.calls.append("run")
        self.api.run_kwargs.append(kwargs)
        container = FakeContainer(self.api, self.api.log, self.api.exit_code,
                                  kwargs.get("auto_remove", False), self.api.after_log)
        self.api.created.append(container)
        return container


class FakeApi:
    """docker.DockerClient stand-in: one image store, containers that print `log` and exit."""

    def __init__(self, exit_code: int = 0, log: list[bytes] | None = None,
                 present: set[str] | None = None, after_log=None):
        self.exit_code, self.after_log = exit_code, after_log
        self.log = log if log is not None else [b"step says hello\n"]
        self.calls: list[str] = []
        self.run_kwargs: list[dict] = []
        self.created: list[FakeContainer] = []
        self.images = FakeImages(self, set(present if present is not None else {IMAGE}))
        self.containers = FakeContainers(self)

    def info(self):
        return {"SecurityOptions": []}

    def close(self):
        self.calls.append("close")


# ---- the race workaround -------------------------------------------------------------------

def test_failing_container_is_a_failure_and_removed_after_wait(tmp_path, capsys):
    api = FakeApi(exit_code=1, log=[b"Traceback\nValueErr", b"or: boom\n"])
    recorder = ContainerRecorder(tmp_path / "containers.json")
    code = recorder.run(api, IMAGE, COMMAND, {"/root": {"bind": "/root", "mode": "rw"}},
                        labels={"a": "b"})
    assert code == 1
    assert api.calls == [f"images.get {IMAGE}", "run", "logs", "wait", "remove"]
    kwargs = api.run_kwargs[0]
    assert kwargs["auto_remove"] is False and kwargs["detach"] is True
    assert kwargs["labels"] == {"a": "b"} and kwargs["command"] == COMMAND
    assert kwargs["volumes"] == {"/root": {"bind": "/root", "mode": "rw"}}
    # Lines split across chunks come out whole.
    assert capsys.readouterr().out.splitlines()[-2:] == ["Traceback", "ValueError: boom"]
    [run] = recorder.runs
    assert (run.image, run.function, run.exit_code) == (IMAGE, "download_archive", 1)
    assert run.container_id == api.created[0].id and run.start_seconds <= run.seconds
    saved = json.loads((tmp_path / "containers.json").read_text())
    assert saved == [{"container_id": run.container_id, "image": IMAGE, "function": "download_archive",
                      "exit_code": 1, "start_seconds": run.start_seconds, "seconds": run.seconds}]


def test_succeeding_container_is_a_success():
    api = FakeApi(exit_code=0)
    recorder = ContainerRecorder()
    assert recorder.run(api, IMAGE, COMMAND, {}) == 0
    assert api.calls[-3:] == ["logs", "wait", "remove"] and api.created[0].removed
    assert [r.exit_code for r in recorder.runs] == [0]


def test_stock_kfp_reports_a_failed_step_as_success_in_the_race_and_ours_does_not():
    # The bug being worked around: kfp 2.17 starts with auto_remove=True and reads
    # "container already removed" as exit code 0.
    stock = docker_task_handler.run_docker_container
    racy = FakeApi(exit_code=1)
    assert stock(client=racy, image=IMAGE, command=COMMAND, volumes={}) == 0
    assert racy.run_kwargs[0]["auto_remove"] is True

    ours = FakeApi(exit_code=1)
    assert ContainerRecorder().run(ours, IMAGE, COMMAND, {}) == 1


def test_log_stream_keeps_utf8_characters_split_across_chunks(capsys):
    text = "naïve Zoë\n".encode()
    split = text.index("ï".encode()) + 1        # inside the two-byte ï
    api = FakeApi(log=[text[:split], text[split:], b"no newline at the end"])
    ContainerRecorder().run(api, IMAGE, COMMAND, {})
    assert capsys.readouterr().out.splitlines()[-2:] == ["naïve Zoë", "no newline at the end"]


def interrupt():
    raise KeyboardInterrupt


def test_interrupted_run_force_removes_the_container():
    api = FakeApi(after_log=interrupt)
    recorder = ContainerRecorder()
    with pytest.raises(KeyboardInterrupt):
        recorder.run(api, IMAGE, COMMAND, {})
    assert api.calls[-2:] == ["logs", "remove(force)"] and api.created[0].removed
    assert recorder.runs == []


def test_missing_image_is_pulled_first():
    api = FakeApi(present=set())
    ContainerRecorder().run(api, IMAGE, COMMAND, {})
    assert api.calls[:3] == [f"images.get {IMAGE}", f"images.pull {IMAGE}", "run"]


def test_untagged_image_gets_latest_as_kfp_does():
    api = FakeApi(present={"registry.example/x:latest"})
    ContainerRecorder().run(api, "registry.example/x", COMMAND, {})
    assert api.run_kwargs[0]["image"] == "registry.example/x:latest"


def test_auto_remove_in_the_runner_arguments_is_refused():
    api = FakeApi()
    with pytest.raises(FacenetError, match="auto_remove"):
        ContainerRecorder().run(api, IMAGE, COMMAND, {}, auto_remove=True)
    assert "run" not in api.calls


def test_step_function_reads_the_kfp_command():
    assert step_function(COMMAND) == "download_archive"
    assert step_function(["python3", "-c", "pass"]) == ""
    assert step_function(["x", "--function_to_execute"]) == ""


# ---- the patch inside kfp ------------------------------------------------------------------

@pytest.mark.parametrize("exit_code, expected", [(0, status.Status.SUCCESS), (3, status.Status.FAILURE)])
def test_kfp_task_handler_runs_through_the_recorder(tmp_path, monkeypatch, exit_code, expected):
    api = FakeApi(exit_code=exit_code)
    monkeypatch.setattr(docker, "from_env", lambda: api)
    handler = docker_task_handler.DockerTaskHandler(
        image=IMAGE, full_command=COMMAND, pipeline_root=str(tmp_path),
        runner=local.DockerRunner(labels={RUN_LABEL: str(tmp_path)}))
    with race_free_containers(tmp_path / "containers.json") as recorder:
        assert handler.run() == expected
    assert api.run_kwargs[0]["auto_remove"] is False
    assert api.run_kwargs[0]["labels"] == {RUN_LABEL: str(tmp_path)}
    assert api.run_kwargs[0]["volumes"][str(tmp_path)]["bind"] == str(tmp_path)
    assert [r.exit_code for r in recorder.runs] == [exit_code]
    assert api.calls[-2:] == ["remove", "close"]


def test_patch_is_restored_after_the_block_and_after_an_error(tmp_path):
    original = docker_task_handler.run_docker_container
    with race_free_containers() as recorder:
        assert docker_task_handler.run_docker_container == recorder.run
    assert docker_task_handler.run_docker_container is original
    with pytest.raises(RuntimeError, match="step blew up"):
        with race_free_containers():
            raise RuntimeError("step blew up")
    assert docker_task_handler.run_docker_container is original


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers live in the main thread")
def test_sigterm_during_a_step_removes_its_container_and_exits():
    before = signal.getsignal(signal.SIGTERM)
    api = FakeApi(after_log=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exited:
        with race_free_containers() as recorder:
            assert signal.getsignal(signal.SIGTERM) is not before
            recorder.run(api, IMAGE, COMMAND, {})
            time.sleep(5)   # not reached: the signal arrives during the log stream
    assert exited.value.code == 128 + signal.SIGTERM
    assert api.calls[-2:] == ["logs", "remove(force)"] and api.created[0].removed
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupted_block_removes_containers_still_running_in_other_threads():
    release, started = threading.Event(), threading.Event()
    api = FakeApi(after_log=lambda: (started.set(), release.wait(10)))
    errors = []

    def step(recorder):
        try:
            recorder.run(api, IMAGE, COMMAND, {})
        except docker.errors.NotFound as exc:   # its wait(): the container was removed under it
            errors.append(exc)

    with pytest.raises(KeyboardInterrupt):
        with race_free_containers() as recorder:
            worker = threading.Thread(target=step, args=(recorder,))
            worker.start()
            assert started.wait(10)
            raise KeyboardInterrupt
    assert api.created[0].removed and "remove(force)" in api.calls
    release.set()
    worker.join(10)
    assert len(errors) == 1 and recorder.runs == []


def test_records_file_starts_empty_for_each_run(tmp_path):
    path = tmp_path / "containers.json"
    path.write_text(json.dumps([{"container_id": "old"}]))
    with race_free_containers(path):
        assert json.loads(path.read_text()) == []


# ---- mounts and the containers' user -------------------------------------------------------

def mounts_of(runner: local.DockerRunner) -> dict[str, dict]:
    return {m["Target"]: m for m in runner.container_run_args.get("mounts", [])}


def test_local_inputs_are_mounted_read_only_at_the_same_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    archive = tmp_path / "data" / "lfw.tgz"
    archive.parent.mkdir()
    archive.write_bytes(b"x")
    pairs = tmp_path / "pairs dir" / "pairs.txt"
    pairs.parent.mkdir()
    pairs.write_text("10\t300\n")
    inside = root / "already-mounted.tgz"
    inside.write_bytes(b"y")
    runner = make_docker_runner(root, inputs={
        "data.source_uri": str(archive),
        "data.pairs_uri": "file://" + str(pairs).replace(" ", "%20"),
        "other": str(inside),
        "remote": "https://ndownloader.figshare.com/files/5976018",
        "gcs": "gs://bucket/lfw.tgz",
        "empty": "",
    }, user="1234:1234")
    mounts = mounts_of(runner)
    assert set(mounts) == {str(archive), str(pairs)}
    for path, mount in mounts.items():
        assert mount["Source"] == path and mount["Type"] == "bind" and mount["ReadOnly"] is True
    assert runner.container_run_args["labels"] == {RUN_LABEL: str(root)}
    assert runner.container_run_args["user"] == "1234:1234"


def test_checkpoint_root_is_created_and_mounted_writable(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    checkpoints = tmp_path / "ckpt" / "facenet"
    runner = make_docker_runner(root, output_dirs={"cluster.checkpoint_root": str(checkpoints),
                                                   "remote": "gs://bucket/ckpt", "unset": ""},
                                user="1234:1234")
    assert checkpoints.is_dir()
    assert mounts_of(runner)[str(checkpoints)]["ReadOnly"] is False


@pytest.mark.parametrize("uri, message", [
    ("data/demo/lfw.tgz", "must be absolute"),
    ("~/lfw.tgz", "must be absolute"),
    ("/nonexistent/facenet/lfw.tgz", "not found"),
])
def test_bad_local_inputs_are_refused_before_any_container(tmp_path, uri, message):
    with pytest.raises(InputError, match=rf"data\.source_uri=.*{message}"):
        make_docker_runner(tmp_path, inputs={"data.source_uri": uri}, user="1234:1234")


def test_relative_pipeline_root_is_refused():
    with pytest.raises(InputError, match="absolute"):
        make_docker_runner("local_outputs", user="1234:1234")


def test_local_path_reads_file_uris_and_plain_paths():
    assert local_path("/a/b.tgz") == Path("/a/b.tgz")
    assert local_path("file:///a/b%20c.tgz") == Path("/a/b c.tgz")
    assert local_path("https://host/x.tgz") is None and local_path("gs://b/x") is None
    assert local_path("") is None


def test_container_user_is_the_image_user_for_root_else_the_callers_ids():
    assert container_user(0, 0) is None
    assert container_user(1001, 100) == "1001:100"


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_root_gives_the_pipeline_root_to_the_image_user(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    runner = make_docker_runner(root)
    assert "user" not in runner.container_run_args
    assert (root.stat().st_uid, root.stat().st_gid) == (IMAGE_UID, IMAGE_GID)


def test_image_user_matches_the_dockerfiles():
    for dockerfile in ("Dockerfile", "trainer.Dockerfile"):
        users = re.findall(r"^USER\s+(\S+)", (ROOT / "images" / dockerfile).read_text(), re.M)
        assert users and users[-1] == f"{IMAGE_UID}:{IMAGE_GID}", dockerfile


def test_run_local_mounts_the_runs_inputs_and_records_containers(tmp_path, monkeypatch):
    seen = {}

    def fake_make_docker_runner(root, inputs=None, output_dirs=None, user=None):
        seen.update(root=root, inputs=inputs, output_dirs=output_dirs)
        raise InputError("stop before any container")

    monkeypatch.setattr(docker_runner, "make_docker_runner", fake_make_docker_runner)
    from pipelines.run_local import run_pipeline

    with pytest.raises(InputError, match="stop before any container"):
        run_pipeline(None, "/data/lfw.tgz", "", "/data/pairs.txt", str(tmp_path / "root"),
                     runner="docker", overrides={"cluster": {"checkpoint_root": "/ckpt",
                                                             "tensorboard_root": "/events"}})
    assert seen == {"root": tmp_path / "root",
                    "inputs": {"data.source_uri": "/data/lfw.tgz", "data.pairs_uri": "/data/pairs.txt"},
                    "output_dirs": {"cluster.checkpoint_root": "/ckpt", "cluster.tensorboard_root": "/events"}}


# ---- images/podman.sh with a fake podman ---------------------------------------------------

FAKE_PODMAN = r'''#!/usr/bin/env python3
"""Fake podman: 'info' prints the driver; 'system service ... unix://SOCK' listens on SOCK."""
import os, socket, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_PODMAN_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
if args[:1] == ["info"]:
    print(os.environ.get("FAKE_DRIVER", "overlay"))
elif "system" in args and "service" in args:
    if os.environ.get("FAKE_SERVICE_FAILS"):
        sys.exit("Error: cannot listen")
    path = args[-1].removeprefix("unix://")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    while True:
        time.sleep(1)
else:
    sys.exit(f"fake podman: unexpected {args}")
'''


@pytest.fixture
def podman_env():
    # A short folder: a unix socket path must stay under 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "podman"
    fake.write_text(FAKE_PODMAN.replace("/usr/bin/env python3", sys.executable, 1))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_HOST", "STORAGE_DRIVER", "CONTAINERS_CONF", "CONTAINER_TOOL")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PODMAN_DIR=str(folder / "svc"),
               FAKE_PODMAN_LOG=str(folder / "podman.log"), CONTAINER_TOOL="buildah",
               PODMAN_START_TIMEOUT="60")
    yield env, folder / "svc"
    pid_file = folder / "svc" / "service.pid"
    if pid_file.exists():   # a test failed half-way: stop what it started, by pid
        subprocess.run(["bash", str(PODMAN_SH), "stop"], env=env, timeout=30)
    shutil.rmtree(folder)


def podman_sh(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PODMAN_SH), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of an exited shell is reaped by init; a zombie counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_podman_sh_starts_and_stops_the_service_by_pid(podman_env):
    env, svc = podman_env
    started = podman_sh(env, "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"DOCKER_HOST=unix://{svc}/podman.sock"
    assert "storage driver overlay" in started.stderr
    pid = int((svc / "service.pid").read_text())
    assert alive(pid) and (svc / "podman.sock").is_socket()
    assert podman_sh(env, "status").returncode == 0
    again = podman_sh(env, "start")
    assert again.returncode != 0 and f"already running (pid {pid}" in again.stderr

    stopped = podman_sh(env, "stop")
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stderr
    deadline = time.monotonic() + 60   # a bound, not a speed check
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert not (svc / "service.pid").exists() and not (svc / "podman.sock").exists()
    assert podman_sh(env, "status").returncode == 3
    assert "not running" in podman_sh(env, "stop").stderr


def test_podman_sh_never_kills_a_process_that_is_not_its_service(podman_env):
    env, svc = podman_env
    svc.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (svc / "service.pid").write_text(f"{other.pid}\n")
        result = podman_sh(env, "stop")
        assert result.returncode == 0 and "is not a running podman service" in result.stderr
        assert other.poll() is None and not (svc / "service.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_podman_sh_exec_runs_the_command_against_the_service_then_stops_it(podman_env, tmp_path):
    env, svc = podman_env
    out = tmp_path / "seen"
    script = f'echo "$DOCKER_HOST $CONTAINERS_CONF" > {out}; cat {svc}/service.pid >> {out}; exit 7'
    result = podman_sh(env, "exec", "bash", "-c", script)
    assert result.returncode == 7, result.stderr
    host, conf, pid = out.read_text().split()
    assert host == f"unix://{svc}/podman.sock" and conf == str(ROOT / "images" / "containers.conf")
    assert f"stopped (pid {pid})" in result.stderr and not (svc / "service.pid").exists()
    deadline = time.monotonic() + 60   # a bound, not a speed check
    while alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid))


def test_podman_sh_exec_keeps_a_service_it_did_not_start(podman_env):
    env, svc = podman_env
    assert podman_sh(env, "start").returncode == 0
    pid = int((svc / "service.pid").read_text())
    result = podman_sh(env, "exec", "true")
    assert result.returncode == 0 and "left running" in result.stderr and alive(pid)
    assert podman_sh(env, "stop").returncode == 0


def test_podman_sh_exec_uses_docker_host_when_set(podman_env):
    env, svc = podman_env
    result = podman_sh({**env, "DOCKER_HOST": "tcp://127.0.0.1:2375"}, "exec", "bash", "-c",
                       'echo "$DOCKER_HOST"')
    assert result.returncode == 0 and result.stdout.strip() == "tcp://127.0.0.1:2375"
    assert not svc.exists()


def test_podman_sh_reports_a_service_that_dies_at_start(podman_env):
    env, svc = podman_env
    result = podman_sh({**env, "FAKE_SERVICE_FAILS": "1"}, "start")
    assert result.returncode != 0 and "exited before creating" in result.stderr
    assert "cannot listen" in result.stderr and not (svc / "service.pid").exists()


def test_podman_sh_storage_driver(podman_env):
    env, _ = podman_env
    assert podman_sh({**env, "FAKE_DRIVER": "vfs"}, "driver").stdout.strip() == "vfs"
    assert podman_sh({**env, "STORAGE_DRIVER": "overlay"}, "driver").stdout.strip() == "overlay"
    bad = podman_sh({**env, "STORAGE_DRIVER": "btrfs"}, "driver")
    assert bad.returncode != 0 and "use overlay or vfs" in bad.stderr
    started = podman_sh({**env, "FAKE_DRIVER": "vfs"}, "start")
    assert "storage driver vfs (no overlay" in started.stderr
    assert podman_sh(env, "stop").returncode == 0
    # podman picks the driver itself unless STORAGE_DRIVER says otherwise.
    calls = Path(env["FAKE_PODMAN_LOG"]).read_text().splitlines()
    assert any(c.startswith("system service --time=0 unix://") for c in calls)


def test_progress_cadence_of_the_local_run_reaches_the_container(monkeypatch):
    """$FACENET_PROGRESS_EVERY (pipelines/run_local.py sets it for its steps) goes into the container's
    environment as it reaches subprocess steps; a step's own environment keeps its values."""
    from facenet_kfp.progress import EVERY_ENV

    monkeypatch.delenv(EVERY_ENV, raising=False)
    api = FakeApi()
    ContainerRecorder().run(api, IMAGE, COMMAND, {})
    assert "environment" not in api.run_kwargs[-1]
    monkeypatch.setenv(EVERY_ENV, "30.0")
    ContainerRecorder().run(api, IMAGE, COMMAND, {})
    assert api.run_kwargs[-1]["environment"] == {EVERY_ENV: "30.0"}
    ContainerRecorder().run(api, IMAGE, COMMAND, {}, environment={"A": "1", EVERY_ENV: "5"})
    assert api.run_kwargs[-1]["environment"] == {EVERY_ENV: "5", "A": "1"}
    ContainerRecorder().run(api, IMAGE, COMMAND, {}, environment=["A=1"])
    assert api.run_kwargs[-1]["environment"] == [f"{EVERY_ENV}=30.0", "A=1"]
