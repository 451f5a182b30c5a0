"""Margin-softmax objectives (ArcFace, CosFace, normalised softmax) against slow NumPy loops over samples,
forward and gradient, float32 and mixed precision; the class-centre head in training, checkpoints and
exact resume; uniform sampling; the config's rules."""

from __future__ import annotations

import dataclasses
import json
import math

import keras
import numpy as np
import pytest

from facenet_kfp import config as config_mod
from facenet_kfp import margin_losses as ml
from facenet_kfp import numpy_input, objectives
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError

tf = pytest.importorskip("tensorflow")
train_mod = pytest.importorskip("facenet_kfp.train")
from tests.builders import build_train_inputs  # noqa: E402  (after the importorskip guards)

# Tolerances, with the largest differences seen on 2 CPU cores (TensorFlow backend) in brackets; each
# leaves a factor of about 10. Logits near theta = 0 are the hardest: float32's sqrt(1 - cos^2) there.
LOGIT_ATOL = 1e-4         # per unit of scale, logits vs the float64 loop [1.3e-5]
LOSS_RTOL = 4e-6          # loss vs the float64 loop [3.7e-7]
GRAD_ATOL = 1e-4          # per unit of scale, gradients vs float64 finite differences [8.5e-6]
MIXED_LOSS_RTOL = 1e-6    # float16 / bfloat16 embeddings vs the loop on the same rounded inputs [7.6e-8]


# ----------------------------------------------------------------------------- slow references (float64 loops)

def ref_phi(kind, theta, margin):
    """The true class's margin cosine of one sample, insightface's rule near pi."""
    if kind == "softmax":
        return math.cos(theta)
    if kind == "cosface":
        return math.cos(theta) - margin
    if theta + margin <= math.pi:                 # cos(theta) > cos(pi - m) up to the boundary itself
        return math.cos(theta + margin)
    return math.cos(theta) - margin * math.sin(margin)


def ref_logits_and_loss(kind, embeddings, centres, labels, scale, margin):
    """(logits [B, C], mean cross-entropy) one sample at a time, in float64."""
    x = np.asarray(embeddings, np.float64)
    w = np.asarray(centres, np.float64)
    logits = np.zeros((len(x), len(w)))
    losses = []
    for i in range(len(x)):
        xi = x[i] / np.linalg.norm(x[i])
        for c in range(len(w)):
            cos = float(np.clip(xi @ (w[c] / np.linalg.norm(w[c])), -1.0, 1.0))
            logits[i, c] = scale * (ref_phi(kind, math.acos(cos), margin) if c == labels[i] else cos)
        top = logits[i].max()
        losses.append(top + math.log(np.exp(logits[i] - top).sum()) - logits[i, labels[i]])
    return logits, float(np.mean(losses))


def ref_batch_centre_loss(kind, embeddings, labels, scale, margin):
    """The validation loss: each identity's centre the mean of its unit embeddings in the batch, the sample
    itself left out of its own; rows of identities with one image skipped."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids = sorted(set(labels.tolist()))
    losses = []
    for i in range(len(x)):
        if np.sum(labels == labels[i]) < 2:
            continue
        logits = []
        for c in ids:
            members = [j for j in range(len(x)) if labels[j] == c and j != i]
            centre = x[members].sum(axis=0)
            cos = float(np.clip(x[i] @ centre / np.linalg.norm(centre), -1, 1))
            logits.append(scale * (ref_phi(kind, math.acos(cos), margin) if c == labels[i] else cos))
        logits = np.array(logits)
        true = logits[ids.index(labels[i])]
        losses.append(logits.max() + math.log(np.exp(logits - logits.max()).sum()) - true)
    return float(np.mean(losses))


def ref_gradients(kind, embeddings, centres, labels, scale, margin, h=1e-6):
    """Central finite differences of the float64 loop's loss w.r.t. every embedding and centre entry."""
    def loss(x, w):
        return ref_logits_and_loss(kind, x, w, labels, scale, margin)[1]

    grads = []
    for which in (0, 1):
        base = [np.array(embeddings, np.float64), np.array(centres, np.float64)]
        grad = np.zeros_like(base[which])
        for index in np.ndindex(base[which].shape):
            up = [b.copy() for b in base]
            down = [b.copy() for b in base]
            up[which][index] += h
            down[which][index] -= h
            grad[index] = (loss(*up) - loss(*down)) / (2 * h)
        grads.append(grad)
    return grads


