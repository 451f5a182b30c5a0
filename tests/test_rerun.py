"""`pipelines.run_local --rerun`: finding upstream artifacts, parameters, the importer pipeline, and real local reruns."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler

from components import Images
from facenet_kfp.config import load_config
from facenet_kfp.errors import InputError
from facenet_kfp import runs
from pipelines import run_local as rerun
from pipelines.facenet_pipeline import STEPS, build_pipeline, dag_steps

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Images(light="registry.example/facenet-kfp:test", trainer="registry.example/facenet-kfp-trainer:test")
UPSTREAM = ["images", "completion", "labels", "splits"]
TRAIN_INPUTS = next(s.inputs for s in STEPS if s.name == "train")


def _fake_artifacts(folder: Path, names=("images", "completion", "labels", "splits", "pairs", "model"),
                    align: bool = False) -> dict:
    """Artifact folders laid out as in a kfp.local run folder (of the DAG with alignment with `align`), holding
    only each kind's marker file (checked pairs: a record that no pairs file was given)."""
    paths = {}
    for name in names:
        producer = rerun.producers(align)[name]
        path = folder / producer.task / producer.output
        path.mkdir(parents=True)
        (path / runs.MARKERS[name]).write_text('{"pairs_uri": ""}' if name == "pairs" else "")
        paths[name] = str(path)
    return paths


def _summary(paths: dict, status: str = "SUCCEEDED", align: bool = False) -> dict:
    """A summary.json as run_local writes it, listing `paths` as the producing tasks' outputs."""
    tasks = [{"name": "download-archive", "display_name": "1. download archive", "status": "SUCCEEDED",
              "seconds": 1.0, "outputs": {"archive": {"uri": "/elsewhere/archive", "metadata": {}}}}]
    for name, uri in paths.items():
        producer = rerun.producers(align)[name]
        tasks.append({"name": producer.task, "display_name": producer.task, "status": "SUCCEEDED", "seconds": 1.0,
                      "outputs": {producer.output: {"uri": uri, "metadata": {}}}})
    return {"pipeline": "facenet-kfp", "status": status, "tasks": tasks, "metrics": {}}


# --- wiring: the rerun pipeline is the full pipeline's steps on imported artifacts -------------

def _aligned_demo():
    """configs/demo.yaml with face alignment on: the DAG that holds every rerunnable step."""
    return load_config(ROOT / "configs/demo.yaml", {"data": {"align": "mtcnn"}})


@pytest.fixture(scope="module")
def full_pipeline_spec(tmp_path_factory) -> dict:
    config = _aligned_demo()
    out = tmp_path_factory.mktemp("full") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(config, IMAGES, cluster=False), package_path=str(out))
    return yaml.safe_load(out.read_text())


def test_the_rerunnable_steps_are_the_rows_marked_so():
    assert rerun.RERUNNABLE == ("align", "labels", "complete", "splits", "train", "evaluate")
    assert all(step.rerunnable == (step.name in rerun.RERUNNABLE) for step in dag_steps(False, align=True))


@pytest.mark.parametrize("step", rerun.RERUNNABLE)
def test_rerun_step_is_wired_as_in_the_full_pipeline(full_pipeline_spec, tmp_path, step):
    """The step's task reads the same artifacts, and its parameters hold the full pipeline's defaults."""
    inputs = {name: str(tmp_path / name) for s in dag_steps(False, align=True) if s.name == step for name in s.inputs}
    out = tmp_path / "rerun.yaml"
    compiler.Compiler().compile(rerun.build_rerun_pipeline([step], inputs, _aligned_demo(), IMAGES),
                                package_path=str(out))
    spec = yaml.safe_load(out.read_text())
    full_root = full_pipeline_spec["root"]
    full_tasks = full_root["dag"]["tasks"]
    name = next(n for n in spec["root"]["dag"]["tasks"] if not n.startswith("importer"))
    task, full = spec["root"]["dag"]["tasks"][name], full_tasks[name]
    assert set(task["inputs"]["artifacts"]) == set(full["inputs"]["artifacts"])
    defaults = {p: d.get("defaultValue") for p, d in full_root["inputDefinitions"]["parameters"].items()}
    expected = {arg: defaults[p["componentInputParameter"]] if "componentInputParameter" in p
                else p["runtimeValue"]["constant"] for arg, p in full["inputs"].get("parameters", {}).items()}
    assert {arg: p["runtimeValue"]["constant"] for arg, p in task["inputs"].get("parameters", {}).items()} == expected


