"""Check a freshly installed image venv against requirements/lock.txt (runs in the builder stages).

Run with the venv's interpreter. Checks, each a build failure when it does not hold:

* every distribution installed in the venv itself (sys.prefix) is pinned in the lock and has
  exactly the locked version; exempt: the project (facenet-kfp) and pip. ``--lock`` may be given
  more than once (the JAX trainer image: requirements/lock.txt and requirements/jax-cuda.txt):
  the pins of all the files count, and a name pinned at two versions is an error;
* each ``--from-base NAME`` is importable from outside the venv (the base image's site-packages),
  pinned in the lock, and has the locked version, i.e. pip kept the base's copy;
* each ``--absent NAME`` is not installed at all (no TensorFlow in the light image);
* each ``--import MODULE`` imports;
* each ``--no-import MODULE`` is not importable at all (no module of that name on sys.path);
* ``--keras-backend NAME``: Keras imports and runs on that backend (KERAS_BACKEND of the image).

Only the standard library is used: the script must run before anything else is trusted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import logging
import os
import re
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("check_env")

# Installed by the build itself rather than resolved from the lock.
EXEMPT = {"facenet-kfp", "pip"}


def normalize(name: str) -> str:
    """PEP 503 project-name normalisation: 'Foo_Bar.baz' -> 'foo-bar-baz'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """Pins of a 'name==version' file (comments and blank lines skipped), keyed by normalised name."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise SystemExit(f"{path}: no pins found")
    return pins


def venv_site_dirs() -> list[str]:
    """site-packages folders of the running venv (purelib and platlib may coincide)."""
    if sys.prefix == sys.base_prefix:
        raise SystemExit(f"{sys.executable} is not a venv interpreter; run the venv's python")
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def is_inside(path: Path, folder: str) -> bool:
    try:
        path.resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def check_venv_pins(pins: dict[str, str]) -> list[str]:
    """Every distribution in the venv's own site-packages must be at its locked version."""
    problems = []
    found = 0
    for dist in metadata.distributions(path=venv_site_dirs()):
        name = normalize(dist.metadata["Name"])
        found += 1
        if name in EXEMPT:
            continue
        if name not in pins:
            problems.append(f"{name} {dist.version} is installed in {sys.prefix} but not pinned in the lock")
        elif dist.version != pins[name]:
            problems.append(f"{name} {dist.version} is installed in {sys.prefix}; the lock pins {pins[name]}")
    if found == 0:
        problems.append(f"no distributions found in {venv_site_dirs()}")
    log.info("venv %s: %d distributions checked against the lock", sys.prefix, found)
    return problems


def check_from_base(name: str, pins: dict[str, str]) -> list[str]:
    """NAME resolves to the base image's copy (outside the venv) at the locked version."""
    key = normalize(name)
    if key not in pins:
        return [f"--from-base {name}: not pinned in the lock"]
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return [f"{name} is not installed in the base image"]
    location = Path(str(dist.locate_file("")))
    if is_inside(location, sys.prefix):
        return [f"{name} {dist.version} was installed into the venv ({location}); the base's copy should satisfy the pin"]
    if dist.version != pins[key]:
        return [f"{name} {dist.version} in the base image ({location}); the lock pins {pins[key]}"]
    log.info("%s %s from the base image (%s)", name, dist.version, location)
    return []


def check_absent(name: str) -> list[str]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        log.info("%s: not installed, as required", name)
        return []
    return [f"{name} {dist.version} is installed ({dist.locate_file('')}) but must be absent"]


def read_locks(paths: list[Path]) -> dict[str, str]:
    """The pins of all the files together; SystemExit naming both files when two pin a name differently."""
    pins: dict[str, str] = {}
    where: dict[str, Path] = {}
    for path in paths:
        for name, version in read_lock(path).items():
            if name in pins and pins[name] != version:
                raise SystemExit(f"{name} is pinned at {pins[name]} in {where[name]} and at {version} in {path}")
            pins[name] = version
            where.setdefault(name, path)
    return pins


def check_not_importable(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None:
        log.info("import %s: not importable, as required", module)
        return []
    return [f"{module} is importable ({spec.origin}) but must not be"]


def check_keras_backend(name: str) -> list[str]:
    try:
        import keras
    except Exception as exc:  # any failure to import is the finding reported
        return [f"import keras failed: {type(exc).__name__}: {exc}"]
    backend = keras.backend.backend()
    if backend != name:
        return [f"Keras runs on the {backend} backend, not {name} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r})"]
    log.info("keras %s on the %s backend", keras.__version__, backend)
    return []


def check_import(module: str) -> list[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure to import is the finding reported
        return [f"import {module} failed: {type(exc).__name__}: {exc}"]
    log.info("import %s: ok", module)
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, action="append", required=True,
                        help="requirements/lock.txt; again for further pins")
    parser.add_argument("--from-base", action="append", default=[], metavar="NAME")
    parser.add_argument("--absent", action="append", default=[], metavar="NAME")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    parser.add_argument("--no-import", dest="no_imports", action="append", default=[], metavar="MODULE")
    parser.add_argument("--keras-backend", metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="check_env: %(message)s")

    pins = read_locks(args.lock)
    problems = check_venv_pins(pins)
    for name in args.from_base:
        problems += check_from_base(name, pins)
    for name in args.absent:
        problems += check_absent(name)
    for module in args.imports:
        problems += check_import(module)
    for module in args.no_imports:
        problems += check_not_importable(module)
    if args.keras_backend:
        problems += check_keras_backend(args.keras_backend)
    for problem in problems:
        log.error("FAIL: %s", problem)
    if problems:
        log.error("%d problem(s); the image environment does not match %s", len(problems),
                  " and ".join(map(str, args.lock)))
        return 1
    log.info("environment matches %s", " and ".join(map(str, args.lock)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
