"""Threshold evaluation: wiring against a loop reference, outputs, real-only images, pairs.txt, input errors."""

from __future__ import annotations

import base64
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
from facenet_kfp import provenance
from facenet_kfp.config import EvaluateConfig
from facenet_kfp.errors import DownloadError, InputError
from facenet_kfp.fsutil import atomic_dir
from facenet_kfp.labels import build_labels
from facenet_kfp.pairs import make_pairs
from facenet_kfp.shards import ShardWriter

export = pytest.importorskip("facenet_kfp.export")

# identity -> number of real images; "Zoe_&_<Co>" checks HTML escaping of names.
VAL = {"Ann_Val": 4, "Bob_Val": 3, "Cy_Val": 4, "Dee_Val": 2, "Eve_Val": 1}
TEST = {"Fay_Test": 5, "Gus_Test": 4, "Hal_Test": 4, "Ivy_Test": 3, "Jo_Test": 4, "Zoe_&_<Co>": 3}
TRAIN = {"Kim_Train": 4, "Lou_Train": 2}
HISTORY = {"train": [{"step": s, "loss": 0.5 / s, "fraction_positive_triplets": 0.4, "mean_positive_distance": 0.5,
                       "mean_negative_distance": 1.0} for s in (1, 2, 3)],
           "val": [{"step": 3, "loss": 0.3, "fraction_positive_triplets": 0.5, "mean_positive_distance": 0.6,
                    "mean_negative_distance": 0.9}]}
CONFIG = EvaluateConfig(max_positive_pairs=1000, folds=4, far_targets=(1e-3, 1e-2), batch_size=8,
                        report_examples=6, seed=3)


