"""KServe manifests in manifests/serving/: render every predictor with every store, validate, check contents."""

import base64
import gzip
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.builders import kustomize
from tests.kserve_schema import SCHEMA_PATH, inference_service_errors, load_schema, validate_inference_service

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
SERVING = MANIFESTS / "serving"
KSERVE_DATA = Path(__file__).resolve().parent / "data" / "kserve"
KUBERNETES_VERSION = "1.37.0"  # as tests/test_manifests.py

# predictor -> its kustomization folder (relative to manifests/serving) and InferenceService name.
PREDICTORS = {"custom": (".", "facenet"), "tfserving": ("tfserving", "facenet-tfserving")}
STORES = ("gcs", "minio", "s3")
SHIPPED_STORE = "minio"
SERVICE_ACCOUNT = "facenet-kfp-serving"
TRAINER_IMAGE = "ghcr.io/facenet-kfp/facenet-kfp-trainer"
MODEL_URI_PLACEHOLDER = "REPLACE_WITH_MODEL_ARTIFACT_URI"
PLACEHOLDER = "REPLACE_WITH"

# What KServe's credential builder (pkg/credentials/service_account_credentials.go, with the
# default `credentials` of its inferenceservice-config) recognises in a Secret the predictor's
# service account lists: S3 by AWS_SECRET_ACCESS_KEY (and reads AWS_ACCESS_KEY_ID), GCS by
# gcloud-application-credentials.json.
STORE_SECRET_KEYS = {
    "gcs": {"gcloud-application-credentials.json"},
    "minio": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
}
S3_ANNOTATIONS = {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"}
# The URI schemes KServe's controller accepts (SupportedStorageURIPrefixList, v0.20.0).
STORAGE_URI_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://",
                        "oci://", "oci+native://", "hf://")


