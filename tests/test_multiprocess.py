"""Multi-process JAX training: the process group's environment, `train --processes`, one model over processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facenet_kfp import multiprocess
from facenet_kfp.cli import main
from facenet_kfp.errors import InputError
from facenet_kfp.multiprocess import COORDINATOR, NUM_PROCESSES, PROCESS_ID, Cluster, cluster_from_env

from tests.builders import build_train_inputs

ROOT = Path(__file__).resolve().parents[1]
GROUP = {COORDINATOR: "10.0.0.7:1234", NUM_PROCESSES: "2", PROCESS_ID: "1"}

# tests/test_train.py's tiny run, as `--set` options, shortened to a few steps.
SETTINGS = {"architecture": "small_cnn", "image_size": 32, "crop_fraction": 0.8, "embedding_dim": 16, "p": 4,
            "k": 4, "loss": "batch_hard", "margin": 0.5, "squared": "true", "learning_rate": 2e-3,
            "lr_schedule": "constant", "warmup_steps": 0, "max_steps": 6, "augment": "true", "validate_every": 3,
            "validation_batches": 2, "checkpoint_every": 3, "log_every": 3, "precision": "float32", "seed": 0}


# ----------------------------------------------------------------------------- the environment

def test_no_variables_is_no_group():
    assert cluster_from_env({"PATH": "/bin", COORDINATOR: " "}) is None      # empty counts as unset


def test_the_three_variables_make_a_group():
    assert cluster_from_env(GROUP) == Cluster("10.0.0.7:1234", 2, 1)
    assert cluster_from_env({**GROUP, NUM_PROCESSES: "1", PROCESS_ID: "0"}) == Cluster("10.0.0.7:1234", 1, 0)


@pytest.mark.parametrize("missing", [COORDINATOR, NUM_PROCESSES, PROCESS_ID])
def test_some_of_the_variables_are_refused_naming_the_missing_one(missing):
    environ = {k: v for k, v in GROUP.items() if k != missing}
    with pytest.raises(InputError, match=rf"environment variable {missing} not set"):
        cluster_from_env(environ)


@pytest.mark.parametrize("name, value, message", [
    (NUM_PROCESSES, "two", r"JAX_NUM_PROCESSES='two' is not an integer"),
    (PROCESS_ID, "1.0", r"JAX_PROCESS_ID='1.0' is not an integer"),
    (NUM_PROCESSES, "0", r"JAX_NUM_PROCESSES=0 must be at least 1"),
    (PROCESS_ID, "2", r"JAX_PROCESS_ID=2 must be in 0..1"),
    (PROCESS_ID, "-1", r"JAX_PROCESS_ID=-1 must be in 0..1"),
    (COORDINATOR, "10.0.0.7", r"JAX_COORDINATOR_ADDRESS='10.0.0.7' is not host:port"),
    (COORDINATOR, "10.0.0.7:99999", r"JAX_COORDINATOR_ADDRESS='10.0.0.7:99999' is not host:port"),
])
def test_bad_values_are_refused_naming_the_variable(name, value, message):
    with pytest.raises(InputError, match=message):
        cluster_from_env({**GROUP, name: value})


def test_processes_need_the_jax_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    argv = ["train", *(str(tmp_path / n) for n in ("images", "completion", "labels", "splits")),
            "--out", str(tmp_path / "model"), "--processes", "2"]
    assert main(argv) == 2
    assert "train --processes 2: multi-process training runs on JAX; set KERAS_BACKEND=jax" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- local process groups

CHILD = """
import os, sys, time
out = sys.argv[1]
with open(os.path.join(out, os.environ["JAX_PROCESS_ID"]), "w") as f:
    f.write(" ".join([str(os.getpid()), os.environ["JAX_COORDINATOR_ADDRESS"], os.environ["JAX_NUM_PROCESSES"]]))
if sys.argv[2] == "fail" and os.environ["JAX_PROCESS_ID"] == "1":
    while not os.path.exists(os.path.join(out, "0")):
        time.sleep(0.05)
    sys.exit(3)
if sys.argv[2] == "fail":
    time.sleep(600)
