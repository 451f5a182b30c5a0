"""The eight-step DAG (with face alignment an align step after each extract, with deploy a deploy
step last). Pipeline parameters mirror the config keys (`facenet_kfp.config.parameter_keys`);
defaults come from a config. Each task receives only the parameters that concern it, so the cache
key of a step changes only when its own inputs do (see README, "Caching"). `STEPS` is the one
description of the wiring: `build_pipeline` and the local rerun (`pipelines/run_local.py`) both
add tasks through `add_tasks`.

pairs.txt is fetched and checked against the images it names by its own
task ("check pairs"), right after the extract of the archive it refers to;
training waits for it, so a bad pairs file fails the run before training.
Evaluation reads the checked copy.

Each step carries its cluster policy (`Policy`: image, resources, retries,
credentials, shared memory), which `apply_cluster_settings` applies; the DAGs
with face alignment (`ALIGNMENT`: config data.align), with a deploy step
(`DEPLOYMENT`: config deploy.enabled) and with a separate evaluation archive
(`EVALUATION_ARCHIVE`) are `STEPS` edited by step name, and combine. Adding a step is a row in `STEPS` and its component
(``components/<name>.py``, registered in ``components.COMPONENTS``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from kfp import dsl, kubernetes

from components import Images, build_components
from facenet_kfp.trainjob import VOLUME_DIR
from facenet_kfp.config import (CLUSTER_PARAMETERS, EVAL_PARAMETERS, ClusterConfig, PipelineConfig, parameter_keys,
                                pipeline_parameters)

PIPELINE_NAME = "facenet-kfp"
PIPELINE_DESCRIPTION = (
    "FaceNet face recognition: download and safely extract a face dataset (LFW by default), "
    "label identities, complete each identity to a multiple of K images, split identities "
    "into train/validation/test, train an Inception-style embedding network with online "
    "triplet mining, then choose the verification threshold and report accuracy, ROC AUC, "
    "EER and VAL@FAR.")

SHM_PATH = "/dev/shm"
GCS_KEY_DIR = "/var/secrets/google"


@dataclass(frozen=True)
class Resources:
    """The `config.cluster` fields that give a task's CPU and memory (request = limit) and GPUs."""
    cpu: str
    memory: str
    gpus: str = ""     # "": never a GPU


# Resources classes a step's `Policy.resources` names.
RESOURCES = {
    "data": Resources("data_cpu", "data_memory"),
    "train": Resources("train_cpu", "train_memory", "train_gpus"),
    "evaluate": Resources("evaluate_cpu", "evaluate_memory", "evaluate_gpus"),
    "align": Resources("align_cpu", "align_memory", "align_gpus"),
}
_CLUSTER_FIELDS = frozenset(f.name for f in dataclasses.fields(ClusterConfig))
_IMAGE_KINDS = tuple(f.name for f in dataclasses.fields(Images))


@dataclass(frozen=True)
class Policy:
    """How a step's task runs on a cluster (`apply_cluster_settings`); the default is a data step's.

    A task with GPUs (its resources class names a GPU field, set above 0) also
    gets the accelerator type, the GPU node selector and the GPU toleration.
    """
    image: str = "light"       # field of `components.Images` its component runs in: light or trainer
    resources: str = "data"    # key of RESOURCES
    retries: str = ""          # config.cluster field with its task-level retries; "": none
    backoff: str = ""          # wait before a retry, with `retries`
    gcs: bool = False          # reads gs:// URIs given as parameters: mounts cluster.gcs_secret's key.json
    shm: bool = False          # a memory-backed /dev/shm of cluster.shm_size (TensorFlow's input workers)
    volume: bool = False       # mounts cluster.train_volume at trainjob.VOLUME_DIR (shared with a TrainJob)

    def __post_init__(self) -> None:
        if self.image not in _IMAGE_KINDS:
            raise ValueError(f"policy image {self.image!r}: use one of {', '.join(_IMAGE_KINDS)}")
        if self.resources not in RESOURCES:
            raise ValueError(f"policy resources {self.resources!r}: use one of {', '.join(RESOURCES)}")
        if self.retries and self.retries not in _CLUSTER_FIELDS:
            raise ValueError(f"policy retries {self.retries!r} is no config.cluster field")
        if bool(self.retries) != bool(self.backoff):
            raise ValueError("policy retries and backoff go together")


