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
         "complete-identities", "split-identities", "check-pairs", "train-model", "evaluate-on-archive"]
EVALUATE_INPUTS = ["eval_images", "images", "model", "pairs", "splits"]


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


def regroup_folds(pairs_txt: str, folds: int) -> str:
    """The same pairs in `folds` folds: consecutive folds of the file merged (its fold count a multiple of `folds`)."""
    lines = pairs_txt.splitlines()
    old_folds, per_fold = map(int, lines[0].split())
    merge = old_folds // folds
    blocks = [lines[1 + f * 2 * per_fold:1 + (f + 1) * 2 * per_fold] for f in range(old_folds)]
    out = [f"{folds}\t{per_fold * merge}"]
    for g in range(folds):
        group = blocks[g * merge:(g + 1) * merge]
        out += [line for block in group for line in block[:per_fold]]
        out += [line for block in group for line in block[per_fold:]]
    return "\n".join(out) + "\n"


@pytest.mark.slow
def test_train_on_casia_layout_report_on_a_separate_lfw_archive(archives, config, tmp_path, capsys):
    casia, lfw = archives["casia"], archives["lfw"]
    root = tmp_path / "outputs"
    # A pairs.txt declaring 5 folds (evaluate.folds is 10): the LFW protocol uses the file's own folds.
    pairs_file = tmp_path / "pairs-5-folds.txt"
    pairs_file.write_text(regroup_folds(lfw.pairs.read_text(), 5))
    code = run_local.main(["--config", str(config), "--pipeline-root", str(root),
                           "--source", str(casia.archive), "--sha256", casia.sha256,
                           "--eval-source", str(lfw.archive), "--eval-sha256", lfw.sha256,
                           "--pairs", str(pairs_file)])
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

    # The headline comes from the evaluation archive: its pairs.txt, in the 5 folds its header declares.
    metrics = outputs["evaluate-on-archive"]["metrics"]["metadata"]
    pairs = sum(1 for line in lfw.pairs.read_text().splitlines()[1:] if line.strip())
    assert metrics["test_pairs"] == pairs and metrics["test_folds"] == 5 and metrics["test_folds_from_file"] == 1
    assert metrics["test_same_pairs"] == metrics["test_different_pairs"] == pairs // 2
    assert (metrics["eval_identities"], metrics["eval_images"]) == (lfw.identities, lfw.images)
    assert metrics["eval_identities_in_training_archive"] == 0 and metrics["lfw_pairs_train_identities"] == 0
    assert summary["metrics"]["test_kfold_accuracy_mean"] == metrics["test_kfold_accuracy_mean"]
    assert "on the evaluation archive (30 identities" in out
    assert (f"test pairs (the evaluation archive's pairs.txt): {pairs // 2:,} same, {pairs // 2:,} different "
            f"(the file's 5 folds)") in out
    if pairs // 2 >= 100:
        assert "5-fold accuracy:" in out
    else:
        assert "accuracy withheld" in out and "5-fold accuracy:" not in out
    # VAL@FAR=1e-3 beside the FAR it reached where the 5 folds' different pairs can measure it, else n/a.
    assert pairs // 2 // 5 < 1000
    if pairs // 2 >= 1000:
        assert (f"  VAL@FAR=1e-3: {metrics['test_val_at_far_0.001']:.4f} "
                f"(FAR reached {metrics['test_far_at_far_0.001']:.4f})") in out
        assert "k-fold VAL@FAR=1e-3: n/a (needs >= 1,000 different pairs per fold)" in out
    else:
        assert "test_val_at_far_0.001" not in metrics
        assert ("  VAL@FAR=1e-3 and its k-fold variant: n/a (needs >= 1,000 different pairs, in each fold for "
                "k-fold)") in out
    assert "test_kfold_val_at_far_0.001_mean" not in metrics
    assert metrics["test_kfold_val_at_far_0.001_needs_different_pairs"] == 1000
    report = Path(outputs["evaluate-on-archive"]["report"]["uri"]).read_text()
    assert "separate evaluation archive" in report
    # The pairs were checked on the evaluation archive's images before training.
    checked = outputs["check-pairs"]["pairs"]["metadata"]
    assert (checked["pairs_uri"], checked["pairs"], checked["folds"]) == (str(pairs_file), pairs, 5)
    capsys.readouterr()

    # A rerun of evaluate from this run knows its branch: evaluation on the evaluation archive's images
    # with the run's checked pairs (imported from the run, not fetched again).
    assert run_local.main(["--rerun", "evaluate", "--from", str(root), "--config", str(config),
                           "--pipeline-root", str(root)]) == 0, capsys.readouterr().err
    evaluated = json.loads((root / "rerun-summary.json").read_text())
    assert evaluated["status"] == "SUCCEEDED" and evaluated["evaluation_archive"] is True
    assert [t["display_name"] for t in evaluated["tasks"]] == [
        *(f"import {name}" for name in EVALUATE_INPUTS), "8. evaluation on the evaluation archive"]
    assert evaluated["inputs"]["eval_images"] == outputs["extract-images-2"]["images"]["uri"]
    assert evaluated["inputs"]["pairs"] == outputs["check-pairs"]["pairs"]["uri"]
    assert (evaluated["metrics"]["test_pairs"], evaluated["metrics"]["test_folds"]) == (pairs, 5)
    assert evaluated["metrics"]["test_kfold_accuracy_mean"] == pytest.approx(metrics["test_kfold_accuracy_mean"],
                                                                             abs=1e-6)

    # Train + evaluate from there (the rerun summary lists every artifact): the new model is evaluated on
    # the evaluation archive too.
    assert run_local.main(["--rerun", "train", "--with-evaluate", "--from", str(root), "--config", str(config),
                           "--pipeline-root", str(root), "--set", "max_steps=20"]) == 0, capsys.readouterr().err
    retrained = json.loads((root / "rerun-summary.json").read_text())
    assert [(t["display_name"], t["status"]) for t in retrained["tasks"]][-2:] == [
        ("7. train embeddings", "SUCCEEDED"), ("8. evaluation on the evaluation archive", "SUCCEEDED")]
    assert sorted(retrained["inputs"]) == sorted({"images", "completion", "labels", "splits", "eval_images", "pairs"})
    assert retrained["metrics"]["train_steps"] == 20 and retrained["metrics"]["test_pairs"] == pairs


