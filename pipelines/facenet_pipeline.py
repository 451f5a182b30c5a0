"""The seven-step DAG. Pipeline parameters mirror the config keys; defaults come from a config.

Parameter names: data keys as they are (``source_uri``, ``multiple``, ...),
training keys prefixed ``train_`` and evaluation keys prefixed ``eval_``
(``train_learning_rate``, ``eval_folds``), plus ``checkpoint_root`` and
``tensorboard_root`` (destinations of the train task). Each task receives only
the parameters that concern it, so the cache key of a step changes only when
its own inputs do (see README, "Caching"). `STEPS` is the one description of
the wiring: `build_pipeline` and the local rerun (`pipelines/run_local.py`)
both add tasks through `add_tasks`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

from kfp import dsl, kubernetes

from components import Images, build_components
from facenet_kfp.config import SECTIONS, PipelineConfig, field_help
from facenet_kfp.errors import FacenetError

PIPELINE_NAME = "facenet-kfp"
PIPELINE_DESCRIPTION = (
    "FaceNet face recognition: download and safely extract a face dataset (LFW by default), "
    "label identities, complete each identity to a multiple of K images, split identities "
    "into train/validation/test, train an Inception-style embedding network with online "
    "triplet mining, then choose the verification threshold and report accuracy, ROC AUC, "
    "EER and VAL@FAR.")

SECTION_PREFIX = {"data": "", "train": "train_", "evaluate": "eval_"}
# Cluster keys that are pipeline parameters: where the train task writes outside its outputs.
CLUSTER_PARAMETERS = ("checkpoint_root", "tensorboard_root")
# Config field type -> pipeline parameter type; any other field type cannot be a parameter.
PARAMETER_TYPES = {str: str, int: int, float: float, bool: bool, tuple[float, ...]: list}
SHM_PATH = "/dev/shm"
GCS_KEY_DIR = "/var/secrets/google"


def parameter_keys() -> dict[str, tuple[str, str]]:
    """{pipeline parameter name: (config section, key)}, in signature order."""
    keys = {SECTION_PREFIX[section] + f.name: (section, f.name)
            for section, prefix in SECTION_PREFIX.items() for f in dataclasses.fields(SECTIONS[section])}
    keys.update({key: ("cluster", key) for key in CLUSTER_PARAMETERS})
    return keys


def pipeline_parameters(config: PipelineConfig) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, description) of every pipeline parameter, in signature order.

    A config field whose type has no pipeline parameter type fails here, at compile time.
    """
    params = []
    for name, (section, key) in parameter_keys().items():
        kind = typing.get_type_hints(SECTIONS[section])[key]
        if kind not in PARAMETER_TYPES:
            raise FacenetError(f"config {section}.{key} has type {kind}, which has no pipeline parameter "
                               f"type; known: {', '.join(map(str, PARAMETER_TYPES))}")
        value = getattr(getattr(config, section), key)
        params.append((name, PARAMETER_TYPES[kind], list(value) if isinstance(value, tuple) else value,
                       f"{field_help(SECTIONS[section])[key]} (config: {section}.{key})"))
    return params


@dataclass(frozen=True)
class Step:
    """One task of the DAG: its component, label, input artifacts and {argument: pipeline parameter}.

    An input artifact has the name of the output that produces it (``images``
    is extract's output ``images``), so `inputs` is also the wiring.
    """
    name: str                    # key of components.build_components
    display_name: str            # starts with its position in the DAG (the run table sorts by it)
    inputs: tuple[str, ...]
    parameters: dict[str, str]


def _section(section: str, **renamed: str) -> dict[str, str]:
    prefix = SECTION_PREFIX[section]
    return {f.name: renamed.get(f.name, prefix + f.name) for f in dataclasses.fields(SECTIONS[section])}


