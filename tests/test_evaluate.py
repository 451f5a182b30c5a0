"""Threshold evaluation: wiring against loop references (every distance, plain and flip), outputs, real-only
images, pairs.txt and its overlap with training, warnings, input errors."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import evaluate as ev
from facenet_kfp import metrics as vm
from facenet_kfp import provenance, scoring
from facenet_kfp.config import EvaluateConfig, TrainConfig
from facenet_kfp.errors import DownloadError, InputError
from facenet_kfp.fsutil import atomic_dir
from facenet_kfp.labels import build_labels
from facenet_kfp.pairs import make_pairs
from facenet_kfp.report import flip_key
from facenet_kfp.shards import ShardWriter

export = pytest.importorskip("facenet_kfp.export")
tf = pytest.importorskip("tensorflow")

# identity -> number of real images; "Zoe_&_<Co>" checks HTML escaping of names.
VAL = {"Ann_Val": 4, "Bob_Val": 3, "Cy_Val": 4, "Dee_Val": 2, "Eve_Val": 1}
TEST = {"Fay_Test": 5, "Gus_Test": 4, "Hal_Test": 4, "Ivy_Test": 3, "Jo_Test": 4, "Zoe_&_<Co>": 3}
TRAIN = {"Kim_Train": 4, "Lou_Train": 2}
HISTORY = {"train": [{"step": s, "loss": 0.5 / s, "fraction_positive_triplets": 0.4, "mean_positive_distance": 0.5,
                       "mean_negative_distance": 1.0} for s in (1, 2, 3)],
           "val": [{"step": 3, "loss": 0.3, "fraction_positive_triplets": 0.5, "mean_positive_distance": 0.6,
                    "mean_negative_distance": 0.9}]}
# 4 same-person pairs at most per identity: Ann, Cy and Fay give 4 of their 6 or 10.
# FAR 0.25 is measurable on the test split's 22 different-person pairs (>= 4, and >= 4 in each fold's test
# part); 1e-3 and 1e-2 are not (they need 1,000 and 100).
CONFIG = EvaluateConfig(max_positive_pairs=1000, max_pairs_per_identity=4, folds=4, far_targets=(1e-3, 1e-2, 0.25),
                        batch_size=8, report_examples=6, seed=3)
IMAGE_SIZE, CROP = 32, 0.6


def jpeg(left, right=None, size=40) -> bytes:
    """A size x size JPEG, its left half one colour and its right half another (RGB in [0, 1])."""
    right = left if right is None else right
    pixels = np.empty((size, size, 3))
    pixels[:, :size // 2], pixels[:, size // 2:] = left, right
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class FakeModel:
    """The model: per preprocessed image [S, S, 3], the mean colour of its left and of its right half (6-D).

    Unit length, or with `unit` false scaled by 1.5 + the mean pixel. A mirrored
    image swaps the halves, so it has another embedding. `seen` collects every
    image it is given.
    """
    output_shape = (None, 6)

    def __init__(self, seen: list, unit: bool = True):
        self.seen, self.unit = seen, unit

    def predict_on_batch(self, batch):
        x = np.asarray(batch, dtype=np.float64)
        self.seen.extend(np.asarray(batch, dtype=np.float32))
        half = x.shape[2] // 2
        v = np.concatenate((x[:, :, :half].mean(axis=(1, 2)), x[:, :, half:].mean(axis=(1, 2))), axis=1)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        if not self.unit:
            v *= 1.5 + x.mean(axis=(1, 2, 3))[:, None]
        return v.astype(np.float32)


_PREPROCESSED: dict[bytes, np.ndarray] = {}


def preprocessed(data_bytes: bytes) -> np.ndarray:
    """One image through the TensorFlow preprocessing, alone (the step embeds batches of the same)."""
    from facenet_kfp.tf_input import preprocess_image

    if data_bytes not in _PREPROCESSED:
        _PREPROCESSED[data_bytes] = preprocess_image(tf.constant(data_bytes), IMAGE_SIZE, CROP).numpy()
    return _PREPROCESSED[data_bytes]


def reference_embedding(data_bytes: bytes, flip: bool, unit: bool = True) -> list[float]:
    """Per image: embed; with flip also embed the mirror image, add the two, normalise (plain loops)."""
    model = FakeModel([], unit)
    x = preprocessed(data_bytes)
    e = [float(v) for v in model.predict_on_batch(x[None])[0]]
    if not flip:
        return e
    mirrored = np.stack([x[:, x.shape[1] - 1 - col] for col in range(x.shape[1])], axis=1)
    m = [float(v) for v in model.predict_on_batch(mirrored[None])[0]]
    total = [p + q for p, q in zip(e, m)]
    norm = math.sqrt(sum(t * t for t in total))
    return [t / norm for t in total]


def reference_distance(x, y, distance: str) -> float:
    if distance == "cosine":
        return 1.0 - sum(p * q for p, q in zip(x, y)) / (math.sqrt(sum(p * p for p in x)) *
                                                        math.sqrt(sum(q * q for q in y)))
    d2 = sum((p - q) ** 2 for p, q in zip(x, y))
    return d2 if distance == "squared_l2" else math.sqrt(d2)


def build_data(tmp_path, seed=0):
    """Packed dataset (real images plus generated rows for val/test people), its labels, splits, image bytes by key.

    The split files name fixed people, so they are written here, with the
    provenance make_splits would record.
    """
    rng = np.random.default_rng(seed)
    images, synthetic = {}, []
    dataset = tmp_path / "images"
    with atomic_dir(dataset) as tmp, ShardWriter(tmp, max_shard_bytes=4000) as writer:
        for people in (TRAIN, VAL, TEST):
            for name, count in people.items():
                base = rng.uniform(0.1, 0.9, 3)
                for i in range(1, count + 1):
                    key = f"{name}/{name}_{i:04d}.jpg"
                    images[key] = jpeg(np.clip(base + rng.normal(0, 0.06, 3), 0, 1),
                                       np.clip(base + rng.normal(0, 0.06, 3), 0, 1))
                    writer.add(name, key, images[key])
                if people is not TRAIN:
                    # Completion rows: must never be embedded by evaluate.
                    for c in range(2):
                        data_bytes = jpeg((1.0, 0.0, 1.0 - 0.1 * c))
                        synthetic.append(data_bytes)
                        writer.add(name, f"{name}/{name}_000C{c}.jpg", data_bytes, synthetic=True)
    labels = tmp_path / "labels"
    build_labels(dataset, labels)
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, people in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (splits / f"{split}.txt").write_text("".join(f"{n}\t{c}\n" for n, c in sorted(people.items())))
    provenance.write_provenance(splits, "splits", images=provenance.dataset_fingerprint(dataset),
                                labels=provenance.fingerprint("labels", labels))
    return {"dataset": dataset, "labels": labels, "splits": splits, "images": images,
            "synthetic": synthetic, "root": tmp_path}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def fresh_data(tmp_path):
    """A private copy for tests that edit the split files."""
    return build_data(tmp_path)


def write_model_dir(path, squared=True, inputs=None, unit=True, earlier=False):
    """model.json (with `inputs`, the fingerprints train records, when given) and history.json. The
    distance by name ("squared_l2" or "l2"), or, `earlier`, as earlier versions wrote it (distance.squared)."""
    path.mkdir(parents=True, exist_ok=True)
    distance = {"squared": squared} if earlier else {"name": "squared_l2" if squared else "l2"}
    meta = {"distance": {**distance, "margin": 0.2}, "fake_unit": unit, "file": "model.keras",
            "preprocessing": {"image_size": IMAGE_SIZE, "crop_fraction": CROP, "version": "centre-crop-v1"}}
    if inputs is not None:
        meta["inputs"] = inputs
    (path / "model.json").write_text(json.dumps(meta))
    (path / "model.keras").write_bytes(b"the fake model's file")
    (path / "history.json").write_text(json.dumps(HISTORY))
    return path


def patch_export(monkeypatch, seen):
    """Patch export so the loaded model is a `FakeModel` (export.embed_images runs as is)."""

    def load_model_artifact(model_dir):
        meta = json.loads((model_dir / "model.json").read_text())
        return FakeModel(seen, meta.get("fake_unit", True)), meta

    monkeypatch.setattr(export, "load_model_artifact", load_model_artifact)


@pytest.fixture
def fake_model(monkeypatch):
    seen: list[np.ndarray] = []
    patch_export(monkeypatch, seen)
    return seen


def run(data, model_dir, config=CONFIG, out=None, **kwargs):
    out = out or model_dir.parent / "out"
    return ev.evaluate(model_dir, data["dataset"], data["splits"], config, report_path=out / "report.html",
                       threshold_path=out / "threshold.json", metrics_path=out / "metrics.json",
                       **kwargs), out


def split_keys(people):
    return {n: [f"{n}/{n}_{i:04d}.jpg" for i in range(1, c + 1)] for n, c in people.items()}


def reference_pairs(data, people, distance="squared_l2", flip=False, unit=True, config=CONFIG):
    """Pairs as make_pairs draws them, and distances by plain loops over the fake model's embeddings."""
    keys, a, b, same = make_pairs(split_keys(people), max_positive=config.max_positive_pairs,
                                  max_per_identity=config.max_pairs_per_identity, seed=config.seed)
    d = [reference_distance(reference_embedding(data["images"][keys[i]], flip, unit),
                            reference_embedding(data["images"][keys[j]], flip, unit), distance)
         for i, j in zip(a, b)]
    return np.asarray(d), same