# ----------------------------------------------------------------------------- cases

def rotate_towards(target, angle, rng):
    """A unit vector at `angle` radians from unit `target`, in a random direction."""
    other = rng.normal(size=target.shape)
    other -= (other @ target) * target
    other /= np.linalg.norm(other)
    return math.cos(angle) * target + math.sin(angle) * other


def case(seed, kind, batch=10, classes=6, dim=8, angles=None):
    """Random embeddings (not unit length), centres, labels, scale and margin; `angles` sets the angle of
    the first rows to their own centre (theta near 0 and near pi)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=batch)
    embeddings = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 2.0, size=(batch, 1))
    margin = {"arcface": rng.uniform(0.2, 0.7), "cosface": rng.uniform(0.1, 0.5), "softmax": 0.0}[kind]
    scale = float(rng.choice([16.0, 30.0, 64.0]))
    if callable(angles):            # angles relative to the margin
        angles = angles(margin)
    for i, angle in enumerate(angles or ()):
        own = centres[labels[i]] / np.linalg.norm(centres[labels[i]])
        embeddings[i] = rotate_towards(own, angle, rng) * rng.uniform(0.5, 2.0)
    return (embeddings.astype(np.float32), centres.astype(np.float32), labels.astype(np.int32), scale,
            float(margin))


def head_with(centres):
    head = ml.ClassCentres(len(centres))
    head.build((None, centres.shape[1]))
    head.centres.assign(centres)
    return head


def keras_loss_and_gradients(kind, embeddings, centres, labels, scale, margin):
    """(cosines, logits, statistics, d loss / d embeddings, d loss / d centres) through the head, in TensorFlow."""
    head = head_with(centres)
    x = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        cosines = head(x)
        out = ml.margin_softmax_loss(cosines, labels, kind, scale, margin)
    grad_x, grad_w = tape.gradient(out["loss"], [x, head.centres])
    logits = ml.margin_logits(cosines, labels, kind, scale, margin)
    return cosines.numpy(), logits.numpy(), {k: float(v) for k, v in out.items()}, grad_x.numpy(), grad_w.numpy()


ANGLES = {"random": None, "theta near 0": [1e-2, 3e-3, 2e-2], "theta near pi": [math.pi - 1e-2, math.pi - 0.05, 3.0],
          # Either side of ArcFace's threshold pi - m (insightface's rule), 0.01 and 0.2 away.
    "around pi - m": lambda m: [math.pi - m - 0.01, math.pi - m + 0.01, math.pi - m - 0.2, math.pi - m + 0.2]}


@pytest.mark.parametrize("kind", ml.KINDS)
@pytest.mark.parametrize("angles", list(ANGLES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_and_loss_match_the_loop(kind, angles, seed):
    x, w, labels, scale, margin = case(seed, kind, angles=ANGLES[angles])
    cosines, logits, out, _, _ = keras_loss_and_gradients(kind, x, w, labels, scale, margin)
    want_logits, want_loss = ref_logits_and_loss(kind, x, w, labels, scale, margin)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=LOGIT_ATOL * scale)
    assert out["loss"] == pytest.approx(want_loss, rel=LOSS_RTOL, abs=1e-6)
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    unit_w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit_x.astype(np.float64) @ unit_w.T
    np.testing.assert_allclose(cosines, cos, atol=1e-6)
    true = cos[np.arange(len(x)), labels]
    others = np.where(np.eye(len(w), dtype=bool)[labels], -np.inf, cos)
    assert out["accuracy"] == pytest.approx(np.mean(true > others.max(axis=1)))
    assert out["mean_true_cosine"] == pytest.approx(np.mean(true), abs=1e-6)
    assert out["mean_other_cosine"] == pytest.approx(np.mean(cos[np.isfinite(others)].reshape(len(x), -1)),
                                                     abs=1e-6)


@pytest.mark.parametrize("kind", ml.KINDS)
@pytest.mark.parametrize("angles", list(ANGLES))
def test_gradients_match_finite_differences_of_the_loop(kind, angles):
    x, w, labels, scale, margin = case(7, kind, batch=6, classes=4, dim=5, angles=ANGLES[angles])
    if kind == "arcface":      # keep clear of insightface's jump at theta = pi - m, where no derivative exists
        cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
        theta = np.arccos(np.clip(cos[np.arange(len(x)), labels], -1, 1))
        assert np.all(np.abs(theta - (math.pi - margin)) > 1e-3)
    _, _, _, grad_x, grad_w = keras_loss_and_gradients(kind, x, w, labels, scale, margin)
    want_x, want_w = ref_gradients(kind, x, w, labels, scale, margin)
    np.testing.assert_allclose(grad_x, want_x, rtol=0, atol=GRAD_ATOL * scale)
    np.testing.assert_allclose(grad_w, want_w, rtol=0, atol=GRAD_ATOL * scale)


@pytest.mark.parametrize("kind", ml.KINDS)
def test_theta_exactly_0_and_pi_give_finite_values_and_gradients(kind):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.array([0, 1, 2], np.int32)
    x = np.stack([w[0] * 2.0, -w[1], w[2] * 0.5]).astype(np.float32)      # theta 0, pi, 0
    _, logits, out, grad_x, grad_w = keras_loss_and_gradients(kind, x, w, labels, 64.0, 0.5)
    want_logits, want_loss = ref_logits_and_loss(kind, x, w, labels, 64.0, 0.5)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-3)
    assert out["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert np.all(np.isfinite(grad_x)) and np.all(np.isfinite(grad_w))
    assert np.abs(grad_x).max() < 64 * 4 and np.abs(grad_w).max() < 64 * 4


def test_arcface_follows_insightfaces_rule_past_pi_minus_m():
    m = 0.5
    theta = np.array([0.0, 1.0, math.pi - m - 1e-3, math.pi - m + 1e-3, 3.0, math.pi])
    phi = ml.target_cosine("arcface", keras.ops.convert_to_tensor(np.cos(theta).astype(np.float32)), m)
    want = [math.cos(t + m) if t + m <= math.pi else math.cos(t) - m * math.sin(m) for t in theta]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(phi), want, atol=2e-6)
    # Falling in theta on both sides; the jump at the threshold is cos(m) + m sin(m) - 1, 0.117 for m = 0.5.
    assert np.all(np.diff(want) < 0)
    assert want[2] - want[3] == pytest.approx(math.cos(m) + m * math.sin(m) - 1, abs=2e-3)


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
@pytest.mark.parametrize("kind", ml.KINDS)
def test_mixed_precision_computes_the_head_and_loss_in_float32(policy, dtype, kind):
    x, w, labels, scale, margin = case(4, kind, batch=16, classes=12, dim=16, angles=[1e-2, math.pi - 1e-2])
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        head = head_with(w)
        assert head.centres.dtype == "float32" and head.compute_dtype == "float32"
        low = tf.cast(tf.constant(x), dtype)                 # what a mixed-precision embedding model hands over
        xv = tf.Variable(low)
        with tf.GradientTape() as tape:
            cosines = head(xv)
            out = ml.margin_softmax_loss(cosines, labels, kind, scale, margin)
        grad_x, grad_w = tape.gradient(out["loss"], [xv, head.centres])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert cosines.dtype == tf.float32 and out["loss"].dtype == tf.float32
    rounded = low.numpy().astype(np.float32)
    _, want = ref_logits_and_loss(kind, rounded, w, labels, scale, margin)
    assert float(out["loss"]) == pytest.approx(want, rel=MIXED_LOSS_RTOL, abs=1e-6)
    assert np.all(np.isfinite(grad_x.numpy().astype(np.float32))) and np.all(np.isfinite(grad_w.numpy()))
    _, _, _, want_x, want_w = keras_loss_and_gradients(kind, rounded, w, labels, scale, margin)
    np.testing.assert_allclose(grad_w.numpy(), want_w, atol=1e-4 * scale)
    np.testing.assert_allclose(grad_x.numpy().astype(np.float32), want_x, atol=2e-2 * np.abs(want_x).max())


@pytest.mark.parametrize("kind", ml.KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_validation_loss_uses_the_batchs_own_centres(kind, seed):
    rng = np.random.default_rng(seed)
    labels = np.array([5, 5, 5, 9, 9, 2, 2, 2, 2, 7], np.int32)      # 7: one image, its row does not count
    x = rng.normal(size=(10, 6)).astype(np.float32)
    margin = {"arcface": 0.5, "cosface": 0.35, "softmax": 0.0}[kind]
    out = ml.batch_centre_loss(x, labels, kind, 30.0, margin)
    assert float(out["loss"]) == pytest.approx(ref_batch_centre_loss(kind, x, labels, 30.0, margin), rel=1e-5)
    config = TrainConfig(loss=kind, margin=margin if margin else 0.2, scale=30.0)
    via_table = objectives.get(kind).function(labels, x, config, None)
    assert float(via_table["loss"]) == pytest.approx(float(ml.batch_centre_loss(
        x, labels, kind, 30.0, config.margin)["loss"]), rel=1e-6)


# ----------------------------------------------------------------------------- the table and the config

def test_the_table_entries():
    for name in ml.KINDS:
        objective = objectives.get(name)
        assert not objective.pk_batches and not objective.head_on_validation
        assert objective.statistics == ml.STATISTICS == objectives.MARGIN_STATISTICS
        assert objective.distance(TrainConfig(loss=name)) == "cosine"
        assert objective.loss_bound(TrainConfig(loss=name)) == math.inf
        assert objective.divergence_rise(TrainConfig(loss=name, scale=30.0))[0] == pytest.approx(3.0)
        head = objective.build_head(TrainConfig(loss=name), 7)
        assert isinstance(head, ml.ClassCentres) and head.classes == 7
        with pytest.raises(InputError, match=f"train.loss {name} needs the number of training identities"):
            objective.build_head(TrainConfig(loss=name))


@pytest.mark.parametrize("overrides,message", [
    ({"loss": "arcface", "margin": 1.6}, r"train.margin must be below pi/2 = 1.5708 radians with train.loss "
                                         r"arcface, got 1.6"),
    ({"loss": "cosface", "margin": 1.5}, r"train.margin must be at most 1 with train.loss cosface, got 1.5"),
    ({"loss": "batch_hard", "sampling": "uniform"}, r"train.sampling uniform does not suit train.loss "
                                                    r"batch_hard: .*use train.sampling pk"),
    ({"loss": "arcface", "scale": 0}, r"train.scale must be > 0, got 0"),
    ({"loss": "arcface", "sampling": "random"}, r"train.sampling must be one of pk, uniform; got 'random'"),
])
def test_config_errors_name_the_key_and_value(overrides, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**overrides)


def test_config_accepts_each_objectives_own_margin():
    for loss, margin in (("arcface", 0.5), ("cosface", 0.35), ("softmax", 3.0), ("batch_hard", 0.2)):
        assert TrainConfig(loss=loss, margin=margin).margin == margin
    assert TrainConfig(loss="softmax", margin=3.0, squared=False).loss == "softmax"   # margin not used
    assert TrainConfig(loss="arcface", sampling="uniform").sampling == "uniform"
    loaded = config_mod.load_config(None, {"train": {"loss": "arcface", "scale": 32, "margin": 0.5}})
    assert loaded.train.scale == 32.0


# ----------------------------------------------------------------------------- uniform sampling

def test_uniform_sampler_draws_every_image_once_per_pass_and_resumes_exactly():
    labels = np.repeat(np.arange(7), [1, 2, 3, 4, 5, 6, 2])          # 23 images
    sampler = numpy_input.make_sampler(labels, 2, 4, seed=5, sampling="uniform")
    assert isinstance(sampler, numpy_input.UniformSampler) and sampler.batch_size == 8
    stream = sampler.batches()
    first = np.concatenate([next(stream) for _ in range(23)])        # 184 draws = 8 passes
    for epoch in range(8):
        assert sorted(first[epoch * 23:(epoch + 1) * 23]) == list(range(23))
    for start in (0, 1, 2, 3, 5, 11, 17):
        resumed = sampler.batches(start)
        np.testing.assert_array_equal(np.concatenate([next(resumed) for _ in range(23 - start)]),
                                      first[start * 8:])
    other = np.concatenate([next(numpy_input.UniformSampler(labels, 8, seed=6).batches()) for _ in range(3)])
    assert not np.array_equal(other, first[:24])
    with pytest.raises(InputError, match="train.sampling must be one of pk, uniform; got 'x'"):
        numpy_input.make_sampler(labels, 2, 4, 0, "x")


def test_uniform_batches_are_the_same_from_numpy_and_tensorflow(tmp_path):
    from facenet_kfp.tf_input import make_train_dataset

    d = build_train_inputs(tmp_path)
    with numpy_input.open_split(d["dataset"], d["completion"], d["labels"], d["splits"], "train") as split:
        labels = train_mod.train_classes(split.labels)
        assert sorted(set(labels.tolist())) == list(range(train_mod.train_identities(d["splits"])))
        with numpy_input.TrainBatches(split, labels, 2, 4, 32, 0.8, True, 3, start_batch=2, workers=0,
                                      sampling="uniform") as batches:
            mine = [next(batches) for _ in range(3)]
        theirs = [(x.numpy(), y.numpy()) for x, y in make_train_dataset(
            split, labels, 2, 4, 32, 0.8, True, 3, start_batch=2, sampling="uniform").take(3)]
    stream = numpy_input.UniformSampler(labels, 8, 3).batches(2)
    for (x, y), (tx, ty) in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(y, labels[next(stream)])
        np.testing.assert_array_equal(ty, y)
        assert x.shape == tx.shape == (8, 32, 32, 3)


# ----------------------------------------------------------------------------- training, checkpoints, resume

MARGIN_RUN = TrainConfig(architecture="small_cnn", image_size=32, crop_fraction=0.8, embedding_dim=16, p=4, k=4,
                         loss="arcface", margin=0.5, scale=30.0, sampling="uniform", learning_rate=2e-3,
                         lr_schedule="cosine", warmup_steps=0, max_steps=20, augment=True, validate_every=10,
                         validation_batches=2, checkpoint_every=10, log_every=5, precision="float32", seed=0)


def run_train(d, model_dir, config, **kwargs):
    return train_mod.train(d["dataset"], d["completion"], d["labels"], d["splits"], model_dir, config, **kwargs)


@pytest.fixture(scope="module")
def margin_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("margin-run")
    d = build_train_inputs(root / "data")
    metrics = run_train(d, root / "model", MARGIN_RUN)
    return {"d": d, "root": root, "metrics": metrics, "model": root / "model", "ckpt": root / "model.ckpt"}


@pytest.mark.slow
def test_training_exports_the_embedding_model_without_its_head(margin_run):
    from facenet_kfp.export import load_model_artifact

    metrics = margin_run["metrics"]
    assert metrics["steps"] == 20 and math.isfinite(metrics["train_loss"])
    assert {"train_accuracy", "train_mean_true_cosine", "val_loss", "val_accuracy"} <= set(metrics)
    assert metrics["val_loss"] < metrics["first_val_loss"]
    model, info = load_model_artifact(margin_run["model"])
    assert info["loss"] == "arcface" and info["distance"]["name"] == "cosine"
    assert info["train_config"]["scale"] == 30.0 and info["train_config"]["sampling"] == "uniform"
    names = [w.path for w in model.weights]
    assert not any("class_centres" in name for name in names)
    assert model.output_shape[-1] == 16
    identities = train_mod.train_identities(margin_run["d"]["splits"])
    with np.load(margin_run["ckpt"] / "ckpt-20.npz") as saved:
        recorded = json.loads(str(saved["names"]))
        assert [n.rsplit("/", 1)[-1] for n in recorded["head"]] == ["centres"]
        assert saved["head/0000"].shape == (identities, 16)
        # Adam's two moments of the centres are in the optimizer's state.
        shapes = [saved[f"optimizer/{i:04d}"].shape for i in range(len(recorded["optimizer"]))]
        assert shapes.count((identities, 16)) == 2


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_exact(margin_run, tmp_path):
    """Resumed at step 10 of 20, the run ends with the same weights, centres and optimizer state as the
    uninterrupted one."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(margin_run["ckpt"], ckpt, ignore=shutil.ignore_patterns("ckpt-20.npz", ".train.lock"))
    metrics = run_train(margin_run["d"], tmp_path / "model", MARGIN_RUN, checkpoint_dir=str(ckpt),
                        run_key=str(margin_run["model"]))
    assert metrics["start_step"] == 10 and metrics["steps"] == 20
    with np.load(margin_run["ckpt"] / "ckpt-20.npz") as want, np.load(ckpt / "ckpt-20.npz") as got:
        assert sorted(want.files) == sorted(got.files)
        for key in want.files:
            if key != "names":
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert metrics["train_loss"] == pytest.approx(margin_run["metrics"]["train_loss"], rel=1e-5)


