"""Kustomize overlays in manifests/: render each one, validate it against the Kubernetes schema, check its contents."""

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"

# Newest Kubernetes whose schemas kubernetes-validate 1.37 (requirements/lock.txt) bundles.
KUBERNETES_VERSION = "1.37.0"

# overlay -> URI scheme of its defaultPipelineRoot, which is also its key under `providers`.
OVERLAYS = {"gcs": "gs", "minio": "minio", "s3": "s3"}

# The fields KFP's launcher reads (backend/src/v2/config/{gcs,s3,minio}.go). It ignores
# unknown keys, so a misspelt key would silently fall back to defaults: test it here.
PROVIDER_DEFAULT_KEYS = {
    "gs": {"credentials"},
    "s3": {"endpoint", "region", "disableSSL", "forcePathStyle", "maxRetries", "credentials"},
    "minio": {"endpoint", "region", "disableSSL", "forcePathStyle", "maxRetries", "credentials"},
}
SECRET_REF_KEYS = {
    "gs": {"secretName", "tokenKey"},
    "s3": {"secretName", "accessKeyKey", "secretKeyKey"},
    "minio": {"secretName", "accessKeyKey", "secretKeyKey"},
}

# Created in every profile namespace by the pipelines profile controller of a standard
# Kubeflow install; the minio overlay must use it and must not define it.
STANDARD_MINIO_SECRET = "mlpipeline-minio-artifact"

PLACEHOLDER = "REPLACE_WITH"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH; it renders the kustomize overlays (`kubectl kustomize`)")
    return path


def _validator() -> Path:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    assert exe.is_file(), f"{exe} not found: kubernetes-validate is a test dependency (requirements/lock.txt)"
    return exe


