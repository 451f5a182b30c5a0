"""The compiled pipeline: golden YAML, images, cluster settings, descriptions, cache equivalences."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from pipelines.compile import compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests/golden/facenet_pipeline.yaml"
LIGHT, TRAINER = "registry.example/facenet-kfp:golden", "registry.example/facenet-kfp-trainer:golden"
DATA_TASKS = ["download-archive", "extract-images", "align-faces", "make-labels", "complete-identities",
              "split-identities", "check-pairs"]
STEP_NUMBER = re.compile(r"(\d+)([a-z]?)\. ")   # "2. extract images", "2a. align faces"


def _position(display_name: str) -> tuple[int, str]:
    """A task's place in the DAG from its display name: (number, letter)."""
    match = STEP_NUMBER.match(display_name)
    assert match, display_name
    return int(match.group(1)), match.group(2)


def _compile(tmp_path, config=ROOT / "configs/lfw.yaml", name="p.yaml", light=LIGHT, trainer=TRAINER):
    out = compile_pipeline(str(config), tmp_path / name, light, trainer)
    return out.read_text(), yaml.safe_load_all(out.read_text())


def _docs(tmp_path, config=ROOT / "configs/lfw.yaml", name="p.yaml"):
    text, docs = _compile(tmp_path, config, name)
    docs = list(docs)
    return docs[0], (docs[1] if len(docs) > 1 else {})


def without_sdk_version(text: str) -> str:
    """The compiled YAML without its one `sdkVersion: kfp-X.Y.Z` line, which names the kfp release only."""
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if re.fullmatch(r"sdkVersion: kfp-\S+\n?", line)]
    assert len(found) == 1, f"expected one top-level sdkVersion line, found {len(found)}"
    del lines[found[0]]
    return "".join(lines)


def test_golden_compile(tmp_path):
    """A change to the DAG shows up as a diff against the checked-in YAML (`make golden`); the kfp release does not."""
    text, _ = _compile(tmp_path)
    assert without_sdk_version(text) == without_sdk_version(GOLDEN.read_text()), \
        "compiled pipeline differs from tests/golden; run `make golden` and review the diff"


def test_golden_comparison_ignores_only_the_sdk_version():
    golden = GOLDEN.read_text()
    release = re.sub(r"(?m)^sdkVersion: kfp-\S+$", "sdkVersion: kfp-2.17.99", golden)
    assert release != golden and without_sdk_version(release) == without_sdk_version(golden)
    for changed in (golden.replace("name: 5. identity splits", "name: 5. splits"),
                    golden.replace("defaultValue: 20000", "defaultValue: 20001"),
                    golden + "\n"):
        assert changed != golden and without_sdk_version(changed) != without_sdk_version(golden)


