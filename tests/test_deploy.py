"""The deploy step: the InferenceService it builds, against a local fake of the Kubernetes API; the DAG with it."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from facenet_kfp import deploy as deploy_module
from facenet_kfp import kube
from facenet_kfp.deploy import DeployError, deploy, inference_service, serving_storage_uri, wait_ready
from facenet_kfp.deploy_config import DeployConfig
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import STEP_MARKER, file_sha256

ROOT = Path(__file__).resolve().parents[1]
LIGHT, TRAINER = "registry.example/facenet-kfp:t", "registry.example/facenet-kfp-trainer:t"
PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"
ROUTE = re.compile(r"/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/?]+))?")
URL = "http://facenet.team-a.example.com"
BUCKET_URI = "minio://mlpipeline/v2/artifacts/facenet-kfp/run-1/deploy-model/abc/served_model"
NOT_READY = [{"type": "PredictorReady", "status": "False", "reason": "RevisionMissing",
              "message": 'Configuration "facenet-predictor" is waiting for a Revision to become ready.'},
             {"type": "Ready", "status": "False", "reason": "RevisionMissing"}]


def _status(obj: dict, ready: bool, generation: int | None = None) -> dict:
    generation = obj["metadata"]["generation"] if generation is None else generation
    if not ready:
        return {"observedGeneration": generation, "conditions": NOT_READY}
    return {"observedGeneration": generation, "url": URL,
            "address": {"url": "http://facenet-predictor.team-a.svc.cluster.local"},
            "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}


class FakeKubernetes:
    """The inferenceservices routes of the Kubernetes API that the deploy step calls (POST, GET, PUT), over
    HTTP on a free local port. Records every request; `status(obj, n)` gives an object's status at the
    n-th GET since it was last written; `forbidden` answers every write 403, as RBAC does."""

    def __init__(self, status: Callable[[dict, int], dict] = lambda obj, n: _status(obj, ready=n >= 2)):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict[str, Any]] = []
        self.status, self.forbidden, self.gets_since_write = status, False, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                      "authorization": self.headers.get("Authorization")})
                match = ROUTE.fullmatch(self.path.split("?")[0])
                if not match:
                    return self._answer(404, _failure(404, "NotFound", f"no route {self.path}"))
                code, answer = fake.serve(self.command, match.group(1), match.group(2), body)
                self._answer(code, answer)

            do_GET = do_POST = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, method: str, namespace: str, name: str | None, body: dict | None) -> tuple[int, dict]:
        if method in ("POST", "PUT", "PATCH") and self.forbidden:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
            return 403, _failure(403, "Forbidden", (
                f'inferenceservices.serving.kserve.io is forbidden: User "system:serviceaccount:kubeflow:'
                f'pipeline-runner" cannot {verb} resource "inferenceservices" in API group "serving.kserve.io" '
                f'in the namespace "{namespace}"'))
        if method == "POST" and name is None:
            key = (namespace, body["metadata"]["name"])
            if key in self.objects:
                return 409, _failure(409, "AlreadyExists",
                                     f'inferenceservices.serving.kserve.io "{key[1]}" already exists')
            stored = {**body, "metadata": {**body["metadata"], "resourceVersion": "1", "generation": 1}}
            return 201, self._write(key, stored)
        key = (namespace, name)
        if key not in self.objects:
            return 404, _failure(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
        current = self.objects[key]
        if method == "GET":
            self.gets_since_write += 1
            return 200, {**current, "status": self.status(current, self.gets_since_write)}
        if method == "PUT":
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return 409, _failure(409, "Conflict", "the object has been modified")
            meta = current["metadata"]
            stored = {**body, "metadata": {**body["metadata"], "resourceVersion": str(int(meta["resourceVersion"]) + 1),
                                           "generation": meta["generation"] + 1}}
            return 200, self._write(key, stored)
        return 405, _failure(405, "MethodNotAllowed", method)

    def _write(self, key: tuple[str, str], obj: dict) -> dict:
        self.objects[key] = obj
        self.gets_since_write = 0
        return obj

    def writes(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests if r["method"] != "GET"]


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig whose one context is the API server at `server`, with a bearer token."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}]}))
    return path


def _failure(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    fake = FakeKubernetes()
    fake.thread.start()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def model(tmp_path):
    """(a model folder as train writes it, evaluate's threshold.json for it)."""
    folder = tmp_path / "model"
    (folder / "serving" / "1").mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"weights")
    (folder / "serving" / "1" / "saved_model.pb").write_bytes(b"graph")
    (folder / STEP_MARKER).write_text("train\n")
    preprocessing = {"version": "centre-crop-v1", "image_size": 64, "crop_fraction": 0.7, "scale": "[-1,1]"}
    (folder / "model.json").write_text(json.dumps({
        "format": "facenet-kfp-model/1", "file": "model.keras", "embedding_dim": 64,
        "distance": {"name": "squared_l2"}, "preprocessing": preprocessing}))
    threshold = tmp_path / "threshold"
    threshold.write_text(json.dumps({
        "threshold": 0.57, "distance": "squared_l2", "model_distance": "squared_l2", "embedding_dim": 64,
        "preprocessing": preprocessing, "model_sha256": file_sha256(folder / "model.keras")}))
    return folder, threshold


