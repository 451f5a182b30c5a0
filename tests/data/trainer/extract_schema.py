"""Extract the v1alpha1 openAPIV3Schema of a Kubeflow Trainer CRD into a gzipped JSON file.

Reproduces the schema files of this folder from the CRDs in the kubeflow/trainer repository
(SOURCE.md names the tag, commit and paths):

    git -C trainer show v2.3.0:manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml > crd.yaml
    python tests/data/trainer/extract_schema.py crd.yaml tests/data/trainer/trainjob-v1alpha1.schema.json.gz

The CRD's name is read from the file and must be one of CRD_NAMES. The output is byte-for-byte
reproducible (sorted keys, compact separators, gzip mtime 0), so a re-extraction from the same CRD
shows no diff. Needs only PyYAML; no network.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import yaml

CRD_NAMES = ("trainjobs.trainer.kubeflow.org", "clustertrainingruntimes.trainer.kubeflow.org")
VERSION = "v1alpha1"


def extract(crd_text: str, version: str = VERSION) -> tuple[str, dict]:
    """The openAPIV3Schema of one version of a Trainer CRD.

    Args:
        crd_text: the CRD file as YAML; it may start with a licence comment and `---`, and must
            hold exactly one CustomResourceDefinition document.
        version: the served version to take, e.g. "v1alpha1".
    Returns:
        (CRD name, schema as a dict: the value of spec.versions[i].schema.openAPIV3Schema).
    Raises:
        ValueError: the text does not hold exactly one CRD, the CRD is not one of CRD_NAMES, or it
            has no such version.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = [doc for doc in yaml.load_all(crd_text, Loader=loader) if doc is not None]
    crds = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1 or len(docs) != 1:
        raise ValueError(f"expected one CustomResourceDefinition document, found {len(crds)} "
                         f"among {len(docs)} documents")
    crd = crds[0]
    name = crd.get("metadata", {}).get("name")
    if name not in CRD_NAMES:
        raise ValueError(f"CRD is {name!r}, expected one of {list(CRD_NAMES)}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return name, entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise ValueError(f"CRD {name} has no version {version!r} (versions: {names})")


def encode(schema: dict) -> bytes:
    """Canonical gzipped JSON of a schema (sorted keys, no whitespace, mtime 0)."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="trainer.kubeflow.org_<plural>.yaml of the kubeflow/trainer repository")
    parser.add_argument("out", type=Path, help="output .json.gz")
    parser.add_argument("--version", default=VERSION, help=f"CRD version to extract (default {VERSION})")
    args = parser.parse_args(argv)
    raw = args.crd.read_bytes()
    name, schema = extract(raw.decode("utf-8"), args.version)
    data = encode(schema)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"crd {name} sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"schema json sha256 {hashlib.sha256(gzip.decompress(data)).hexdigest()}")
    print(f"wrote {args.out} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
