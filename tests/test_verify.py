"""verify_pair and embed_files on a tiny saved model: thresholds, verdicts, file formats, input errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import verify
from facenet_kfp.errors import InputError

export = pytest.importorskip("facenet_kfp.export")


def save_image(path, colour, fmt="JPEG", size=48):
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained small_cnn (32x32 input, 8-D embeddings) saved as train saves it; squared L2."""
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.model import build_embedding_model

    folder = tmp_path_factory.mktemp("verify") / "model"
    model = build_embedding_model((32, 32, 3), 8, architecture="small_cnn")
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=8, squared=True)
    history = {"train": [{"step": 1, "loss": 0.2, "fraction_positive_triplets": 0.5,
                          "mean_positive_distance": 0.5, "mean_negative_distance": 0.9}], "val": []}
    export.save_model_artifact(model, folder, export.artifact_metadata(config, trained_steps=1), history)
    return folder


def threshold_json(model_dir, threshold, distance="squared_l2", **changes):
    """The threshold.json evaluate writes for the model in `model_dir` (with `changes`)."""
    from facenet_kfp.fsutil import file_sha256

    metadata = json.loads((model_dir / "model.json").read_text())
    info = {"threshold": threshold, "distance": distance, "model": str(model_dir),
            "model_sha256": file_sha256(model_dir / "model.keras"),
            "model_distance": metadata["distance"]["name"],
            "embedding_dim": metadata["embedding_dim"], "preprocessing": metadata["preprocessing"]}
    return json.dumps({**info, **changes})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return {"a": save_image(folder / "a.jpg", (200, 40, 40)),
            "b": save_image(folder / "b.png", (40, 40, 200), fmt="PNG"),
            "c": save_image(folder / "c,with comma.jpg", (40, 200, 40))}


def test_same_image_twice_is_the_same_person(model_dir, images, tmp_path):
    threshold_file = tmp_path / "threshold.json"
    threshold_file.write_text(threshold_json(model_dir, 0.5))
    result = verify.verify_pair(model_dir, images["a"], images["a"], threshold_file=threshold_file)
    assert result["distance"] == pytest.approx(0.0, abs=1e-6)
    assert result["same"] is True and result["verdict"] == "same person"
    assert result["threshold"] == 0.5 and result["threshold_source"] == str(threshold_file)
    assert result["distance_definition"] == "squared_l2" and result["squared"] is True


@pytest.mark.parametrize("squared, name", [(True, "squared_l2"), (False, "l2")])
def test_a_model_json_of_an_earlier_version_gives_its_distance(model_dir, images, tmp_path, squared, name):
    """model.json files of earlier versions record a boolean distance.squared instead of distance.name."""
    earlier = tmp_path / "model"
    shutil.copytree(model_dir, earlier)
    info = json.loads((earlier / "model.json").read_text())
    assert info["distance"]["name"] == "squared_l2"
    info["distance"] = {"squared": squared, "margin": 0.2}
    (earlier / "model.json").write_text(json.dumps(info))
    result = verify.verify_pair(earlier, images["a"], images["c"], threshold=1.0)
    assert result["distance_definition"] == name and result["squared"] is squared
    # A threshold.json evaluate wrote for it (the same model file: the same sha256) is used with it.
    (earlier / "threshold.json").write_text(threshold_json(model_dir, 0.5, name, model_distance=name))
    assert verify.verify_pair(earlier, images["a"], images["a"])["threshold_source"].endswith("threshold.json")