SETTINGS = dict(name="facenet", namespace="team-a", service_account="facenet-kfp-serving", cpu="1", memory="2Gi",
                timeout_s=30)


def _deploy(model, out: Path, uri: str = BUCKET_URI, poll_s: float = 0.01, config_file: Path | None = None,
            **settings: Any) -> dict:
    return deploy(model[0], model[1], out, uri, {**SETTINGS, **settings}, TRAINER, config_file=config_file,
                  poll_s=poll_s)


# --- the InferenceService ------------------------------------------------------------------------

def test_the_inference_service_serves_the_bundle_with_facenet_kfp_serve():
    isvc = inference_service("facenet", "team-a", TRAINER, "s3://mlpipeline/v2/x/served_model",
                             "facenet-kfp-serving", {"cpu": "1", "memory": "2Gi"})
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["metadata"]["name"] == "facenet" and isvc["metadata"]["namespace"] == "team-a"
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "facenet-kfp-serving"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == TRAINER
    assert [container["command"][0], *container["args"]] == [
        "facenet-kfp", "serve", "--model", "/mnt/models", "--port", "8080", "--name", "facenet"]
    assert container["env"] == [{"name": "STORAGE_URI", "value": "s3://mlpipeline/v2/x/served_model"}]
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},
                                      "limits": {"cpu": "1", "memory": "2Gi"}}


def test_the_inference_service_validates_against_the_kserve_schema():
    from tests.kserve_schema import validate_inference_service

    validate_inference_service(inference_service("my-faces", "team-a", TRAINER, "gs://b/p/served_model",
                                                 "facenet-kfp-serving", {"cpu": "500m", "memory": "1536Mi"}))


@pytest.mark.parametrize("uri, storage", [
    ("gs://bucket/root/served_model", "gs://bucket/root/served_model"),
    ("s3://bucket/root/served_model", "s3://bucket/root/served_model"),
    ("minio://mlpipeline/v2/artifacts/served_model", "s3://mlpipeline/v2/artifacts/served_model"),
])
def test_object_storage_uris_become_storage_uris(uri, storage):
    assert serving_storage_uri(uri) == storage


@pytest.mark.parametrize("uri, what", [
    ("/home/me/local_outputs/facenet-kfp-1/deploy-model/served_model", "is a local path"),
    ("file:///home/me/served_model", "is a local path"),
    ("https://example.com/model", "is a URI with scheme https://"),
    ("gs://", "is a URI with scheme gs://"),
])
def test_local_and_unknown_uris_are_refused(uri, what):
    with pytest.raises(InputError, match=re.escape(what) + ".*cannot read.*gs://, s3://, minio://"):
        serving_storage_uri(uri)


