"""pipelines.submit against a local fake of the KFP v2beta1 REST API (no cluster)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from facenet_kfp.errors import InputError
from pipelines import submit
from pipelines.compile import compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
LIGHT = "registry.example/facenet-kfp:0.1.0"
TRAINER = "registry.example/facenet-kfp-trainer:0.1.0"
IMAGES = ["--light-image", LIGHT, "--trainer-image", TRAINER]


class FakeKfp:
    """The four endpoints kfp.Client 2.17 calls to create a run from a package, recording every request.

    GET  /apis/v2beta1/healthz      -> {"multi_user": false}
    GET  /apis/v2beta1/experiments  -> {"experiments": [...matching display_name...]} or {}
    POST /apis/v2beta1/experiments  -> the experiment with an id
    POST /apis/v2beta1/runs         -> the run with run_id and experiment_id
    `fail[(method, path)] = status` answers that route with an error body instead.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: list[dict] = []
        self.fail: dict[tuple[str, str], int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": json.loads(raw) if raw else None})
                status, body = fake.answer(method, url.path, parse_qs(url.query),
                                           json.loads(raw) if raw else None)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        status = self.fail.get((method, path)) or self.fail.get(("*", "*"))
        if status:
            return status, {"error": "database is on fire", "message": "database is on fire", "code": 13}
        if (method, path) == ("GET", "/apis/v2beta1/healthz"):
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if (method, path) == ("GET", "/apis/v2beta1/experiments"):
            predicates = json.loads(query["filter"][0])["predicates"]
            wanted = [p["string_value"] if "string_value" in p else p["stringValue"] for p in predicates
                      if p["key"] == "display_name"]
            found = [e for e in self.experiments if e["display_name"] in wanted]
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if (method, path) == ("POST", "/apis/v2beta1/experiments"):
            experiment = {"experiment_id": f"exp-{len(self.experiments) + 1}",
                          "display_name": body["display_name"]}
            self.experiments.append(experiment)
            return 200, experiment
        if (method, path) == ("POST", "/apis/v2beta1/runs"):
            return 200, {"run_id": "run-0001", "experiment_id": body["experiment_id"],
                         "display_name": body["display_name"], "state": "PENDING"}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@pytest.fixture
def fake_kfp(monkeypatch, tmp_path):
    # Hermetic: no endpoint, token or experiment from the environment, no ~/.config/kfp/context.json.
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_SA_TOKEN_PATH",
                 "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
                 "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    from kfp.client import client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    fake = FakeKfp()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The pipeline compiled once with the demo config (submit tests that skip compiling use it)."""
    out = tmp_path_factory.mktemp("pkg") / "facenet_pipeline.yaml"
    return compile_pipeline(str(ROOT / "configs/demo.yaml"), out, LIGHT, TRAINER)


def _spec(run_body: dict) -> dict:
    """The pipeline spec of a create-run body (kfp nests it when a platform spec is present)."""
    spec = run_body["pipeline_spec"]
    return spec["pipeline_spec"] if "pipeline_spec" in spec else spec


def test_submit_compiles_and_creates_a_run_with_the_spec_inline(fake_kfp, tmp_path, capsys):
    package = tmp_path / "build" / "p.yaml"
    code = submit.main(["--host", fake_kfp.host + "/", "--experiment", "faces", "--run-name", "lr sweep 1",
                        "--config", str(ROOT / "configs/demo.yaml"), "--package", str(package), *IMAGES,
                        "--param", "train_learning_rate=0.0005", "--param", "train_max_steps=1200",
                        "--param", "train_squared=false", "--param", "sha256=" + "0123" * 16,
                        "--param", "eval_far_targets=[0.001, 0.1]", "--existing-token", "secret-token"])
    out = capsys.readouterr().out
    assert code == 0
    assert package.is_file()

    # Experiment looked up by name, then created because it did not exist.
    lookups = fake_kfp.calls("GET", "/apis/v2beta1/experiments")
    assert len(lookups) == 1 and "faces" in lookups[0]["query"]["filter"][0]
    created = fake_kfp.calls("POST", "/apis/v2beta1/experiments")
    assert [c["body"]["display_name"] for c in created] == ["faces"]

    runs = fake_kfp.calls("POST", "/apis/v2beta1/runs")
    assert len(runs) == 1
    body = runs[0]["body"]
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "lr sweep 1"
    spec = _spec(body)
    assert spec["pipelineInfo"]["name"] == "facenet-kfp"
    assert set(spec["root"]["dag"]["tasks"]) == {"download-archive", "extract-images", "make-labels",
                                                 "complete-identities", "split-identities", "check-pairs",
                                                 "train-model", "evaluate-model"}
    # The demo config's values are the compiled defaults; the overrides travel in the runtime config.
    assert spec["root"]["inputDefinitions"]["parameters"]["train_architecture"]["defaultValue"] == "small_cnn"
    assert body["runtime_config"]["parameters"] == {
        "train_learning_rate": 0.0005, "train_max_steps": 1200, "train_squared": False, "sha256": "0123" * 16,
        "eval_far_targets": [0.001, 0.1]}
    # Compile-time caching kept (no --no-cache).
    assert all(t["cachingOptions"].get("enableCache") for t in spec["root"]["dag"]["tasks"].values())
    assert all(r["headers"].get("authorization") == "Bearer secret-token" for r in fake_kfp.requests)

    assert f"run: {fake_kfp.host}/#/runs/details/run-0001" in out.splitlines()
    assert "run id: run-0001" in out.splitlines()
    assert "experiment id: exp-1" in out.splitlines()


def test_existing_experiment_is_reused_and_no_cache_turns_caching_off(fake_kfp, package, capsys):
    fake_kfp.experiments.append({"experiment_id": "exp-42", "display_name": "faces"})
    code = submit.main(["--host", fake_kfp.host, "--experiment", "faces", "--package", str(package),
                        "--skip-compile", "--no-cache", "--namespace", "team-a"])
    assert code == 0, capsys.readouterr().err
    assert fake_kfp.calls("POST", "/apis/v2beta1/experiments") == []
    # An explicit namespace: kfp skips the health check and scopes the lookup to it.
    assert fake_kfp.calls("GET", "/apis/v2beta1/healthz") == []
    assert fake_kfp.calls("GET", "/apis/v2beta1/experiments")[0]["query"]["namespace"] == ["team-a"]
    body = fake_kfp.calls("POST", "/apis/v2beta1/runs")[0]["body"]
    assert body["experiment_id"] == "exp-42"
    tasks = _spec(body)["root"]["dag"]["tasks"]
    assert len(tasks) == 8 and all(t["cachingOptions"].get("enableCache", False) is False for t in tasks.values())
    assert body["runtime_config"].get("parameters", {}) == {}


def test_service_account_token_file_from_the_environment(fake_kfp, package, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("projected-sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile"]) == 0
    assert fake_kfp.requests and all(
        r["headers"].get("authorization") == "Bearer projected-sa-token" for r in fake_kfp.requests)
    # No experiment given: kfp's "Default".
    assert fake_kfp.calls("POST", "/apis/v2beta1/experiments")[0]["body"]["display_name"] == "Default"


def test_unknown_parameter_is_refused_before_anything_is_sent(fake_kfp, package, capsys):
    code = submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile",
                        "--param", "train_learnig_rate=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train_learnig_rate: not a config key" in err and "did you mean train_learning_rate" in err
    assert fake_kfp.requests == []


@pytest.mark.parametrize("param, expected", [
    ("train_max_steps=many", "train_max_steps must be int, got 'many'"),
    ("train_max_steps=1.5", "train_max_steps must be int, got 1.5"),
    ("train_squared=1", "train_squared must be bool, got 1"),
    ("eval_far_targets=0.1", "eval_far_targets must be a list"),
    ("train.max_steps=0", "train.max_steps must be at least 1"),
    ("cluster.train_gpus=2", "compiled into the pipeline, not a run parameter"),
    ("no_equals_sign", "expected key=value"),
])
def test_badly_typed_parameter_is_refused(fake_kfp, package, capsys, param, expected):
    code = submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile", "--param", param])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert fake_kfp.requests == []


def test_arguments_are_typed_by_the_config_field(package):
    arguments = submit.run_arguments(["train_learning_rate=1", "source_uri=gs://b/lfw.tgz", "pairs_uri=",
                                      "sha256=" + "0" * 64, "eval.far_targets=[0.01]".replace("eval.", "evaluate."),
                                      "train.max_steps=800"], package, str(ROOT / "configs/lfw.yaml"))
    assert arguments == {"train_learning_rate": 1.0, "source_uri": "gs://b/lfw.tgz", "pairs_uri": "",
                         "sha256": "0" * 64, "eval_far_targets": [0.01], "train_max_steps": 800}
    assert isinstance(arguments["train_learning_rate"], float) and isinstance(arguments["sha256"], str)
    with pytest.raises(InputError, match="pipeline package not found"):
        submit.run_arguments(["train_max_steps=5"], package.with_name("missing.yaml"), None)


def test_server_error_on_create_run_is_one_clear_line(fake_kfp, package, capsys):
    fake_kfp.fail[("POST", "/apis/v2beta1/runs")] = 500
    code = submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("error: KFP API at " + fake_kfp.host)
    assert "HTTP 500" in err[0] and "creating the run" in err[0] and "database is on fire" in err[0]


def test_server_error_everywhere_with_a_namespace(fake_kfp, package, capsys):
    fake_kfp.fail[("*", "*")] = 503
    code = submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile",
                        "--namespace", "team-a"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fake_kfp.host in err and "HTTP 503" in err
    assert fake_kfp.calls("POST", "/apis/v2beta1/runs") == []


def test_failing_health_check_names_the_cause(fake_kfp, package, capsys, monkeypatch):
    from kfp.client import client as kfp_client

    fake_kfp.fail[("GET", "/apis/v2beta1/healthz")] = 500
    # kfp.Client retries the health check 5 times, 5 s apart; the waits are not what is tested.
    monkeypatch.setattr(kfp_client.time, "sleep", lambda seconds: None)
    code = submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(fake_kfp.calls("GET", "/apis/v2beta1/healthz")) == 5
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: KFP API at {fake_kfp.host} answered HTTP 500")
    assert "healthz" in err[-1] and "5 attempts" in err[-1]
    assert fake_kfp.calls("POST", "/apis/v2beta1/runs") == []


def test_unreachable_host_is_one_clear_line(package, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    from kfp.client import client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    code = submit.main(["--host", host, "--package", str(package), "--skip-compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: cannot reach the KFP API at {host}")
    assert "refused" in err[-1].lower()


def test_host_from_kfp_environment(fake_kfp, package, monkeypatch, capsys):
    """Without --host, kfp.Client finds the endpoint itself ($KF_PIPELINES_ENDPOINT), and the UI base too."""
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", fake_kfp.host)
    monkeypatch.setenv("KF_PIPELINES_UI_ENDPOINT", "https://kfp.example/ui")
    assert submit.main(["--package", str(package), "--skip-compile"]) == 0
    assert "run: https://kfp.example/ui/#/runs/details/run-0001" in capsys.readouterr().out
    assert fake_kfp.calls("POST", "/apis/v2beta1/runs")


def test_missing_images_are_a_usage_error(package, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        submit.main(["--host", "http://127.0.0.1:1"])
    assert exc.value.code == 2 and "--light-image" in capsys.readouterr().err



# --- the project's default image references -----------------------------------------------------

def test_default_images_are_refused_unless_confirmed(fake_kfp, tmp_path, capsys):
    from components import DEFAULT_IMAGES

    defaults = ["--light-image", DEFAULT_IMAGES.light, "--trainer-image", DEFAULT_IMAGES.trainer]
    package = tmp_path / "p.yaml"
    argv = ["--host", fake_kfp.host, "--config", str(ROOT / "configs/demo.yaml"), "--package", str(package)]
    assert submit.main([*argv, *defaults]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and DEFAULT_IMAGES.light in err[0] and DEFAULT_IMAGES.trainer in err[0]
    assert "--images-exist" in err[0] and "IMAGES_EXIST=1" in err[0] and "IMAGE_REGISTRY" in err[0]
    assert fake_kfp.requests == [] and not package.exists()     # refused before compiling or sending

    # One default image (another tag) is refused too, and named alone.
    assert submit.main([*argv, "--light-image", LIGHT, "--trainer-image",
                        DEFAULT_IMAGES.trainer.replace(":0.1.0", ":9.9")]) == 2
    err = capsys.readouterr().err
    assert DEFAULT_IMAGES.trainer.replace(":0.1.0", ":9.9") in err and LIGHT not in err

    assert submit.main([*argv, *defaults, "--images-exist"]) == 0
    assert len(fake_kfp.calls("POST", "/apis/v2beta1/runs")) == 1
    assert set(submit.package_images(package)) == {DEFAULT_IMAGES.light, DEFAULT_IMAGES.trainer}

    # --skip-compile: the images the package names are checked.
    assert submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile"]) == 2
    assert "--images-exist" in capsys.readouterr().err
    assert len(fake_kfp.calls("POST", "/apis/v2beta1/runs")) == 1
    assert submit.main(["--host", fake_kfp.host, "--package", str(package), "--skip-compile", "--images-exist"]) == 0
    assert len(fake_kfp.calls("POST", "/apis/v2beta1/runs")) == 2


def test_package_images_of_own_registry_pass(package):
    assert set(submit.package_images(package)) == {LIGHT, TRAINER}
    submit.check_images(submit.package_images(package), False, str(package))    # no error


@pytest.mark.parametrize("make_args, confirmed", [
    ([], False),
    (["IMAGE_TAG=0.2.0"], False),
    (["IMAGES_EXIST=1"], True),
    (["IMAGE_REGISTRY=ghcr.io/facenet-kfp"], True),       # named on the command line: the user's choice
    (["IMAGE_REGISTRY=registry.example/team"], True),
])
def test_make_confirms_images_only_when_told(make_args, confirmed):
    """`make compile` and `make submit` pass --images-exist for IMAGES_EXIST=1 or an explicit IMAGE_REGISTRY."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_REGISTRY", "IMAGES_EXIST", "MAKEFLAGS")}
    for target in ("compile", "submit"):
        out = subprocess.run(["make", "-n", "-o", "install", target, *make_args], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        command = [line for line in out.replace("\\\n", " ").splitlines() if f"pipelines.{target}" in line]
        assert len(command) == 1, out
        assert ("--images-exist" in command[0]) == confirmed, command[0]