"""


def _children(out: Path) -> dict[str, list[str]]:
    return {f.name: f.read_text().split() for f in out.iterdir()}


def test_run_local_gives_each_child_its_id_and_one_coordinator(tmp_path):
    rc = multiprocess.run_local([str(tmp_path), "ok"], 3, program=[sys.executable, "-c", CHILD])
    assert rc == 0
    children = _children(tmp_path)
    assert sorted(children) == ["0", "1", "2"]
    coordinators = {c[1] for c in children.values()}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    assert {c[2] for c in children.values()} == {"3"}


def test_run_local_fails_when_a_child_fails_and_stops_the_others(tmp_path):
    rc = multiprocess.run_local([str(tmp_path), "fail"], 2, program=[sys.executable, "-c", CHILD])
    assert rc == 3
    waiting = int(_children(tmp_path)["0"][0])
    with pytest.raises(ProcessLookupError):        # stopped and reaped, not left sleeping
        os.kill(waiting, 0)


def test_run_local_refuses_inside_a_group():
    with pytest.raises(InputError, match=r"--processes 2: JAX_COORDINATOR_ADDRESS, .* are already set"):
        multiprocess.run_local(["train"], 2, environ=GROUP)


AGREE = """
import os, sys
from facenet_kfp import multiprocess
from facenet_kfp.errors import FacenetError
multiprocess.initialize()
value = int(os.environ["JAX_PROCESS_ID"]) if sys.argv[1] == "differ" else 5
try:
    multiprocess.check_agree(value, "the test value")
except FacenetError as exc:
    print(exc)
    sys.exit(4)
"""


@pytest.mark.slow
@pytest.mark.parametrize("values, rc", [("same", 0), ("differ", 4)])
def test_processes_check_they_agree(values, rc, capfd):
    environ = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    assert multiprocess.run_local([values], 2, environ=environ, program=[sys.executable, "-c", AGREE]) == rc
    if rc:
        assert "the 2 processes disagree on the test value: [0, 1] (by process id)" in capfd.readouterr().out


# ----------------------------------------------------------------------------- each process's part of a batch

def test_the_parts_of_a_batch_make_the_global_batch():
    from facenet_kfp.numpy_input import TrainBatches
    from tests.builders import face_image

    labels = np.repeat(np.arange(6), 3)
    images = [face_image(int(identity), v, size=24) for v, identity in enumerate(labels)]
    args = (images, labels, 4, 2, 16, 0.8, True, 7)
    with TrainBatches(*args, start_batch=2, workers=0) as whole:
        expected = [next(whole) for _ in range(3)]
    parts = []
    for i in range(2):
        with TrainBatches(*args, start_batch=2, workers=0, part=(i, 2)) as part:
            parts.append([next(part) for _ in range(3)])
    for b, (x, y) in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([parts[0][b][0], parts[1][b][0]]), x)
        np.testing.assert_array_equal(np.concatenate([parts[0][b][1], parts[1][b][1]]), y)
        assert len(np.unique(parts[0][b][1])) == 2 and not set(parts[0][b][1]) & set(parts[1][b][1])


@pytest.mark.parametrize("part", [(0, 3), (2, 2), (-1, 2), (0, 0)])
def test_parts_must_hold_whole_identities(part):
    from facenet_kfp.numpy_input import TrainBatches

    with pytest.raises(InputError, match=rf"part {part[0]} of {part[1]}: the parts must divide p=4"):
        TrainBatches([b"x"] * 8, np.repeat(np.arange(4), 2), 4, 2, 16, 0.8, False, 0, workers=0, part=part)


# ----------------------------------------------------------------------------- training

def _train_command(d: dict, out: Path, processes: int | None, **settings) -> list[str]:
    argv = [sys.executable, "-m", "facenet_kfp.cli", "-q", "train", str(d["dataset"]), str(d["completion"]),
            str(d["labels"]), str(d["splits"]), "--out", str(out)]
    for key, value in {**SETTINGS, **settings}.items():
        argv += ["--set", f"{key}={value}"]
    return argv + (["--processes", str(processes)] if processes else [])


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(argv: list[str], devices: int) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two checkpoints' model and optimizer arrays."""
    with np.load(a) as x, np.load(b) as y:
        keys = [k for k in x.files if k.startswith(("model/", "head/", "optimizer/"))]
        assert keys and sorted(keys) == sorted(k for k in y.files if k.startswith(("model/", "head/", "optimizer/")))
        return max(float(np.max(np.abs(x[k].astype(np.float64) - y[k]))) for k in keys)


