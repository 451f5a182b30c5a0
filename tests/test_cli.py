"""The `facenet-kfp` command line: every step's --help, the data steps chained by hand, verify."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from facenet_kfp.cli import build_parser, main

STEPS = ["synth", "download", "extract", "labels", "complete", "splits", "train", "evaluate",
         "verify", "embed"]


def test_every_step_has_help(capsys):
    for step in STEPS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([step, "--help"])
        assert exit_info.value.code == 0
        assert "usage: facenet-kfp " + step in capsys.readouterr().out


def test_help_imports_no_tensorflow():
    """The data-step containers have no TensorFlow: the CLI must not need it to start."""
    code = ("import sys; from facenet_kfp.cli import build_parser; build_parser(); "
            "import facenet_kfp.download, facenet_kfp.extract, facenet_kfp.labels, "
            "facenet_kfp.complete, facenet_kfp.splits, facenet_kfp.synth, facenet_kfp.kfp_io; "
            "print('tensorflow' in sys.modules or 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_data_steps_by_hand(tmp_path, demo_archive, capsys):
    work = tmp_path / "work"
    assert main(["-q", "download", str(demo_archive["archive"]), "--out", str(work / "lfw.tgz"),
                 "--sha256", demo_archive["sha256"]]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == demo_archive["sha256"]
    assert main(["-q", "extract", str(work / "lfw.tgz"), "--out", str(work / "images")]) == 0
    extracted = json.loads(capsys.readouterr().out)
    assert extracted["identities"] == 40 and extracted["skipped"] == 0
    assert main(["-q", "labels", str(work / "images"), "--out", str(work / "labels")]) == 0
    assert json.loads(capsys.readouterr().out)["identities"] == 40
    assert main(["-q", "complete", str(work / "images"), str(work / "labels"), "--out",
                 str(work / "completion")]) == 0
    capsys.readouterr()
    assert main(["-q", "splits", str(work / "labels"), "--out", str(work / "splits"),
                 "--fractions", "0.6,0.2,0.2", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["identities"] + summary["val"]["identities"] + summary["test"]["identities"] == 40


@pytest.mark.parametrize("argv, message", [
    (["extract", "/nonexistent/lfw.tgz", "--out", "x"], "/nonexistent/lfw.tgz"),
    (["download", "ftp://example.com/lfw.tgz", "--out", "x"], "ftp://example.com/lfw.tgz"),
    (["download", "/nonexistent/lfw.tgz", "--out", "x", "--sha256", "xyz"], "sha256"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"facenet-kfp {argv[0]}: error: ") and message in err
    assert "Traceback" not in err


def test_splits_rejects_bad_fractions(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.json").write_text(json.dumps({"A": 0, "B": 1}))
    (tmp_path / "labels" / "image_counts.json").write_text(json.dumps({"A": 2, "B": 2}))
    assert main(["splits", str(tmp_path / "labels"), "--out", str(tmp_path / "s"),
                 "--fractions", "0.8,0.3,0.1"]) == 2
    assert "fraction" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_prints_distance_and_verdict(tmp_path, demo_archive, capsys):
    """verify on two demo images with a saved (untrained) model and an explicit threshold."""
    import tarfile

    from facenet_kfp import export
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.model import build_embedding_model

    model_dir = tmp_path / "model"
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=8)
    export.save_model_artifact(build_embedding_model((32, 32, 3), 8, "small_cnn"), model_dir,
                               export.artifact_metadata(config, trained_steps=0),
                               {"train": [], "val": []})
    with tarfile.open(demo_archive["archive"]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("_0001.jpg")][:2]
        tar.extractall(tmp_path, members=members, filter="data")
    a, b = (str(tmp_path / m.name) for m in members)
    assert main(["-q", "verify", "--model", str(model_dir), a, a, "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "distance:  0.0000 (squared L2)" in out and out.strip().endswith("same person")
    assert main(["-q", "verify", "--model", str(model_dir), a, b, "--threshold", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("different people")
    assert main(["-q", "verify", "--model", str(tmp_path / "nowhere"), a, b]) == 2
    assert "nowhere: model folder not found" in capsys.readouterr().err


def test_out_never_replaces_an_input(tmp_path, capsys):
    """`labels work/images --out work` and `extract a.tgz --out a.tgz` are refused; nothing changes."""
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    (work / "images" / "manifest.jsonl").write_text("{}\n")
    (work / "notes.txt").write_text("mine")
    archive = tmp_path / "a.tgz"
    archive.write_bytes(b"archive bytes")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cases = [(["labels", str(work / "images"), "--out", str(work)], "holds the input images"),
             (["extract", str(archive), "--out", str(archive)], "is the input archive"),
             (["splits", str(work / "images"), "--out", str(work / "images" / "s")],
              "is inside the input labels"),
             (["train", str(work / "images"), str(work), str(work), str(work), "--out",
               str(tmp_path / "model"), "--checkpoint-dir", str(work / "ckpt")],
              "--checkpoint-dir"),
             (["embed", "--model", str(tmp_path / "model"), str(work / "notes.txt"), "--out",
               str(work / "notes.txt")], "is the input images")]
    for argv, message in cases:
        assert main(["-q"] + argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (work / "notes.txt").read_text() == "mine" and archive.read_bytes() == b"archive bytes"


def test_synth_and_evaluate_out_never_replace_a_users_folder(tmp_path, capsys):
    """Folders of files (synth, evaluate): a user's folder is refused; synth's own output is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my report")
    missing = str(tmp_path / "missing")
    for argv in (["synth", "--out", str(mine), "--identities", "10"],
                 ["evaluate", missing, missing, missing, "--out", str(mine)]):
        assert main(["-q"] + argv) == 2
        err = capsys.readouterr().err
        assert "refusing to replace" in err and str(mine) in err, err
    assert [p.name for p in mine.iterdir()] == ["report.html"]
    assert (mine / "report.html").read_text() == "my report"
    demo = tmp_path / "demo"
    for _ in range(2):   # the second run replaces the first run's own output
        assert main(["-q", "synth", "--out", str(demo), "--identities", "10"]) == 0
    assert sorted(p.name for p in demo.iterdir() if not p.name.startswith(".")) == [
        "lfw.tgz", "lfw.tgz.sha256", "pairs.txt"]
    capsys.readouterr()