@dataclass(frozen=True)
class Step:
    """One task of the DAG: its component, label, input artifacts and {argument: pipeline parameter}.

    An input artifact has the name of the output that produces it (``images``
    is extract's output ``images``), so `inputs` is also the wiring; `renamed`
    gives other names where a component runs twice (the evaluation archive's
    ``eval_images``). `after` names artifacts whose producing tasks must finish
    before this one starts though it does not read them (train waits for the
    pairs check, so a bad pairs file fails before training); it does not enter
    the cache key. `policy`: how its task runs on a cluster. `images` gives
    arguments the reference of a `components.Images` image, compiled in (deploy's
    predictor runs the trainer image). `cache`: False for a step whose effect is
    outside its outputs (deploy), so that it runs every time.
    """
    name: str                    # key of components.COMPONENTS
    display_name: str            # starts with its position in the DAG (the run table sorts by it)
    inputs: tuple[str, ...]
    parameters: dict[str, str]
    constants: dict[str, Any] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)   # {argument or output: artifact name}
    after: tuple[str, ...] = ()
    policy: Policy = Policy()
    rerunnable: bool = False     # `make rerun STEP=<name>` runs it alone on an earlier run's artifacts
    images: dict[str, str] = field(default_factory=dict)    # {argument: components.Images field}
    cache: bool = True


def _section(section: str) -> dict[str, str]:
    """{key: pipeline parameter} of every key of a config section."""
    return {key: name for name, (s, key) in parameter_keys().items() if s == section}


STEPS = (
    Step("download", "1. download archive", (),
         {"source_uri": "source_uri", "sha256": "sha256", "max_download_gb": "max_download_gb"},
         policy=Policy(retries="download_retries", backoff="30s", gcs=True)),
    Step("extract", "2. extract images", ("archive",),
         {"shard_size_mb": "shard_size_mb", "max_skipped_fraction": "max_skipped_fraction",
          "max_expansion": "max_expansion"}),
    Step("labels", "3. label JSON", ("images",), {}, rerunnable=True),
    Step("complete", "4. complete to multiple of K", ("images", "labels"),
         {"multiple": "multiple", "min_images": "min_images", "seed": "completion_seed",
          "shard_size_mb": "shard_size_mb"}, rerunnable=True),
    Step("splits", "5. identity splits", ("labels",),
         {"train_fraction": "train_fraction", "val_fraction": "val_fraction",
          "test_fraction": "test_fraction", "seed": "split_seed"}, {"test_split": True}, rerunnable=True),
    Step("check_pairs", "6. check pairs.txt", ("images",),
         {"pairs_uri": "pairs_uri", "pairs_sha256": "pairs_sha256"}, policy=Policy(gcs=True)),
    Step("train", "7. train embeddings", ("images", "completion", "labels", "splits"),
         {**_section("train"), **{key: key for key in CLUSTER_PARAMETERS}}, after=("pairs",),
         policy=Policy(image="trainer", resources="train", retries="train_retries", backoff="60s", gcs=True,
                       shm=True), rerunnable=True),
    Step("evaluate", "8. threshold evaluation", ("model", "images", "splits", "pairs"), _section("evaluate"),
         policy=Policy(image="trainer", resources="evaluate", gcs=True, shm=True), rerunnable=True),
)


