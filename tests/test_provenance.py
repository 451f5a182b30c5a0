"""Provenance: artifacts made by the real steps from one dataset belong together; any other mix is refused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_kfp import provenance as pv
from facenet_kfp.complete import complete_dataset
from facenet_kfp.errors import InputError
from facenet_kfp.labels import build_labels
from facenet_kfp.shards import ShardWriter
from facenet_kfp.splits import make_splits

COUNTS = {f"Person_{i}": 1 + i % 4 for i in range(8)}


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def make_run(root, counts=COUNTS, multiple=4):
    """images, labels, completion and splits of one dataset, each made by its step's function."""
    paths = {kind: root / kind for kind in ("images", "labels", "completion", "splits")}
    with ShardWriter(paths["images"]) as writer:
        for n, name in enumerate(sorted(counts)):
            for i in range(1, counts[name] + 1):
                writer.add(name, f"{name}/{name}_{i:04d}.jpg", jpeg(100 * n + i))
    build_labels(paths["images"], paths["labels"])
    complete_dataset(paths["images"], paths["labels"], paths["completion"], multiple=multiple, workers=1)
    make_splits(paths["labels"], paths["splits"], (0.5, 0.25, 0.25))
    return paths


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("a"))


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """Another dataset: one more image of one person."""
    return make_run(tmp_path_factory.mktemp("b"), {**COUNTS, "Person_0": 2})


def test_one_runs_artifacts_belong_together(run_a):
    fingerprints = pv.check_inputs(**run_a, multiple=4)
    assert fingerprints == {"images": pv.dataset_fingerprint(run_a["images"]),
                            **{kind: pv.fingerprint(kind, run_a[kind])
                               for kind in ("labels", "completion", "splits")}}
    assert len(set(fingerprints.values())) == 4
    assert pv.check_inputs(splits=run_a["splits"]) == {"splits": fingerprints["splits"]}


def test_fingerprints_follow_the_content(run_a, tmp_path):
    labels = shutil.copytree(run_a["labels"], tmp_path / "labels")
    assert pv.fingerprint("labels", labels) == pv.fingerprint("labels", run_a["labels"])
    counts = json.loads((labels / "image_counts.json").read_text())
    (labels / "image_counts.json").write_text(json.dumps({**counts, "Person_0": 5}))
    assert pv.fingerprint("labels", labels) != pv.fingerprint("labels", run_a["labels"])
    images = shutil.copytree(run_a["images"], tmp_path / "images")
    with open(images / "manifest.jsonl", "a") as handle:
        handle.write("\n")
    assert pv.dataset_fingerprint(images) != pv.dataset_fingerprint(run_a["images"])


@pytest.mark.parametrize("swap, match", [
    ("labels", r"labels .*/b\d*/labels was made from another dataset \(images fingerprint \w{12}, "
               r"but images .*/a\d*/images has \w{12}\)"),
    ("completion", r"completion .*/b\d*/completion was made from other labels \(labels fingerprint \w+, "
                   r"but labels .*/a\d*/labels has \w+\) and from another dataset .*rerun the complete step"),
    ("splits", r"splits .*/b\d*/splits was made from other labels .* and from another dataset"),
])
def test_an_artifact_of_another_dataset_is_named(run_a, run_b, swap, match):
    with pytest.raises(InputError, match=match):
        pv.check_inputs(**{**run_a, swap: run_b[swap]})


def test_artifacts_disagree_even_without_their_common_input(run_a, run_b):
    # No labels given: the completion's and the splits' recorded labels must still agree.
    with pytest.raises(InputError, match=r"splits .*/b\d*/splits was made from other labels .*"
                                         r"but completion .*/a\d*/completion was made from"):
        pv.check_inputs(completion=run_a["completion"], splits=run_b["splits"])


def test_completion_with_another_multiple(run_a, tmp_path):
    other = tmp_path / "completion8"
    complete_dataset(run_a["images"], run_a["labels"], other, multiple=8, workers=1)
    pv.check_inputs(images=run_a["images"], completion=other, multiple=8)
    with pytest.raises(InputError, match=r"completion .*completion8 was made with multiple=8 but 4 images "
                                         r"per identity are needed; rerun the complete step with multiple=4"):
        pv.check_inputs(images=run_a["images"], completion=other, labels=run_a["labels"], multiple=4)


@pytest.mark.parametrize("kind, step", [("labels", "labels"), ("completion", "complete"), ("splits", "splits")])
def test_missing_provenance_says_to_rerun_the_step(run_a, tmp_path, kind, step):
    old = shutil.copytree(run_a[kind], tmp_path / kind)
    (old / pv.PROVENANCE_JSON).unlink()
    with pytest.raises(InputError, match=rf"{kind}/provenance.json: not found; .* older version .*"
                                         rf"rerun the {step} step"):
        pv.check_inputs(**{kind: old})


