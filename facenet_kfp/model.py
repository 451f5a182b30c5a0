"""Embedding networks: OpenFace nn4.small2 and a small demo CNN, ending in per-embedding L2 normalisation.

Both take float images [B, H, W, C] (channels last; scaling the pixels is the
input pipeline's job) and return [B, embedding_dim] float32 embeddings on the
unit sphere: Dense(embedding_dim) with no activation, then Keras's built-in
`UnitNormalization` along the last axis, x / max(‖x‖₂, 1e-12), computed in
float32 under any dtype policy. (The original TF1 implementation this project
started from put a ReLU before the normalisation and normalised the whole batch
as one vector; its embeddings collapsed.)

Written with built-in `keras.layers` only, so the same model runs on the
TensorFlow and JAX backends, and its `.keras` file loads with plain
`keras.saving.load_model` in a Python that never imports facenet_kfp.
`L2Normalize`, the custom layer earlier versions ended in, stays registered
so their model files still load once this module is imported.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import keras
from keras import layers, ops

from facenet_kfp.errors import InputError

log = logging.getLogger(__name__)

# Smallest image side each architecture accepts: nn4.small2 downsamples by 32 and
# small_cnn by 16; below 32 pixels the last feature maps vanish or carry nothing.
MIN_INPUT_SIZE = {"nn4_small2": 32, "small_cnn": 32}

# OpenFace's nn4.small2 (Torch, embSize=128): 3,733,968 parameters. Ours at 96x96x3 with
# 128-D embeddings: 3,729,312 trainable, plus 9,312 batch-norm moving statistics.
NN4_SMALL2_PARAMETERS = 3_733_968
NN4_SMALL2_TRAINABLE = 3_729_312

_BN_EPSILON = 1e-5   # Torch's SpatialBatchNormalization default, as in OpenFace


@keras.saving.register_keras_serializable(package="facenet_kfp")
class L2Normalize(layers.Layer):
    """x / max(‖x‖₂, sqrt(epsilon)) along `axis`, computed and returned in float32.

    The final layer of models saved by earlier versions (new models end in
    `keras.layers.UnitNormalization`, which plain Keras loads); kept so that
    their model.keras files load through `export.load_model_artifact`.

    The layer's dtype policy is float32 so that, under a mixed precision global
    policy, the final embeddings (and the distances built from them) keep full
    precision: a float16 unit vector has only ~3 significant digits per component.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        squared_norm = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squared_norm, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(axis=self.axis, epsilon=self.epsilon)
        return config


