"""Tests of training: schedule and batch statistics against references, a short run, resume, fail-fast."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facenet_kfp import fsutil, objectives, provenance, tensorboard_log
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import write_json

tf = pytest.importorskip("tensorflow")
train_mod = pytest.importorskip("facenet_kfp.train")
from facenet_kfp import checkpoints as checkpoints_mod  # noqa: E402  (after the importorskip guards)
from facenet_kfp import monitor as monitor_mod  # noqa: E402
from facenet_kfp import trainer as trainer_mod  # noqa: E402

from tests.builders import HEADED, build_train_inputs, headed_loss  # noqa: E402  (after the importorskip guards)

ROOT = Path(__file__).resolve().parents[1]

# A run the tiny dataset learns in a few dozen steps on 2 CPU cores.
TINY = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.8, embedding_dim=16, p=4, k=4,
                   loss="batch_hard", margin=0.5, squared=True, learning_rate=2e-3, lr_schedule="constant",
                   warmup_steps=0, max_steps=30, augment=True, validate_every=15, validation_batches=2,
                   checkpoint_every=10, log_every=5, precision="float32", seed=0)


def run_train(d: dict, model_dir: Path, config: TrainConfig, **kwargs) -> dict:
    return train_mod.train(d["dataset"], d["completion"], d["labels"], d["splits"], model_dir, config, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_train_inputs(tmp_path_factory.mktemp("tiny-train"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One 30-step run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("run")
    metrics = run_train(tiny, out / "model", TINY, tensorboard_dir=str(out / "tb"))
    return {"metrics": metrics, "model": out / "model", "ckpt": out / "model.ckpt", "tb": out / "tb"}


# ----------------------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_matches_reference(schedule):
    config = dataclasses.replace(TINY, learning_rate=1e-3, warmup_steps=10, max_steps=110, lr_schedule=schedule)
    keras_schedule = train_mod.make_schedule(config)
    # Hand-computed values: warm-up (step+1)/10, then the cosine from 1e-3 to 1e-5 over 100 steps.
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3}
    if schedule == "cosine":
        expected.update({60: 1e-3 * (0.01 + 0.99 * 0.5), 110: 1e-5, 500: 1e-5,
                         35: 1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))})
    else:
        expected.update({60: 1e-3, 110: 1e-3, 500: 1e-3})
    for step, value in expected.items():
        assert float(keras_schedule(step)) == pytest.approx(value, rel=1e-5), step
        assert train_mod.learning_rate_at(step, 1e-3, 10, 110, schedule) == pytest.approx(value, rel=1e-9)
    no_warmup = train_mod.make_schedule(dataclasses.replace(config, warmup_steps=0))
    assert float(no_warmup(0)) == pytest.approx(1e-3, rel=1e-6)


def test_batch_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(3), 4).astype(np.int32)
    d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    for squared in (True, False):
        d = d2 if squared else np.sqrt(d2)
        config = dataclasses.replace(TINY, squared=squared, loss="batch_hard", margin=0.3)
        out = {k: float(v) for k, v in train_mod.batch_loss(config, labels, emb).items()}
        same = labels[:, None] == labels[None, :]
        hardest = [max(d[a, p] for p in range(12) if same[a, p] and p != a)
                   - min(d[a, n] for n in range(12) if not same[a, n]) + 0.3 for a in range(12)]
        assert out["loss"] == pytest.approx(np.mean(np.maximum(hardest, 0)), abs=1e-5)
        pos = [d[a, p] for a in range(12) for p in range(12) if same[a, p] and a != p]
        neg = [d[a, n] for a in range(12) for n in range(12) if not same[a, n]]
        assert out["mean_positive_distance"] == pytest.approx(np.mean(pos), abs=1e-5)
        assert out["mean_negative_distance"] == pytest.approx(np.mean(neg), abs=1e-5)
        plain = [np.sqrt(d2[i, j]) for i in range(12) for j in range(12) if i != j]
        assert out["mean_pairwise_l2"] == pytest.approx(np.mean(plain), abs=1e-5)
        assert out["max_pairwise_l2"] == pytest.approx(np.max(plain), abs=1e-5)
    batch_all = dataclasses.replace(TINY, loss="batch_all", margin=0.3, squared=True)
    out = train_mod.batch_loss(batch_all, labels, emb)
    triplets = [d2[a, p] - d2[a, n] + 0.3 for a in range(12) for p in range(12) for n in range(12)
                if same[a, p] and a != p and not same[a, n]]
    positive = [t for t in triplets if t > 0]
    assert float(out["loss"]) == pytest.approx(np.mean(positive), abs=1e-5)
    assert float(out["fraction_positive_triplets"]) == pytest.approx(len(positive) / len(triplets), abs=1e-6)


def test_precision_and_strategy_on_cpu():
    assert train_mod.resolve_precision("auto") == ("mixed_float16" if tf.config.list_logical_devices("GPU")
                                                   else "float32")
    assert train_mod.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert train_mod.distribution_strategy().num_replicas_in_sync == 1
    assert train_mod.default_checkpoint_dir("/a/b/model") == "/a/b/model.ckpt"


# ----------------------------------------------------------------------------- a short run

@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_artifact(trained, tiny):
    metrics = trained["metrics"]
    history = json.loads((trained["model"] / "history.json").read_text())
    train_hist = history["train"]
    assert [r["step"] for r in train_hist] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in history["val"]] == [0, 15, 30]   # 0: the untrained starting point
    first, last = train_hist[0], train_hist[-2:]
    assert np.mean([r["loss"] for r in last]) < 0.5 * first["loss"]
    assert np.mean([r["mean_negative_distance"] for r in last]) > first["mean_negative_distance"]
    assert metrics["steps"] == 30 and metrics["start_step"] == 0 and metrics["images_per_second"] > 0
    assert metrics["train_loss"] == train_hist[-1]["loss"]
    assert metrics["val_loss"] == history["val"][-1]["loss"]
    for key in ("train_fraction_positive", "val_fraction_positive", "val_mean_positive_distance",
                "val_mean_negative_distance"):
        assert math.isfinite(metrics[key]), key

    info = json.loads((trained["model"] / "model.json").read_text())
    assert info["architecture"] == "small_cnn" and info["input_shape"] == [32, 32, 3]
    assert info["embedding_dim"] == 16 and info["trained_steps"] == 30
    assert info["distance"]["name"] == "squared_l2" and "squared" not in info["distance"]
    assert info["loss"] == "batch_hard" and info["margin"] == 0.5 and info["distance"]["margin"] == 0.5
    assert info["preprocessing"] == {"version": "centre-crop-v1", "image_size": 32, "crop_fraction": 0.8,
                                     "scale": "[-1,1]"}
    assert (trained["model"] / "model.keras").is_file() and (trained["model"] / "curves.png").is_file()
    assert (trained["model"] / "saved_model" / "saved_model.pb").is_file()

    assert info["start_step"] == 0 and info["resumed_from"] is None
    assert info["inputs"] == provenance.check_inputs(images=tiny["dataset"], completion=tiny["completion"],
                                                     labels=tiny["labels"], splits=tiny["splits"])

    # Checkpoints: the last two kept, plus the history so far and what made them.
    assert sorted(p.name for p in trained["ckpt"].glob("ckpt-*")) == ["ckpt-20.npz", "ckpt-30.npz"]
    with np.load(trained["ckpt"] / "ckpt-30.npz") as saved:
        assert int(saved["step"]) == 30
        names = json.loads(str(saved["names"]))
        assert names["format"] == "facenet-kfp-checkpoint/3" and names["head"] == []     # triplets: no head
        for kind in ("model", "head", "optimizer"):
            assert len(names[kind]) == len([k for k in saved.files if k.startswith(f"{kind}/")]), kind
        assert any(n.endswith("iteration") or "iterations" in n for n in names["optimizer"]), names["optimizer"]
    assert json.loads((trained["ckpt"] / "history.json").read_text())["step"] == 30
    made = json.loads((trained["ckpt"] / "provenance.json").read_text())
    assert made["run"] == str(trained["model"]) and made["inputs"] == info["inputs"]
    assert made["train"]["embedding_dim"] == 16 and made["code"] == train_mod.code_fingerprint()
    assert made["format"] == "facenet-kfp-checkpoint/3"
    assert {"facenet_kfp.train", "facenet_kfp.trainer", "facenet_kfp.losses"} <= set(made["code"]["modules"])

    # TensorBoard scalars.
    tags = set()
    for event_file in trained["tb"].glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags |= {v.tag for v in event.summary.value}
    assert {"train/loss", "train/fraction_positive_triplets", "val/loss", "train/images_per_second"} <= tags


def copy_checkpoint(trained, folder: Path) -> Path:
    """A copy of the trained run's checkpoint folder (the module's run stays as it is)."""
    shutil.copytree(trained["ckpt"], folder)
    return folder


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(trained, tiny, tmp_path, caplog):
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    same_run = str(trained["model"])        # the run key the checkpoint was written for
    with caplog.at_level(logging.INFO, logger="facenet_kfp.train"):
        metrics = run_train(tiny, tmp_path / "model", dataclasses.replace(TINY, max_steps=40),
                            checkpoint_dir=str(ckpt), run_key=same_run)
    assert "resuming from checkpoint" in caplog.text and "at step 30 of 40" in caplog.text
    assert metrics["start_step"] == 30 and metrics["steps"] == 40
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    before = json.loads((trained["model"] / "history.json").read_text())
    assert history["train"][:6] == before["train"]                       # kept, not retrained
    assert [r["step"] for r in history["train"][6:]] == [35, 40]
    assert [r["step"] for r in history["val"]] == [0, 15, 30, 40]
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["trained_steps"] == 40 and info["start_step"] == 30
    assert info["resumed_from"] == str(ckpt / "ckpt-30.npz")

    # A checkpoint of another model is refused, naming the setting.
    with pytest.raises(InputError, match=r"embedding_dim: 16 -> 32.*delete .*ckpt to train from step 0"):
        run_train(tiny, tmp_path / "other", dataclasses.replace(TINY, max_steps=50, embedding_dim=32),
                  checkpoint_dir=str(ckpt), run_key=same_run)
    # So is one written for another run (another model output), with the same inputs and settings.
    with pytest.raises(InputError, match=r"run: .*model' -> .*other'"):
        run_train(tiny, tmp_path / "other", dataclasses.replace(TINY, max_steps=50), checkpoint_dir=str(ckpt))


@pytest.mark.slow
def test_checkpoint_for_other_inputs_is_refused(trained, tmp_path):
    """`train <other dataset> --out model` next to the first run's model.ckpt: refused, nothing replaced."""
    other = build_train_inputs(tmp_path / "other", size=48)           # the same people, other pictures
    before = (trained["model"] / "model.json").read_text()
    with pytest.raises(InputError) as caught:
        run_train(other, trained["model"], TINY)
    message = str(caught.value)
    assert message.startswith(f"{trained['ckpt']}: the checkpoint was written for other inputs")
    assert "inputs.images:" in message
    assert f"delete {trained['ckpt']} to train from step 0, or choose another checkpoint folder" in message
    assert (trained["model"] / "model.json").read_text() == before