def test_an_artifact_of_the_wrong_kind(run_a):
    with pytest.raises(InputError, match=r"labels/provenance.json: describes a 'labels' artifact, "
                                         r"expected 'splits'"):
        pv.check_inputs(splits=run_a["labels"])
    with pytest.raises(InputError, match=r"manifest.jsonl: not found; is .* the images output of the extract step"):
        pv.check_inputs(images=run_a["labels"])


def test_check_recorded(run_a, run_b):
    fingerprints = pv.check_inputs(**run_a)
    pv.check_recorded(dict(fingerprints), fingerprints, "model.json", "trained")
    pv.check_recorded({"images": fingerprints["images"]}, fingerprints, "model.json", "trained")
    other = pv.check_inputs(**run_b)
    with pytest.raises(InputError, match=r"model.json: trained on other splits \(splits fingerprint "
                                         r"\w{12}\) than the splits given"):
        pv.check_recorded({**fingerprints, "splits": other["splits"]}, fingerprints, "model.json", "trained")
    with pytest.raises(InputError, match=r"model.json: expected a JSON object"):
        pv.check_recorded(["x"], fingerprints, "model.json", "trained")


# ----------------------------------------------------------------------------- the training code's fingerprint

def package_copy(tmp_path):
    """A copy of the facenet_kfp package's source (the fingerprint reads files, it imports nothing)."""
    from facenet_kfp import checkpoints

    source = Path(checkpoints.__file__).resolve().parent
    copy = tmp_path / "facenet_kfp"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_fingerprint_covers_what_training_imports(tmp_path):
    from facenet_kfp import checkpoints

    modules = checkpoints.training_modules()
    assert modules == sorted(modules)
    # The entry points, what they import at module level and inside functions, and what those import.
    assert {"facenet_kfp", "facenet_kfp.train", "facenet_kfp.trainer", "facenet_kfp.checkpoints",
            "facenet_kfp.monitor", "facenet_kfp.objectives", "facenet_kfp.losses", "facenet_kfp.model",
            "facenet_kfp.export", "facenet_kfp.numpy_input", "facenet_kfp.tf_input",
            "facenet_kfp.preprocess"} <= set(modules)
    # Steps training never imports.
    assert not {"facenet_kfp.evaluate", "facenet_kfp.report", "facenet_kfp.synth", "facenet_kfp.cli"} & set(modules)
    code = checkpoints.code_fingerprint()
    assert code["modules"] == modules and code == checkpoints.code_fingerprint(package_copy(tmp_path))


def test_editing_any_covered_module_changes_the_fingerprint(tmp_path):
    from facenet_kfp import checkpoints

    copy = package_copy(tmp_path)
    first = checkpoints.code_fingerprint(copy)
    for name in first["modules"]:
        path = copy.joinpath(*name.split(".")[1:]).with_suffix(".py") if name != "facenet_kfp" else None
        if path is None or not path.is_file():
            path = copy.joinpath(*name.split(".")[1:], "__init__.py")
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert checkpoints.code_fingerprint(copy)["sha256"] != first["sha256"], name
        path.write_bytes(original)
    assert checkpoints.code_fingerprint(copy) == first
    (copy / "report.py").write_text("# not a training module\n")
    assert checkpoints.code_fingerprint(copy) == first


def test_a_module_imported_only_inside_a_function_is_covered(tmp_path):
    """A new module that a training module imports lazily, and the modules that one imports in turn,
    relative imports and a whole subpackage included."""
    from facenet_kfp import checkpoints

    copy = package_copy(tmp_path)
    assert "facenet_kfp.lazy_helper" not in checkpoints.training_modules(copy)
    (copy / "lazy_helper.py").write_text("def f():\n    from .lazy_deeper import g\n    return g()\n")
    (copy / "lazy_deeper.py").write_text("import facenet_kfp.extract.boxes\n\ndef g():\n    return 1\n")
    trainer = copy / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n\ndef _uses_the_helper():\n"
                       "    from facenet_kfp import lazy_helper\n    return lazy_helper.f()\n")
    modules = checkpoints.training_modules(copy)
    assert {"facenet_kfp.lazy_helper", "facenet_kfp.lazy_deeper"} <= set(modules)
    subpackage = sorted("facenet_kfp.extract" + ("" if p.name == "__init__.py" else f".{p.stem}")
                        for p in (copy / "extract").glob("*.py"))
    assert set(subpackage) <= set(modules) and len(subpackage) > 2
    before = checkpoints.code_fingerprint(copy)["sha256"]
    (copy / "extract" / "layout.py").write_text((copy / "extract" / "layout.py").read_text() + "\n# edited\n")
    assert checkpoints.code_fingerprint(copy)["sha256"] != before
