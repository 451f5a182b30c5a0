"""benchmarks/gpu.py's dry run on this CPU (JAX, TensorFlow and kfp unimportable) and benchmarks/gpu.sh's refusals.

The dry run is the GPU benchmark on a tiny budget: every part runs (archive,
data steps, batch sweep fed and from memory, the recipe trained to its
max_steps and evaluated), so the test checks that each figure of the table
and of the JSON is there and well-formed, not what it is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"

# As on the GPU machine: no TensorFlow, no kfp; importing either fails.
BLOCKED_RUN = textwrap.dedent("""
    import runpy, sys
    sys.modules["tensorflow"] = None
    sys.modules["kfp"] = None
    sys.argv = ["benchmarks.gpu", *sys.argv[1:]]
    runpy.run_module("benchmarks.gpu", run_name="__main__")
""")


@pytest.mark.slow
def test_gpu_dry_run_reports_every_figure_without_tensorflow(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "OUT": str(out)}
    result = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--dry-run", "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "gpu-benchmark.json").read_text())
    assert report["dry_run"] is True and report["complete"] is True and report["machine"]["backend"] == "jax"
    assert list(report["data_seconds"]) == ["synth", "extract", "labels", "complete", "splits"]
    assert [(row["p"], row["k"], row["batch"]) for row in report["throughput"]] == [(2, 4, 8), (4, 4, 16)]
    for row in report["throughput"]:
        for key in ("fed_images_per_second", "memory_images_per_second"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["input_cost"] == pytest.approx(1 - row["fed_images_per_second"] / row["memory_images_per_second"])
    best = report["best"]
    assert best in report["throughput"]
    assert best["fed_images_per_second"] == max(r["fed_images_per_second"] for r in report["throughput"])
    assert report["target"] == {"images_per_second": 10_000, "met": best["fed_images_per_second"] >= 10_000}

    recipe = report["recipe"]
    assert recipe["steps"] == 12 and recipe["batch"] == 64          # the dry run's max_steps, lfw.yaml's 16 x 4
    for key in ("val_accuracy", "test_accuracy", "test_kfold_accuracy", "test_auc"):
        assert 0.0 <= recipe[key] <= 1.0, (key, recipe[key])
    # The dry run's few test pairs cannot measure FAR=1e-3: n/a, with the different pairs it needs.
    if recipe["test_val_at_far_0.001"] is None:
        assert recipe["test_val_at_far_0.001_needs_different_pairs"] == 1000
        assert "VAL@FAR=1e-3 n/a (needs >= 1,000 different pairs)" in result.stdout
    else:
        assert 0.0 <= recipe["test_val_at_far_0.001"] <= 1.0 and 0.0 <= recipe["test_far_at_far_0.001"] <= 1.0
    assert recipe["wall_seconds"] >= recipe["train_seconds"] > 0 and recipe["images_per_second"] > 0
    assert recipe["distance"] == "squared_l2" and recipe["threshold"] > 0 and recipe["test_pairs"] > 0
    model = json.loads((tmp_path / "work" / "model" / "model.json").read_text())
    assert model["backend"] == "jax" and model["precision"] == "mixed_bfloat16" and model["trained_steps"] == 12
    assert "saved_model/" not in model["files"]      # TensorFlow was unimportable

    table = result.stdout.split("GPU benchmark (DRY RUN", 1)[1]
    for text in ("fed images/s", "memory images/s", "input cost", "<- best", "the >= 10,000 images/s target",
                 "configs/lfw.yaml to completion: 12 steps of 64", "test accuracy", "AUC", "VAL@FAR=1e-3",
                 "wall time"):
        assert text in table, text
    assert "data: splits done" in result.stdout and "recipe: evaluated" in result.stdout   # progress lines
    assert "facenet_kfp.train: step 12/12" in result.stderr and "facenet_kfp.train: trained 12 steps" in result.stderr


def test_gpu_benchmark_refuses_an_existing_work_folder(tmp_path, capsys):
    from benchmarks import gpu

    with pytest.raises(SystemExit) as exc:
        gpu.main(["--dry-run", "--work", str(tmp_path)])
    assert exc.value.code == 2 and f"--work {tmp_path} exists" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_gpu_sh_refuses_without_the_keras_wheel(tmp_path, folder):
    wheels = tmp_path / "wheels"
    if folder == "empty":
        wheels.mkdir()
        (wheels / "namex-0.1.0-py3-none-any.whl").write_bytes(b"")     # other wheels do not stand in for Keras
    result = subprocess.run(["bash", str(GPU_SH), "--dry-run"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_WHEELS": str(wheels)})
    assert result.returncode == 2
    assert f"no Keras wheel in {wheels}/" in result.stderr and "make gpu-wheels" in result.stderr
    assert ("missing" if folder == "missing" else "has no keras-*.whl") in result.stderr
    assert "installing" not in result.stdout


def test_gpu_sh_refuses_wheels_for_another_python(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("keras-3.15.1-py3-none-any.whl", "optree-0.20.0-cp399-cp399-manylinux_2_28_x86_64.whl"):
        (wheels / name).write_bytes(b"")
    result = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_WHEELS": str(wheels), "PYTHON": sys.executable})
    assert result.returncode == 2
    assert "are for Python 3.99" in result.stderr and "make gpu-wheels GPU_PYTHON=" in result.stderr


# ----------------------------------------------------------------------------- benchmarks/scale.py

# A child that touches `MB` MiB, optionally in a forked worker of its own, then spins for `CPU` s.
_ALLOCATE = textwrap.dedent("""
    import os, sys, time
    mb, in_worker, cpu = int(sys.argv[1]), sys.argv[2] == "worker", float(sys.argv[3])
    def touch():
        block = bytearray(mb << 20)
        block[::4096] = b"x" * len(block[::4096])
    if in_worker:
        pid = os.fork()
        if pid == 0:
            touch()
            os._exit(0)
        os.waitpid(pid, 0)
    else:
        touch()
    start = time.process_time()
    while time.process_time() - start < cpu:
        pass