def test_rerun_pipeline_imports_inputs_and_chains_evaluate(tmp_path):
    paths = _fake_artifacts(tmp_path / "run", [*UPSTREAM, "pairs"])
    config = load_config(ROOT / "configs/demo.yaml")
    pipeline = rerun.build_rerun_pipeline(["train", "evaluate"], paths, config, IMAGES)
    out = tmp_path / "rerun.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(out))
    spec = yaml.safe_load(out.read_text())
    assert spec["pipelineInfo"]["name"] == "facenet-kfp-rerun-train"
    tasks = spec["root"]["dag"]["tasks"]
    importers = {name: t for name, t in tasks.items() if name.startswith("importer")}
    assert len(importers) == 5 and set(tasks) == set(importers) | {"train-model", "evaluate-model"}
    executors = spec["deploymentSpec"]["executors"]
    uris = {}
    for name, task in importers.items():
        importer = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]["importer"]
        uris[task["taskInfo"]["name"]] = (importer["artifactUri"]["constant"], importer["typeSchema"]["schemaTitle"],
                                          importer.get("reimport", False))
    assert uris == {"import images": (paths["images"], "system.Dataset", False),
                    "import completion": (paths["completion"], "system.Dataset", False),
                    "import labels": (paths["labels"], "system.Artifact", False),
                    "import splits": (paths["splits"], "system.Artifact", False),
                    "import pairs": (paths["pairs"], "system.Artifact", False)}
    evaluate = tasks["evaluate-model"]["inputs"]["artifacts"]
    assert evaluate["model"]["taskOutputArtifact"] == {"producerTask": "train-model", "outputArtifactKey": "model"}
    # Evaluate shares the imported images and splits with train.
    assert evaluate["images"] == tasks["train-model"]["inputs"]["artifacts"]["images"]
    train_params = tasks["train-model"]["inputs"]["parameters"]
    assert train_params["architecture"]["runtimeValue"]["constant"] == "small_cnn"
    assert train_params["max_steps"]["runtimeValue"]["constant"] == 400


# --- where the artifacts come from --------------------------------------------------------

def test_sources_run_folder_summary_root_and_pairs(tmp_path):
    run = tmp_path / "local_outputs" / "facenet-kfp-2026-01-01-00-00-00-000000"
    paths = _fake_artifacts(run)
    assert runs.resolve_source(str(run), rerun.producers())[0] == paths

    root = tmp_path / "local_outputs"
    (root / "summary.json").write_text(json.dumps(_summary(paths)))
    found, where = runs.resolve_source(str(root), rerun.producers())
    assert found == paths and where.endswith("summary.json")
    assert runs.resolve_source(str(root / "summary.json"), rerun.producers())[0] == paths

    # A newer rerun summary wins for the pipeline root; its `artifacts` are read too.
    new_model = _fake_artifacts(tmp_path / "rerun", ["model"])["model"]
    rerun_summary = {"pipeline": "facenet-kfp-rerun-train", "status": "SUCCEEDED",
                     "tasks": _summary({"model": new_model})["tasks"][1:],
                     "artifacts": {name: paths[name] for name in UPSTREAM}}
    (root / "rerun-summary.json").write_text(json.dumps(rerun_summary))
    os.utime(root / "summary.json", ns=(1_000_000_000, 1_000_000_000))
    found, where = runs.resolve_source(str(root), rerun.producers())
    assert where.endswith("rerun-summary.json")
    assert found == {**{name: paths[name] for name in UPSTREAM}, "model": new_model}

    pairs = runs.resolve_source(f"images={paths['images']},model={new_model}", rerun.producers())[0]
    assert pairs == {"images": paths["images"], "model": new_model}

    # Later sources win, per artifact.
    found, described = runs.resolve_sources([str(run), f"model={new_model}"], rerun.producers())
    assert found == {**paths, "model": new_model} and len(described) == 2


def test_failed_run_summary_still_gives_the_data_artifacts(tmp_path):
    paths = _fake_artifacts(tmp_path / "run", UPSTREAM)
    summary = _summary(paths, status="FAILED")
    summary["tasks"].append({"name": "train-model", "display_name": "6. train", "status": "FAILED",
                             "seconds": 3.0, "outputs": {}, "error": "InputError: bad"})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    found = runs.resolve_source(str(tmp_path / "summary.json"), rerun.producers())[0]
    assert found == paths
    assert runs.check_inputs(TRAIN_INPUTS, found, ["x"], rerun.producers()) == paths