def _conv_bn(x, filters: int, kernel: int, name: str, strides: int = 1):
    """Conv2D (same padding, no bias: batch norm's beta replaces it) + BatchNorm + ReLU."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _inception(x, name: str, *, conv1x1: int | None = None, conv3x3: tuple[int, int] | None = None,
               conv5x5: tuple[int, int] | None = None, pool: str = "max", pool_proj: int | None = None,
               strides: int = 1):
    """One GoogLeNet/FaceNet inception block (batch-normalised), concatenating its branches.

    conv3x3 / conv5x5 are (1x1 reduce filters, output filters); `strides` = 2 makes a
    reduction block (3c, 4e): the kxk convolutions and the pooling branch stride by 2
    and there is no 1x1 branch. Pooling is 3x3 with same padding; "avg" stands in for
    OpenFace's L2 pooling. Unlike the keras-openface port, the stride-1 blocks pool
    with stride 1 instead of striding and zero-padding back, so every branch sees the
    whole feature map and any input size works.
    """
    branches = []
    if conv1x1 is not None:
        branches.append(_conv_bn(x, conv1x1, 1, f"{name}_1x1"))
    for kernel, spec in ((3, conv3x3), (5, conv5x5)):
        if spec is not None:
            reduce, out = spec
            y = _conv_bn(x, reduce, 1, f"{name}_{kernel}x{kernel}_reduce")
            branches.append(_conv_bn(y, out, kernel, f"{name}_{kernel}x{kernel}", strides=strides))
    pool_layer = layers.MaxPooling2D if pool == "max" else layers.AveragePooling2D
    y = pool_layer(3, strides=strides, padding="same", name=f"{name}_pool")(x)
    if pool_proj is not None:
        y = _conv_bn(y, pool_proj, 1, f"{name}_pool_proj")
    branches.append(y)
    return layers.Concatenate(axis=-1, name=f"{name}_concat")(branches)


def _nn4_small2(inputs):
    """OpenFace nn4.small2 trunk (FaceNet NN4 without 4b-4d, smaller 5a/5b); LRN replaced by batch norm.

    Spatial sizes for a 96x96 input: 48 (conv1) → 24 (pool1) → 12 (pool2, 3a, 3b)
    → 6 (3c, 4a) → 3 (4e, 5a, 5b) → global average → 736 features.
    """
    x = _conv_bn(inputs, 64, 7, "conv1", strides=2)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = _conv_bn(x, 64, 1, "conv2")
    x = _conv_bn(x, 192, 3, "conv3")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = _inception(x, "inception_3a", conv1x1=64, conv3x3=(96, 128), conv5x5=(16, 32),
                   pool="max", pool_proj=32)                                   # 256 channels
    x = _inception(x, "inception_3b", conv1x1=64, conv3x3=(96, 128), conv5x5=(32, 64),
                   pool="avg", pool_proj=64)                                   # 320
    x = _inception(x, "inception_3c", conv3x3=(128, 256), conv5x5=(32, 64),
                   pool="max", strides=2)                                      # 640
    x = _inception(x, "inception_4a", conv1x1=256, conv3x3=(96, 192), conv5x5=(32, 64),
                   pool="avg", pool_proj=128)                                  # 640
    x = _inception(x, "inception_4e", conv3x3=(160, 256), conv5x5=(64, 128),
                   pool="max", strides=2)                                      # 1024
    x = _inception(x, "inception_5a", conv1x1=256, conv3x3=(96, 384),
                   pool="avg", pool_proj=96)                                   # 736
    x = _inception(x, "inception_5b", conv1x1=256, conv3x3=(96, 384),
                   pool="max", pool_proj=96)                                   # 736
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def _small_cnn(inputs):
    """Four conv blocks of 32-64-128-128 filters (3x3 conv + BN + ReLU), global average pool.

    The first convolution strides by 2 and blocks 1-3 end in a 2x2 max pool, so a
    64x64 input is 4x4x128 before the pooling: about 13M multiply-adds per image
    and 0.26M parameters, fast enough to train on a laptop CPU.
    """
    x = _conv_bn(inputs, 32, 3, "block1", strides=2)
    x = layers.MaxPooling2D(2, name="block1_pool")(x)
    x = _conv_bn(x, 64, 3, "block2")
    x = layers.MaxPooling2D(2, name="block2_pool")(x)
    x = _conv_bn(x, 128, 3, "block3")
    x = layers.MaxPooling2D(2, name="block3_pool")(x)
    x = _conv_bn(x, 128, 3, "block4")
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


_TRUNKS: dict[str, Callable] = {"nn4_small2": _nn4_small2, "small_cnn": _small_cnn}
ARCHITECTURES = tuple(_TRUNKS)


def _check_arguments(input_shape: Sequence[int], embedding_dim: int, architecture: str) -> tuple[int, int, int]:
    if architecture not in _TRUNKS:
        raise InputError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise InputError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    if (shape is None or len(shape) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)):
        raise InputError(f"input_shape must be (height, width, channels) positive integers, got {input_shape!r}")
    smallest = MIN_INPUT_SIZE[architecture]
    if min(shape[:2]) < smallest:
        raise InputError(f"input_shape {shape} is too small for {architecture}: "
                         f"height and width must be at least {smallest}")
    return shape


def build_embedding_model(input_shape=(96, 96, 3), embedding_dim: int = 128,
                          architecture: str = "nn4_small2") -> keras.Model:
    """Embedding network: images [B, H, W, C] → unit-norm embeddings [B, embedding_dim] (float32).

    architecture: "nn4_small2" (OpenFace, ~3.7M parameters, designed for 96x96) or
    "small_cnn" (demo and tests). The model is named "facenet_<architecture>".
    Raises InputError for an unknown architecture, a non-positive embedding_dim or an
    input_shape that is malformed or smaller than MIN_INPUT_SIZE.
    """
    shape = _check_arguments(input_shape, embedding_dim, architecture)
    inputs = keras.Input(shape=shape, name="image")
    features = _TRUNKS[architecture](inputs)
    x = layers.Dense(embedding_dim, name="embedding_dense")(features)
    # float32 even under a mixed precision policy: a float16 unit vector has only ~3
    # significant digits per component, too few for the distances built from it.
    outputs = layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalize")(x)
    model = keras.Model(inputs, outputs, name=f"facenet_{architecture}")
    log.info("built %s: input %s, %d-D embeddings, %d parameters",
             model.name, shape, embedding_dim, model.count_params())
    return model


def batch_norm_layers(model: keras.Model) -> list[layers.BatchNormalization]:
    """The model's BatchNormalization layers, in graph order."""
    return [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]


def calibrate_batch_norm(model: keras.Model, batches) -> int:
    """Set each batch-norm layer's moving mean and variance to the mean of its batch statistics over `batches`.

    batches: image batches [B, H, W, C] as the model takes them. The network
    runs in training mode (every batch-norm layer normalising with its batch's
    statistics, as in training) and for each layer m = mean_b mean(x_b) and
    v = mean_b var(x_b) over the per-channel statistics of its input x_b in
    batch b (biased variance, as BatchNormalization computes it) become its
    moving mean and variance: the average the moving statistics approach after
    many steps, reached at once (precise batch norm). Training's exponential
    moving average with momentum 0.99 keeps 0.99^n of its starting point
    (mean 0, variance 1) after n steps, 82% after 20 steps and 55% after 60,
    so a short run's inference-mode embeddings would not be the trained ones.
    Returns the number of batches used; 0 (and nothing changed) when the model
    has no batch norm or `batches` is empty. Weights are not touched.
    """
    import numpy as np

    norms = batch_norm_layers(model)
    if not norms:
        return 0
    probe = keras.Model(model.input, [layer.input for layer in norms])
    sums: list[list] | None = None
    count = 0
    for images in batches:
        inputs = probe(images, training=True)
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        stats = []
        for layer, x in zip(norms, inputs):
            x = ops.cast(x, "float32")
            axes = [i for i in range(len(x.shape)) if i != layer.axis % len(x.shape)]
            mean, variance = ops.moments(x, axes)
            stats.append((ops.convert_to_numpy(mean).astype(np.float64),
                          ops.convert_to_numpy(variance).astype(np.float64)))
        sums = stats if sums is None else [(m + a, v + b) for (m, v), (a, b) in zip(sums, stats)]
        count += 1
    if not count:
        return 0
    for layer, (mean, variance) in zip(norms, sums):
        layer.moving_mean.assign((mean / count).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((variance / count).astype(layer.moving_variance.dtype))
    return count
