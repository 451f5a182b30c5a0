"""Training as a Kubeflow Trainer TrainJob: what the train task does when cluster.train_nodes is above 1.

The task stays small (no GPU of its own) and hands training to Kubeflow Trainer v2: a TrainJob on a
JAX runtime (`cluster.train_runtime`: the project's ClusterTrainingRuntime `facenet-kfp-jax` in
manifests/trainer, or Trainer's own `jax-distributed`) runs one JAX process per node, each the same
`facenet-kfp train` command line as a local run; Trainer sets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, and `train` joins that process group (`multiprocess`).

The nodes and the task share one ReadWriteMany PersistentVolumeClaim (`cluster.train_volume`),
mounted at VOLUME_DIR in the task; kfp forwards the task's volumes to the TrainJob with its
GPU, toleration, node-selector, affinity and environment settings (`task_config_passthroughs`, a
`dsl.TaskConfig`). `launch` works in this order:

1. the settings (nodes, runtime, image), that p is a multiple of the nodes (each process reads whole
   identities of every batch), and that the volume is mounted and writable;
2. the inputs, copied once onto the volume under a folder keyed by the run key (a retried task finds
   them, and its TrainJob's checkpoints, again);
3. the cluster (`kube.find_cluster`), then the TrainJob through the `kubeflow` SDK's TrainerClient,
   named after the run key: a retry attaches to a running job or to a finished one, and replaces a
   failed one (which then resumes from its last checkpoint);
4. node 0's log, streamed into the task's log while the job runs;
5. the job's end: Complete, or a FacenetError naming the job's failed condition (and nothing is
   exported); a timeout names the job's last conditions;
6. the outputs, as a local run writes them: the model folder (atomically), the final metrics, the
   TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import atomic_dir, check_replaceable, read_json

log = logging.getLogger(__name__)

VOLUME_DIR = "/mnt/facenet-kfp"     # where cluster.train_volume is mounted in the train task and every node
NODE = "node"                       # the runtime's replicated job and container that spec.trainer applies to
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
INPUTS = ("images", "completion", "labels", "splits")
RESULT_JSON = "result.json"
POLL_SECONDS = 10.0
# A TrainJob's name is the JobSet's and a prefix of its pods' and headless Service's: keep it short.
NAME_PREFIX = "facenet-train-"


class TrainJobError(FacenetError):
    """The TrainJob could not be created, failed, or did not finish in time."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the TrainJob runs: `nodes` JAX processes (one per node) on `runtime`, in `image`."""
    nodes: int
    runtime: str
    image: str
    timeout_s: float = 7 * 24 * 3600.0

    def check(self, p: int) -> None:
        if not 1 <= self.nodes <= 64:
            raise InputError(f"cluster.train_nodes must be 1 to 64, got {self.nodes}")
        if not self.runtime.strip():
            raise InputError("cluster.train_runtime is empty: name a JAX TrainingRuntime or ClusterTrainingRuntime "
                             "(facenet-kfp-jax from manifests/trainer, or jax-distributed)")
        if not self.image.strip():
            raise InputError("the JAX trainer image reference is empty: compile with --trainer-jax-image "
                             "(make compile sets it from IMAGE_REGISTRY and IMAGE_TAG)")
        if p % self.nodes:
            raise InputError(f"train.p={p} must be a multiple of cluster.train_nodes={self.nodes}: each node's "
                             f"process reads whole identities of every P x K batch")
        if self.timeout_s <= 0:
            raise InputError(f"the TrainJob timeout must be positive, got {self.timeout_s:g} s")


def job_name(run_key: str) -> str:
    """The TrainJob's name for `run_key` (the task's model URI): the same for a retried task, another for
    another run."""
    return NAME_PREFIX + hashlib.sha256(run_key.encode()).hexdigest()[:12]


def job_folder(volume_dir: str | os.PathLike, run_key: str) -> Path:
    """The folder on the shared volume for `run_key`'s TrainJob: its inputs, model, checkpoints, events."""
    return Path(volume_dir) / job_name(run_key)


