"""Tests for facenet_kfp.splits on label folders made by build_labels from small packed datasets."""

from __future__ import annotations

import json

import pytest

from facenet_kfp.errors import InputError
from facenet_kfp.labels import build_labels
from facenet_kfp.provenance import PROVENANCE_JSON, check_inputs, fingerprint, read_provenance
from facenet_kfp.shards import ShardWriter
from facenet_kfp.splits import make_splits, read_split, split_sizes

SPLITS = ("train", "val", "test")


def write_labels(path, counts):
    """A labels folder at `path` for a packed dataset (placeholder bytes) written beside it."""
    dataset = path.with_name(path.name + "-images")
    with ShardWriter(dataset) as writer:
        for name in sorted(counts):
            for i in range(1, counts[name] + 1):
                writer.add(name, f"{name}/{name}_{i:04d}.jpg", b"\xff\xd8 not decoded here")
    build_labels(dataset, path)
    return path


def lfw_like_counts():
    """LFW's images-per-person histogram: 5,749 people, 1,680 with >= 2 images."""
    sizes = [1] * 4069 + [2] * 779 + [3] * 300 + [4] * 170 + [5] * 120 + [6] * 50 + [7] * 44
    sizes += [8 + i % 13 for i in range(160)] + [21 + i for i in range(56)] + [530]
    assert len(sizes) == 5749 and sum(1 for s in sizes if s >= 2) == 1680
    return {f"Person_{i:05d}": size for i, size in enumerate(sizes)}


def mixed_counts(n_single, n_multi):
    counts = {f"Single_{i:03d}": 1 for i in range(n_single)}
    counts.update({f"Multi_{i:03d}": 2 + i % 5 for i in range(n_multi)})
    return counts


def reference_sizes(n_total, n_pairs, fractions):
    """The documented rule, written out case by case."""
    def round_half_up(x):
        whole = int(x)
        return whole + 1 if x - whole >= 0.5 else whole
    val = max(1, round_half_up(fractions[1] * n_pairs))
    test = max(1, round_half_up(fractions[2] * n_pairs))
    while val + test > n_pairs:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return n_total - val - test, val, test


def read_all(out):
    return {split: read_split(out, split) for split in SPLITS}


def test_splits_are_disjoint_complete_and_sorted(tmp_path):
    counts = mixed_counts(30, 40)
    labels = write_labels(tmp_path / "labels", counts)
    summary = make_splits(labels, tmp_path / "splits", seed=3)
    splits = read_all(tmp_path / "splits")
    names = {split: [name for name, _ in entries] for split, entries in splits.items()}
    for split, entries in splits.items():
        assert names[split] == sorted(names[split])
        assert all(count == counts[name] for name, count in entries)
    assert set(names["train"]).isdisjoint(names["val"])
    assert set(names["train"]).isdisjoint(names["test"])
    assert set(names["val"]).isdisjoint(names["test"])
    assert sorted(names["train"] + names["val"] + names["test"]) == sorted(counts)
    # val/test only from identities with pairs; every single-image identity trains.
    assert all(counts[name] >= 2 for name in names["val"] + names["test"])
    assert {name for name in counts if counts[name] == 1} <= set(names["train"])
    for split in SPLITS:
        assert summary[split] == {
            "identities": len(names[split]),
            "images": sum(counts[name] for name in names[split]),
            "identities_with_pairs": sum(1 for name in names[split] if counts[name] >= 2)}
    assert summary["fractions"] == [0.70, 0.15, 0.15] and summary["seed"] == 3
    assert json.loads((tmp_path / "splits/summary.json").read_text()) == summary
    text = (tmp_path / "splits/val.txt").read_text()
    assert text == "".join(f"{name}\t{counts[name]}\n" for name in names["val"])


def test_same_seed_same_files_other_seed_differs(tmp_path):
    labels = write_labels(tmp_path / "labels", mixed_counts(50, 60))
    make_splits(labels, tmp_path / "a", seed=7)
    make_splits(labels, tmp_path / "b", seed=7)
    make_splits(labels, tmp_path / "c", seed=8)
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.txt").read_bytes() == (tmp_path / "b" / f"{split}.txt").read_bytes()
    assert read_all(tmp_path / "a") != read_all(tmp_path / "c")
    assert [len(v) for v in read_all(tmp_path / "a").values()] == [len(v) for v in read_all(tmp_path / "c").values()]