def test_distance_matches_the_embeddings(model_dir, images, tmp_path):
    out = verify.embed_files(model_dir, [images["a"], images["b"]], tmp_path / "e.npz")
    e = np.load(out["out"])["embeddings"].astype(np.float64)
    expected = float(np.sum((e[0] - e[1]) ** 2))
    result = verify.verify_pair(model_dir, images["a"], images["b"], threshold=expected + 1e-3)
    assert result["distance"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert result["verdict"] == "same person"
    result = verify.verify_pair(model_dir, images["a"], images["b"], threshold=expected - 1e-3)
    assert result["verdict"] == "different people" and result["same"] is False
    assert result["threshold_source"] == "argument"


def test_explicit_threshold_wins_over_the_file(model_dir, images, tmp_path):
    (model_dir / "threshold.json").write_text(threshold_json(model_dir, 3.9))
    try:
        assert verify.verify_pair(model_dir, images["a"], images["b"])["threshold"] == 3.9
        # Identical images are at distance 0, and 0 < 0 is false: "different people" only if
        # the given threshold is really used.
        result = verify.verify_pair(model_dir, images["a"], images["a"], threshold=0.0)
        assert result["threshold"] == 0.0 and result["verdict"] == "different people"
    finally:
        (model_dir / "threshold.json").unlink()


def test_the_threshold_files_distance_is_the_one_computed(model_dir, images, tmp_path):
    """evaluate.distance may differ from the model's: verify computes what threshold.json names."""
    squared = verify.verify_pair(model_dir, images["a"], images["c"], threshold=1.0)
    assert squared["distance_definition"] == "squared_l2"
    for name, expected in (("l2", np.sqrt(squared["distance"])), ("cosine", squared["distance"] / 2)):
        path = tmp_path / f"{name}.json"
        path.write_text(threshold_json(model_dir, 0.5, name))
        result = verify.verify_pair(model_dir, images["a"], images["c"], threshold_file=path)
        assert result["distance_definition"] == name
        assert result["distance"] == pytest.approx(expected, rel=1e-4)   # unit-length embeddings


def test_threshold_next_to_the_model_folder(model_dir, images):
    sibling = model_dir.parent / "threshold.json"
    sibling.write_text(threshold_json(model_dir, 1.25))
    try:
        result = verify.verify_pair(model_dir, images["a"], images["c"])
        assert result["threshold"] == 1.25 and result["threshold_source"] == str(sibling)
    finally:
        sibling.unlink()


@pytest.fixture
def no_model_load(monkeypatch):
    """Argument errors must be found before the slow model load."""
    def refuse(model_dir):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(export, "load_model_artifact", refuse)


def test_threshold_errors(model_dir, images, tmp_path, no_model_load):
    with pytest.raises(InputError, match="--threshold"):
        verify.verify_pair(model_dir, images["a"], images["b"])
    with pytest.raises(InputError, match="threshold file not found"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=tmp_path / "nope.json")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"threshold": 1.1, "distance": "hamming"}))
    with pytest.raises(InputError, match=r"plain\.json: 'distance' must be one of squared_l2, l2, cosine, got 'hamming'"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=plain)
    plain.write_text(json.dumps({"threshold": "high", "distance": "squared_l2"}))
    with pytest.raises(InputError, match="finite number"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=plain)
    with pytest.raises(InputError, match="finite number"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold=float("nan"))


def test_input_errors_name_the_file(model_dir, images, tmp_path, no_model_load):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg: not a readable image"):
        verify.verify_pair(model_dir, images["a"], broken, threshold=1.0)
    with pytest.raises(InputError, match="missing.jpg: image file not found"):
        verify.verify_pair(model_dir, tmp_path / "missing.jpg", images["a"], threshold=1.0)
    pdf = tmp_path / "face.pdf"
    Image.new("RGB", (40, 40)).save(pdf, format="PDF")
    with pytest.raises(InputError, match=r"face\.pdf: not a readable image \(not an image in a supported format"):
        verify.verify_pair(model_dir, images["a"], pdf, threshold=1.0)
    (tmp_path / "no-model").mkdir()
    with pytest.raises(InputError, match=r"no-model/model\.json: not found"):
        verify.verify_pair(tmp_path / "no-model", images["a"], images["b"], threshold=1.0)
    with pytest.raises(InputError, match="model folder not found"):
        verify.embed_files(tmp_path / "nothing", [images["a"]], tmp_path / "e.npz")


