"""Step 9 (with deploy.enabled): serve the trained model and its evaluated threshold as a KServe InferenceService.

The step's output is the serving bundle: a copy of the model folder with evaluate's threshold.json at
its top, so `facenet-kfp serve --model /mnt/models` finds the threshold as verify does. The
InferenceService (`inference_service`) runs the trainer image's `facenet-kfp serve` as a custom
predictor container; KServe's storage initializer copies the bundle (the container's STORAGE_URI) to
/mnt/models with the credentials of the predictor's ServiceAccount.

`deploy` works in this order, so that a run without a cluster (``make run`` on a laptop) fails here,
saying so, after every earlier step has finished and before anything is written:

1. the parameters (`DeployConfig`'s rules) and inputs (the threshold was evaluated for this model);
2. the cluster: the pod's in-cluster service account, else a kubeconfig (`connect`);
3. the bundle's URI: object storage the cluster reads, never a local path (`serving_storage_uri`);
4. the bundle, written whole (`write_bundle`, `fsutil.atomic_dir`);
5. the InferenceService: created, or replaced when one of that name exists (409 Conflict);
6. readiness: its Ready condition true for this generation, up to ``timeout_s`` (`wait_ready`).

An API error fails the step naming the status code, reason and the API server's message; a timeout
names the last conditions. kserve (and with it the kubernetes client) is imported only here, inside
the functions that talk to a cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from facenet_kfp.deploy_config import DeployConfig
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.evaluate import MODEL_JSON, THRESHOLD_JSON
from facenet_kfp.fsutil import STEP_MARKER, atomic_dir, read_json
from facenet_kfp.kube import api_message, condition_text, find_cluster

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"
MODEL_MOUNT = "/mnt/models"       # where KServe's storage initializer puts STORAGE_URI for kserve-container
PORT = 8080                       # KServe's container port; `facenet-kfp serve`'s default
CONTAINER = "kserve-container"    # the container name KServe gives the storage initializer's volume
# Artifact URI schemes of a KFP pipeline root -> the scheme KServe's storage initializer reads them with.
# KFP writes MinIO artifacts as minio://bucket/key; the initializer reads MinIO as S3 (the endpoint comes
# from the annotations of the ServiceAccount's Secret, manifests/serving/stores/minio).
STORAGE_SCHEMES = {"gs": "gs", "s3": "s3", "minio": "s3"}
POLL_SECONDS = 5.0
# KServe's status.modelStatus.transitionStatus values after which waiting is pointless.
FAILED_TRANSITIONS = ("InvalidSpec", "BlockedByFailedLoad")


class DeployError(FacenetError):
    """The cluster is missing, refused a request, or the InferenceService did not become ready."""


# --- what is deployed --------------------------------------------------------------------------

def serving_storage_uri(artifact_uri: str) -> str:
    """The storageUri KServe reads the artifact at `artifact_uri` from: gs:// and s3:// as they are,
    minio://bucket/key as s3://bucket/key.

    Raises InputError for a local path or file:// URI (a cluster cannot read this machine's disk) and
    for any other scheme, naming the URI.
    """
    scheme, sep, rest = artifact_uri.partition("://")
    if sep and scheme.lower() in STORAGE_SCHEMES and rest.strip("/"):
        return f"{STORAGE_SCHEMES[scheme.lower()]}://{rest}"
    what = (f"a URI with scheme {scheme}://" if sep and scheme.lower() != "file" else "a local path")
    raise InputError(f"the serving bundle's URI {artifact_uri!r} is {what}, which a cluster's KServe cannot "
                     f"read: the InferenceService needs the bundle in object storage "
                     f"({', '.join(f'{s}://' for s in STORAGE_SCHEMES)}), which a Kubeflow Pipelines run "
                     f"gives when its pipeline root is there; a local run cannot deploy")


def inference_service(name: str, namespace: str, image: str, storage_uri: str, service_account: str,
                      resources: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The InferenceService serving the bundle at `storage_uri` with `facenet-kfp serve`, as a dict.

    Args:
        name: InferenceService name, also the served models' (``name`` and ``name-verify``).
        namespace: its namespace.
        image: the trainer image (it has TensorFlow and `facenet-kfp serve`).
        storage_uri: the bundle's object-storage URI (`serving_storage_uri`), the container's STORAGE_URI:
            KServe's storage initializer copies it to /mnt/models before the container starts.
        service_account: the predictor's ServiceAccount, whose Secrets give read access to `storage_uri`.
        resources: {"cpu": quantity, "memory": quantity}, the container's requests and limits.
        labels: metadata labels (app.kubernetes.io/part-of: facenet-kfp is always there).
    Returns:
        apiVersion serving.kserve.io/v1beta1, kind InferenceService: one replica of a custom predictor
        container ``kserve-container`` on port 8080, ready when KServe's /v2/health/ready answers.
    """
    probe = {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "initialDelaySeconds": 5,
             "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    # Loading TensorFlow and the model takes a while on a cold node: a minute before the first liveness check.
    liveness = {"httpGet": {"path": "/v2/health/live", "port": PORT}, "initialDelaySeconds": 60,
                "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3}
    container = {
        "name": CONTAINER,
        "image": image,
        "command": ["facenet-kfp"],
        "args": ["serve", "--model", MODEL_MOUNT, "--port", str(PORT), "--name", name],
        "env": [{"name": "STORAGE_URI", "value": storage_uri}],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": liveness,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "facenet-kfp", **(labels or {})}},
        "spec": {"predictor": {"serviceAccountName": service_account, "minReplicas": 1,
                               "containers": [container]}},
    }


def check_inputs(model_dir: str | os.PathLike, threshold_file: str | os.PathLike) -> dict[str, Any]:
    """The threshold.json's content after checking that `model_dir` is a model folder and the threshold
    was evaluated for it (`verify.check_threshold_for_model`); InputError naming the file otherwise."""
    from facenet_kfp.verify import _check_model_dir, check_threshold_for_model, read_threshold_info

    model_dir = _check_model_dir(model_dir)
    threshold_file = Path(threshold_file)
    if not threshold_file.is_file():
        raise InputError(f"{threshold_file}: threshold file not found (the evaluate step's threshold output)")
    info = read_threshold_info(threshold_file)
    check_threshold_for_model(info, threshold_file, model_dir, read_json(model_dir / MODEL_JSON))
    return info


def write_bundle(model_dir: str | os.PathLike, threshold_file: str | os.PathLike,
                 out_dir: str | os.PathLike) -> list[str]:
    """Write the serving bundle at `out_dir` whole: every file of `model_dir` (not its step marker) and
    `threshold_file` as threshold.json at the top. Returns the names at its top level, sorted."""
    with atomic_dir(out_dir, step="deploy") as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STEP_MARKER))
        shutil.copyfile(threshold_file, tmp / THRESHOLD_JSON)
        names = sorted(p.name for p in tmp.iterdir())
    return names


