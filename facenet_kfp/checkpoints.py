"""Checkpoints of a training run: save and restore, provenance, history, the folder's lock and leftovers.

Checkpoints go to `checkpoint_dir` every `checkpoint_every` steps as
`ckpt-<step>.npz` (`save_checkpoint`: every variable of the trainer, the
embedding model's, the objective's head's (if it has one) and the optimizer's,
its step counter included, and the step, as NumPy arrays, so a checkpoint of
either backend restores on the other), written atomically (a
gs:// URI works); the last two are kept, with the history so far and
`provenance.json`: the run key (the model output it trains for), the
fingerprints of the four inputs (`provenance.check_inputs`), the train
settings and the training code (`code_fingerprint`: the source of every
module of the package the training code imports, found by reading its import
statements). A new call with the same checkpoint folder
resumes from the latest checkpoint only when all of these match: that is how
a retried pod continues. A checkpoint written for anything else is refused,
naming what differs, never resumed silently. Changing max_steps on resume is
allowed (the cosine schedule then follows the new length), as are the other
RESUMABLE_CHANGES. A damaged checkpoint file is skipped with a warning for
the previous checkpoint; one of an earlier CHECKPOINT_FORMAT is refused. The
input stream resumes exactly (start_batch = the restored step), and the
learning rate follows the restored optimizer step.
(keras.callbacks.BackupAndRestore is not used: it restores the epoch only and
deletes its backup when `fit` ends.) Metrics and model.json give
`start_step`, the step this call began at.

A local checkpoint folder is locked (`training_lock`) while a training uses it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from facenet_kfp import __version__
from facenet_kfp.config import TrainConfig, to_dict
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import (delete, is_uri, join, list_names, no_space_error, no_space_named, read_bytes,
                                read_json_any, remove_stale_temps, write_bytes)
from facenet_kfp.trainer import backend

log = logging.getLogger("facenet_kfp.train")      # one logger for all of training's lines

TRAIN_LOCK = ".train.lock"       # in a local checkpoint folder: held (flock) by the training that uses it
HISTORY_JSON = "history.json"
PROVENANCE_JSON = "provenance.json"
CHECKPOINT_FORMAT = "facenet-kfp-checkpoint/3"
CHECKPOINTS_KEPT = 2
CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.npz")
TF_CHECKPOINT_NAME = re.compile(r"ckpt-\d+\.index")      # tf.train.Checkpoint files of earlier versions
# The modules the code fingerprint starts from: with every module of the package they import, directly or
# not, they decide the trained weights (`training_modules`).
TRAINING_ENTRY_MODULES = ("train", "trainer")
# Settings that may change between a run and its resumption: they do not change the model.
RESUMABLE_CHANGES = ("max_steps", "validate_every", "validation_batches", "checkpoint_every", "log_every")


# ----------------------------------------------------------------------------- checkpoints

def _sync(trainer: keras.Model) -> None:
    """Make the Keras variables hold the training state (under JAX, `fit` keeps it outside them)."""
    if backend() == "jax":
        trainer.jax_state_sync()


def checkpoint_steps(checkpoint_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoints in a folder, oldest first."""
    found = [(int(m.group(1)), join(checkpoint_dir, name)) for name in list_names(checkpoint_dir)
             if (m := CHECKPOINT_NAME.fullmatch(name))]
    return sorted(found)


class CheckpointFormatError(InputError):
    """A checkpoint file of another CHECKPOINT_FORMAT: refused, not skipped for an older checkpoint."""


def checkpoint_variables(trainer: keras.Model) -> dict[str, list]:
    """Every variable of the trainer's state, by group: "model" (the embedding model's weights),
    "head" (the trainer's other weights: the objective's head, if it has one) and "optimizer" (the
    optimizer's variables, its step counter included)."""
    model = list(trainer.embedding.weights)
    in_model = {id(v) for v in model}
    return {"model": model, "head": [v for v in trainer.weights if id(v) not in in_model],
            "optimizer": list(trainer.optimizer.variables)}