def test_step_numbers_follow_the_dag(tmp_path):
    """Display names number the steps 1..8 (a step between two: a letter, "2a. align faces") so that every
    task's upstream tasks come earlier: the run table sorts by them (pipelines/run_local.py, dag_order)."""
    spec, _ = _docs(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    number = {name: _position(t["taskInfo"]["name"]) for name, t in tasks.items()}
    assert sorted(number.values()) == [(1, ""), (2, ""), (2, "a"), *((n, "") for n in range(3, 9))]
    for name, task in tasks.items():
        upstream = set(task.get("dependentTasks", [])) | {
            a["taskOutputArtifact"]["producerTask"] for a in task.get("inputs", {}).get("artifacts", {}).values()}
        assert upstream or number[name] == (1, ""), f"{name} has no upstream task"
        assert all(number[u] < number[name] for u in upstream), (name, upstream)


def test_images_are_the_given_references(tmp_path):
    spec, _ = _docs(tmp_path)
    images = {name: ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert images == {
        "exec-download-archive": LIGHT, "exec-extract-images": LIGHT, "exec-align-faces": TRAINER,
        "exec-make-labels": LIGHT,
        "exec-complete-identities": LIGHT, "exec-split-identities": LIGHT, "exec-check-pairs": LIGHT,
        "exec-train-model": TRAINER, "exec-evaluate-model": TRAINER}
    # Packages are preinstalled in the images: no pip install when a step starts.
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(ex["container"]["command"])


@pytest.mark.parametrize("light", ["r/facenet-kfp", "r/facenet-kfp:latest"])
def test_latest_or_untagged_images_are_refused(tmp_path, light):
    with pytest.raises(ValueError, match="latest|no tag"):
        _compile(tmp_path, light=light)


def test_every_parameter_has_a_description_and_lfw_defaults(tmp_path):
    spec, _ = _docs(tmp_path)
    assert "FaceNet" in spec["pipelineInfo"]["description"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values()), [k for k, p in params.items() if not p.get("description")]
    assert params["source_uri"]["defaultValue"] == "https://ndownloader.figshare.com/files/5976018"
    assert params["sha256"]["defaultValue"].startswith("055f7d9c")
    assert params["train_architecture"]["defaultValue"] == "nn4_small2"
    assert params["eval_folds"]["defaultValue"] == 10


def test_gpu_resources_and_kubernetes_settings(tmp_path):
    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump({"cluster": {
        "train_gpus": 2, "evaluate_gpus": 1, "train_cpu": "6", "train_memory": "24Gi",
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "gpu_toleration": {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                           "tolerationSeconds": 300},
        "gcs_secret": "gcs-key", "shm_size": "8Gi"}}))
    spec, platform = _docs(tmp_path, config)
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-model"]["container"]["resources"]
    assert (train["accelerator"]["resourceCount"], train["accelerator"]["resourceType"]) == ("2", "nvidia.com/gpu")
    assert (train["resourceCpuRequest"], train["resourceCpuLimit"], train["resourceMemoryLimit"]) == ("6", "6", "24Gi")
    assert executors["exec-evaluate-model"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in executors["exec-extract-images"]["container"]["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-model"]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    # tolerationSeconds reaches kfp as the number 300; protobuf's JSON writes an int64 as a string.
    assert k8s["exec-train-model"]["tolerations"] == [{"effect": "NoExecute", "key": "nvidia.com/gpu",
                                                       "operator": "Exists", "tolerationSeconds": "300"}]
    assert k8s["exec-train-model"]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}]
    assert k8s["exec-download-archive"]["secretAsVolume"][0]["secretName"] == "gcs-key"
    env = {e["name"]: e["value"] for e in executors["exec-download-archive"]["container"]["env"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/google/key.json"
    retry = spec["root"]["dag"]["tasks"]["train-model"]["retryPolicy"]
    assert retry["maxRetryCount"] == 2


def test_no_credentials_in_compiled_yaml(tmp_path):
    text, _ = _compile(tmp_path)
    for needle in ("private_key", "BEGIN PRIVATE", "client_secret", "aws_secret", "password"):
        assert needle not in text.lower()


def _task_view(spec, task):
    """Everything that feeds a task's cache key on the backend: task spec, component, executor."""
    task_spec = spec["root"]["dag"]["tasks"][task]
    component = spec["components"][task_spec["componentRef"]["name"]]
    executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]
    return task_spec, component, executor


def test_training_parameter_leaves_data_tasks_unchanged(tmp_path):
    """Changing a training key invalidates train and evaluate only (README, Caching)."""
    other = tmp_path / "other.yaml"
    base = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())
    base["train"]["learning_rate"] = 0.0001
    other.write_text(yaml.safe_dump(base))
    a, _ = _docs(tmp_path, ROOT / "configs/lfw.yaml", "a.yaml")
    b, _ = _docs(tmp_path, other, "b.yaml")
    for task in DATA_TASKS + ["train-model", "evaluate-model"]:
        assert _task_view(a, task) == _task_view(b, task)
    params_a = a["root"]["inputDefinitions"]["parameters"]
    params_b = b["root"]["inputDefinitions"]["parameters"]
    changed = {k for k in params_a if params_a[k] != params_b[k]}
    assert changed == {"train_learning_rate"}
    # Which tasks read the changed parameter: train only (evaluate reads train's model).
    readers = {task for task, spec in a["root"]["dag"]["tasks"].items()
               if any(p.get("componentInputParameter") == "train_learning_rate"
                      for p in spec.get("inputs", {}).get("parameters", {}).values())}
    assert readers == {"train-model"}


