"""Tests for facenet_kfp.synth: archive layout, LFW-shaped counts, determinism, pairs, identity consistency."""

from __future__ import annotations

import hashlib
import io
import itertools
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import synth
from facenet_kfp.errors import InputError

NAME_RE = re.compile(r"^[A-Z][a-z]+_[A-Z][a-z]+$")
LFW_BINS = {(1, 1): 4069, (2, 2): 779, (3, 5): 590, (6, 7): 94, (8, 20): 160, (21, 10**9): 57}


def _bin_histogram(counts) -> dict[tuple[int, int], int]:
    return {(low, high): sum(low <= c <= high for c in counts) for low, high in LFW_BINS}


def _read_archive(path: Path) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    members, files = [], {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            members.append(member)
            if member.isfile():
                files[member.name] = tar.extractfile(member).read()
    return members, files


def _parse_pairs(path: Path) -> tuple[int, int, list[list[tuple]], list[list[tuple]]]:
    """Slow, literal parser of LFW View 2 pairs.txt: (folds, n, matched per fold, mismatched per fold)."""
    lines = path.read_text().splitlines()
    folds, n = (int(v) for v in lines[0].split("\t"))
    assert len(lines) == 1 + folds * 2 * n
    matched, mismatched = [], []
    row = 1
    for _ in range(folds):
        fold_matched, fold_mismatched = [], []
        for _ in range(n):
            name, i, j = lines[row].split("\t")
            fold_matched.append((name, int(i), int(j)))
            row += 1
        for _ in range(n):
            a, i, b, j = lines[row].split("\t")
            fold_mismatched.append((a, int(i), b, int(j)))
            row += 1
        matched.append(fold_matched)
        mismatched.append(fold_mismatched)
    return folds, n, matched, mismatched


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synth.generate_demo_archive(out, identities=10, seed=0, workers=1)


# --- archive ----------------------------------------------------------------------------------

def test_archive_layout_matches_lfw(demo):
    members, files = _read_archive(demo.archive)
    assert demo.archive.name == "lfw.tgz" and demo.pairs.name == "pairs.txt"
    assert members[0].name == "lfw" and members[0].isdir()
    dirs = [m.name for m in members if m.isdir()]
    assert len(dirs) == 1 + demo.identities == 11
    assert len(files) == demo.images
    per_person: Counter[str] = Counter()
    for name, data in files.items():
        top, person, file = name.split("/")
        assert top == "lfw"
        assert NAME_RE.match(person), person
        match = re.fullmatch(rf"{person}_(\d{{4}})\.jpg", file)
        assert match, name
        per_person[person] += 1
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (250, 250)
        image.load()
    # Numbers run 1..k without gaps, and folders come in sorted order.
    for person, k in per_person.items():
        assert {f"lfw/{person}/{person}_{i:04d}.jpg" for i in range(1, k + 1)} <= files.keys()
    assert dirs[1:] == sorted(dirs[1:])
    assert sorted(per_person.values(), reverse=True) == sorted(synth.image_counts(10, 0), reverse=True)
    # Fixed metadata: nothing about the machine or the time of the run leaks in.
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(1_199_145_600, 0, 0, "root", "root")}


def test_sha256_file_matches_archive(demo):
    digest = hashlib.sha256(demo.archive.read_bytes()).hexdigest()
    assert demo.sha256 == digest
    assert (demo.archive.parent / "lfw.tgz.sha256").read_text() == f"{digest}  lfw.tgz\n"
    # gzip header: mtime 0 and a fixed inner name, not the temporary file's.
    header = demo.archive.read_bytes()[:20]
    assert header[4:8] == b"\0\0\0\0"
    assert b"lfw.tar\0" in header


def test_same_seed_same_bytes_any_worker_count_and_other_seed_differs(tmp_path):
    one = synth.generate_demo_archive(tmp_path / "one", identities=10, seed=3, image_size=64, workers=1)
    two = synth.generate_demo_archive(tmp_path / "two", identities=10, seed=3, image_size=64, workers=2)
    other = synth.generate_demo_archive(tmp_path / "other", identities=10, seed=4, image_size=64, workers=1)
    assert one.sha256 == two.sha256
    assert one.archive.read_bytes() == two.archive.read_bytes()
    assert one.pairs.read_text() == two.pairs.read_text()
    assert other.sha256 != one.sha256
    assert other.pairs.read_text() != one.pairs.read_text()


def test_image_size_is_respected(tmp_path):
    result = synth.generate_demo_archive(tmp_path, identities=10, seed=1, image_size=64, workers=1)
    _, files = _read_archive(result.archive)
    assert {Image.open(io.BytesIO(data)).size for data in files.values()} == {(64, 64)}