def checkpoint_arrays(trainer: keras.Model, step: int) -> dict[str, np.ndarray]:
    """{"step", "<group>/<i>" for each group of `checkpoint_variables`, "names"}: the training state as NumPy
    arrays.

    "names" is JSON: {"format": CHECKPOINT_FORMAT, "<group>": [variable paths]}.
    """
    _sync(trainer)
    arrays = {"step": np.asarray(step, np.int64)}
    groups = checkpoint_variables(trainer)
    for kind, variables in groups.items():
        for i, v in enumerate(variables):
            arrays[f"{kind}/{i:04d}"] = keras.ops.convert_to_numpy(v)
    names = {kind: [v.path for v in variables] for kind, variables in groups.items()}
    arrays["names"] = np.asarray(json.dumps({"format": CHECKPOINT_FORMAT, **names}))
    return arrays


def save_checkpoint(checkpoint_dir: str, trainer: keras.Model, step: int) -> str:
    """Write `ckpt-<step>.npz` atomically, keep the last CHECKPOINTS_KEPT; its path."""
    buffer = io.BytesIO()
    np.savez(buffer, **checkpoint_arrays(trainer, step))
    path = join(checkpoint_dir, f"ckpt-{step}.npz")
    write_bytes(path, buffer.getvalue())
    for _, old in checkpoint_steps(checkpoint_dir)[:-CHECKPOINTS_KEPT]:
        delete(old)
    return path


def _check_format(path: str, values: dict[str, np.ndarray]) -> None:
    """CheckpointFormatError naming the file unless its "names" record says CHECKPOINT_FORMAT."""
    recorded = json.loads(str(values["names"])) if "names" in values else None
    found = recorded.get("format") if isinstance(recorded, dict) else None
    if found != CHECKPOINT_FORMAT:
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        raise CheckpointFormatError(
            f"{path}: a checkpoint of format {found or 'unknown'}, written by an earlier version of the trainer "
            f"(this one writes and restores {CHECKPOINT_FORMAT}: every trainer variable), so it cannot be "
            f"resumed; delete {folder} to train from step 0, or choose another checkpoint folder "
            f"(train --checkpoint-dir, or cluster.checkpoint_root)")


def load_checkpoint(path: str, trainer: keras.Model) -> int:
    """Assign a checkpoint's arrays to every variable of the trainer (`checkpoint_variables`); its step.

    CheckpointFormatError (an InputError) for a checkpoint of another
    CHECKPOINT_FORMAT; ValueError (or a zip / I/O error) when the file is
    damaged or holds other variables than the trainer has.
    """
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"{path} is gone")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        values = {key: arrays[key] for key in arrays.files}
    _check_format(path, values)
    groups = checkpoint_variables(trainer)
    for kind, variables in groups.items():
        stored = sorted(k for k in values if k.startswith(f"{kind}/"))
        if len(stored) != len(variables):
            raise ValueError(f"{len(stored)} {kind} arrays for {len(variables)} variables")
        for key, variable in zip(stored, variables):
            if tuple(values[key].shape) != tuple(variable.shape):
                raise ValueError(f"{key} has shape {values[key].shape}, {variable.path} {variable.shape}")
    for kind, variables in groups.items():
        for i, variable in enumerate(variables):
            variable.assign(values[f"{kind}/{i:04d}"])
    return int(values["step"])


def restore_latest(checkpoint_dir: str, trainer: keras.Model) -> tuple[str | None, int]:
    """(path, step) of the newest readable checkpoint, restored into `trainer`; (None, 0) when there is none.

    A damaged checkpoint (truncated, unreadable or of other variables) is
    skipped with a warning for the previous one; when none can be read,
    InputError names each and what failed.
    """
    failures = []
    for _, path in reversed(checkpoint_steps(checkpoint_dir)):
        try:
            step = load_checkpoint(path, trainer)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures.append(f"{path}: {reason}")
            log.warning("cannot restore checkpoint %s: %s; trying the previous checkpoint", path, reason)
            continue
        if failures:
            log.warning("resuming from the previous checkpoint %s instead", path)
        return path, step
    if failures:
        raise InputError(f"{checkpoint_dir}: no checkpoint can be restored ({'; '.join(failures)}); "
                         f"delete {checkpoint_dir} to train from step 0")
    return None, 0


# ----------------------------------------------------------------------------- checkpoint folder