@pytest.mark.parametrize("param, readers", [
    ("source_uri", {"download-archive"}),
    ("shard_size_mb", {"extract-images", "complete-identities"}),
    ("split_seed", {"split-identities"}),
    ("eval_folds", {"evaluate-model"}),
    ("pairs_uri", {"check-pairs"}),
    ("pairs_sha256", {"check-pairs"}),
    ("checkpoint_root", {"train-model"}),
    ("tensorboard_root", {"train-model"}),
    ("align_size", {"align-faces"}),
    ("max_align_fallback_fraction", {"align-faces"}),
])
def test_parameters_reach_only_the_steps_they_change(tmp_path, param, readers):
    spec, _ = _docs(tmp_path)
    found = {task for task, t in spec["root"]["dag"]["tasks"].items()
             if any(p.get("componentInputParameter") == param
                    for p in t.get("inputs", {}).get("parameters", {}).values())}
    assert found == readers


def test_a_field_type_without_a_pipeline_type_fails_at_compile_time(tmp_path, monkeypatch):
    from facenet_kfp import config
    from facenet_kfp.errors import FacenetError

    monkeypatch.setattr(config, "PARAMETER_TYPES", {str: str, int: int, float: float, bool: bool})
    with pytest.raises(FacenetError, match=r"config evaluate\.far_targets has type tuple\[float, \.\.\.\], "
                                           r"which has no pipeline parameter type"):
        _compile(tmp_path)


def test_parameter_descriptions_are_the_config_help(tmp_path):
    from facenet_kfp.config import TrainConfig, field_help

    params = _docs(tmp_path)[0]["root"]["inputDefinitions"]["parameters"]
    assert params["train_loss"]["description"] == f"{field_help(TrainConfig)['loss']} (config: train.loss)"


def test_an_evaluation_archive_adds_its_branch_and_parameters(tmp_path):
    config = tmp_path / "casia.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_uri": "gs://b/casia.zip", "sha256": "",
                                               "eval_source_uri": "gs://b/lfw.tgz", "eval_sha256": "a" * 64},
                                      "cluster": {"gcs_secret": "gcs-key"}}))
    spec, platform = _docs(tmp_path, config)
    tasks = spec["root"]["dag"]["tasks"]
    assert {"download-archive-2", "extract-images-2", "evaluate-on-archive"} <= set(tasks)
    assert "evaluate-model" not in tasks
    assert tasks["download-archive-2"]["inputs"]["parameters"]["source_uri"]["componentInputParameter"] == \
        "eval_source_uri"
    evaluate = tasks["evaluate-on-archive"]["inputs"]["artifacts"]
    assert evaluate["eval_images"]["taskOutputArtifact"]["producerTask"] == "extract-images-2"
    assert evaluate["images"]["taskOutputArtifact"]["producerTask"] == "extract-images"
    assert tasks["split-identities"]["inputs"]["parameters"]["test_split"]["runtimeValue"]["constant"] is False
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["eval_sha256"]["defaultValue"] == "a" * 64
    # Both downloads retry and get the credentials.
    assert tasks["download-archive-2"]["retryPolicy"]["maxRetryCount"] == 3
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-download-archive-2"]["secretAsVolume"][0]["secretName"] == "gcs-key"
    # Without one the DAG has no such branch and no such parameters.
    plain, _ = _docs(tmp_path, name="plain.yaml")
    assert "eval_source_uri" not in plain["root"]["inputDefinitions"]["parameters"]
    assert "download-archive-2" not in plain["root"]["dag"]["tasks"]


