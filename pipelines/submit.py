"""Compile the pipeline and start a run on a Kubeflow Pipelines endpoint: `python -m pipelines.submit --host URL`.

`python -m pipelines.submit --host URL --light-image REF --trainer-image REF
[--config YAML] [--experiment NAME] [--run-name NAME] [--param key=value ...]
[--namespace NS] [--existing-token TOKEN] [--no-cache]` compiles the pipeline
(defaults from the config, as `make compile` does), sends it inline with the
run (no pipeline upload), and prints the run's URL and id.

Authentication is kfp.Client's own: `--existing-token` (a bearer token made
outside, e.g. `gcloud auth print-access-token` or a Kubeflow profile's token),
`--cookies` (e.g. `authservice_session=...` behind Dex/oauth2-proxy), or the
file named by `KF_PIPELINES_SA_TOKEN_PATH` (a projected service-account token
inside a cluster). `--param` values are checked against the compiled
pipeline's parameters before anything is sent. A connection or API error
prints one line naming the host and the problem and exits 2.
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

# kfp.Client reads this token file only when it finds no host (in-cluster mode); with a host it is passed on.
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


def _api_message(body: Any) -> str:
    """The human part of a KFP API error body ({"error", "message", "code", ...} JSON), or its start."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body or "").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        text = str(parsed.get("message") or parsed.get("error") or text)
    text = " ".join(text.split())
    return text[:300] + ("…" if len(text) > 300 else "")


def describe_error(exc: BaseException, host: str, stage: str) -> str:
    """One line naming the host, what was being done and what went wrong."""
    import kfp_server_api
    import urllib3

    if isinstance(exc, kfp_server_api.ApiException):
        if exc.status:
            message = _api_message(exc.body)
            return (f"KFP API at {host} answered HTTP {exc.status} {exc.reason or ''}".rstrip()
                    + f" while {stage}" + (f": {message}" if message else ""))
        return f"KFP API at {host} failed while {stage}: {exc.reason}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            # "...: Failed to establish a new connection: [Errno 111] Connection refused"
            reason = str(reason).rsplit(": ", 1)[-1]
        return f"cannot reach the KFP API at {host} while {stage}: {reason}"
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return f"cannot talk to the KFP API at {host} while {stage}: {exc}"
    return f"KFP API at {host} while {stage}: {exc}"


@contextlib.contextmanager
def _quiet_health_retries(failures: list[BaseException]) -> Iterator[None]:
    """Replace kfp.Client's per-attempt health-check tracebacks with one warning line each.

    kfp.Client() checks GET /apis/v2beta1/healthz up to 5 times, 5 s apart,
    logging a full traceback (`logging.exception` on the root logger) each
    time; the exceptions are collected so the final error can name the cause.
    """
    def keep(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(HEALTHZ_MESSAGE) and record.exc_info:
            failures.append(record.exc_info[1])
            log.warning("%s (%s)", record.getMessage().rstrip("."), _short(record.exc_info[1]))
            return False
        return True

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _short(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '')}".rstrip()
    return f"{type(exc).__name__}: {exc}"


def make_client(host: str | None, namespace: str | None, existing_token: str | None, cookies: str | None,
                ui_host: str | None) -> Any:
    """kfp.Client for `host` with the standard auth options; a token file from KF_PIPELINES_SA_TOKEN_PATH.

    kfp.Client only reads KF_PIPELINES_SA_TOKEN_PATH when it finds no host
    (in-cluster mode), so with an explicit host the same file is handed over
    as kfp's own ServiceAccountTokenVolumeCredentials (re-read on every request,
    as the kubelet rotates it).
    """
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
        except TimeoutError as exc:
            # Raised after the health check failed every attempt; report the last real cause.
            if failures:
                raise SubmitError(describe_error(failures[-1], where, "checking GET /apis/v2beta1/healthz "
                                                 f"({len(failures)} attempts)")) from exc
            raise SubmitError(f"KFP API at {where}: {exc}") from exc
        except Exception as exc:
            raise SubmitError(describe_error(exc, where, "connecting")) from exc


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
    try:
        result = client.create_run_from_pipeline_package(
            str(package), arguments=params, run_name=run_name, experiment_name=experiment,
            namespace=namespace or None, enable_caching=enable_caching)
    except ValueError as exc:
        # kfp's own checks, e.g. two experiments with the same name.
        raise SubmitError(f"KFP API at {host} while {stage}: {exc}") from exc
    except Exception as exc:
        import kfp_server_api
        import urllib3

        if isinstance(exc, (kfp_server_api.ApiException, urllib3.exceptions.HTTPError)):
            raise SubmitError(describe_error(exc, host, stage)) from exc
        raise
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