""")


@pytest.mark.parametrize("where", ["main", "worker"])
def test_measure_reports_the_largest_process_and_the_cpu_time(where):
    from benchmarks.preprocess import measure

    run = measure([sys.executable, "-c", _ALLOCATE, "300", where, "0.5"])
    assert 300 <= run.peak_mb < 400          # the worker's 300 MiB counts even though it was not the command
    assert run.cpu_seconds >= 0.5 and run.seconds >= 0.5
    with pytest.raises(SystemExit, match="failed with exit status 3"):
        measure([sys.executable, "-c", "raise SystemExit(3)"])


def test_scale_benchmark_tiny_run_prints_every_figure(tmp_path):
    import importlib.util
    import re

    work = tmp_path / "work"
    argv = [sys.executable, "-m", "benchmarks.scale", "--fraction", "0.005", "--compare-fraction", "0.004",
            "--work", str(work), "--batches", "3", "--sample", "300", "--shard-size-mb", "1"]
    tensorflow = importlib.util.find_spec("tensorflow") is not None
    result = subprocess.run(argv + ([] if tensorflow else ["--no-tensorflow"]), capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout

    for fraction, identities in (("0.005", 53), ("0.004", 42)):      # round(fraction x 10,575)
        steps = work / f"casia-{fraction}-steps"
        heading = re.search(rf"^CASIA x {fraction} \(.* GB \.tgz\): {identities} identities, .*$", out, re.M)
        assert heading, out
        rows = {line.split()[0]: line.split() for line in out[heading.end():].splitlines()[2:7]}
        assert list(rows) == ["download", "extract", "labels", "complete", "splits"]
        # files, MB, shards as they are on disk (the shard size passed explicitly: 1 MB)
        shards = sorted((steps / "images" / "shards").iterdir())
        files = [p for p in (steps / "images").rglob("*") if p.is_file()]
        assert rows["extract"][6:9] == [str(len(files)), f"{sum(p.stat().st_size for p in files) / 1e6:.2f}",
                                        str(len(shards))] and len(shards) > 1
        assert all(p.stat().st_size < 1.1 * 2**20 for p in shards[:-1])
        for row in rows.values():
            assert float(row[1]) > 0 and float(row[3]) > 0 and 0 < float(row[4]) < 1024   # wall s, images/s, RSS
    for text in ("Pillow raw decode:", "extract throughput:", "completion throughput:", "CPU ratio",
                 "open_split + TrainBatches", "validation split (read as drawn)"):
        assert text in out, text
    assert ("make_train_dataset (TF trainer)" in out) == tensorflow
    ratios = [float(r) for r in re.findall(r"ratio (\d+\.\d+) \(target", out)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


def test_preprocess_ratio_is_the_median_pair_and_every_pair_is_printed(capsys):
    from benchmarks.preprocess import Measured, Pair, Rate, median_pair, print_ratios

    def pair(seconds: float, raw_per_second: float) -> Pair:
        return Pair(Measured(seconds, 30.0, 40.0, 2 * seconds), Rate(raw_per_second, 0.0005), 1000)

    pairs = [pair(1.0, 2000.0), pair(2.0, 1000.0), pair(1.0, 1000.0)]   # ratios 0.5, 0.5, 1.0
    assert [round(p.ratio, 3) for p in pairs] == [0.5, 0.5, 1.0]
    assert median_pair(pairs).ratio == 0.5
    assert median_pair([pairs[0], pair(1.0, 1250.0), pairs[2], pair(1.0, 800.0)]).ratio == 0.8   # lower middle
    assert round(pairs[2].cpu_ratio, 3) == 0.25                     # 0.5 CPU ms x 1000 / 2 CPU s
    print_ratios("extract", "Pillow raw decode", pairs)
    out = capsys.readouterr().out
    assert out.count("  pair ") == 3 and "ratio 1.00" in out
    assert "ratio 0.50 (median of 3 pairs; target >= 0.7)" in out
    print_ratios("extract", "Pillow raw decode", pairs[:1])
    out = capsys.readouterr().out
    assert "pair 1" not in out and "ratio 0.50 (target >= 0.7)" in out