@dataclass(frozen=True)
class Branch:
    """Another DAG as edits of a step list by step name (never by position), so a step added to
    `STEPS` stays in it unless an edit names it.

    `replace` gives, per step name, the fields of its stand-in (`dataclasses.replace`: the
    stand-in keeps the rest, its policy included); `insert` gives, per step name, the steps that
    follow it (after its stand-in, if it has one). Each name must be that of exactly one step.
    """
    replace: dict[str, dict[str, Any]] = field(default_factory=dict)
    insert: dict[str, tuple[Step, ...]] = field(default_factory=dict)

    def apply(self, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        for name in (*self.replace, *self.insert):
            if (count := sum(step.name == name for step in steps)) != 1:
                raise ValueError(f"the branch edits step {name!r}, which the steps hold {count} times")
        edited: list[Step] = []
        for step in steps:
            edited.append(dataclasses.replace(step, **self.replace[step.name]) if step.name in self.replace
                          else step)
            edited.extend(self.insert.get(step.name, ()))
        return tuple(edited)


def step_named(name: str, steps: tuple[Step, ...] = STEPS) -> Step:
    """The one step of `steps` called `name`."""
    found = [step for step in steps if step.name == name]
    if len(found) != 1:
        raise ValueError(f"{len(found)} steps are called {name!r}")
    return found[0]


# With a separate evaluation archive (config data.eval_source_uri decides at compile time): its download
# and extract after the training archive's, splits without a test split, the pairs check on its images,
# and evaluation on it.
EVAL_BRANCH = (
    dataclasses.replace(step_named("download"), display_name="1. download evaluation archive",
                        parameters={"source_uri": "eval_source_uri", "sha256": "eval_sha256",
                                    "max_download_gb": "max_download_gb"},
                        renamed={"archive": "eval_archive"}),
    dataclasses.replace(step_named("extract"), display_name="2. extract evaluation images",
                        renamed={"archive": "eval_archive", "images": "eval_images"}),
)
EVALUATION_ARCHIVE = Branch(
    replace={
        "splits": {"constants": {"test_split": False}},
        "check_pairs": {"display_name": "6. check pairs.txt on the evaluation archive",
                        "renamed": {"images": "eval_images"}},
        "evaluate": {"name": "evaluate_on_archive", "display_name": "8. evaluation on the evaluation archive",
                     "inputs": ("model", "images", "splits", "eval_images", "pairs")},
    },
    insert={"extract": EVAL_BRANCH},
)


# With face alignment (config data.align other than none decides at compile time): an align step after
# each extract, which reads extract's images under another name and gives the aligned ones the name
# every later step reads, so labels, completion, training and evaluation see aligned faces only.
ALIGN = Step("align", "2a. align faces", ("raw_images",),
             {"size": "align_size", "max_fallback_fraction": "max_align_fallback_fraction"},
             policy=Policy(image="trainer", resources="align"), rerunnable=True)
ALIGNMENT = Branch(replace={"extract": {"renamed": {"images": "raw_images"}}}, insert={"extract": (ALIGN,)})
# Both: the evaluation archive's download, extract and align follow the training archive's align.
EVALUATION_ARCHIVE_ALIGNED = Branch(replace=EVALUATION_ARCHIVE.replace, insert={"align": (
    EVAL_BRANCH[0],
    dataclasses.replace(EVAL_BRANCH[1], renamed={"archive": "eval_archive", "images": "eval_raw_images"}),
    dataclasses.replace(ALIGN, display_name="2a. align faces of the evaluation archive",
                        renamed={"raw_images": "eval_raw_images", "images": "eval_images"}),
)})


# With a deploy step (config deploy.enabled decides at compile time): after evaluation (on the evaluation
# archive too), the model and its evaluated threshold become an InferenceService. It runs in the trainer
# image (the kserve SDK is in the train extra, beside the model server the InferenceService runs) with
# the data steps' resources; the predictor runs the trainer image too, compiled in. Never cached: its
# effect is on the cluster, which a cache hit would not check.
DEPLOY = Step("deploy", "9. deploy model", ("model", "threshold"),
              _section("deploy"), images={"image": "trainer"}, cache=False, policy=Policy(image="trainer"))
DEPLOYMENT = Branch(insert={"evaluate": (DEPLOY,)})


# With training on several nodes (config cluster.train_nodes above 1 decides at compile time): the train
# step launches a Kubeflow Trainer TrainJob and waits for it. Its task passes its GPUs, CPU, memory and
# node placement through to the job's nodes (components.PASSTHROUGHS) instead of holding them, mounts
# cluster.train_volume (shared with the nodes), and compiles in the runtime and the JAX trainer image.
def trainjob_branch(runtime: str) -> Branch:
    """The TrainJob DAG's edit: the train step on `runtime` (cluster.train_runtime, compiled in)."""
    return Branch(replace={"train": {
        "name": "train_on_trainer", "display_name": "7. train embeddings (Kubeflow Trainer TrainJob)",
        "constants": {"train_runtime": runtime}, "images": {"image": "trainer_jax"},
        "policy": dataclasses.replace(step_named("train").policy, shm=False, volume=True)}})


def steps_for(config: PipelineConfig) -> tuple[Step, ...]:
    """The DAG's steps in order: `STEPS`, with face alignment its align steps, with an evaluation archive
    its branch and evaluation on it, with deploy its deploy step, training on several nodes its TrainJob."""
    return dag_steps(bool(config.data.eval_source_uri), config.data.align != "none", config.deploy.enabled,
                     config.cluster.train_runtime if config.cluster.train_nodes > 1 else None)


def dag_steps(evaluation_archive: bool, align: bool = False, deploy: bool = False,
              trainjob: str | None = None) -> tuple[Step, ...]:
    """`STEPS`, with `align` an align step after each extract, with `deploy` a deploy step after evaluate,
    with `evaluation_archive` the evaluation archive's branch, with `trainjob` (a runtime's name) training
    as a TrainJob on that runtime."""
    steps = ALIGNMENT.apply(STEPS) if align else STEPS
    if trainjob is not None:
        steps = trainjob_branch(trainjob).apply(steps)
    if deploy:
        steps = DEPLOYMENT.apply(steps)
    if evaluation_archive:
        steps = (EVALUATION_ARCHIVE_ALIGNED if align else EVALUATION_ARCHIVE).apply(steps)
    return steps


def component_images() -> dict[str, str]:
    """{component name: the `components.Images` field it runs in}, from the policies of the steps of every
    DAG; a component runs in one image, so steps that share it must agree."""
    images: dict[str, str] = {}
    every = [step for archive in (False, True) for align in (False, True) for deploy in (False, True)
             for trainjob in (None, "runtime") for step in dag_steps(archive, align, deploy, trainjob)]
    for step in every:
        if images.setdefault(step.name, step.policy.image) != step.policy.image:
            raise ValueError(f"steps of component {step.name!r} name two images: "
                             f"{images[step.name]} and {step.policy.image}")
    return images


def task_names(steps: tuple[Step, ...] | list[Step], components: dict[str, Any]) -> list[str]:
    """The kfp task name of each of `steps` added in order: its component's name, and for the second and
    later uses of one component ``-2``, ``-3``... (as kfp names them: the evaluation archive's
    ``extract-images-2``)."""
    used: dict[str, int] = {}
    names = []
    for step in steps:
        base = components[step.name].component_spec.name
        used[base] = used.get(base, 0) + 1
        names.append(base if used[base] == 1 else f"{base}-{used[base]}")
    return names


def add_tasks(components: dict[str, Any], steps: tuple[Step, ...] | list[Step], values: dict[str, Any],
              artifacts: dict[str, Any], images: Images | None = None) -> list[tuple[Step, dsl.PipelineTask]]:
    """Add `steps` to the pipeline being defined, in order; [(step, task)].

    `values` maps pipeline parameter names to parameter channels or constants;
    `artifacts` holds artifacts available before the first step (a rerun's
    importers) and gains every output of each added task. A step's `after`
    applies to artifacts made by the tasks added here (an imported one is
    already there). `images`: the references a step's `images` arguments get
    (ValueError when such a step comes without them).
    """
    tasks = []
    made: dict[str, dsl.PipelineTask] = {}
    for step in steps:
        if step.images and images is None:
            raise ValueError(f"step {step.name!r} takes image references ({', '.join(step.images)}): "
                             f"add_tasks needs the images")
        task = components[step.name](**{name: artifacts[step.renamed.get(name, name)] for name in step.inputs},
                                     **{arg: values[param] for arg, param in step.parameters.items()},
                                     **{arg: getattr(images, kind) for arg, kind in step.images.items()},
                                     **step.constants)
        task.set_display_name(step.display_name)
        if not step.cache:
            task.set_caching_options(False)
        for name in step.after:
            if name in made:
                task.after(made[name])
        for name, channel in task.outputs.items():
            artifacts[step.renamed.get(name, name)] = channel
            made[step.renamed.get(name, name)] = task
        tasks.append((step, task))
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
        tasks = add_tasks(components, steps_for(config), dict(zip(names, args)), {}, images)
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


def apply_cluster_settings(config: PipelineConfig, tasks: list[tuple[Step, dsl.PipelineTask]]) -> None:
    """Resources, GPUs, node placement, shared memory, retries and credentials per task, as its
    step's `Policy` says."""
    cluster = config.cluster
    for step, task in tasks:
        policy = step.policy
        resources = RESOURCES[policy.resources]
        _resources(task, getattr(cluster, resources.cpu), getattr(cluster, resources.memory))
        gpus = getattr(cluster, resources.gpus) if resources.gpus else 0
        if gpus > 0:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
            for key, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            if cluster.gpu_toleration:
                kubernetes.add_toleration(task, **cluster.toleration())
        if policy.shm:
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path=SHM_PATH,
                                       medium="Memory", size_limit=cluster.shm_size)
        if policy.volume:
            kubernetes.mount_pvc(task, pvc_name=cluster.train_volume, mount_path=VOLUME_DIR)
        if policy.retries and (retries := getattr(cluster, policy.retries)):
            task.set_retry(num_retries=retries, backoff_duration=policy.backoff)
        if policy.gcs and cluster.gcs_secret:
            kubernetes.use_secret_as_volume(task, secret_name=cluster.gcs_secret, mount_path=GCS_KEY_DIR)
            task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/key.json")


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> None:
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
