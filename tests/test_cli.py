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
