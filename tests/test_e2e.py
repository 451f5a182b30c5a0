"""The local runner end to end (kfp.local SubprocessRunner): a real run, its cache, failures, what data it uses."""

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml

from pipelines import run_local
from facenet_kfp.runs import data_sources
from pipelines.run_local import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
LFW = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())["data"]
# The seven tasks in DAG order (the step numbers of their display names).
TASKS = ["download-archive", "extract-images", "make-labels", "complete-identities",
         "split-identities", "train-model", "evaluate-model"]
# Floors (chance: 0.5) of the tiny config on the 40-identity demo archive. Measured with train,
# split and completion seed s = 0..7: test AUC 0.82-0.99, test accuracy 0.67-0.93 (a threshold
# chosen on 2-5 validation identities, tested on 2-5 others), on the demo pairs.txt AUC 0.91-0.96
# and 10-fold accuracy 0.83-0.91. The test runs s = 0: 0.90, 0.70, 0.94 and 0.88.
FLOORS = {"test_auc": 0.75, "test_accuracy": 0.6, "lfw_pairs_auc": 0.85, "lfw_pairs_kfold_accuracy_mean": 0.75}


def write_config(folder: Path, name: str, config: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The demo config cut to about a minute on 2 CPU cores; it names no source (the demo archive)."""
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    config["train"].update(max_steps=60, validate_every=15, checkpoint_every=15, log_every=5,
                           image_size=32, p=8, validation_batches=2)
    config["evaluate"].update(max_positive_pairs=200, report_examples=4)
    return write_config(tmp_path_factory.mktemp("cfg"), "tiny.yaml", config)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- real runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_run_end_to_end_then_from_cache(tmp_path, demo_archive, tiny_config):
    """No source anywhere: the demo archive and (PAIRS=demo) its pairs.txt, checked by sha256."""
    root = tmp_path / "outputs"
    first = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]))
    assert first["status"] == "SUCCEEDED", first.get("error")
    assert [(t["name"], t["status"]) for t in first["tasks"]] == [(name, "SUCCEEDED") for name in TASKS]
    assert [t["display_name"][:2] for t in first["tasks"]] == [f"{n}." for n in range(1, 8)]
    assert json.loads((root / "summary.json").read_text()) == first
    assert first["source_uri"] == str(demo_archive["archive"]) and first["pairs_uri"] == str(demo_archive["pairs"])

    outputs = {t["name"]: t["outputs"] for t in first["tasks"]}
    assert outputs["download-archive"]["archive"]["metadata"]["sha256"] == demo_archive["sha256"]
    images = Path(outputs["extract-images"]["images"]["uri"])
    assert (images / "manifest.jsonl").is_file() and len(list((images / "shards").glob("*.tar"))) >= 1

    # Evaluation artifacts the UI renders: metrics, ROC + confusion matrix, HTML report, threshold.json.
    evaluation = outputs["evaluate-model"]
    metrics = evaluation["metrics"]["metadata"]
    # The tiny run beats chance on held-out identities and on the demo pairs.txt.
    assert {key: metrics[key] for key in FLOORS if metrics[key] < FLOORS[key]} == {}
    roc = evaluation["roc"]["metadata"]
    assert len(roc["confidenceMetrics"]) >= 2 and roc["confusionMatrix"]["annotationSpecs"]
    report = Path(evaluation["report"]["uri"]).read_text()
    assert "<html" in report.lower() and "data:image/png;base64" in report
    threshold = json.loads(Path(evaluation["threshold"]["uri"]).read_text())
    assert threshold["threshold"] == metrics["threshold"] and threshold["distance"] == "squared_l2"
    assert first["metrics"]["test_accuracy"] == metrics["test_accuracy"]

    second = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]))
    assert [(t["name"], t["status"]) for t in second["tasks"]] == [(name, "CACHED") for name in TASKS]
    assert second["metrics"]["test_accuracy"] == metrics["test_accuracy"]

    # A wrong pairs checksum reaches evaluate (a new cache key there only) and fails it.
    third = run_pipeline(str(tiny_config), None, None, "demo", str(root), demo_dir=str(demo_archive["dir"]),
                         pairs_sha256="0" * 64)
    assert [(t["name"], t["status"]) for t in third["tasks"]] == \
        [(name, "CACHED") for name in TASKS[:-1]] + [("evaluate-model", "FAILED")]
    assert "evaluate-model" in third["error"] and "sha256" in third["error"]

    # `make run SET=...`: a config key typed by its field; only the step that reads it runs again.
    code = run_local.main(["--config", str(tiny_config), "--pipeline-root", str(root), "--pairs", "demo",
                           "--demo-dir", str(demo_archive["dir"]), "--set", "evaluate.report_examples=2",
                           "--set", "eval_seed=1"])
    assert code == 0
    fourth = json.loads((root / "summary.json").read_text())
    assert [(t["name"], t["status"]) for t in fourth["tasks"]] == \
        [(name, "CACHED") for name in TASKS[:-1]] + [("evaluate-model", "SUCCEEDED")]


@pytest.mark.slow
def test_failed_download_fails_the_run_and_names_it(tmp_path, demo_archive, tiny_config):
    summary = run_pipeline(str(tiny_config), str(demo_archive["archive"]), "0" * 64, None,
                           str(tmp_path / "outputs"))
    assert summary["status"] == "FAILED"
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [("download-archive", "FAILED")]
    assert "download-archive" in summary["error"] and "sha256" in summary["error"]
    assert json.loads((tmp_path / "outputs" / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_config_source_is_downloaded_and_offline_fails_at_step_1(tmp_path, capsys):
    """configs/lfw.yaml with its URL made unreachable: no demo archive, one failed task, a clear error."""
    url = f"http://127.0.0.1:{closed_port()}/lfw.tgz"
    config = yaml.safe_load((ROOT / "configs/lfw.yaml").read_text())
    config["data"]["source_uri"] = url
    path = write_config(tmp_path, "lfw-offline.yaml", config)
    demo_dir, root = tmp_path / "demo", tmp_path / "outputs"
    code = run_local.main(["--config", str(path), "--pipeline-root", str(root), "--demo-dir", str(demo_dir)])
    captured = capsys.readouterr()
    assert code == 1
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: task download-archive failed:") and url in error
    assert "connection failed" in error and "refused" in error.lower()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["source_uri"] == url
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [("download-archive", "FAILED")]
    assert not demo_dir.exists()


# --- which archive and pairs file a run uses ----------------------------------------------------

def test_demo_archive_only_when_nothing_names_a_source(tmp_path, demo_archive, tiny_config):
    demo = str(demo_archive["dir"])
    used = data_sources(str(tiny_config), None, None, None, None, demo, 40, 3, {})
    assert used == {"source_uri": str(demo_archive["archive"]), "sha256": demo_archive["sha256"],
                    "pairs_uri": "", "pairs_sha256": ""}
    lfw = data_sources(str(ROOT / "configs/lfw.yaml"), None, None, None, None, str(tmp_path / "demo"), 40, 3, {})
    assert lfw == {key: LFW[key] for key in ("source_uri", "sha256", "pairs_uri", "pairs_sha256")}
    assert not (tmp_path / "demo").exists()
    # SOURCE wins; it keeps the config's checksum only when it is the config's archive.
    other = data_sources(str(ROOT / "configs/lfw.yaml"), "/data/lfw.tgz", None, None, None, demo, 40, 3, {})
    assert (other["source_uri"], other["sha256"]) == ("/data/lfw.tgz", "")
    same = data_sources(str(ROOT / "configs/lfw.yaml"), LFW["source_uri"], None, None, None, demo, 40, 3, {})
    assert same["sha256"] == LFW["sha256"]
    given = data_sources(str(tiny_config), "/data/lfw.tgz", "a" * 64, None, None, demo, 40, 3, {})
    assert (given["source_uri"], given["sha256"]) == ("/data/lfw.tgz", "a" * 64)


def test_pairs_keep_or_set_a_checksum(tmp_path, demo_archive, tiny_config):
    demo, lfw = str(demo_archive["dir"]), str(ROOT / "configs/lfw.yaml")
    same = data_sources(lfw, None, None, LFW["pairs_uri"], None, demo, 40, 3, {})
    assert (same["pairs_uri"], same["pairs_sha256"]) == (LFW["pairs_uri"], LFW["pairs_sha256"])
    other = data_sources(lfw, None, None, "/data/pairs.txt", None, demo, 40, 3, {})
    assert (other["pairs_uri"], other["pairs_sha256"]) == ("/data/pairs.txt", "")
    given = data_sources(lfw, None, None, "/data/pairs.txt", "b" * 64, demo, 40, 3, {})
    assert (given["pairs_uri"], given["pairs_sha256"]) == ("/data/pairs.txt", "b" * 64)
    config_pairs = data_sources(lfw, None, None, None, "c" * 64, demo, 40, 3, {})
    assert (config_pairs["pairs_uri"], config_pairs["pairs_sha256"]) == (LFW["pairs_uri"], "c" * 64)
    demo_pairs = data_sources(str(tiny_config), None, None, "demo", None, demo, 40, 3, {})
    assert demo_pairs["pairs_uri"] == str(demo_archive["pairs"])
    assert demo_pairs["pairs_sha256"] == hashlib.sha256(demo_archive["pairs"].read_bytes()).hexdigest()


@pytest.mark.parametrize("argv, message", [
    (["--config", str(ROOT / "configs/lfw.yaml"), "--pairs", "demo"], "--pairs demo is the demo archive's pairs.txt"),
    (["--pairs-sha256", "d" * 64], "--pairs-sha256 needs a pairs file"),
    (["--pairs", "/data/pairs.txt", "--pairs-sha256", "xyz"], "data.pairs_sha256 must be 64 hex digits"),
    (["--set", "train.max_steps=0"], "train.max_steps must be at least 1, got 0"),
    (["--set", "train.max_steps=ten"], "--set train.max_steps must be int, got 'ten'"),
    (["--set", "train.k=8"], "train.k (8) must equal data.multiple (4)"),
])
def test_source_and_pairs_usage_errors_exit_2(tmp_path, capsys, demo_archive, tiny_config, argv, message):
    argv = ["--config", str(tiny_config), *argv] if "--config" not in argv else argv
    code = run_local.main([*argv, "--pipeline-root", str(tmp_path / "out"), "--demo-dir", str(demo_archive["dir"])])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
