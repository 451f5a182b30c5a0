"""Validate a KServe InferenceService against the CRD schema vendored in tests/data/kserve/, offline.

`validate_inference_service(obj)` checks a manifest (a dict, as parsed from YAML or built in Python)
the way a cluster with KServe would before admitting it:

- the v1beta1 `openAPIV3Schema` of the InferenceService CRD (KServe v0.20.0, see
  tests/data/kserve/SOURCE.md): types, required fields, enums, quantity patterns;
- unknown fields are errors, as with kubectl's default strict field validation (the API server
  would otherwise drop them silently): every object schema with `properties` and without
  `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`;
- `metadata` as the API server reads it (the CRD leaves it to ObjectMeta): a name KServe accepts
  (`[a-z]([-a-z0-9]*[a-z0-9])?`, its webhook's IsvcNameFmt), string labels and annotations.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"

# KServe's webhook: IsvcNameFmt in pkg/apis/serving/v1beta1/inference_service_validation.go.
ISVC_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The ObjectMeta fields a manifest may carry (k8s.io/apimachinery ObjectMeta).
OBJECT_META_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": ISVC_NAME_PATTERN, "maxLength": 63},
        "namespace": {"type": "string"},
        "generateName": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
}


def _strict(node: dict) -> dict:
    """A copy of an OpenAPI v3 schema node with unknown fields refused and `nullable` as JSON Schema's null."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The vendored CRD schema exactly as stored (tests/data/kserve/, see SOURCE.md)."""
    return json.loads(gzip.decompress(SCHEMA_PATH.read_bytes()))


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = _strict(load_schema())
    schema["properties"]["metadata"] = OBJECT_META_SCHEMA
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    # Kubernetes' structural schemas are OpenAPI 3.0, whose keywords are JSON Schema draft 4's.
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _path(error: jsonschema.ValidationError) -> str:
    """`spec.predictor.containers[0].ports[0].containerPort` for an error's location."""
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def inference_service_errors(obj: dict) -> list[str]:
    """Every schema error of an InferenceService as "path: message", sorted by path.

    Args:
        obj: the manifest as a dict (apiVersion, kind, metadata, spec).
    Returns:
        One line per error; empty when the manifest is valid.
    """
    errors = []
    if not isinstance(obj, dict):
        return [f"(top level): expected a mapping, got {type(obj).__name__}"]
    if obj.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: expected {API_VERSION!r}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != KIND:
        errors.append(f"kind: expected {KIND!r}, got {obj.get('kind')!r}")
    for error in _validator().iter_errors(obj):
        errors.append(f"{_path(error)}: {error.message}")
    return sorted(errors)


def validate_inference_service(obj: dict) -> None:
    """Check an InferenceService manifest against KServe's v1beta1 CRD schema (strict, offline).

    Args:
        obj: the manifest as a dict, e.g. a document of `kubectl kustomize` output or an object
            built in Python.
    Raises:
        AssertionError: the manifest is not a valid InferenceService; the message names the
            object and lists each error as "path: message" (e.g.
            "spec.predictor.containers[0].ports[0].containerPort: 'x' is not of type 'integer'").
    """
    errors = inference_service_errors(obj)
    if errors:
        name = (obj.get("metadata") or {}).get("name") if isinstance(obj, dict) else None
        raise AssertionError(f"InferenceService {name!r} does not validate against the KServe "
                             f"v1beta1 schema:\n  " + "\n  ".join(errors))
