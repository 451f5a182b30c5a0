"""Tests for facenet_kfp.labels on small packed datasets written here."""

from __future__ import annotations

import json
import random

import pytest

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import STEP_MARKER
from facenet_kfp.labels import build_labels, count_real_images, load_labels
from facenet_kfp.provenance import PROVENANCE_JSON, check_inputs, dataset_fingerprint
from facenet_kfp.shards import ShardWriter

# identity -> (real images, synthetic images)
PEOPLE = {"Zoe_Ball": (1, 3), "adam_lower": (2, 2), "Ann_Bell": (5, 3), "Bo_Diddley": (4, 0),
          "Émile_Zola": (1, 0), "Carl_Cox": (1, 3)}


def write_dataset(path, people=PEOPLE, seed=0):
    """A packed dataset whose rows come in a shuffled order (real and synthetic mixed)."""
    rows = []
    for name, (real, synthetic) in people.items():
        rows += [(name, f"{name}/{name}_{i:04d}.jpg", False) for i in range(1, real + 1)]
        rows += [(name, f"{name}/{name}_000C{k}.jpg", True) for k in range(1, synthetic + 1)]
    random.Random(seed).shuffle(rows)
    with ShardWriter(path) as writer:
        for identity, file, synthetic in rows:
            writer.add(identity, file, b"\xff\xd8 not decoded here", synthetic=synthetic)
    return path


def slow_reference(people):
    names = sorted(people)  # Python sorts by code point: upper case, lower case, then accents
    labels = {}
    for name in names:
        labels[name] = len(labels)
    counts = {name: people[name][0] for name in names}
    return labels, counts


def test_labels_are_sorted_ids_and_counts_ignore_synthetic(tmp_path):
    dataset = write_dataset(tmp_path / "dataset")
    summary = build_labels(dataset, tmp_path / "labels")
    labels = json.loads((tmp_path / "labels/labels.json").read_text())
    counts = json.loads((tmp_path / "labels/image_counts.json").read_text())
    ref_labels, ref_counts = slow_reference(PEOPLE)
    assert labels == ref_labels and counts == ref_counts
    assert list(labels) == ["Ann_Bell", "Bo_Diddley", "Carl_Cox", "Zoe_Ball", "adam_lower", "Émile_Zola"]
    assert list(labels.values()) == list(range(6))
    assert summary == {"identities": 6, "images": 14, "max_images": 5, "singletons": 3}
    assert load_labels(tmp_path / "labels") == (labels, counts)


def test_labels_do_not_depend_on_manifest_order(tmp_path):
    build_labels(write_dataset(tmp_path / "a", seed=1), tmp_path / "la")
    build_labels(write_dataset(tmp_path / "b", seed=2), tmp_path / "lb")
    for name in ("labels.json", "image_counts.json"):
        assert (tmp_path / "la" / name).read_bytes() == (tmp_path / "lb" / name).read_bytes()


def test_earlier_output_is_replaced_anything_else_refused(tmp_path):
    dataset = write_dataset(tmp_path / "dataset")
    out = tmp_path / "labels"
    out.mkdir()     # an empty folder, as KFP creates it
    build_labels(dataset, out)
    (out / "old.json").write_text("{}")
    build_labels(dataset, out)      # the step's own earlier output
    assert sorted(p.name for p in out.iterdir()) == [STEP_MARKER, "image_counts.json", "labels.json",
                                                     PROVENANCE_JSON]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace"):
        build_labels(dataset, tmp_path / "work")
    with pytest.raises(InputError, match="refusing to replace"):
        build_labels(dataset, tmp_path)      # the folder holding the input
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine" and dataset.is_dir()


def test_records_the_dataset_fingerprint(tmp_path):
    dataset = write_dataset(tmp_path / "dataset")
    build_labels(dataset, tmp_path / "labels")
    assert json.loads((tmp_path / "labels" / PROVENANCE_JSON).read_text()) == {
        "artifact": "labels", "images": dataset_fingerprint(dataset)}
    assert check_inputs(images=dataset, labels=tmp_path / "labels")["images"] == dataset_fingerprint(dataset)


def test_identity_with_only_synthetic_images_is_an_error(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", {"Ann": (2, 0), "Ghost": (0, 4)})
    with pytest.raises(InputError, match="'Ghost' has only synthetic images"):
        build_labels(dataset, tmp_path / "labels")
    assert not (tmp_path / "labels").exists()


def test_bad_manifests(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        build_labels(tmp_path / "nothing", tmp_path / "labels")
    empty = tmp_path / "empty"
    with ShardWriter(empty):
        pass
    with pytest.raises(InputError, match="no images"):
        build_labels(empty, tmp_path / "labels")
    bad = tmp_path / "bad"
    with ShardWriter(bad) as writer:
        row = writer.add("Ann", "Ann/Ann_0001.jpg", b"x")
    with open(bad / "manifest.jsonl", "a") as handle:
        handle.write(json.dumps(dict(row, synthetic="no")) + "\n")
    with pytest.raises(InputError, match="row 2: synthetic must be true or false"):
        count_real_images(bad)


def write_labels(path, labels, counts):
    path.mkdir(parents=True, exist_ok=True)
    (path / "labels.json").write_text(json.dumps(labels))
    (path / "image_counts.json").write_text(json.dumps(counts))
    return path


@pytest.mark.parametrize("labels, counts, match", [
    ({"A": 0, "B": 1}, {"A": 2}, "'B' is in labels.json but not image_counts.json"),
    ({"A": 0}, {"A": 2, "B": 1}, "'B' is in image_counts.json but not labels.json"),
    ({"A": 0, "B": 0}, {"A": 1, "B": 1}, "distinct and cover 0..1"),
    ({"A": 0, "B": 2}, {"A": 1, "B": 1}, "distinct and cover 0..1"),
    ({"A": "0"}, {"A": 1}, "'A' must map to an integer >= 0"),
    ({"A": True}, {"A": 1}, "'A' must map to an integer >= 0"),
    ({"A": 0}, {"A": 0}, "'A' must map to an integer >= 1"),
    ([0], {"A": 1}, "expected a non-empty JSON object"),
    ({}, {}, "expected a non-empty JSON object"),
])
def test_load_labels_rejects_inconsistent_files(tmp_path, labels, counts, match):
    with pytest.raises(InputError, match=match):
        load_labels(write_labels(tmp_path / "labels", labels, counts))


def test_load_labels_missing_or_malformed_file(tmp_path):
    with pytest.raises(InputError, match="labels.json: file not found"):
        load_labels(tmp_path)
    (tmp_path / "labels.json").write_text('{"A": 0')
    (tmp_path / "image_counts.json").write_text('{"A": 1}')
    with pytest.raises(InputError, match="labels.json: not valid JSON"):
        load_labels(tmp_path)
    (tmp_path / "labels.json").write_text('{"A": 0}')
    (tmp_path / "image_counts.json").unlink()
    with pytest.raises(InputError, match="image_counts.json: file not found"):
        load_labels(tmp_path)