def test_pairs_are_checked_before_training_and_evaluate_reads_the_checked_copy(tmp_path):
    """The pairs check follows extract and precedes train (train waits without reading it, so the
    pairs file is not in train's cache key); evaluate reads its output, not the pairs URI."""
    spec, platform = _docs(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    check = tasks["check-pairs"]
    assert check["inputs"]["artifacts"]["images"]["taskOutputArtifact"]["producerTask"] == "align-faces"
    assert check["cachingOptions"]["enableCache"] is True
    assert "check-pairs" in tasks["train-model"]["dependentTasks"]
    assert "pairs" not in tasks["train-model"]["inputs"].get("artifacts", {})
    assert tasks["evaluate-model"]["inputs"]["artifacts"]["pairs"]["taskOutputArtifact"] == {
        "producerTask": "check-pairs", "outputArtifactKey": "pairs"}
    assert not {"pairs_uri", "pairs_sha256"} & set(tasks["evaluate-model"]["inputs"]["parameters"])
    # A light step: the data steps' resources, no accelerator, no shared-memory volume.
    resources = spec["deploymentSpec"]["executors"]["exec-check-pairs"]["container"]["resources"]
    assert resources == spec["deploymentSpec"]["executors"]["exec-make-labels"]["container"]["resources"]
    assert "exec-check-pairs" not in platform.get("platforms", {}).get("kubernetes", {}).get(
        "deploymentSpec", {}).get("executors", {})


def test_pairs_settings_leave_training_cached(tmp_path):
    """Another pairs file changes the pairs check and (through its output) evaluate, never train's cache key."""
    changed, _ = _changed_data_parameters(tmp_path, {"pairs_uri": "gs://bucket/other-pairs.txt", "pairs_sha256": ""})
    assert changed == {"pairs_uri", "pairs_sha256"}


def _changed_data_parameters(tmp_path, data: dict) -> tuple[set[str], dict]:
    """configs/lfw.yaml compiled as it is and with `data` in its data section: asserts the data tasks, train and
    evaluate keep their cache key; (the pipeline parameters whose defaults differ, the second's parameters)."""
    other = tmp_path / "other.yaml"
    base = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())
    base["data"].update(data)
    other.write_text(yaml.safe_dump(base))
    a, _ = _docs(tmp_path, ROOT / "configs/lfw.yaml", "a.yaml")
    b, _ = _docs(tmp_path, other, "b.yaml")
    for task in DATA_TASKS + ["train-model", "evaluate-model"]:
        assert _task_view(a, task) == _task_view(b, task)
    params_a = a["root"]["inputDefinitions"]["parameters"]
    params_b = b["root"]["inputDefinitions"]["parameters"]
    return {k for k in params_a if params_a[k] != params_b[k]}, params_b


def test_evaluation_archive_pairs_are_checked_on_its_images_before_training(tmp_path):
    config = tmp_path / "casia.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_uri": "gs://b/casia.zip", "sha256": "",
                                               "eval_source_uri": "gs://b/lfw.tgz", "eval_sha256": "a" * 64,
                                               "pairs_uri": "gs://b/pairs.txt"},
                                      "cluster": {"gcs_secret": "gcs-key"}}))
    spec, platform = _docs(tmp_path, config)
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["check-pairs"]["inputs"]["artifacts"]["images"]["taskOutputArtifact"]["producerTask"] == \
        "extract-images-2"
    assert tasks["check-pairs"]["taskInfo"]["name"].startswith("6. ")
    assert "check-pairs" in tasks["train-model"]["dependentTasks"]
    assert tasks["evaluate-on-archive"]["inputs"]["artifacts"]["pairs"]["taskOutputArtifact"]["producerTask"] == \
        "check-pairs"
    # The pairs check reads gs:// URIs: it gets the credentials.
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-check-pairs"]["secretAsVolume"][0]["secretName"] == "gcs-key"
    # Step numbers follow this DAG too: each task's upstream tasks have lower numbers.
    number = {name: _position(t["taskInfo"]["name"]) for name, t in tasks.items()}
    for name, task in tasks.items():
        upstream = set(task.get("dependentTasks", []))
        assert all(number[u] < number[name] for u in upstream), (name, upstream)