# --- the cluster -----------------------------------------------------------------------------

def connect(config_file: str | os.PathLike | None = None) -> Any:
    """A `kserve.KServeClient` of the cluster: `config_file` when given, else the pod's in-cluster
    service account (its token file and $KUBERNETES_SERVICE_HOST), else the kubeconfig ($KUBECONFIG, else
    ~/.kube/config).

    Raises DeployError "no Kubernetes cluster: ..." naming what was tried when there is none, or naming
    the kubeconfig when it cannot be used (no current context, a missing file it names).
    """
    in_cluster, kubeconfig = find_cluster(
        config_file, DeployError, "the deploy step needs a cluster with KServe: run the pipeline on Kubeflow "
                                  "Pipelines (make submit), or leave deploy.enabled false to run it without one")
    from kserve import KServeClient
    from kubernetes.config import ConfigException

    try:
        if in_cluster:
            return KServeClient()   # KServe loads the in-cluster config inside a pod
        return KServeClient(config_file=kubeconfig, persist_config=False)
    except (ConfigException, OSError, ValueError) as exc:
        source = "the in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig}"
        raise DeployError(f"cannot use {source} to reach a Kubernetes cluster: {exc}") from exc


def api_error(exc: Exception, action: str, name: str, namespace: str) -> DeployError:
    """A DeployError for a failed Kubernetes API call: the status code, reason and the API server's own
    message (e.g. "403 Forbidden: ... cannot create resource inferenceservices ... in the namespace ..."),
    with a hint for the usual causes; an unreachable server is named by its address."""
    from kubernetes.client.rest import ApiException

    what = f"{action} InferenceService {namespace}/{name}"
    if not isinstance(exc, ApiException):
        from kubernetes import client

        host = client.Configuration.get_default_copy().host
        return DeployError(f"{what}: cannot reach the Kubernetes API at {host}: {type(exc).__name__}: {exc}")
    hints = {401: "the credentials were refused: check the kubeconfig's user or the pod's service account token",
             403: (f"let the pipeline's service account create, get and update inferenceservices.{GROUP} in "
                   f"namespace {namespace} (a Role and RoleBinding; in a Kubeflow profile namespace the "
                   f"default-editor account may)"),
             404: f"is KServe installed (the {PLURAL}.{GROUP} CRD) and does namespace {namespace} exist?",
             422: "the API server refused the InferenceService as invalid"}
    hint = f"; {hints[exc.status]}" if exc.status in hints else ""
    return DeployError(f"{what}: {api_message(exc)}{hint}")