@pytest.mark.parametrize("n_single, n_multi, fractions", [
    (0, 100, (0.70, 0.15, 0.15)),     # no singletons: round(0.15 * 100) = 15 each
    (30, 40, (0.70, 0.15, 0.15)),
    (0, 10, (0.70, 0.15, 0.15)),      # 1.5 rounds up to 2
    (5, 3, (0.70, 0.15, 0.15)),       # round(0.45) = 0, raised to the minimum of 1
    (0, 3, (0.34, 0.33, 0.33)),
    (4, 2, (0.2, 0.05, 0.75)),        # the minimum of 1 pushes val + test above 2: test shrinks
    (10, 20, (0.5, 0.3, 0.2)),
])
def test_sizes_follow_the_rule(tmp_path, n_single, n_multi, fractions):
    counts = mixed_counts(n_single, n_multi)
    expected = reference_sizes(n_single + n_multi, n_multi, fractions)
    assert split_sizes(n_single + n_multi, n_multi, fractions) == expected
    summary = make_splits(write_labels(tmp_path / "labels", counts), tmp_path / "splits", fractions, seed=1)
    assert tuple(summary[split]["identities"] for split in SPLITS) == expected


def test_lfw_sized_split(tmp_path):
    counts = lfw_like_counts()
    summary = make_splits(write_labels(tmp_path / "labels", counts), tmp_path / "splits")
    # 15% of the 1,680 identities with pairs each; train keeps 70% of them plus all 4,069 singletons.
    assert [summary[split]["identities"] for split in SPLITS] == [5749 - 504, 252, 252]
    assert summary["train"]["identities_with_pairs"] == 1176
    assert summary["val"]["identities_with_pairs"] == 252 and summary["test"]["identities_with_pairs"] == 252
    assert sum(summary[split]["images"] for split in SPLITS) == sum(counts.values())


@pytest.mark.parametrize("fractions, match", [
    ((0.8, 0.3, -0.1), r"test fraction must be > 0, got -0\.1"),
    ((0.85, 0.15, 0.0), r"test fraction must be > 0, got 0\.0"),
    ((0.7, 0.2, 0.2), r"must sum to 1, got \(0\.7, 0\.2, 0\.2\)"),
    ((0.7, 0.3), "exactly three numbers .* got 2"),
    ((0.5, 0.2, 0.2, 0.1), "exactly three numbers .* got 4"),
    ((0.7, "0.15", 0.15), "val fraction must be a finite number, got '0.15'"),
    ((0.7, float("nan"), 0.15), "val fraction must be a finite number, got nan"),
    (0.7, "sequence of three numbers, got 0.7"),
])
def test_bad_fractions(tmp_path, fractions, match):
    labels = write_labels(tmp_path / "labels", mixed_counts(5, 10))
    with pytest.raises(InputError, match=match):
        make_splits(labels, tmp_path / "splits", fractions)
    assert not (tmp_path / "splits").exists()


@pytest.mark.parametrize("n_single, n_multi, match", [
    (10, 0, "split 'val' would be empty.* 0 of 10 identities"),
    (10, 1, "split 'test' would be empty.* 1 of 11 identities"),
    (0, 2, "split 'train' would be empty: all 2 identities"),
])
def test_too_few_identities(tmp_path, n_single, n_multi, match):
    labels = write_labels(tmp_path / "labels", mixed_counts(n_single, n_multi))
    with pytest.raises(InputError, match=match):
        make_splits(labels, tmp_path / "splits")
    assert not (tmp_path / "splits").exists()


def test_smallest_possible_split(tmp_path):
    labels = write_labels(tmp_path / "labels", {"A": 1, "B": 2, "C": 3})
    make_splits(labels, tmp_path / "splits")
    splits = read_all(tmp_path / "splits")
    assert splits["train"] == [("A", 1)]
    assert sorted(splits["val"] + splits["test"]) == [("B", 2), ("C", 3)]


