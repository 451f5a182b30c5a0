"""Kubeflow Trainer manifests in manifests/trainer/: render, validate against the vendored CRDs, check contents."""

import gzip
import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml

from facenet_kfp.cli import build_parser
from tests.builders import kustomize
from tests.trainer_schema import (
    CLUSTER_TRAINING_RUNTIME,
    SCHEMA_PATHS,
    TRAINJOB,
    load_schema,
    manifest_errors,
    validate_cluster_training_runtime,
    validate_trainjob,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
TRAINER = MANIFESTS / "trainer"
TRAINER_DATA = Path(__file__).resolve().parent / "data" / "trainer"
UPSTREAM_RUNTIME = TRAINER_DATA / "jax_distributed.yaml"
RUNTIME_NAME = "facenet-kfp-jax"
TRAINJOB_NAME = "facenet-kfp-train"
TRAINER_IMAGE = "ghcr.io/facenet-kfp/facenet-kfp-trainer-jax"
DATA_CLAIM = "facenet-kfp-data"
CRD_NAMES = {TRAINJOB: "trainjobs.trainer.kubeflow.org",
             CLUSTER_TRAINING_RUNTIME: "clustertrainingruntimes.trainer.kubeflow.org"}


def _one(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _copy(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


def _node_job(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]


def _node_container(runtime: dict) -> dict:
    return _node_job(runtime)["template"]["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(TRAINER)


@pytest.fixture(scope="module")
def runtime(rendered) -> dict:
    return _one(rendered, CLUSTER_TRAINING_RUNTIME)


@pytest.fixture(scope="module")
def trainjob(rendered) -> dict:
    return _one(rendered, TRAINJOB)


@pytest.fixture(scope="module")
def upstream() -> dict:
    return yaml.safe_load(UPSTREAM_RUNTIME.read_text())


# --- the vendored files ----------------------------------------------------------------------

def test_vendored_files_match_their_source_record():
    source = (TRAINER_DATA / "SOURCE.md").read_text()
    for kind, path in SCHEMA_PATHS.items():
        digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        assert f"`{digest}`" in source, f"SOURCE.md does not record the sha256 of {path.name}"
        assert f"manifests/base/crds/trainer.kubeflow.org_{CRD_NAMES[kind].split('.')[0]}.yaml" in source
    digest = hashlib.sha256(UPSTREAM_RUNTIME.read_bytes()).hexdigest()
    assert f"`{digest}`" in source, "SOURCE.md does not record the sha256 of jax_distributed.yaml"
    assert "kubeflow/trainer" in source and "manifests/base/runtimes/jax_distributed.yaml" in source
    assert re.search(r"`[0-9a-f]{40}`", source), "SOURCE.md names no commit"
    assert "Apache License 2.0" in source
    assert "Licensed under the Apache License, Version 2.0" in UPSTREAM_RUNTIME.read_text()
    trainer = load_schema(TRAINJOB)["properties"]["spec"]["properties"]["trainer"]["properties"]
    assert {"command", "image", "numNodes", "resourcesPerNode"} <= set(trainer)
    ml_policy = load_schema(CLUSTER_TRAINING_RUNTIME)["properties"]["spec"]["properties"]["mlPolicy"]
    assert {"jax", "numNodes"} <= set(ml_policy["properties"])


@pytest.mark.parametrize("kind", sorted(SCHEMA_PATHS))
def test_extract_script_reproduces_the_vendored_file(tmp_path, kind):
    # The script's own encoding of the stored schema is byte-identical to the stored file, from a
    # CRD file laid out as upstream's: a licence comment, then `---`, then the CRD.
    spec = importlib.util.spec_from_file_location("trainer_extract_schema", TRAINER_DATA / "extract_schema.py")
    extract_schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_schema)
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": CRD_NAMES[kind]},
           "spec": {"versions": [{"name": "v1alpha1", "schema": {"openAPIV3Schema": load_schema(kind)}}]}}
    crd_path = tmp_path / "crd.yaml"
    crd_path.write_text("# Copyright The Kubeflow Authors.\n\n---\n" + json.dumps(crd))
    out = tmp_path / "schema.json.gz"
    assert extract_schema.main([str(crd_path), str(out)]) == 0
    assert out.read_bytes() == SCHEMA_PATHS[kind].read_bytes()
    with pytest.raises(ValueError, match="no version 'v1'"):
        extract_schema.extract(crd_path.read_text(), "v1")
    other = dict(crd, metadata={"name": "trainingruntimes.trainer.kubeflow.org"})
    with pytest.raises(ValueError, match="trainingruntimes.trainer.kubeflow.org"):
        extract_schema.extract(json.dumps(other))


def test_upstream_jax_runtime_validates(upstream):
    # The validator accepts what Trainer itself ships.
    validate_cluster_training_runtime(upstream)


# --- rendering and validation ----------------------------------------------------------------

def test_renders_the_runtime_and_the_trainjob(rendered):
    assert sorted((obj["kind"], obj["metadata"]["name"]) for obj in rendered) == [
        (CLUSTER_TRAINING_RUNTIME, RUNTIME_NAME), (TRAINJOB, TRAINJOB_NAME)]
    for obj in rendered:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "facenet-kfp"


def test_every_object_validates(rendered):
    validators = {TRAINJOB: validate_trainjob, CLUSTER_TRAINING_RUNTIME: validate_cluster_training_runtime}
    for obj in rendered:
        validators[obj["kind"]](obj)


def test_namespaces(runtime, trainjob):
    # The runtime is cluster-scoped; the TrainJob runs in the pipeline overlays' namespace.
    assert "namespace" not in runtime["metadata"]
    overlay = yaml.safe_load((MANIFESTS / "overlays" / "minio" / "kustomization.yaml").read_text())
    assert trainjob["metadata"]["namespace"] == overlay["namespace"]


# --- contents --------------------------------------------------------------------------------

def test_trainjob_runs_facenet_kfp_train_on_two_gpu_nodes(trainjob, runtime):
    spec = trainjob["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": CLUSTER_TRAINING_RUNTIME,
                                  "name": RUNTIME_NAME}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2
    assert trainer["command"][:2] == ["facenet-kfp", "train"]
    assert trainer["image"] == _node_container(runtime)["image"]
    assert trainer["image"].startswith(TRAINER_IMAGE + ":")
    resources = trainer["resourcesPerNode"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_trainjob_command_is_one_the_cli_accepts(trainjob, runtime):
    args = build_parser().parse_args(trainjob["spec"]["trainer"]["command"][1:])
    assert args.command == "train"
    mounts = [PurePosixPath(m["mountPath"]) for m in _node_container(runtime)["volumeMounts"]]
    paths = [getattr(args, name) for name in (*args.path_inputs, *args.path_outputs)]
    paths = [PurePosixPath(p) for p in paths if p is not None]
    assert len(paths) == 6  # four input folders, --out, --checkpoint-dir
    for path in paths:
        assert any(path.is_relative_to(mount) for mount in mounts), f"{path} is on no volume of the runtime"


def test_runtime_sets_what_jax_distributed_sets(runtime, upstream):
    assert runtime["metadata"]["name"] == RUNTIME_NAME
    # The framework label: the Kubeflow SDK lists runtimes by it.
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == \
        upstream["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "jax"
    # The JAX plugin (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, one process per node).
    assert runtime["spec"]["mlPolicy"] == upstream["spec"]["mlPolicy"] == {"numNodes": 1, "jax": {}}
    # The replicated job and container Trainer applies spec.trainer to.
    ours, theirs = _node_job(runtime), _node_job(upstream)
    assert [job["name"] for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]] == [theirs["name"]]
    assert ours["template"]["metadata"]["labels"] == theirs["template"]["metadata"]["labels"]
    assert [c["name"] for c in ours["template"]["spec"]["template"]["spec"]["containers"]] == \
        [c["name"] for c in theirs["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]
    # Nothing else at the top of the spec (no podGroupPolicy, no other JobSet settings).
    assert set(runtime["spec"]) == set(upstream["spec"])
    assert set(runtime["spec"]["template"]["spec"]) == set(upstream["spec"]["template"]["spec"])


def test_runtime_selects_the_jax_backend_and_mounts_the_data(runtime):
    container = _node_container(runtime)
    assert {"name": "KERAS_BACKEND", "value": "jax"} in container["env"]
    pod = _node_job(runtime)["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert sorted(mounts) == ["/data", "/dev/shm"]
    assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == DATA_CLAIM
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"      # the input workers' shared memory


def test_image_is_set_with_the_images_transformer(tmp_path):
    folder = tmp_path / "trainer"
    shutil.copytree(TRAINER, folder)
    kustomization = folder / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    data["images"][0].update(newName="registry.example.com/team/trainer", newTag="9.9.9")
    kustomization.write_text(yaml.safe_dump(data, sort_keys=False))
    objects = kustomize(folder)
    image = "registry.example.com/team/trainer:9.9.9"
    assert _one(objects, TRAINJOB)["spec"]["trainer"]["image"] == image
    assert _node_container(_one(objects, CLUSTER_TRAINING_RUNTIME))["image"] == image


# --- the validator rejects broken objects ----------------------------------------------------

BROKEN = {
    "numNodes as a string": (
        TRAINJOB, lambda o: o["spec"]["trainer"].update(numNodes="2"),
        "spec.trainer.numNodes: '2' is not of type 'integer'"),
    "command not a list": (
        TRAINJOB, lambda o: o["spec"]["trainer"].update(command="facenet-kfp train"),
        "spec.trainer.command: 'facenet-kfp train' is not of type 'array'"),
    "unknown trainer field": (
        TRAINJOB, lambda o: o["spec"]["trainer"].update(numProcesses=2),
        "spec.trainer: Additional properties are not allowed ('numProcesses' was unexpected)"),
    "runtimeRef without a name": (
        TRAINJOB, lambda o: o["spec"]["runtimeRef"].pop("name"),
        "spec.runtimeRef: 'name' is a required property"),
    "GPU count not a quantity": (
        TRAINJOB, lambda o: o["spec"]["trainer"]["resourcesPerNode"]["limits"].update({"nvidia.com/gpu": "one"}),
        "spec.trainer.resourcesPerNode.limits.nvidia.com/gpu: 'one' does not match"),
    "TrainJob name not an RFC 1035 label": (
        TRAINJOB, lambda o: o["metadata"].update(name="1-facenet"),
        "metadata.name: '1-facenet' does not match"),
    "wrong apiVersion": (
        TRAINJOB, lambda o: o.update(apiVersion="kubeflow.org/v1"),
        "apiVersion: expected 'trainer.kubeflow.org/v1alpha1'"),
    "mlPolicy numNodes as a string": (
        CLUSTER_TRAINING_RUNTIME, lambda o: o["spec"]["mlPolicy"].update(numNodes="1"),
        "spec.mlPolicy.numNodes: '1' is not of type 'integer'"),
    "misspelt container field": (
        CLUSTER_TRAINING_RUNTIME, lambda o: _node_container(o).update(volumeMount=[]),
        "spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0]: "
        "Additional properties are not allowed ('volumeMount' was unexpected)"),
    "two framework policies": (
        CLUSTER_TRAINING_RUNTIME, lambda o: o["spec"]["mlPolicy"].update(torch={}),
        "spec.mlPolicy: Only one of the policy can be configured (has torch, jax)"),
    "namespace on the cluster-scoped runtime": (
        CLUSTER_TRAINING_RUNTIME, lambda o: o["metadata"].update(namespace="kubeflow"),
        "metadata: Additional properties are not allowed ('namespace' was unexpected)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_rejects_broken_object(runtime, trainjob, case):
    kind, change, expected = BROKEN[case]
    obj = _copy(trainjob if kind == TRAINJOB else runtime)
    change(obj)
    validate = validate_trainjob if kind == TRAINJOB else validate_cluster_training_runtime
    with pytest.raises(AssertionError) as raised:
        validate(obj)
    assert expected in str(raised.value)
    assert kind in str(raised.value)


def test_validation_reports_every_error_with_its_path(trainjob):
    obj = _copy(trainjob)
    obj["spec"]["trainer"]["numNodes"] = "two"
    obj["spec"]["runtimeRef"]["kind"] = 7
    errors = manifest_errors(obj, TRAINJOB)
    assert [e.split(":")[0] for e in errors] == ["spec.runtimeRef.kind", "spec.trainer.numNodes"]


def test_validation_rejects_the_other_kind(runtime, trainjob):
    with pytest.raises(AssertionError, match="kind: expected 'TrainJob', got 'ClusterTrainingRuntime'"):
        validate_trainjob(runtime)
    with pytest.raises(AssertionError, match="kind: expected 'ClusterTrainingRuntime', got 'TrainJob'"):
        validate_cluster_training_runtime(trainjob)


# --- documentation ---------------------------------------------------------------------------

def test_readme_documents_the_trainer_manifests(runtime, trainjob):
    readme = (TRAINER / "README.md").read_text()
    for text in ("kubectl kustomize manifests/trainer", "kubectl apply -k manifests/trainer", RUNTIME_NAME,
                 DATA_CLAIM, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 trainjob["metadata"]["namespace"]):
        assert text in readme, f"manifests/trainer/README.md does not mention {text}"
    # Each file list is a block that opens with its folder, one "  name.yaml ..." line per file.
    blocks = dict(re.findall(r"^(manifests/trainer/(?:pipeline/)?)\n((?:  .*\n)+)", readme, flags=re.MULTILINE))
    assert sorted(blocks) == ["manifests/trainer/", "manifests/trainer/pipeline/"]
    for folder, block in blocks.items():
        listed = set(re.findall(r"^  ([\w.-]+\.yaml)\b", block, flags=re.MULTILINE))
        assert listed == {p.name for p in (TRAINER.parent.parent / folder).glob("*.yaml")}, (
            f"the README's file list of {folder} is not the folder's")
