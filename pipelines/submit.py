"""Compile the pipeline and start a run on Kubeflow Pipelines: `python -m pipelines.submit --host URL`.

The pipeline, compiled with defaults from `--config`, goes inline with the run (no upload); the run's
URL and id are printed. Endpoint and authentication are kfp.Client's: without `--host` it finds the
endpoint itself ($KF_PIPELINES_ENDPOINT, in-cluster, kubeconfig); `--existing-token`, `--cookies`
(``authservice_session=...`` behind Dex/oauth2-proxy), or the service-account token file named by
$KF_PIPELINES_SA_TOKEN_PATH (re-read per request, as the kubelet rotates it). `--param` values are
typed and checked before anything is sent; a connection or API error prints one line and exits 2.
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
from typing import Any

import kfp
import kfp_server_api
import urllib3
import yaml
from kfp.client import ServiceAccountTokenVolumeCredentials

from facenet_kfp.config import assignments_label, load_config, parse_assignments
from facenet_kfp.errors import FacenetError, InputError
from pipelines.compile import compile_pipeline, default_images, default_images_note
from pipelines.facenet_pipeline import parameter_keys
from pipelines.kfp_internals import ui_base

log = logging.getLogger(__name__)

SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_HOST = "kfp.Client's default endpoint"   # how messages name it when --host is not given


def run_arguments(items: list[str], package: str | os.PathLike, config_path: str | None) -> dict[str, Any]:
    """`--param` items as `package`'s run arguments, typed by the config fields and valid in `config_path`."""
    keys = parameter_keys()
    overrides = parse_assignments(items, keys, option="--param")
    load_config(config_path, overrides, overrides_from=assignments_label(items, "--param"))
    path = Path(package)
    if not path.is_file():
        raise InputError(f"{path}: pipeline package not found")
    try:
        spec = next(yaml.safe_load_all(path.read_text()), None)   # the pipeline spec; a platform spec may follow
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict) or "root" not in spec:
        raise InputError(f"{path}: not a compiled KFP pipeline (no 'root' in the first document)")
    valid = set(spec["root"].get("inputDefinitions", {}).get("parameters", {}))
    parameter_of = {key: name for name, key in keys.items()}
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


def package_images(package: str | os.PathLike) -> list[str]:
    """The container images a compiled pipeline names, in the order its executors list them."""
    path = Path(package)
    if not path.is_file():
        raise InputError(f"{path}: pipeline package not found")
    try:
        spec = next(yaml.safe_load_all(path.read_text()), None)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    executors = ((spec or {}).get("deploymentSpec") or {}).get("executors") or {} if isinstance(spec, dict) else {}
    images = [e.get("container", {}).get("image") for e in executors.values() if isinstance(e, dict)]
    return list(dict.fromkeys(image for image in images if isinstance(image, str)))


def check_images(images: list[str], images_exist: bool, where: str) -> None:
    """Refuse the project's default image references unless the user says they exist."""
    defaults = default_images(*images)
    if defaults and not images_exist:
        raise InputError(f"{where}: {default_images_note(defaults)}; if these images do exist in that registry, "
                         f"say so with --images-exist (make submit IMAGES_EXIST=1)")


def describe_error(exc: BaseException, host: str, stage: str) -> str:
    """One line naming the host, what was being done and what went wrong."""
    if isinstance(exc, kfp_server_api.ApiException) and exc.status:
        body = str(exc.body or "")
        with contextlib.suppress(ValueError, AttributeError):   # a KFP error body: {"error", "message", ...}
            parsed = json.loads(body)
            body = str(parsed.get("message") or parsed.get("error") or body)
        message = " ".join(body.split())[:300]
        return (f"KFP API at {host} answered HTTP {exc.status} {exc.reason or ''}".rstrip()
                + f" while {stage}" + (f": {message}" if message else ""))
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        # "...: Failed to establish a new connection: [Errno 111] Connection refused" -> the last part
        return f"cannot reach the KFP API at {host} while {stage}: {str(exc.reason).rsplit(': ', 1)[-1]}"
    return f"KFP API at {host} failed while {stage}: {getattr(exc, 'reason', None) or exc}"


