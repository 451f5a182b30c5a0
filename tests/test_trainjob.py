"""Training as a Kubeflow Trainer TrainJob (cluster.train_nodes above 1), against a fake Kubernetes API.

`FakeTrainer` answers the API calls the Trainer SDK's TrainerClient makes (runtimes, TrainJobs, pods, pod
logs) and plays Trainer's part: a created TrainJob's nodes run its command as local processes, each with
the JAX process-group variables Trainer's JAX plugin sets, so the job really trains here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp.dsl import TaskConfig

from facenet_kfp import kube, trainjob
from facenet_kfp.config import TrainConfig, load_config
from facenet_kfp.errors import InputError
from facenet_kfp.multiprocess import COORDINATOR, NUM_PROCESSES, PROCESS_ID
from facenet_kfp.trainjob import Launch, TrainJobError
from tests.builders import build_train_inputs
from tests.test_deploy import write_kubeconfig
from tests.trainer_schema import manifest_errors

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = yaml.safe_load((ROOT / "manifests" / "trainer" / "cluster-training-runtime.yaml").read_text())
GROUP_PATH = "/apis/trainer.kubeflow.org/v1alpha1"
NAMESPACE = "team-a"
RUN_KEY = "minio://mlpipeline/v2/artifacts/facenet-kfp/run-7/train-on-trainer/abc/model"
CONFIG = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.8, embedding_dim=16, p=4, k=4,
                     loss="batch_hard", margin=0.5, learning_rate=2e-3, lr_schedule="constant", max_steps=4,
                     validate_every=2, validation_batches=1, checkpoint_every=2, log_every=2, precision="float32")
LAUNCH = Launch(nodes=2, runtime="facenet-kfp-jax", image="registry.example/facenet-kfp-trainer-jax:test",
                timeout_s=600)


TASK_CONFIG = TaskConfig(
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    env=[{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"}],
    volumes=[{"name": "facenet-kfp-data", "persistentVolumeClaim": {"claimName": "facenet-kfp-data"}}],
    volume_mounts=[{"name": "facenet-kfp-data", "mountPath": "/mnt/facenet-kfp"}],
    resources={"limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
               "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _failure(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeTrainer:
    """The Kubernetes API routes of the Trainer SDK, and Trainer's controller: the nodes of a created
    TrainJob run its command locally (`facenet-kfp` is this Python's `-m facenet_kfp.cli`), node i with
    JAX_PROCESS_ID=i. `fail_node`: that node's process exits 1 at once, and the job fails (JobSet stops the
    others). `forbidden`: creating a TrainJob is answered 403. Records every request."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.jobs, self.nodes, self.requests, self.failures = log_dir, {}, {}, [], {}
        self.fail_node: int | None = None
        self.forbidden = False
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": self.command, "path": self.path, "body": body})
                code, answer = fake.serve(self.command, self.path.split("?")[0], body)
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, method: str, path: str, body: dict | None) -> tuple[int, Any]:
        if m := re.fullmatch(r"/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public", path):
            return 200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "kubeflow-trainer-public"},
                         "data": {"kubeflow_trainer_version": "2.3.0"}}
        if m := re.fullmatch(GROUP_PATH + r"/namespaces/([^/]+)/trainingruntimes/([^/]+)", path):
            return 404, _failure(404, "NotFound", f'trainingruntimes.trainer.kubeflow.org "{m.group(2)}" not found')
        if m := re.fullmatch(GROUP_PATH + r"/clustertrainingruntimes/([^/]+)", path):
            if m.group(1) != RUNTIME["metadata"]["name"]:
                return 404, _failure(404, "NotFound", f'clustertrainingruntimes "{m.group(1)}" not found')
            return 200, {**RUNTIME, "metadata": {**RUNTIME["metadata"], "creationTimestamp": _now()}}
        if m := re.fullmatch(GROUP_PATH + r"/namespaces/([^/]+)/trainjobs(?:/([^/]+))?", path):
            return self._trainjobs(method, m.group(1), m.group(2), body)
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path):
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self._pods(m.group(1))}
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path):
            return self._log(m.group(2))
        return 404, _failure(404, "NotFound", f"no route {path}")

    def _trainjobs(self, method: str, namespace: str, name: str | None, body: dict | None) -> tuple[int, Any]:
        if method == "POST":
            if self.forbidden:
                return 403, _failure(403, "Forbidden", f'trainjobs.trainer.kubeflow.org is forbidden: User "system:'
                                                       f'serviceaccount:{namespace}:pipeline-runner" cannot create '
                                                       f'resource "trainjobs"')
            name = body["metadata"]["name"]
            if name in self.jobs:
                return 409, _failure(409, "AlreadyExists", f'trainjobs "{name}" already exists')
            job = {**body, "metadata": {**body["metadata"], "namespace": namespace, "creationTimestamp": _now(),
                                        "uid": f"uid-{len(self.requests)}"}}
            self.jobs[name] = job
            self._start(name, job)
            return 201, job
        if name not in self.jobs:
            return 404, _failure(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if method == "DELETE":
            self._stop(name)
            del self.jobs[name], self.nodes[name]
            self.failures.pop(name, None)
            return 200, {"kind": "Status", "status": "Success"}
        return 200, {**self.jobs[name], "status": self._status(name)}

    def _start(self, name: str, job: dict) -> None:
        trainer = job["spec"]["trainer"]
        count = int(trainer.get("numNodes") or 1)
        env = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env") or []},
               COORDINATOR: f"127.0.0.1:{_free_port()}", NUM_PROCESSES: str(count), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        command = list(trainer["command"])
        assert command[0] == "facenet-kfp"
        nodes = []
        for i in range(count):
            log = self.log_dir / f"{name}-node-0-{i}.log"
            argv = ([sys.executable, "-c", "import sys; print('node failed: CUDA out of memory'); sys.exit(1)"]
                    if i == self.fail_node else [sys.executable, "-m", "facenet_kfp.cli", *command[1:]])
            with open(log, "wb") as out:
                nodes.append((subprocess.Popen(argv, cwd=ROOT, env={**env, PROCESS_ID: str(i)}, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
        self.nodes[name] = nodes
        threading.Thread(target=self._watch, args=(name, nodes), daemon=True).start()

    def _watch(self, name: str, nodes: list) -> None:
        """JobSet's failure policy: the first node to fail ends the others, and the job fails naming it."""
        while True:
            codes = [process.poll() for process, _ in nodes]
            if failed := [i for i, rc in enumerate(codes) if rc not in (None, 0)]:
                self.failures[name] = f"jobset failed: node-0-{failed[0]} exited with code {codes[failed[0]]}"
                self._stop(name)
                return
            if all(rc == 0 for rc in codes):
                return
            threading.Event().wait(0.05)

    def _stop(self, name: str) -> None:
        for process, _ in self.nodes.get(name, []):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _status(self, name: str) -> dict:
        codes = [process.poll() for process, _ in self.nodes[name]]
        if name in self.failures:
            return {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                    "message": self.failures[name], "lastTransitionTime": _now()}]}
        if all(rc == 0 for rc in codes):
            return {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                    "message": "jobset completed", "lastTransitionTime": _now()}]}
        return {}

    def _pods(self, namespace: str) -> list[dict]:
        pods = []
        for name, nodes in self.nodes.items():
            resources = self.jobs[name]["spec"]["trainer"].get("resourcesPerNode") or {}
            for i, (process, _) in enumerate(nodes):
                rc = process.poll()
                phase = "Running" if rc is None else "Succeeded" if rc == 0 else "Failed"
                pods.append({"metadata": {"name": f"{name}-node-0-{i}", "namespace": namespace,
                                          "creationTimestamp": _now(),
                                          "labels": {"jobset.sigs.k8s.io/jobset-name": name,
                                                     "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                                     "batch.kubernetes.io/job-completion-index": str(i)}},
                             "spec": {"containers": [{"name": "node", "image": "x", "resources": resources}]},
                             "status": {"phase": phase}})
        return pods

    def _log(self, pod: str) -> tuple[int, str]:
        for name, nodes in self.nodes.items():
            for i, (process, log) in enumerate(nodes):
                if pod == f"{name}-node-0-{i}":
                    process.wait()      # follow=true: the stream ends with the container
                    return 200, log.read_text(errors="replace")
        return 404, f"pod {pod} not found"

    def created(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        for name in list(self.nodes):
            self._stop(name)
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(tmp_path):
    fake = FakeTrainer(tmp_path)
    fake.thread.start()
    yield fake
    fake.close()


@pytest.fixture
def kubeconfig(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return write_kubeconfig(tmp_path / "kubeconfig", fake.url)


def _launch(d: dict, tmp_path: Path, kubeconfig: Path, lines: list[str], launch: Launch = LAUNCH,
            config: TrainConfig = CONFIG, **kwargs: Any) -> dict:
    (tmp_path / "volume").mkdir(exist_ok=True)
    return trainjob.launch(d["dataset"], d["completion"], d["labels"], d["splits"], tmp_path / "model", config,
                           launch, run_key=RUN_KEY, task_config=TASK_CONFIG, volume_dir=tmp_path / "volume",
                           tensorboard_dir=tmp_path / "tensorboard", namespace=NAMESPACE, kubeconfig=kubeconfig,
                           poll_s=0.2, printer=lines.append, **kwargs)


# --- a real job on the fake ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_node_fails_the_task_and_a_retry_replaces_the_job_which_trains(fake, kubeconfig, tmp_path):
    d = build_train_inputs(tmp_path / "inputs")
    lines: list[str] = []
    fake.fail_node = 1
    with pytest.raises(TrainJobError) as error:
        _launch(d, tmp_path, kubeconfig, lines)
    name = trainjob.job_name(RUN_KEY)
    assert str(error.value).startswith(
        f"TrainJob {NAMESPACE}/{name} failed: Failed=True (FailedJobs: jobset failed: node-0-1 exited with code 1)")
    assert not (tmp_path / "model").exists()                 # nothing exported

    fake.fail_node = None                                    # the task's retry
    result = _launch(d, tmp_path, kubeconfig, lines)
    methods = [(r["method"], r["path"].split("?")[0].rsplit("/", 1)[-1]) for r in fake.requests
               if r["method"] != "GET"]
    assert methods == [("POST", "trainjobs"), ("DELETE", name), ("POST", "trainjobs")]
    from tests.builders import kustomize

    calls = needed(fake.requests)
    assert {("create", "trainjobs"), ("delete", "trainjobs"), ("get", "trainjobs"), ("list", "pods"),
            ("get", "pods/log"), ("get", "clustertrainingruntimes")} <= calls
    assert calls <= granted(kustomize(PIPELINE_MANIFESTS))       # manifests/trainer/pipeline grants every call
    assert result["steps"] == CONFIG.max_steps and result["start_step"] == 0
    assert (tmp_path / "model" / "model.keras").is_file()
    assert json.loads((tmp_path / "model" / "model.json").read_text())["embedding_dim"] == CONFIG.embedding_dim
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert any(line.startswith("[node-0] ") and "train" in line for line in lines)   # node 0's log came through

    job = fake.created()[-1]
    assert manifest_errors(job, "TrainJob") == []
    assert job["metadata"]["name"] == name
    assert job["spec"]["runtimeRef"] == {"name": "facenet-kfp-jax", "kind": "ClusterTrainingRuntime"}
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == LAUNCH.image
    assert trainer["env"] == [{"name": "KERAS_BACKEND", "value": "jax"}]
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    folder = tmp_path / "volume" / name
    assert trainer["command"] == [
        "facenet-kfp", "train", *(str(folder / "inputs" / n) for n in ("images", "completion", "labels", "splits")),
        "--out", str(folder / "model"), "--config", str(folder / "train.yaml"), "--run-key", RUN_KEY,
        "--checkpoint-dir", str(folder / "checkpoints"), "--tensorboard-dir", str(folder / "tensorboard"),
        "--result", str(folder / "result.json")]
    node = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node"
    assert pod["tolerations"] == TASK_CONFIG.tolerations and pod["nodeSelector"] == TASK_CONFIG.node_selector
    assert pod["volumes"] == TASK_CONFIG.volumes
    assert pod["containers"] == [{"name": "node", "env": TASK_CONFIG.env, "volumeMounts": TASK_CONFIG.volume_mounts}]
    # The nodes read the settings the task was given.
    written = load_config(folder / "train.yaml").train
    assert written == CONFIG


# --- what is refused, and when ----------------------------------------------------------------------

@pytest.mark.parametrize("launch, config, message", [
    (Launch(nodes=3, runtime="facenet-kfp-jax", image="r/i:t"), CONFIG,
     "train.p=4 must be a multiple of cluster.train_nodes=3"),
    (Launch(nodes=2, runtime=" ", image="r/i:t"), CONFIG, "cluster.train_runtime is empty"),
    (Launch(nodes=2, runtime="facenet-kfp-jax", image=""), CONFIG, "the JAX trainer image reference is empty"),
    (Launch(nodes=0, runtime="facenet-kfp-jax", image="r/i:t"), CONFIG, "cluster.train_nodes must be 1 to 64"),
])
def test_bad_settings_are_refused_before_the_cluster_is_asked(fake, kubeconfig, tmp_path, launch, config, message):
    d = {"dataset": tmp_path, "completion": tmp_path, "labels": tmp_path, "splits": tmp_path}
    with pytest.raises(InputError, match=re.escape(message)):
        _launch(d, tmp_path, kubeconfig, [], launch=launch, config=config)
    assert fake.requests == []


def test_no_cluster_is_named_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(kube, "IN_CLUSTER_TOKEN", tmp_path / "no-token")
    d = {"dataset": tmp_path, "completion": tmp_path, "labels": tmp_path, "splits": tmp_path}
    with pytest.raises(TrainJobError, match=r"^no Kubernetes cluster: no in-cluster service account .* "
                                            r"cluster.train_nodes above 1 launches a Kubeflow Trainer TrainJob"):
        _launch(d, tmp_path, None, [])
    assert list((tmp_path / "volume").iterdir()) == []


def test_a_missing_volume_is_named(fake, kubeconfig, tmp_path):
    d = {"dataset": tmp_path, "completion": tmp_path, "labels": tmp_path, "splits": tmp_path}
    with pytest.raises(InputError, match="needs cluster.train_volume, a ReadWriteMany PersistentVolumeClaim"):
        trainjob.launch(d["dataset"], None, d["labels"], d["splits"], tmp_path / "model", CONFIG, LAUNCH,
                        run_key=RUN_KEY, volume_dir=tmp_path / "not-mounted", namespace=NAMESPACE,
                        kubeconfig=kubeconfig)


def test_a_forbidden_create_names_the_rbac_it_needs(fake, kubeconfig, tmp_path):
    d = build_train_inputs(tmp_path / "inputs")
    fake.forbidden = True
    with pytest.raises(TrainJobError) as error:
        _launch(d, tmp_path, kubeconfig, [])
    text = str(error.value)
    assert text.startswith(f"create TrainJob {NAMESPACE}/{trainjob.job_name(RUN_KEY)}: 403 Forbidden: "
                           f"trainjobs.trainer.kubeflow.org is forbidden")
    assert "create, get, list and delete trainjobs.trainer.kubeflow.org" in text
    assert not (tmp_path / "model").exists()


def test_an_unknown_runtime_is_named(fake, kubeconfig, tmp_path):
    d = build_train_inputs(tmp_path / "inputs")
    launch = Launch(nodes=2, runtime="no-such-runtime", image="r/i:t")
    with pytest.raises(TrainJobError, match=r"find runtime 'no-such-runtime' for TrainJob .*: 404 Not Found"):
        _launch(d, tmp_path, kubeconfig, [], launch=launch)


def test_the_job_name_is_the_run_keys():
    assert trainjob.job_name(RUN_KEY) == trainjob.job_name(RUN_KEY)
    assert trainjob.job_name(RUN_KEY) != trainjob.job_name(RUN_KEY + "x")
    assert re.fullmatch(r"facenet-train-[0-9a-f]{12}", trainjob.job_name(RUN_KEY))


def test_resources_per_node_are_the_limits():
    assert trainjob.resources_per_node(TASK_CONFIG.resources) == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert trainjob.resources_per_node({"requests": {"cpu": "2"}}) == {"cpu": "2"}
    assert trainjob.resources_per_node(None) is None
    assert trainjob.runtime_patch(TaskConfig()) is None


# --- the pipeline ------------------------------------------------------------------------------------

def _compile(tmp_path: Path, *sets: str) -> list[dict]:
    from pipelines.compile import compile_pipeline

    out = compile_pipeline("configs/lfw.yaml", tmp_path / "p.yaml", "registry.example/facenet-kfp:t",
                           "registry.example/facenet-kfp-trainer:t", list(sets))
    return list(yaml.safe_load_all(out.read_text()))


def test_two_nodes_compile_a_train_task_that_launches_a_trainjob(tmp_path):
    spec, platform = _compile(tmp_path, "cluster.train_nodes=2", "cluster.train_volume=shared-data")
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-model" not in tasks
    task = tasks["train-on-trainer"]
    assert task["taskInfo"]["name"] == "7. train embeddings (Kubeflow Trainer TrainJob)"
    inputs = task["inputs"]["parameters"]
    assert inputs["train_nodes"] == {"componentInputParameter": "train_nodes"}
    assert inputs["train_runtime"]["runtimeValue"]["constant"] == "facenet-kfp-jax"
    assert inputs["image"]["runtimeValue"]["constant"] == "registry.example/facenet-kfp-trainer-jax:t"
    assert spec["root"]["inputDefinitions"]["parameters"]["train_nodes"]["defaultValue"] == 2
    passthroughs = spec["components"]["comp-train-on-trainer"]["taskConfigPassthroughs"]
    assert passthroughs == [{"field": "RESOURCES"}, {"field": "KUBERNETES_TOLERATIONS"},
                            {"field": "KUBERNETES_NODE_SELECTOR"}, {"field": "KUBERNETES_AFFINITY"},
                            {"applyToTask": True, "field": "ENV"},
                            {"applyToTask": True, "field": "KUBERNETES_VOLUMES"}]
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-on-trainer"]
    assert executor["pvcMount"][0]["mountPath"] == trainjob.VOLUME_DIR
    assert executor["pvcMount"][0]["constant"] == "shared-data"
    resources = spec["deploymentSpec"]["executors"]["exec-train-on-trainer"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "1"     # passed through to the nodes, not this pod


def test_one_node_keeps_the_train_task_and_refuses_more_nodes_at_run_time(tmp_path):
    spec, _ = _compile(tmp_path)
    assert "train-on-trainer" not in spec["root"]["dag"]["tasks"]
    assert spec["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]["train_nodes"] == {
        "componentInputParameter": "train_nodes"}
    from components.train import train_model

    with pytest.raises(InputError, match=r"cluster.train_nodes=2, but this pipeline trains inside its train task: "
                                         r"compile it with SET='cluster.train_nodes=2'"):
        train_model(None, None, None, None, **{f.name: None for f in dataclasses.fields(TrainConfig)},
                    checkpoint_root="", tensorboard_root="", train_nodes=2, model=None, metrics=None,
                    training_report=None, tensorboard=None)


# --- what the cluster needs: manifests/trainer/pipeline ------------------------------------------------

PIPELINE_MANIFESTS = ROOT / "manifests" / "trainer" / "pipeline"


@pytest.fixture(scope="module")
def launcher_objects() -> list[dict]:
    from tests.builders import kustomize

    return kustomize(PIPELINE_MANIFESTS)


def test_the_launcher_manifests_validate_strictly(launcher_objects, tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(launcher_objects))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(exe), "--strict", "--kubernetes-version", "1.37.0", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = re.findall(r"passed for resource (\S+)", proc.stdout + proc.stderr)
    assert sorted(passed) == sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in launcher_objects)


def test_the_launcher_manifests_name_one_namespace_and_the_default_volume(launcher_objects):
    kinds = {o["kind"]: o for o in launcher_objects}
    namespace = kinds["Role"]["metadata"]["namespace"]
    for obj in launcher_objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == namespace
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == namespace
    claim = kinds["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == load_config().cluster.train_volume
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def granted(objects: list[dict]) -> set[tuple[str, str]]:
    """(verb, resource) pairs the Role and ClusterRole of `objects` grant."""
    return {(verb, resource) for obj in objects if obj["kind"] in ("Role", "ClusterRole")
            for rule in obj["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


def needed(requests: list[dict]) -> set[tuple[str, str]]:
    """(verb, resource) pairs of the API requests the fake recorded (the SDK's optional read of Trainer's
    version ConfigMap in kubeflow-system left out: it only warns when refused)."""
    pairs = set()
    for request in requests:
        path, _, query = request["path"].partition("?")
        parts = path.strip("/").split("/")
        if "configmaps" in parts:
            continue
        named = parts[-1] not in ("trainjobs", "pods", "log") and parts[-2] in (
            "trainjobs", "pods", "trainingruntimes", "clustertrainingruntimes")
        resource = "pods/log" if parts[-1] == "log" else parts[-2] if named else parts[-1]
        verb = {"POST": "create", "DELETE": "delete"}.get(request["method"], "get" if named or resource == "pods/log"
                                                          else "list")
        pairs.add((verb, resource))
    return pairs