@pytest.mark.parametrize("values, message", [
    ({"name": "Facenet"}, r"deploy\.name must be a DNS-1035 label .* got 'Facenet'"),
    ({"name": "9faces"}, r"deploy\.name must be a DNS-1035 label"),
    ({"name": "faces-"}, r"deploy\.name must be a DNS-1035 label"),
    ({"name": "f" * 40}, r"deploy\.name must be at most 39 characters .* got 40"),
    ({"namespace": "Team_A"}, r"deploy\.namespace must be a DNS-1123 label"),
    ({"namespace": "n" * 64}, r"deploy\.namespace must be a DNS-1123 label"),
    ({"service_account": "a b"}, r"deploy\.service_account must be a DNS-1123 subdomain"),
    ({"cpu": "lots"}, r"deploy\.cpu must be a positive Kubernetes quantity .* got 'lots'"),
    ({"memory": "0Gi"}, r"deploy\.memory must be a positive Kubernetes quantity"),
    ({"timeout_s": 5}, r"deploy\.timeout_s must be at least 10, got 5"),
])
def test_deploy_settings_are_checked(values, message):
    with pytest.raises(InputError, match=message):
        DeployConfig(**values)
    assert DeployConfig(name="f" * 39, namespace="n" * 63, service_account="sa.example", cpu="500m",
                        memory="1.5Gi").name == "f" * 39


# --- the step against a cluster --------------------------------------------------------------------

def test_create_when_absent_then_wait_until_ready(cluster, model, tmp_path):
    out = tmp_path / "served_model"
    result = _deploy(model, out)
    assert cluster.writes() == [("POST", f"{PREFIX}team-a/inferenceservices")]
    assert all(r["authorization"] == "Bearer test-token" for r in cluster.requests)   # the kubeconfig's user
    # Waited: the first status read was not ready, the second was.
    assert [r["method"] for r in cluster.requests] == ["POST", "GET", "GET"]
    created = cluster.requests[0]["body"]
    assert created == inference_service("facenet", "team-a", TRAINER, serving_storage_uri(BUCKET_URI),
                                        "facenet-kfp-serving", {"cpu": "1", "memory": "2Gi"})
    assert created["spec"]["predictor"]["containers"][0]["env"][0]["value"] == \
        "s3://mlpipeline/v2/artifacts/facenet-kfp/run-1/deploy-model/abc/served_model"
    assert result["url"] == URL and result["action"] == "created" and result["generation"] == 1
    assert result["address_url"] == "http://facenet-predictor.team-a.svc.cluster.local"
    assert (result["threshold"], result["distance"]) == (0.57, "squared_l2")
    # The bundle: the model folder with the evaluated threshold.json at its top, marked as deploy's output.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [STEP_MARKER, "model.json", "model.keras", "serving", "threshold.json"])
    assert (out / "threshold.json").read_bytes() == model[1].read_bytes()
    assert (out / "serving" / "1" / "saved_model.pb").read_bytes() == b"graph"
    assert (out / STEP_MARKER).read_text().strip() == "deploy"
    assert result["files"] == sorted(p.name for p in out.iterdir() if p.name != STEP_MARKER)


def test_update_when_present_replaces_it_and_waits_for_the_new_generation(cluster, model, tmp_path, monkeypatch):
    stale = inference_service("facenet", "team-a", "old/image:1", "s3://old", "facenet-kfp-serving",
                              {"cpu": "1", "memory": "2Gi"})
    stale["spec"]["predictor"]["model"] = {"modelFormat": {"name": "tensorflow"}, "storageUri": "s3://old"}
    stale["metadata"].update(resourceVersion="7", generation=3)
    cluster.objects[("team-a", "facenet")] = stale
    # The old generation is Ready for two reads after the update; the new one on the third.
    cluster.status = lambda obj, n: _status(obj, ready=True, generation=obj["metadata"]["generation"] - (n < 3))
    # An explicit kubeconfig wins over $KUBECONFIG.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing.yaml"))
    result = _deploy(model, tmp_path / "served_model", config_file=tmp_path / "kubeconfig")
    assert [r["method"] for r in cluster.requests] == ["POST", "GET", "PUT", "GET", "GET", "GET"]
    put = cluster.requests[2]
    assert put["path"] == f"{PREFIX}team-a/inferenceservices/facenet"
    assert put["body"]["metadata"]["resourceVersion"] == "7"
    assert "model" not in put["body"]["spec"]["predictor"]          # replaced whole, not merged
    assert put["body"]["spec"]["predictor"]["containers"][0]["image"] == TRAINER
    assert result["action"] == "replaced" and result["generation"] == 4 and result["url"] == URL