def check_volume(volume_dir: str | os.PathLike) -> None:
    """InputError unless `volume_dir` is a writable folder (the mounted cluster.train_volume)."""
    folder = Path(volume_dir)
    if not folder.is_dir():
        raise InputError(f"cluster.train_nodes above 1 needs cluster.train_volume, a ReadWriteMany "
                         f"PersistentVolumeClaim the train task and every node mount at {folder}: nothing is "
                         f"mounted there (compile with SET='cluster.train_volume=<claim name>')")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cluster.train_volume is mounted at {folder} but this task cannot write there "
                         f"(uid {os.getuid()}): give the claim's filesystem to that uid or group")


def stage_inputs(inputs: Mapping[str, str | os.PathLike | None], folder: Path) -> dict[str, str]:
    """Copy each input folder to `folder`/inputs/<name> unless a complete copy is there; {name: copy}.

    A copy is written whole (`atomic_dir`), so a task killed while copying leaves none, and a retry
    reuses the complete ones. An empty completion stays empty (no completion images).
    """
    staged: dict[str, str] = {}
    for name in INPUTS:
        source = inputs.get(name)
        if not source:
            if name != "completion":
                raise InputError(f"training input {name} is missing")
            staged[name] = ""
            continue
        if not Path(source).is_dir():
            raise InputError(f"training input {name}: {source} is not a folder")
        target = folder / "inputs" / name
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(target) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
            log.info("copied training input %s to %s", name, target)
        staged[name] = str(target)
    return staged


def train_command(staged: Mapping[str, str], folder: Path, config_file: Path, run_key: str,
                  checkpoint_dir: str, live_events: str) -> list[str]:
    """The command every node runs: `facenet-kfp train` on the staged inputs, as a local run would, with
    the model, checkpoints, TensorBoard events and final metrics on the volume (process 0 writes them)."""
    command = ["facenet-kfp", "train", staged["images"], staged["completion"], staged["labels"], staged["splits"],
               "--out", str(folder / "model"), "--config", str(config_file), "--run-key", run_key,
               "--checkpoint-dir", checkpoint_dir, "--tensorboard-dir", str(folder / "tensorboard"),
               "--result", str(folder / RESULT_JSON)]
    return command + (["--tensorboard-dir", live_events] if live_events else [])


def resources_per_node(resources: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The task's resources (a pod's requests and limits, from kfp's TaskConfig) as the SDK's
    resources_per_node: the limits, else the requests, one value per resource (GPUs among them)."""
    if not resources:
        return None
    merged = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    return {name: str(value) for name, value in merged.items()} or None


def runtime_patch(task_config: Any) -> Any | None:
    """A RuntimePatch of the node pods with the task's volumes and mounts, environment, tolerations, node
    selector and affinity (kfp's TaskConfig), or None when the task has none of them."""
    from kubeflow.trainer.options import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch, JobSpecPatch,
                                          JobTemplatePatch, PodSpecPatch, PodTemplatePatch, ReplicatedJobPatch,
                                          RuntimePatch, TrainingRuntimeSpecPatch)

    env = list(task_config.env or [])
    mounts = list(task_config.volume_mounts or [])
    container = ContainerPatch(name=NODE, env=env or None, volume_mounts=mounts or None) if env or mounts else None
    pod = PodSpecPatch(volumes=list(task_config.volumes or []) or None, containers=[container] if container else None,
                       tolerations=list(task_config.tolerations or []) or None,
                       node_selector=dict(task_config.node_selector or {}) or None,
                       affinity=task_config.affinity or None)
    if all(getattr(pod, f.name) is None for f in dataclasses.fields(pod)):
        return None
    job = ReplicatedJobPatch(name=NODE, template=JobTemplatePatch(spec=JobSpecPatch(
        template=PodTemplatePatch(spec=pod))))
    return RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[job]))))


def connect(namespace: str | None, config_file: str | os.PathLike | None) -> Any:
    """A `kubeflow.trainer.TrainerClient` of the cluster (`kube.find_cluster`) in `namespace` (default:
    the pod's namespace, else the kubeconfig context's). TrainJobError when there is no cluster."""
    from facenet_kfp.kube import find_cluster

    in_cluster, kubeconfig = find_cluster(
        config_file, TrainJobError, "cluster.train_nodes above 1 launches a Kubeflow Trainer TrainJob: run the "
                                    "pipeline on Kubeflow Pipelines (make submit), or train on one node "
                                    "(cluster.train_nodes=1)")
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    try:
        return TrainerClient(KubernetesBackendConfig(namespace=namespace or None,
                                                     config_file=None if in_cluster else kubeconfig))
    except Exception as exc:
        source = "the in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig}"
        raise TrainJobError(f"cannot use {source} to reach a Kubernetes cluster: {type(exc).__name__}: {exc}") from exc