def test_the_head_trains_and_a_checkpoint_restores_it(tmp_path):
    config = dataclasses.replace(MARGIN_RUN, sampling="pk")
    trainer = train_mod.build_trainer(config, "float32", train_mod.Placement(), classes=4)
    assert trainer.head.name == "class_centres" and tuple(trainer.head.centres.shape) == (4, 16)
    assert not any(v is trainer.head.centres for v in trainer.embedding.weights)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)

    def fit(model, steps):
        batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
        return model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False).history

    before = trainer.head.centres.numpy().copy()
    logs = fit(trainer, 3)
    assert set(logs) == set(objectives.get("arcface").reported())
    assert np.abs(trainer.head.centres.numpy() - before).max() > 1e-4
    path = train_mod.save_checkpoint(str(tmp_path / "ckpt"), trainer, 3)
    fresh = train_mod.build_trainer(dataclasses.replace(config, seed=1), "float32", train_mod.Placement(),
                                    classes=4)
    assert train_mod.load_checkpoint(path, fresh) == 3
    for want, got in zip((*trainer.weights, *trainer.optimizer.variables),
                         (*fresh.weights, *fresh.optimizer.variables), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    fit(trainer, 2)
    fit(fresh, 2)
    np.testing.assert_allclose(fresh.head.centres.numpy(), trainer.head.centres.numpy(), rtol=1e-6, atol=1e-7)
    # A trainer with another number of identities cannot take the checkpoint.
    other = train_mod.build_trainer(config, "float32", train_mod.Placement(), classes=5)
    with pytest.raises(ValueError, match=r"head/0000 has shape \(4, 16\)"):
        train_mod.load_checkpoint(path, other)


@pytest.mark.slow
def test_jax_training_resumes_exactly_without_tensorflow(tmp_path):
    """The JAX path (TensorFlow unimportable in that process): 20 steps straight, and 10 + 10 from the step-10
    checkpoint, end with the same embedding weights, centres and optimizer state."""
    from facenet_kfp.config import to_dict
    from tests.test_train_jax import run_on_backend

    d = build_train_inputs(tmp_path / "data")
    args = {"inputs": {k: str(d[k]) for k in ("dataset", "completion", "labels", "splits")},
            "config": to_dict(dataclasses.replace(MARGIN_RUN, loss="cosface", margin=0.35)),
            "run_key": "margin-jax", "straight": str(tmp_path / "straight"), "resumed": str(tmp_path / "resumed")}
    run_on_backend("jax", """
        import shutil
        run(ARGS["straight"], checkpoint_dir=ARGS["straight"] + ".ckpt")
        shutil.copytree(ARGS["straight"] + ".ckpt", ARGS["resumed"] + ".ckpt",
                        ignore=shutil.ignore_patterns("ckpt-20.npz", ".train.lock"))
        metrics = run(ARGS["resumed"], checkpoint_dir=ARGS["resumed"] + ".ckpt")
        assert metrics["start_step"] == 10, metrics
        assert "tensorflow" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
    """, args)
    with np.load(tmp_path / "straight.ckpt" / "ckpt-20.npz") as want, \
            np.load(tmp_path / "resumed.ckpt" / "ckpt-20.npz") as got:
        names = json.loads(str(want["names"]))
        assert len(names["head"]) == 1 and want["head/0000"].shape == (train_mod.train_identities(d["splits"]), 16)
        for key in want.files:
            if key != "names":
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_validation_compares_the_batch_with_itself_not_with_the_head(tmp_path):
    """Validation identities are not the head's rows: the validation loss uses the batch's own centres."""
    from facenet_kfp import tensorboard_log

    trainer = train_mod.build_trainer(MARGIN_RUN, "float32", train_mod.Placement(), classes=3)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = np.repeat([11, 12, 13, 14], 4).astype(np.int32)        # labels.json ids of 4 other people
    state = train_mod.RunState(MARGIN_RUN, 0, str(tmp_path / "ckpt"), tensorboard_log.TensorBoardLog([], "m"),
                               {"train": [], "val": []}, [(images, labels)], [images])
    record = train_mod.validate(trainer, state)
    embeddings = train_mod.evaluation_model(trainer, state).predict(images, verbose=0)
    want = ml.batch_centre_loss(embeddings, labels, "arcface", MARGIN_RUN.scale, MARGIN_RUN.margin)
    assert set(record) == {"step", *ml.STATISTICS}
    for key in ml.STATISTICS:
        assert record[key] == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key


def test_monitor_allows_a_tenth_of_the_scale_before_calling_a_rise_divergence():
    from facenet_kfp.errors import FacenetError

    config = dataclasses.replace(MARGIN_RUN, learning_rate=1e-3, lr_schedule="constant")   # rise allowed: 3.0
    values = {"mean_pairwise_l2": 1.0, "max_pairwise_l2": 1.5}
    monitor = train_mod.TrainingMonitor(config)
    for step in range(1, 151):             # 2.9 above the first window's mean: not divergence
        monitor.update(step, {"loss": 5.0 if step <= 50 else 7.9, **values})
    monitor = train_mod.TrainingMonitor(config)
    # At 9 from step 51 on, the 50-step mean passes 5 + 3 at step 88: (12 * 5 + 38 * 9) / 50 = 8.04.
    with pytest.raises(FacenetError, match=r"training diverged at step 88: the mean loss of steps 39-88 is "
                                           r"8.04, up from 5 \(steps 1-50\), more than 3 \(a tenth of "
                                           r"train.scale=30\) higher"):
        for step in range(1, 101):
            monitor.update(step, {"loss": 5.0 if step <= 50 else 9.0, **values})