def check_threshold_scores(m, data, distance, flip, seed_threshold, unit=True):
    """The validation-threshold figures of one variant against loops over reference distances."""
    name = flip_key if flip else (lambda key: key)
    vd, vs = reference_pairs(data, VAL, distance, flip, unit)
    td, ts = reference_pairs(data, TEST, distance, flip, unit)
    threshold, val_acc = vm.select_threshold(vd, vs)
    assert m[name("threshold")] == pytest.approx(threshold, rel=1e-6, abs=1e-9)
    assert m[name("val_accuracy")] == pytest.approx(val_acc)
    test_acc = sum((x < threshold) == y for x, y in zip(td, ts)) / len(td)
    assert m[name("test_accuracy")] == pytest.approx(test_acc)
    auc = sum(1.0 if p < q else 0.5 if p == q else 0.0 for p in td[ts] for q in td[~ts]) / (ts.sum() * (~ts).sum())
    assert m[name("test_auc")] == pytest.approx(auc)
    if seed_threshold is None:
        assert name("test_accuracy_at_seed_threshold") not in m
    else:
        assert m[name("test_accuracy_at_seed_threshold")] == pytest.approx(
            sum((x < seed_threshold) == y for x, y in zip(td, ts)) / len(td))
    # The VAL@FAR threshold is found on validation and applied unchanged to test; VAL and the FAR it
    # reaches are counted on test where the test pairs can measure that FAR.
    folds = ev.stratified_folds(ts, CONFIG.folds, CONFIG.seed, "test")
    for far, need in ((0.001, 1000), (0.01, 100), (0.25, 4)):
        t_far = vm.threshold_at_far(vd, vs, far)
        assert m[name(f"threshold_at_far_{far}")] == pytest.approx(t_far, rel=1e-6, abs=1e-9)
        n_diff = sum(1 for y in ts if not y)
        fewest = min(sum(1 for y, f in zip(ts, folds) if not y and f == k) for k in range(CONFIG.folds))
        if n_diff >= need:
            assert m[name(f"test_val_at_far_{far}")] == pytest.approx(sum(x < t_far for x in td[ts]) / ts.sum())
            assert m[name(f"test_far_at_far_{far}")] == pytest.approx(sum(x < t_far for x in td[~ts]) / n_diff)
            assert name(f"test_val_at_far_{far}_needs_different_pairs") not in m
        else:
            assert m[name(f"test_val_at_far_{far}_needs_different_pairs")] == need
            assert name(f"test_val_at_far_{far}") not in m and name(f"test_far_at_far_{far}") not in m
        if fewest >= need:
            vals, fars = [], []
            for k in range(CONFIG.folds):
                t = vm.threshold_at_far(td[folds != k], ts[folds != k], far)
                inside = folds == k
                vals.append(sum(1 for x, y in zip(td[inside], ts[inside]) if y and x < t) / ts[inside].sum())
                fars.append(sum(1 for x, y in zip(td[inside], ts[inside]) if not y and x < t) / (~ts[inside]).sum())
            assert m[name(f"test_kfold_val_at_far_{far}_mean")] == pytest.approx(np.mean(vals))
            assert m[name(f"test_kfold_val_at_far_{far}_std")] == pytest.approx(np.std(vals))
            assert m[name(f"test_kfold_far_at_far_{far}_mean")] == pytest.approx(np.mean(fars))
        else:
            assert m[name(f"test_kfold_val_at_far_{far}_needs_different_pairs")] == need
            assert name(f"test_kfold_val_at_far_{far}_mean") not in m
    assert "test_val_at_far_0.25" in m and "test_kfold_val_at_far_0.25_mean" in m   # the measurable path ran
    accs = []
    for k in range(CONFIG.folds):
        t, _ = vm.select_threshold(td[folds != k], ts[folds != k])
        accs.append(np.mean((td[folds == k] < t) == ts[folds == k]))
    assert m[name("test_kfold_accuracy_mean")] == pytest.approx(np.mean(accs))
    assert m[name("test_kfold_accuracy_std")] == pytest.approx(np.std(accs))
    return td, ts, threshold


def pairs_lines(folds, per_fold, seed=0):
    """A pairs.txt over the test data's people (training ones too), `folds` x `per_fold` pairs per class."""
    rng = np.random.default_rng(seed)
    people = {**VAL, **TEST, **TRAIN}
    names = sorted(people)
    several = [n for n in names if people[n] >= 2]
    lines = [f"{folds}\t{per_fold}"]
    for _ in range(folds):
        for k in range(per_fold):
            name = "Kim_Train" if k == 0 else several[rng.integers(len(several))]
            i, j = rng.choice(people[name], size=2, replace=False) + 1
            lines.append(f"{name}\t{i}\t{j}")
        for k in range(per_fold):
            a, b = ("Lou_Train", "Ann_Val") if k == 0 else rng.choice(names, size=2, replace=False)
            lines.append(f"{a}\t{rng.integers(people[a]) + 1}\t{b}\t{rng.integers(people[b]) + 1}")
    return lines