@pytest.mark.slow
def test_checkpoint_without_provenance_is_refused(trained, tiny, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    (ckpt / "provenance.json").unlink()                   # as written by an older version
    with pytest.raises(InputError, match=r"ckpt/provenance.json: not found, so nothing says which inputs"):
        run_train(tiny, tmp_path / "model", TINY, checkpoint_dir=str(ckpt), run_key=str(trained["model"]))
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(trained, tiny, tmp_path, caplog):
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    latest = ckpt / "ckpt-30.npz"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="facenet_kfp.train"):
        metrics = run_train(tiny, tmp_path / "model", TINY, checkpoint_dir=str(ckpt),
                            run_key=str(trained["model"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"cannot restore checkpoint {latest}" in w for w in warnings), warnings
    assert metrics["start_step"] == 20 and metrics["steps"] == 30
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["resumed_from"] == str(ckpt / "ckpt-20.npz")
    # Training wrote ckpt-30 anew, readable to its last byte.
    assert sorted(p.name for p in ckpt.glob("ckpt-*")) == ["ckpt-20.npz", "ckpt-30.npz"]
    with np.load(latest) as saved:
        assert int(saved["step"]) == 30

    for name in ("ckpt-30.npz", "ckpt-20.npz"):
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:40])
    with pytest.raises(InputError) as caught:
        run_train(tiny, tmp_path / "again", TINY, checkpoint_dir=str(ckpt), run_key=str(trained["model"]))
    message = str(caught.value)
    assert message.startswith(f"{ckpt}: no checkpoint can be restored")
    assert f"{latest}: BadZipFile" in message and f"{ckpt / 'ckpt-20.npz'}: " in message
    assert message.endswith(f"delete {ckpt} to train from step 0")


def test_checkpoint_folder_of_the_tensorflow_format_is_refused(tiny, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.mkdir()
    for name in ("checkpoint", "ckpt-10.index", "ckpt-10.data-00000-of-00001"):
        (ckpt / name).write_bytes(b"written by an earlier version")
    with pytest.raises(InputError, match=r"model.ckpt: holds ckpt-10.index, a TensorFlow checkpoint of an earlier "
                                         r"version.*delete .*model.ckpt to train from step 0"):
        run_train(tiny, tmp_path / "model", FAST)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != train_mod.TRAIN_LOCK) == [
        "checkpoint", "ckpt-10.data-00000-of-00001", "ckpt-10.index"]
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- an objective with a head

def fit_steps(trainer, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    return trainer.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False).history


