"""Compile the pipeline and start a run on Kubeflow Pipelines: `python -m pipelines.submit --host URL`.

It compiles the pipeline (defaults from `--config`, as `make compile` does),
sends it inline with the run (no pipeline upload) and prints the run's URL and
id. Endpoint and authentication are kfp.Client's own: without `--host` it finds
the endpoint itself ($KF_PIPELINES_ENDPOINT, in-cluster, kubeconfig);
`--existing-token` (e.g. `gcloud auth print-access-token`), `--cookies` (e.g.
``authservice_session=...`` behind Dex/oauth2-proxy), or, since kfp.Client reads
it only when it finds no host, the projected service-account token file named
by $KF_PIPELINES_SA_TOKEN_PATH (re-read per request, as the kubelet rotates it).
`--param` values are typed and checked before anything is sent; a connection or
API error prints one line naming the host and the problem and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from facenet_kfp.errors import FacenetError, InputError
from pipelines.kfp_internals import ui_base

log = logging.getLogger(__name__)

SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_HOST = "kfp.Client's default endpoint"   # how messages name it when --host is not given
HEALTHZ_MESSAGE = "Failed to get healthz info attempt"


class SubmitError(FacenetError):
    """The KFP endpoint could not be reached or refused a request."""


def package_parameters(package: str | os.PathLike) -> set[str]:
    """Names of the root input parameters of a compiled pipeline YAML (its first document)."""
    path = Path(package)
    if not path.is_file():
        raise InputError(f"{path}: pipeline package not found")
    try:
        with path.open() as handle:
            spec = next(iter(yaml.safe_load_all(handle)), None)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict) or "root" not in spec:
        raise InputError(f"{path}: not a compiled KFP pipeline (no 'root' in the first document)")
    return set(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def run_arguments(items: list[str], package: str | os.PathLike, config_path: str | None) -> dict[str, Any]:
    """`--param` items as run arguments {pipeline parameter: value}.

    A name is a pipeline parameter (``train_learning_rate``) or its config key
    (``train.learning_rate``); the value is typed by the config field and the
    config `config_path` with the overrides applied must be valid. Every name
    must be a parameter of `package`.
    """
    from facenet_kfp.config import load_config, parse_assignments
    from pipelines.facenet_pipeline import parameter_keys

    keys = parameter_keys()
    overrides = parse_assignments(items, keys, option="--param")
    load_config(config_path, overrides)
    parameter_of = {key: name for name, key in keys.items()}
    valid = package_parameters(package)
    arguments = {}
    for section, values in overrides.items():
        for key, value in values.items():
            name = parameter_of.get((section, key))
            if name is None:
                raise InputError(f"--param {section}.{key} is compiled into the pipeline, not a run parameter; "
                                 f"set it in the config and submit again")
            if name not in valid:
                raise InputError(f"--param {name}: not a parameter of {package}; valid: {', '.join(sorted(valid))}")
            arguments[name] = list(value) if isinstance(value, tuple) else value
    return arguments


def describe_error(exc: BaseException, host: str, stage: str) -> str:
    """One line naming the host, what was being done and what went wrong."""
    import kfp_server_api
    import urllib3

    if isinstance(exc, kfp_server_api.ApiException) and exc.status:
        body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        try:   # a KFP error body: {"error", "message", "code", ...}
            parsed = json.loads(body)
            body = str(parsed.get("message") or parsed.get("error") or body) if isinstance(parsed, dict) else body
        except ValueError:
            pass
        message = " ".join(body.split())[:300]
        return (f"KFP API at {host} answered HTTP {exc.status} {exc.reason or ''}".rstrip()
                + f" while {stage}" + (f": {message}" if message else ""))
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        # "...: Failed to establish a new connection: [Errno 111] Connection refused" -> the last part
        reason = str(exc.reason).rsplit(": ", 1)[-1]
        return f"cannot reach the KFP API at {host} while {stage}: {reason}"
    return f"KFP API at {host} failed while {stage}: {getattr(exc, 'reason', None) or exc}"


@contextlib.contextmanager
def _quiet_health_retries(failures: list[BaseException]) -> Iterator[None]:
    """kfp.Client() checks GET /apis/v2beta1/healthz up to 5 times, logging a full traceback each time:
    log one line per attempt instead, and keep the exceptions so the final error can name the cause."""
    def keep(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(HEALTHZ_MESSAGE) and record.exc_info:
            failures.append(error := record.exc_info[1])
            status = getattr(error, "status", None)
            log.warning("%s (%s)", record.getMessage().rstrip("."),
                        f"HTTP {status}" if status else f"{type(error).__name__}: {error}")
            return False
        return True

    logging.getLogger().addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(keep)


def make_client(host: str | None, namespace: str | None, existing_token: str | None, cookies: str | None,
                ui_host: str | None) -> Any:
    """kfp.Client for `host` with the standard auth options (see the module docstring)."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    credentials = None
    token_path = os.environ.get(SA_TOKEN_ENV)
    if token_path and not existing_token:
        if not Path(token_path).is_file():
            raise InputError(f"{SA_TOKEN_ENV}={token_path}: token file not found")
        credentials = ServiceAccountTokenVolumeCredentials(path=token_path)
    options: dict[str, Any] = dict(host=host, existing_token=existing_token, cookies=cookies,
                                   credentials=credentials, ui_host=ui_host)
    if namespace:
        options["namespace"] = namespace
    where = host or DEFAULT_HOST
    failures: list[BaseException] = []
    with warnings.catch_warnings(), _quiet_health_retries(failures):
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
        try:
            return kfp.Client(**options)
        except Exception as exc:
            # A TimeoutError comes after the health check failed every attempt: name the last cause.
            cause, stage = ((failures[-1], f"checking GET /apis/v2beta1/healthz ({len(failures)} attempts)")
                            if isinstance(exc, TimeoutError) and failures else (exc, "connecting"))
            raise SubmitError(describe_error(cause, where, stage)) from exc