def make_client(host: str | None, namespace: str | None, existing_token: str | None, cookies: str | None,
                ui_host: str | None) -> kfp.Client:
    """kfp.Client for `host` with the standard auth options (see the module docstring)."""
    credentials = None
    token_path = os.environ.get(SA_TOKEN_ENV)
    if token_path and not existing_token:   # kfp.Client reads it itself only when it finds no host
        if not Path(token_path).is_file():
            raise InputError(f"{SA_TOKEN_ENV}={token_path}: token file not found")
        credentials = ServiceAccountTokenVolumeCredentials(path=token_path)
    options = dict(host=host, existing_token=existing_token, cookies=cookies, credentials=credentials, ui_host=ui_host)
    if namespace:
        options["namespace"] = namespace
    failures: list[BaseException] = []

    def quiet_health_retry(record: logging.LogRecord) -> bool:
        """kfp.Client logs a traceback per failed health check (5 tries): log one line, keep the cause."""
        if not (record.getMessage().startswith("Failed to get healthz info attempt") and record.exc_info):
            return True
        failures.append(error := record.exc_info[1])
        status = getattr(error, "status", None)
        log.warning("%s (%s)", record.getMessage().rstrip("."),
                    f"HTTP {status}" if status else f"{type(error).__name__}: {error}")
        return False

    logging.getLogger().addFilter(quiet_health_retry)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
            return kfp.Client(**options)
    except Exception as exc:
        # A TimeoutError comes after the health check failed every attempt: name the last cause.
        cause, stage = ((failures[-1], f"checking GET /apis/v2beta1/healthz ({len(failures)} attempts)")
                        if isinstance(exc, TimeoutError) and failures else (exc, "connecting"))
        raise FacenetError(describe_error(cause, host or DEFAULT_HOST, stage)) from exc
    finally:
        logging.getLogger().removeFilter(quiet_health_retry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--host", help="KFP API endpoint, e.g. http://localhost:8080 (default: kfp.Client's, see above)")
    add("--experiment", help="experiment name, created when missing (default: kfp's 'Default')")
    add("--run-name", help="run name shown in the UI (default: package name and time)")
    add("--config", default="configs/lfw.yaml", help="YAML config whose values become the parameter defaults")
    add("--package", default="build/facenet_pipeline.yaml", help="where the compiled pipeline YAML is written")
    add("--skip-compile", action="store_true", help="submit --package as it is, without compiling")
    add("--light-image", help="image of the five data steps, e.g. REGISTRY/facenet-kfp:TAG")
    add("--trainer-image", help="image of train and evaluate, e.g. REGISTRY/facenet-kfp-trainer:TAG")
    add("--trainer-jax-image", default="", help="JAX image of a TrainJob's nodes (cluster.train_nodes above 1; "
                                                "default: the trainer image's name + -jax)")
    add("--param", "--set", dest="param", action="append", default=[], metavar="KEY=VALUE",
        help="set a run parameter (repeatable): train_learning_rate=0.0005 or train.learning_rate=0.0005")
    add("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    add("--existing-token", help="bearer token for the API (see also $KF_PIPELINES_SA_TOKEN_PATH)")
    add("--cookies", help="Cookie header for the API, e.g. authservice_session=...")
    add("--ui-host", help="UI base URL for the printed link (default: $KF_PIPELINES_UI_ENDPOINT or the host)")
    add("--no-cache", action="store_true", help="run every task even when the cluster has a cached result")
    add("--images-exist", action="store_true",
        help="the images exist in their registry (needed to submit the project's default image references)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.skip_compile and not (args.light_image and args.trainer_image):
        parser.error("--light-image and --trainer-image are required unless --skip-compile")
    try:
        if args.skip_compile:
            check_images(package_images(args.package), args.images_exist, args.package)
        else:
            check_images([args.light_image, args.trainer_image], args.images_exist, "--light-image/--trainer-image")
            compile_pipeline(args.config, args.package, args.light_image, args.trainer_image,
                             trainer_jax_image=args.trainer_jax_image)
            print(f"compiled {args.package} (defaults from {args.config})")
        params = run_arguments(args.param, args.package, args.config)
        client = make_client(args.host, args.namespace, args.existing_token, args.cookies, args.ui_host)
        try:   # the experiment is created when missing
            run = client.create_run_from_pipeline_package(
                args.package, arguments=params, run_name=args.run_name, experiment_name=args.experiment,
                namespace=args.namespace, enable_caching=False if args.no_cache else None)
        except (ValueError, kfp_server_api.ApiException, urllib3.exceptions.HTTPError) as exc:
            # ValueError: kfp's own checks, e.g. two experiments with the same name.
            stage = f"creating the run (experiment {args.experiment or 'Default'!r})"
            raise FacenetError(describe_error(exc, args.host or DEFAULT_HOST, stage)) from exc
    except (FacenetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run: {ui_base(client)}/#/runs/details/{run.run_id}\nrun id: {run.run_id}")
    if experiment_id := getattr(run.run_info, "experiment_id", None):
        print(f"experiment id: {experiment_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