def test_embed_files_npz_and_csv_agree(model_dir, images, tmp_path):
    paths = [images["a"], images["b"], images["c"], images["a"]]
    result = verify.embed_files(model_dir, paths, tmp_path / "out" / "emb.npz", batch_size=3)
    assert result == {"images": 4, "dim": 8, "out": str(tmp_path / "out" / "emb.npz")}
    saved = np.load(tmp_path / "out" / "emb.npz")
    e = saved["embeddings"]
    assert e.shape == (4, 8) and e.dtype == np.float32
    assert saved["paths"].tolist() == [str(p) for p in paths]
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.allclose(e[0], e[3], atol=1e-6)              # same file, same embedding

    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        out = tmp_path / f"emb{suffix}"
        verify.embed_files(model_dir, paths, out)
        with open(out, newline="") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter))
        assert rows[0] == ["path"] + [f"e{i}" for i in range(8)]
        assert [r[0] for r in rows[1:]] == [str(p) for p in paths]    # "c,with comma.jpg" quoted
        values = np.asarray([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float32)
        assert np.allclose(values, e, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emb.npz"]   # no temp files


def test_embed_files_argument_errors(model_dir, images, tmp_path, no_model_load):
    with pytest.raises(InputError, match=r"emb\.txt: output must end in \.npz, \.csv, \.tsv"):
        verify.embed_files(model_dir, [images["a"]], tmp_path / "emb.txt")
    with pytest.raises(InputError, match="no image files"):
        verify.embed_files(model_dir, [], tmp_path / "emb.npz")
    with pytest.raises(InputError, match="gone.jpg: image file not found"):
        verify.embed_files(model_dir, [images["a"], tmp_path / "gone.jpg"], tmp_path / "emb.npz")
    with pytest.raises(InputError, match="batch_size"):
        verify.embed_files(model_dir, [images["a"]], tmp_path / "emb.npz", batch_size=0)
    assert not (tmp_path / "emb.npz").exists()


def test_embed_replaces_only_its_own_earlier_output(model_dir, images, tmp_path, no_model_load):
    """A user's file at --out is never replaced; an earlier embeddings file is recognised."""
    for name, content in (("notes.csv", b"name,phone\nann,123\n"), ("data.npz", b"not a zip"),
                          ("table.tsv", b"path\tscore\n")):
        user_file = tmp_path / name
        user_file.write_bytes(content)
        with pytest.raises(InputError, match=f"{name}: refusing to replace it"):
            verify.embed_files(model_dir, [images["a"]], user_file)
        assert user_file.read_bytes() == content
    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, weights=np.zeros(3))
    with pytest.raises(InputError, match="other.npz: refusing to replace it"):
        verify.embed_files(model_dir, [images["a"]], other_npz)
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        verify.embed_files(model_dir, [images["a"]], tmp_path / "folder.npz")


def test_embed_replaces_an_earlier_embeddings_file(model_dir, images, tmp_path):
    for name in ("emb.npz", "emb.csv"):
        verify.embed_files(model_dir, [images["a"], images["b"]], tmp_path / name)
        verify.embed_files(model_dir, [images["c"]], tmp_path / name)
    assert np.load(tmp_path / "emb.npz")["paths"].tolist() == [str(images["c"])]
    assert len((tmp_path / "emb.csv").read_text().splitlines()) == 2


def _png_declaring(path, width, height):
    """A tiny PNG whose header declares width x height pixels (its pixel data is not there)."""
    import struct
    import zlib

    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8   # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def _png_bytes(img):
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (40_000, 40_000)])
def test_decompression_bomb_is_an_error_naming_the_file(model_dir, images, tmp_path, no_model_load,
                                                        width, height):
    """Over Pillow's limit (warning) and over twice the limit (error): both refused, file named."""
    bomb = _png_declaring(tmp_path / "bomb.png", width, height)
    with pytest.raises(InputError, match=r"bomb\.png: image too large to decode safely"):
        verify.verify_pair(model_dir, images["a"], bomb, threshold=1.0)
    with pytest.raises(InputError, match=r"bomb\.png: image too large to decode safely"):
        verify.read_image_file(bomb)


def test_image_tensorflow_cannot_decode_is_read_as_extract_stores_it(model_dir, images, tmp_path):
    """A 1-bit BMP: Pillow reads it, TensorFlow's decoder does not; it is embedded like its PNG copy."""
    bmp, png = tmp_path / "one-bit.bmp", tmp_path / "one-bit.png"
    pattern = Image.new("1", (40, 40))
    pattern.paste(1, (0, 0, 20, 40))
    pattern.save(bmp, format="BMP")
    pattern.save(png, format="PNG")
    result = verify.embed_files(model_dir, [images["a"], bmp, png], tmp_path / "e.npz")
    assert result["images"] == 3
    embeddings = np.load(tmp_path / "e.npz")["embeddings"]
    np.testing.assert_allclose(embeddings[1], embeddings[2], atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)