def _failed(action: str, name: str, namespace: str, exc: BaseException) -> TrainJobError:
    from facenet_kfp.kube import api_message, status_code

    hints = {403: (f"let the pipeline's service account create, get, list and delete trainjobs.{GROUP} and "
                   f"get clustertrainingruntimes.{GROUP} and trainingruntimes.{GROUP}, and get and list pods "
                   f"and pods/log, in namespace {namespace} (a Role and RoleBinding; manifests/trainer)"),
             404: f"is Kubeflow Trainer v2 installed (the {PLURAL}.{GROUP} CRD) and does the runtime exist?"}
    code = status_code(exc)
    hint = f"; {hints[code]}" if code in hints else ""
    return TrainJobError(f"{action} TrainJob {namespace}/{name}: {api_message(exc)}{hint}")


def read_job(client: Any, name: str) -> dict[str, Any] | None:
    """The TrainJob object `name` as the API server has it, None when there is none."""
    from facenet_kfp.kube import status_code

    backend = client.backend
    try:
        return backend.custom_api.get_namespaced_custom_object(GROUP, VERSION, backend.namespace, PLURAL, name)
    except Exception as exc:
        if status_code(exc) == 404:
            return None
        raise _failed("read", name, backend.namespace, exc) from exc


def job_state(obj: Mapping[str, Any]) -> str:
    """"Complete" or "Failed" from a TrainJob's conditions, else "Running"."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return "Running"


def submit(client: Any, name: str, launch: Launch, command: list[str], task_config: Any) -> str:
    """Create TrainJob `name` unless one exists: "created", or "attached" to a running or complete one; a
    failed one is deleted and created again (its checkpoints on the volume make it resume)."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import Name, TrainerCommand

    namespace = client.backend.namespace
    existing = read_job(client, name)
    if existing is not None and job_state(existing) != "Failed":
        log.info("TrainJob %s/%s exists (a retried task): waiting for it", namespace, name)
        return "attached"
    if existing is not None:
        log.info("TrainJob %s/%s failed before: replacing it (it resumes from its last checkpoint)", namespace, name)
        try:
            client.backend.custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            raise _failed("delete the failed", name, namespace, exc) from exc
    env = {"KERAS_BACKEND": "jax"}
    trainer = CustomTrainerContainer(image=launch.image, num_nodes=launch.nodes, env=env,
                                     resources_per_node=resources_per_node(task_config.resources))
    options = [Name(name=name), TrainerCommand(command=command)]
    if (patch := runtime_patch(task_config)) is not None:
        options.append(patch)
    try:
        runtime = client.get_runtime(launch.runtime)
    except Exception as exc:
        raise _failed(f"find runtime {launch.runtime!r} for", name, namespace, exc) from exc
    try:
        client.train(runtime=runtime, trainer=trainer, options=options)
    except Exception as exc:
        raise _failed("create", name, namespace, exc) from exc
    log.info("created TrainJob %s/%s: %d node(s) of %s on runtime %s", namespace, name, launch.nodes,
             launch.image, launch.runtime)
    return "created"