def test_a_head_trains_and_is_checkpointed(tmp_path, monkeypatch):
    """An objective's head (registered here for the test only) is a tracked layer of the trainer: its
    weights train with the embedding model's and a checkpoint saves and restores them."""
    monkeypatch.setitem(objectives.OBJECTIVES, "headed", HEADED)
    config = dataclasses.replace(TINY, learning_rate=1e-2)
    trainer = train_mod.build_trainer(config, "float32", train_mod.Placement(), objective=HEADED)
    assert trainer.objective is HEADED and trainer.head.name == "test_head"
    head_kernel = trainer.head.kernel
    assert any(v is head_kernel for v in trainer.trainable_variables)
    before = np.array(head_kernel.numpy())
    logs = fit_steps(trainer, 3)
    assert set(logs) == set(HEADED.reported())
    assert np.abs(head_kernel.numpy() - before).max() > 1e-4          # the head trained
    ckpt = tmp_path / "ckpt"
    path = train_mod.save_checkpoint(str(ckpt), trainer, 3)
    with np.load(path) as saved:
        names = json.loads(str(saved["names"]))
        assert names["head"] == [head_kernel.path] and np.array_equal(saved["head/0000"], head_kernel.numpy())
        assert len(names["model"]) == len(trainer.embedding.weights)
        assert len(names["optimizer"]) == len(trainer.optimizer.variables)
    state = [np.array(v.numpy()) for v in (*trainer.weights, *trainer.optimizer.variables)]

    fresh = train_mod.build_trainer(dataclasses.replace(config, seed=1), "float32", train_mod.Placement(),
                                    objective=HEADED)
    assert not np.array_equal(fresh.head.kernel.numpy(), head_kernel.numpy())
    assert train_mod.load_checkpoint(path, fresh) == 3
    for want, got in zip(state, (*fresh.weights, *fresh.optimizer.variables), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    # The restored trainer continues as the saved one does.
    fit_steps(trainer, 2, seed=1)
    fit_steps(fresh, 2, seed=1)
    np.testing.assert_allclose(fresh.head.kernel.numpy(), head_kernel.numpy(), rtol=1e-5, atol=1e-6)
    # Validation computes the objective's statistics with the head as it is.
    rng = np.random.default_rng(2)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    state = train_mod.RunState(config, 5, str(ckpt), tensorboard_log.TensorBoardLog([], "headed"),
                               {"train": [], "val": []}, [(images, labels)], [images], step=5)
    record = train_mod.validate(trainer, state)
    embeddings = train_mod.evaluation_model(trainer, state).predict(images, verbose=0)
    want = headed_loss(labels, embeddings, config, trainer.head(embeddings))
    assert set(record) == {"step", *HEADED.statistics} and record["step"] == 5
    for key in HEADED.statistics:
        assert record[key] == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key


def test_a_checkpoint_of_an_earlier_format_is_refused(tmp_path):
    trainer = train_mod.build_trainer(FAST, "float32", train_mod.Placement())
    path = Path(train_mod.save_checkpoint(str(tmp_path / "ckpt"), trainer, 4))
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    names = json.loads(str(arrays["names"]))
    del names["head"]
    arrays["names"] = np.asarray(json.dumps({**names, "format": "facenet-kfp-checkpoint/2"}))
    np.savez(path, **{k: v for k, v in arrays.items() if not k.startswith("head/")})
    message = (rf"{re.escape(str(path))}: a checkpoint of format facenet-kfp-checkpoint/2, written by an earlier "
               rf"version of the trainer .*cannot be resumed; delete {re.escape(str(tmp_path / 'ckpt'))} to train "
               rf"from step 0")
    with pytest.raises(checkpoints_mod.CheckpointFormatError, match=message):
        train_mod.load_checkpoint(str(path), trainer)
    with pytest.raises(InputError, match=message):        # refused, not skipped for an older checkpoint
        train_mod.restore_latest(str(tmp_path / "ckpt"), trainer)


def test_a_checkpoint_folder_of_an_earlier_format_is_refused(trained, tiny, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    made = json.loads((ckpt / "provenance.json").read_text())
    write_json(ckpt / "provenance.json", {**made, "format": "facenet-kfp-checkpoint/2"})
    with pytest.raises(InputError, match=r"ckpt/provenance.json: the checkpoints in .*ckpt are of format "
                                         r"facenet-kfp-checkpoint/2, written by an earlier version.*delete .*ckpt "
                                         r"to train from step 0"):
        run_train(tiny, tmp_path / "model", TINY, checkpoint_dir=str(ckpt), run_key=str(trained["model"]))
    assert not (tmp_path / "model").exists()


def test_a_checkpoint_of_other_code_is_refused_naming_the_code_it_covered(trained, tiny, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    made = json.loads((ckpt / "provenance.json").read_text())
    write_json(ckpt / "provenance.json", {**made, "code": {**made["code"], "sha256": "0" * 64,
                                                           "modules": made["code"]["modules"][:-1]}})
    with pytest.raises(InputError) as caught:
        run_train(tiny, tmp_path / "model", TINY, checkpoint_dir=str(ckpt), run_key=str(trained["model"]))
    message = str(caught.value)
    assert "code sha256 (of facenet_kfp, facenet_kfp.checkpoints, " in message and "000000000000… -> " in message
    assert f"code modules: +{made['code']['modules'][-1]}" in message


# ----------------------------------------------------------------------------- fail fast

FAST = dataclasses.replace(TINY, max_steps=6, log_every=1, validate_every=0, checkpoint_every=100)


def test_nan_loss_fails_at_its_step(tiny, tmp_path, monkeypatch):
    real = train_mod.batch_loss

    def poisoned(config, labels, embeddings, *args):
        out = dict(real(config, labels, embeddings, *args))
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "batch_loss", poisoned)
    with pytest.raises(FacenetError, match=r"loss is nan at step 1 .*learning_rate"):
        run_train(tiny, tmp_path / "model", FAST)
    assert not (tmp_path / "model").exists()


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(InputError, match="dataset folder not found"):
        train_mod.train(tmp_path / "nope", None, tiny["labels"], tiny["splits"], tmp_path / "m", FAST)
    with pytest.raises(InputError, match="completion folder not found"):
        train_mod.train(tiny["dataset"], tmp_path / "nope", tiny["labels"], tiny["splits"], tmp_path / "m", FAST)
    with pytest.raises(InputError, match=r"split 'train' has 8 identities.*p=9"):
        run_train(tiny, tmp_path / "m", dataclasses.replace(FAST, p=9))
    with pytest.raises(InputError, match=r"train.loss must be one of"):
        run_train(tiny, tmp_path / "m", dataclasses.replace(FAST, loss="triplet"))
    # Artifacts that do not belong together: a completion of other pictures, or made for another K.
    other = build_train_inputs(tmp_path / "other", size=48)
    with pytest.raises(InputError, match=r"other/completion was made from .*another dataset"):
        train_mod.train(tiny["dataset"], other["completion"], tiny["labels"], tiny["splits"], tmp_path / "m",
                        FAST)
    with pytest.raises(InputError, match=r"made with multiple=4 but 2 images per identity"):
        run_train(tiny, tmp_path / "m", dataclasses.replace(FAST, k=2))
    splits = tmp_path / "splits"
    shutil.copytree(tiny["splits"], splits)
    (splits / "val.txt").write_text("Ivy_I\t3\n")
    with pytest.raises(InputError, match=r"val.txt: validation needs 2 identities"):
        train_mod.train(tiny["dataset"], tiny["completion"], tiny["labels"], splits, tmp_path / "m",
                        dataclasses.replace(FAST, validate_every=5))
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- several replicas

# Unit embeddings of a P=4 x K=2 batch: replica 0 gets identities 0, 1 (rows 0-3), replica 1 gets 2, 3.
# Identity 2 lies next to identity 0, so mining across the two halves would find other hardest negatives.
MINING_POINTS = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.8, 0.6],
                          [0.95, 0.3, 0], [0.9, 0, 0.4], [0, 0, 1], [0.6, 0, 0.8]], np.float32)