def test_download_out_replaces_only_a_verified_copy(tmp_path, demo_archive, capsys):
    out = tmp_path / "lfw.tgz"
    out.write_text("a user's file")
    argv = ["-q", "download", str(demo_archive["archive"]), "--out", str(out)]
    assert main(argv) == 2 and "refusing to replace" in capsys.readouterr().err
    assert main(argv + ["--sha256", demo_archive["sha256"]]) == 2
    assert out.read_text() == "a user's file"
    out.unlink()
    assert main(argv + ["--sha256", demo_archive["sha256"]]) == 0
    assert main(argv + ["--sha256", demo_archive["sha256"]]) == 0   # its own verified copy
    capsys.readouterr()
    assert out.read_bytes() == demo_archive["archive"].read_bytes()


@pytest.mark.parametrize("fractions", ["a,b,c", "0.5,0.5", "nan,0.5,0.5", ""])
def test_splits_fractions_that_are_not_three_numbers_are_a_usage_error(fractions, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["splits", "labels", "--out", "s", "--fractions", fractions])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --fractions: expected three numbers" in err and repr(fractions) in err


# --- one source for the data steps' defaults; numbers as people write them ---------------------

@pytest.mark.parametrize("argv, option, section, key", [
    (["extract", "a.tgz", "--out", "x"], "shard_size_mb", "data", "shard_size_mb"),
    (["extract", "a.tgz", "--out", "x"], "max_skipped_fraction", "data", "max_skipped_fraction"),
    (["extract", "a.tgz", "--out", "x"], "max_expansion", "data", "max_expansion"),
    (["complete", "i", "l", "--out", "x"], "multiple", "data", "multiple"),
    (["complete", "i", "l", "--out", "x"], "min_images", "data", "min_images"),
    (["complete", "i", "l", "--out", "x"], "seed", "data", "completion_seed"),
    (["complete", "i", "l", "--out", "x"], "shard_size_mb", "data", "shard_size_mb"),
    (["splits", "l", "--out", "x"], "seed", "data", "split_seed"),
    (["download", "a.tgz", "--out", "x"], "max_download_gb", "data", "max_download_gb"),
    (["embed", "--model", "m", "a.jpg", "--out", "e.npz"], "batch_size", "evaluate", "batch_size"),
])
def test_data_step_defaults_are_the_configs(argv, option, section, key, capsys):
    """The command line's defaults are the config's (one source), and --help says them with the config key."""
    from facenet_kfp.config import SECTIONS

    default = getattr(SECTIONS[section](), key)
    assert getattr(build_parser().parse_args(argv), option) == default
    with pytest.raises(SystemExit):
        build_parser().parse_args([argv[0], "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {default:g}; in " in help_text and f"config {section}.{key})" in help_text


def test_splits_fractions_default_to_the_configs():
    from facenet_kfp.config import DataConfig

    config = DataConfig()
    assert build_parser().parse_args(["splits", "l", "--out", "x"]).fractions == (
        config.train_fraction, config.val_fraction, config.test_fraction)


def test_shard_sizes_are_mib_everywhere(capsys):
    """extract --help said MB (default 64) while the config said 256 MB and the code used MiB."""
    from facenet_kfp.config import DataConfig, field_help

    for step in ("extract", "complete"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([step, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "target shard size in MiB (2**20 bytes) (default 256;" in text and " MB" not in text
    assert "in MiB (2**20 bytes)" in field_help(DataConfig)["shard_size_mb"]


@pytest.mark.parametrize("argv, option, expected", [
    (["extract", "a.tgz", "--out", "x", "--shard-size-mb", "1e2"], "shard_size_mb", 100),
    (["extract", "a.tgz", "--out", "x", "--max-skipped-fraction", "5e-2"], "max_skipped_fraction", 0.05),
    (["download", "a.tgz", "--out", "x", "--max-download-gb", "1.5e1"], "max_download_gb", 15.0),
    (["verify", "--model", "m", "a", "b", "--threshold", "1e-1"], "threshold", 0.1),
    (["synth", "--out", "x", "--identities", "1e3"], "identities", 1000),
    (["splits", "l", "--out", "x", "--fractions", "7e-1,1.5e-1,1.5e-1"], "fractions", (0.7, 0.15, 0.15)),
])
def test_options_take_exponent_notation(argv, option, expected):
    assert getattr(build_parser().parse_args(argv), option) == pytest.approx(expected)


@pytest.mark.parametrize("argv, message", [
    (["extract", "a.tgz", "--out", "x", "--shard-size-mb", "1e9"],
     "argument --shard-size-mb: --shard-size-mb must be at most 4096, got 1,000,000,000"),
    (["extract", "a.tgz", "--out", "x", "--shard-size-mb", "0"], "--shard-size-mb must be at least 1, got 0"),
    (["extract", "a.tgz", "--out", "x", "--max-skipped-fraction", "2"], "--max-skipped-fraction must be at most 1"),
    (["complete", "i", "l", "--out", "x", "--multiple", "four"], "--multiple must be int, got 'four'"),
    (["verify", "--model", "m", "a", "b", "--threshold", "1e999"], "--threshold must be a finite number, got inf"),
    (["embed", "--model", "m", "a.jpg", "--out", "e.npz", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["verify", "--model", "m", "--run", "r", "a", "b"], "argument --run: not allowed with argument --model"),
    (["embed", "a.jpg", "--out", "e.npz"], "one of the arguments --model --run is required"),
])
def test_bad_option_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "i", "c", "l", "s", "--out", "m", "--set", "max_steps=0"], "--set max_steps must be at least 1, got 0"),
    (["train", "i", "c", "l", "s", "--out", "m", "--set", "learning_rate=high"],
     "--set learning_rate must be a number, got 'high'"),
    (["train", "i", "c", "l", "s", "--out", "m", "--set", "k=8"],
     "--set k=8 (applied to defaults): train.k (8) must equal data.multiple (4)"),
    (["evaluate", "m", "i", "s", "--out", "e", "--set", "far_targets=[1e-3, 1e300]"],
     "--set far_targets must be < 1, got 1e+300"),
])
def test_set_errors_name_the_set_value(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_set_takes_exponent_notation(tmp_path):
    from facenet_kfp.cli import _load_config

    config = _load_config(None, ["learning_rate=1e-3", "train.max_steps=2e3"], "train")
    assert (config.train.learning_rate, config.train.max_steps) == (0.001, 2000)
    config = _load_config(None, ["far_targets=[1e-3]"], "evaluate")
    assert config.evaluate.far_targets == (0.001,)


# --- verify and embed --run ---------------------------------------------------------------------

@pytest.fixture
def run_root(tmp_path):
    """A pipeline root as make run leaves it: summary.json naming a small model and its threshold."""
    from facenet_kfp import export
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.fsutil import file_sha256
    from facenet_kfp.model import build_embedding_model

    root = tmp_path / "root"
    model_dir = root / "run-1" / "train-model" / "model"
    config = TrainConfig(architecture="small_cnn", image_size=32, embedding_dim=8)
    metadata = export.artifact_metadata(config, trained_steps=0)
    export.save_model_artifact(build_embedding_model((32, 32, 3), 8, "small_cnn"), model_dir, metadata,
                               {"train": [], "val": []})
    threshold = root / "run-1" / "evaluate-model" / "threshold"
    threshold.parent.mkdir(parents=True)
    threshold.write_text(json.dumps({"threshold": 0.75, "distance": "squared_l2", "model": str(model_dir),
                                     "model_sha256": file_sha256(model_dir / "model.keras"),
                                     "model_distance": "squared_l2", "embedding_dim": 8,
                                     "preprocessing": metadata["preprocessing"]}))
    (root / "summary.json").write_text(json.dumps({
        "pipeline": "facenet-kfp", "status": "SUCCEEDED", "tasks": [],
        "metrics": {"model_uri": str(model_dir), "threshold_uri": str(threshold)}}))
    return root


def _faces(tmp_path):
    import numpy as np
    from PIL import Image

    paths = []
    for i, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        paths.append(tmp_path / f"face{i}.png")
        Image.fromarray(np.full((48, 48, 3), colour, dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


@pytest.mark.slow
def test_verify_and_embed_take_a_runs_model_and_threshold(run_root, tmp_path, capsys):
    a, b = _faces(tmp_path)
    for run in (run_root, run_root / "summary.json"):
        assert main(["-q", "verify", "--run", str(run), a, a]) == 0
        out = capsys.readouterr().out
        model_dir = run_root / "run-1" / "train-model" / "model"
        assert f"model:     {model_dir} (from {run_root / 'summary.json'})" in out
        assert ("threshold: 0.7500 (squared L2; same person when distance < threshold; from "
                f"{run_root / 'run-1' / 'evaluate-model' / 'threshold'})") in out
        assert out.strip().endswith("same person")
    # The run folder (train-model/, evaluate-model/) gives the same model and threshold.
    assert main(["-q", "verify", "--run", str(run_root / "run-1"), a, b, "--threshold", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("different people")
    assert main(["-q", "embed", "--run", str(run_root), a, b, "--out", str(tmp_path / "e.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 8


def test_verify_run_errors_name_what_is_missing(run_root, tmp_path, capsys):
    a, b = _faces(tmp_path)
    summary = json.loads((run_root / "summary.json").read_text())
    del summary["metrics"]["threshold_uri"]
    (run_root / "summary.json").write_text(json.dumps(summary))
    assert main(["-q", "verify", "--run", str(run_root), a, b]) == 2
    err = capsys.readouterr().err
    assert (f"--run {run_root}: the run's model {run_root / 'run-1' / 'train-model' / 'model'} has no evaluated "
            f"threshold in {run_root / 'summary.json'} (no threshold: evaluate did not run on this model); pass "
            f"--threshold VALUE, or evaluate the model (make rerun STEP=evaluate FROM={run_root})") in err
    assert main(["-q", "verify", "--run", str(run_root), a, b, "--threshold-file", "t.json"]) == 2
    assert "--threshold-file and --run both name a threshold" in capsys.readouterr().err
    assert main(["-q", "verify", "--run", str(tmp_path / "no-run"), a, b]) == 2
    assert "no-run: no such pipeline root, run folder or summary file" in capsys.readouterr().err
    # embed needs no threshold.
    model_dir = run_root / "run-1" / "train-model" / "model"
    assert main(["-q", "embed", "--run", str(run_root), a, "--out", str(model_dir / "e.npz")]) == 2
    assert "--out" in capsys.readouterr().err