# --- a threshold belongs to one model -----------------------------------------------------------

@pytest.fixture(scope="module")
def other_models(tmp_path_factory, model_dir):
    """Two models that are not `model_dir`'s: 16-D plain L2, and 8-D squared L2 like it (other weights)."""
    import shutil

    from facenet_kfp.config import TrainConfig
    from facenet_kfp.model import build_embedding_model

    root = tmp_path_factory.mktemp("others")
    history = {"train": [], "val": []}
    plain = root / "plain16"
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=16, squared=False)
    export.save_model_artifact(build_embedding_model((32, 32, 3), 16, architecture="small_cnn"), plain,
                               export.artifact_metadata(config, trained_steps=1), history)
    twin = root / "twin"
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=8, squared=True)
    export.save_model_artifact(build_embedding_model((32, 32, 3), 8, architecture="small_cnn"), twin,
                               export.artifact_metadata(config, trained_steps=1), history)
    # model_dir's own model file under another name: the same model, copied elsewhere.
    copy = root / "copy"
    shutil.copytree(model_dir, copy)
    return {"plain16": plain, "twin": twin, "copy": copy}


def test_a_threshold_of_another_model_is_refused(model_dir, images, other_models, tmp_path, no_model_load):
    """verify compares threshold.json's model fields with model.json and names both on a mismatch."""
    path = tmp_path / "threshold.json"
    path.write_text(threshold_json(other_models["plain16"], 1.1, "l2"))
    with pytest.raises(InputError, match=rf"{path} was evaluated for model .*plain16 with 16-D embeddings, but "
                                         rf"{model_dir} gives 8-D embeddings \({model_dir}/model\.json\); use the "
                                         r"threshold\.json evaluate wrote for .* --run .* or pass --threshold VALUE"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    # Same size, but trained with plain L2 distances: the model's own distance differs.
    path.write_text(threshold_json(model_dir, 1.1, "l2", model_distance="l2", model_sha256="0" * 64))
    with pytest.raises(InputError, match=rf"{path} was evaluated for model {model_dir} trained with plain L2 "
                                         rf"distances \(l2\), but {model_dir} was trained with squared L2 "
                                         r"distances \(.*model\.json: distance\.name squared_l2\)"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    # Same size and distance, other weights: the model file's sha256 differs.
    path.write_text(threshold_json(other_models["twin"], 1.1))
    with pytest.raises(InputError, match=rf"{path} was evaluated for model .*twin \(model file sha256 \w{{16}}…\), "
                                         rf"not for {model_dir}/model\.keras \(sha256 \w{{16}}…\)"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    path.write_text(threshold_json(model_dir, 1.1, preprocessing={"version": "other", "image_size": 32,
                                                                   "crop_fraction": 0.5}))
    with pytest.raises(InputError, match=r"with preprocessing .*'other'.*, but .*model\.json says"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    # A file that names no model cannot be checked.
    path.write_text(json.dumps({"threshold": 1.1, "distance": "squared_l2"}))
    with pytest.raises(InputError, match=rf"{path}: names no model \(no 'embedding_dim'\)"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    # Written before threshold.json named the model's own distance: plain L2 for a squared model is refused.
    path.write_text(json.dumps({"threshold": 1.1, "distance": "l2", "embedding_dim": 8}))
    with pytest.raises(InputError, match=r"evaluated for another model trained with plain L2 distances \(l2\)"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)


def test_a_threshold_of_this_model_is_used_wherever_the_model_lies(model_dir, images, other_models, tmp_path):
    """The model file's sha256, not its path, says which model: a copy of the folder keeps its threshold, and
    evaluate.distance l2 / cosine on a squared-L2 model is this model's threshold too."""
    path = tmp_path / "threshold.json"
    path.write_text(threshold_json(model_dir, 1.0))
    result = verify.verify_pair(other_models["copy"], images["a"], images["a"], threshold_file=path)
    assert result["verdict"] == "same person" and result["threshold_source"] == str(path)
    path.write_text(threshold_json(model_dir, 1.0, "cosine"))
    result = verify.verify_pair(model_dir, images["a"], images["a"], threshold_file=path)
    assert result["distance_definition"] == "cosine"


@pytest.mark.parametrize("threshold, message", [
    (-0.5, r"threshold must be in \[0, 4\] \(squared L2 distances of unit vectors lie there\), got -0\.5"),
    (1e300, r"threshold must be in \[0, 4\] .*got 1e\+300"),
    (4.5, r"got 4\.5"),
])
def test_threshold_outside_the_distance_range_is_refused(model_dir, images, tmp_path, no_model_load,
                                                         threshold, message):
    with pytest.raises(InputError, match=message):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold=threshold)
    path = tmp_path / "threshold.json"
    path.write_text(threshold_json(model_dir, threshold))
    with pytest.raises(InputError, match=rf"{path}: 'threshold' must be in \[0, 4\]"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)
    path.write_text(threshold_json(model_dir, 2.5, "l2"))
    with pytest.raises(InputError, match=r"'threshold' must be in \[0, 2\] \(plain L2 distances"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=path)


def test_a_folder_is_not_an_image(model_dir, images, tmp_path, no_model_load):
    folder = tmp_path / "faces"
    folder.mkdir()
    with pytest.raises(InputError, match=rf"^{folder}: is a folder, not an image file; give the image files "
                                         rf"in it \(e\.g\. {folder}/\*\.jpg\)$"):
        verify.verify_pair(model_dir, folder, images["a"], threshold=1.0)
    with pytest.raises(InputError, match=rf"^{folder}: is a folder, not an image file"):
        verify.embed_files(model_dir, [images["a"], folder], tmp_path / "e.npz")
    with pytest.raises(InputError, match=rf"^{folder}: is a folder, not a threshold file"):
        verify.verify_pair(model_dir, images["a"], images["b"], threshold_file=folder)
    with pytest.raises(InputError, match=rf"^{images['a']}: is a file, not a model folder"):
        verify.verify_pair(images["a"], images["a"], images["b"], threshold=1.0)


# --- the model and threshold of a run -----------------------------------------------------------

def write_summary(path, metrics, status="SUCCEEDED", **fields):
    path.write_text(json.dumps({"pipeline": "facenet-kfp", "status": status, "tasks": [], "metrics": metrics,
                                **fields}))
    return path


def test_run_artifacts_of_a_pipeline_root(model_dir, other_models, tmp_path):
    import os

    root = tmp_path / "root"
    (root / "eval").mkdir(parents=True)
    threshold = root / "eval" / "threshold"
    threshold.write_text(threshold_json(model_dir, 1.0))
    summary = write_summary(root / "summary.json", {"model_uri": str(model_dir), "threshold_uri": str(threshold),
                                                    "test_accuracy": 0.9})
    assert verify.run_artifacts(root) == (model_dir, threshold, str(summary))
    assert verify.run_artifacts(summary) == (model_dir, threshold, str(summary))
    # URIs as file:// work as paths do.
    write_summary(summary, {"model_uri": f"file://{model_dir}", "threshold_uri": f"file://{threshold}"})
    assert verify.run_artifacts(root) == (model_dir, threshold, str(summary))
    # A later rerun of splits lists the same model (in `artifacts`) and no threshold: the run's threshold stays.
    rerun = write_summary(root / "rerun-summary.json", {}, artifacts={"model": str(model_dir)})
    os.utime(rerun, ns=(summary.stat().st_mtime_ns + 10**9,) * 2)
    assert verify.run_artifacts(root) == (model_dir, threshold, str(rerun))
    # A later rerun of train made a new model that nothing evaluated: no threshold, and why.
    write_summary(rerun, {"model_uri": str(other_models["twin"])})
    os.utime(rerun, ns=(summary.stat().st_mtime_ns + 10**9,) * 2)
    model, found, where = verify.run_artifacts(root)
    assert (model, found) == (other_models["twin"], None)
    assert where == f"{rerun} (no threshold: evaluate did not run on this model)"


def test_run_artifacts_of_a_run_folder(model_dir, tmp_path):
    import shutil

    run = tmp_path / "facenet-kfp-2024-01-01-00-00-00-000000"
    shutil.copytree(model_dir, run / "train-model" / "model")
    assert verify.run_artifacts(run) == (run / "train-model" / "model", None, f"run folder {run}")
    (run / "threshold.json").write_text("{}")
    assert verify.run_artifacts(run)[1] == run / "threshold.json"
    (run / "evaluate-on-archive").mkdir()
    (run / "evaluate-on-archive" / "threshold").write_text("{}")
    assert verify.run_artifacts(run)[1] == run / "evaluate-on-archive" / "threshold"


@pytest.mark.parametrize("case, message", [
    ("missing", r"--run .*nowhere: no such pipeline root, run folder or summary file"),
    ("empty", r"--run .*empty: neither a pipeline root \(no summary\.json or rerun-summary\.json\) nor a run "
              r"folder with train-model/model/ \(a task that was a cache hit"),
    ("failed", r"--run: no trained model listed in .*summary\.json \(FAILED: task download-archive failed: "
               r"HTTP 404\): the run did not get as far as training"),
    ("gone", r"summary\.json: the run's model .*deleted is gone \(.*model\.json not found\)"),
    ("remote", r"summary\.json: model_uri 'gs://bucket/model' is not a local path"),
    ("threshold gone", r"summary\.json: the run's threshold .*threshold is gone \(file not found\)"),
    ("not a summary", r"summary\.json: not a pipeline summary \(no 'metrics'\)"),
])
def test_run_artifacts_errors_name_what_is_missing(model_dir, tmp_path, case, message):
    root = tmp_path / ("nowhere" if case == "missing" else "empty" if case == "empty" else "root")
    if case != "missing":
        root.mkdir()
    summary = root / "summary.json"
    if case == "failed":
        write_summary(summary, {}, status="FAILED", error="task download-archive failed: HTTP 404")
    elif case == "gone":
        write_summary(summary, {"model_uri": str(tmp_path / "deleted")})
    elif case == "remote":
        write_summary(summary, {"model_uri": "gs://bucket/model"})
    elif case == "threshold gone":
        write_summary(summary, {"model_uri": str(model_dir), "threshold_uri": str(root / "eval" / "threshold")})
    elif case == "not a summary":
        summary.write_text("[]")
    with pytest.raises(InputError, match=message):
        verify.run_artifacts(root)


# --- models trained on aligned faces --------------------------------------------------------------

GREY = (118, 118, 118)


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        return photo.convert("RGB")


def _placed(photo, canvas, centre, angle=0.0, scale=1.0):
    """`photo` rotated by `angle` degrees (counter-clockwise), scaled, centred at `centre` on a grey canvas."""
    turned = photo.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=GREY)
    turned = turned.resize((round(turned.width * scale), round(turned.height * scale)), Image.Resampling.BILINEAR)
    out = Image.new("RGB", canvas, GREY)
    out.paste(turned, (centre[0] - turned.width // 2, centre[1] - turned.height // 2))
    return out


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory, model_dir):
    """model_dir's model, its model.json saying it was trained on faces aligned to 112 x 112 (the align
    step's dataset.json entry)."""
    folder = tmp_path_factory.mktemp("aligned") / "model"
    shutil.copytree(model_dir, folder)
    info = json.loads((folder / "model.json").read_text())
    assert info["alignment"] == {"method": "none"}
    info["alignment"] = {"method": "mtcnn", "detector": "mtcnn 1.0.0", "size": 112,
                         "template": [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                      [41.5493, 92.3655], [70.7299, 92.2041]],
                         "margin": "ArcFace 112x112 five-point template", "fallback": "centre crop",
                         "choose": "central", "jpeg_quality": 95}
    (folder / "model.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two transformed copies of one real face photo, a photo showing two faces, and one showing none."""
    folder = tmp_path_factory.mktemp("photos")
    hopper = _grace_hopper()
    _placed(hopper, (900, 800), (450, 400), angle=15, scale=0.7).save(folder / "turned.jpg", quality=95)
    _placed(hopper, (640, 700), (300, 380), angle=-8, scale=0.9).save(folder / "tilted.png")
    # A small face at the centre, a large one near the left edge.
    two = _placed(hopper, (1000, 700), (230, 350), scale=1.0)
    two.paste(hopper.resize((205, 240), Image.Resampling.BILINEAR), (650, 230))
    two.save(folder / "two.jpg", quality=95)
    ramp = np.linspace(0, 255, 240, dtype=np.float64)
    Image.fromarray(np.dstack([np.add.outer(ramp, ramp) / 2] * 3).astype(np.uint8)).save(folder / "wall.png")
    return {name: folder / name for name in ("turned.jpg", "tilted.png", "two.jpg", "wall.png")}


def test_face_rules_are_the_aligners():
    pytest.importorskip("mtcnn")
    from facenet_kfp import align

    assert verify.FACE_RULES == align.CHOOSE_RULES


def test_verify_aligns_both_photos_of_a_model_trained_on_aligned_faces(aligned_model, photos, tmp_path):
    """Each photo's face is found and aligned; the embeddings are those of the aligned crops."""
    pytest.importorskip("mtcnn")
    a, b = photos["turned.jpg"], photos["tilted.png"]
    result = verify.verify_pair(aligned_model, a, b, threshold=1.0)
    assert result["alignment"] == {"method": "mtcnn", "size": 112, "detect": True, "face": "central",
                                   "jpeg_quality": 95}
    assert [f["path"] for f in result["faces"]] == [str(a), str(b)]
    for found, canvas, side in zip(result["faces"], ((900, 800), (640, 700)), (0.7 * 220, 0.9 * 220)):
        assert found["faces"] == 1 and found["chosen"] == "central" and found["score"] > 0.9
        x, y, w, h = found["box"]
        assert 0 < x < x + w < canvas[0] and 0 < y < y + h < canvas[1]
        assert 0.6 * side < h < 1.6 * side           # the face, at its scale (about 220 px tall in the photo)
    # The same two crops, written as the align step writes them and given with --no-detect, give the
    # same distance: verify embedded exactly the aligned crops.
    crops, _ = verify.align_photos([verify.read_image_file(a), verify.read_image_file(b)], [a, b],
                                   result["alignment"])
    for name, data in zip(("a.jpg", "b.jpg"), crops):
        (tmp_path / name).write_bytes(data)
        with Image.open(tmp_path / name) as crop:
            assert crop.size == (112, 112) and crop.format == "JPEG"
    direct = verify.verify_pair(aligned_model, tmp_path / "a.jpg", tmp_path / "b.jpg", threshold=1.0, detect=False)
    assert direct["alignment"] == {"method": "mtcnn", "size": 112, "detect": False} and "faces" not in direct
    assert direct["distance"] == pytest.approx(result["distance"], abs=1e-6)
    # Aligned, the two copies (turned 15 and -8 degrees, scaled 0.7 and 0.9) are nearly the same crop.
    pixels = [np.asarray(Image.open(tmp_path / name), dtype=np.float64) for name in ("a.jpg", "b.jpg")]
    assert np.mean(np.abs(pixels[0] - pixels[1])) < 20


def test_several_faces_central_or_largest(aligned_model, photos):
    pytest.importorskip("mtcnn")
    two = photos["two.jpg"]
    central = verify.verify_pair(aligned_model, two, photos["turned.jpg"], threshold=1.0)["faces"][0]
    largest = verify.verify_pair(aligned_model, two, photos["turned.jpg"], threshold=1.0,
                                 face="largest")["faces"][0]
    assert central["faces"] == largest["faces"] == 2
    assert central["chosen"] == "central" and largest["chosen"] == "largest"
    # The central face is the small one pasted at (650..855, 230..470); the largest the one at the left.
    cx, cy = central["box"][0] + central["box"][2] / 2, central["box"][1] + central["box"][3] / 2
    assert 650 < cx < 855 and 230 < cy < 470
    assert largest["box"][0] + largest["box"][2] / 2 < 500
    assert largest["box"][2] * largest["box"][3] > central["box"][2] * central["box"][3]
    with pytest.raises(InputError, match="face must be one of central, largest, got 'left'"):
        verify.verify_pair(aligned_model, two, two, threshold=1.0, face="left")


def test_a_photo_without_a_face_is_refused_naming_it(aligned_model, photos, tmp_path, no_model_load):
    pytest.importorskip("mtcnn")
    with pytest.raises(InputError, match=r"wall\.png: no face found \(240x240 pixels\).*--no-detect"):
        verify.verify_pair(aligned_model, photos["turned.jpg"], photos["wall.png"], threshold=1.0)


def test_embed_refuses_a_photo_without_a_face(aligned_model, photos, tmp_path):
    pytest.importorskip("mtcnn")
    with pytest.raises(InputError, match=r"wall\.png: no face found"):
        verify.embed_files(aligned_model, [photos["turned.jpg"], photos["wall.png"]], tmp_path / "e.npz")
    assert not (tmp_path / "e.npz").exists()


def _no_detection(monkeypatch):
    from facenet_kfp import align

    def refuse(self, rgb):
        raise AssertionError("a face detection ran")
    monkeypatch.setattr(align.FaceDetector, "detect", refuse)


def test_no_detect_takes_the_images_as_aligned_crops(aligned_model, photos, images, tmp_path, monkeypatch):
    """--no-detect: no detection at all, so an image without a face is embedded as it is."""
    _no_detection(monkeypatch)
    result = verify.verify_pair(aligned_model, photos["wall.png"], images["a"], threshold=1.0, detect=False)
    assert result["alignment"] == {"method": "mtcnn", "size": 112, "detect": False} and "faces" not in result
    summary = verify.embed_files(aligned_model, [photos["wall.png"], images["a"]], tmp_path / "e.npz",
                                 detect=False)
    assert summary == {"images": 2, "dim": 8, "out": str(tmp_path / "e.npz"),
                       "alignment": {"method": "mtcnn", "size": 112, "detect": False}}


def test_a_model_of_unaligned_images_detects_nothing(model_dir, aligned_model, photos, images, tmp_path,
                                                     monkeypatch):
    """model.json alignment "none" (or no entry: earlier versions): photos are used as they are."""
    _no_detection(monkeypatch)
    for detect, face in ((True, "central"), (True, "largest"), (False, "central")):
        result = verify.verify_pair(model_dir, photos["wall.png"], images["a"], threshold=1.0, detect=detect,
                                    face=face)
        assert "alignment" not in result and "faces" not in result
    earlier = tmp_path / "earlier"
    shutil.copytree(model_dir, earlier)
    info = json.loads((earlier / "model.json").read_text())
    del info["alignment"]
    (earlier / "model.json").write_text(json.dumps(info))
    assert "alignment" not in verify.verify_pair(earlier, photos["wall.png"], images["a"], threshold=1.0)
    summary = verify.embed_files(earlier, [photos["wall.png"]], tmp_path / "e.npz")
    assert summary == {"images": 1, "dim": 8, "out": str(tmp_path / "e.npz")}
    # The same pixels as the aligned model's with --no-detect: the alignment entry changes only the photos.
    aligned = verify.verify_pair(aligned_model, photos["wall.png"], images["a"], threshold=1.0, detect=False)
    assert aligned["distance"] == pytest.approx(result["distance"], abs=1e-6)


def test_a_malformed_alignment_entry_is_named(model_dir, images, tmp_path, no_model_load):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    info = json.loads((broken / "model.json").read_text())
    info["alignment"] = {"method": "mtcnn"}
    (broken / "model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"model\.json: 'alignment': alignment of method mtcnn needs an "
                                         r"integer size"):
        verify.verify_pair(broken, images["a"], images["b"], threshold=1.0)


def test_cli_verify_and_embed_report_the_faces(aligned_model, photos, tmp_path, capsys):
    pytest.importorskip("mtcnn")
    from facenet_kfp.cli import main

    a, two = str(photos["turned.jpg"]), str(photos["two.jpg"])
    assert main(["-q", "verify", "--model", str(aligned_model), a, two, "--threshold", "1",
                 "--face", "largest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"face A:    {a}: 1 face found (score 0.9")
    assert lines[0].endswith("; aligned to 112x112")
    assert lines[1].startswith(f"face B:    {two}: 2 faces found, the largest used (score ")
    assert lines[2].startswith("distance:  ") and lines[-1] in ("same person", "different people")
    assert main(["-q", "verify", "--model", str(aligned_model), a, two, "--threshold", "1", "--no-detect"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("faces:     not detected (--no-detect): the images are "
                                                        "taken as aligned 112x112 crops")
    assert main(["-q", "embed", "--model", str(aligned_model), a, two, "--out", str(tmp_path / "e.csv")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(f["path"], f["faces"], f["chosen"]) for f in summary["faces"]] == [(a, 1, "central"),
                                                                               (two, 2, "central")]
    assert main(["-q", "verify", "--model", str(aligned_model), a, str(photos["wall.png"]),
                 "--threshold", "1"]) == 2
    assert "wall.png: no face found" in capsys.readouterr().err