def test_compile_warns_about_the_project_default_images(tmp_path, capsys):
    """`make compile` without IMAGE_REGISTRY: one warning line naming the images and the settings."""
    from components import DEFAULT_IMAGES
    from pipelines import compile as compile_module

    def compile_with(*images):
        out = tmp_path / "p.yaml"
        out.unlink(missing_ok=True)
        code = compile_module.main(["--config", str(ROOT / "configs/demo.yaml"), "--out", str(out), *images])
        assert code == 0 and out.is_file()
        return capsys.readouterr().err.strip().splitlines()

    warning = compile_with("--light-image", DEFAULT_IMAGES.light, "--trainer-image", DEFAULT_IMAGES.trainer)
    assert len(warning) == 1 and warning[0].startswith("warning: "), warning
    assert DEFAULT_IMAGES.light in warning[0] and DEFAULT_IMAGES.trainer in warning[0]
    assert "default image references" in warning[0] and "IMAGE_REGISTRY" in warning[0] and "IMAGE_TAG" in warning[0]
    assert compile_with("--light-image", LIGHT, "--trainer-image", TRAINER) == []
    assert compile_with("--light-image", DEFAULT_IMAGES.light, "--trainer-image", DEFAULT_IMAGES.trainer,
                        "--images-exist") == []
    # A registry that merely starts like the default one is another registry.
    assert compile_with("--light-image", "ghcr.io/facenet-kfp-fork/facenet-kfp:1",
                        "--trainer-image", "ghcr.io/facenet-kfp-fork/facenet-kfp-trainer:1") == []


def test_task_names_are_the_compiled_ones(tmp_path):
    """The local rerun finds the evaluation archive's images by kfp's task name (`task_names`)."""
    from components import Images, build_components
    from pipelines.facenet_pipeline import dag_steps, task_names

    config = tmp_path / "casia.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_uri": "gs://b/casia.zip", "sha256": "",
                                               "eval_source_uri": "gs://b/lfw.tgz"}}))
    spec, _ = _docs(tmp_path, config)
    steps = dag_steps(evaluation_archive=True)
    names = task_names(steps, build_components(Images(light=LIGHT, trainer=TRAINER)))
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(names) == sorted(tasks)
    assert {name: tasks[name]["taskInfo"]["name"] for name in names} == {
        name: step.display_name for name, step in zip(names, steps)}


# --- steps by name: each step's policy, the evaluation archive's branch as edits by name -------------

def publish_model(model: dsl.Input[dsl.Model], destination: str, published: dsl.Output[dsl.Artifact]):
    """A step added after evaluate: copies the model's path to a record (stands in for a real step)."""
    with open(published.path, "w") as f:
        f.write(f"{model.path} -> {destination}")


def _with_publish_step(monkeypatch):
    """STEPS with one more row after evaluate and its component registered: all that adding a step takes."""
    import components
    from pipelines import facenet_pipeline as fp

    step = fp.Step("publish", "9. publish model", ("model",), {}, {"destination": "gs://bucket/models"},
                   after=("report",), policy=fp.Policy(retries="download_retries", backoff="10s", gcs=True))
    monkeypatch.setattr(fp, "STEPS", (*fp.STEPS, step))
    monkeypatch.setattr(components, "COMPONENTS", {**components.COMPONENTS, "publish": publish_model})
    return step