def _validate(path: Path) -> subprocess.CompletedProcess:
    """Run `kubernetes-validate --strict` on a YAML file; returns the finished process."""
    return subprocess.run(
        [str(_validator()), "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(path)],
        capture_output=True, text=True, timeout=120, check=False)


class Rendered:
    """One overlay rendered by `kubectl kustomize`: the YAML file and its parsed objects."""

    def __init__(self, overlay: str, out_dir: Path):
        self.overlay = overlay
        proc = subprocess.run([_kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"kubectl kustomize manifests/overlays/{overlay} failed:\n{proc.stderr}"
        self.path = out_dir / f"{overlay}.yaml"
        self.path.write_text(proc.stdout)
        self.objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]

    def of_kind(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"overlay {self.overlay}: expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def launcher_config(self) -> tuple[str, dict]:
        """(defaultPipelineRoot, parsed providers) of the kfp-launcher ConfigMap."""
        data = self.get("ConfigMap", "kfp-launcher")["data"]
        assert set(data) == {"defaultPipelineRoot", "providers"}, f"overlay {self.overlay}: keys {sorted(data)}"
        providers = yaml.safe_load(data["providers"])
        assert isinstance(providers, dict), f"overlay {self.overlay}: providers is not a YAML mapping"
        return data["defaultPipelineRoot"], providers


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """render(overlay) -> Rendered, each overlay rendered once per module."""
    out_dir = tmp_path_factory.mktemp("manifests")
    cache: dict[str, Rendered] = {}

    def _render(overlay: str) -> Rendered:
        if overlay not in cache:
            cache[overlay] = Rendered(overlay, out_dir)
        return cache[overlay]

    return _render


def _secret_values(secret: dict) -> dict[str, str]:
    """Every value of a Secret as text: stringData as is, data base64-decoded."""
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded, validate=True).decode("utf-8")
    return values


def test_every_overlay_is_covered():
    overlays = {p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir()}
    assert overlays == set(OVERLAYS)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_validates_strictly(render, overlay):
    rendered = render(overlay)
    proc = _validate(rendered.path)
    assert proc.returncode == 0, f"kubernetes-validate rejected overlay {overlay}:\n{proc.stdout}{proc.stderr}"
    # One "passed" line per object: every object was checked against a schema, none skipped.
    passed = re.findall(r"passed for resource (\S+)", proc.stdout + proc.stderr)
    expected = [f"{obj['kind'].lower()}/{obj['metadata']['name']}" for obj in rendered.objects]
    assert sorted(passed) == sorted(expected)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_sets_one_namespace(render, overlay):
    kustomization = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())
    namespace = kustomization.get("namespace")
    assert namespace and namespace != "default"
    rendered = render(overlay)
    assert {obj["metadata"].get("namespace") for obj in rendered.objects} == {namespace}
    for binding in rendered.of_kind("RoleBinding"):
        assert {s["namespace"] for s in binding["subjects"]} == {namespace}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kfp_launcher_configmap(render, overlay):
    scheme = OVERLAYS[overlay]
    root, providers = render(overlay).launcher_config()
    match = re.fullmatch(rf"{scheme}://([^/]+)/facenet-kfp", root)
    assert match, f"overlay {overlay}: defaultPipelineRoot {root!r} is not {scheme}://BUCKET/facenet-kfp"

    assert set(providers) == {scheme}, f"overlay {overlay}: providers for {sorted(providers)}"
    default = providers[scheme]["default"]
    assert set(default) <= PROVIDER_DEFAULT_KEYS[scheme], f"unknown keys {set(default) - PROVIDER_DEFAULT_KEYS[scheme]}"
    credentials = default["credentials"]
    assert set(credentials) == {"fromEnv", "secretRef"}
    assert credentials["fromEnv"] is False
    assert set(credentials["secretRef"]) == SECRET_REF_KEYS[scheme]
    assert all(isinstance(v, str) and v for v in credentials["secretRef"].values())
    if scheme != "gs":
        assert isinstance(default["disableSSL"], bool)
        assert default["endpoint"] and default["region"]


def test_minio_overlay_uses_the_in_cluster_store(render):
    rendered = render("minio")
    root, providers = rendered.launcher_config()
    assert root == "minio://mlpipeline/facenet-kfp"
    default = providers["minio"]["default"]
    assert default["endpoint"] == "minio-service.kubeflow:9000"
    assert default["disableSSL"] is True
    assert default["credentials"]["secretRef"] == {
        "secretName": STANDARD_MINIO_SECRET, "accessKeyKey": "accesskey", "secretKeyKey": "secretkey"}
    # The profile controller owns that Secret; applying our own copy would fight it.
    assert rendered.of_kind("Secret") == []


@pytest.mark.parametrize("overlay", ["gcs", "s3"])
def test_secret_reference_resolves_in_overlay(render, overlay):
    rendered = render(overlay)
    _, providers = rendered.launcher_config()
    ref = dict(providers[OVERLAYS[overlay]]["default"]["credentials"]["secretRef"])
    secret = rendered.get("Secret", ref.pop("secretName"))
    # Every key the launcher looks up (tokenKey, accessKeyKey, secretKeyKey) exists in the Secret.
    assert set(ref.values()) <= set(_secret_values(secret)), f"keys {sorted(ref.values())} missing from the Secret"


def test_gcs_key_secret_matches_the_pipeline_mount(render):
    # pipelines/facenet_pipeline.py mounts cluster.gcs_secret at /var/secrets/google and
    # points GOOGLE_APPLICATION_CREDENTIALS at key.json inside it.
    secret = render("gcs").get("Secret", "facenet-gcs-key")
    assert set(_secret_values(secret)) == {"key.json"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_secrets_hold_only_placeholders(render, overlay):
    for secret in render(overlay).of_kind("Secret"):
        values = _secret_values(secret)
        assert values, f"Secret {secret['metadata']['name']} has no keys"
        for key, value in values.items():
            assert PLACEHOLDER in value, f"Secret {secret['metadata']['name']} key {key} holds a non-placeholder value"


def test_no_secret_file_holds_a_real_value():
    # Also catches a Secret file that no kustomization references, so never gets rendered.
    files = sorted(MANIFESTS.rglob("*.yaml")) + sorted(MANIFESTS.rglob("*.yml"))
    secrets = [doc for f in files for doc in yaml.safe_load_all(f.read_text())
               if isinstance(doc, dict) and doc.get("kind") == "Secret"]
    assert secrets, "expected the Secret templates of the gcs and s3 overlays"
    for secret in secrets:
        for key, value in _secret_values(secret).items():
            assert PLACEHOLDER in value, f"Secret {secret['metadata']['name']} key {key} holds a non-placeholder value"


def test_gcs_overlay_has_workload_identity_service_account(render):
    rendered = render("gcs")
    accounts = [sa for sa in rendered.of_kind("ServiceAccount")
                if WORKLOAD_IDENTITY_ANNOTATION in (sa["metadata"].get("annotations") or {})]
    assert len(accounts) == 1
    account = accounts[0]
    assert re.fullmatch(r"REPLACE_WITH_GSA@PROJECT\.iam\.gserviceaccount\.com",
                        account["metadata"]["annotations"][WORKLOAD_IDENTITY_ANNOTATION])
    # Runs started with this account need what default-editor has in the profile namespace.
    bindings = [b for b in rendered.of_kind("RoleBinding")
                if {"kind": "ServiceAccount", "name": account["metadata"]["name"],
                    "namespace": account["metadata"]["namespace"]} in b["subjects"]]
    assert len(bindings) == 1
    assert bindings[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": "kubeflow-edit"}


def test_readme_names_every_placeholder(render):
    readme = (MANIFESTS / "README.md").read_text()
    placeholders = set()
    for overlay in OVERLAYS:
        placeholders |= set(re.findall(rf"{PLACEHOLDER}_[A-Z0-9_]+", render(overlay).path.read_text()))
    assert placeholders
    missing = sorted(p for p in placeholders if p not in readme)
    assert not missing, f"manifests/README.md does not mention {missing}"


BROKEN = {
    "non-string ConfigMap value": {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "broken"}, "data": {"a": 1}},
    "unknown field": {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "broken"}, "spec": {"a": "1"}},
    "misspelt metadata field": {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "broken", "annotation": {"a": "1"}}},
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_rejects_broken_manifest(tmp_path, case):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(BROKEN[case]))
    proc = _validate(path)
    assert proc.returncode != 0, f"kubernetes-validate accepted a broken manifest ({case}):\n{proc.stdout}"
    assert "did not validate" in proc.stdout + proc.stderr


def test_validation_rejects_broken_overlay(render, tmp_path):
    # A real overlay with one field misspelt must fail too, not only hand-written documents.
    objects = [dict(obj) for obj in render("gcs").objects]
    configmap = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    configmap["metadata"] = {**configmap["metadata"], "label": {"a": "b"}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    proc = _validate(path)
    assert proc.returncode != 0
    assert "configmap/kfp-launcher" in proc.stdout + proc.stderr
    assert "'label' was unexpected" in proc.stdout + proc.stderr