def apply_inference_service(api: Any, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Create `manifest` through `api` (a kubernetes CustomObjectsApi), or replace the InferenceService of
    that name when it exists (409 Conflict on create: read its resourceVersion, then PUT the whole object,
    so fields this manifest does not set are gone). Returns ("created" or "replaced", the object the API
    server returned). DeployError (`api_error`) on any other failure."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    args = (GROUP, VERSION, namespace, PLURAL)
    try:
        return "created", api.create_namespaced_custom_object(*args, manifest)
    except ApiException as exc:
        if exc.status != 409:
            raise api_error(exc, "create", name, namespace) from exc
    except HTTPError as exc:
        raise api_error(exc, "create", name, namespace) from exc
    try:
        current = api.get_namespaced_custom_object(*args, name)
        body = {**manifest, "metadata": {**manifest["metadata"],
                                         "resourceVersion": current["metadata"]["resourceVersion"]}}
        return "replaced", api.replace_namespaced_custom_object(*args, name, body)
    except (ApiException, HTTPError) as exc:
        raise api_error(exc, "replace the existing", name, namespace) from exc


def conditions_text(status: dict[str, Any]) -> str:
    """An InferenceService status's conditions as "Type=Status (reason: message)", one after another."""
    return condition_text(status.get("conditions"))


def readiness(obj: dict[str, Any], generation: int | None) -> bool:
    """Whether the InferenceService `obj` is Ready for `generation` (its status.observedGeneration has
    reached it; None: any generation)."""
    status = obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and str(c.get("status", "")).lower() == "true"
                for c in status.get("conditions") or [])
    observed = status.get("observedGeneration")
    return ready and (generation is None or observed is None or observed >= generation)


def wait_ready(api: Any, name: str, namespace: str, generation: int | None, timeout_s: float,
               poll_s: float = POLL_SECONDS) -> dict[str, Any]:
    """Poll the InferenceService until it is Ready for `generation`; its status.

    Raises DeployError after `timeout_s` seconds naming the last conditions, at once when KServe reports
    that the model cannot load (status.modelStatus: InvalidSpec, BlockedByFailedLoad) or on an API error.
    """
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except (ApiException, HTTPError) as exc:
            raise api_error(exc, "read the status of", name, namespace) from exc
        status = obj.get("status") or {}
        if readiness(obj, generation):
            return status
        model = status.get("modelStatus") or {}
        if model.get("transitionStatus") in FAILED_TRANSITIONS:
            failure = model.get("lastFailureInfo") or {}
            raise DeployError(f"InferenceService {namespace}/{name} cannot serve the model: "
                              f"{model['transitionStatus']}: {failure.get('reason', '')} {failure.get('message', '')}"
                              f"".rstrip() + f"; conditions: {conditions_text(status)}")
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} not ready after {timeout_s:g} s "
                              f"(deploy.timeout_s); last conditions: {conditions_text(status)}; see "
                              f"kubectl -n {namespace} describe inferenceservice {name}")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


# --- the step ----------------------------------------------------------------------------------

def deploy(model_dir: str | os.PathLike, threshold_file: str | os.PathLike, out_dir: str | os.PathLike,
           out_uri: str, settings: Mapping[str, Any], image: str, config_file: str | os.PathLike | None = None,
           poll_s: float = POLL_SECONDS) -> dict[str, Any]:
    """Deploy the model at `model_dir` with its evaluated `threshold_file` as an InferenceService.

    Args:
        model_dir: the train step's model folder.
        threshold_file: evaluate's threshold.json for that model.
        out_dir, out_uri: the serving bundle's local path and its URI (what the cluster reads).
        settings: the deploy config's keys but `enabled` (`DeployConfig`: name, namespace,
            service_account, cpu, memory, timeout_s), checked by its rules first.
        image: the trainer image reference the predictor runs.
        config_file: a kubeconfig to use instead of the in-cluster account or $KUBECONFIG.
        poll_s: seconds between status reads while waiting.
    Returns:
        {"url", "address_url", "name", "namespace", "action": created | replaced, "storage_uri",
        "image", "service_account", "generation", "threshold", "distance", "files"}.
    Raises:
        InputError: a bad parameter, a threshold of another model, a bundle URI the cluster cannot read.
        DeployError: no cluster, an API error (status code, reason, message), not ready in time.
    """
    config = DeployConfig(**{**settings, "enabled": True})
    if not image or image != image.strip() or " " in image:
        raise InputError(f"deploy image must be an image reference, got {image!r}")
    threshold = check_inputs(model_dir, threshold_file)
    kserve = connect(config_file)
    storage_uri = serving_storage_uri(out_uri)
    files = write_bundle(model_dir, threshold_file, out_dir)
    log.info("serving bundle %s: %s", out_uri, ", ".join(files))
    manifest = inference_service(config.name, config.namespace, image, storage_uri, config.service_account,
                                 {"cpu": config.cpu, "memory": config.memory})
    action, obj = apply_inference_service(kserve.api_instance, manifest)
    generation = (obj.get("metadata") or {}).get("generation")
    log.info("InferenceService %s/%s %s (generation %s); waiting up to %d s for it to be ready",
             config.namespace, config.name, action, generation, config.timeout_s)
    status = wait_ready(kserve.api_instance, config.name, config.namespace, generation, config.timeout_s,
                        poll_s)
    url = status.get("url") or ""
    log.info("InferenceService %s/%s ready at %s", config.namespace, config.name, url or "(no URL reported)")
    return {"url": url, "address_url": (status.get("address") or {}).get("url", ""), "name": config.name,
            "namespace": config.namespace, "action": action, "storage_uri": storage_uri, "image": image,
            "service_account": config.service_account, "generation": generation,
            "threshold": threshold["threshold"], "distance": threshold["distance"], "files": files}
