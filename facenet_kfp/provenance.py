"""Which inputs made an artifact: fingerprints, provenance files and the check that artifacts belong together.

Every artifact has a fingerprint, a sha256 of the files that define it:

- images (a packed dataset from extract): ``manifest.jsonl``, which lists
  every image with its shard, byte offset and size;
- labels, completion, splits: their main files plus their provenance file.

The labels, completion and splits steps write ``provenance.json`` into their
output folder: the kind of artifact and the fingerprints of the inputs it was
made from (completion also its ``multiple``, ``min_images`` and ``seed``).
`check_inputs` reads them and refuses artifacts from different lineages, e.g.
splits made from other labels than the completion, or labels of another
dataset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import read_json, write_json
from facenet_kfp.shards import MANIFEST

PROVENANCE_JSON = "provenance.json"
KINDS = ("images", "completion", "labels", "splits")
# The files that define each kind of artifact (provenance.json is added for the made ones).
MAIN_FILES = {
    "images": (MANIFEST,),
    "labels": ("labels.json", "image_counts.json"),
    "completion": (MANIFEST, "completion.json"),
    "splits": ("train.txt", "val.txt", "test.txt"),
}
STEP_OF = {"images": "extract", "labels": "labels", "completion": "complete", "splits": "splits"}
# The upstream fingerprints each made artifact records.
UPSTREAM = {"labels": ("images",), "completion": ("labels", "images"), "splits": ("labels", "images")}
DIFFERENT = {"images": "another dataset", "completion": "another completion", "labels": "other labels",
             "splits": "other splits"}


def _hash_files(folder: Path, names: tuple[str, ...], kind: str) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: not found; is {folder} the {kind} output of the "
                             f"{STEP_OF[kind]} step?")
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def dataset_fingerprint(images_dir: str | os.PathLike) -> str:
    """sha256 (hex) of a packed dataset's ``manifest.jsonl``.

    Cheap (the shards are not read), and it changes whenever an image is
    added, removed or renamed, or its size or dimensions change.
    """
    return _hash_files(Path(images_dir), MAIN_FILES["images"], "images")


def fingerprint(kind: str, folder: str | os.PathLike) -> str:
    """sha256 (hex) of an artifact of `kind` (one of KINDS): its main files and provenance file."""
    if kind not in KINDS:
        raise InputError(f"artifact kind must be one of {', '.join(KINDS)}, got {kind!r}")
    names = MAIN_FILES[kind] + (() if kind == "images" else (PROVENANCE_JSON,))
    return _hash_files(Path(folder), names, kind)


def write_provenance(folder: str | os.PathLike, kind: str, **fields: Any) -> None:
    """Write ``provenance.json`` ({"artifact": kind, **fields}) into an output folder being built.

    `fields` must name every upstream fingerprint of `kind` (UPSTREAM) and be
    deterministic (no times or paths), since the file is part of the fingerprint.
    """
    missing = [key for key in UPSTREAM[kind] if not fields.get(key)]
    if missing:
        raise ValueError(f"{kind} provenance needs the fingerprint(s) {', '.join(missing)}")
    write_json(Path(folder) / PROVENANCE_JSON, {"artifact": kind, **fields})


def read_provenance(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The provenance of a labels, completion or splits folder; InputError when it is missing or wrong."""
    path = Path(folder) / PROVENANCE_JSON
    rerun = f"rerun the {STEP_OF[kind]} step to make a {kind} artifact that records its inputs"
    if Path(folder).is_dir() and not path.is_file():
        raise InputError(f"{path}: not found; {folder} was made by an older version of facenet-kfp "
                         f"or is not a {kind} folder; {rerun}")
    provenance = read_json(path)
    if not isinstance(provenance, dict) or provenance.get("artifact") != kind:
        found = provenance.get("artifact") if isinstance(provenance, dict) else provenance
        raise InputError(f"{path}: describes a {found!r} artifact, expected {kind!r}; {rerun}")
    for key in UPSTREAM[kind]:
        if not isinstance(provenance.get(key), str) or not provenance[key]:
            raise InputError(f"{path}: missing the {key} fingerprint; {rerun}")
    return provenance


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) else repr(value)


def check_inputs(images=None, completion=None, labels=None, splits=None, *,
                 multiple: int | None = None) -> dict[str, str]:
    """Check that the given artifact folders belong together; return their fingerprints by kind.

    Every upstream fingerprint an artifact records must match the artifact
    given for it and what the other artifacts record (completion and splits
    made from the same labels, all from the same images). With `multiple`,
    the completion must have been made with that ``multiple``. Raises
    InputError naming the artifact that does not belong and both fingerprints.
    """
    given = {kind: Path(path) for kind, path in
             (("images", images), ("completion", completion), ("labels", labels), ("splits", splits))
             if path is not None}
    provenance = {kind: read_provenance(path, kind) for kind, path in given.items() if kind != "images"}
    fingerprints = {kind: fingerprint(kind, path) for kind, path in given.items()}
    # The reference value of each upstream kind: the artifact itself, else the first that records it.
    expected = {kind: (fingerprints[kind], f"{kind} {given[kind]} has") for kind in fingerprints}
    for kind in ("labels", "completion", "splits"):
        problems = []
        for upstream in UPSTREAM[kind] if kind in provenance else ():
            recorded = provenance[kind][upstream]
            if upstream not in expected:
                expected[upstream] = (recorded, f"{kind} {given[kind]} was made from")
            elif recorded != expected[upstream][0]:
                value, source = expected[upstream]
                problems.append(f"from {DIFFERENT[upstream]} ({upstream} fingerprint {_short(recorded)}, "
                                f"but {source} {_short(value)})")
        if problems:
            raise InputError(f"{kind} {given[kind]} was made {' and '.join(problems)}; use artifacts "
                             f"of one pipeline run, or rerun the {STEP_OF[kind]} step")
    if multiple is not None and "completion" in provenance:
        made_with = provenance["completion"].get("multiple")
        if made_with != multiple:
            raise InputError(f"completion {given['completion']} was made with multiple={made_with!r} "
                             f"but {multiple} images per identity are needed; rerun the complete "
                             f"step with multiple={multiple}")
    return fingerprints


def check_recorded(recorded: Any, fingerprints: dict[str, str], where: str, made: str) -> None:
    """Check fingerprints recorded in `where` (e.g. model.json's ``inputs``) against those of the given artifacts.

    `made` says what used them ("trained"); only kinds present in both are
    compared. Raises InputError naming the first kind that differs.
    """
    if not isinstance(recorded, dict):
        raise InputError(f"{where}: expected a JSON object of input fingerprints, got {recorded!r}")
    for kind in KINDS:
        if kind in recorded and kind in fingerprints and recorded[kind] != fingerprints[kind]:
            raise InputError(f"{where}: {made} on {DIFFERENT[kind]} ({kind} fingerprint "
                             f"{_short(recorded[kind])}) than the {kind} given ({_short(fingerprints[kind])}); "
                             f"pass the {kind} artifact it was {made} on")