@pytest.mark.parametrize("kwargs, value", [
    ({"identities": 9}, "9"),
    ({"identities": 0}, "0"),
    ({"image_size": 63}, "63"),
    ({"seed": -1}, "-1"),
    ({"workers": 0}, "0"),
])
def test_bad_arguments_raise_input_error_naming_the_value(tmp_path, kwargs, value):
    with pytest.raises(InputError, match=re.escape(value)):
        synth.generate_demo_archive(tmp_path, **kwargs)
    assert not (tmp_path / "lfw.tgz").exists()


def test_lfw_scale_writes_lfw_sized_archive_and_pairs(tmp_path, monkeypatch):
    # The layout and pairs at LFW scale, with rendering replaced by a stub (a full
    # render of 13,233 faces takes minutes); the renderer is tested above.
    monkeypatch.setattr(synth, "_render_task", lambda task: [b"jpeg"] * (task[3] - task[2]))
    result = synth.generate_demo_archive(tmp_path, identities=12, lfw_scale=True, workers=1)
    assert (result.identities, result.images) == (5749, 13233)
    with tarfile.open(result.archive, "r:gz") as tar:
        names = tar.getnames()
    assert len(names) == 1 + 5749 + 13233
    folds, n, matched, mismatched = _parse_pairs(result.pairs)
    assert (folds, n) == (10, 300)


# --- counts -----------------------------------------------------------------------------------

def test_lfw_scale_counts_have_lfws_histogram():
    for seed in (0, 1):
        counts = synth.image_counts(synth.LFW_IDENTITIES, seed)
        assert len(counts) == 5749
        assert sum(counts) == 13233
        assert max(counts) == 530 and counts.count(530) == 1
        assert _bin_histogram(counts) == LFW_BINS
        assert sum(c >= 2 for c in counts) == 1680
    assert synth.image_counts(5749, 0) != synth.image_counts(5749, 1)


def test_demo_counts_have_a_learnable_long_tailed_shape():
    counts = synth.image_counts(120, 0)
    assert len(counts) == 120 and min(counts) >= 1
    assert 30 <= sum(c == 1 for c in counts) <= 50                    # about a third singletons
    assert sum(c >= 2 for c in counts) >= 60
    assert 30 <= sum(4 <= c <= 20 for c in counts) <= 80              # a few dozen in 4-20
    assert sum(c > 20 for c in counts) >= 3 and max(counts) >= 30     # a long tail
    # Singletons are spread over the identities, not clustered at the start.
    assert counts[:60].count(1) > 5 and counts[60:].count(1) > 5
    assert synth.image_counts(120, 0) == counts
    assert synth.image_counts(120, 1) != counts