STEPS = (
    Step("download", "1. download archive", (),
         {"source_uri": "source_uri", "sha256": "sha256", "max_download_gb": "max_download_gb"}),
    Step("extract", "2. extract images", ("archive",),
         {"shard_size_mb": "shard_size_mb", "max_skipped_fraction": "max_skipped_fraction",
          "max_expansion": "max_expansion"}),
    Step("labels", "3. label JSON", ("images",), {}),
    Step("complete", "4. complete to multiple of K", ("images", "labels"),
         {"multiple": "multiple", "min_images": "min_images", "seed": "completion_seed",
          "shard_size_mb": "shard_size_mb"}),
    Step("splits", "5. identity splits", ("labels",),
         {"train_fraction": "train_fraction", "val_fraction": "val_fraction",
          "test_fraction": "test_fraction", "seed": "split_seed"}),
    Step("train", "6. train embeddings", ("images", "completion", "labels", "splits"),
         {**_section("train"), **{key: key for key in CLUSTER_PARAMETERS}}),
    Step("evaluate", "7. threshold evaluation", ("model", "images", "splits"),
         {**_section("evaluate"), "pairs_uri": "pairs_uri", "pairs_sha256": "pairs_sha256"}),
)


def add_tasks(components: dict[str, Any], steps: tuple[Step, ...] | list[Step], values: dict[str, Any],
              artifacts: dict[str, Any]) -> dict[str, dsl.PipelineTask]:
    """Add `steps` to the pipeline being defined, in order; {step name: task}.

    `values` maps pipeline parameter names to parameter channels or constants;
    `artifacts` holds artifacts available before the first step (a rerun's
    importers) and gains every output of each added task.
    """
    tasks = {}
    for step in steps:
        task = components[step.name](**{name: artifacts[name] for name in step.inputs},
                                     **{arg: values[param] for arg, param in step.parameters.items()})
        task.set_display_name(step.display_name)
        artifacts.update(task.outputs)
        tasks[step.name] = task
    return tasks


def build_pipeline(config: PipelineConfig, images: Images, cluster: bool = True) -> Callable:
    """The KFP pipeline function with defaults from `config`.

    `cluster=False` leaves out Kubernetes settings (resources, GPUs, volumes),
    which the local runner ignores anyway.
    """
    components = build_components(images)
    params = pipeline_parameters(config)
    names = [name for name, *_ in params]

    def dag(*args: Any) -> None:
        tasks = add_tasks(components, STEPS, dict(zip(names, args)), {})
        if cluster:
            apply_cluster_settings(config, tasks)

    dag.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
        for name, kind, default, _ in params])
    dag.__annotations__ = {name: kind for name, kind, *_ in params}
    dag.__name__ = "facenet_pipeline"
    args_doc = "\n".join(f"    {name}: {desc}" for name, _, _, desc in params)
    dag.__doc__ = f"{PIPELINE_DESCRIPTION}\n\nArgs:\n{args_doc}\n"
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(dag)


def apply_cluster_settings(config: PipelineConfig, tasks: dict[str, dsl.PipelineTask]) -> None:
    """Resources, GPUs, node placement, shared memory, credentials and retries per task."""
    cluster = config.cluster
    for name in ("download", "extract", "labels", "complete", "splits"):
        _resources(tasks[name], cluster.data_cpu, cluster.data_memory)
    train, evaluate, download = tasks["train"], tasks["evaluate"], tasks["download"]
    _resources(train, cluster.train_cpu, cluster.train_memory)
    _resources(evaluate, cluster.evaluate_cpu, cluster.evaluate_memory)
    for task, gpus in ((train, cluster.train_gpus), (evaluate, cluster.evaluate_gpus)):
        if gpus > 0:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
            for key, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            if cluster.gpu_toleration:
                kubernetes.add_toleration(task, **cluster.toleration())
    for task in (train, evaluate):
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path=SHM_PATH,
                                   medium="Memory", size_limit=cluster.shm_size)
    if cluster.gcs_secret:
        # Steps that read gs:// URIs given as parameters (the archive, pairs.txt, checkpoints).
        for task in (download, train, evaluate):
            kubernetes.use_secret_as_volume(task, secret_name=cluster.gcs_secret, mount_path=GCS_KEY_DIR)
            task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/key.json")
    if cluster.download_retries:
        download.set_retry(num_retries=cluster.download_retries, backoff_duration="30s")
    if cluster.train_retries:
        train.set_retry(num_retries=cluster.train_retries, backoff_duration="60s")


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> None:
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