def jpeg(colour, size=40) -> bytes:
    pixels = np.clip(np.asarray(colour) * 255, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).copy()).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def colour_embedding(data: bytes) -> np.ndarray:
    """The fake model: unit vector of (mean RGB in [0, 1]) - 0.5. Faces of one colour are one person."""
    with Image.open(io.BytesIO(data)) as img:
        mean = np.asarray(img.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255.0
    v = mean - 0.5
    return (v / np.linalg.norm(v)).astype(np.float32)


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
                    images[key] = jpeg(np.clip(base + rng.normal(0, 0.12, 3), 0, 1))
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


def write_model_dir(path, squared=True, inputs=None):
    """model.json (with `inputs`, the fingerprints train records, when given) and history.json."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"distance": {"squared": squared, "margin": 0.2},
            "preprocessing": {"image_size": 32, "crop_fraction": 0.6, "version": "centre-crop-v1"}}
    if inputs is not None:
        meta["inputs"] = inputs
    (path / "model.json").write_text(json.dumps(meta))
    (path / "history.json").write_text(json.dumps(HISTORY))
    return path


def patch_export(monkeypatch, seen):
    """Patch export so the 'model' is `colour_embedding`; `seen` records every image it is given."""

    def load_model_artifact(model_dir):
        return "fake-model", json.loads((model_dir / "model.json").read_text())

    def embed_images(model, metadata, images, batch_size):
        assert model == "fake-model"
        seen.extend(images)
        return np.stack([colour_embedding(b) for b in images])

    monkeypatch.setattr(export, "load_model_artifact", load_model_artifact)
    monkeypatch.setattr(export, "embed_images", embed_images)


@pytest.fixture
def fake_model(monkeypatch):
    seen: list[bytes] = []
    patch_export(monkeypatch, seen)
    return seen


def run(data, model_dir, config=CONFIG, out=None, **kwargs):
    out = out or model_dir.parent / "out"
    return ev.evaluate(model_dir, data["dataset"], data["splits"], config, report_path=out / "report.html",
                       threshold_path=out / "threshold.json", metrics_path=out / "metrics.json",
                       **kwargs), out


def reference_pairs(data, people, squared):
    """Pairs as make_pairs draws them, and distances by a plain loop over the fake embeddings."""
    by_identity = {n: [f"{n}/{n}_{i:04d}.jpg" for i in range(1, c + 1)] for n, c in people.items()}
    keys, a, b, same = make_pairs(by_identity, CONFIG.max_positive_pairs, CONFIG.seed)
    d = []
    for i, j in zip(a, b):
        x = colour_embedding(data["images"][keys[i]]).astype(np.float64)
        y = colour_embedding(data["images"][keys[j]]).astype(np.float64)
        s = sum((p - q) ** 2 for p, q in zip(x, y))
        d.append(s if squared else math.sqrt(s))
    return np.asarray(d), same


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
    """One evaluation (squared L2, with a pairs.txt) shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("evaluated")
    pairs = write_pairs(root / "pairs.txt", GOOD_PAIRS)
    sha = hashlib.sha256(pairs.read_bytes()).hexdigest()
    seen: list[bytes] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_export(monkeypatch, seen)
        result, out = run(data, write_model_dir(root / "model"), model_uri="gs://b/model",
                          pairs_uri=str(pairs), pairs_sha256=sha)
    return {"result": result, "out": out, "seen": seen}


@pytest.mark.parametrize("squared", [True, False])
def test_metrics_match_a_loop_reference(data, evaluated, fake_model, tmp_path, squared):
    if squared:
        result = evaluated["result"]
    else:
        result, out = run(data, write_model_dir(tmp_path / "model", squared))
        assert json.loads((out / "threshold.json").read_text())["distance"] == "l2"
    m = result["metrics"]
    vd, vs = reference_pairs(data, VAL, squared)
    td, ts = reference_pairs(data, TEST, squared)

    threshold, val_acc = vm.select_threshold(vd, vs)
    assert m["threshold"] == pytest.approx(threshold, abs=1e-9)
    assert m["val_accuracy"] == pytest.approx(val_acc)
    test_acc = sum((x < threshold) == y for x, y in zip(td, ts)) / len(td)
    assert m["test_accuracy"] == pytest.approx(test_acc)
    auc = sum(1.0 if p < q else 0.5 if p == q else 0.0 for p in td[ts] for q in td[~ts]) / (ts.sum() * (~ts).sum())
    assert m["test_auc"] == pytest.approx(auc)
    seed_t = 1.242 ** 2 if squared else 1.242
    assert m["seed_threshold"] == pytest.approx(seed_t)
    assert m["test_accuracy_at_seed_threshold"] == pytest.approx(
        sum((x < seed_t) == y for x, y in zip(td, ts)) / len(td))
    # The VAL@FAR threshold is found on validation and applied unchanged to test.
    t_far = vm.threshold_at_far(vd, vs, 0.01)
    assert m["threshold_at_far_0.01"] == pytest.approx(t_far)
    assert m["test_val_at_far_0.01"] == pytest.approx(sum(x < t_far for x in td[ts]) / ts.sum())
    tn = sum(1 for x, y in zip(td, ts) if not y and x >= threshold)
    fp = sum(1 for x, y in zip(td, ts) if not y and x < threshold)
    fn = sum(1 for x, y in zip(td, ts) if y and x >= threshold)
    tp = sum(1 for x, y in zip(td, ts) if y and x < threshold)
    assert result["confusion_matrix"] == [[tn, fp], [fn, tp]]

    positives = sum(c * (c - 1) // 2 for c in TEST.values())
    assert (m["test_pairs"], m["test_positive_pairs"]) == (2 * positives, positives)
    assert m["val_pairs"] == 2 * sum(c * (c - 1) // 2 for c in VAL.values())
    assert (m["val_identities"], m["test_identities"]) == (len(VAL), len(TEST))
    assert m["distance"] == ("squared_l2" if squared else "l2")
    assert m["embedding_dim"] == 3


def test_kfold_metrics_use_seeded_stratified_folds(data, evaluated):
    m = evaluated["result"]["metrics"]
    td, ts = reference_pairs(data, TEST, True)
    folds = ev.stratified_folds(ts, CONFIG.folds, CONFIG.seed, "test")
    # Reference k-fold by hand: best threshold on the other folds, accuracy on this one.
    accs = []
    for k in range(CONFIG.folds):
        t, _ = vm.select_threshold(td[folds != k], ts[folds != k])
        accs.append(np.mean((td[folds == k] < t) == ts[folds == k]))
    assert m["test_kfold_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m["test_kfold_accuracy_std"] == pytest.approx(np.std(accs))
    kf = vm.kfold_val_at_far(td, ts, 1e-3, CONFIG.folds, fold_ids=folds)
    assert m["test_kfold_val_at_far_0.001_mean"] == pytest.approx(kf["val_mean"])


def test_all_metrics_present_finite_and_in_range(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    m = result["metrics"]
    rates = ["val_accuracy", "test_accuracy", "test_kfold_accuracy_mean", "test_auc", "test_eer",
             "test_val_at_far_0.001", "test_val_at_far_0.01", "test_kfold_val_at_far_0.001_mean",
             "test_kfold_val_at_far_0.01_mean", "test_accuracy_at_seed_threshold", "val_auc"]
    for key in rates + ["threshold", "test_kfold_accuracy_std", "test_pairs", "test_positive_pairs",
                        "val_pairs", "test_identities", "val_identities"]:
        assert key in m, key
    for key, value in m.items():
        if key != "distance":
            assert isinstance(value, (int, float)) and math.isfinite(value), key
    for key in rates:
        assert 0.0 <= m[key] <= 1.0, key
    assert 0.0 <= m["threshold"] <= 4.0
    # The fake model separates colours well: far better than chance.
    assert m["test_auc"] > 0.9 and m["test_accuracy"] > 0.8

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
                         "test_accuracy", "model", "embedding_dim", "preprocessing"}
    assert info["distance"] == "squared_l2" and "squared Euclidean" in info["distance_definition"]
    assert info["rule"] == "same person when distance < threshold"
    assert info["chosen_on"] == "validation pairs, max accuracy"
    assert info["model"] == "gs://b/model" and info["embedding_dim"] == 3
    assert info["preprocessing"]["image_size"] == 32
    assert info["threshold"] == result["metrics"]["threshold"]


def test_report_has_every_section(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    html = (out / "report.html").read_text()
    for heading in ("Headline", "ROC curves", "Distances of test pairs", "Training curves",
                    "Example test pairs", "All metrics"):
        assert f"<h2>{heading}</h2>" in html
    threshold = result["metrics"]["threshold"]
    assert f"{threshold:.4f} (squared L2)" in html
    assert "LFW pairs.txt" in html and "TRAINING identities" in html
    # ROC, histogram, training curves plotted from history.json: three PNG figures.
    assert html.count("data:image/png;base64,") == 3
    # report_examples pairs, two thumbnails each, correct ones and (if any) wrong ones marked.
    assert html.count('<div class="pair ') == CONFIG.report_examples
    assert html.count("data:image/jpeg;base64,") == 2 * CONFIG.report_examples
    assert "CORRECT" in html
    assert "Zoe_&_<Co>" not in html             # names are escaped (test_report checks the escaping)
    assert "http" not in html.replace("http-equiv", "")   # self-contained: nothing fetched


def test_synthetic_images_are_never_embedded(data, evaluated):
    seen = evaluated["seen"]
    assert seen, "nothing embedded"
    assert not set(seen) & set(data["synthetic"])
    real = {data["images"][f"{n}/{n}_{i:04d}.jpg"] for people in (VAL, TEST)
            for n, c in people.items() for i in range(1, c + 1)}
    in_positives = {data["images"][f"{n}/{n}_{i:04d}.jpg"] for people in (VAL, TEST)
                    for n, c in people.items() if c >= 2 for i in range(1, c + 1)}
    # pairs.txt names training images too: those (and only those) are embedded as well.
    in_pairs_file = {data["images"][f"{n}/{n}_{i:04d}.jpg"] for n, i in
                     (("Kim_Train", 1), ("Kim_Train", 3), ("Kim_Train", 4), ("Lou_Train", 2))}
    assert in_positives | in_pairs_file <= set(seen) <= real | in_pairs_file
    assert len(seen) == len(set(seen))         # each image embedded once


def test_lfw_pairs_file(data, evaluated):
    m = evaluated["result"]["metrics"]
    # Reference: loop distances over the file's pairs, k-fold with the file's two folds.
    d, s, folds = [], [], []
    for n, line in enumerate(GOOD_PAIRS[1:]):
        f = line.split("\t")
        a, i, b, j = (f[0], f[1], f[0], f[2]) if len(f) == 3 else f
        x = colour_embedding(data["images"][f"{a}/{a}_{int(i):04d}.jpg"]).astype(np.float64)
        y = colour_embedding(data["images"][f"{b}/{b}_{int(j):04d}.jpg"]).astype(np.float64)
        d.append(float(np.sum((x - y) ** 2)))
        s.append(len(f) == 3)
        folds.append(n // 4)
    d, s, folds = np.asarray(d), np.asarray(s), np.asarray(folds)
    ref = vm.kfold_accuracy(d, s, 2, fold_ids=folds)
    assert m["lfw_pairs_kfold_accuracy_mean"] == pytest.approx(ref["mean"])
    assert m["lfw_pairs_kfold_accuracy_std"] == pytest.approx(ref["std"])
    assert m["lfw_pairs_auc"] == pytest.approx(vm.roc_auc(d, s))
    assert m["lfw_pairs_val_at_far_0.001_mean"] == pytest.approx(
        vm.kfold_val_at_far(d, s, 1e-3, 2, fold_ids=folds)["val_mean"])
    assert (m["lfw_pairs_pairs"], m["lfw_pairs_folds"]) == (8, 2)


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
    with pytest.raises(InputError, match=r"distance\.squared"):
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


def test_pair_distances_against_a_loop():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 5)).astype(np.float32)
    a, b = rng.integers(0, 7, 20), rng.integers(0, 7, 20)
    for squared in (True, False):
        d = ev.pair_distances(e, a, b, squared)
        for n, (i, j) in enumerate(zip(a, b)):
            s = sum((float(x) - float(y)) ** 2 for x, y in zip(e[i], e[j]))
            assert d[n] == pytest.approx(s if squared else math.sqrt(s), rel=1e-12)
    assert ev.pair_distances(e, [3], [3], True)[0] == 0.0


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
    from facenet_kfp.config import TrainConfig

    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=16, squared=True)
    export.save_model_artifact(model, folder, export.artifact_metadata(config, trained_steps=3), HISTORY)


def test_real_model_round_trip(data, tmp_path, real_model_dir):
    result, out = run(data, real_model_dir, out=tmp_path / "out")
    m = result["metrics"]
    assert m["embedding_dim"] == 16 and m["distance"] == "squared_l2"
    for key, value in m.items():
        if key != "distance":
            assert math.isfinite(value), key
    assert json.loads((out / "threshold.json").read_text())["preprocessing"]
    html = (out / "report.html").read_text()
    assert re.search(r"<h2>Example test pairs</h2>", html)
    # The training curves are the model folder's curves.png, embedded as is.
    curves = (real_model_dir / "curves.png").read_bytes()
    assert base64.b64encode(curves).decode() in html
