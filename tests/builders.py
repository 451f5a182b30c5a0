"""Builders other test files share: a learnable face JPEG, a tiny packed dataset as steps 2-5 write it, and
the same with the provenance files training checks."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from facenet_kfp import objectives, provenance
from facenet_kfp.fsutil import write_json
from facenet_kfp.shards import ShardWriter

# Real images per identity of the tiny dataset, and its splits.
TRAIN = {"Ann_A": 5, "Bob_B": 2, "Cat_C": 3, "Dan_D": 4, "Eve_E": 1, "Fay_F": 6, "Gus_G": 2, "Hal_H": 3}
VAL = {"Ivy_I": 3, "Jon_J": 2, "Kim_K": 4}
TEST = {"Lea_L": 2, "Max_M": 3}
# Train identities completed to a multiple of 4 (Eve_E is left out, as min_images would).
COMPLETED = {name: (-count) % 4 for name, count in TRAIN.items() if name != "Eve_E"}


def face_image(identity: int, variant: int, size: int = 64) -> bytes:
    """A JPEG whose identity is learnable: an identity colour disc on an identity background, with noise."""
    rng = np.random.default_rng(1000 * identity + variant)
    hue = np.array([(identity * 97) % 256, (identity * 53 + 80) % 256, (identity * 151 + 160) % 256])
    background = 255 - hue
    image = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    r = size * (0.22 + 0.04 * (identity % 3))
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in hue))
    if identity % 2:
        draw.rectangle([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=tuple(int(v) for v in background))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_tiny_dataset(root: Path, train=None, val=None, test=None, completed=None, size: int = 64, *,
                       image: Callable[[int, int, int], bytes] = face_image, completion_variant: int = 100,
                       max_shard_bytes: int = 20_000) -> dict:
    """Packed dataset + completion + labels + splits folders under `root`, as steps 2-5 would write them.

    `train`, `val`, `test`: {identity: real images} (default `TRAIN`, `VAL`, `TEST`); `completed`:
    {identity: generated images} (default `COMPLETED`). Image j of an identity is
    `image(identity id, j, size)`, generated image j is `image(id, completion_variant + j, size)`.
    Returns {"dataset", "completion", "labels", "splits": folders, "ids": {identity: label}}.
    """
    train = TRAIN if train is None else train
    val = VAL if val is None else val
    test = TEST if test is None else test
    completed = COMPLETED if completed is None else completed
    people = {**train, **val, **test}
    names = sorted(people)
    ids = {name: i for i, name in enumerate(names)}
    dataset, completion, labels, splits = (root / n for n in ("dataset", "completion", "labels", "splits"))
    with ShardWriter(dataset, max_shard_bytes=max_shard_bytes) as writer:
        for name in names:
            for j in range(people[name]):
                writer.add(name, f"{name}/{name}_{j + 1:04d}.jpg", image(ids[name], j, size))
    with ShardWriter(completion, max_shard_bytes=max_shard_bytes) as writer:
        for name, extra in completed.items():
            for j in range(extra):
                writer.add(name, f"{name}/{name}_000C{j + 1}.jpg", image(ids[name], completion_variant + j, size),
                           synthetic=True, source=f"{name}/{name}_0001.jpg")
    labels.mkdir()
    (labels / "labels.json").write_text(json.dumps(ids))
    (labels / "image_counts.json").write_text(json.dumps(people))
    splits.mkdir()
    for split, members in (("train", train), ("val", val), ("test", test)):
        (splits / f"{split}.txt").write_text("".join(f"{n}\t{c}\n" for n, c in sorted(members.items())))
    return {"dataset": dataset, "completion": completion, "labels": labels, "splits": splits, "ids": ids}


def build_train_inputs(root: Path, **kwargs) -> dict:
    """`build_tiny_dataset`'s four folders plus what the labels, complete and splits steps add to theirs:
    provenance.json (completion made with multiple 4) and the summary files it fingerprints."""
    d = build_tiny_dataset(root, **kwargs)
    images = provenance.dataset_fingerprint(d["dataset"])
    if not (d["labels"] / provenance.PROVENANCE_JSON).is_file():
        provenance.write_provenance(d["labels"], "labels", images=images)
    labels = provenance.fingerprint("labels", d["labels"])
    for folder, summary, kind, extra in ((d["completion"], "completion.json", "completion",
                                          {"multiple": 4, "min_images": 1, "seed": 0}),
                                         (d["splits"], "summary.json", "splits", {})):
        if not (folder / summary).is_file():
            write_json(folder / summary, {})
        if not (folder / provenance.PROVENANCE_JSON).is_file():
            provenance.write_provenance(folder, kind, images=images, labels=labels, **extra)
    return d


# ----------------------------------------------------------------------------- an objective with a head

def make_test_head(config, classes=None):
    """The head of `HEADED`: a bias-free Dense layer of 3 outputs on the embeddings (whatever `classes`)."""
    import keras
    return keras.layers.Dense(3, use_bias=False, name="test_head")


def headed_loss(labels, embeddings, config, head_output):
    """Batch-hard triplets plus 0.1 * mean(h^2) of the head's output h, so the head's weights train."""
    from keras import ops

    from facenet_kfp import losses
    out = losses.batch_hard_objective(labels, embeddings, config)
    out["loss"] = out["loss"] + 0.1 * ops.mean(ops.square(ops.cast(head_output, "float32")))
    return out


# A test-only objective with a trainable head (not in the production table).
HEADED = objectives.Objective(name="headed", summary="test only", loss="tests.builders:headed_loss",
                              head="tests.builders:make_test_head", distance=objectives.triplet_distance,
                              loss_bound=lambda config: math.inf)


def kustomize(folder) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` renders; the test is skipped where kubectl is not on PATH."""
    import shutil
    import subprocess

    import pytest
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; it renders the kustomizations (`kubectl kustomize`)")
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]