@pytest.mark.slow
@pytest.mark.parametrize("line, problem", [("Nobody_Here\t1\t2", "'Nobody_Here' is not in the dataset"),
                                           ("Nobody_Here\t1", "expected a matched pair")])
def test_a_bad_pairs_file_fails_before_training_naming_the_users_file(archives, config, tmp_path, capsys,
                                                                      line, problem):
    casia, lfw = archives["casia"], archives["lfw"]
    lines = lfw.pairs.read_text().splitlines()
    lines[1] = line
    bad = tmp_path / "my pairs.txt"
    bad.write_text("\n".join(lines) + "\n")
    root = tmp_path / "outputs"
    code = run_local.main(["--config", str(config), "--pipeline-root", str(root),
                           "--source", str(casia.archive), "--sha256", casia.sha256,
                           "--eval-source", str(lfw.archive), "--eval-sha256", lfw.sha256, "--pairs", str(bad)])
    err = capsys.readouterr().err
    summary = json.loads((root / "summary.json").read_text())
    assert code == 1 and summary["status"] == "FAILED"
    statuses = {t["name"]: t["status"] for t in summary["tasks"]}
    assert statuses["check-pairs"] == "FAILED"
    assert "train-model" not in statuses and "evaluate-on-archive" not in statuses
    error = next(t["error"] for t in summary["tasks"] if t["name"] == "check-pairs")
    assert f"{bad}" in error and problem in error and "line 2" in error
    assert "facenet-pairs-" not in error and ".tmp-" not in error
    assert "task check-pairs failed" in err