# Under JAX one jitted step computes the loss of the whole batch, however many devices hold it: nothing
# sums per-device gradients, so the loss the gradients come from is the batch's loss, not 1/devices of it.
LOSS_ON_TWO_DEVICES = """
import numpy as np
from facenet_kfp.config import TrainConfig
from facenet_kfp.trainer import Placement, build_trainer
config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=16, p=4, k=4, margin=0.5)
placement = Placement()
trainer = build_trainer(config, "float32", placement)
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (16, 32, 32, 3)).astype("float32")
y = np.repeat(np.arange(4), 4).astype("int32")
y_pred = trainer(x)
print(placement.replicas, placement.loss_replicas, float(trainer.compute_loss(y=y, y_pred=y_pred)),
      float(trainer.statistics(y, y_pred)["loss"]))
"""


def test_the_loss_on_two_jax_devices_is_the_whole_batch_loss():
    result = subprocess.run([sys.executable, "-c", LOSS_ON_TWO_DEVICES], cwd=ROOT, env=_env(2),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas, loss_replicas, loss, batch_loss = result.stdout.split()[-4:]
    assert (int(replicas), int(loss_replicas)) == (2, 1)
    assert float(batch_loss) > 0.01
    assert float(loss) == pytest.approx(float(batch_loss), rel=1e-6)


# Both runs execute the same XLA program partitioned over 2 devices, one half of each batch per device; only
# the transport of the gradients' all-reduce differs (in-process vs Gloo between processes). A sum of two
# float32 operands is the same either way, so the weights should agree bitwise (measured: 0.0); the bound leaves
# room for a different reduction order only: a few float32 ulps per step of Adam at learning rate 2e-3 on weights
# of magnitude ~1, over 6 steps, stays far below 1e-5, while one batch fed to the wrong process or device
# (different triplets mined) moves weights by ~1e-3.
WEIGHT_TOLERANCE = 1e-5


@pytest.mark.slow
def test_two_processes_train_what_one_process_with_two_devices_trains(tmp_path):
    d = build_train_inputs(tmp_path / "inputs")
    _run(_train_command(d, tmp_path / "two", 2), devices=1)
    _run(_train_command(d, tmp_path / "one", None), devices=2)

    ckpt = tmp_path / "two.ckpt"
    assert sorted(p.name for p in ckpt.glob("ckpt-*.npz")) == ["ckpt-3.npz", "ckpt-6.npz"]
    assert (tmp_path / "two" / "model.json").is_file()
    difference = _max_difference(ckpt / "ckpt-6.npz", tmp_path / "one.ckpt" / "ckpt-6.npz")
    assert difference <= WEIGHT_TOLERANCE
    with np.load(ckpt / "ckpt-6.npz") as trained, np.load(ckpt / "ckpt-3.npz") as earlier:
        moved = max(float(np.max(np.abs(trained[k] - earlier[k]))) for k in trained.files if k.startswith("model/"))
    assert moved > 100 * WEIGHT_TOLERANCE        # the weights did train: the comparison can fail


def _metrics(stdout: str) -> dict:
    """The first JSON object `train` printed (each process prints the same metrics)."""
    import json
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


@pytest.mark.slow
def test_a_killed_process_fails_the_group_and_a_rerun_resumes(tmp_path):
    import json

    d = build_train_inputs(tmp_path / "inputs")
    settings = {"max_steps": 200, "validate_every": 0, "checkpoint_every": 3, "log_every": 50}
    argv = _train_command(d, tmp_path / "model", 2, **settings)
    ckpt = tmp_path / "model.ckpt"
    group = subprocess.Popen(argv, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "ckpt-3.npz").exists():
            assert group.poll() is None and time.monotonic() < deadline, "no checkpoint of step 3"
            time.sleep(0.05)
        chief = json.loads((ckpt / ".train.lock").read_text())["pid"]      # process 0 holds the lock
        os.kill(chief, signal.SIGKILL)
        _, stderr = group.communicate(timeout=120)
    finally:
        if group.poll() is None:
            group.kill()
            group.wait()
    assert group.returncode == 2, stderr[-3000:]
    assert "train --processes 2: a training process failed (exit status 137)" in stderr
    assert not (tmp_path / "model").exists()
    last = max(int(p.stem.split("-")[1]) for p in ckpt.glob("ckpt-*.npz"))
    assert 3 <= last < 200

    metrics = _metrics(_run(argv, devices=1).stdout)
    assert metrics["start_step"] == last and metrics["steps"] == 200
    made = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (made["trained_steps"], made["start_step"], made["replicas"]) == (200, last, 2)
