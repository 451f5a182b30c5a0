"""The benchmarks: benchmarks/harness.py (data, machine, result files), a small run of each benchmark, and
benchmarks/gpu.sh's refusals.

benchmarks/gpu.py's dry run runs on this CPU with TensorFlow and kfp unimportable: the GPU benchmark on a
tiny budget, every part (archive, data steps, batch sweep fed and from memory, the recipe trained to its
max_steps and evaluated), so the test checks that each figure of the table and of the JSON is there and
well-formed, not what it is. The other small runs check the same of their reports. No test asserts a
timing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
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


# ----------------------------------------------------------------------------- benchmarks/harness.py

def test_prepare_data_gives_identity_disjoint_splits_of_the_asked_sizes(tmp_path):
    from benchmarks.harness import DATA_STEPS, prepare_data
    from facenet_kfp.config import DataConfig
    from facenet_kfp.splits import read_split

    config = DataConfig(train_fraction=0.6, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    lines = []
    data = prepare_data(tmp_path / "archive", tmp_path / "out", identities=24, seed=5, data=config,
                        progress=lines.append)
    assert data.archive == tmp_path / "archive" / "lfw.tgz" and data.archive.is_file()
    assert data.split_folders() == (data.images, data.completion, data.labels, data.splits)
    assert list(data.seconds) == ["synth", *DATA_STEPS] and all(s > 0 for s in data.seconds.values())
    assert lines[-1].startswith("data: splits done in ")

    splits = {name: read_split(data.splits, name) for name in ("train", "val", "test")}
    names = {name: {identity for identity, _ in rows} for name, rows in splits.items()}
    assert sum(len(n) for n in names.values()) == len(set().union(*names.values())) == 24   # disjoint, all 24
    with_pairs = sum(count >= 2 for rows in splits.values() for _, count in rows)
    expected = max(1, int(0.2 * with_pairs + 0.5))                  # round half up of the fraction of M
    assert len(names["val"]) == len(names["test"]) == expected
    assert len(names["train"]) == 24 - 2 * expected
    assert all(count >= 2 for name in ("val", "test") for _, count in splits[name])     # pairs need 2 images
    labels = json.loads((data.labels / "labels.json").read_text())
    assert set(labels) == set().union(*names.values())

    # Complete outputs are reused; a step run again reruns every step after it.
    again = prepare_data(tmp_path / "archive", tmp_path / "out", identities=24, seed=5, data=config)
    assert again.seconds == {} and again == dataclasses.replace(data, seconds={})
    shutil.rmtree(data.labels)
    assert list(prepare_data(tmp_path / "archive", tmp_path / "out", data=config).seconds) == \
        ["labels", "complete", "splits"]
    assert {name: read_split(data.splits, name) for name in splits} == splits     # same seeds, same splits


def test_machine_info_has_every_key_the_reports_print():
    from benchmarks.harness import BACKEND_KEYS, MACHINE_KEYS, machine_info, machine_lines

    info = machine_info()
    assert set(info) == set(MACHINE_KEYS)
    assert info["cpus"] == os.cpu_count() and info["usable_cores"] >= 1 and info["memory_gb"] > 0
    lines = machine_lines(info)
    assert lines[0].startswith(f"machine: {info['system']} {info['arch']}, {info['cpu']}, "
                               f"os.cpu_count()={info['cpus']}, usable cores {info['usable_cores']}")
    assert lines[1].startswith("  CPU bfloat16 instructions: ") and f"Pillow {info['pillow']}" in lines[2]
    assert len(lines) == 3                       # no backend asked: no Keras line

    jax_info = machine_info("jax")
    # benchmarks/gpu.py's table and JSON read these keys; benchmarks/train.py's last machine line the rest.
    assert set(jax_info) == set(MACHINE_KEYS) | set(BACKEND_KEYS) | {"jax"}
    assert jax_info["devices"] >= 1 and jax_info["backend"] == "jax"
    assert machine_lines(jax_info)[-1] == (f"  keras {jax_info['keras']}, backend jax, jax {jax_info['jax']}, "
                                           f"devices: {jax_info['device_list']}")


def test_harness_imports_and_names_the_machine_without_tensorflow_or_keras():
    # As on the GPU machine before benchmarks/gpu.sh installs Keras: importing either fails.
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = sys.modules["keras"] = sys.modules["kfp"] = None
        from benchmarks import harness
        print(harness.machine_lines(harness.machine_info())[0])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("machine: ")


def test_write_result_is_atomic(tmp_path, monkeypatch):
    from benchmarks.harness import write_result

    path = tmp_path / "deep" / "result.json"
    write_result(path, {"figure": 1.5, "where": tmp_path})
    assert json.loads(path.read_text()) == {"figure": 1.5, "where": str(tmp_path)}

    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        write_result(path, loop)                     # cannot be written: the old result stays
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        write_result(path, {"figure": 2.5})          # fails half-way: the old result stays, no partial file
    assert json.loads(path.read_text()) == {"figure": 1.5, "where": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_verdict_and_result_path(tmp_path, monkeypatch):
    from benchmarks.harness import result_path, verdict

    assert (verdict(True), verdict(False)) == ("meets", "MISSES")
    monkeypatch.delenv("OUT", raising=False)
    assert result_path(None, "x.json") is None and result_path("a/b.json", "x.json") == Path("a/b.json")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert result_path(None, "x.json") == tmp_path / "x.json"


# ----------------------------------------------------------------------------- smoke runs of each benchmark

def _run_benchmark(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _machine_named(out: str) -> None:
    assert re.search(r"^machine: .*, os\.cpu_count\(\)=\d+, usable cores \d+, load average", out, re.M), out
    assert re.search(r"^  memory [\d.]+ GB, Python [\d.]+, NumPy .*, Pillow ", out, re.M), out


@pytest.mark.slow
def test_train_benchmark_smoke_run_prints_every_part(tmp_path):
    import keras

    out = _run_benchmark("train", "--smoke", "--work", str(tmp_path))
    _machine_named(out)
    assert "model: small_cnn 32x32, 128-D embeddings, batch 64 = P 16 x K 4" in out
    steps = re.search(r"^precision +loss +steps +ms/step +IQR ms +images/s +CPU s/step +img/CPU-s +first call s\n"
                      r"((?:.+\n){5})", out, re.M)
    assert steps, out
    rows = [line.split() for line in steps.group(1).splitlines()]
    assert [row[:3] for row in rows] == [["float32", "trivial", "2"], ["float32", "batch_hard", "2"],
                                         ["float32", "batch_all", "2"], ["float32", "semi_hard", "2"],
                                         ["mixed_bfloat16", "batch_hard", "3"]]
    for text in ("1. training step:", "GFLOP/s achieved", "mixed_bfloat16 / float32 speed (batch_hard",
                 "2. mining + loss share of the step (target < 5%)", "largest share (b): ",
                 "3. input pipeline vs the model's consumption (target >= 3x)", "fed / memory speed",
                 "4. input pipelines side by side", "cores for 10,000/s", "5. peak RSS of this process: ",
                 "total wall time"):
        assert text in out, text
    assert len(re.findall(r"^  float32 +(batch_hard|batch_all|semi_hard) +wall .* CPU ", out, re.M)) == 3
    tensorflow = keras.backend.backend() == "tensorflow"
    assert ("per-core rate, facenet_kfp.numpy_input / tf.data:" in out) == tensorflow
    assert ("make_train_dataset alone" in out) == tensorflow

    # --input-only: part 4 alone, on the data prepared above (reused: nothing regenerated).
    out = _run_benchmark("train", "--smoke", "--input-only", "--work", str(tmp_path))
    _machine_named(out)
    assert not re.search(r"\] data: \w+ ", out), out                  # no data step ran again
    assert "4. input pipelines side by side" in out and "1. training step" not in out


@pytest.mark.slow
def test_quality_benchmark_smoke_run_prints_and_writes_every_figure(tmp_path):
    from benchmarks.quality import ROWS

    out = _run_benchmark("quality", "--steps", "2", "--demo-dir", str(tmp_path / "demo"), "--work",
                         str(tmp_path / "work"))
    _machine_named(out)
    for _, label in ROWS + [("", "distance"), ("", "training seconds")]:
        assert re.search(rf"^{re.escape(label)} +\S+ +\S+$", out, re.M), label
    assert "recommended beats seed on test accuracy: " in out
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert list(results) == ["seed", "recommended"]
    for result in results.values():
        assert {"train_seconds", "train", "test_accuracy", "threshold", "distance"} <= set(result)


@pytest.mark.slow
def test_recipe_benchmark_smoke_run_prints_and_writes_every_figure(tmp_path):
    from benchmarks.recipe import ROWS, recipes_of

    work = tmp_path / "work"
    # Two recipes per dataset keep this check short; the others' settings are checked without training.
    out = _run_benchmark("recipe", "--identities", "40", "--budget-images", "128", "--data-dir",
                         str(tmp_path / "lfw"), "--casia-dir", str(tmp_path / "casia"), "--work", str(work),
                         "--recipes", "recommended,arcface")
    _machine_named(out)
    lfw, casia = out.split("\nlfw-40: ", 1)[1].split("\ncasia-40: ", 1)
    assert re.search(r"^steps x batch +2 x 64 +2 x 64$", lfw, re.M), lfw
    assert re.search(r"^steps x batch +1 x 128 +1 x 128$", casia, re.M), casia
    assert re.search(r"^margin, scale +0.2 +0.5, s=24$", lfw, re.M), lfw
    assert re.search(r"test: the separate .*pairs\.txt, \d+ pairs of 40 identities, 0 of them in the training "
                     r"archive$", casia.splitlines()[0]), casia
    for table in (lfw, casia):
        for _, label, _ in ROWS:
            assert re.search(rf"^{re.escape(label)}( +\S+){{2}}$", table, re.M), label
        assert re.search(r"^winner \((lfw|casia)-40, held-out accuracy\): \w+ [\d.]+, \+[\d.]+ over \w+ ", table, re.M)

    for label, dataset in (("lfw-40", "lfw"), ("casia-40", "casia")):
        report = json.loads((work / label / "results.json").read_text())
        assert list(report["recipes"]) == list(recipes_of(dataset, "recommended,arcface")) == ["recommended",
                                                                                              "arcface"]
        assert report["winner"]["recipe"] in report["recipes"]
        for name, result in report["recipes"].items():
            assert result == json.loads((work / label / f"result-{name}.json").read_text())
            for key in ("test_accuracy", "test_kfold_accuracy_mean", "test_auc", "train_images_per_second",
                        "train_seconds", "peak_rss_mb"):
                assert math.isfinite(result[key]), (label, name, key)
            assert result["recipe"]["loss"] == {"arcface": "arcface", "cosface": "cosface"}.get(
                name, "batch_all" if name == "seed" else "batch_hard")
    # The casia archive trains; the lfw one's pairs.txt tests it: no identity in both.
    casia_result = json.loads((work / "casia-40" / "result-recommended.json").read_text())
    assert casia_result["eval_identities_in_training_archive"] == 0 and casia_result["eval_identities"] == 40
    assert (tmp_path / "casia" / "CASIA-WebFace.tgz").is_file() and (tmp_path / "lfw" / "pairs.txt").is_file()


def test_recipe_margin_recipes_switch_only_the_loss():
    from benchmarks.recipe import MARGIN_SCALE, recipe_config

    for dataset, batch in (("lfw", 64), ("casia", 128)):
        config, triplet = recipe_config("recommended", 25_600, dataset)
        assert (triplet.loss, triplet.max_steps, triplet.p * triplet.k) == ("batch_hard", 25_600 // batch, batch)
        for name, margin in (("arcface", 0.5), ("cosface", 0.35)):
            _, margin_recipe = recipe_config(name, 25_600, dataset)
            assert (margin_recipe.loss, margin_recipe.margin, margin_recipe.scale) == (name, margin, MARGIN_SCALE)
            # Everything else as the triplet recipe: network, image size, batches, schedule, augmentation.
            assert dataclasses.replace(margin_recipe, loss=triplet.loss, margin=triplet.margin,
                                       scale=triplet.scale) == triplet
    _, seed = recipe_config("seed", 25_600, "lfw")
    assert (seed.loss, seed.p * seed.k, seed.max_steps, seed.warmup_steps) == ("batch_all", 24, 1066, 0)
    _, casia = recipe_config("recommended", 25_600, "casia")
    assert (casia.learning_rate, casia.warmup_steps) == (1e-3, 2)          # 1,000 of 100,000 steps: 1%


def test_recipe_plans_keep_data_apart_per_dataset_and_size(tmp_path):
    from benchmarks.recipe import CASIA_IDENTITIES, plan_for

    lfw, casia = (plan_for(d, 0, tmp_path) for d in ("lfw", "casia"))
    assert (lfw.archive_dir, lfw.eval_dir, lfw.work, lfw.layout) == (Path("data/lfw-scale"), None,
                                                                    tmp_path / "lfw-scale", "lfw")
    assert (casia.archive_dir, casia.eval_dir, casia.work) == (Path(f"data/casia-{CASIA_IDENTITIES}-seed1"),
                                                               Path("data/lfw-scale"), tmp_path / "casia-1000")
    # The same seed would draw the same faces in both archives: training and evaluation faces differ.
    assert casia.seed != lfw.seed and casia.layout == "casia" and casia.lfw_identities == 0
    small = plan_for("casia", 60, tmp_path, data_dir=tmp_path / "l", casia_dir=tmp_path / "c")
    assert (small.identities, small.lfw_identities, small.archive_dir, small.eval_dir, small.work) == \
        (60, 60, tmp_path / "c", tmp_path / "l", tmp_path / "casia-60")
    assert plan_for("lfw", 60, tmp_path).archive_dir == Path("data/lfw-60")


def test_recipe_benchmark_refuses_a_casia_archive_too_small_for_its_batches(capsys):
    from benchmarks import recipe

    with pytest.raises(SystemExit) as exc:
        recipe.main(["--identities", "30"])
    assert exc.value.code == 2 and "--identities 30: the casia dataset needs at least 40" in capsys.readouterr().err


def _recipe_result(accuracy: float, **extra) -> dict:
    return {"test_accuracy": accuracy, "test_kfold_accuracy_mean": accuracy - 0.01, "test_auc": accuracy + 0.05,
            "test_same_pairs": 3000, "test_different_pairs": 3000, "test_pairs": 6000, "test_identities": 500,
            "train_images_per_second": 70.0, "train_seconds": 370.0, "peak_rss_mb": 2900.0, "steps": 400,
            "batch": 64, "recipe": {"loss": "batch_hard", "margin": 0.2, "scale": 64.0}, **extra}


def test_recipe_winner_and_table():
    from benchmarks.recipe import ROWS, plan_for, table_lines, winner

    results = {"recommended": _recipe_result(0.80, **{"test_val_at_far_0.001": 0.2, "test_far_at_far_0.001": 0.0013}),
               "arcface": _recipe_result(0.86, recipe={"loss": "arcface", "margin": 0.5, "scale": 24.0}),
               "cosface": _recipe_result(0.83, recipe={"loss": "cosface", "margin": 0.35, "scale": 24.0})}
    best = winner(results)
    assert (best["recipe"], best["runner_up"], best["test_pairs"]) == ("arcface", "cosface", 6000)
    assert best["lead"]["cosface"]["test_accuracy"] == pytest.approx(0.03)
    assert best["lead"]["recommended"]["test_auc"] == pytest.approx(0.06)
    assert best["standard_error"] == pytest.approx(math.sqrt(0.86 * 0.14 / 6000))

    lines = table_lines(plan_for("lfw", 0, Path("w")), 25_600, results, best)
    text = "\n".join(lines)
    assert "margin, scale" in text and re.search(r"^margin, scale +0.2 +0.5, s=24 +0.35, s=24$", text, re.M)
    assert re.search(r"^VAL @ FAR=1e-3 +0.2000 +n/a +n/a$", text, re.M)              # not measured: n/a
    assert re.search(r"^FAR reached \(1e-3 threshold\) +0.0013 +n/a +n/a$", text, re.M)
    assert len([line for line in lines if any(line.startswith(label) for _, label, _ in ROWS)]) == len(ROWS)
    assert lines[-2] == ("winner (lfw-scale, held-out accuracy): arcface 0.8600, +0.0300 over cosface (10-fold "
                         "+0.0300, AUC +0.0300); one accuracy's standard error on 6,000 test pairs: 0.0045")
    assert lines[-1] == "  over the triplet recipe (recommended): +0.0600"

    # An accuracy evaluate withheld (too few test pairs) is not ranked; with none there is no winner.
    withheld = {"seed": _recipe_result(0.9, test_accuracy=None), "cosface": results["cosface"]}
    assert (winner(withheld)["recipe"], winner(withheld)["runner_up"]) == ("cosface", None)
    assert winner({"seed": withheld["seed"]}) == {"recipe": None, "runner_up": None, "lead": {}}


def test_recipe_a_recipe_the_monitor_stopped_is_shown_stopped_and_not_ranked():
    from benchmarks.recipe import plan_for, table_lines, winner

    stopped = {"failed": "embedding collapse at step 30: the mean distance ...", "steps": 200, "batch": 128,
               "peak_rss_mb": 900.0, "recipe": {"loss": "batch_hard", "margin": 0.2, "scale": 64.0}}
    results = {"recommended": stopped,
               "arcface": _recipe_result(0.86, recipe={"loss": "arcface", "margin": 0.5, "scale": 24.0}),
               "cosface": _recipe_result(0.83, recipe={"loss": "cosface", "margin": 0.35, "scale": 24.0})}
    best = winner(results)
    assert (best["recipe"], best["runner_up"], sorted(best["lead"])) == ("arcface", "cosface", ["cosface"])
    text = "\n".join(table_lines(plan_for("lfw", 0, Path("w")), 25_600, results, best))
    assert re.search(r"^training +stopped +finished +finished$", text, re.M), text
    assert re.search(r"^held-out accuracy \(val threshold\) +n/a +0.8600 +0.8300$", text, re.M), text
    assert ("recommended: stopped by the training monitor, no figures: embedding collapse at step 30: the mean "
            "distance ...") in text
    assert "over the triplet recipe" not in text


def test_preprocess_benchmark_small_run_prints_every_figure(tmp_path):
    out = _run_benchmark("preprocess", "--identities", "20", "--rounds", "1", "--align-images", "6",
                         "--work", str(tmp_path))
    _machine_named(out)
    rows = re.search(r"^step +seconds +items/s +peak RSS MB +all processes MB\n((?:.+\n){5})", out, re.M)
    assert rows, out
    assert [line.split()[0] for line in rows.group(1).splitlines()] == ["download", "extract", "labels",
                                                                        "complete", "splits"]
    for text in ("Pillow raw decode:", "extract throughput:", "raw decode+augment+encode:",
                 "completion throughput:", "(target < 2 s each)"):
        assert text in out, text
    try:
        import mtcnn  # noqa: F401
    except ImportError:
        assert "align: skipped, it needs the mtcnn package" in out
    else:
        assert re.search(r"^align \(mtcnn, CPU\): 6 images in [\d.]+ s, 2 in [\d.]+ s; the difference: "
                         r"-?[\d.]+ images/s, -?[\d.]+ images/s per core", out, re.M), out


def test_recipe_choice_of_recipes(capsys):
    from benchmarks.recipe import DATASET_RECIPES, main, recipes_of

    assert recipes_of("lfw", None) == DATASET_RECIPES["lfw"]
    assert recipes_of("lfw", "cosface, recommended,seed") == ("recommended", "seed", "cosface")
    assert recipes_of("casia", "recommended,seed") == ("recommended",)        # casia has no seed recipe
    for value, message in (("seed,arcface", "--recipes must include recommended"),
                           ("recommended,bogus", "--recipes: unknown recipe(s) bogus")):
        with pytest.raises(SystemExit) as stop:
            main(["--recipes", value])
        assert stop.value.code == 2 and message in capsys.readouterr().err
