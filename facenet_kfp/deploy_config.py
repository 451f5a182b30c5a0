"""The `deploy` config section: whether the pipeline ends with a deploy step, and the InferenceService it makes.

Its checks are plain functions, so the deploy step checks its pipeline parameters with the same rules
(`DeployConfig` built from them) before it contacts a cluster. Imports nothing heavy: every config
load builds this section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from facenet_kfp.config_fields import Section, setting
from facenet_kfp.errors import InputError

# An InferenceService name: a DNS-1035 label (KServe's webhook, IsvcNameFmt). Knative, which serves it, names
# the revision's private Service <name>-predictor-00001-private, itself a label of at most 63 characters.
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 63 - len("-predictor-00001-private")
# A namespace: a DNS-1123 label; a ServiceAccount name: a DNS-1123 subdomain.
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A Kubernetes resource quantity as a pod spec takes it: "500m", "1", "1.5", "2Gi", "512M", "1e3".
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([numkMGTPE]|[KMGTPE]i|[eE][+-]?\d+)?")


def check_name(where: str, value: str) -> None:
    """InputError naming `where` unless `value` is an InferenceService name (DNS-1035 label, <= MAX_NAME)."""
    if not DNS_1035_LABEL.fullmatch(value):
        raise InputError(f"{where} must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
                         f"letter and ending with a letter or digit), got {value!r}")
    if len(value) > MAX_NAME:
        raise InputError(f"{where} must be at most {MAX_NAME} characters (Knative names a Service "
                         f"<name>-predictor-00001-private, at most 63), got {len(value)}: {value!r}")


def check_namespace(where: str, value: str) -> None:
    """InputError naming `where` unless `value` is a namespace name (DNS-1123 label, <= 63 characters)."""
    if not DNS_1123_LABEL.fullmatch(value) or len(value) > 63:
        raise InputError(f"{where} must be a DNS-1123 label (at most 63 lower-case letters, digits and '-', "
                         f"starting and ending with a letter or digit), got {value!r}")


def check_service_account(where: str, value: str) -> None:
    """InputError naming `where` unless `value` is a ServiceAccount name (DNS-1123 subdomain, <= 253)."""
    if not DNS_1123_SUBDOMAIN.fullmatch(value) or len(value) > 253:
        raise InputError(f"{where} must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.'), "
                         f"got {value!r}")


def check_quantity(where: str, value: str) -> None:
    """InputError naming `where` unless `value` is a positive Kubernetes quantity ("500m", "2Gi")."""
    match = QUANTITY.fullmatch(value)
    if not match or float(match.group(1)) == 0:
        raise InputError(f"{where} must be a positive Kubernetes quantity such as 500m, 1, 2Gi or 512M, "
                         f"got {value!r}")


@dataclass(frozen=True)
class DeployConfig(Section):
    """Step 9 (with deploy.enabled): the trained model as a KServe InferenceService."""
    NAME: ClassVar[str] = "deploy"
    enabled: bool = setting(False, "end the pipeline with a deploy step: the model folder with the evaluated "
                                   "threshold.json becomes a KServe InferenceService serving it with facenet-kfp "
                                   "serve; decides the DAG when the pipeline is compiled")
    name: str = setting("facenet", f"InferenceService name, a DNS-1035 label of at most {MAX_NAME} characters; "
                                   "its models are NAME (embeddings) and NAME-verify")
    namespace: str = setting("kubeflow-user-example-com", "namespace of the InferenceService: your Kubeflow "
                                                         "profile's (the pipeline's service account must be "
                                                         "allowed to create InferenceServices there)")
    service_account: str = setting("facenet-kfp-serving", "ServiceAccount of the predictor, whose Secrets let "
                                                          "KServe's storage initializer read the model artifact "
                                                          "(manifests/serving/stores)")
    cpu: str = setting("1", "CPU request and limit of the predictor")
    memory: str = setting("2Gi", "memory request and limit of the predictor")
    timeout_s: int = setting(600, "seconds the deploy step waits for the InferenceService to become Ready",
                             minimum=10, maximum=86_400)

    def check(self) -> None:
        check_name("deploy.name", self.name)
        check_namespace("deploy.namespace", self.namespace)
        check_service_account("deploy.service_account", self.service_account)
        check_quantity("deploy.cpu", self.cpu)
        check_quantity("deploy.memory", self.memory)