@pytest.mark.parametrize("identities", list(range(10, 31)) + [50, 77, 200, 500, 2000])
def test_counts_guarantee_pairable_and_trainable_identities(identities):
    counts = synth.image_counts(identities, 5)
    assert len(counts) == identities
    assert sum(c >= 2 for c in counts) >= min(synth.MIN_PAIRED, identities // 2)
    assert sum(c >= 6 for c in counts) >= min(synth.MIN_TRAINABLE, identities // 2)


def test_counts_slide_from_demo_shape_to_lfw_shape():
    singleton_share = [synth.image_counts(n, 0).count(1) / n for n in (120, 500, 2000, 5749)]
    assert singleton_share == sorted(singleton_share)
    assert singleton_share[0] < 0.4 and singleton_share[-1] == pytest.approx(4069 / 5749)


def test_counts_reject_too_few_identities():
    with pytest.raises(InputError, match="identities.*9"):
        synth.image_counts(9, 0)


# --- names and pairs --------------------------------------------------------------------------

def test_names_are_unique_sorted_plausible_and_seeded():
    names = synth.identity_names(5749, 0)
    assert len(set(names)) == 5749 and names == sorted(names)
    assert all(NAME_RE.match(name) for name in names)
    assert synth.identity_names(50, 0) == synth.identity_names(50, 0)
    assert synth.identity_names(50, 0) != synth.identity_names(50, 1)


def test_pairs_file_parses_and_references_existing_images(demo):
    _, files = _read_archive(demo.archive)
    counts = Counter(name.split("/")[1] for name in files)
    folds, n, matched, mismatched = _parse_pairs(demo.pairs)
    # Reference: n = min(300, matched pairs available // 10, mismatched available // 10), by brute force.
    people = sorted(counts)
    positives = sum(1 for p in people for _ in itertools.combinations(range(counts[p]), 2))
    negatives = sum(counts[a] * counts[b] for a, b in itertools.combinations(people, 2))
    assert folds == 10 and n == min(300, positives // 10, negatives // 10) >= 1
    for fold_matched, fold_mismatched in zip(matched, mismatched):
        assert len(set(fold_matched)) == n and len(set(fold_mismatched)) == n
        for name, i, j in fold_matched:
            assert 1 <= i < j <= counts[name]
            assert f"lfw/{name}/{name}_{i:04d}.jpg" in files and f"lfw/{name}/{name}_{j:04d}.jpg" in files
        for a, i, b, j in fold_mismatched:
            assert a < b
            assert f"lfw/{a}/{a}_{i:04d}.jpg" in files and f"lfw/{b}/{b}_{j:04d}.jpg" in files
    # Distinct across the whole file, and every identity with 2+ images gets a matched pair.
    all_matched = [pair for fold in matched for pair in fold]
    assert len(set(all_matched)) == len(all_matched)
    assert {name for name, _, _ in all_matched} == {p for p in people if counts[p] >= 2}


def test_pairs_at_demo_size_fill_lfws_300_and_spread_over_identities():
    names = synth.identity_names(120, 0)
    counts = synth.image_counts(120, 0)
    pairs = synth.make_pairs(names, counts, seed=0)
    assert (pairs.folds, pairs.per_fold) == (10, 300)
    matched = [pair for fold in pairs.matched for pair in fold]
    # Round-robin: no identity may take more than its share plus what small ones leave over.
    per_name = Counter(name for name, _, _ in matched)
    assert len(per_name) == sum(c >= 2 for c in counts)
    assert max(per_name.values()) < 0.1 * len(matched)
    assert synth.make_pairs(names, counts, seed=0) == pairs


def test_pairs_reject_when_no_pair_can_be_drawn():
    with pytest.raises(InputError, match="too few images"):
        synth.make_pairs(["A_B", "C_D"], [1, 1], seed=0)
    with pytest.raises(InputError, match="differ in length"):
        synth.make_pairs(["A_B"], [1, 2], seed=0)


# --- faces ------------------------------------------------------------------------------------

def _centre_crops(identities: int, images: int, size: int = 64) -> np.ndarray:
    """(identities, images, 32*32*3) float centre crops (60% of the side) of rendered faces."""
    out = np.zeros((identities, images, 32 * 32 * 3))
    for i in range(identities):
        face = synth.identity_params(0, i)
        for j in range(images):
            image = Image.open(io.BytesIO(synth.render_jpeg(0, i, j, size, face)))
            margin = round(size * 0.2)
            crop = image.crop((margin, margin, size - margin, size - margin)).resize((32, 32), Image.BILINEAR)
            out[i, j] = np.asarray(crop, dtype=np.float64).ravel() / 255
    return out


def _corner_patches(identities: int, images: int, size: int = 64) -> np.ndarray:
    out = np.zeros((identities, images, 4 * 8 * 8 * 3))
    for i in range(identities):
        face = synth.identity_params(0, i)
        for j in range(images):
            arr = np.asarray(Image.open(io.BytesIO(synth.render_jpeg(0, i, j, size, face))), dtype=np.float64)
            corners = [arr[:8, :8], arr[:8, -8:], arr[-8:, :8], arr[-8:, -8:]]
            out[i, j] = np.concatenate([c.ravel() for c in corners]) / 255
    return out


def _same_and_different_distances(x: np.ndarray) -> tuple[float, float]:
    """Mean L2 distance between images of the same identity and of different identities (loops)."""
    same, different = [], []
    n_ids, n_images = x.shape[:2]
    for (a, i), (b, j) in itertools.combinations(itertools.product(range(n_ids), range(n_images)), 2):
        distance = float(np.sqrt(((x[a, i] - x[b, j]) ** 2).sum()))
        (same if a == b else different).append(distance)
    return float(np.mean(same)), float(np.mean(different))


def test_identity_is_consistent_in_the_centre_crop():
    same, different = _same_and_different_distances(_centre_crops(10, 4))
    assert same < 0.85 * different


def test_background_carries_no_identity():
    same, different = _same_and_different_distances(_corner_patches(10, 4))
    assert same == pytest.approx(different, rel=0.1)


def test_identity_params_are_deterministic_and_distinct():
    assert synth.identity_params(0, 5) == synth.identity_params(0, 5)
    faces = [synth.identity_params(0, i) for i in range(50)]
    assert len(set(faces)) == 50
    assert len({face.hair_style for face in faces}) >= 4
    assert 5 <= sum(face.glasses is not None for face in faces) <= 25
    assert synth.render_jpeg(0, 1, 2, 64) == synth.render_jpeg(0, 1, 2, 64)
    assert synth.render_jpeg(0, 1, 2, 64) != synth.render_jpeg(0, 1, 3, 64)


def test_face_is_roughly_centred():
    # The face layer alone (no background): its opaque pixels' centroid sits near the image centre.
    face = synth.identity_params(0, 0)
    expression = synth._sample_expression(np.random.default_rng(0))
    layer = np.asarray(synth._draw_head(face, expression, 250))[:250, :, 3] > 0
    ys, xs = np.nonzero(layer[:200])            # above the shoulders
    assert abs(xs.mean() - 125) < 5 and abs(ys.mean() - 125) < 25


def test_contact_sheet_has_one_row_per_identity():
    sheet = synth.contact_sheet(seed=0, identities=3, images=4, thumb=32, size=64)
    assert sheet.size == (4 * 32, 3 * 32) and sheet.mode == "RGB"
    arr = np.asarray(sheet, dtype=np.float64)
    assert arr.std() > 10                      # not blank