def test_a_step_added_after_evaluate_stays_in_both_dags(tmp_path, monkeypatch):
    from pipelines.facenet_pipeline import dag_steps

    publish = _with_publish_step(monkeypatch)
    plain, archive = dag_steps(evaluation_archive=False), dag_steps(evaluation_archive=True)
    assert plain[-1] == publish and archive[-1] == publish
    assert [s.name for s in plain] == ["download", "extract", "labels", "complete", "splits", "check_pairs",
                                       "train", "evaluate", "publish"]
    assert [s.name for s in archive] == ["download", "extract", "download", "extract", "labels", "complete",
                                         "splits", "check_pairs", "train", "evaluate_on_archive", "publish"]

    # Both compiled DAGs run it after evaluation, on the trained model, with its policy's settings.
    config = tmp_path / "casia.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_uri": "gs://b/casia.zip", "sha256": "",
                                               "eval_source_uri": "gs://b/lfw.tgz"},
                                      "cluster": {"gcs_secret": "gcs-key", "download_retries": 4}}))
    for source, evaluate in ((config, "evaluate-on-archive"), (ROOT / "configs/lfw.yaml", "evaluate-model")):
        spec, platform = _docs(tmp_path, source, name=f"{evaluate}.yaml")
        task = spec["root"]["dag"]["tasks"]["publish-model"]
        assert task["taskInfo"]["name"] == "9. publish model"
        assert task["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train-model"
        assert sorted(task["dependentTasks"]) == sorted([evaluate, "train-model"])
        executor = spec["deploymentSpec"]["executors"]["exec-publish-model"]["container"]
        assert executor["image"] == LIGHT
        assert executor["resources"] == spec["deploymentSpec"]["executors"]["exec-make-labels"]["container"][
            "resources"]
        k8s = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        if source == config:
            assert task["retryPolicy"]["maxRetryCount"] == 4 and task["retryPolicy"]["backoffDuration"] == "10s"
            assert k8s["exec-publish-model"]["secretAsVolume"][0]["secretName"] == "gcs-key"
            assert "emptyDirMounts" not in k8s["exec-publish-model"]
        else:
            assert task["retryPolicy"]["maxRetryCount"] == 3
            assert "exec-publish-model" not in k8s


def test_the_evaluation_archive_dag_is_steps_edited_by_name():
    """Its variants keep the rest of their step, policy included; each edit names one step."""
    from pipelines.facenet_pipeline import EVALUATION_ARCHIVE, STEPS, Branch, dag_steps, step_named

    archive = dag_steps(evaluation_archive=True)
    evaluate = step_named("evaluate_on_archive", archive)
    assert evaluate.policy == step_named("evaluate").policy
    assert evaluate.parameters == step_named("evaluate").parameters and "eval_images" in evaluate.inputs
    assert step_named("splits", archive).constants == {"test_split": False}
    downloads = [s for s in archive if s.name == "download"]
    assert [s.renamed for s in downloads] == [{}, {"archive": "eval_archive"}]
    assert downloads[1].policy == downloads[0].policy
    # Reordering STEPS' independent rows moves the edits with them.
    swapped = tuple(sorted(STEPS, key=lambda s: s.name in ("splits", "complete")))
    assert [s.name for s in EVALUATION_ARCHIVE.apply(swapped)][-2:] == ["complete", "splits"]
    with pytest.raises(ValueError, match="'missing'.*0 times"):
        Branch(replace={"missing": {}}).apply(STEPS)
    with pytest.raises(ValueError, match="'download'.*2 times"):
        Branch(insert={"download": ()}).apply(archive)


def test_policies_name_known_images_resources_and_cluster_fields(monkeypatch):
    from pipelines import facenet_pipeline as fp
    from components import Images, build_components

    with pytest.raises(ValueError, match="image 'gpu'"):
        fp.Policy(image="gpu")
    with pytest.raises(ValueError, match="resources 'huge'"):
        fp.Policy(resources="huge")
    with pytest.raises(ValueError, match="'eval_retries' is no config.cluster field"):
        fp.Policy(retries="eval_retries", backoff="1s")
    with pytest.raises(ValueError, match="go together"):
        fp.Policy(retries="train_retries")
    # The image a component is built with is its step's policy.
    assert fp.component_images()["evaluate_on_archive"] == "trainer"
    labels = dataclasses.replace(fp.step_named("labels"), policy=fp.Policy(image="trainer"))
    monkeypatch.setattr(fp, "STEPS", tuple(labels if s.name == "labels" else s for s in fp.STEPS))
    built = build_components(Images(light=LIGHT, trainer=TRAINER))
    assert built["labels"].component_spec.implementation.container.image == TRAINER
    assert built["extract"].component_spec.implementation.container.image == LIGHT
    # A component runs in one image: steps that share it must agree (extract runs twice with an archive).
    extract = dataclasses.replace(fp.step_named("extract"), policy=fp.Policy(image="trainer"))
    monkeypatch.setattr(fp, "STEPS", tuple(extract if s.name == "extract" else s for s in fp.STEPS))
    with pytest.raises(ValueError, match="'extract' name two images: trainer and light"):
        fp.component_images()


# --- face alignment: an align step after each extract (config data.align decides at compile time) -------

def _config_file(tmp_path, name, data, cluster=None):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"data": data, **({"cluster": cluster} if cluster else {})}))
    return path