def test_bad_seed_and_missing_labels(tmp_path):
    labels = write_labels(tmp_path / "labels", mixed_counts(5, 10))
    with pytest.raises(InputError, match="seed must be an integer >= 0, got -1"):
        make_splits(labels, tmp_path / "splits", seed=-1)
    with pytest.raises(InputError, match="labels.json: file not found"):
        make_splits(tmp_path / "nowhere", tmp_path / "splits")


@pytest.mark.parametrize("content, match", [
    ("Ann\t2\nBo 3\n", r"val\.txt:2: expected 'Name<TAB>count', got 'Bo 3'"),
    ("Ann\ttwo\n", r"val\.txt:1: expected 'Name<TAB>count', got 'Ann\\ttwo'"),
    ("Ann\t2\t3\n", r"val\.txt:1: expected"),
    ("\t2\n", r"val\.txt:1: expected"),
    ("Ann\t0\n", r"val\.txt:1: count must be >= 1"),
    ("Ann\t2\nAnn\t2\n", r"val\.txt:2: identity 'Ann' listed twice"),
    ("\n\n", r"val\.txt: no identities listed"),
])
def test_read_split_rejects_malformed_files(tmp_path, content, match):
    (tmp_path / "val.txt").write_text(content)
    with pytest.raises(InputError, match=match):
        read_split(tmp_path, "val")


def test_read_split_checks_name_and_file(tmp_path):
    with pytest.raises(InputError, match="one of train, val, test, got 'validation'"):
        read_split(tmp_path, "validation")
    with pytest.raises(InputError, match="test.txt: split file not found"):
        read_split(tmp_path, "test")
    (tmp_path / "train.txt").write_text("Ann\t2\n\nBo\t1\n")
    assert read_split(tmp_path, "train") == [("Ann", 2), ("Bo", 1)]


def test_records_the_labels_and_their_dataset(tmp_path):
    labels = write_labels(tmp_path / "labels", mixed_counts(5, 10))
    make_splits(labels, tmp_path / "splits", (0.6, 0.2, 0.2), seed=4)
    assert json.loads((tmp_path / "splits" / PROVENANCE_JSON).read_text()) == {
        "artifact": "splits", "images": read_provenance(labels, "labels")["images"],
        "labels": fingerprint("labels", labels), "fractions": [0.6, 0.2, 0.2], "seed": 4, "test_split": True}
    assert set(check_inputs(labels=labels, splits=tmp_path / "splits")) == {"labels", "splits"}
    other = write_labels(tmp_path / "other", mixed_counts(5, 11))
    with pytest.raises(InputError, match=r"splits .*/splits was made from other labels"):
        check_inputs(labels=other, splits=tmp_path / "splits")


def test_labels_without_provenance_are_refused(tmp_path):
    labels = write_labels(tmp_path / "labels", mixed_counts(5, 10))
    (labels / PROVENANCE_JSON).unlink()
    with pytest.raises(InputError, match=r"labels/provenance.json: not found.* rerun the labels step"):
        make_splits(labels, tmp_path / "splits")
    assert not (tmp_path / "splits").exists()


def test_without_a_test_split_its_identities_are_trained_on(tmp_path):
    """A separate evaluation archive is the test set: test.txt is empty, val is as with one."""
    counts = mixed_counts(30, 40)
    labels = write_labels(tmp_path / "labels", counts)
    with_test = make_splits(labels, tmp_path / "with", seed=3)
    without = make_splits(labels, tmp_path / "without", seed=3, test_split=False)
    assert (tmp_path / "without/test.txt").read_text() == ""
    assert without["test"]["identities"] == 0 and without["test_split"] is False
    assert without["val"] == with_test["val"]
    assert without["train"]["identities"] == with_test["train"]["identities"] + with_test["test"]["identities"]
    assert (without["train"]["identities"] + without["val"]["identities"]) == len(counts)
    assert split_sizes(10, 1, (0.7, 0.15, 0.15), test_split=False) == (9, 1, 0)
    with pytest.raises(InputError, match="split 'val' would be empty"):
        split_sizes(10, 0, (0.7, 0.15, 0.15), test_split=False)