def default_checkpoint_dir(model_dir: str | os.PathLike) -> str:
    """`<model_dir>.ckpt`, next to the model folder (outside it: the model folder is replaced whole)."""
    model_dir = Path(model_dir)
    return str(model_dir.parent / (model_dir.name + ".ckpt"))


def _module_file(package_dir: Path, parts: tuple[str, ...]) -> Path | None:
    """The source file of module `parts` (names under the package), or None when there is none."""
    base = package_dir.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(tree: ast.AST, package: str, own: tuple[str, ...], is_package: bool) -> set[tuple[str, ...]]:
    """The modules of `package` an import statement of `tree` (anywhere: functions included) may load,
    as name parts under the package; `own` are the parts of the module `tree` is the source of."""
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = tuple(alias.name.split("."))
                if parts[0] == package:
                    found.add(parts[1:])
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            here = own if is_package else own[:-1]
            if node.level - 1 > len(here):
                continue
            base = here[:len(here) - (node.level - 1)]
            parts = base + tuple(node.module.split(".") if node.module else ())
        elif node.module and node.module.split(".")[0] == package:
            parts = tuple(node.module.split(".")[1:])
        else:
            continue
        found.add(parts)
        found.update(parts + (alias.name,) for alias in node.names)      # `from pkg import module`
    return found


def training_modules(package_dir: str | os.PathLike | None = None) -> list[str]:
    """Every module of the package (default: this one) the training code imports, as sorted dotted names.

    Starting from TRAINING_ENTRY_MODULES, the import statements of each module
    reached (at module level and inside functions, read with `ast`, not run)
    are followed through the package: `import pkg.a`, `from pkg import a`,
    `from pkg.a import f` and relative imports. The package's __init__ is
    always in; a module inside a subpackage (pkg/sub/x.py) brings in the
    whole subpackage, every module under pkg/sub/. Names that are not
    modules (a function imported from the package's __init__) add nothing.
    """
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    package = package_dir.name
    covered: dict[tuple[str, ...], Path] = {}

    def cover(files: dict[tuple[str, ...], Path]) -> None:
        for own, path in files.items():
            covered[own] = path
            tree = ast.parse(path.read_bytes(), filename=str(path))
            todo.extend(_imported_names(tree, package, own, path.name == "__init__.py"))

    todo: list[tuple[str, ...]] = [(name,) for name in TRAINING_ENTRY_MODULES]
    cover({(): package_dir / "__init__.py"})
    while todo:
        top = todo.pop()[:1]
        if not top or top in covered or (source := _module_file(package_dir, top)) is None:
            continue             # the package's __init__, done already, or a name that is not a module
        if source.name == "__init__.py":        # a subpackage: all of it
            cover({_module_parts(package_dir, path): path for path in sorted(source.parent.rglob("*.py"))})
        else:
            cover({top: source})
    return sorted(".".join((package, *parts)) for parts in covered)


def _module_parts(package_dir: Path, path: Path) -> tuple[str, ...]:
    """The name parts under the package of the module whose source is `path` (a package's: its __init__.py)."""
    parts = path.relative_to(package_dir).with_suffix("").parts
    return parts[:-1] if path.name == "__init__.py" else parts


def _module_path(package_dir: Path, name: str) -> Path:
    parts = tuple(name.split(".")[1:])
    return package_dir / "__init__.py" if not parts else _module_file(package_dir, parts)