ARCHIVE = {"source_uri": "gs://b/casia.zip", "sha256": "", "eval_source_uri": "gs://b/lfw.tgz",
           "pairs_uri": "gs://b/pairs.txt"}


def test_alignment_is_steps_edited_by_name_and_combines_with_the_evaluation_archive():
    from pipelines.facenet_pipeline import ALIGN, dag_steps, step_named

    assert [s.name for s in dag_steps(False, align=True)] == [
        "download", "extract", "align", "labels", "complete", "splits", "check_pairs", "train", "evaluate"]
    both = dag_steps(True, align=True)
    assert [s.name for s in both] == [
        "download", "extract", "align", "download", "extract", "align", "labels", "complete", "splits",
        "check_pairs", "train", "evaluate_on_archive"]
    assert [s.renamed for s in both if s.name in ("extract", "align")] == [
        {"images": "raw_images"}, {},
        {"archive": "eval_archive", "images": "eval_raw_images"},
        {"raw_images": "eval_raw_images", "images": "eval_images"}]
    # Both align steps are the one row's policy, parameters and rerunnability; the rest is the DAG without it.
    aligns = [s for s in both if s.name == "align"]
    assert all((s.policy, s.parameters, s.inputs, s.rerunnable) == (ALIGN.policy, ALIGN.parameters, ("raw_images",),
                                                                   True) for s in aligns)
    assert [s for s in dag_steps(True, align=True) if s.name not in ("align", "extract")] == \
        [s for s in dag_steps(True) if s.name != "extract"]
    assert step_named("labels", both).inputs == ("images",)
    assert "align" not in [s.name for s in dag_steps(False)] + [s.name for s in dag_steps(True)]


