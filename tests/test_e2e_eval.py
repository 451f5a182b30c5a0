"""A run that trains on a CASIA-WebFace-layout archive and reports on a separate LFW-layout archive."""

import json
from pathlib import Path

import pytest
import yaml

from facenet_kfp.synth import generate_demo_archive
from pipelines import run_local
from pipelines.run_local import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["download-archive", "download-archive-2", "extract-images", "extract-images-2", "make-labels",
         "complete-identities", "split-identities", "train-model", "evaluate-on-archive"]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("archives")
    casia = generate_demo_archive(base / "casia", identities=40, seed=5, workers=1, layout="casia")
    lfw = generate_demo_archive(base / "lfw", identities=30, seed=6, workers=1)
    return {"casia": casia, "lfw": lfw}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=40, validate_every=20, checkpoint_every=20, log_every=10, image_size=32,
                           p=8, validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=2, flip=False)
    path = tmp_path_factory.mktemp("cfg") / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_train_on_casia_layout_report_on_a_separate_lfw_archive(archives, config, tmp_path, capsys):
    casia, lfw = archives["casia"], archives["lfw"]
    root = tmp_path / "outputs"
    code = run_local.main(["--config", str(config), "--pipeline-root", str(root),
                           "--source", str(casia.archive), "--sha256", casia.sha256,
                           "--eval-source", str(lfw.archive), "--eval-sha256", lfw.sha256,
                           "--pairs", str(lfw.pairs)])
    out = capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    assert code == 0, summary.get("error")
    assert sorted(t["name"] for t in summary["tasks"]) == sorted(TASKS)
    outputs = {t["name"]: t["outputs"] for t in summary["tasks"]}
    assert outputs["extract-images"]["images"]["metadata"]["layout"]["name"] == "casia"
    assert outputs["extract-images-2"]["images"]["metadata"]["layout"]["name"] == "lfw"

    # Training saw only the CASIA identities, and all of them in train or validation: no test split.
    labels = json.loads((Path(outputs["make-labels"]["labels"]["uri"]) / "labels.json").read_text())
    splits = Path(outputs["split-identities"]["splits"]["uri"])
    train = [line.split("\t")[0] for line in (splits / "train.txt").read_text().splitlines()]
    val = [line.split("\t")[0] for line in (splits / "val.txt").read_text().splitlines()]
    assert (splits / "test.txt").read_text() == ""
    assert sorted(train + val) == sorted(labels) and len(labels) == 40
    assert all(name.isdigit() for name in train + val)

    # The headline comes from the evaluation archive: its pairs.txt, in its 10 folds.
    metrics = outputs["evaluate-on-archive"]["metrics"]["metadata"]
    pairs = sum(1 for line in lfw.pairs.read_text().splitlines()[1:] if line.strip())
    assert metrics["test_pairs"] == pairs and metrics["test_folds"] == 10
    assert (metrics["eval_identities"], metrics["eval_images"]) == (lfw.identities, lfw.images)
    assert metrics["eval_identities_in_training_archive"] == 0 and metrics["lfw_pairs_train_identities"] == 0
    assert summary["metrics"]["test_kfold_accuracy_mean"] == metrics["test_kfold_accuracy_mean"]
    assert "on the evaluation archive (30 identities" in out and "10-fold accuracy:" in out
    report = Path(outputs["evaluate-on-archive"]["report"]["uri"]).read_text()
    assert "separate evaluation archive" in report
