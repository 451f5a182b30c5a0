"""facenet-kfp serve: the real server in a subprocess on a free port, driven over HTTP with httpx.

Embeddings must be `facenet-kfp embed`'s and distances `verify`'s for the same images (v1 and v2, plain
and aligned models); a bad request gets a 4xx naming what is wrong and the server goes on; start-up
refuses what verify refuses. The request parsers are also checked on their own, without a server.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import httpx
from benchmarks.serve import free_port, running_server
from facenet_kfp import serve_protocol as protocol
from facenet_kfp import verify
from facenet_kfp.cli import main

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.5


def save_image(path, colour, fmt="JPEG", size=48):
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def threshold_json(model_dir, threshold=THRESHOLD, **changes) -> str:
    """The threshold.json evaluate writes for the model in `model_dir` (with `changes`)."""
    from facenet_kfp.fsutil import file_sha256

    metadata = json.loads((model_dir / "model.json").read_text())
    info = {"threshold": threshold, "distance": "squared_l2", "model": str(model_dir),
            "model_sha256": file_sha256(model_dir / "model.keras"), "model_distance": metadata["distance"]["name"],
            "embedding_dim": metadata["embedding_dim"], "preprocessing": metadata["preprocessing"]}
    return json.dumps({**info, **changes})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained small_cnn (32x32 input, 8-D embeddings, squared L2) as train saves it, with its threshold.json."""
    export = pytest.importorskip("facenet_kfp.export")
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.model import build_embedding_model

    folder = tmp_path_factory.mktemp("serve") / "model"
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=8, squared=True)
    history = {"train": [{"step": 1, "loss": 0.2, "fraction_positive_triplets": 0.5,
                          "mean_positive_distance": 0.5, "mean_negative_distance": 0.9}], "val": []}
    export.save_model_artifact(build_embedding_model((32, 32, 3), 8, architecture="small_cnn"), folder,
                               export.artifact_metadata(config, trained_steps=1), history)
    (folder / "threshold.json").write_text(threshold_json(folder))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A JPEG, a PNG and a BMP (which is re-encoded before TensorFlow reads it, as extract stores it)."""
    folder = tmp_path_factory.mktemp("images")
    return [save_image(folder / "a.jpg", (200, 40, 40)), save_image(folder / "b.png", (40, 40, 200), "PNG"),
            save_image(folder / "c.bmp", (40, 200, 40), "BMP")]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(["--model", str(model_dir)], tmp_path_factory.mktemp("log") / "server.log") as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def v2_body(**inputs) -> dict:
    return {"inputs": [{"name": name, "shape": [len(data)], "datatype": "BYTES", "data": data}
                       for name, data in inputs.items()]}


def embed_reference(model_dir, paths, tmp_path) -> np.ndarray:
    """What `facenet-kfp embed` writes for `paths`."""
    verify.embed_files(model_dir, paths, tmp_path / "reference.npz")
    with np.load(tmp_path / "reference.npz") as npz:
        return npz["embeddings"]


# --- over HTTP ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_v2_embed_gives_embeds_embeddings(server, model_dir, images, tmp_path):
    response = server.post("/v2/models/facenet/infer", json={"id": "r1", **v2_body(images=[b64(p) for p in images])})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == "facenet"
    [output] = body["outputs"]
    assert output["name"] == "embeddings" and output["datatype"] == "FP32" and output["shape"] == [3, 8]
    served = np.asarray(output["data"], dtype=np.float32).reshape(3, 8)
    np.testing.assert_allclose(served, embed_reference(model_dir, images, tmp_path), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_v2_binary_tensor_data_of_base64_text(server, model_dir, images, tmp_path):
    """KServe's binary extension (4-byte length, then the element): the elements are base64 text too."""
    elements = [b64(p).encode() for p in images[:2]]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    header = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    response = server.post("/v2/models/facenet/infer", content=header + raw,
                           headers={"inference-header-content-length": str(len(header)),
                                    "content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(served, embed_reference(model_dir, images[:2], tmp_path), atol=1e-5)


@pytest.mark.slow
def test_v2_verify_gives_verifys_distance(server, model_dir, images):
    a, b, c = images
    response = server.post("/v2/models/facenet-verify/infer",
                           json=v2_body(image_a=[b64(a), b64(a), b64(c)], image_b=[b64(a), b64(b), b64(b)]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parameters"]["threshold"] == THRESHOLD and body["parameters"]["distance_definition"] == "squared_l2"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["distance"]["datatype"] == "FP32" and outputs["same"]["datatype"] == "BOOL"
    assert outputs["distance"]["shape"] == outputs["same"]["shape"] == [3]
    expected = [verify.verify_pair(model_dir, x, y) for x, y in ((a, a), (a, b), (c, b))]
    np.testing.assert_allclose(outputs["distance"]["data"], [r["distance"] for r in expected], atol=1e-5)
    assert outputs["distance"]["data"][0] == 0.0
    assert outputs["same"]["data"] == [r["same"] for r in expected]
    assert outputs["same"]["data"] == [d < THRESHOLD for d in outputs["distance"]["data"]]


@pytest.mark.slow
def test_v1_embed_and_verify(server, model_dir, images, tmp_path):
    a, b, c = images
    response = server.post("/v1/models/facenet:predict", json={"instances": [{"b64": b64(c)}, {"b64": b64(a)}]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.asarray(response.json()["predictions"], dtype=np.float32),
                               embed_reference(model_dir, [c, a], tmp_path), atol=1e-5)

    response = server.post("/v1/models/facenet-verify:predict",
                           json={"instances": [{"image_a": {"b64": b64(a)}, "image_b": {"b64": b64(b)}}]})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    expected = verify.verify_pair(model_dir, a, b)
    assert set(prediction) == {"distance", "threshold", "distance_definition", "same"}
    assert prediction["distance"] == pytest.approx(expected["distance"], abs=1e-5)
    assert (prediction["threshold"], prediction["distance_definition"], prediction["same"]) == (
        THRESHOLD, "squared_l2", expected["same"])


@pytest.mark.slow
def test_health_readiness_and_metadata(server):
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.get("/v2/health/ready").json() == {"ready": True}
    for name in ("facenet", "facenet-verify"):
        assert server.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        assert server.get(f"/v1/models/{name}").json() == {"name": name, "ready": True}
    assert server.get("/v1/models").json() == {"models": ["facenet", "facenet-verify"]}
    metadata = server.get("/v2/models/facenet").json()
    assert metadata["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, 8]}]
    assert server.get("/v2/models/nothere/ready").status_code == 404


def _bad_requests(image: str) -> list[tuple[str, dict, str]]:
    one = lambda **changes: {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [image],
                                         **changes}]}   # noqa: E731
    tiny = base64.b64encode(_encoded(Image.new("RGB", (1, 1)))).decode()
    return [
        ("/v2/models/facenet/infer", one(data=["not base64!"]), "input 'images' element 0: not base64"),
        ("/v2/models/facenet/infer", one(data=["aGVsbG8="]), "input 'images' element 0: not a readable image"),
        ("/v2/models/facenet/infer", one(data=[tiny]), "input 'images' element 0: image too small"),
        ("/v2/models/facenet/infer", one(datatype="FP32", data=[1.0]), "datatype must be BYTES"),
        ("/v2/models/facenet/infer", one(shape=[2]), "shape [2] but 1 data elements"),
        ("/v2/models/facenet/infer", one(shape=[1, 1]), "shape must be [N]"),
        ("/v2/models/facenet/infer", one(name="pictures"), "missing input 'images' (inputs given: 'pictures')"),
        ("/v2/models/facenet/infer", one(shape=[65], data=[image] * 65), "too many images in one request: 65"),
        ("/v2/models/facenet-verify/infer", v2_body(image_a=[image], image_b=[image, image]),
         "must have the same shape"),
        ("/v2/models/facenet-verify/infer", v2_body(image_a=[image]), "missing input 'image_b'"),
        ("/v1/models/facenet:predict", {"instances": [{"image": image}]}, "instances[0]: expected {\"b64\""),
        ("/v1/models/facenet:predict", {"instances": []}, "no images in the request"),
        ("/v1/models/facenet:predict", {"inputs": []}, "expected a JSON object {\"instances\""),
        ("/v1/models/facenet-verify:predict", {"instances": [{"image_a": {"b64": image}}]},
         "instances[0]: expected an object with keys ['image_a', 'image_b']"),
        ("/v1/models/facenet-verify:predict",
         {"instances": [{"image_a": {"b64": image}, "image_b": {"b64": "%%%"}}]}, "instances[0].image_b.b64: not base64"),
    ]


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.slow
def test_bad_requests_are_400_naming_the_fault_and_the_server_goes_on(server, images):
    image = b64(images[0])
    for path, body, message in _bad_requests(image):
        response = server.post(path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert message in response.json()["error"], (message, response.text)
    response = server.post("/v2/models/facenet/infer", json=v2_body(images=[image]))
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 8]
    # kserve's own refusals: a body that is no v2 request, an unknown model
    assert server.post("/v2/models/facenet/infer", json={"input": []}).status_code == 422
    assert server.post("/v2/models/nothere/infer", json=v2_body(images=[image])).status_code == 404


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_embeddings(server, model_dir, images, tmp_path):
    """Requests batched together by the server come back apart, each with its own images' embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    reference = embed_reference(model_dir, images, tmp_path)
    orders = [[i % 3, (i + 1) % 3][: 1 + i % 2] for i in range(24)]

    def post(order):
        response = server.post("/v2/models/facenet/infer", json=v2_body(images=[b64(images[i]) for i in order]))
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(order), 8)

    with ThreadPoolExecutor(8) as pool:
        for order, served in zip(orders, pool.map(post, orders)):
            np.testing.assert_allclose(served, reference[order], atol=1e-5)


# --- a model trained on aligned faces -------------------------------------------------------------

@pytest.mark.slow
def test_a_model_of_aligned_faces_aligns_each_photo_as_embed_does(model_dir, tmp_path):
    pytest.importorskip("mtcnn")
    from matplotlib import cbook

    aligned = tmp_path / "aligned"
    shutil.copytree(model_dir, aligned)
    info = json.loads((aligned / "model.json").read_text())
    info["alignment"] = {"method": "mtcnn", "detector": "mtcnn 1.0.0", "size": 112, "jpeg_quality": 95}
    (aligned / "model.json").write_text(json.dumps(info))
    (aligned / "threshold.json").write_text(threshold_json(aligned))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        photo.convert("RGB").resize((256, 300)).save(tmp_path / "face.jpg", quality=95)
    ramp = np.linspace(0, 255, 120, dtype=np.float64)
    Image.fromarray(np.dstack([np.add.outer(ramp, ramp) / 2] * 3).astype(np.uint8)).save(tmp_path / "wall.png")

    with running_server(["--model", str(aligned)], tmp_path / "server.log") as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            response = client.post("/v2/models/facenet/infer", json=v2_body(images=[b64(tmp_path / "face.jpg")]))
            assert response.status_code == 200, response.text
            served = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 8)
            np.testing.assert_allclose(served, embed_reference(aligned, [tmp_path / "face.jpg"], tmp_path), atol=1e-5)

            response = client.post("/v1/models/facenet-verify:predict", json={"instances": [
                {"image_a": {"b64": b64(tmp_path / "face.jpg")}, "image_b": {"b64": b64(tmp_path / "wall.png")}}]})
            assert response.status_code == 400
            assert "instances[0].image_b.b64: no face found" in response.json()["error"]


# --- start-up -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_start_up_refuses_what_verify_refuses(model_dir, tmp_path, capsys):
    def refused(*argv) -> str:
        assert main(["serve", *argv, "--port", str(free_port())]) == 2
        return capsys.readouterr().err

    assert "model folder not found" in refused("--model", str(tmp_path / "missing"))
    other = tmp_path / "other.json"
    other.write_text(threshold_json(model_dir, embedding_dim=16, model="elsewhere/model"))
    err = refused("--model", str(model_dir), "--threshold", str(other))
    assert f"{other} was evaluated for model elsewhere/model with 16-D embeddings" in err
    assert "no such pipeline root" in refused("--run", str(tmp_path / "nowhere"))

    bare = tmp_path / "runs" / "model"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("threshold.json"))
    err = refused("--model", str(bare))
    assert f"neither {bare / 'threshold.json'} nor {bare.parent / 'threshold.json'} exists" in err
    assert "--embed-only" in err
    assert "--name must be" in refused("--model", str(model_dir), "--name", "no/slash")


@pytest.mark.slow
def test_embed_only_serves_embeddings_without_a_threshold(model_dir, tmp_path):
    from facenet_kfp.serve import load_served

    bare = tmp_path / "model"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("threshold.json"))
    served = load_served(bare, embed_only=True)
    assert served.threshold is None and served.distance_definition is None and served.dim == 8
    models = protocol.build_models(served, "faces")
    try:
        assert [m.name for m in models] == ["faces"]
    finally:
        models[0].batcher.close()


# --- the request parsers, no server -----------------------------------------------------------------

def test_accept_image_is_read_image_files_rule(images, tmp_path):
    for path in images:
        assert protocol.accept_image(protocol.Item(b64(path), "x")) == verify.read_image_file(path)
    with pytest.raises(protocol.InvalidInput, match=r"^here: not base64"):
        protocol.accept_image(protocol.Item("abc", "here"))
    with pytest.raises(protocol.InvalidInput, match=r"^here: not a readable image \(empty file"):
        protocol.accept_image(protocol.Item("", "here"))
    big = "A" * (protocol.MAX_IMAGE_BYTES * 4 // 3 + 8)
    with pytest.raises(protocol.InvalidInput, match=r"^here: image too large \("):
        protocol.accept_image(protocol.Item(big, "here"))


def test_v1_parsers_name_the_instance():
    with pytest.raises(protocol.InvalidInput, match="no images in the request"):
        protocol.v1_embed_items({"instances": []}, 4)
    with pytest.raises(protocol.InvalidInput, match=r"too many images in one request: 5; at most 4"):
        protocol.v1_embed_items({"instances": [{"b64": "x"}] * 5}, 4)
    with pytest.raises(protocol.InvalidInput, match=r"too many pairs in one request: 3 \(6 images\); at most 4"):
        protocol.v1_verify_items({"instances": [{"image_a": {"b64": "x"}, "image_b": {"b64": "y"}}] * 3}, 4)
    with pytest.raises(protocol.InvalidInput, match=r"instances\[1\]: expected \{\"b64\""):
        protocol.v1_embed_items({"instances": [{"b64": "x"}, {"b64": 3}]}, 4)
    first, second = protocol.v1_verify_items(b'{"instances": [{"image_a": {"b64": "x"}, "image_b": {"b64": "y"}}]}', 4)
    assert first == [protocol.Item("x", "instances[0].image_a.b64")]
    assert second == [protocol.Item("y", "instances[0].image_b.b64")]
    with pytest.raises(protocol.InvalidInput, match="the body is not JSON"):
        protocol.v1_embed_items(b"garbage", 4)


# --- the benchmark ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_serve_runs_and_reports_every_figure(tmp_path):
    """benchmarks/serve.py on a few requests, no model in --run (so on its stand-in): the JSON's keys, not timings."""
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--run", str(tmp_path / "no-run"), "--requests",
                             "4", "--warmup", "1", "--work", str(tmp_path / "work"), "--json", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "`make run` trains the demo model there" in result.stdout
    report = json.loads(out.read_text())
    assert report["stand_in"] is True and report["architecture"] == "small_cnn" and report["verify_skipped"] is None
    assert set(report["settings"]) == {"embed_c1", "embed_c8", "verify_c1"}
    for name, row in report["settings"].items():
        assert row["requests"] == 4 and row["concurrency"] == (8 if name == "embed_c8" else 1)
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["requests_per_second"] > 0
    assert report["embed_c8_vs_c1"] == pytest.approx(report["settings"]["embed_c8"]["requests_per_second"]
                                                     / report["settings"]["embed_c1"]["requests_per_second"])
    assert report["machine"]["backend"] == "tensorflow"
    for text in ("embed, concurrency 1", "embed, concurrency 8", "verify, concurrency 1",
                 "embed requests/s at concurrency 8 vs 1:", "machine:"):
        assert text in result.stdout, text


def test_serve_help_and_a_light_command_line():
    """`serve --help` lists the options; building the parser imports no kserve (the data steps' images lack it)."""
    code = ("import sys; from facenet_kfp.cli import build_parser; build_parser(); "
            "print('kserve' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
    help_text = subprocess.run([sys.executable, "-m", "facenet_kfp.cli", "serve", "--help"], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
    for option in ("--model", "--run", "--threshold FILE", "--embed-only", "--host", "--port", "--name",
                   "--max-images", "--max-batch", "--face", "--no-detect"):
        assert option in help_text, option