def submit(host: str | None, package: str | os.PathLike, params: dict[str, Any], *, experiment: str | None = None,
           run_name: str | None = None, namespace: str | None = None, existing_token: str | None = None,
           cookies: str | None = None, enable_caching: bool | None = None,
           ui_host: str | None = None) -> dict[str, str]:
    """Create a run of the compiled `package` on `host`; returns {"run_id", "url", "experiment_id"}.

    The pipeline spec goes inline in POST /apis/v2beta1/runs; the experiment is
    looked up by name and created when missing (kfp's create_experiment).
    `enable_caching=None` keeps the compile-time per-task setting; False turns
    caching off for every task of this run.
    """
    client = make_client(host, namespace, existing_token, cookies, ui_host)
    host = host or DEFAULT_HOST
    stage = f"creating the run (experiment {experiment or 'Default'!r})"
    import kfp_server_api
    import urllib3

    try:
        result = client.create_run_from_pipeline_package(
            str(package), arguments=params, run_name=run_name, experiment_name=experiment,
            namespace=namespace or None, enable_caching=enable_caching)
    except (ValueError, kfp_server_api.ApiException, urllib3.exceptions.HTTPError) as exc:
        # ValueError: kfp's own checks, e.g. two experiments with the same name.
        raise SubmitError(describe_error(exc, host, stage)) from exc
    return {"run_id": result.run_id, "url": f"{ui_base(client)}/#/runs/details/{result.run_id}",
            "experiment_id": getattr(result.run_info, "experiment_id", None) or ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="KFP API endpoint, e.g. http://localhost:8080 (default: "
                        "kfp.Client's: $KF_PIPELINES_ENDPOINT, else in-cluster, else kubeconfig)")
    parser.add_argument("--experiment", default=None, help="experiment name, created when missing (default: kfp's 'Default')")
    parser.add_argument("--run-name", default=None, help="run name shown in the UI (default: package name and time)")
    parser.add_argument("--config", default="configs/lfw.yaml", help="YAML config whose values become the parameter defaults")
    parser.add_argument("--package", default="build/facenet_pipeline.yaml", help="where the compiled pipeline YAML is written")
    parser.add_argument("--skip-compile", action="store_true", help="submit --package as it is, without compiling")
    parser.add_argument("--light-image", default=None, help="image of the five data steps, e.g. REGISTRY/facenet-kfp:TAG")
    parser.add_argument("--trainer-image", default=None, help="image of train and evaluate, e.g. REGISTRY/facenet-kfp-trainer:TAG")
    parser.add_argument("--param", "--set", dest="param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline parameter (repeatable), e.g. train_learning_rate=0.0005 "
                             "or train.learning_rate=0.0005")
    parser.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user deployments)")
    parser.add_argument("--existing-token", default=None, help="bearer token for the API (see also $KF_PIPELINES_SA_TOKEN_PATH)")
    parser.add_argument("--cookies", default=None, help="Cookie header for the API, e.g. authservice_session=...")
    parser.add_argument("--ui-host", default=None, help="UI base URL for the printed link (default: "
                        "$KF_PIPELINES_UI_ENDPOINT or the host)")
    parser.add_argument("--no-cache", action="store_true", help="run every task even when the cluster has a cached result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.skip_compile and not (args.light_image and args.trainer_image):
        parser.error("--light-image and --trainer-image are required unless --skip-compile")
    try:
        if not args.skip_compile:
            from pipelines.compile import compile_pipeline

            compile_pipeline(args.config, args.package, args.light_image, args.trainer_image)
            print(f"compiled {args.package} (defaults from {args.config})")
        params = run_arguments(args.param, args.package, args.config)
        run = submit(args.host, args.package, params, experiment=args.experiment, run_name=args.run_name,
                     namespace=args.namespace, existing_token=args.existing_token, cookies=args.cookies,
                     enable_caching=False if args.no_cache else None, ui_host=args.ui_host)
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run: {run['url']}")
    print(f"run id: {run['run_id']}")
    if run["experiment_id"]:
        print(f"experiment id: {run['experiment_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