MINING_LABELS = np.repeat(np.arange(4), 2).astype(np.int32)
MINING_LOSSES = ("batch_all", "batch_hard", "semi_hard")
NOT_MINING_TARGET = np.random.default_rng(1).normal(size=(5,)).astype(np.float32)     # any point of R^5


def not_mining_loss(labels, embeddings, config, head_output=None):
    """The batch mean of a per-image term, sum_k (e_k - target_k)^2: an objective that does not mine."""
    from keras import ops
    return {"loss": ops.mean(ops.sum((embeddings - ops.convert_to_tensor(NOT_MINING_TARGET)) ** 2, axis=1))}


NOT_MINING = objectives.Objective(
    name="not_mining", summary="test only", loss="tests.test_train:not_mining_loss", pk_batches=False,
    distance=objectives.triplet_distance, loss_bound=lambda config: math.inf, statistics=("loss",))


def two_replica_probe() -> dict:
    """One `fit` step of `EmbeddingTrainer` on one device and on two logical CPU devices (MirroredStrategy).

    Runs in a fresh process: the logical devices must be set before
    TensorFlow starts. Returns {"gradients": {"one", "two"}: the kernel's
    gradient of a loss that does not mine (SGD, learning rate 1: gradient =
    old - new weights), "mined": {loss: statistics of MINING_POINTS on two
    replicas}}.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from facenet_kfp.model import L2Normalize

    def one_step(strategy, config, objective, images, kernel, learning_rate):
        with strategy.scope():
            model = keras.Sequential([keras.Input(images.shape[1:]), keras.layers.Flatten(),
                                      keras.layers.Dense(kernel.shape[1], use_bias=False), L2Normalize()])
            model.set_weights([kernel])
            trainer = train_mod.EmbeddingTrainer(model, config, objective, strategy.num_replicas_in_sync)
            trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate), jit_compile=False)
        batch = tf.data.Dataset.from_tensors((images, MINING_LABELS)).repeat()
        logs = trainer.fit(batch, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False).history
        return {k: float(v[-1]) for k, v in logs.items()}, kernel - model.get_weights()[0]

    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 2, 2, 3)).astype(np.float32)
    kernel = rng.normal(size=(12, 5)).astype(np.float32)

    gradients = {name: one_step(strategy, TINY, NOT_MINING, images, kernel, 1.0)[1].tolist()
                 for name, strategy in (("one", tf.distribute.get_strategy()), ("two", two))}
    identity = np.eye(3, dtype=np.float32)
    mined = {}
    for loss in MINING_LOSSES:
        config = dataclasses.replace(TINY, loss=loss, margin=0.5, squared=True)
        mined[loss] = one_step(two, config, None, MINING_POINTS.reshape(8, 1, 1, 3), identity, 0.0)[0]
    return {"replicas": two.num_replicas_in_sync, "gradients": gradients, "mined": mined}


def run_in_fresh_python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root (a new TensorFlow runtime); fails the test on rc != 0."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_replicas_average_gradients_and_mine_their_own_identities():
    out = run_in_fresh_python("import json; from tests.test_train import two_replica_probe; "
                              "print('PROBE', json.dumps(two_replica_probe()))").stdout
    probe = json.loads(out.split("PROBE ", 1)[1])
    assert probe["replicas"] == 2
    one, two = (np.array(probe["gradients"][k]) for k in ("one", "two"))
    assert np.abs(one).max() > 1e-3
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)     # the mean over replicas, not the sum

    points = MINING_POINTS / np.linalg.norm(MINING_POINTS, axis=1, keepdims=True)
    for loss in MINING_LOSSES:
        config = dataclasses.replace(TINY, loss=loss, margin=0.5, squared=True)
        whole = train_mod.batch_loss(config, MINING_LABELS, points)
        halves = [train_mod.batch_loss(config, MINING_LABELS[rows], points[rows])
                  for rows in (slice(0, 4), slice(4, 8))]
        assert abs(float(whole["loss"]) - np.mean([float(h["loss"]) for h in halves])) > 0.05, loss
        for key, value in probe["mined"][loss].items():
            assert value == pytest.approx(np.mean([float(h[key]) for h in halves]), abs=1e-5), (loss, key)


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices(tmp_path):
    """The multi-GPU training run (MirroredStrategy, mixed_float16) on 2 logical CPUs."""
    script = textwrap.dedent(f"""
        import json, logging
        logging.basicConfig(level=logging.INFO)
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import dataclasses
        from pathlib import Path
        from facenet_kfp import train, trainer
        from tests.builders import build_train_inputs
        from tests.test_train import TINY
        trainer.distribution_strategy = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        root = Path({str(tmp_path)!r})
        d = build_train_inputs(root)
        config = dataclasses.replace(TINY, max_steps=4, log_every=2, validate_every=4, checkpoint_every=4,
                                     precision="mixed_float16")
        metrics = train.train(d["dataset"], d["completion"], d["labels"], d["splits"], root / "model", config)
        print("METRICS", json.dumps(metrics))
        try:
            train.train(d["dataset"], d["completion"], d["labels"], d["splits"], root / "odd",
                        dataclasses.replace(config, p=3), checkpoint_dir=str(root / "odd.ckpt"))
        except Exception as exc:
            print("ODD", type(exc).__name__, exc)
    """)
    result = run_in_fresh_python(script)
    assert "2 replica(s)" in result.stderr and "precision mixed_float16" in result.stderr
    metrics = json.loads(result.stdout.split("METRICS ", 1)[1].splitlines()[0])
    assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["precision"] == "mixed_float16" and info["replicas"] == 2
    assert "ODD InputError train.p=3 must be a multiple of the 2 GPUs" in result.stdout


def test_only_objectives_on_p_x_k_batches_need_whole_identities_per_replica(monkeypatch):
    labels, synthetic = np.repeat(np.arange(6), 4), np.zeros(24, bool)
    config = dataclasses.replace(TINY, p=3)
    with pytest.raises(InputError, match=r"train.p=3 must be a multiple of the 2 GPUs \(train.loss batch_hard"):
        train_mod._check_train_split(labels, synthetic, "splits", config, replicas=2)
    train_mod._check_train_split(labels, synthetic, "splits", config, replicas=1)
    unpaired = dataclasses.replace(objectives.get(config.loss), pk_batches=False)
    monkeypatch.setattr(objectives, "for_config", lambda _: unpaired)
    train_mod._check_train_split(labels, synthetic, "splits", config, replicas=2)


# ----------------------------------------------------------------------------- TensorBoard events

TRAIN_TAGS = {f"train/{k}" for k in train_mod.STAT_KEYS} | {"train/learning_rate", "train/images_per_second"}
VAL_TAGS = {f"val/{k}" for k in train_mod.STAT_KEYS}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over a folder's event files, read as TensorBoard does (a cut tail skipped)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        try:
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    assert value.metadata.plugin_data.plugin_name == "scalars", value.tag
                    found.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
        except tf.errors.DataLossError:
            pass
    return found


@pytest.mark.slow
def test_tensorboard_events_hold_every_logged_and_validated_step(trained):
    scalars = read_scalars(trained["tb"])
    assert set(scalars) == TRAIN_TAGS | VAL_TAGS
    history = json.loads((trained["model"] / "history.json").read_text())
    for split, tags in (("train", TRAIN_TAGS), ("val", VAL_TAGS)):
        steps = [r["step"] for r in history[split]]
        for tag in tags:
            assert [s for s, _ in scalars[tag]] == steps, tag
            key = tag.split("/", 1)[1]
            if key != "images_per_second":
                np.testing.assert_allclose([v for _, v in scalars[tag]], [r[key] for r in history[split]],
                                           rtol=1e-6, err_msg=tag)
    assert all(v > 0 for _, v in scalars["train/images_per_second"])
    assert len(list(trained["tb"].glob("events.out.tfevents.*"))) == 1
    marker = json.loads((trained["tb"] / tensorboard_log.TENSORBOARD_RUN_JSON).read_text())
    assert marker == {"format": tensorboard_log.TENSORBOARD_FORMAT, "run": str(trained["model"])}


@pytest.mark.slow
def test_resumed_run_completes_tensorboard_folders_without_repeating_a_step(trained, tiny, tmp_path):
    """A retried pod's folders: one cut short by the kill (kept, completed), one new (the restored history
    is replayed into it). Each ends with every (tag, step) of the whole run exactly once."""
    ckpt = copy_checkpoint(trained, tmp_path / "ckpt")
    earlier = tmp_path / "earlier"
    shutil.copytree(trained["tb"], earlier)
    (events,) = earlier.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-5])            # the last record cut short
    lost = {tag for tag, points in read_scalars(earlier).items() if points[-1][0] < 30}
    assert lost                                               # the cut removed a step-30 point
    fresh = tmp_path / "fresh"
    run_train(tiny, tmp_path / "model", dataclasses.replace(TINY, max_steps=40), checkpoint_dir=str(ckpt),
              tensorboard_dir=[str(earlier), str(fresh)], run_key=str(trained["model"]))
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    for folder in (earlier, fresh):
        scalars = read_scalars(folder)
        assert set(scalars) == TRAIN_TAGS | VAL_TAGS, folder
        for tag, points in scalars.items():
            steps = sorted(s for s, _ in points)
            if tag == "train/images_per_second" and folder == fresh:
                assert steps == [35, 40]                      # a rate belongs to the call that measured it
            else:
                split = tag.split("/", 1)[0]
                assert steps == [r["step"] for r in history[split]], (folder.name, tag)
    assert len(list(earlier.glob("events.out.tfevents.*"))) == 2


def test_tensorboard_folder_belongs_to_one_run(tiny, tmp_path):
    folder = str(tmp_path / "tb")
    assert tensorboard_log.claim_tensorboard_dir(folder, "run-a") == {}
    assert json.loads((tmp_path / "tb" / tensorboard_log.TENSORBOARD_RUN_JSON).read_text())["run"] == "run-a"
    assert tensorboard_log.claim_tensorboard_dir(folder, "run-a") == {}          # the same run continues
    with pytest.raises(InputError, match=r"facenet-kfp-run.json: the TensorBoard folder holds the events of "
                                         r"run 'run-a', not of 'run-b'; give a new folder"):
        tensorboard_log.claim_tensorboard_dir(folder, "run-b")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    with pytest.raises(InputError, match=r"notes: TensorBoard folder is not empty and has no facenet-kfp-run"):
        tensorboard_log.claim_tensorboard_dir(str(tmp_path / "notes"), "run-a")
    # train() refuses such a folder before it trains.
    with pytest.raises(InputError, match="holds the events of run 'run-a'"):
        run_train(tiny, tmp_path / "model", FAST, tensorboard_dir=folder)
    assert not (tmp_path / "model").exists()
    assert [p.name for p in (tmp_path / "model.ckpt").iterdir()] == [train_mod.TRAIN_LOCK]   # nothing else


# ----------------------------------------------------------------------------- the monitor on set values

def monitor_steps(monitor, losses, mean_l2=0.5, max_l2=1.0, first=1, negative=1.0):
    """Feed `losses` as steps first, first + 1, ...; the step the monitor fails at, or None.
    `negative`: the mean negative distance of every step, or a list of one per step."""
    negatives = negative if isinstance(negative, list) else [negative] * len(losses)
    for i, loss in enumerate(losses):
        try:
            monitor.update(first + i, {"loss": loss, "mean_pairwise_l2": mean_l2, "max_pairwise_l2": max_l2,
                                       "mean_negative_distance": negatives[i]})
        except FacenetError:
            return first + i
    return None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_monitor_fails_on_a_non_finite_loss(bad):
    monitor = train_mod.TrainingMonitor(TINY)
    assert monitor_steps(monitor, [0.3] * 9) is None
    with pytest.raises(FacenetError, match=rf"loss is {bad} at step 10 \(learning rate 0.002\): training "
                                           r"diverged; lower train.learning_rate"):
        monitor.update(10, {"loss": bad, "mean_pairwise_l2": 0.5, "max_pairwise_l2": 1.0,
                            "mean_negative_distance": 1.0})


class _Probe:
    """A step's statistic as the device holds it: records the step whenever it is read back to the host."""

    def __init__(self, value: float, step: int, reads: list[int]):
        self.value, self.step, self.reads = value, step, reads

    def __array__(self, dtype=None, copy=None):
        self.reads.append(self.step)
        return np.asarray(self.value, dtype=dtype)