def test_a_forbidden_request_names_the_status_reason_and_message(cluster, model, tmp_path):
    cluster.forbidden = True
    with pytest.raises(DeployError) as error:
        _deploy(model, tmp_path / "served_model")
    message = str(error.value)
    assert message.startswith("create InferenceService team-a/facenet: 403 Forbidden: ")
    assert 'cannot create resource "inferenceservices" in API group "serving.kserve.io" in the namespace ' \
           '"team-a"' in message
    assert "let the pipeline's service account create, get and update inferenceservices" in message


def test_never_ready_times_out_naming_the_last_conditions(cluster, model, tmp_path, monkeypatch):
    class Clock:          # waiting takes no real time: sleep moves the clock
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    monkeypatch.setattr(deploy_module, "time", Clock())
    cluster.status = lambda obj, n: _status(obj, ready=False)
    with pytest.raises(DeployError) as error:
        _deploy(model, tmp_path / "served_model", timeout_s=30, poll_s=5)
    assert str(error.value).startswith("InferenceService team-a/facenet not ready after 30 s (deploy.timeout_s); "
                                       "last conditions: PredictorReady=False (RevisionMissing: Configuration "
                                       '"facenet-predictor" is waiting for a Revision to become ready.), '
                                       "Ready=False (RevisionMissing)")
    assert [r["method"] for r in cluster.requests].count("GET") == 7     # at 0, 5, ..., 30 s


def test_a_model_that_cannot_load_fails_without_waiting_out_the_timeout(cluster, model, tmp_path):
    cluster.status = lambda obj, n: {**_status(obj, ready=False), "modelStatus": {
        "transitionStatus": "BlockedByFailedLoad",
        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "threshold.json: not found"}}}
    with pytest.raises(DeployError, match=r"cannot serve the model: BlockedByFailedLoad: ModelLoadFailed "
                                          r"threshold\.json: not found; conditions: PredictorReady=False"):
        _deploy(model, tmp_path / "served_model", timeout_s=3600)
    assert [r["method"] for r in cluster.requests] == ["POST", "GET"]


def test_wait_ready_reads_until_ready(cluster):
    cluster.objects[("team-a", "facenet")] = {"metadata": {"name": "facenet", "generation": 2}}
    api = deploy_module.connect().api_instance
    assert wait_ready(api, "facenet", "team-a", 2, timeout_s=5, poll_s=0.01)["url"] == URL
    assert cluster.gets_since_write == 2


# --- what is refused before a cluster is asked anything -------------------------------------------

def test_no_cluster_is_a_clear_error_and_nothing_is_written(model, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))        # no ~/.kube/config
    monkeypatch.setattr(kube, "IN_CLUSTER_TOKEN", tmp_path / "no-token")
    out = tmp_path / "served_model"
    with pytest.raises(DeployError) as error:
        _deploy(model, out, uri=str(out))       # a local run: a local path, and no cluster
    assert str(error.value) == (
        f"no Kubernetes cluster: no in-cluster service account ({tmp_path / 'no-token'} not found) and no "
        f"kubeconfig ($KUBECONFIG not set and ~/.kube/config not found); the deploy step needs a cluster with "
        f"KServe: run the pipeline on Kubeflow Pipelines (make submit), or leave deploy.enabled false to run it "
        f"without one")
    assert not out.exists()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(DeployError, match=r"no kubeconfig \(\$KUBECONFIG=.*missing\.yaml not found\)"):
        _deploy(model, out)


