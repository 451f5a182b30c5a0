"""Tests of facenet_kfp.complete: counts reach the multiple, naming, sources, determinism, errors."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import complete, provenance
from facenet_kfp.augment import sample_params
from facenet_kfp.complete import augmentation_rng, complete_dataset, generate_image
from facenet_kfp.errors import InputError
from facenet_kfp.labels import build_labels
from facenet_kfp.shards import ShardReader, ShardWriter, read_manifest, shard_files

COUNTS = {"Ann_One": 1, "Bob_Two": 2, "Cat_Three": 3, "Dan_Four": 4, "Eve_Five": 5, "Fay_Eight": 8}


def jpeg(identity_index: int, number: int) -> bytes:
    """A 250x250 RGB JPEG that differs per identity and image."""
    ys, xs = np.mgrid[0:250, 0:250]
    arr = np.stack([(xs + 40 * number) % 256, (ys + 30 * identity_index) % 256,
                    ((xs + ys) // 2 + 17 * number) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_inputs(root: Path, counts: dict[str, int] = COUNTS, *, label_counts: dict[str, int] | None = None,
                corrupt: str | None = None, extra_files: dict[str, str] | None = None
                ) -> tuple[Path, Path]:
    """A packed dataset (small shards, so images span several) and its labels folder from build_labels.

    `label_counts` then overwrites image_counts.json, as a damaged labels folder would.
    """
    dataset, labels_dir = root / "dataset", root / "labels"
    with ShardWriter(dataset, max_shard_bytes=60_000) as writer:
        for i, (name, count) in enumerate(sorted(counts.items())):
            for n in range(1, count + 1):
                file = f"{name}/{name}_{n:04d}.jpg"
                data = b"not a jpeg at all" if file == corrupt else jpeg(i, n)
                writer.add(name, file, data, width=250, height=250)
        for name, file in (extra_files or {}).items():
            writer.add(name, file, jpeg(99, 1), width=250, height=250)
    build_labels(dataset, labels_dir)
    if label_counts is not None:
        (labels_dir / "image_counts.json").write_text(json.dumps(label_counts))
    return dataset, labels_dir


def rows_by_identity(out: Path) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in read_manifest(out):
        grouped.setdefault(row["identity"], []).append(row)
    return grouped


def snapshot(out: Path) -> dict[str, bytes]:
    files = [out / "manifest.jsonl", out / "completion.json", *shard_files(out)]
    return {str(path.relative_to(out)): path.read_bytes() for path in files}


def test_completes_every_identity_to_a_multiple_of_four(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    out = tmp_path / "out"
    summary = complete_dataset(dataset, labels, out, workers=1, shard_size_mb=1)

    assert summary == {"generated": 9, "identities_completed": 4, "identities_excluded": 0,
                       "multiple": 4, "seed": 0, "min_images": 1}
    assert json.loads((out / "completion.json").read_text()) == {**summary, "excluded": []}
    generated = rows_by_identity(out)
    for name, count in COUNTS.items():
        assert (count + len(generated.get(name, []))) % 4 == 0
    assert "Dan_Four" not in generated and "Fay_Eight" not in generated
    # Names continue after the real images; sources cycle through the real images in order.
    assert [r["file"] for r in generated["Eve_Five"]] == [f"Eve_Five/Eve_Five_c{n:04d}.jpg" for n in (6, 7, 8)]
    assert [r["source"] for r in generated["Eve_Five"]] == [f"Eve_Five/Eve_Five_{n:04d}.jpg" for n in (1, 2, 3)]
    assert [r["source"] for r in generated["Ann_One"]] == ["Ann_One/Ann_One_0001.jpg"] * 3
    assert [r["source"] for r in generated["Bob_Two"]] == ["Bob_Two/Bob_Two_0001.jpg", "Bob_Two/Bob_Two_0002.jpg"]
    assert [r["file"] for r in generated["Cat_Three"]] == ["Cat_Three/Cat_Three_c0004.jpg"]
    # Only generated images are in the output, packed as completion shards.
    assert all(path.name.startswith("completion-") for path in shard_files(out))
    with ShardReader(out) as reader:
        for row in read_manifest(out):
            assert row["synthetic"] is True
            image = Image.open(io.BytesIO(reader.read(row)))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (250, 250)
            assert (row["width"], row["height"]) == (250, 250)


def test_recorded_augmentation_regenerates_the_same_bytes(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    out = tmp_path / "out"
    complete_dataset(dataset, labels, out, seed=3, workers=1)
    label_ids = json.loads((labels / "labels.json").read_text())
    real = {row["file"]: row for row in read_manifest(dataset)}
    with ShardReader(dataset) as src, ShardReader(out) as dst:
        for name, rows in rows_by_identity(out).items():
            for index, row in enumerate(rows):
                # The parameters come from the RNG keyed by (seed, label id, generated index)...
                assert row["augmentation"] == sample_params(augmentation_rng(3, label_ids[name], index))
                # ...and applying them to the source reproduces the stored JPEG exactly.
                jpeg_bytes, _, _ = generate_image(src.read(real[row["source"]]), row["augmentation"])
                assert jpeg_bytes == dst.read(row)


def test_deterministic_across_runs_and_worker_counts_and_seed_matters(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    runs = {}
    for key, seed, workers in (("a", 0, 1), ("b", 0, 1), ("c", 0, 2), ("d", 1, 2)):
        complete_dataset(dataset, labels, tmp_path / key, seed=seed, workers=workers, shard_size_mb=1)
        runs[key] = snapshot(tmp_path / key)
    assert runs["a"] == runs["b"] == runs["c"]
    assert runs["d"]["manifest.jsonl"] != runs["a"]["manifest.jsonl"]
    assert runs["d"]["shards/completion-00000.tar"] != runs["a"]["shards/completion-00000.tar"]


def test_min_images_excludes_small_identities(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    out = tmp_path / "out"
    summary = complete_dataset(dataset, labels, out, min_images=3, workers=1)
    assert summary["generated"] == 1 + 3 and summary["identities_completed"] == 2
    assert summary["identities_excluded"] == 2 and "excluded" not in summary
    assert json.loads((out / "completion.json").read_text())["excluded"] == ["Ann_One", "Bob_Two"]
    assert set(rows_by_identity(out)) == {"Cat_Three", "Eve_Five"}


def test_other_multiples_wrap_around_the_real_images(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    summary = complete_dataset(dataset, labels, tmp_path / "eight", multiple=8, workers=2)
    assert summary["generated"] == 7 + 6 + 5 + 4 + 3 + 0
    generated = rows_by_identity(tmp_path / "eight")
    assert [r["source"][-8:-4] for r in generated["Cat_Three"]] == ["0001", "0002", "0003", "0001", "0002"]
    assert [r["file"][-9:-4] for r in generated["Cat_Three"]] == ["c0004", "c0005", "c0006", "c0007", "c0008"]
    assert complete_dataset(dataset, labels, tmp_path / "one", multiple=1, workers=1)["generated"] == 0
    assert read_manifest(tmp_path / "one") == []


@pytest.mark.parametrize("kwargs, text", [
    ({"multiple": 0}, "multiple must be an integer >= 1, got 0"),
    ({"min_images": 0}, "min_images must be an integer >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"shard_size_mb": 0}, "shard_size_mb must be an integer >= 1, got 0"),
    ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ({"multiple": 2.5}, "multiple must be an integer >= 1, got 2.5"),
])
def test_invalid_parameters_raise(tmp_path, kwargs, text):
    dataset, labels = make_inputs(tmp_path, {"Ann_One": 1})
    with pytest.raises(InputError, match=text):
        complete_dataset(dataset, labels, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_count_mismatch_names_identity_and_both_numbers(tmp_path):
    dataset, labels = make_inputs(tmp_path, label_counts={**COUNTS, "Eve_Five": 6})
    with pytest.raises(InputError, match=r"'Eve_Five'.* 5 real image\(s\).* says 6"):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


def test_identity_missing_from_labels_is_named(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    (labels / "labels.json").write_text(json.dumps({"Ann_One": 0}))
    (labels / "image_counts.json").write_text(json.dumps({"Ann_One": 1}))
    with pytest.raises(InputError, match=r"'Bob_Two' has 2 image\(s\).*missing from .*labels.json"):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


def test_identity_in_labels_but_not_in_dataset_is_named(tmp_path):
    dataset, labels = make_inputs(tmp_path, {"Ann_One": 1})
    (labels / "labels.json").write_text(json.dumps({"Ann_One": 0, "Zed": 1}))
    (labels / "image_counts.json").write_text(json.dumps({"Ann_One": 1, "Zed": 2}))
    with pytest.raises(InputError, match=r"'Zed'.* says 2 image\(s\) but .* has 0"):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


@pytest.mark.parametrize("labels_json, counts_json, text", [
    (None, {"Ann_One": 1}, r"labels.json: file not found"),
    ({"Ann_One": "0"}, {"Ann_One": 1}, r"labels.json: 'Ann_One' must map to an integer >= 0"),
    ({"Ann_One": 0}, {"Ann_One": True}, r"image_counts.json: 'Ann_One' must map to an integer >= 1"),
    (["Ann_One"], {"Ann_One": 1}, r"labels.json: expected a non-empty JSON object"),
    ({"Ann_One": 0, "Bob": 0}, {"Ann_One": 1, "Bob": 1}, r"labels.json: ids must be distinct"),
    ({"Ann_One": 0, "Bob": 1}, {"Ann_One": 1}, r"'Bob' is in labels.json but not image_counts.json"),
    ({"Ann_One": 0}, {"Ann_One": 1, "Bob": 1}, r"'Bob' is in image_counts.json but not labels.json"),
])
def test_malformed_labels_name_file_and_key(tmp_path, labels_json, counts_json, text):
    dataset, labels = make_inputs(tmp_path, {"Ann_One": 1})
    if labels_json is None:
        (labels / "labels.json").unlink()
    else:
        (labels / "labels.json").write_text(json.dumps(labels_json))
    (labels / "image_counts.json").write_text(json.dumps(counts_json))
    with pytest.raises(InputError, match=text):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


def test_generated_names_must_not_collide_with_real_files(tmp_path):
    counts = {"Ann_One": 2}
    dataset, labels = make_inputs(tmp_path, {"Ann_One": 1},
                                  extra_files={"Ann_One": "Ann_One/Ann_One_c0003.jpg"})
    (labels / "image_counts.json").write_text(json.dumps(counts))
    with pytest.raises(InputError, match=r"'Ann_One/Ann_One_c0003.jpg' collides"):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


def test_synthetic_input_rows_are_refused(tmp_path):
    dataset = tmp_path / "dataset"
    with ShardWriter(dataset) as writer:
        writer.add("Ann_One", "Ann_One/Ann_One_0001.jpg", jpeg(0, 1))
        writer.add("Ann_One", "Ann_One/Ann_One_c0002.jpg", jpeg(0, 2), synthetic=True)
    build_labels(dataset, tmp_path / "labels")
    with pytest.raises(InputError, match=r"'Ann_One/Ann_One_c0002.jpg' is synthetic; completion expects"):
        complete_dataset(dataset, tmp_path / "labels", tmp_path / "out", workers=1)


def test_records_its_inputs_and_settings(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    complete_dataset(dataset, labels, tmp_path / "out", multiple=8, min_images=2, seed=5, workers=1)
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == {
        "artifact": "completion", "images": provenance.dataset_fingerprint(dataset),
        "labels": provenance.fingerprint("labels", labels), "multiple": 8, "min_images": 2, "seed": 5}


def test_labels_of_another_dataset_are_refused(tmp_path):
    dataset, _ = make_inputs(tmp_path / "a")
    _, other_labels = make_inputs(tmp_path / "b", {**COUNTS, "Gus_Nine": 9})
    with pytest.raises(InputError, match=r"labels .*/b/labels was made from another dataset \(images "
                                         r"fingerprint \w+, but images .*/a/dataset has \w+\)"):
        complete_dataset(dataset, other_labels, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_labels_without_provenance_are_refused(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    (labels / "provenance.json").unlink()
    with pytest.raises(InputError, match=r"provenance.json: not found; .*older version.* rerun the labels step"):
        complete_dataset(dataset, labels, tmp_path / "out", workers=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_leaves_no_output(tmp_path, workers):
    # The last identity's first image is corrupt: generation fails after others were written.
    dataset, labels = make_inputs(tmp_path, corrupt="Eve_Five/Eve_Five_0001.jpg")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"images-\d+\.tar: Eve_Five/Eve_Five_0001\.jpg: not a readable image"):
        complete_dataset(dataset, labels, out, workers=workers)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # An existing empty output folder (KFP creates it) is left exactly as it was.
    out.mkdir()
    with pytest.raises(InputError, match="not a readable image"):
        complete_dataset(dataset, labels, out, workers=workers)
    assert list(out.iterdir()) == []


def test_plan_is_independent_of_files():
    rows = {name: [{"file": f"{name}/{name}_{n:04d}.jpg", "shard": "s", "offset": 0, "size": 1}
                   for n in range(1, count + 1)] for name, count in COUNTS.items()}
    labels = {name: i for i, name in enumerate(sorted(COUNTS))}
    jobs, excluded = complete.plan_completion(rows, labels, multiple=4, min_images=2)
    assert excluded == ["Ann_One"]
    assert [(j.identity, j.index, j.source["file"][-8:-4]) for j in jobs] == [
        ("Bob_Two", 0, "0001"), ("Bob_Two", 1, "0002"), ("Cat_Three", 0, "0001"),
        ("Eve_Five", 0, "0001"), ("Eve_Five", 1, "0002"), ("Eve_Five", 2, "0003")]
    assert all(j.label == labels[j.identity] for j in jobs)


@pytest.mark.parametrize("workers", [1, 2])
def test_image_too_small_to_augment_fails_naming_it(tmp_path, workers):
    # Extract skips such images; a dataset made otherwise (or before that) may still hold one.
    dataset, labels_dir = tmp_path / "dataset", tmp_path / "labels"
    dot = io.BytesIO()
    Image.new("RGB", (1, 5000)).save(dot, "PNG")
    with ShardWriter(dataset) as writer:
        writer.add("Ann", "Ann/Ann_0001.jpg", jpeg(0, 1), width=250, height=250)
        writer.add("Bob", "Bob/Bob_0001.png", dot.getvalue(), width=1, height=5000)
    build_labels(dataset, labels_dir)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"images-00000\.tar: Bob/Bob_0001\.png: cannot generate images "
                                         r"from it: too small \(1x5000 pixels; every side needs at least 2"):
        complete_dataset(dataset, labels_dir, out, workers=workers)
    assert not out.exists()


def test_leftovers_of_a_killed_completion_are_removed(tmp_path):
    dataset, labels = make_inputs(tmp_path)
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f".out.tmp-{proc.pid}-0123abcd"
    (dead / "shards").mkdir(parents=True)
    complete_dataset(dataset, labels, tmp_path / "out", workers=1)
    assert not dead.exists() and (tmp_path / "out" / "completion.json").is_file()