def _progress_callback(tmp_path, config: TrainConfig):
    from facenet_kfp.progress import Progress

    state = train_mod.RunState(config, 0, str(tmp_path / "ckpt"), tensorboard_log.TensorBoardLog([], "run"),
                               {"train": [], "val": []}, step=0)
    callback = train_mod.TrainingProgress(state, Progress("training", total=config.max_steps, every=math.inf))
    callback.set_model(type("Trainer", (), {"objective": objectives.get(config.loss)})())
    callback.on_train_begin()
    return callback, state


@pytest.mark.parametrize("bad_step", [2, 11, 12, 20])
def test_progress_reads_back_every_few_steps_and_fails_within_them_naming_the_step(tmp_path, bad_step):
    """Device values are read back on the first step and then every READBACK_STEPS steps (here log lines,
    validation and checkpoints are far apart); a NaN loss at step k fails by step k + READBACK_STEPS - 1, naming
    step k, and every step before it was checked."""
    n = monitor_mod.READBACK_STEPS
    config = dataclasses.replace(FAST, max_steps=100, log_every=1000, checkpoint_every=1000)
    callback, state = _progress_callback(tmp_path, config)
    reads: list[int] = []
    failed_at = None
    for step in range(1, 60):
        values = {k: 0.3 for k in train_mod.STAT_KEYS} | {"mean_negative_distance": 1.0, "mean_pairwise_l2": 1.0,
                                                   "max_pairwise_l2": 1.5}
        if step == bad_step:
            values["loss"] = float("nan")
        try:
            callback.on_train_batch_end(step - 1, {k: _Probe(v, step, reads) for k, v in values.items()})
        except FacenetError as exc:
            assert re.search(rf"loss is nan at step {bad_step} ", str(exc))
            failed_at = step
            break
        assert len(set(reads)) == (1 if step < 1 + n else 1 + (step - 1) // n * n)    # nothing else read yet
    assert failed_at is not None and bad_step <= failed_at <= bad_step + n - 1
    assert failed_at == 1 + -(-(bad_step - 1) // n) * n                               # the readback after it
    assert sorted(set(reads)) == list(range(1, bad_step + 1))             # checked up to the bad step, in order
    assert not (tmp_path / "ckpt").exists()


def test_progress_reads_back_before_logging_validating_and_checkpointing(tmp_path):
    config = dataclasses.replace(FAST, max_steps=100, log_every=3, checkpoint_every=1000)
    callback, state = _progress_callback(tmp_path, config)
    reads: list[int] = []
    for step in range(1, 8):
        values = {k: 0.3 for k in train_mod.STAT_KEYS} | {"mean_pairwise_l2": 1.0, "max_pairwise_l2": 1.5}
        callback.on_train_batch_end(step - 1, {k: _Probe(v, step, reads) for k, v in values.items()})
    assert sorted(set(reads)) == list(range(1, 7))                    # read at steps 1, 3 and 6: step 7 waits
    assert [record["step"] for record in state.history["train"]] == [3, 6]


def test_uint8_pixels_are_normalised_inside_the_trainer(tmp_path):
    """uint8 batches give the embeddings of u / 127.5 - 1 (`numpy_input.from_uint8`), and `fit` hands device
    values to a ``device_logs`` callback and Python floats to the others."""
    import keras

    from facenet_kfp.numpy_input import from_uint8

    config = dataclasses.replace(TINY, max_steps=2)
    trainer = train_mod.build_trainer(config, "float32", train_mod.Placement())
    pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trainer(pixels)),
                               keras.ops.convert_to_numpy(trainer(from_uint8(pixels))), rtol=0, atol=1e-6)
    labels = np.repeat(np.arange(4, dtype=np.int32), 4)
    seen = {}

    class Plain(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.setdefault("plain", []).append(type(logs["loss"]))

    class Device(keras.callbacks.Callback):
        device_logs = True

        def on_train_batch_end(self, batch, logs=None):
            seen.setdefault("device", []).append(float(keras.ops.convert_to_numpy(logs["loss"])))

    trainer.fit((batch for batch in [(pixels, labels)] * 2), steps_per_epoch=2, epochs=1, verbose=0,
                callbacks=[Plain(), Device()])
    assert seen["plain"] == [float, float] and len(seen["device"]) == 2
    assert all(math.isfinite(v) for v in seen["device"])


@pytest.mark.parametrize("squared,bound", [(True, 4.5), (False, 2.5)])
def test_monitor_asks_the_objective_for_the_largest_loss(squared, bound):
    """A triplet loss of unit vectors is at most the largest distance (4 squared, 2 plain) + margin (0.5)."""
    config = dataclasses.replace(TINY, squared=squared)
    monitor = train_mod.TrainingMonitor(config)
    assert monitor.loss_bound == objectives.get("batch_hard").loss_bound(config) == bound
    assert monitor_steps(monitor, [bound] * 3) is None
    with pytest.raises(FacenetError, match=rf"loss is {bound + 0.01:g} at step 4, above {bound:g}, the largest "
                                           r"train.loss=batch_hard can take .*not unit vectors"):
        monitor.update(4, {"loss": bound + 0.01, "mean_pairwise_l2": 0.5, "max_pairwise_l2": 1.0,
                           "mean_negative_distance": 1.0})
    unbounded = train_mod.TrainingMonitor(config, NOT_MINING)
    assert monitor.loss_bound < unbounded.loss_bound == math.inf
    assert monitor_steps(unbounded, [1e6] * 3) is None


@pytest.mark.parametrize("log_every", [1, 7, 1000])
def test_monitor_collapse_window_counts_steps_not_log_lines(log_every):
    n = train_mod.COLLAPSE_STEPS
    monitor = train_mod.TrainingMonitor(dataclasses.replace(TINY, log_every=log_every))
    low = train_mod.COLLAPSE_MEAN_DISTANCE / 2
    assert monitor_steps(monitor, [0.5] * (n - 1), mean_l2=low) is None       # one step short ...
    assert monitor_steps(monitor, [0.5], first=n) is None                      # ... then it recovers
    assert monitor_steps(monitor, [0.5] * (n - 1), mean_l2=low, first=n + 1) is None
    with pytest.raises(FacenetError, match=rf"embedding collapse at step {2 * n}: mean distance between "
                                           rf"embeddings below 0.001 for {n} steps; lower train.learning_rate"):
        monitor.update(2 * n, {"loss": 0.5, "mean_pairwise_l2": low, "max_pairwise_l2": 1.0,
                               "mean_negative_distance": 1.0})
    with pytest.raises(FacenetError, match=r"embedding collapse at step 3: all embeddings of the batch are at "
                                           r"one point \(largest distance 0.00e\+00\); lower train.learning_rate"):
        train_mod.TrainingMonitor(TINY).update(3, {"loss": 0.5, "mean_pairwise_l2": 0.0, "max_pairwise_l2": 0.0,
                                                   "mean_negative_distance": 0.0})


def test_monitor_fails_on_a_lasting_rise_of_more_than_a_margin():
    n, margin = train_mod.DIVERGENCE_STEPS, TINY.margin
    rng = np.random.default_rng(0)
    # A healthy run: from about the margin down to 0.01, with ripples of +-30 % (a real run's are smaller).
    healthy = [float(v) for v in (margin + 0.2) * np.exp(-np.arange(2000) / 300) * rng.uniform(0.7, 1.3, 2000)
               + 0.01]
    assert monitor_steps(train_mod.TrainingMonitor(TINY), healthy) is None
    # A rise by less than a margin, however long, is not divergence.
    assert monitor_steps(train_mod.TrainingMonitor(TINY), [0.05] * 100 + [0.05 + 0.9 * margin] * 500) is None
    # Flat at 0.05 for 100 steps, then 0.05 + margin + 0.1: the 50-step mean passes 0.05 + margin after
    # j high steps, 0.05 + (margin + 0.1) * j / 50 > 0.05 + margin, i.e. j = 42 for margin 0.5.
    j = math.floor(n * margin / (margin + 0.1)) + 1
    monitor = train_mod.TrainingMonitor(TINY)
    assert monitor_steps(monitor, [0.05] * 100 + [0.05 + margin + 0.1] * (j - 1)) is None
    with pytest.raises(FacenetError, match=r"training diverged at step 142: the mean loss of steps 93-142 is "
                                           r"0.554, up from 0.05 \(steps 1-50\), more than train.margin=0.5 "
                                           r"higher; lower train.learning_rate \(now 0.002\) or raise "
                                           r"train.warmup_steps"):
        monitor.update(100 + j, {"loss": 0.05 + margin + 0.1, "mean_pairwise_l2": 0.5, "max_pairwise_l2": 1.0,
                                 "mean_negative_distance": 1.0})


def test_training_checks_every_step_and_exports_nothing(tiny, tmp_path, monkeypatch):
    """A model whose embeddings are all one point, log_every far above the collapse window: every step is
    checked, so training fails at the first, says what to change and exports nothing."""
    import keras

    from facenet_kfp import model as model_mod

    def constant_model(input_shape, embedding_dim, architecture):
        inputs = keras.Input(shape=input_shape)
        x = keras.layers.GlobalAveragePooling2D()(inputs)
        x = keras.layers.Dense(embedding_dim, kernel_initializer="zeros", bias_initializer="ones")(x)
        return keras.Model(inputs, keras.layers.UnitNormalization()(x))

    steps_run = []
    real_batch_end = train_mod.TrainingProgress.on_train_batch_end

    def counting_batch_end(self, batch, logs=None):
        steps_run.append(batch)
        return real_batch_end(self, batch, logs)

    monkeypatch.setattr(model_mod, "build_embedding_model", constant_model)
    monkeypatch.setattr(train_mod.TrainingProgress, "on_train_batch_end", counting_batch_end)
    config = dataclasses.replace(FAST, max_steps=3 * train_mod.COLLAPSE_STEPS, log_every=1000)
    with pytest.raises(FacenetError, match=r"embedding collapse at step 1: all embeddings.*lower "
                                           r"train.learning_rate"):
        run_train(tiny, tmp_path / "model", config, tensorboard_dir=str(tmp_path / "tb"))
    assert steps_run == [0]                                  # fit's first batch, step 1
    assert not (tmp_path / "model").exists()                 # no model.json, no model.keras


def test_checkpoints_and_events_on_gcs_are_written_and_resumed(tiny, tmp_path, gcs):
    """checkpoint_dir and tensorboard_dir as gs:// URIs (a GCS emulator): written, kept, then resumed."""
    ckpt, events = "gs://test-bucket/ckpt/run", "gs://test-bucket/events/run"
    config = dataclasses.replace(TINY, max_steps=20, checkpoint_every=10, validate_every=0)
    first = run_train(tiny, tmp_path / "a", config, checkpoint_dir=ckpt, tensorboard_dir=events, run_key="run-1")
    assert first["start_step"] == 0 and first["steps"] == 20
    names = {blob.name for blob in gcs.list_blobs(prefix="ckpt/run/")}
    assert {"ckpt/run/ckpt-10.npz", "ckpt/run/ckpt-20.npz", "ckpt/run/provenance.json"} <= names
    event_files = [blob.name for blob in gcs.list_blobs(prefix="events/run/")
                   if blob.name.split("/")[-1].startswith(tensorboard_log.EVENT_FILE_PREFIX)]
    assert event_files
    second = run_train(tiny, tmp_path / "b", dataclasses.replace(config, max_steps=30), checkpoint_dir=ckpt,
                       tensorboard_dir=events, run_key="run-1")
    assert second["start_step"] == 20 and second["steps"] == 30
    steps = tensorboard_log.written_steps(events, fsutil.list_names(events))
    assert steps and max(steps.values()) == 30


# ----------------------------------------------------------------------------- training that did not learn

@pytest.mark.parametrize("squared,limit", [(True, 0.05), (False, 0.1)])
def test_monitor_negative_collapse_is_half_the_margin_as_an_l2_length(squared, limit):
    """margin 0.2: the limit is 0.5 * 0.2 = 0.1 in plain L2, (0.5 * sqrt(0.2))^2 = 0.05 in squared L2."""
    config = dataclasses.replace(TINY, margin=0.2, squared=squared)
    assert train_mod.collapse_negative_limit(config) == pytest.approx(limit)
    n = train_mod.COLLAPSE_STEPS
    # Healthy batch-hard runs dip to about 0.115 (squared) and 0.49 (plain) on the demo data: never fail.
    healthy = 0.115 if squared else 0.49
    assert monitor_steps(train_mod.TrainingMonitor(config), [0.2] * 200, negative=healthy) is None
    # A run one step short of the window that then recovers, twice: no failure (the window counts
    # consecutive steps).
    monitor = train_mod.TrainingMonitor(config)
    collapsed = limit * 0.9
    assert monitor_steps(monitor, [0.2] * n, negative=[collapsed] * (n - 1) + [limit * 1.1]) is None
    assert monitor_steps(monitor, [0.2] * (n - 1), negative=collapsed, first=n + 1) is None
    unit = "squared L2" if squared else "L2"
    with pytest.raises(FacenetError, match=rf"embedding collapse at step {2 * n}: the mean distance between "
                                           rf"different people's embeddings \({unit}\) was below {limit:g} "
                                           rf"\(half of train.margin=0.2 as an L2 length\) for the last {n} "
                                           r"steps, .* and it stayed there.*lower train.learning_rate \(now "
                                           r"0.002\) or raise train.warmup_steps"):
        monitor.update(2 * n, {"loss": 0.2, "mean_pairwise_l2": 0.5, "max_pairwise_l2": 1.0,
                               "mean_negative_distance": collapsed})


def test_monitor_fails_a_short_run_that_ends_collapsed():
    config = dataclasses.replace(TINY, margin=0.2, squared=True)
    ends = train_mod.COLLAPSE_END_STEPS
    monitor = train_mod.TrainingMonitor(config)
    assert monitor_steps(monitor, [0.2] * 19, negative=[0.6] + [0.0025] * 18) is None   # 18 < COLLAPSE_STEPS
    with pytest.raises(FacenetError, match=r"embedding collapse at step 19: .* for the last 18 steps, 0.0025 "
                                           r"at the last, and the run ended with it"):
        monitor.finish(19)
    # Fewer collapsed steps than COLLAPSE_END_STEPS at the end, or none: the run may end.
    monitor = train_mod.TrainingMonitor(config)
    assert monitor_steps(monitor, [0.2] * 10, negative=[0.6] * (11 - ends) + [0.0025] * (ends - 1)) is None
    monitor.finish(10)
    monitor = train_mod.TrainingMonitor(config)
    assert monitor_steps(monitor, [0.2] * 10, negative=[0.0025] * 9 + [0.6]) is None
    monitor.finish(10)


@pytest.mark.slow
@pytest.mark.parametrize("squared", [True, False])
def test_training_at_a_huge_learning_rate_fails_and_exports_nothing(tiny, tmp_path, squared):
    """learning_rate 1e6 pins the loss at the margin with the negatives near 0 (squared 0.007, plain 0.09 on
    the tiny data; limits 0.125 and 0.25 for margin 0.5): a 20-step run, shorter than the collapse window,
    fails at its last step, before its checkpoint; no model is exported."""
    config = dataclasses.replace(TINY, learning_rate=1e6, squared=squared, max_steps=20, validate_every=10,
                                 checkpoint_every=10)
    with pytest.raises(FacenetError, match=r"embedding collapse at step 20: .*and the run ended with it.*lower "
                                           r"train.learning_rate \(now 1e\+06\)"):
        run_train(tiny, tmp_path / "model", config)
    assert not (tmp_path / "model").exists()
    assert not (tmp_path / "model.ckpt" / "ckpt-20.npz").exists()
    # A longer run fails inside the window, at step 1 + COLLAPSE_STEPS at the latest.
    with pytest.raises(FacenetError, match=r"embedding collapse at step (\d+): .*and it stayed there") as caught:
        run_train(tiny, tmp_path / "long", dataclasses.replace(config, max_steps=120, checkpoint_every=100))
    assert int(re.search(r"at step (\d+)", str(caught.value)).group(1)) <= 1 + train_mod.COLLAPSE_STEPS
    assert not (tmp_path / "long").exists()


# ----------------------------------------------------------------------------- validation in short runs

@pytest.mark.slow
def test_validation_distances_are_on_the_training_scale_after_a_short_run(tiny, tmp_path):
    """Validation runs the model as exported: batch-norm statistics recalibrated on training batches, not
    training's moving averages (momentum 0.99: 82% of their starting point after 20 steps). Step 0's
    validation and step 1's training statistics come from the same weights; after 20 steps the validation
    negatives are on the scale of training's."""
    import keras

    config = dataclasses.replace(TINY, max_steps=20, log_every=1, validate_every=20, checkpoint_every=20,
                                 margin=0.2, learning_rate=1e-3)
    run_train(tiny, tmp_path / "model", config)
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    train_hist = {r["step"]: r for r in history["train"]}
    val = {r["step"]: r for r in history["val"]}
    for val_step, train_steps in ((0, [1]), (20, range(16, 21))):
        train_negative = np.mean([train_hist[s]["mean_negative_distance"] for s in train_steps])
        ratio = val[val_step]["mean_negative_distance"] / train_negative
        assert 0.5 < ratio < 2.0, (val_step, val[val_step], train_negative)
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["batch_norm_statistics"]["batches"] == train_mod.BN_CALIBRATION_BATCHES

    # The exported model's first batch norm holds the mean over the calibration batches of its input's batch
    # mean and variance (its input is the first convolution's output: no batch norm before it).
    model = keras.saving.load_model(tmp_path / "model" / "model.keras")
    _, _, calibration, close = train_mod._train_and_validation_batches(
        tiny["dataset"], tiny["completion"], tiny["labels"], tiny["splits"], config, 1, 0)
    close()
    assert len(calibration) == train_mod.BN_CALIBRATION_BATCHES
    conv = keras.Model(model.input, model.get_layer("block1_conv").output)
    outputs = [np.float64(keras.ops.convert_to_numpy(conv(images))) for images in calibration]
    bn = model.get_layer("block1_bn")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               np.mean([x.mean(axis=(0, 1, 2)) for x in outputs], axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance),
                               np.mean([x.var(axis=(0, 1, 2)) for x in outputs], axis=0), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- named errors

@pytest.mark.slow
def test_damaged_history_json_is_refused_naming_the_file(trained, tiny, tmp_path):
    for n, (content, match) in enumerate([
            ([], r"history.json: the training history is a JSON list, not an object"),
            ({"train": [], "val": []}, r"history.json: the training history has no integer step \(got None\)"),
            ({"step": 30, "train": [{"loss": 0.1}], "val": []}, r"history.json: train\[0\] is not a record with "
                                                                 r"an integer step"),
            ({"step": 30, "train": {}, "val": []}, r"history.json: train is a JSON dict, not a list")]):
        ckpt = copy_checkpoint(trained, tmp_path / f"ckpt{n}")
        (ckpt / "history.json").write_text(json.dumps(content))
        with pytest.raises(InputError, match=rf"^{re.escape(str(ckpt))}/{match}.*delete {re.escape(str(ckpt))} "
                                             r"to train from step 0"):
            run_train(tiny, tmp_path / f"model{n}", TINY, checkpoint_dir=str(ckpt), run_key=str(trained["model"]))
        assert not (tmp_path / f"model{n}").exists()


def test_checkpoint_or_tensorboard_folder_that_is_a_file_is_refused(tiny, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("a user's file\n")
    with pytest.raises(InputError, match=rf"^{a_file}: the checkpoint folder is a file, not a folder"):
        run_train(tiny, tmp_path / "model", FAST, checkpoint_dir=str(a_file))
    with pytest.raises(InputError, match=rf"^{a_file}: the TensorBoard folder is a file, not a folder"):
        run_train(tiny, tmp_path / "model", FAST, tensorboard_dir=str(a_file))
    with pytest.raises(InputError, match=rf"^{a_file}: the TensorBoard folder is a file"):
        tensorboard_log.TensorBoardLog([str(a_file)], "run")
    assert a_file.read_text() == "a user's file\n"
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("nested", [False, True])
def test_disk_full_during_a_checkpoint_names_the_folder(tiny, tmp_path, monkeypatch, nested):
    """The checkpoint write raises ENOSPC (nested: its cleanup fails the same way): a FacenetError
    'no space left on <checkpoint folder>', no model exported."""
    def full(path, data):
        if not nested:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        try:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        except OSError:
            raise OSError(errno.EIO, "Input/output error", path)   # noqa: B904 (the context is the point)

    monkeypatch.setattr(checkpoints_mod, "write_bytes", full)
    ckpt = tmp_path / "model.ckpt"
    config = dataclasses.replace(FAST, checkpoint_every=3)
    with pytest.raises(FacenetError, match=rf"^no space left on {ckpt}.*the checkpoint of step 3 did not fit "
                                           rf"\(writing {ckpt}/ckpt-3.npz\)"):
        run_train(tiny, tmp_path / "model", config)
    assert not (tmp_path / "model").exists()

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(checkpoints_mod, "write_bytes", denied)
    with pytest.raises(FacenetError, match=rf"^{ckpt}: cannot write the checkpoint of step 3 \({ckpt}/ckpt-3.npz: "
                                           r"Permission denied\)"):
        run_train(tiny, tmp_path / "model", config)


# ----------------------------------------------------------------------------- leftovers and races

def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_killed_writers_are_removed_at_the_start(tiny, tmp_path):
    ckpt, tb = tmp_path / "model.ckpt", tmp_path / "tb"
    ckpt.mkdir()
    tb.mkdir()
    pid = dead_pid()
    stale = [ckpt / f".history.json.tmp-{pid}-0123abcd", ckpt / f".ckpt-10.npz.tmp-{pid}-89abcdef",
             tb / f".facenet-kfp-run.json.tmp-{pid}-00000000", tmp_path / f".model.tmp-{pid}-fedcba98"]
    for path in stale[:3]:
        path.write_bytes(b"partial")
    stale[3].mkdir()
    (stale[3] / "model.keras").write_bytes(b"partial")
    kept = [ckpt / f".history.json.tmp-{os.getpid()}-0123abcd",      # a running process's (this one)
            ckpt / ".history.json.tmp-notapid", ckpt / "notes.txt", tmp_path / f".other.tmp-{pid}-0123abcd"]
    for path in kept:
        path.write_bytes(b"keep")
    run_train(tiny, tmp_path / "model", FAST, tensorboard_dir=str(tb))
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"keep" for path in kept)
    assert (tmp_path / "model" / "model.json").is_file()


HOLD_LOCK = """
import sys, time
from facenet_kfp import train as train_mod
with train_mod.training_lock(sys.argv[1]):
    print("LOCKED", flush=True)
    sys.stdin.read()          # until the test closes stdin
"""


def test_a_second_training_on_the_same_checkpoint_folder_is_refused(tiny, tmp_path):
    """Another process holds the checkpoint folder: the second training fails at once, naming its pid and
    host, and exports nothing; once the holder ends (killed or not) the folder is free again."""
    import socket

    ckpt = tmp_path / "model.ckpt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ckpt)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "KERAS_BACKEND": "jax"})
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(InputError, match=rf"^{ckpt}: another training is using this checkpoint folder \(pid "
                                             rf"{holder.pid} on host {re.escape(socket.gethostname())} since "
                                             rf"\d{{4}}-\d\d-\d\d .*wait for it to end"):
            run_train(tiny, tmp_path / "model", FAST)
        assert not (tmp_path / "model").exists()
        assert not list(ckpt.glob("ckpt-*")) and not (ckpt / "provenance.json").exists()
    finally:
        holder.kill()
        holder.wait()
    metrics = run_train(tiny, tmp_path / "model", FAST)      # the killed holder's lock went with it
    assert metrics["steps"] == FAST.max_steps