def test_a_local_bundle_uri_is_refused_before_anything_is_written_or_sent(cluster, model, tmp_path):
    out = tmp_path / "served_model"
    with pytest.raises(InputError, match=r"served_model' is a local path, which a cluster's KServe cannot read"):
        _deploy(model, out, uri=str(out))
    assert cluster.requests == [] and not out.exists()


def test_bad_parameters_and_a_threshold_of_another_model_are_refused_first(cluster, model, tmp_path):
    with pytest.raises(InputError, match=r"deploy\.name must be a DNS-1035 label"):
        _deploy(model, tmp_path / "out", name="Faces")
    other = json.loads(model[1].read_text())
    model[1].write_text(json.dumps({**other, "model_sha256": "0" * 64}))
    with pytest.raises(InputError, match=r"was evaluated for another model"):
        _deploy(model, tmp_path / "out")
    assert cluster.requests == [] and not (tmp_path / "out").exists()


# --- the DAG -------------------------------------------------------------------------------------

def _compile(tmp_path, deploy: dict | None, data: dict | None = None) -> dict:
    from pipelines.compile import compile_pipeline

    config = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())
    config["data"].update(data or {})
    if deploy is not None:
        config["deploy"] = deploy
    path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = compile_pipeline(str(path), tmp_path / f"{path.stem}.out.yaml", LIGHT, TRAINER)
    return next(yaml.safe_load_all(out.read_text()))


@pytest.mark.parametrize("data, evaluate", [({}, "evaluate-model"),
                                            ({"eval_source_uri": "gs://b/lfw.tgz"}, "evaluate-on-archive")])