def reference_pairs_file(data, lines, distance="squared_l2", flip=False):
    """(distances, same, fold ids, held-out mask) of a pairs file's lines, by plain loops."""
    folds_count, per_fold = map(int, lines[0].split("\t"))
    d, s, folds, heldout = [], [], [], []
    for n, line in enumerate(lines[1:]):
        f = line.split("\t")
        a, i, b, j = (f[0], f[1], f[0], f[2]) if len(f) == 3 else f
        x = reference_embedding(data["images"][f"{a}/{a}_{int(i):04d}.jpg"], flip)
        y = reference_embedding(data["images"][f"{b}/{b}_{int(j):04d}.jpg"], flip)
        d.append(reference_distance(x, y, distance))
        s.append(len(f) == 3)
        folds.append(n // (2 * per_fold))
        heldout.append(a not in TRAIN and b not in TRAIN)
    return np.asarray(d), np.asarray(s), np.asarray(folds), np.asarray(heldout)


GOOD_PAIRS = ["2\t2",
              "Fay_Test\t1\t2", "Kim_Train\t1\t3",
              "Fay_Test\t1\tGus_Test\t1", "Ann_Val\t2\tKim_Train\t4",
              "Gus_Test\t2\t4", "Ann_Val\t1\t3",
              "Hal_Test\t1\tIvy_Test\t2", "Bob_Val\t1\tLou_Train\t2"]


def write_pairs(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """One evaluation (the model's squared L2, flip, with a pairs.txt) shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("evaluated")
    pairs = write_pairs(root / "pairs.txt", GOOD_PAIRS)
    sha = hashlib.sha256(pairs.read_bytes()).hexdigest()
    seen: list[np.ndarray] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_export(monkeypatch, seen)
        result, out = run(data, write_model_dir(root / "model"), model_uri="gs://b/model",
                          pairs_uri=str(pairs), pairs_sha256=sha)
    return {"result": result, "out": out, "seen": seen}


# ----------------------------------------------------------------------------- figures against loops

@pytest.mark.parametrize("setting, squared, used, earlier", [
    ("model", True, "squared_l2", False), ("model", False, "l2", False), ("cosine", True, "cosine", False),
    ("l2", True, "l2", False), ("squared_l2", False, "squared_l2", False),
    # model.json files of earlier versions: a boolean distance.squared instead of distance.name.
    ("model", True, "squared_l2", True), ("model", False, "l2", True), ("cosine", False, "cosine", True)])
def test_metrics_match_a_loop_reference(data, evaluated, fake_model, tmp_path, setting, squared, used, earlier):
    if (setting, squared, earlier) == ("model", True, False):
        result, out = evaluated["result"], evaluated["out"]
    else:
        config = dataclasses.replace(CONFIG, distance=setting)
        result, out = run(data, write_model_dir(tmp_path / "model", squared, earlier=earlier), config=config)
    m = result["metrics"]
    assert m["distance"] == used
    info = json.loads((out / "threshold.json").read_text())
    assert info["distance"] == used and info["distance_definition"] == ev.DISTANCE_DEFINITIONS[used]
    assert info["model_distance"] == ("squared_l2" if squared else "l2")
    assert f"({ev.DISTANCE_LABELS[used]})" in (out / "report.html").read_text()
    seed_t = {"squared_l2": 1.242 ** 2, "l2": 1.242, "cosine": 1.242 ** 2 / 2}[used]
    assert m["seed_threshold"] == pytest.approx(seed_t)
    check_threshold_scores(m, data, used, True, seed_t)
    td, ts, threshold = check_threshold_scores(m, data, used, False, seed_t)
    tn = sum(1 for x, y in zip(td, ts) if not y and x >= threshold)
    fp = sum(1 for x, y in zip(td, ts) if not y and x < threshold)
    fn = sum(1 for x, y in zip(td, ts) if y and x >= threshold)
    tp = sum(1 for x, y in zip(td, ts) if y and x < threshold)
    assert result["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["embedding_dim"] == 6


def test_pair_counts_and_identities(data, evaluated):
    m = evaluated["result"]["metrics"]
    for split, people in (("val", VAL), ("test", TEST)):
        keys, a, b, same = make_pairs(split_keys(people), max_positive=CONFIG.max_positive_pairs,
                                      max_per_identity=CONFIG.max_pairs_per_identity, seed=CONFIG.seed)
        owner = [key.split("/")[0] for key in keys]
        positives = sum(min(c * (c - 1) // 2, CONFIG.max_pairs_per_identity) for c in people.values())
        assert (m[f"{split}_pairs"], m[f"{split}_same_pairs"], m[f"{split}_different_pairs"]) == \
            (2 * positives, positives, positives)
        # 24 validation and 22 test pairs of each class: too few for an accuracy headline.
        assert m[f"{split}_accuracy_withheld"] == 1
        assert m[f"{split}_positive_identities"] == sum(1 for c in people.values() if c >= 2)
        assert m[f"{split}_identities"] == len({owner[i] for i in np.concatenate((a, b))})
        assert m[f"{split}_images"] == len(set(np.concatenate((a, b)).tolist()))


def test_all_metrics_present_finite_and_in_range(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    m = result["metrics"]
    rates = ["val_accuracy", "test_accuracy", "test_kfold_accuracy_mean", "test_auc", "test_eer",
             "test_val_at_far_0.25", "test_far_at_far_0.25", "test_kfold_val_at_far_0.25_mean",
             "test_kfold_far_at_far_0.25_mean", "test_accuracy_at_seed_threshold", "val_auc"]
    rates += [flip_key(key) for key in rates]
    for key in rates + ["threshold", "flip_threshold", "test_kfold_accuracy_std", "test_flip_kfold_accuracy_std",
                        "test_pairs", "test_same_pairs", "test_different_pairs", "val_pairs", "test_identities",
                        "val_identities", "test_val_at_far_0.001_needs_different_pairs",
                        "val_positive_identities", "test_positive_identities"]:
        assert key in m, key
    for key, value in m.items():
        if key != "distance":
            assert isinstance(value, (int, float)) and math.isfinite(value), key
    for key in rates:
        assert 0.0 <= m[key] <= 1.0, key
    assert 0.0 <= m["threshold"] <= 4.0
    # The fake model separates colours well: far better than chance (the threshold comes from 24 val pairs).
    assert m["test_auc"] > 0.9 and m["test_accuracy"] > 0.7

    roc = result["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"]) <= 300
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["thresholds"]) > 0)
    assert sum(map(sum, result["confusion_matrix"])) == m["test_pairs"]
    assert json.loads((out / "metrics.json").read_text()) == m


def test_threshold_json_states_the_distance(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    info = json.loads((out / "threshold.json").read_text())
    assert info == result["threshold"]
    assert set(info) == {"threshold", "distance", "distance_definition", "rule", "chosen_on", "val_accuracy",
                         "test_accuracy", "model", "embedding_dim", "preprocessing", "flip_threshold",
                         "flip_definition", "flip_test_accuracy", "model_sha256", "model_distance"}
    assert info["distance"] == "squared_l2" and "squared Euclidean" in info["distance_definition"]
    assert info["rule"] == "same person when distance < threshold"
    assert info["chosen_on"] == "validation pairs, max accuracy"
    assert info["model"] == "gs://b/model" and info["embedding_dim"] == 6
    assert info["preprocessing"]["image_size"] == IMAGE_SIZE
    assert info["threshold"] == result["metrics"]["threshold"]
    assert info["flip_threshold"] == result["metrics"]["flip_threshold"]
    assert "mirrored" in info["flip_definition"]


def test_report_has_every_section(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    html = (out / "report.html").read_text()
    for heading in ("Warnings", "Headline", "ROC curves", "Distances of test pairs", "Training curves",
                    "Example test pairs", "All metrics"):
        assert f"<h2>{heading}</h2>" in html
    m = result["metrics"]
    assert f"{m['threshold']:.4f} (squared L2)" in html and f"{m['flip_threshold']:.4f} (squared L2)" in html
    assert "<th>with flip</th>" in html
    assert "LFW pairs.txt" in html and "TRAINING identities" in html and "NOT a held-out benchmark" in html
    # ROC, histogram, training curves plotted from history.json: three PNG figures.
    assert html.count("data:image/png;base64,") == 3
    # report_examples pairs, two thumbnails each, correct ones and (if any) wrong ones marked.
    assert html.count('<div class="pair ') == CONFIG.report_examples
    assert html.count("data:image/jpeg;base64,") == 2 * CONFIG.report_examples
    assert "CORRECT" in html
    assert "Zoe_&_<Co>" not in html             # names are escaped (test_report checks the escaping)
    assert "http" not in html.replace("http-equiv", "")   # self-contained: nothing fetched


def test_synthetic_images_are_never_embedded(data, evaluated):
    """Every array the model saw is a real image's preprocessed array or its mirror, each exactly once."""
    seen = evaluated["seen"]
    assert seen, "nothing embedded"
    candidates = {(key, mirrored): np.flip(preprocessed(image), axis=1) if mirrored else preprocessed(image)
                  for key, image in data["images"].items() for mirrored in (False, True)}
    synthetic = [preprocessed(image) for image in data["synthetic"]]
    names, stack = list(candidates), np.stack(list(candidates.values()))
    matched = []
    for array in seen:
        assert min(np.abs(array - s).max() for s in synthetic) > 1e-3
        error = np.abs(stack - array).max(axis=(1, 2, 3))
        assert error.min() < 1e-5
        matched.append(names[int(error.argmin())])
    assert len(matched) == len(set(matched))                 # each image and each mirror embedded once
    plain = {key for key, mirrored in matched if not mirrored}
    assert plain == {key for key, mirrored in matched if mirrored}
    in_positives = {k for people in (VAL, TEST) for n, files in split_keys(people).items() if len(files) >= 2
                    for k in files}
    # pairs.txt names training images too: those (and only those) are embedded as well.
    in_pairs_file = {f"{n}/{n}_{i:04d}.jpg" for n, i in
                     (("Kim_Train", 1), ("Kim_Train", 3), ("Kim_Train", 4), ("Lou_Train", 2))}
    real = {k for people in (VAL, TEST) for files in split_keys(people).values() for k in files}
    assert in_positives | in_pairs_file <= plain <= real | in_pairs_file


def test_flip_off_embeds_each_image_once_and_reports_no_flip_figures(data, fake_model, tmp_path):
    config = dataclasses.replace(CONFIG, flip=False)
    result, out = run(data, write_model_dir(tmp_path / "model"), config=config)
    assert not [key for key in result["metrics"] if "flip" in key]
    assert not [key for key in result["threshold"] if "flip" in key]
    assert len(fake_model) == result["metrics"]["val_images"] + result["metrics"]["test_images"]
    html = (out / "report.html").read_text()
    assert "<th>with flip</th>" not in html and "test pairs, flip" not in html
    check_threshold_scores(result["metrics"], data, "squared_l2", False, 1.242 ** 2)


def test_cosine_of_embeddings_not_unit_length_omits_the_seed_threshold(data, fake_model, tmp_path):
    config = dataclasses.replace(CONFIG, distance="cosine")
    result, out = run(data, write_model_dir(tmp_path / "model", unit=False), config=config)
    m = result["metrics"]
    assert "seed_threshold" not in m and not [key for key in m if "seed_threshold" in key]
    # Cosine distances do not depend on the norms: the same figures as for unit embeddings.
    check_threshold_scores(m, data, "cosine", False, None, unit=False)
    check_threshold_scores(m, data, "cosine", True, None, unit=False)
    assert "has no cosine distance equivalent here" in (out / "report.html").read_text()
    # Plain L2 of the same embeddings keeps the seed threshold: t is t in any L2.
    config = dataclasses.replace(CONFIG, distance="l2")
    result, _ = run(data, write_model_dir(tmp_path / "model", unit=False), config=config, out=tmp_path / "l2")
    assert result["metrics"]["seed_threshold"] == 1.242


# ----------------------------------------------------------------------------- warnings

def test_too_few_identities_are_warned_about(data, evaluated, fake_model, tmp_path, monkeypatch):
    warnings = evaluated["result"]["warnings"]
    m = evaluated["result"]["metrics"]
    for split in ("val", "test"):
        text = (f"{split}: its figures rest on {m[f'{split}_positive_identities']} identities in same-person "
                f"pairs ({m[f'{split}_identities']} in all its pairs), fewer than {ev.MIN_IDENTITIES}")
        assert sum(w.startswith(text) for w in warnings) == 1
    html = (evaluated["out"] / "report.html").read_text()
    assert html.count("its figures rest on") == 2
    monkeypatch.setattr(scoring, "MIN_IDENTITIES", 5)        # val has 4 identities in same pairs, test 6
    result, out = run(data, write_model_dir(tmp_path / "model"))
    assert [w.split(":")[0] for w in result["warnings"]] == ["val"]
    monkeypatch.setattr(scoring, "MIN_IDENTITIES", 4)
    result, out = run(data, write_model_dir(tmp_path / "model"))
    assert result["warnings"] == [] and "<h2>Warnings</h2>" not in (out / "report.html").read_text()


# ----------------------------------------------------------------------------- pairs.txt

def check_pairs_scores(m, prefix, d, s, folds, threshold):
    """k-fold accuracy (own loop), AUC (pair counting), VAL@FAR and accuracy at the threshold of one pairs set."""
    accs = []
    for k in np.unique(folds):
        t, _ = vm.select_threshold(d[folds != k], s[folds != k])
        accs.append(np.mean((d[folds == k] < t) == s[folds == k]))
    assert m[f"{prefix}kfold_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m[f"{prefix}kfold_accuracy_std"] == pytest.approx(np.std(accs))
    auc = sum(1.0 if p < q else 0.5 if p == q else 0.0 for p in d[s] for q in d[~s]) / (s.sum() * (~s).sum())
    assert m[f"{prefix}auc"] == pytest.approx(auc)
    assert m[f"{prefix}accuracy_at_threshold"] == pytest.approx(np.mean((d < threshold) == s))
    # VAL@FAR 0.25 needs 4 different pairs in the test part of every fold; 1e-3 needs 1,000.
    fewest = min(int(np.sum(~s[folds == k])) for k in np.unique(folds))
    assert m[f"{prefix}kfold_val_at_far_0.001_needs_different_pairs"] == 1000
    assert f"{prefix}kfold_val_at_far_0.001_mean" not in m
    if fewest >= 4:
        assert m[f"{prefix}kfold_val_at_far_0.25_mean"] == pytest.approx(
            vm.kfold_val_at_far(d, s, 0.25, int(np.unique(folds).size), fold_ids=folds)["val_mean"])
    else:
        assert m[f"{prefix}kfold_val_at_far_0.25_needs_different_pairs"] == 4


def test_lfw_pairs_file_and_its_overlap_with_training(data, evaluated):
    m = evaluated["result"]["metrics"]
    for flip in (False, True):
        d, s, folds, heldout = reference_pairs_file(data, GOOD_PAIRS, flip=flip)
        prefix = "lfw_pairs_flip_" if flip else "lfw_pairs_"
        check_pairs_scores(m, prefix, d, s, folds, m["flip_threshold" if flip else "threshold"])
    assert (m["lfw_pairs_pairs"], m["lfw_pairs_folds"]) == (8, 2)
    # Kim_Train and Lou_Train are training identities, named by 3 of the 8 pairs.
    assert (m["lfw_pairs_train_identities"], m["lfw_pairs_overlapping_pairs"]) == (2, 3)
    assert (m["lfw_pairs_heldout_pairs"], m["lfw_pairs_heldout_same_pairs"], m["lfw_pairs_heldout_different_pairs"]) \
        == (5, 3, 2)
    assert (m["lfw_pairs_same_pairs"], m["lfw_pairs_different_pairs"], m["lfw_pairs_folds_from_file"]) == (4, 4, 1)
    assert m["lfw_pairs_heldout_identities"] == 5          # Fay, Gus, Ann, Hal, Ivy
    # 5 held-out pairs are too few for figures of their own: a warning, no lfw_pairs_heldout_ scores.
    assert "lfw_pairs_heldout_kfold_accuracy_mean" not in m
    warning = [w for w in evaluated["result"]["warnings"] if w.startswith("LFW pairs.txt")]
    assert len(warning) == 1 and "3 of 8 pairs name 2 training identities" in warning[0]
    assert "not a held-out benchmark" in warning[0]


def test_lfw_pairs_heldout_figures(data, fake_model, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "MIN_HELDOUT_PAIRS", 20)
    lines = pairs_lines(folds=2, per_fold=15)
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    result, out = run(data, write_model_dir(tmp_path / "model"), pairs_uri=str(pairs))
    m = result["metrics"]
    d, s, folds, heldout = reference_pairs_file(data, lines)
    assert m["lfw_pairs_overlapping_pairs"] == int((~heldout).sum()) > 0
    assert m["lfw_pairs_heldout_pairs"] == int(heldout.sum()) >= 20
    check_pairs_scores(m, "lfw_pairs_", d, s, folds, m["threshold"])
    held_folds = ev.stratified_folds(s[heldout], CONFIG.folds, CONFIG.seed, "held out")
    check_pairs_scores(m, "lfw_pairs_heldout_", d[heldout], s[heldout], held_folds, m["threshold"])
    fd, fs, _, _ = reference_pairs_file(data, lines, flip=True)
    check_pairs_scores(m, "lfw_pairs_heldout_flip_", fd[heldout], fs[heldout], held_folds, m["flip_threshold"])
    assert m["lfw_pairs_heldout_folds"] == CONFIG.folds
    assert not [w for w in result["warnings"] if w.startswith("LFW")]
    html = (out / "report.html").read_text()
    # Too few pairs of each class for an accuracy headline: the counts, AUC and why accuracy is withheld.
    n_same, n_diff = int(s[heldout].sum()), int((~s[heldout]).sum())
    assert m["lfw_pairs_heldout_accuracy_withheld"] == 1
    headline = html[html.index('<table class="headline">'):]
    headline = headline[:headline.index("</table>")]
    assert (f'<td>LFW pairs.txt, held-out identities pairs</td><td class="num">{n_same} same, {n_diff} different '
            f'in {CONFIG.folds} seeded stratified folds</td>') in headline
    assert (f"<td>LFW pairs.txt, held-out identities accuracy</td><td class=\"num\">accuracy withheld: {n_same} "
            f"same and {n_diff} different pairs (&lt; 100 each)") in headline
    assert "held-out identities k-fold accuracy" not in headline
    assert "LFW pairs.txt, held-out identities ROC AUC" in headline
    assert "LFW pairs.txt, held-out identities" in html and "NOT a held-out benchmark" not in html


def test_lfw_pairs_without_training_identities_are_held_out(data, fake_model, tmp_path):
    lines = ["1\t2", "Fay_Test\t1\t2", "Gus_Test\t2\t4", "Fay_Test\t1\tGus_Test\t1", "Hal_Test\t1\tIvy_Test\t2"]
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    config = dataclasses.replace(CONFIG, folds=2)
    result, out = run(data, write_model_dir(tmp_path / "model"), config=config, pairs_uri=str(pairs))
    m = result["metrics"]
    counts = ("lfw_pairs_train_identities", "lfw_pairs_overlapping_pairs", "lfw_pairs_heldout_pairs")
    assert [m[key] for key in counts] == [0, 0, 4]
    assert not [key for key in m if key.startswith("lfw_pairs_heldout_") and "pairs" not in key
                and "identities" not in key]
    assert "None of them is a training identity" in (out / "report.html").read_text()


# ----------------------------------------------------------------------------- distances and flip

def test_pair_distances_against_a_loop():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 5)).astype(np.float32)
    a, b = rng.integers(0, 7, 20), rng.integers(0, 7, 20)
    for distance in ev.DISTANCES:
        d = ev.pair_distances(e, a, b, distance)
        for n, (i, j) in enumerate(zip(a, b)):
            x, y = [float(v) for v in e[i]], [float(v) for v in e[j]]
            assert d[n] == pytest.approx(reference_distance(x, y, distance), rel=1e-12, abs=1e-14)
        assert ev.pair_distances(e, [3], [3], distance)[0] == 0.0
    # model.json's squared flag names the model's own distance.
    np.testing.assert_array_equal(ev.pair_distances(e, a, b, True), ev.pair_distances(e, a, b, "squared_l2"))
    np.testing.assert_array_equal(ev.pair_distances(e, a, b, False), ev.pair_distances(e, a, b, "l2"))
    with pytest.raises(InputError, match="zero vectors"):
        ev.pair_distances(np.zeros((2, 3)), [0], [1], "cosine")
    with pytest.raises(InputError, match="distance must be one of"):
        ev.pair_distances(e, a, b, "hamming")


def test_distance_settings_and_seed_threshold_conversion():
    from facenet_kfp.config import field_help

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(EvaluateConfig)}["distance"]
    assert choices == ev.DISTANCE_SETTINGS and EvaluateConfig().distance == "model"
    assert "cosine" in field_help(EvaluateConfig)["distance"]
    with pytest.raises(InputError, match="evaluate.distance must be one of"):
        EvaluateConfig(distance="hamming")
    assert [ev.resolve_distance(s, True) for s in ev.DISTANCE_SETTINGS] == ["squared_l2", "squared_l2", "l2",
                                                                          "cosine"]
    assert ev.resolve_distance("model", False) == "l2"
    assert [ev.resolve_distance("model", own) for own in ev.DISTANCES] == list(ev.DISTANCES)