def test_check_inputs_names_what_is_missing(tmp_path):
    paths = _fake_artifacts(tmp_path / "run", ["images", "labels", "splits"])
    with pytest.raises(InputError, match=r"completion \(from complete-identities\).*--from completion=PATH"):
        runs.check_inputs(TRAIN_INPUTS, paths, ["run folder x"], rerun.producers())
    (Path(paths["labels"]) / "labels.json").unlink()
    with pytest.raises(InputError, match=r"artifact labels: .*labels\.json not found"):
        runs.check_inputs(("labels",), paths, ["x"], rerun.producers())
    with pytest.raises(InputError, match=r"artifact images: folder .*nowhere not found"):
        runs.check_inputs(("images",), {"images": str(tmp_path / "nowhere")}, ["x"], rerun.producers())
    with pytest.raises(InputError, match="not a local path"):
        runs.check_inputs(("images",), {"images": "gs://bucket/images"}, ["x"], rerun.producers())


@pytest.mark.parametrize("spec, message", [
    ("nowhere/at/all", "no such file or folder"),
    ("images=/a,weights=/b", "'weights=/b' is not name=path"),
    ("model=gs://bucket/model", "not a local path"),
])
def test_bad_sources(tmp_path, spec, message):
    with pytest.raises(InputError, match=message):
        runs.resolve_source(spec, rerun.producers())