def code_fingerprint(package_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"version": facenet-kfp version, "sha256": of the training modules' source, "modules": their sorted
    dotted names}: the code that trains (`training_modules`; default: this package)."""
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    modules = training_modules(package_dir)
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + _module_path(package_dir, name).read_bytes() + b"\0")
    return {"version": __version__, "sha256": digest.hexdigest(), "modules": modules}


def checkpoint_provenance(run_key: str, inputs: dict[str, str], config: TrainConfig) -> dict[str, Any]:
    """What provenance.json of a checkpoint folder records: run key, input fingerprints, settings, code."""
    return {"format": CHECKPOINT_FORMAT, "run": run_key, "inputs": dict(inputs), "train": to_dict(config),
            "code": code_fingerprint()}


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else repr(value)


def provenance_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every recorded item that must match for a resume (none: resumable)."""
    found = []
    if saved.get("run") != current["run"]:
        found.append(f"run: {saved.get('run')!r} -> {current['run']!r}")
    saved_inputs = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    for kind in sorted(set(saved_inputs) | set(current["inputs"])):
        if saved_inputs.get(kind) != current["inputs"].get(kind):
            found.append(f"inputs.{kind}: {_short(saved_inputs.get(kind))} -> "
                         f"{_short(current['inputs'].get(kind))}")
    saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    for key, value in current["train"].items():
        if key not in RESUMABLE_CHANGES and saved_train.get(key) != value:
            found.append(f"{key}: {saved_train.get(key)!r} -> {value!r}")
    saved_code = saved.get("code") if isinstance(saved.get("code"), dict) else {}
    for key, value in current["code"].items():
        if key == "modules" or saved_code.get(key) == value:
            continue
        if key == "sha256":
            covered = saved_code.get("modules")
            where = f" (of {', '.join(covered)})" if isinstance(covered, list) else ""
            found.append(f"code sha256{where}: {_short(saved_code.get(key))} -> {_short(value)}")
        else:
            found.append(f"code {key}: {_short(saved_code.get(key))} -> {_short(value)}")
    saved_modules = saved_code.get("modules") if isinstance(saved_code.get("modules"), list) else []
    current_modules = current["code"].get("modules", [])
    added = sorted(set(current_modules) - set(saved_modules))
    removed = sorted(set(saved_modules) - set(current_modules))
    if added or removed:
        found.append("code modules: " + ", ".join([*(f"+{m}" for m in added), *(f"-{m}" for m in removed)]))
    return found


def _check_resume(checkpoint_dir: str, current: dict[str, Any]) -> None:
    """Refuse a checkpoint that was not written for this run, these inputs, settings and code."""
    path = f"{checkpoint_dir.rstrip('/')}/{PROVENANCE_JSON}"
    saved = read_json_any(path)
    todo = (f"delete {checkpoint_dir} to train from step 0, or choose another checkpoint folder "
            f"(train --checkpoint-dir, or cluster.checkpoint_root)")
    if isinstance(saved, dict) and isinstance(saved.get("format"), str) and saved["format"] != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: the checkpoints in {checkpoint_dir} are of format {saved['format']}, written by "
                         f"an earlier version of the trainer; this one restores {CHECKPOINT_FORMAT} (every trainer "
                         f"variable) only; {todo}")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        what = "not found" if saved is None else f"not a {CHECKPOINT_FORMAT} record"
        raise InputError(f"{path}: {what}, so nothing says which inputs and settings made the checkpoint "
                         f"in {checkpoint_dir}; {todo}")
    differences = provenance_differences(saved, current)
    if differences:
        raise InputError(f"{checkpoint_dir}: the checkpoint was written for other inputs or settings "
                         f"({'; '.join(differences)}); resuming it would continue another model; {todo}")



def _read_history(path: str, checkpoint_dir: str) -> dict[str, Any]:
    """history.json of a checkpoint folder ({} when there is none): {"step": int, "train": [records],
    "val": [records]}, each record an object with an integer "step" and numbers; InputError naming the
    file when it is anything else."""
    saved = read_json_any(path)
    if saved is None:
        return {}
    todo = f"delete {checkpoint_dir} to train from step 0, or restore the file"
    if not isinstance(saved, dict):
        raise InputError(f"{path}: the training history is a JSON {type(saved).__name__}, not an object with "
                         f"step, train and val; {todo}")
    if isinstance(saved.get("step"), bool) or not isinstance(saved.get("step"), int):
        raise InputError(f"{path}: the training history has no integer step (got {saved.get('step')!r}); "
                         f"{todo}")
    for split in ("train", "val"):
        records = saved.get(split, [])
        if not isinstance(records, list):
            raise InputError(f"{path}: {split} is a JSON {type(records).__name__}, not a list of records; {todo}")
        for i, record in enumerate(records):
            if (not isinstance(record, dict) or isinstance(record.get("step"), bool)
                    or not isinstance(record.get("step"), int)):
                raise InputError(f"{path}: {split}[{i}] is not a record with an integer step ({record!r:.80}); "
                                 f"{todo}")
    return saved