def test_aligned_images_feed_every_later_step(tmp_path):
    """With alignment (configs/lfw.yaml), extract's images reach only align; every later step reads align's."""
    spec, _ = _docs(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    align = tasks["align-faces"]
    assert align["inputs"]["artifacts"] == {"raw_images": {"taskOutputArtifact": {
        "producerTask": "extract-images", "outputArtifactKey": "images"}}}
    assert {arg: p["componentInputParameter"] for arg, p in align["inputs"]["parameters"].items()} == {
        "size": "align_size", "max_fallback_fraction": "max_align_fallback_fraction"}
    assert align["taskInfo"]["name"] == "2a. align faces"
    assert align["cachingOptions"]["enableCache"] is True
    readers = {name: a["taskOutputArtifact"]["producerTask"] for name, t in tasks.items()
               for key, a in t.get("inputs", {}).get("artifacts", {}).items() if key == "images"}
    assert readers == {"make-labels": "align-faces", "complete-identities": "align-faces",
                       "check-pairs": "align-faces", "train-model": "align-faces", "evaluate-model": "align-faces"}
    assert [name for name, t in tasks.items() if "extract-images" in t.get("dependentTasks", [])] == ["align-faces"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert (params["align_size"]["defaultValue"], params["max_align_fallback_fraction"]["defaultValue"]) == (112, 0.5)
    assert "align" not in params   # compiled in: it chose this DAG


def test_alignment_with_an_evaluation_archive_aligns_both_archives(tmp_path):
    config = _config_file(tmp_path, "casia.yaml", {**ARCHIVE, "align": "mtcnn"})
    spec, _ = _docs(tmp_path, config)
    tasks = spec["root"]["dag"]["tasks"]
    source = {name: {key: a["taskOutputArtifact"]["producerTask"] for key, a in t["inputs"]["artifacts"].items()}
              for name, t in tasks.items() if t.get("inputs", {}).get("artifacts")}
    assert source["align-faces"] == {"raw_images": "extract-images"}
    assert source["align-faces-2"] == {"raw_images": "extract-images-2"}
    assert source["check-pairs"] == {"images": "align-faces-2"}
    assert source["evaluate-on-archive"]["images"] == "align-faces"
    assert source["evaluate-on-archive"]["eval_images"] == "align-faces-2"
    assert source["make-labels"] == {"images": "align-faces"}
    assert tasks["align-faces-2"]["taskInfo"]["name"] == "2a. align faces of the evaluation archive"
    assert tasks["align-faces-2"]["inputs"]["parameters"] == tasks["align-faces"]["inputs"]["parameters"]
    # Step numbers follow this DAG too: each task's upstream tasks come earlier.
    number = {name: _position(t["taskInfo"]["name"]) for name, t in tasks.items()}
    for name, task in tasks.items():
        assert all(number[u] < number[name] for u in task.get("dependentTasks", [])), name
    # The local rerun's task names are the compiled ones.
    from components import Images, build_components
    from pipelines.facenet_pipeline import dag_steps, task_names

    steps = dag_steps(evaluation_archive=True, align=True)
    names = task_names(steps, build_components(Images(light=LIGHT, trainer=TRAINER)))
    assert sorted(names) == sorted(tasks)
    assert {name: tasks[name]["taskInfo"]["name"] for name in names} == {
        name: step.display_name for name, step in zip(names, steps)}


def test_without_alignment_the_dag_and_parameters_have_none(tmp_path):
    """configs/demo.yaml (make run) leaves data.align at none: no align task, no align parameters."""
    spec, _ = _docs(tmp_path, ROOT / "configs/demo.yaml")
    assert "align-faces" not in spec["root"]["dag"]["tasks"]
    assert not {"align_size", "max_align_fallback_fraction"} & set(spec["root"]["inputDefinitions"]["parameters"])
    assert spec["root"]["dag"]["tasks"]["make-labels"]["inputs"]["artifacts"]["images"]["taskOutputArtifact"][
        "producerTask"] == "extract-images"


def test_align_runs_in_the_trainer_image_with_its_own_resources_and_gpus(tmp_path):
    from pipelines.facenet_pipeline import ALIGN, RESOURCES

    assert (ALIGN.policy.image, ALIGN.policy.resources) == ("trainer", "align")
    assert RESOURCES["align"] == type(RESOURCES["align"])("align_cpu", "align_memory", "align_gpus")
    config = _config_file(tmp_path, "gpu.yaml", {"align": "mtcnn"}, {
        "align_cpu": "6", "align_memory": "12Gi", "align_gpus": 1,
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "gpu_toleration": {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}})
    spec, platform = _docs(tmp_path, config)
    container = spec["deploymentSpec"]["executors"]["exec-align-faces"]["container"]
    assert container["image"] == TRAINER
    resources = container["resources"]
    assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("6", "12Gi")
    assert (resources["accelerator"]["resourceCount"], resources["accelerator"]["resourceType"]) == (
        "1", "nvidia.com/gpu")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-align-faces"]
    assert k8s["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    assert k8s["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "secretAsVolume" not in k8s and "emptyDirMounts" not in k8s
    assert "retryPolicy" not in spec["root"]["dag"]["tasks"]["align-faces"]
    # By default (align_gpus 0) a CPU task of 8 CPUs, on ordinary nodes.
    spec, platform = _docs(tmp_path, name="lfw.yaml")
    resources = spec["deploymentSpec"]["executors"]["exec-align-faces"]["container"]["resources"]
    assert "accelerator" not in resources and resources["resourceCpuLimit"] == "8"
    assert "exec-align-faces" not in platform.get("platforms", {}).get("kubernetes", {}).get(
        "deploymentSpec", {}).get("executors", {})


def test_align_parameters_leave_every_other_task_cached(tmp_path):
    """Another align size or fallback limit changes the align task's parameter values only: no task's
    cache key but align's (and, through its output, those after it) changes; download and extract stay."""
    changed, params = _changed_data_parameters(tmp_path, {"align_size": 160, "max_align_fallback_fraction": 0.1})
    assert changed == {"align_size", "max_align_fallback_fraction"}
    assert params["align_size"]["defaultValue"] == 160
