"""Extract the v1beta1 openAPIV3Schema of KServe's InferenceService CRD into a gzipped JSON file.

Reproduces inferenceservice-v1beta1.schema.json.gz from the CRD in the kserve repository
(SOURCE.md names the tag, commit and path):

    git -C kserve show v0.20.0:config/crd/full/serving.kserve.io_inferenceservices.yaml > crd.yaml
    python tests/data/kserve/extract_schema.py crd.yaml tests/data/kserve/inferenceservice-v1beta1.schema.json.gz

The output is byte-for-byte reproducible (sorted keys, compact separators, gzip mtime 0), so a
re-extraction from the same CRD shows no diff. Needs only PyYAML; no network.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import yaml

CRD_NAME = "inferenceservices.serving.kserve.io"
VERSION = "v1beta1"


def extract(crd_text: str, version: str = VERSION) -> dict:
    """The openAPIV3Schema of one version of the InferenceService CRD.

    Args:
        crd_text: the CRD as YAML (one CustomResourceDefinition document).
        version: the served version to take, e.g. "v1beta1".
    Returns:
        The schema as a dict (the value of spec.versions[i].schema.openAPIV3Schema).
    Raises:
        ValueError: the text is not the InferenceService CRD, or has no such version.
    """
    # libyaml when PyYAML has it: the CRD is about 2 MB of YAML.
    crd = yaml.load(crd_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError("not a CustomResourceDefinition document")
    name = crd.get("metadata", {}).get("name")
    if name != CRD_NAME:
        raise ValueError(f"CRD is {name!r}, expected {CRD_NAME!r}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise ValueError(f"CRD {CRD_NAME} has no version {version!r} (versions: {names})")


def encode(schema: dict) -> bytes:
    """Canonical gzipped JSON of a schema (sorted keys, no whitespace, mtime 0)."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="serving.kserve.io_inferenceservices.yaml of the kserve repository")
    parser.add_argument("out", type=Path, help="output .json.gz")
    parser.add_argument("--version", default=VERSION, help=f"CRD version to extract (default {VERSION})")
    args = parser.parse_args(argv)
    raw = args.crd.read_bytes()
    schema = extract(raw.decode("utf-8"), args.version)
    data = encode(schema)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"crd sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"schema json sha256 {hashlib.sha256(gzip.decompress(data)).hexdigest()}")
    print(f"wrote {args.out} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
