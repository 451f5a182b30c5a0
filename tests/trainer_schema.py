"""Validate Kubeflow Trainer TrainJobs and ClusterTrainingRuntimes against the CRD schemas in tests/data/trainer/, offline.

`validate_trainjob(obj)` and `validate_cluster_training_runtime(obj)` check a manifest (a dict, as
parsed from YAML or built in Python) the way a cluster with Kubeflow Trainer v2.3.0 would before
admitting it:

- the v1alpha1 `openAPIV3Schema` of the CRD (see tests/data/trainer/SOURCE.md): types, required
  fields, enums, quantity patterns;
- unknown fields are errors, as with kubectl's default strict field validation (the same strict
  reading as tests/kserve_schema.py);
- `metadata` as the API server reads it, plus the CRDs' CEL rules that can fail on a new object:
  a TrainJob's name is an RFC 1035 label of at most 63 characters; a ClusterTrainingRuntime is
  cluster-scoped (no namespace), its name a DNS subdomain, and its mlPolicy sets at most one
  framework policy. The CEL rules about updates (`self == oldSelf`) do not apply to a manifest.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import jsonschema

from tests.kserve_schema import OBJECT_META_SCHEMA, _path, _strict

DATA = Path(__file__).resolve().parent / "data" / "trainer"
API_VERSION = "trainer.kubeflow.org/v1alpha1"
TRAINJOB = "TrainJob"
CLUSTER_TRAINING_RUNTIME = "ClusterTrainingRuntime"
SCHEMA_PATHS = {
    TRAINJOB: DATA / "trainjob-v1alpha1.schema.json.gz",
    CLUSTER_TRAINING_RUNTIME: DATA / "clustertrainingruntime-v1alpha1.schema.json.gz",
}
# The framework policies of spec.mlPolicy, of which the CRD's CEL rule allows at most one.
ML_POLICIES = ("torch", "mpi", "jax", "xgboost", "flux")

# TrainJob: the CRD's CEL rules on metadata.name are those of an RFC 1035 label, as
# OBJECT_META_SCHEMA's name. A cluster-scoped object's name is a DNS subdomain and has no namespace.
_CLUSTER_META_SCHEMA = {
    **OBJECT_META_SCHEMA,
    "properties": {
        **{key: value for key, value in OBJECT_META_SCHEMA["properties"].items() if key != "namespace"},
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
    },
}
_META_SCHEMAS = {TRAINJOB: OBJECT_META_SCHEMA, CLUSTER_TRAINING_RUNTIME: _CLUSTER_META_SCHEMA}


@functools.lru_cache(maxsize=None)
def load_schema(kind: str) -> dict:
    """The vendored CRD schema of `kind` (TrainJob or ClusterTrainingRuntime) exactly as stored."""
    return json.loads(gzip.decompress(SCHEMA_PATHS[kind].read_bytes()))


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _strict(load_schema(kind))
    schema["properties"]["metadata"] = _META_SCHEMAS[kind]
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    # Kubernetes' structural schemas are OpenAPI 3.0, whose keywords are JSON Schema draft 4's.
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _cel_errors(obj: dict, kind: str) -> list[str]:
    """The CRD's CEL rules that jsonschema cannot express and a new object can break."""
    if kind != CLUSTER_TRAINING_RUNTIME:
        return []
    ml_policy = (obj.get("spec") or {}).get("mlPolicy")
    if not isinstance(ml_policy, dict):
        return []
    present = [name for name in ML_POLICIES if name in ml_policy]
    if len(present) > 1:
        return [f"spec.mlPolicy: Only one of the policy can be configured (has {', '.join(present)})"]
    return []


def manifest_errors(obj: dict, kind: str) -> list[str]:
    """Every schema error of a Trainer object as "path: message", sorted by path.

    Args:
        obj: the manifest as a dict (apiVersion, kind, metadata, spec).
        kind: the kind it must be: "TrainJob" or "ClusterTrainingRuntime".
    Returns:
        One line per error; empty when the manifest is valid.
    Raises:
        KeyError: `kind` is not one of the two.
    """
    SCHEMA_PATHS[kind]  # noqa: B018 - an unknown kind is the caller's error, not the manifest's
    if not isinstance(obj, dict):
        return [f"(top level): expected a mapping, got {type(obj).__name__}"]
    errors = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: expected {API_VERSION!r}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != kind:
        errors.append(f"kind: expected {kind!r}, got {obj.get('kind')!r}")
    for error in _validator(kind).iter_errors(obj):
        errors.append(f"{_path(error)}: {error.message}")
    errors.extend(_cel_errors(obj, kind))
    return sorted(errors)


def _validate(obj: dict, kind: str) -> None:
    errors = manifest_errors(obj, kind)
    if errors:
        name = (obj.get("metadata") or {}).get("name") if isinstance(obj, dict) else None
        raise AssertionError(f"{kind} {name!r} does not validate against the Kubeflow Trainer "
                             f"v1alpha1 schema:\n  " + "\n  ".join(errors))


def validate_trainjob(obj: dict) -> None:
    """Check a TrainJob manifest against Kubeflow Trainer's v1alpha1 CRD schema (strict, offline).

    Args:
        obj: the manifest as a dict, e.g. a document of `kubectl kustomize` output.
    Raises:
        AssertionError: the manifest is not a valid TrainJob; the message names the object and
            lists each error as "path: message" (e.g. "spec.trainer.numNodes: 'two' is not of
            type 'integer'").
    """
    _validate(obj, TRAINJOB)


def validate_cluster_training_runtime(obj: dict) -> None:
    """Check a ClusterTrainingRuntime manifest against Kubeflow Trainer's v1alpha1 CRD schema (strict, offline).

    Args:
        obj: the manifest as a dict, e.g. a document of `kubectl kustomize` output.
    Raises:
        AssertionError: the manifest is not a valid ClusterTrainingRuntime; the message names the
            object and lists each error as "path: message".
    """
    _validate(obj, CLUSTER_TRAINING_RUNTIME)