def test_folder_that_is_neither_root_nor_run(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(InputError, match="neither a pipeline root .* nor a run folder"):
        runs.resolve_source(str(tmp_path), rerun.producers())
    (tmp_path / "summary.json").write_text(json.dumps({"status": "SUCCEEDED"}))
    with pytest.raises(InputError, match="not a pipeline summary"):
        runs.resolve_source(str(tmp_path), rerun.producers())


# --- --set ----------------------------------------------------------------------------------

def test_set_accepts_config_keys_parameter_names_and_plain_keys():
    overrides = rerun.rerun_overrides(["train_learning_rate=0.0005", "max_steps=12", "train.squared=false",
                                       "checkpoint_root=0123", "architecture=small_cnn"], ["train"])
    assert overrides == {"train": {"learning_rate": 0.0005, "max_steps": 12, "squared": False,
                                   "architecture": "small_cnn"},
                         "cluster": {"checkpoint_root": "0123"}}
    assert rerun.rerun_overrides(["folds=5", "pairs_uri=/data/pairs.txt", "far_targets=[0.01]"], ["evaluate"]) == {
        "evaluate": {"folds": 5, "far_targets": (0.01,)}, "data": {"pairs_uri": "/data/pairs.txt"}}
    assert rerun.rerun_overrides(["split_seed=3"], ["splits"]) == {"data": {"split_seed": 3}}
    with_eval = rerun.rerun_overrides(["seed=3", "eval_seed=4"], ["train", "evaluate"])
    assert with_eval == {"train": {"seed": 3}, "evaluate": {"seed": 4}}


@pytest.mark.parametrize("item, steps, message", [
    ("learnig_rate=0.1", ["train"], "--set learnig_rate: not a config key"),
    ("eval_folds=5", ["train"], "step train does not read eval_folds .add --with-evaluate"),
    ("train_max_steps=5", ["evaluate"], "step evaluate does not read train_max_steps"),
    ("multiple=8", ["labels"], "reads: no parameters"),
    ("seed=3", ["splits"], "step splits does not read data.seed|seed: not a config key"),
    ("cluster.train_gpus=1", ["train"], "does not read cluster.train_gpus; it reads: checkpoint_root"),
    ("no_value", ["train"], "expected key=value"),
    ("max_steps=many", ["train"], r"max_steps must be int, got 'many'"),
])
def test_set_errors(item, steps, message):
    with pytest.raises(InputError, match=message):
        rerun.rerun_overrides([item], steps)


def test_set_values_are_type_checked_by_the_config(tmp_path):
    paths = _fake_artifacts(tmp_path / "run", UPSTREAM)
    with pytest.raises(InputError, match=r"train\.max_steps must be int, got 'many'"):
        rerun.rerun("train", [str(tmp_path / "run")], str(ROOT / "configs/demo.yaml"), str(tmp_path / "out"),
                    sets=["train.max_steps=many"])
    with pytest.raises(InputError, match=r"train\.k \(8\) must equal data\.multiple \(4\)"):
        rerun.rerun("train", [str(tmp_path / "run")], str(ROOT / "configs/demo.yaml"), str(tmp_path / "out"),
                    sets=["k=8"])
    assert not (tmp_path / "out").exists()


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--rerun", "extract", "--from", "x"], "unknown step 'extract'; rerunnable: align, labels, complete, splits, train, evaluate"),
    (["--rerun", "evaluate", "--with-evaluate", "--from", "x"], "--with-evaluate applies to --rerun train only"),
    (["--rerun", "train"], "--from is required"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, argv, message):
    assert rerun.main([*argv, "--pipeline-root", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_artifact_exits_2(tmp_path, capsys):
    _fake_artifacts(tmp_path / "run", ["images", "splits", "pairs"])
    code = rerun.main(["--rerun", "evaluate", "--from", str(tmp_path / "run"),
                       "--pipeline-root", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    # Only the model: the run folder has the images, splits and checked pairs evaluate also reads.
    assert f"missing input artifact(s) model (from train-model) in run folder {tmp_path / 'run'};" in err
    assert not (tmp_path / "out").exists()


def test_evaluate_without_checked_pairs_is_refused_unless_a_pairs_file_is_set(tmp_path):
    """A run made before the check pairs step has no checked pairs: refused before anything runs, with
    the way out; `--set pairs_uri=...` makes the rerun check that file itself (only the model is missing)."""
    _fake_artifacts(tmp_path / "run", ["images", "splits"])
    config = str(ROOT / "configs/demo.yaml")
    with pytest.raises(InputError, match=r"model \(from train-model\), pairs \(from check-pairs\).*"
                                         r"--set pairs_uri=URI \(--set pairs_uri= for none\)"):
        rerun.rerun("evaluate", [str(tmp_path / "run")], config, str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"missing input artifact\(s\) model \(from train-model\) in run"):
        rerun.rerun("evaluate", [str(tmp_path / "run")], config, str(tmp_path / "out"),
                    sets=["pairs_uri=/data/pairs.txt"])
    assert not (tmp_path / "out").exists()
    # A checked-pairs folder that is no such record is refused before anything runs too.
    paths = _fake_artifacts(tmp_path / "other", ["images", "splits", "pairs", "model"])
    (Path(paths["pairs"]) / "pairs.json").write_text('{"pairs_uri": "gs://b/pairs.txt", "sha256": "x"}')
    with pytest.raises(InputError, match=r"pairs\.txt: not found, though .*records the pairs file gs://b/pairs\.txt"):
        rerun.rerun("evaluate", [str(tmp_path / "other")], config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _eval_archive_run(folder: Path, names=("images", "completion", "labels", "splits", "pairs", "model",
                                          "eval_images")) -> dict:
    """A run folder of the DAG with an evaluation archive: its images in extract-images-2, splits without test."""
    paths = _fake_artifacts(folder, names)
    if "splits" in paths:
        (Path(paths["splits"]) / "provenance.json").write_text(json.dumps({"artifact": "splits", "test_split": False}))
    return paths


def test_a_run_with_an_evaluation_archive_is_rerun_in_its_branch(tmp_path):
    """Its images are found (extract-images-2), and evaluate is evaluation on that archive with the run's
    checked pairs; splits are remade without a test split, as in that run."""
    paths = _eval_archive_run(tmp_path / "run")
    found, _ = runs.resolve_source(str(tmp_path / "run"), rerun.producers())
    assert found == paths and found["eval_images"].endswith("extract-images-2/images")
    assert runs.used_evaluation_archive(found)
    (tmp_path / "summary.json").write_text(json.dumps(_summary(paths)))
    assert runs.resolve_source(str(tmp_path / "summary.json"), rerun.producers())[0] == paths

    config = load_config(ROOT / "configs/demo.yaml")
    needed = ("model", "images", "splits", "eval_images", "pairs")
    out = tmp_path / "rerun.yaml"
    compiler.Compiler().compile(rerun.build_rerun_pipeline(["evaluate"], {n: paths[n] for n in needed}, config,
                                                           IMAGES, evaluation_archive=True), package_path=str(out))
    tasks = yaml.safe_load(out.read_text())["root"]["dag"]["tasks"]
    assert set(tasks) - {n for n in tasks if n.startswith("importer")} == {"evaluate-on-archive"}
    assert set(tasks["evaluate-on-archive"]["inputs"]["artifacts"]) == set(needed)
    assert tasks["evaluate-on-archive"]["taskInfo"]["name"] == "8. evaluation on the evaluation archive"

    compiler.Compiler().compile(rerun.build_rerun_pipeline(["splits"], {"labels": paths["labels"]}, config, IMAGES,
                                                           evaluation_archive=True), package_path=str(out))
    splits = yaml.safe_load(out.read_text())["root"]["dag"]["tasks"]["split-identities"]
    assert splits["inputs"]["parameters"]["test_split"]["runtimeValue"]["constant"] is False


@pytest.mark.parametrize("with_evaluate", [False, True])
def test_evaluation_archive_images_missing_is_refused_before_anything_runs(tmp_path, with_evaluate):
    """Splits without a test split say the run evaluated on another archive; without that archive's
    images a rerun of evaluate (or train + evaluate) stops before any task, naming what to give."""
    _eval_archive_run(tmp_path / "run", ("images", "completion", "labels", "splits", "pairs", "model"))
    assert runs.used_evaluation_archive(runs.resolve_source(str(tmp_path / "run"), rerun.producers())[0])
    step = "train" if with_evaluate else "evaluate"
    with pytest.raises(InputError, match=r"missing input artifact\(s\) eval_images \(from extract-images-2\)"
                                         r".*--from eval_images=PATH"):
        rerun.rerun(step, [str(tmp_path / "run")], str(ROOT / "configs/demo.yaml"), str(tmp_path / "out"),
                    with_evaluate=with_evaluate)
    assert not (tmp_path / "out").exists()
    # A train rerun alone does not need them.
    assert "eval_images" not in runs.check_inputs(TRAIN_INPUTS, runs.resolve_source(
        str(tmp_path / "run"), rerun.producers())[0], ["x"], rerun.producers())


# --- real reruns on kfp.local -----------------------------------------------------------------

def test_rerun_splits_with_a_new_seed(tmp_path, capsys):
    """A light step end to end on kfp.local: labels of a small packed dataset, splits rerun with --set."""
    from facenet_kfp.labels import build_labels
    from facenet_kfp.shards import ShardWriter

    names = [f"Person_{i:02d}" for i in range(20)]
    with ShardWriter(tmp_path / "images") as writer:   # labels reads the manifest only
        for i, name in enumerate(names):
            for n in range(1, 3 + i % 3):
                writer.add(name, f"{name}/{name}_{n:04d}.jpg", b"\xff\xd8 not decoded by labels")
    labels = tmp_path / "run" / "make-labels" / "labels"
    build_labels(tmp_path / "images", labels)
    root = tmp_path / "out"
    code = rerun.main(["--rerun", "splits", "--from", str(tmp_path / "run"), "--set", "split_seed=5",
                       "--pipeline-root", str(root)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((root / "rerun-summary.json").read_text())
    assert summary["status"] == "SUCCEEDED" and summary["parameters"]["split_seed"] == 5
    splits = Path(summary["artifacts"]["splits"])
    assert splits.parent.name == "split-identities" and splits.parent.parent.parent == root
    written = {line.split("\t")[0] for part in ("train", "val", "test")
               for line in (splits / f"{part}.txt").read_text().splitlines()}
    assert written == set(names)
    assert summary["artifacts"]["labels"] == str(labels)
    assert "5. identity splits" in capsys.readouterr().out


def test_failed_rerun_names_the_task_and_exits_1(tmp_path, capsys):
    images = tmp_path / "run" / "extract-images" / "images"
    images.mkdir(parents=True)
    (images / "manifest.jsonl").write_text("")
    root = tmp_path / "out"
    assert rerun.main(["--rerun", "labels", "--from", str(tmp_path / "run"), "--pipeline-root", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: task make-labels failed:") and "manifest.jsonl: no images" in err[-1]
    summary = json.loads((root / "rerun-summary.json").read_text())
    assert summary["status"] == "FAILED"
    assert [(t["display_name"], t["status"]) for t in summary["tasks"]] == [
        ("import images", "SUCCEEDED"), ("3. label JSON", "FAILED")]
    assert summary["artifacts"] == {"images": str(images)}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A run folder with real extract/labels/complete/splits outputs of 30 generated identities."""
    from facenet_kfp.complete import complete_dataset
    from facenet_kfp.extract import extract_dataset
    from facenet_kfp.labels import build_labels
    from facenet_kfp.pairs import check_pairs_source
    from facenet_kfp.splits import make_splits
    from facenet_kfp.synth import generate_demo_archive

    base = tmp_path_factory.mktemp("upstream")
    run = base / "facenet-kfp-2026-01-01-00-00-00-000000"
    demo = generate_demo_archive(base / "demo", identities=30, workers=1)
    extract_dataset(demo.archive, run / "extract-images" / "images", shard_size_mb=4, workers=1)
    build_labels(run / "extract-images" / "images", run / "make-labels" / "labels")
    complete_dataset(run / "extract-images" / "images", run / "make-labels" / "labels",
                     run / "complete-identities" / "completion", multiple=4, workers=1)
    make_splits(run / "make-labels" / "labels", run / "split-identities" / "splits")
    check_pairs_source("", "", run / "extract-images" / "images", run / "check-pairs" / "pairs")
    return run


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    config = {"data": {"multiple": 4},
              "train": {"architecture": "small_cnn", "image_size": 32, "embedding_dim": 16, "p": 4, "k": 4,
                        "max_steps": 10, "warmup_steps": 0, "validate_every": 5, "validation_batches": 1,
                        "checkpoint_every": 10, "log_every": 5, "precision": "float32"},
              "evaluate": {"max_positive_pairs": 50, "report_examples": 2, "folds": 2, "batch_size": 32},
              "cluster": {"train_gpus": 0}}
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_rerun_train_then_evaluate_from_its_summary(upstream, tiny_config, tmp_path, capsys):
    root = tmp_path / "outputs"
    code = rerun.main(["--rerun", "train", "--from", str(upstream), "--config", str(tiny_config),
                       "--pipeline-root", str(root), "--set", "train_learning_rate=0.0005", "--set", "seed=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((root / "rerun-summary.json").read_text())
    assert summary["status"] == "SUCCEEDED" and summary["step"] == "train"
    assert summary["inputs"] == {name: str(upstream / rerun.producers()[name].task / name) for name in UPSTREAM}
    # DAG order: the importers (by name), then the step.
    assert [(t["display_name"], t["status"]) for t in summary["tasks"]] == [
        (name, "SUCCEEDED") for name in ("import completion", "import images", "import labels",
                                         "import splits", "7. train embeddings")]
    model = Path(summary["metrics"]["model_uri"])
    assert (model / "model.keras").is_file() and json.loads((model / "model.json").read_text())["embedding_dim"] == 16
    assert model.parent.parent.parent == root and model.parent.name == "train-model"
    assert summary["metrics"]["train_steps"] == 10
    assert summary["parameters"]["train_learning_rate"] == 0.0005 and summary["parameters"]["train_seed"] == 1
    assert summary["artifacts"]["model"] == str(model)
    assert "7. train embeddings" in out and re.search(r"trained model:\s+" + re.escape(str(model)), out)

    # Same inputs and parameters: the train task is a cache hit and points at the same model.
    assert rerun.main(["--rerun", "train", "--from", str(upstream), "--config", str(tiny_config),
                       "--pipeline-root", str(root), "--set", "train_learning_rate=0.0005", "--set", "seed=1"]) == 0
    again = json.loads((root / "rerun-summary.json").read_text())
    train = [t for t in again["tasks"] if t["name"] == "train-model"][0]
    assert train["status"] == "CACHED" and again["metrics"]["model_uri"] == str(model)
    capsys.readouterr()

    # Evaluate the new model: the pipeline root's newest summary is the rerun's, which lists every artifact.
    assert rerun.main(["--rerun", "evaluate", "--from", str(root), "--config", str(tiny_config),
                       "--pipeline-root", str(root)]) == 0
    evaluated = json.loads((root / "rerun-summary.json").read_text())
    assert evaluated["status"] == "SUCCEEDED" and evaluated["inputs"]["model"] == str(model)
    metrics = evaluated["metrics"]
    assert [t["display_name"] for t in evaluated["tasks"]] == ["import images", "import model", "import pairs",
                                                              "import splits", "8. threshold evaluation"]
    assert evaluated["inputs"]["pairs"] == str(upstream / "check-pairs" / "pairs")
    threshold = json.loads(Path(metrics["threshold_uri"]).read_text())
    assert threshold["model"] == str(model) and threshold["threshold"] > 0
    assert f"threshold: {threshold['threshold']:.4f}" in capsys.readouterr().out

    # Another pairs file: the rerun checks it first, and a bad one stops it before evaluation, naming it.
    bad = tmp_path / "my-pairs.txt"
    bad.write_text("1\nNobody\t1\t2\nNobody\t1\tSomeone\t2\n")
    assert rerun.main(["--rerun", "evaluate", "--from", str(root), "--config", str(tiny_config),
                       "--pipeline-root", str(root), "--set", f"pairs_uri={bad}"]) == 1
    failed = json.loads((root / "rerun-summary.json").read_text())
    assert [(t["display_name"], t["status"]) for t in failed["tasks"]][-1] == ("6. check pairs.txt", "FAILED")
    assert "evaluate-model" not in {t["name"] for t in failed["tasks"]}
    assert f"{bad}: 2 of 2 pairs name" in failed["error"] and "'Nobody' is not in the dataset" in failed["error"]


# --- align: rerunnable in the DAG with face alignment ---------------------------------------------

@pytest.mark.parametrize("evaluation_archive", [False, True])
def test_rerun_align_aligns_the_imported_raw_images(tmp_path, evaluation_archive):
    """A rerun of align is the training archive's align task on imported extract output (raw_images), with
    the config's align parameters, whether or not the config turns alignment on or names an evaluation archive."""
    config = load_config(ROOT / "configs/demo.yaml", {"data": {"align_size": 96, "max_align_fallback_fraction": 0.25}})
    assert config.data.align == "none"
    steps = rerun.rerun_steps(["align"], evaluation_archive)
    assert [(s.name, s.display_name, s.renamed) for s in steps] == [("align", "2a. align faces", {})]
    out = tmp_path / "rerun.yaml"
    compiler.Compiler().compile(rerun.build_rerun_pipeline(["align"], {"raw_images": str(tmp_path / "raw")}, config,
                                                           IMAGES, evaluation_archive), package_path=str(out))
    spec = yaml.safe_load(out.read_text())
    assert spec["pipelineInfo"]["name"] == "facenet-kfp-rerun-align"
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "align-faces"}
    align = tasks["align-faces"]
    assert align["inputs"]["artifacts"]["raw_images"]["taskOutputArtifact"]["producerTask"] == "importer"
    assert {arg: p["runtimeValue"]["constant"] for arg, p in align["inputs"]["parameters"].items()} == {
        "size": 96, "max_fallback_fraction": 0.25}
    assert align["taskInfo"]["name"] == "2a. align faces"


def test_rerun_align_takes_only_its_own_parameters():
    assert rerun.rerun_overrides(["align_size=128", "data.max_align_fallback_fraction=0.1"], ["align"]) == {
        "data": {"align_size": 128, "max_align_fallback_fraction": 0.1}}
    with pytest.raises(InputError, match=r"step align does not read train_max_steps; it reads: align_size, "
                                         r"max_align_fallback_fraction"):
        rerun.rerun_overrides(["train_max_steps=5"], ["align"])
    with pytest.raises(InputError, match="step align does not read data.align"):
        rerun.rerun_overrides(["data.align=mtcnn"], ["align"])


def test_a_run_with_alignment_gives_its_aligned_images(tmp_path):
    """In a run with the align step, images are the align task's output and extract's are raw_images, from
    its run folder and from its summary; a run without alignment keeps extract's images."""
    paths = _fake_artifacts(tmp_path / "run", ("raw_images", "images", "labels", "splits"), align=True)
    assert paths["images"].endswith("align-faces/images") and paths["raw_images"].endswith("extract-images/images")
    found, _ = runs.resolve_source(str(tmp_path / "run"), rerun.producers(), rerun.producers(align=True))
    assert found == paths
    (tmp_path / "summary.json").write_text(json.dumps(_summary(paths, align=True)))
    assert runs.resolve_source(str(tmp_path / "summary.json"), rerun.producers(), rerun.producers(align=True))[0] \
        == paths
    plain = _fake_artifacts(tmp_path / "plain", ("images", "labels"))
    assert runs.resolve_source(str(tmp_path / "plain"), rerun.producers(), rerun.producers(align=True))[0] == plain
