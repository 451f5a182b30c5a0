"""Finding the Kubernetes cluster a step talks to (deploy's InferenceService, training's TrainJob).

A step inside a pod uses the pod's in-cluster service account (its token file and
$KUBERNETES_SERVICE_HOST); elsewhere a kubeconfig ($KUBECONFIG, else ~/.kube/config) or the file it was
given. `find_cluster` decides which before any client library is imported, and says what was tried when
there is none; `api_message` turns a failed API call into the status, reason and the API server's words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBECONFIG = "~/.kube/config"


def find_cluster(config_file: str | os.PathLike | None, error: type[Exception], why: str) -> tuple[bool, str]:
    """(in a pod with a service account, the kubeconfig otherwise) for `config_file` or the environment.

    Raises `error` "no Kubernetes cluster: <what was tried>; <why>" when there is neither (`why` says
    what the step needs the cluster for and how to do without).
    """
    token, host = IN_CLUSTER_TOKEN, os.environ.get("KUBERNETES_SERVICE_HOST", "")
    kubeconfig = str(config_file) if config_file else os.environ.get("KUBECONFIG", "") or DEFAULT_KUBECONFIG
    kubeconfig_files = [Path(p).expanduser() for p in kubeconfig.split(os.pathsep) if p]
    in_cluster = not config_file and token.is_file() and bool(host)
    if not in_cluster and not any(p.is_file() for p in kubeconfig_files):
        pod = ("no in-cluster service account (" + ("KUBERNETES_SERVICE_HOST is not set" if token.is_file()
               else f"{token} not found") + ")")
        where = (f"{kubeconfig} not found" if config_file else
                 f"$KUBECONFIG={kubeconfig} not found" if os.environ.get("KUBECONFIG") else
                 f"$KUBECONFIG not set and {DEFAULT_KUBECONFIG} not found")
        raise error(f"no Kubernetes cluster: {pod} and no kubeconfig ({where}); {why}")
    return in_cluster, kubeconfig


def _api_exception(exc: BaseException) -> Any | None:
    """The kubernetes ApiException that is `exc` or one of its causes, None when there is none."""
    from kubernetes.client.rest import ApiException

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ApiException):
        cause = cause.__cause__
    return cause


def api_message(exc: BaseException) -> str:
    """A failed Kubernetes API call in words: "<status> <reason>: <the API server's message>" for an
    ApiException (found as `exc` or its cause), else the exception's type and text (an unreachable server)."""
    cause = _api_exception(exc)
    if cause is None:
        inner = exc.__cause__ or exc
        return f"{type(inner).__name__}: {inner}"
    message = ""
    try:
        body = json.loads(cause.body or "{}")
        message = body.get("message", "") if isinstance(body, dict) else ""
    except (TypeError, ValueError):
        message = str(cause.body or "").strip()
    return f"{cause.status} {cause.reason}: {message or '(no message)'}"


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of the ApiException behind `exc` (itself or a cause), None when there is none."""
    cause = _api_exception(exc)
    return None if cause is None else int(cause.status)


def condition_text(conditions: list[dict[str, Any]] | None) -> str:
    """Kubernetes status conditions as "Type=Status (reason: message)", one after another."""
    parts = []
    for condition in conditions or []:
        why = ": ".join(str(condition[k]) for k in ("reason", "message") if condition.get(k))
        parts.append(f"{condition.get('type', '?')}={condition.get('status', '?')}" + (f" ({why})" if why else ""))
    return ", ".join(parts) or "no conditions reported yet"
