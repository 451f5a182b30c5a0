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

from facenet_kfp import faces, population, synth
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
    expression = faces._sample_expression(np.random.default_rng(0))
    layer = np.asarray(faces._draw_head(face, expression, 250))[:250, :, 3] > 0
    ys, xs = np.nonzero(layer[:200])            # above the shoulders
    assert abs(xs.mean() - 125) < 5 and abs(ys.mean() - 125) < 25


def test_contact_sheet_has_one_row_per_identity():
    sheet = synth.contact_sheet(seed=0, identities=3, images=4, thumb=32, size=64)
    assert sheet.size == (4 * 32, 3 * 32) and sheet.mode == "RGB"
    arr = np.asarray(sheet, dtype=np.float64)
    assert arr.std() > 10                      # not blank


# --- layouts ----------------------------------------------------------------------------------

def _members(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of the files of a .tgz, .tar or .zip (folders left out)."""
    if path.suffix == ".zip":
        import zipfile
        with zipfile.ZipFile(path) as zf:
            return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _by_folder(files: dict[str, bytes]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for name in files:
        folder, file = name.rsplit("/", 1)
        folders.setdefault(folder, []).append(file)
    return folders


def test_lfw_layout_is_the_default_and_renders_each_face(tmp_path):
    # Every image is the face renderer's output for its (identity, image), as before layouts existed.
    default = synth.generate_demo_archive(tmp_path / "default", identities=10, seed=3, image_size=64, workers=1)
    explicit = synth.generate_demo_archive(tmp_path / "lfw", identities=10, seed=3, image_size=64, workers=1,
                                           layout="lfw", archive_format="tgz")
    assert explicit.archive.read_bytes() == default.archive.read_bytes() and explicit.layout == "lfw"
    names = synth.identity_names(10, 3)
    for name, data in _members(default.archive).items():
        person, file = name.split("/")[1:]
        assert data == synth.render_jpeg(3, names.index(person), int(file[-8:-4]) - 1, 64), name


def test_casia_layout(tmp_path):
    result = synth.generate_demo_archive(tmp_path, identities=10, seed=2, image_size=64, workers=1,
                                         layout="casia", archive_format="tar")
    assert result.archive.name == "CASIA-WebFace.tar" and result.pairs is None
    assert not (tmp_path / "pairs.txt").exists()
    assert (tmp_path / "CASIA-WebFace.tar.sha256").read_text() == f"{result.sha256}  CASIA-WebFace.tar\n"
    files = _members(result.archive)
    folders = _by_folder(files)
    ids = [folder.split("/")[1] for folder in folders]
    assert all(folder.startswith("CASIA-WebFace/") for folder in folders)
    assert ids == sorted(set(ids)) and all(re.fullmatch(r"\d{7}", i) for i in ids)
    for folder, names in folders.items():
        assert names == [f"{j:03d}.jpg" for j in range(1, len(names) + 1)], folder
    assert sorted(len(names) for names in folders.values()) == sorted(synth.image_counts(10, 2))
    assert {Image.open(io.BytesIO(data)).size for data in files.values()} == {(64, 64)}


def test_vggface2_layout_has_disjoint_splits_varying_sizes_and_boxes(tmp_path):
    result = synth.generate_demo_archive(tmp_path, identities=12, seed=1, image_size=100, workers=1,
                                         layout="vggface2", archive_format="zip", pool=2)
    files = _members(result.archive)
    assert result.archive.name == "vggface2.zip"
    images = {name: data for name, data in files.items() if name.endswith(".jpg")}
    assert len(images) == result.images
    split_ids: dict[str, set[str]] = {"train": set(), "test": set()}
    for name in images:
        top, split, identity, file = name.split("/")
        assert top == "vggface2" and re.fullmatch(r"n\d{6}", identity) and re.fullmatch(r"\d{4}_\d{2}\.jpg", file)
        split_ids[split].add(identity)
    assert split_ids["train"] and split_ids["test"] and not split_ids["train"] & split_ids["test"]
    sizes = {name: Image.open(io.BytesIO(data)).size for name, data in images.items()}
    assert all(72 <= w <= 160 and 1.0 * w - 1 <= h <= 1.3 * w + 1 for w, h in sizes.values())
    assert len(set(sizes.values())) > len(sizes) // 2 and any(w != h for w, h in sizes.values())

    ids = synth.vggface2_ids(12, 1)
    index = {identity: i for i, (_, identity) in enumerate(ids)}
    rows = []
    for split in ("train", "test"):
        text = files[f"vggface2/bb_landmark/loose_bb_{split}.csv"].decode()
        lines = text.splitlines()
        assert lines[0] == "NAME_ID,X,Y,W,H"
        rows += [(split, line) for line in lines[1:]]
    assert len(rows) == len(images)
    for split, line in rows:
        name_id, *box = line.split(",")
        identity, stem = name_id.strip('"').split("/")
        assert f"vggface2/{split}/{identity}/{stem}.jpg" in images
        j = sorted(n for n in images if f"/{identity}/" in n).index(f"vggface2/{split}/{identity}/{stem}.jpg")
        g = synth.vggface2_geometry(1, index[identity], j, 100)
        assert tuple(int(v) for v in box) == g.box
        # 1.3 x the box's longer side, around its centre, is the pasted face scene to within a few px.
        x, y, w, h = g.box
        side = 1.3 * max(w, h)
        assert abs(side - g.face) <= 0.1 * g.face
        assert abs(x + w / 2 - (g.left + g.face / 2)) <= 0.04 * g.face
        assert abs(y + h / 2 - (g.top + g.face / 2)) <= 0.04 * g.face
        assert (g.width, g.height) == sizes[f"vggface2/{split}/{identity}/{stem}.jpg"]


def test_vggface2_without_boxes(tmp_path):
    result = synth.generate_demo_archive(tmp_path, identities=10, seed=1, image_size=64, workers=1,
                                         layout="vggface2", archive_format="tgz", pool=1, boxes=False)
    assert not any("bb_landmark" in name for name in _members(result.archive))


def test_nested_layout_has_identities_at_several_depths(tmp_path):
    result = synth.generate_demo_archive(tmp_path, identities=12, seed=0, image_size=64, workers=1,
                                         layout="nested", archive_format="tar", pool=1)
    folders = _by_folder(_members(result.archive))
    depths = Counter(folder.count("/") for folder in folders)
    assert result.archive.name == "faces.tar" and set(depths) == {2, 3}
    assert all(folder.startswith("faces/set") for folder in folders)
    names = [folder.rsplit("/", 1)[1] for folder in folders]
    assert sorted(names) == synth.identity_names(12, 0)
    for folder, files in folders.items():
        assert files == [f"{j}.jpg" for j in range(1, len(files) + 1)], folder


def test_pool_archives_are_deterministic_for_any_worker_count(tmp_path):
    kwargs = dict(identities=10, seed=5, image_size=64, layout="casia", archive_format="zip", pool=2)
    one = synth.generate_demo_archive(tmp_path / "one", workers=1, **kwargs)
    two = synth.generate_demo_archive(tmp_path / "two", workers=2, **kwargs)
    assert one.archive.read_bytes() == two.archive.read_bytes()
    files = _members(one.archive)
    assert len(set(files.values())) == len(files)          # derived images differ from each other


def test_derived_face_is_a_shifted_mirrored_brighter_pool_face():
    # Reference: replay the documented draws and apply them to the pool image with NumPy.
    size = 64
    face = synth.identity_params(0, 3)
    pool = [synth.render_face(face, np.random.default_rng(k), size + 2 * 2) for k in range(3)]
    for j in range(6):
        image, _ = synth.derive_face(pool, 0, 3, j, size)
        rng = np.random.default_rng(np.random.SeedSequence([0, synth._SEED_VARIANT, 3, j]))
        dx, dy = rng.integers(0, 2 * 2 + 1, 2)
        mirror = rng.random() < 0.5
        gain = rng.uniform(*synth.DEFAULT_VARIATION.gain)
        base = np.asarray(pool[j % 3], dtype=np.float64)[dy:dy + size, dx:dx + size]
        expected = np.clip(np.rint((base[:, ::-1] if mirror else base) * gain), 0, 255)
        assert image.size == (size, size)
        assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1, j


def test_casia_counts_have_casia_webfaces_totals_and_a_long_tail():
    counts = synth.casia_counts(synth.CASIA_IDENTITIES, 0)
    assert len(counts) == 10_575 and sum(counts) == 494_414
    assert min(counts) >= 2 and 500 <= max(counts) <= 1000
    assert max(counts) > 10 * float(np.median(counts))
    assert synth.casia_counts(10_575, 0) == counts and synth.casia_counts(10_575, 1) != counts
    assert sum(synth.casia_counts(1058, 0)) == round(1058 * 494_414 / 10_575)


def test_casia_scale_sets_casia_sizes(tmp_path, monkeypatch):
    # The flag's wiring at a small stand-in size (a real run writes 494,414 images).
    monkeypatch.setattr(synth, "CASIA_IDENTITIES", 12)
    monkeypatch.setattr(population, "CASIA_IDENTITIES", 12)
    monkeypatch.setattr(population, "CASIA_IMAGES", 12 * 30)
    monkeypatch.setattr(synth, "_render_task", lambda task: [b"jpeg"] * (task.stop - task.start))
    result = synth.generate_demo_archive(tmp_path, identities=3, casia_scale=True, layout="casia",
                                         workers=1, pool=4)
    assert (result.identities, result.images) == (12, 360)
    assert len(_members(result.archive)) == 360


@pytest.mark.parametrize("kwargs, value", [
    ({"layout": "celeba"}, "celeba"),
    ({"archive_format": "rar"}, "rar"),
    ({"counts": "vgg"}, "vgg"),
    ({"pool": 0}, "0"),
    ({"lfw_scale": True, "casia_scale": True}, "lfw_scale and casia_scale"),
    ({"casia_scale": True, "counts": "lfw"}, "counts 'lfw'"),
])
def test_bad_layout_arguments_raise_input_error_naming_the_value(tmp_path, kwargs, value):
    with pytest.raises(InputError, match=re.escape(value)):
        synth.generate_demo_archive(tmp_path, identities=10, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_synth_options_match_the_library(tmp_path, capsys):
    import argparse
    from facenet_kfp.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["synth"]
    choices = {action.dest: tuple(action.choices) for action in sub._actions if action.choices}
    assert choices == {"layout": synth.LAYOUTS, "format": synth.ARCHIVE_FORMATS, "counts": synth.COUNT_SHAPES}
    out = tmp_path / "demo"
    assert main(["-q", "synth", "--out", str(out), "--identities", "10", "--layout", "vggface2",
                 "--format", "zip", "--image-size", "64", "--pool", "1", "--workers", "1", "--no-boxes"]) == 0
    printed = capsys.readouterr().out
    assert "vggface2.zip" in printed and "pairs" not in printed and "vggface2 layout" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["vggface2.zip", "vggface2.zip.sha256"]