def _edit_kustomization(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _copy(tmp_path: Path) -> Path:
    """A copy of manifests/serving to edit the way a user would."""
    dest = tmp_path / "serving"
    shutil.copytree(SERVING, dest)
    return dest


def _with_store(serving: Path, predictor: str, store: str) -> Path:
    folder = serving / PREDICTORS[predictor][0]
    prefix = "stores" if folder == serving else "../stores"

    def edit(data):
        assert data["components"] == [f"{prefix}/{SHIPPED_STORE}"]
        data["components"] = [f"{prefix}/{store}"]

    _edit_kustomization(folder / "kustomization.yaml", edit)
    return folder


def _set_model_uri(folder: Path, uri: str) -> None:
    def edit(data):
        (generator,) = [g for g in data["configMapGenerator"] if g["name"] == "facenet-kfp-serving-model"]
        assert generator["literals"] == [f"storageUri={MODEL_URI_PLACEHOLDER}"]
        generator["literals"] = [f"storageUri={uri}"]

    _edit_kustomization(folder / "kustomization.yaml", edit)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(predictor, store) -> rendered objects; the shipped store renders the files as they are."""
    out = {}
    for predictor, (sub, _) in PREDICTORS.items():
        out[predictor, SHIPPED_STORE] = kustomize(SERVING / sub)
        for store in STORES:
            if store != SHIPPED_STORE:
                copy = _copy(tmp_path_factory.mktemp(f"{predictor}-{store}"))
                out[predictor, store] = kustomize(_with_store(copy, predictor, store))
    return out


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [obj for obj in _of_kind(objects, kind) if name is None or obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _secret_values(secret: dict) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded, validate=True).decode("utf-8")
    return values


def _isvc(objects: list[dict], predictor: str) -> dict:
    return _one(objects, "InferenceService", PREDICTORS[predictor][1])


CASES = [(predictor, store) for predictor in PREDICTORS for store in STORES]


# --- the vendored schema ---------------------------------------------------------------------

def test_vendored_schema_matches_its_source_record():
    source = (KSERVE_DATA / "SOURCE.md").read_text()
    digest = hashlib.sha256(gzip.decompress(SCHEMA_PATH.read_bytes())).hexdigest()
    assert f"`{digest}`" in source, "SOURCE.md does not record the vendored schema's sha256"
    assert "kserve/kserve" in source and "config/crd/full/serving.kserve.io_inferenceservices.yaml" in source
    assert re.search(r"`[0-9a-f]{40}`", source), "SOURCE.md names no commit"
    assert "Apache License 2.0" in source
    schema = load_schema()
    predictor = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    assert {"containers", "model", "serviceAccountName"} <= set(predictor)


def test_extract_script_reproduces_the_vendored_file(tmp_path):
    # The script's own encoding of the stored schema is byte-identical to the stored file.
    spec = importlib.util.spec_from_file_location("extract_schema", KSERVE_DATA / "extract_schema.py")
    extract_schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_schema)
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "inferenceservices.serving.kserve.io"},
           "spec": {"versions": [{"name": "v1beta1", "schema": {"openAPIV3Schema": load_schema()}}]}}
    crd_path = tmp_path / "crd.yaml"
    crd_path.write_text(json.dumps(crd))  # JSON is YAML, and quick to write
    out = tmp_path / "schema.json.gz"
    assert extract_schema.main([str(crd_path), str(out)]) == 0
    assert out.read_bytes() == SCHEMA_PATH.read_bytes()
    with pytest.raises(ValueError, match="no version 'v1'"):
        extract_schema.extract(crd_path.read_text(), "v1")


# --- rendering and validation ----------------------------------------------------------------

def test_every_store_is_covered():
    assert {p.name for p in (SERVING / "stores").iterdir() if p.is_dir()} == set(STORES)
    # One serving store per pipeline overlay: the model lives where the pipeline wrote it.
    assert {p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir()} == set(STORES)


@pytest.mark.parametrize("predictor,store", CASES)
def test_inference_service_validates_against_kserve_schema(rendered, predictor, store):
    objects = rendered[predictor, store]
    services = _of_kind(objects, "InferenceService")
    assert [s["metadata"]["name"] for s in services] == [PREDICTORS[predictor][1]]
    for service in services:
        validate_inference_service(service)


@pytest.mark.parametrize("predictor,store", CASES)
def test_core_objects_validate_strictly(rendered, predictor, store, tmp_path):
    core = [obj for obj in rendered[predictor, store] if obj["kind"] != "InferenceService"]
    assert sorted(obj["kind"] for obj in core) == ["Secret", "ServiceAccount"]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(exe), "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"kubernetes-validate rejected {predictor}/{store}:\n{proc.stdout}{proc.stderr}"
    passed = re.findall(r"passed for resource (\S+)", proc.stdout + proc.stderr)
    assert sorted(passed) == sorted(f"{obj['kind'].lower()}/{obj['metadata']['name']}" for obj in core)


@pytest.mark.parametrize("predictor,store", CASES)
def test_one_namespace_as_the_pipeline_overlays(rendered, predictor, store):
    overlay = yaml.safe_load((MANIFESTS / "overlays" / store / "kustomization.yaml").read_text())
    assert {obj["metadata"].get("namespace") for obj in rendered[predictor, store]} == {overlay["namespace"]}


# --- what the predictors run -----------------------------------------------------------------

@pytest.mark.parametrize("store", STORES)
def test_custom_predictor_runs_the_model_server(rendered, store):
    predictor = _isvc(rendered["custom", store], "custom")["spec"]["predictor"]
    assert "model" not in predictor
    (container,) = predictor["containers"]
    # KServe fetches the model only for the container named kserve-container (CustomPredictor.GetStorageUri).
    assert container["name"] == "kserve-container"
    assert container["image"] == f"{TRAINER_IMAGE}:0.1.0"
    assert container["command"] == ["facenet-kfp"]
    args = container["args"]
    assert args[:3] == ["serve", "--model", "/mnt/models"]
    assert args[args.index("--port") + 1] == "8080"
    assert args[args.index("--name") + 1] == "facenet"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == MODEL_URI_PLACEHOLDER
    assert [e["name"] for e in container["env"]].count("STORAGE_URI") == 1
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("store", STORES)
def test_tfserving_predictor_serves_the_serving_folder(rendered, store):
    predictor = _isvc(rendered["tfserving", store], "tfserving")["spec"]["predictor"]
    assert "containers" not in predictor
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "tensorflow"}
    assert model["storageUri"] == f"{MODEL_URI_PLACEHOLDER}/serving"
    assert set(model["resources"]) == {"requests", "limits"}


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_model_uri_is_set_in_one_place(tmp_path, predictor):
    uri = "s3://mlpipeline/v2/artifacts/facenet-kfp/4f1c2d3e/deploy/model"
    folder = _copy(tmp_path) / PREDICTORS[predictor][0]
    _set_model_uri(folder, uri)
    objects = kustomize(folder)
    # The value's ConfigMap is local configuration: read by kustomize, never applied.
    assert _of_kind(objects, "ConfigMap") == []
    predictor_spec = _isvc(objects, predictor)["spec"]["predictor"]
    if predictor == "custom":
        (container,) = predictor_spec["containers"]
        assert {e["name"]: e["value"] for e in container["env"]}["STORAGE_URI"] == uri
    else:
        assert predictor_spec["model"]["storageUri"] == f"{uri}/serving"
    assert MODEL_URI_PLACEHOLDER not in yaml.safe_dump_all(objects)
    validate_inference_service(_isvc(objects, predictor))


def test_image_is_set_with_the_images_transformer(tmp_path):
    folder = _copy(tmp_path)

    def edit(data):
        (image,) = data["images"]
        assert image["name"] == TRAINER_IMAGE
        image.update(newName="registry.example/team/facenet-kfp-trainer", newTag="1.2.3")

    _edit_kustomization(folder / "kustomization.yaml", edit)
    (container,) = _isvc(kustomize(folder), "custom")["spec"]["predictor"]["containers"]
    assert container["image"] == "registry.example/team/facenet-kfp-trainer:1.2.3"


# --- credentials -----------------------------------------------------------------------------

@pytest.mark.parametrize("predictor,store", CASES)
def test_service_account_lists_a_secret_kserve_recognises(rendered, predictor, store):
    objects = rendered[predictor, store]
    assert _isvc(objects, predictor)["spec"]["predictor"]["serviceAccountName"] == SERVICE_ACCOUNT
    account = _one(objects, "ServiceAccount", SERVICE_ACCOUNT)
    (ref,) = account["secrets"]
    secret = _one(objects, "Secret", ref["name"])
    values = _secret_values(secret)
    assert set(values) == STORE_SECRET_KEYS[store]
    for key, value in values.items():
        assert PLACEHOLDER in value, f"Secret {ref['name']} key {key} holds a non-placeholder value"
    annotations = secret["metadata"].get("annotations") or {}
    if store == "gcs":
        assert not annotations
    else:
        assert set(annotations) == S3_ANNOTATIONS
        assert annotations["serving.kserve.io/s3-usehttps"] in {"0", "1"}


def test_minio_store_is_the_pipeline_store(rendered):
    providers = yaml.safe_load((MANIFESTS / "overlays" / "minio" / "providers.yaml").read_text())
    endpoint = providers["minio"]["default"]["endpoint"]
    secret = _one(rendered["custom", "minio"], "Secret")
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == endpoint
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"


# --- the validator can fail ------------------------------------------------------------------

def _broken_custom(rendered, change) -> dict:
    service = yaml.safe_load(yaml.safe_dump(_isvc(rendered["custom", SHIPPED_STORE], "custom")))
    change(service)
    return service


def _container(service: dict) -> dict:
    return service["spec"]["predictor"]["containers"][0]


BROKEN = {
    "port as a string": (
        lambda s: _container(s)["ports"][0].update(containerPort="8080"),
        "spec.predictor.containers[0].ports[0].containerPort: '8080' is not of type 'integer'"),
    "misspelt probe field": (
        lambda s: _container(s)["readinessProbe"]["httpGet"].update(pth="/v2/health/ready"),
        "spec.predictor.containers[0].readinessProbe.httpGet: Additional properties are not allowed"),
    "args not a list": (
        lambda s: _container(s).update(args="serve --model /mnt/models"),
        "spec.predictor.containers[0].args: 'serve --model /mnt/models' is not of type 'array'"),
    "container without a name": (
        lambda s: _container(s).pop("name"),
        "spec.predictor.containers[0]: 'name' is a required property"),
    "memory not a quantity": (
        lambda s: _container(s)["resources"]["limits"].update(memory="4 GB"),
        "spec.predictor.containers[0].resources.limits.memory: '4 GB' does not match"),
    "unknown predictor field": (
        lambda s: s["spec"]["predictor"].update(storageUri="s3://b/m"),
        "spec.predictor: Additional properties are not allowed ('storageUri' was unexpected)"),
    "name KServe refuses": (
        lambda s: s["metadata"].update(name="FaceNet"),
        "metadata.name: 'FaceNet' does not match"),
    "wrong apiVersion": (
        lambda s: s.update(apiVersion="serving.kserve.io/v1alpha1"),
        "apiVersion: expected 'serving.kserve.io/v1beta1'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_rejects_broken_inference_service(rendered, case):
    change, expected = BROKEN[case]
    service = _broken_custom(rendered, change)
    with pytest.raises(AssertionError) as raised:
        validate_inference_service(service)
    assert expected in str(raised.value)
    assert "InferenceService" in str(raised.value)


def test_validation_reports_every_error_with_its_path(rendered):
    def change(service):
        _container(service)["ports"][0]["containerPort"] = "8080"
        service["spec"]["predictor"]["minReplicas"] = "one"

    errors = inference_service_errors(_broken_custom(rendered, change))
    assert [e.split(":")[0] for e in errors] == ["spec.predictor.containers[0].ports[0].containerPort",
                                                 "spec.predictor.minReplicas"]


def test_tfserving_model_format_must_be_an_object(rendered):
    service = yaml.safe_load(yaml.safe_dump(_isvc(rendered["tfserving", SHIPPED_STORE], "tfserving")))
    service["spec"]["predictor"]["model"]["modelFormat"] = "tensorflow"
    with pytest.raises(AssertionError, match=r"spec\.predictor\.model\.modelFormat: 'tensorflow' is not of type"):
        validate_inference_service(service)


# --- documentation ---------------------------------------------------------------------------

def test_readme_documents_serving(rendered):
    readme = (MANIFESTS / "README.md").read_text()
    placeholders = set()
    for objects in rendered.values():
        placeholders |= set(re.findall(rf"{PLACEHOLDER}_[A-Z0-9_]+", yaml.safe_dump_all(objects)))
    placeholders.add(MODEL_URI_PLACEHOLDER)
    missing = sorted(p for p in placeholders if p not in readme)
    assert not missing, f"manifests/README.md does not mention {missing}"
    for text in ("kubectl kustomize manifests/serving", "kubectl apply -k manifests/serving",
                 "kubectl apply -k manifests/serving/tfserving", "/v2/models/facenet/infer",
                 "/v2/models/facenet-verify/infer", "BYTES", "image_a", "image_b", "stores/gcs", "stores/s3"):
        assert text in readme, f"manifests/README.md does not mention {text!r}"


def test_documented_model_uris_are_ones_kserve_accepts():
    # KFP shows minio:// URIs; KServe takes only s3:// for that store.
    section = (MANIFESTS / "README.md").read_text().split("## Serving with KServe", 1)[1]
    uris = [u for u in re.findall(r"storageUri=([^\s`]+)", section) if u != MODEL_URI_PLACEHOLDER]
    assert uris, "the serving section shows no example storageUri"
    assert all(u.startswith(STORAGE_URI_PREFIXES) for u in uris), uris
