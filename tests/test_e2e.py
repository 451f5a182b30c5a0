"""One real local pipeline run end to end (kfp.local SubprocessRunner), run twice for the cache."""

import json
from pathlib import Path

import pytest
import yaml

from pipelines.run_local import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["download-archive", "extract-images", "make-labels", "complete-identities",
         "split-identities", "train-model", "evaluate-model"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=30, validate_every=15, checkpoint_every=15, log_every=5,
                           image_size=32, p=8, validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=4)
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_pipeline_runs_end_to_end_then_from_cache(tmp_path, demo_archive, tiny_config):
    root = tmp_path / "outputs"
    first = run_pipeline(str(tiny_config), str(demo_archive["archive"]), demo_archive["sha256"],
                         str(demo_archive["pairs"]), str(root))
    assert first["status"] == "SUCCEEDED", first.get("error")
    assert [t["name"] for t in first["tasks"]] == TASKS
    assert all(t["status"] == "SUCCEEDED" for t in first["tasks"])
    saved = json.loads((root / "summary.json").read_text())
    assert saved["status"] == "SUCCEEDED" and len(saved["tasks"]) == 7

    outputs = {t["name"]: t["outputs"] for t in first["tasks"]}
    assert outputs["download-archive"]["archive"]["metadata"]["sha256"] == demo_archive["sha256"]
    images = Path(outputs["extract-images"]["images"]["uri"])
    assert (images / "manifest.jsonl").is_file() and len(list((images / "shards").glob("*.tar"))) >= 1
    labels = json.loads((Path(outputs["make-labels"]["labels"]["uri"]) / "labels.json").read_text())
    assert list(labels) == sorted(labels) and list(labels.values()) == list(range(len(labels)))
    splits = Path(outputs["split-identities"]["splits"]["uri"])
    assert {p.name for p in splits.iterdir()} >= {"train.txt", "val.txt", "test.txt"}

    # Evaluation artifacts the UI renders: metrics, ROC + confusion matrix, HTML report, threshold.json.
    evaluation = outputs["evaluate-model"]
    metrics = evaluation["metrics"]["metadata"]
    for key in ("test_accuracy", "test_auc", "test_kfold_accuracy_mean", "threshold",
                "lfw_pairs_kfold_accuracy_mean"):
        assert 0.0 <= metrics[key] <= 4.0, key
    roc = evaluation["roc"]["metadata"]
    assert len(roc["confidenceMetrics"]) >= 2 and roc["confusionMatrix"]["annotationSpecs"]
    report = Path(evaluation["report"]["uri"]).read_text()
    assert "<html" in report.lower() and "data:image/png;base64" in report
    threshold = json.loads(Path(evaluation["threshold"]["uri"]).read_text())
    assert threshold["distance"] in ("squared_l2", "l2") and threshold["threshold"] > 0
    assert first["metrics"]["test_accuracy"] == metrics["test_accuracy"]

    second = run_pipeline(str(tiny_config), str(demo_archive["archive"]), demo_archive["sha256"],
                          str(demo_archive["pairs"]), str(root))
    assert second["status"] == "SUCCEEDED"
    assert [t["status"] for t in second["tasks"]] == ["CACHED"] * 7
    assert second["metrics"]["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.slow
def test_failed_task_fails_the_run_and_names_it(tmp_path, demo_archive, tiny_config):
    summary = run_pipeline(str(tiny_config), str(demo_archive["archive"]), "0" * 64, None,
                           str(tmp_path / "outputs"))
    assert summary["status"] == "FAILED"
    assert [t["status"] for t in summary["tasks"]] == ["FAILED"]
    assert "download-archive" in summary["error"] and "sha256" in summary["error"]
    assert json.loads((tmp_path / "outputs" / "summary.json").read_text())["status"] == "FAILED"
