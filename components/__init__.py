"""Thin KFP components, one per pipeline step; each maps artifacts to paths and calls the library.

The functions here are plain Python; `build_components` turns them into KFP
lightweight components bound to the project's images (the light image for the
data steps, the pairs check and deploy, the trainer image for align, train and evaluate: each step's
`Policy.image` in pipelines/facenet_pipeline.py). The packages are
preinstalled in those images, so no pip install runs when a step starts. A new
step's function is one entry in `COMPONENTS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components.align import align_faces
from components.complete import complete_identities
from components.deploy import deploy_model
from components.download import download_archive
from components.evaluate import evaluate_model, evaluate_on_archive
from components.extract import extract_images
from components.labels import make_labels
from components.pairs import check_pairs
from components.splits import split_identities
from components.train import train_model, train_on_trainer

# {step name: component function}: one entry per component, in DAG order. The image each runs in is its
# step's policy (pipelines/facenet_pipeline.py STEPS).
COMPONENTS = {
    "download": download_archive,
    "extract": extract_images,
    "align": align_faces,
    "labels": make_labels,
    "complete": complete_identities,
    "splits": split_identities,
    "check_pairs": check_pairs,
    "train": train_model,
    "train_on_trainer": train_on_trainer,
    "evaluate": evaluate_model,
    "evaluate_on_archive": evaluate_on_archive,
    "deploy": deploy_model,
}


# Settings kfp passes to a component's `dsl.TaskConfig` argument (kfp >= 2.15), by step name: the train
# step that launches a Kubeflow Trainer TrainJob hands its GPUs, CPU, memory and node placement to the
# job's nodes (not to its own pod) and shares its volumes and environment with them.
PASSTHROUGHS = {
    "train_on_trainer": [
        dsl.TaskConfigField.RESOURCES,
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigField.KUBERNETES_AFFINITY,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
    ],
}


@dataclass(frozen=True)
class Images:
    """Container images the steps run in (full references, never a `latest` tag). `trainer_jax`, the JAX
    (CUDA) trainer image a Kubeflow Trainer TrainJob's nodes run, defaults to the trainer image's
    repository with ``-jax`` appended, at the same tag."""
    light: str
    trainer: str
    trainer_jax: str = ""

    def __post_init__(self) -> None:
        if not self.trainer_jax:
            repository, sep, tag = self.trainer.rpartition(":")
            if "@" in self.trainer or not sep or "/" in tag:
                raise ValueError(f"trainer image {self.trainer!r}: give the JAX trainer image too (a digest or "
                                 f"an untagged reference names no JAX image of the same tag)")
            object.__setattr__(self, "trainer_jax", f"{repository}-jax:{tag}")
        for name, ref in (("light", self.light), ("trainer", self.trainer), ("trainer_jax", self.trainer_jax)):
            tag = ref.rsplit("/", 1)[-1]
            if ":" not in tag and "@" not in ref:
                raise ValueError(f"{name} image {ref!r} has no tag; pin a version")
            if tag.endswith(":latest"):
                raise ValueError(f"{name} image {ref!r} uses the 'latest' tag; pin a version")


DEFAULT_IMAGES = Images(light="ghcr.io/facenet-kfp/facenet-kfp:0.1.0",
                        trainer="ghcr.io/facenet-kfp/facenet-kfp-trainer:0.1.0",
                        trainer_jax="ghcr.io/facenet-kfp/facenet-kfp-trainer-jax:0.1.0")


def build_components(images: Images) -> dict[str, Any]:
    """Every step as a KFP component, keyed by step name, in the image its steps' policy names
    (`pipelines.facenet_pipeline.component_images`)."""
    from pipelines.facenet_pipeline import component_images

    kinds = component_images()
    if unused := [name for name in COMPONENTS if name not in kinds]:
        raise ValueError(f"no step of pipelines/facenet_pipeline.py runs component(s) {', '.join(unused)}")
    if missing := [name for name in kinds if name not in COMPONENTS]:
        raise ValueError(f"step(s) {', '.join(missing)} have no component in components.COMPONENTS")
    return {name: dsl.component(func, base_image=getattr(images, kinds[name]), install_kfp_package=False,
                                task_config_passthroughs=PASSTHROUGHS.get(name))
            for name, func in COMPONENTS.items()}


@functools.cache
def producers(align: bool = False) -> dict[str, Any]:
    """{artifact: `facenet_kfp.runs.Producer`} of the artifacts a local rerun can import (runs.MARKERS), in
    the DAGs without (`align` False) or with face alignment: there ``images`` is the align task's output and
    extract's is ``raw_images`` (``eval_images`` and ``eval_raw_images`` likewise for an evaluation archive).
    Each artifact's producer is the first task of the DAG with an evaluation archive that outputs it."""
    from facenet_kfp.runs import MARKERS, Producer

    from pipelines.facenet_pipeline import dag_steps, task_names

    classes = {cls.schema_title: cls for cls in (dsl.Artifact, dsl.Dataset, dsl.Model)}
    components = build_components(DEFAULT_IMAGES)
    found = {}
    steps = dag_steps(evaluation_archive=True, align=align)
    for step, task in zip(steps, task_names(steps, components)):
        spec = components[step.name].component_spec
        for output, definition in spec.outputs.items():
            name = step.renamed.get(output, output)
            if name in MARKERS and name not in found:
                found[name] = Producer(step.name, task, output, classes[definition.type.split("@")[0]])
    return found