def follow(client: Any, name: str, launch: Launch, printer: Callable[[str], None], poll_s: float,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Stream node 0's log through `printer` once its pod runs, then wait for the job's end: returns when
    Complete; TrainJobError when Failed (its conditions) or after `launch.timeout_s`."""
    from facenet_kfp.kube import condition_text

    namespace = client.backend.namespace
    deadline = clock() + launch.timeout_s
    streamed = False
    while True:
        obj = read_job(client, name)
        if obj is None:
            raise TrainJobError(f"TrainJob {namespace}/{name} was deleted while the task waited for it")
        state = job_state(obj)
        if not streamed:
            streamed = _stream_node_0(client, name, printer)
            if streamed:
                continue        # the log ended with node 0's process: read the job's state again
        if state == "Complete":
            return
        if state == "Failed":
            raise TrainJobError(f"TrainJob {namespace}/{name} failed: "
                                f"{condition_text((obj.get('status') or {}).get('conditions'))}; nothing is exported "
                                f"(a retry of this task replaces the job, which resumes from its last checkpoint)")
        if clock() >= deadline:
            raise TrainJobError(f"TrainJob {namespace}/{name} did not finish within {launch.timeout_s:g} s: "
                                f"{condition_text((obj.get('status') or {}).get('conditions'))}")
        sleep(poll_s)


def _stream_node_0(client: Any, name: str, printer: Callable[[str], None]) -> bool:
    """Node 0's log through `printer` until its container ends; False while it has no running pod yet."""
    try:
        steps = client.get_job(name).steps
    except Exception as exc:
        log.warning("cannot list the pods of TrainJob %s yet: %s", name, exc)
        return False
    if not any(step.name == f"{NODE}-0" and step.status not in (None, "Pending") for step in steps):
        return False
    try:
        for line in client.get_job_logs(name, follow=True):
            printer(f"[{NODE}-0] {line.rstrip()}")
    except Exception as exc:
        log.warning("the log of TrainJob %s stopped: %s", name, exc)
    return True


def collect(folder: Path, model_dir: str | os.PathLike, tensorboard_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The job's outputs into the task's: the model folder (written whole), the TensorBoard events; returns
    the final metrics process 0 wrote. TrainJobError when the job finished without them."""
    missing = [p.name for p in (folder / "model", folder / RESULT_JSON) if not p.exists()]
    if missing:
        raise TrainJobError(f"the TrainJob finished but {', '.join(missing)} is missing in {folder}: "
                            f"nothing is exported")
    result = read_json(folder / RESULT_JSON)
    with atomic_dir(model_dir, step="train") as tmp:
        shutil.copytree(folder / "model", tmp, dirs_exist_ok=True)
    if tensorboard_dir and (folder / "tensorboard").is_dir():
        shutil.copytree(folder / "tensorboard", tensorboard_dir, dirs_exist_ok=True)
    return result


def launch(images: str | os.PathLike, completion: str | os.PathLike | None, labels: str | os.PathLike,
           splits: str | os.PathLike, model_dir: str | os.PathLike, config: Any, settings: Launch, *,
           run_key: str, task_config: Any = None, volume_dir: str | os.PathLike = VOLUME_DIR,
           checkpoint_dir: str | None = None, tensorboard_dir: str | os.PathLike | None = None,
           live_events: str | None = None, namespace: str | None = None,
           kubeconfig: str | os.PathLike | None = None, poll_s: float = POLL_SECONDS,
           printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `config` (a TrainConfig) as a TrainJob of `settings.nodes` nodes and write the model to
    `model_dir` (see the module docstring for the order). Returns train's final metrics.

    checkpoint_dir: the checkpoint folder (cluster.checkpoint_root's, keyed like a local run's); default
    the job's folder on the volume. tensorboard_dir: gets the run's TensorBoard events afterwards;
    live_events: a folder the nodes write events to as training goes (cluster.tensorboard_root's).
    """
    from facenet_kfp.config import to_dict

    settings.check(int(config.p))
    check_replaceable(model_dir, "train")
    client = connect(namespace, kubeconfig)
    check_volume(volume_dir)
    if task_config is None:
        from kfp.dsl import TaskConfig

        task_config = TaskConfig()
    folder = job_folder(volume_dir, run_key)
    staged = stage_inputs({"images": images, "completion": completion, "labels": labels, "splits": splits}, folder)
    config_file = folder / "train.yaml"
    config_file.write_text(yaml.safe_dump({"train": to_dict(config)}, sort_keys=False))
    command = train_command(staged, folder, config_file, run_key, checkpoint_dir or str(folder / "checkpoints"),
                            live_events or "")
    name = job_name(run_key)
    submit(client, name, settings, command, task_config)
    follow(client, name, settings, printer, poll_s)
    return collect(folder, model_dir, tensorboard_dir)