def _restore(trainer, checkpoint_dir: str, provenance: dict[str, Any], config: TrainConfig):
    """(path restored or None, start step, history up to it) from the checkpoint folder."""
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    older = [name for name in list_names(checkpoint_dir) if TF_CHECKPOINT_NAME.fullmatch(name)]
    if older:
        raise InputError(f"{checkpoint_dir}: holds {older[-1]}, a TensorFlow checkpoint of an earlier version "
                         f"of the trainer, which this one cannot resume; delete {checkpoint_dir} to train from "
                         f"step 0, or choose another checkpoint folder")
    if not checkpoint_steps(checkpoint_dir):
        log.info("no checkpoint in %s: starting at step 0", checkpoint_dir)
        return None, 0, history
    _check_resume(checkpoint_dir, provenance)
    restored, start_step = restore_latest(checkpoint_dir, trainer)
    saved = _read_history(join(checkpoint_dir, HISTORY_JSON), checkpoint_dir)
    for split in ("train", "val"):
        history[split] = [r for r in saved.get(split, []) if r["step"] <= start_step]
    log.info("resuming from checkpoint %s at step %d of %d", restored, start_step, config.max_steps)
    if start_step >= config.max_steps:
        log.warning("the checkpoint in %s is at step %d, max_steps is %d: saving it as the model without "
                    "training; delete %s to train again", checkpoint_dir, start_step, config.max_steps,
                    checkpoint_dir)
    return restored, start_step, history



@contextlib.contextmanager
def _checkpoint_errors(checkpoint_dir: str, what: str):
    """A full disk or another OS error while writing `what` to the checkpoint folder -> FacenetError naming
    the folder ("no space left on <folder>" for a full disk, however deeply the OSError is nested)."""
    guard = contextlib.nullcontext() if is_uri(checkpoint_dir) else no_space_named(checkpoint_dir, what)
    with guard:
        try:
            yield
        except OSError as exc:
            if no_space_error(exc) is not None:
                raise
            where = exc.filename or checkpoint_dir
            raise FacenetError(f"{checkpoint_dir}: cannot write {what} "
                               f"({where}: {exc.strerror or exc}); choose another checkpoint folder "
                               f"(train --checkpoint-dir, or cluster.checkpoint_root)") from exc



# ----------------------------------------------------------------------------- lock and leftovers

_TEMP_NAME = re.compile(r"\.(.+)\.tmp-\d+-[0-9a-f]{8}")      # what fsutil.atomic_file / atomic_dir write


def _remove_stale_temps_in(folder: str) -> None:
    """Remove the temporary files that killed writers left in a local folder (`fsutil.remove_stale_temps`:
    only those of processes that no longer run)."""
    if is_uri(folder) or not Path(folder).is_dir():
        return
    targets = {m.group(1) for path in Path(folder).iterdir() if (m := _TEMP_NAME.fullmatch(path.name))}
    for name in sorted(targets):
        remove_stale_temps(Path(folder) / name)


@contextlib.contextmanager
def training_lock(checkpoint_dir: str):
    """Hold an exclusive lock on a local checkpoint folder while training: a second training on the same
    folder (the same --out, a task and its stray twin) is refused, naming the holder.

    The lock is `flock` on `<checkpoint_dir>/.train.lock`, which holds the holder's pid, host and start
    time; the system releases it when the holder ends, killed or not, so a stale lock never blocks a
    retry. A gs:// checkpoint folder is not locked: the pipeline runs one train task per model output,
    and its retries run one after another.
    """
    if is_uri(checkpoint_dir):
        log.info("%s: a gs:// checkpoint folder is not locked; run one training at a time on it", checkpoint_dir)
        yield
        return
    import errno
    import fcntl
    import socket

    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRAIN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise InputError(f"{checkpoint_dir}: another training is using this checkpoint folder "
                             f"({_lock_holder(path)}); wait for it to end, or give this training another "
                             f"output (--out) or checkpoint folder (--checkpoint-dir)") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: this file system cannot lock %s (%s): a second training on this folder at the "
                        "same time would not be refused", checkpoint_dir, path, exc.strerror)
            locked = False
        if locked:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)          # releases the lock


def _lock_holder(path: Path) -> str:
    """'pid 123 on host h since <time>' from a lock file, or what is known."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        return f"its holder has not written {path} yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}; "
            f"lock file {path}")