def test_deploy_on_adds_a_last_task_with_its_parameters(tmp_path, data, evaluate):
    spec = _compile(tmp_path, {"enabled": True, "namespace": "team-a", "timeout_s": 900}, data)
    tasks = spec["root"]["dag"]["tasks"]
    task = tasks["deploy-model"]
    assert task["taskInfo"]["name"] == "9. deploy model"
    assert sorted(task["dependentTasks"]) == sorted([evaluate, "train-model"])
    assert {k: a["taskOutputArtifact"]["producerTask"] for k, a in task["inputs"]["artifacts"].items()} == {
        "model": "train-model", "threshold": evaluate}
    # Last: no task depends on it, and every other task comes before it.
    assert not [name for name, t in tasks.items() if "deploy-model" in t.get("dependentTasks", [])]
    parameters = task["inputs"]["parameters"]
    assert parameters.pop("image") == {"runtimeValue": {"constant": TRAINER}}    # the predictor: trainer image
    assert {arg: p["componentInputParameter"] for arg, p in parameters.items()} == {
        "name": "deploy_name", "namespace": "deploy_namespace", "service_account": "deploy_service_account",
        "cpu": "deploy_cpu", "memory": "deploy_memory", "timeout_s": "deploy_timeout_s"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert (params["deploy_namespace"]["defaultValue"], params["deploy_timeout_s"]["defaultValue"]) == ("team-a", 900)
    assert "deploy_enabled" not in params              # compiled in: it chose this DAG
    assert task["cachingOptions"] == {}                # never a cache hit: it acts on the cluster
    assert spec["deploymentSpec"]["executors"]["exec-deploy-model"]["container"]["image"] == TRAINER   # the kserve SDK is in the train extra


def test_deploy_off_leaves_the_dag_and_its_parameters_as_they_were(tmp_path):
    off, default = _compile(tmp_path, {"enabled": False, "namespace": "team-a"}), _compile(tmp_path, None)
    assert off == default
    assert "deploy-model" not in off["root"]["dag"]["tasks"]
    assert not [p for p in off["root"]["inputDefinitions"]["parameters"] if p.startswith("deploy")]


def test_the_run_table_and_summary_show_the_serving_url(tmp_path, capsys):
    from facenet_kfp.runs import TaskRecord, headline_metrics, key_figures, report_summary, summarise

    served = {"uri": BUCKET_URI, "metadata": {"url": URL, "name": "facenet", "namespace": "team-a",
                                              "action": "created"}}
    record = TaskRecord("deploy-model", "9. deploy model", status="SUCCEEDED", outputs={"served_model": served})
    assert key_figures(record) == f"namespace=team-a, name=facenet, action=created, url={URL}"
    assert headline_metrics([record]) == {"serving_url": URL, "served_model_uri": BUCKET_URI}
    failed = TaskRecord("deploy-model", "9. deploy model", status="FAILED", error="no Kubernetes cluster: ...")
    assert headline_metrics([failed]) == {}
    summary = summarise("facenet-kfp", [record], "", 1.0, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["serving_url"] == URL
    assert report_summary(summary, tmp_path / "summary.json") == 0
    assert f"serving URL:    {URL}" in capsys.readouterr().out


def test_an_unreachable_api_server_is_named(model, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(DeployError, match=rf"create InferenceService team-a/facenet: cannot reach the Kubernetes "
                                          rf"API at http://127\.0\.0\.1:{port}: MaxRetryError"):
        _deploy(model, tmp_path / "served_model")


def test_compile_takes_set_for_the_deploy_keys(tmp_path, capsys):
    from pipelines import compile as compile_module

    out = tmp_path / "p.yaml"
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--out", str(out), "--light-image", LIGHT,
            "--trainer-image", TRAINER]
    assert compile_module.main([*argv, "--set", "deploy.enabled=true", "--set", "deploy_namespace=team-b"]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert "deploy-model" in spec["root"]["dag"]["tasks"]
    assert spec["root"]["inputDefinitions"]["parameters"]["deploy_namespace"]["defaultValue"] == "team-b"
    assert compile_module.main([*argv, "--set", "deploy.name=Faces"]) == 2
    assert "error: --set deploy.name=Faces (applied to" in capsys.readouterr().err


def test_the_component_records_the_url_in_its_output_metadata(cluster, model, tmp_path):
    """The KFP component's body (kfp hands it artifacts with a path, a URI and metadata) against the cluster."""
    from types import SimpleNamespace

    from components.deploy import deploy_model

    cluster.status = lambda obj, n: _status(obj, ready=True)      # ready at the first read: no wait
    served = SimpleNamespace(path=str(tmp_path / "served_model"), uri=BUCKET_URI, metadata={})
    deploy_model(SimpleNamespace(path=str(model[0])), SimpleNamespace(path=str(model[1])), timeout_s=30,
                 image=TRAINER, served_model=served, **{k: v for k, v in SETTINGS.items() if k != "timeout_s"})
    assert served.metadata["url"] == URL and served.metadata["action"] == "created"
    assert served.metadata["storage_uri"] == serving_storage_uri(BUCKET_URI)
    assert (tmp_path / "served_model" / "threshold.json").is_file()


def test_a_run_that_fails_only_at_deploy_keeps_its_report_and_threshold(tmp_path):
    from facenet_kfp.runs import TaskRecord
    from pipelines.run_local import run_files

    (tmp_path / "report").write_text("<html>report</html>")
    (tmp_path / "threshold").write_text('{"threshold": 0.5}')
    root = tmp_path / "root"
    root.mkdir()
    evaluated = TaskRecord("evaluate-model", "8. threshold evaluation", status="SUCCEEDED", outputs={
        "report": {"uri": str(tmp_path / "report")}, "threshold": {"uri": str(tmp_path / "threshold")}})
    deployed = TaskRecord("deploy-model", "9. deploy model", status="FAILED", error="no Kubernetes cluster: ...")
    files = run_files([evaluated, deployed], "task deploy-model failed: no Kubernetes cluster: ...", root)
    assert (files["report_html"], files["threshold_json"]) == (str(root / "report.html"), str(root / "threshold.json"))
    assert (root / "threshold.json").read_text() == '{"threshold": 0.5}'
    # A failure before the evaluation (here: a task listed before it) still leaves them out.
    failed_first = TaskRecord("train-model", "7. train embeddings", status="FAILED")
    assert "report_html" not in run_files([failed_first, evaluated], "task train-model failed", tmp_path / "other")