def test_the_models_own_distance_by_name_or_by_the_earlier_flag(tmp_path):
    for distance, name in (({"name": "cosine"}, "cosine"), ({"name": "l2"}, "l2"), ({"squared": True}, "squared_l2"),
                           ({"squared": False}, "l2"), ({"name": "l2", "squared": True}, "l2")):
        assert ev.model_distance({"distance": {**distance, "margin": 0.2}}, tmp_path) == name, distance
    for bad in ({"name": "l1"}, {"squared": "yes"}, "l2"):
        with pytest.raises(InputError, match=rf"{tmp_path.name}/model.json: expected 'distance.name'"):
            ev.model_distance({"distance": bad}, tmp_path)
    # On unit vectors a plain L2 distance t is squared L2 t^2 and cosine t^2 / 2: the same pairs below it.
    rng = np.random.default_rng(1)
    e = rng.normal(size=(40, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    a, b = np.triu_indices(40, 1)
    below = ev.pair_distances(e, a, b, "l2") < 1.242
    for distance in ev.DISTANCES:
        t = ev.seed_threshold_in(distance, 1.242)
        np.testing.assert_array_equal(ev.pair_distances(e, a, b, distance) < t, below)
    assert ev.seed_threshold_in("cosine", 1.242, unit=False) is None
    assert ev.seed_threshold_in("squared_l2", 1.242, unit=False) == pytest.approx(1.242 ** 2)
    assert ev.unit_length(e) and not ev.unit_length(2 * e)


def test_flip_embeddings_against_a_loop():
    rng = np.random.default_rng(2)
    plain, mirrored = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    flipped = ev.flip_embeddings(plain, mirrored)
    assert flipped.dtype == np.float32
    for row, p, m in zip(flipped, plain, mirrored):
        total = [float(x) + float(y) for x, y in zip(p, m)]
        norm = math.sqrt(sum(t * t for t in total))
        assert row.tolist() == pytest.approx([t / norm for t in total], rel=1e-6)
    with pytest.raises(InputError, match="opposite embeddings"):
        ev.flip_embeddings(plain, -plain)


def test_mirror_pair_model_against_a_loop():
    seen = []
    model = ev.MirrorPairModel(FakeModel(seen))
    assert model.output_shape == (None, 12)
    batch = np.random.default_rng(3).uniform(-1, 1, size=(5, 8, 8, 3)).astype(np.float32)
    out = model.predict_on_batch(batch)
    for row, x in zip(out, batch):
        mirrored = np.stack([x[:, 7 - col] for col in range(8)], axis=1)
        expected = np.concatenate((FakeModel([]).predict_on_batch(x[None])[0],
                                   FakeModel([]).predict_on_batch(mirrored[None])[0]))
        np.testing.assert_array_equal(row, expected)
    assert len(seen) == 10                                   # one call of the model on image and mirror


def noise_png(height, width, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mirrored_with_pillow(data_bytes: bytes) -> bytes:
    """The decoded image mirrored left-right with Pillow, as lossless PNG."""
    from facenet_kfp.codec import decode_rgb

    buffer = io.BytesIO()
    with decode_rgb(data_bytes) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("height, width, crop", [(250, 250, TrainConfig().crop_fraction), (40, 40, CROP),
                                                 (120, 96, 0.5)])
def test_mirroring_the_input_is_mirroring_the_image(height, width, crop):
    """np.flip of a preprocessed centre crop equals preprocessing the Pillow-mirrored image
    (both the NumPy and the TensorFlow preprocessing) when the margin beside the crop is even."""
    from facenet_kfp.tf_input import preprocess_image
    from facenet_kfp.preprocess import crop_box, preprocess_array

    _, left, _, box_w = crop_box(height, width, crop)
    assert (width - box_w) % 2 == 0 and left == (width - box_w) // 2
    image = noise_png(height, width)
    mirror = mirrored_with_pillow(image)
    np.testing.assert_allclose(np.flip(preprocess_array(image, 32, crop), axis=1),
                               preprocess_array(mirror, 32, crop), atol=1e-5)
    np.testing.assert_allclose(np.flip(preprocess_image(tf.constant(image), 32, crop).numpy(), axis=1),
                               preprocess_image(tf.constant(mirror), 32, crop).numpy(), atol=1e-5)


def test_mirroring_the_input_with_an_odd_margin_mirrors_the_same_crop():
    """With an odd margin the mirrored image's own centre crop sits one pixel over; np.flip is the mirror
    of the original crop, the same face pixels."""
    from facenet_kfp.codec import decode_rgb
    from facenet_kfp.preprocess import area_resize, crop_box, preprocess_array

    height = width = 250
    top, left, box_h, box_w = crop_box(height, width, 0.875)          # a 219-pixel box: margin 31
    assert (width - box_w) % 2 == 1
    image = noise_png(height, width, seed=1)
    flipped = np.flip(preprocess_array(image, 32, 0.875), axis=1)
    assert np.abs(flipped - preprocess_array(mirrored_with_pillow(image), 32, 0.875)).max() > 1e-2
    with decode_rgb(mirrored_with_pillow(image)) as mirror:
        pixels = np.asarray(mirror)[top:top + box_h, width - left - box_w:width - left]
    np.testing.assert_allclose(flipped, np.clip(area_resize(pixels, 32, scale=2 / 255) - 1, -1, 1), atol=1e-5)


# ----------------------------------------------------------------------------- input errors

def test_lfw_pairs_missing_image_names_the_line(data, fake_model, tmp_path):
    lines = list(GOOD_PAIRS)
    lines[6] = "Ann_Val\t1\t9"                 # Ann_Val has 4 images; file line 7
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    with pytest.raises(InputError, match=r"line 7") as info:
        run(data, write_model_dir(tmp_path / "model"), pairs_uri=str(pairs))
    assert "Ann_Val/Ann_Val_0009.jpg" in str(info.value) and "'Ann_Val\\t1\\t9'" in str(info.value)
    assert not fake_model                      # failed before any embedding
    assert not (tmp_path / "out" / "threshold.json").exists()


def test_lfw_pairs_checksum_mismatch(data, fake_model, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.txt", GOOD_PAIRS)
    with pytest.raises(DownloadError, match="sha256"):
        run(data, write_model_dir(tmp_path / "model"), pairs_uri=str(pairs), pairs_sha256="0" * 64)


def test_input_errors_name_the_file(fresh_data, fake_model, tmp_path):
    data = fresh_data
    model = write_model_dir(tmp_path / "model")
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(InputError, match="model.json"):
        run(data, tmp_path / "empty-model")
    with pytest.raises(InputError, match="model folder not found"):
        run(data, tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text(json.dumps({"distance": {}}))
    with pytest.raises(InputError, match=r"broken/model.json: expected 'distance\.name', one of squared_l2, l2, "
                                         r"cosine \(the distance the model was trained with\), got \{\}"):
        run(data, broken)

    (data["splits"] / "val.txt").write_text("Eve_Val\t1\n")      # no same-person pair possible
    with pytest.raises(InputError, match=r"val\.txt.*no identity has 2 real images"):
        run(data, model)
    (data["splits"] / "val.txt").write_text("Ann_Val\t5\n")      # the dataset has 4
    with pytest.raises(InputError, match=r"val\.txt.*Ann_Val"):
        run(data, model)
    (data["splits"] / "val.txt").write_text("")
    with pytest.raises(InputError, match=r"val\.txt"):
        run(data, model)
    (data["splits"] / "test.txt").unlink()
    (data["splits"] / "val.txt").write_text("Ann_Val\t4\nBob_Val\t3\n")
    with pytest.raises(InputError, match=r"test\.txt"):
        run(data, model)
    with pytest.raises(InputError, match="manifest"):
        ev.evaluate(model, tmp_path, data["splits"], CONFIG, report_path=tmp_path / "r.html",
                    threshold_path=tmp_path / "t.json")
    assert not fake_model


def test_model_trained_on_these_inputs_is_evaluated(data, fake_model, tmp_path):
    inputs = provenance.check_inputs(images=data["dataset"], labels=data["labels"], splits=data["splits"])
    result, _ = run(data, write_model_dir(tmp_path / "model", inputs=inputs))
    assert result["metrics"]["test_pairs"] > 0


@pytest.mark.parametrize("kind, match", [
    ("images", r"model.json: trained on another dataset \(images fingerprint 0{12}\) than the images given"),
    ("splits", r"model.json: trained on other splits \(splits fingerprint 0{12}\) than the splits given"),
])
def test_model_trained_on_other_inputs_is_refused(data, fake_model, tmp_path, kind, match):
    inputs = provenance.check_inputs(images=data["dataset"], splits=data["splits"])
    model = write_model_dir(tmp_path / "model", inputs={**inputs, kind: "0" * 64})
    with pytest.raises(InputError, match=match):
        run(data, model)
    assert not fake_model and not (tmp_path / "out").exists()


def test_splits_of_another_dataset_or_without_provenance_are_refused(data, fake_model, tmp_path):
    other = build_data(tmp_path / "other", seed=1)      # the same people, other images
    model = write_model_dir(tmp_path / "model")
    with pytest.raises(InputError, match=r"splits .*other/splits was made from another dataset \(images "
                                         r"fingerprint \w+, but images .*/images has \w+\)"):
        run({**data, "splits": other["splits"]}, model)
    (other["splits"] / provenance.PROVENANCE_JSON).unlink()
    with pytest.raises(InputError, match=r"splits/provenance.json: not found.* rerun the splits step"):
        run({**data, "splits": other["splits"]}, model)
    assert not fake_model


def test_too_few_pairs_for_the_folds(data, fake_model, tmp_path):
    with pytest.raises(InputError, match=r"test\.txt.*50-fold"):
        run(data, write_model_dir(tmp_path / "model"),
            config=EvaluateConfig(max_positive_pairs=1000, folds=50, batch_size=8))


def test_stratified_folds_balance_labels_and_follow_the_seed():
    same = np.arange(103) % 3 == 0
    ids = ev.stratified_folds(same, 5, seed=1, where="x")
    for k in range(5):
        assert abs(int(same[ids == k].sum()) - same.sum() / 5) < 1
        assert abs(int((~same)[ids == k].sum()) - (~same).sum() / 5) < 1
    assert np.array_equal(ids, ev.stratified_folds(same, 5, seed=1, where="x"))
    assert not np.array_equal(ids, ev.stratified_folds(same, 5, seed=2, where="x"))


def test_choose_examples_mixes_wrong_and_correct():
    split = ev.SplitPairs("test", [], np.zeros(10, int), np.zeros(10, int),
                          same=np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool), identities=2,
                          distances=np.array([.1, .2, .9, .3, .4, .5, .8, .05, .7, .6]))
    # threshold 0.45: wrong = index 2 (same, far) and 7 (different, close).
    picked = ev.choose_examples(split, 0.45, 6, seed=0)
    assert len(picked) == 6 and len(set(picked)) == 6
    assert picked[:2] == [2, 7]
    assert len(ev.choose_examples(split, 0.45, 20, seed=0)) == 10
    assert ev.choose_examples(split, 0.45, 0, seed=0) == []


def test_far_key():
    assert [ev.far_key(f) for f in (1e-3, 0.01, 1e-4, 0.1)] == ["0.001", "0.01", "0.0001", "0.1"]


@pytest.fixture(scope="module")
def real_model_dir(tmp_path_factory):
    """A tiny untrained small_cnn model saved as train would save it."""
    from facenet_kfp.model import build_embedding_model

    model = build_embedding_model((32, 32, 3), 16, architecture="small_cnn")
    folder = tmp_path_factory.mktemp("real") / "model"
    save_real_model(model, folder)
    return folder


def save_real_model(model, folder):
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=16, squared=True)
    export.save_model_artifact(model, folder, export.artifact_metadata(config, trained_steps=3), HISTORY)


def test_real_model_round_trip(data, tmp_path, real_model_dir):
    result, out = run(data, real_model_dir, out=tmp_path / "out")
    m = result["metrics"]
    assert m["embedding_dim"] == 16 and m["distance"] == "squared_l2"
    assert "test_flip_accuracy" in m and "flip_threshold" in result["threshold"]
    for key, value in m.items():
        if key != "distance":
            assert math.isfinite(value), key
    assert json.loads((out / "threshold.json").read_text())["preprocessing"]
    html = (out / "report.html").read_text()
    assert re.search(r"<h2>Example test pairs</h2>", html)
    # The training curves are the model folder's curves.png, embedded as is.
    curves = (real_model_dir / "curves.png").read_bytes()
    assert base64.b64encode(curves).decode() in html


def test_flip_embeddings_of_a_real_model_against_a_loop(data, real_model_dir):
    """embed_keys with flip: per image, the Keras model on the image and on its mirror, added, normalised."""
    model, metadata = export.load_model_artifact(real_model_dir)
    rows = ev.real_rows_by_file(data["dataset"])
    keys = sorted(rows)[:11]
    plain, flipped = ev.embed_keys(model, metadata, data["dataset"], rows, keys, batch_size=4, flip=True)
    alone, none = ev.embed_keys(model, metadata, data["dataset"], rows, keys, batch_size=4)
    assert none is None
    np.testing.assert_allclose(plain, alone, atol=1e-6)
    for key, p, f in zip(keys, plain, flipped):
        x = preprocessed(data["images"][key])
        e = model.predict_on_batch(x[None])[0].astype(np.float64)
        m = model.predict_on_batch(np.ascontiguousarray(x[:, ::-1])[None])[0].astype(np.float64)
        np.testing.assert_allclose(p, e, atol=1e-5)
        np.testing.assert_allclose(f, (e + m) / np.linalg.norm(e + m), atol=1e-5)


def test_archive_overlap_counts_names_in_both_archives():
    train_rows = {f"{n}/{n}_0001.jpg": {"identity": n} for n in ("Ann", "Bob", "Cy", "Dee")}
    eval_rows = {f"{n}/{n}_000{i}.jpg": {"identity": n} for n in ("Bob", "Cy", "Eve") for i in (1, 2)}
    assert ev.archive_overlap(train_rows, eval_rows, train_names={"Ann", "Bob"}) == {
        "eval_identities": 3, "eval_images": 6, "eval_identities_in_training_archive": 2,
        "eval_identities_in_train_split": 1}


# ----------------------------------------------------------------------------- what the figures rest on

@pytest.mark.parametrize("folds", [4, 1, 2, 5])
@pytest.mark.parametrize("separate", [True, False])
def test_pairs_file_folds_come_from_its_header(data, fake_model, tmp_path, folds, separate):
    """A pairs.txt declaring 4 (or 2, 5) folds is cross-validated in those folds, with an evaluation archive
    or on the training archive; a 1-fold file (View 1 style) gets evaluate.folds seeded stratified folds."""
    per_fold = {1: 8, 2: 6, 4: 3, 5: 3}[folds]
    lines = pairs_lines(folds=folds, per_fold=per_fold, seed=folds)
    if folds == 1:
        lines[0] = str(per_fold)                      # View 1's header: the pair count alone
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    config = dataclasses.replace(CONFIG, flip=False)
    extra = {"eval_dataset_dir": data["dataset"]} if separate else {}
    result, out = run(data, write_model_dir(tmp_path / "model"), config=config, pairs_uri=str(pairs), **extra)
    m = result["metrics"]
    d, s, file_folds, _ = reference_pairs_file(data, [f"1\t{per_fold}" if folds == 1 else lines[0], *lines[1:]])
    expected = file_folds if folds > 1 else ev.stratified_folds(s, CONFIG.folds, CONFIG.seed, "one fold")
    n_folds = folds if folds > 1 else CONFIG.folds
    assert (m["lfw_pairs_folds"], m["lfw_pairs_folds_from_file"]) == (n_folds, int(folds > 1))
    check_pairs_scores(m, "lfw_pairs_", d, s, expected, m["threshold"])
    html = (out / "report.html").read_text()
    if separate:
        # The test figures are the pairs file's, in the same folds.
        assert (m["test_folds"], m["test_folds_from_file"], m["test_pairs"]) == (n_folds, int(folds > 1), len(d))
        check_pairs_scores({k.replace("test_", "lfw_pairs_", 1): v for k, v in m.items()
                            if k.startswith("test_kfold_accuracy")} | {
            "lfw_pairs_auc": m["test_auc"], "lfw_pairs_accuracy_at_threshold": m["test_accuracy"],
            "lfw_pairs_kfold_val_at_far_0.001_needs_different_pairs": m["test_kfold_val_at_far_0.001_needs_different_pairs"],
            **{k.replace("test_", "lfw_pairs_", 1): v for k, v in m.items() if k.startswith("test_kfold_val_at_far_0.25")}},
            "lfw_pairs_", d, s, expected, m["threshold"])
        assert (f"the test pairs are in the {folds} folds the evaluation archive&#x27;s pairs.txt declares" in html
                if folds > 1 else "the evaluation archive&#x27;s pairs.txt declares one fold" in html)
    else:
        assert m["test_folds_from_file"] == 0 and m["test_folds"] == CONFIG.folds
    if folds > 1:
        assert f"in the {folds} folds the file declares (the LFW protocol)" in html
    else:
        assert f"in the {CONFIG.folds} seeded stratified folds (evaluate.folds, evaluate.seed): the file declares " \
               f"one fold (View 1 style)" in html


def test_pairs_file_fold_counts_without_an_evaluation_archive_match_with_one(data, fake_model, tmp_path):
    """Same file, same folds, same pairs.txt figures whichever archive branch evaluates it."""
    lines = pairs_lines(folds=4, per_fold=3, seed=4)
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    config = dataclasses.replace(CONFIG, flip=False)
    plain, _ = run(data, write_model_dir(tmp_path / "model"), config=config, pairs_uri=str(pairs),
                   out=tmp_path / "plain")
    separate, _ = run(data, write_model_dir(tmp_path / "model"), config=config, pairs_uri=str(pairs),
                      eval_dataset_dir=data["dataset"], out=tmp_path / "separate")
    lfw = {k: v for k, v in plain["metrics"].items() if k.startswith("lfw_pairs_")}
    assert lfw == {k: v for k, v in separate["metrics"].items() if k.startswith("lfw_pairs_")}
    assert separate["metrics"]["test_kfold_accuracy_mean"] == lfw["lfw_pairs_kfold_accuracy_mean"]


def test_val_at_far_is_na_where_the_pairs_cannot_measure_the_far():
    """The demo: 97 different-person test pairs cannot measure FAR 1e-3 (1,000 needed) nor 1e-2 (100)."""
    rng = np.random.default_rng(0)
    same = np.arange(194) % 2 == 0
    d = np.where(same, rng.normal(0.5, 0.2, 194), rng.normal(1.2, 0.2, 194))
    folds = ev.stratified_folds(same, 10, 0, "demo")
    m = ev.val_at_far_scores("test_", d, same, folds, 1e-3, threshold=0.6)
    assert m == {"test_val_at_far_0.001_needs_different_pairs": 1000,
                 "test_kfold_val_at_far_0.001_needs_different_pairs": 1000}
    m = ev.val_at_far_scores("test_", d, same, folds, 1e-2, threshold=0.6)
    assert m == {"test_val_at_far_0.01_needs_different_pairs": 100,
                 "test_kfold_val_at_far_0.01_needs_different_pairs": 100}
    # FAR 0.05 needs 20 different pairs: 97 in all can measure it, about 10 in each fold's test part cannot.
    m = ev.val_at_far_scores("test_", d, same, folds, 0.05, threshold=0.6)
    assert m["test_kfold_val_at_far_0.05_needs_different_pairs"] == 20
    assert m["test_val_at_far_0.05"] == pytest.approx(sum(1 for x, y in zip(d, same) if y and x < 0.6) / 97)
    assert m["test_far_at_far_0.05"] == pytest.approx(sum(1 for x, y in zip(d, same) if not y and x < 0.6) / 97)


def test_val_at_far_with_enough_pairs_against_loops():
    """1,000 different pairs in each fold's test part: VAL@FAR=1e-3 is measured, and the FAR it reaches is recorded."""
    rng = np.random.default_rng(1)
    n = 4000
    same = np.arange(n) % 2 == 0
    d = np.where(same, rng.normal(0.6, 0.25, n), rng.normal(1.4, 0.25, n))
    folds = ev.stratified_folds(same, 2, 0, "big")
    m = ev.val_at_far_scores("x_", d, same, folds, 1e-3, threshold=0.5)
    assert m["x_val_at_far_0.001"] == pytest.approx(sum(1 for x, y in zip(d, same) if y and x < 0.5) / same.sum())
    assert m["x_far_at_far_0.001"] == pytest.approx(sum(1 for x, y in zip(d, same) if not y and x < 0.5) / (n / 2))
    vals, fars = [], []
    for k in range(2):
        t = vm.threshold_at_far(d[folds != k], same[folds != k], 1e-3)
        inside = folds == k
        vals.append(sum(1 for x, y in zip(d[inside], same[inside]) if y and x < t) / same[inside].sum())
        fars.append(sum(1 for x, y in zip(d[inside], same[inside]) if not y and x < t) / (~same[inside]).sum())
    assert m["x_kfold_val_at_far_0.001_mean"] == pytest.approx(np.mean(vals))
    assert m["x_kfold_val_at_far_0.001_std"] == pytest.approx(np.std(vals))
    assert m["x_kfold_far_at_far_0.001_mean"] == pytest.approx(np.mean(fars))
    assert not [key for key in m if key.endswith("_needs_different_pairs")]
    # One fewer different pair in a fold's test part and the k-fold figure is n/a.
    drop = np.flatnonzero(~same & (folds == 0))[:1]
    keep = np.setdiff1d(np.arange(n), drop)
    m = ev.val_at_far_scores("x_", d[keep], same[keep], folds[keep], 1e-3, threshold=0.5)
    assert m["x_kfold_val_at_far_0.001_needs_different_pairs"] == 1000 and "x_val_at_far_0.001" in m


@pytest.mark.parametrize("separate", [True, False])
def test_one_fold_file_too_small_for_the_folds_fails_before_embedding(data, fake_model, tmp_path, separate):
    lines = pairs_lines(folds=1, per_fold=3, seed=1)
    lines[0] = "3"                                     # 3 pairs of each class, evaluate.folds 4
    pairs = write_pairs(tmp_path / "pairs.txt", lines)
    extra = {"eval_dataset_dir": data["dataset"]} if separate else {}
    with pytest.raises(InputError, match=rf"{re.escape(str(pairs))} \(one fold\): 4-fold cross-validation needs "
                                         rf"at least 4 same and 4 different pairs, got 3 and 3; lower evaluate.folds"):
        run(data, write_model_dir(tmp_path / "model"), pairs_uri=str(pairs), **extra)
    assert not fake_model
    assert not (tmp_path / "out" / "threshold.json").exists()
