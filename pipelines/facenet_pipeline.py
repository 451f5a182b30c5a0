"""The seven-step DAG. Pipeline parameters mirror the config keys; defaults come from a config.

Parameter names: data keys as they are (``source_uri``, ``multiple``, ...),
training keys prefixed ``train_`` and evaluation keys prefixed ``eval_``
(``train_learning_rate``, ``eval_folds``), plus ``checkpoint_root`` and
``tensorboard_root`` (destinations of the train task). Each task receives only
the parameters that concern it, so the cache key of a step changes only when
its own inputs do (see README, "Caching").
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from kfp import dsl, kubernetes

from components import Images, build_components
from facenet_kfp.config import (ClusterConfig, DataConfig, EvaluateConfig, PipelineConfig,
                                TrainConfig, field_help)

PIPELINE_NAME = "facenet-kfp"
PIPELINE_DESCRIPTION = (
    "FaceNet face recognition: download and safely extract a face dataset (LFW by default), "
    "label identities, complete each identity to a multiple of K images, split identities "
    "into train/validation/test, train an Inception-style embedding network with online "
    "triplet mining, then choose the verification threshold and report accuracy, ROC AUC, "
    "EER and VAL@FAR.")

SECTION_PREFIX = {"data": "", "train": "train_", "evaluate": "eval_"}
SHM_PATH = "/dev/shm"
GCS_KEY_DIR = "/var/secrets/google"


def pipeline_parameters(config: PipelineConfig) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, description) of every pipeline parameter, in signature order."""
    params = []
    for section, cls in (("data", DataConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)):
        values = getattr(config, section)
        help_text = field_help(cls)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            value = getattr(values, f.name)
            kind = {"str": str, "int": int, "float": float, "bool": bool}.get(str(hints[f.name]), list)
            if kind is list:
                value = list(value)
            params.append((SECTION_PREFIX[section] + f.name, kind, value,
                           f"{help_text[f.name]} (config: {section}.{f.name})"))
    for key in ("checkpoint_root", "tensorboard_root"):     # destinations of the train task
        params.append((key, str, getattr(config.cluster, key),
                       f"{field_help(ClusterConfig)[key]} (config: cluster.{key})"))
    return params


def build_pipeline(config: PipelineConfig, images: Images, cluster: bool = True) -> Callable:
    """The KFP pipeline function with defaults from `config`.

    `cluster=False` leaves out Kubernetes settings (resources, GPUs, volumes),
    which the local runner ignores anyway.
    """
    steps = build_components(images)
    params = pipeline_parameters(config)
    names = [name for name, *_ in params]

    def dag(*args: Any) -> None:
        p = dict(zip(names, args))
        t = {f.name: p["train_" + f.name] for f in dataclasses.fields(TrainConfig)}
        e = {f.name: p["eval_" + f.name] for f in dataclasses.fields(EvaluateConfig)}

        download = steps["download"](source_uri=p["source_uri"], sha256=p["sha256"],
                                     max_download_gb=p["max_download_gb"])
        download.set_display_name("1. download archive")
        extract = steps["extract"](archive=download.outputs["archive"],
                                   shard_size_mb=p["shard_size_mb"],
                                   max_skipped_fraction=p["max_skipped_fraction"],
                                   max_expansion=p["max_expansion"])
        extract.set_display_name("2. extract images")
        labels = steps["labels"](images=extract.outputs["images"])
        labels.set_display_name("3. label JSON")
        complete = steps["complete"](images=extract.outputs["images"],
                                     labels=labels.outputs["labels"], multiple=p["multiple"],
                                     min_images=p["min_images"], seed=p["completion_seed"],
                                     shard_size_mb=p["shard_size_mb"])
        complete.set_display_name("4. complete to multiple of K")
        splits = steps["splits"](labels=labels.outputs["labels"],
                                 train_fraction=p["train_fraction"],
                                 val_fraction=p["val_fraction"],
                                 test_fraction=p["test_fraction"], seed=p["split_seed"])
        splits.set_display_name("5. identity splits")
        train = steps["train"](images=extract.outputs["images"],
                               completion=complete.outputs["completion"],
                               labels=labels.outputs["labels"], splits=splits.outputs["splits"],
                               checkpoint_root=p["checkpoint_root"],
                               tensorboard_root=p["tensorboard_root"], **t)
        train.set_display_name("6. train embeddings")
        evaluate = steps["evaluate"](model=train.outputs["model"],
                                     images=extract.outputs["images"],
                                     splits=splits.outputs["splits"], pairs_uri=p["pairs_uri"],
                                     pairs_sha256=p["pairs_sha256"], **e)
        evaluate.set_display_name("7. threshold evaluation")

        if cluster:
            apply_cluster_settings(config.cluster, download, extract, labels, complete, splits,
                                   train, evaluate)

    signature = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                          annotation=kind)
        for name, kind, default, _ in params])
    dag.__signature__ = signature  # type: ignore[attr-defined]
    dag.__annotations__ = {name: kind for name, kind, *_ in params}
    dag.__name__ = "facenet_pipeline"
    args_doc = "\n".join(f"    {name}: {desc}" for name, _, _, desc in params)
    dag.__doc__ = f"{PIPELINE_DESCRIPTION}\n\nArgs:\n{args_doc}\n"
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(dag)


def apply_cluster_settings(cluster: ClusterConfig, download: dsl.PipelineTask,
                           extract: dsl.PipelineTask, labels: dsl.PipelineTask,
                           complete: dsl.PipelineTask, splits: dsl.PipelineTask,
                           train: dsl.PipelineTask, evaluate: dsl.PipelineTask) -> None:
    """Resources, GPUs, node placement, shared memory, credentials and retries per task."""
    for task in (download, extract, labels, complete, splits):
        _resources(task, cluster.data_cpu, cluster.data_memory)
    _resources(train, cluster.train_cpu, cluster.train_memory)
    _resources(evaluate, cluster.evaluate_cpu, cluster.evaluate_memory)
    for task, gpus in ((train, cluster.train_gpus), (evaluate, cluster.evaluate_gpus)):
        if gpus > 0:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
            for key, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            if cluster.gpu_toleration:
                kubernetes.add_toleration(task, **cluster.gpu_toleration)
    for task in (train, evaluate):
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path=SHM_PATH,
                                   medium="Memory", size_limit=cluster.shm_size)
    if cluster.gcs_secret:
        # Steps that read gs:// URIs given as parameters (the archive, pairs.txt, checkpoints).
        for task in (download, train, evaluate):
            kubernetes.use_secret_as_volume(task, secret_name=cluster.gcs_secret,
                                            mount_path=GCS_KEY_DIR)
            task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/key.json")
    if cluster.download_retries:
        download.set_retry(num_retries=cluster.download_retries, backoff_duration="30s")
    if cluster.train_retries:
        train.set_retry(num_retries=cluster.train_retries, backoff_duration="60s")


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> None:
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
