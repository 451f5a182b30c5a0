# JAX trainer image of multi-process training: `facenet-kfp train` on Keras's JAX backend with CUDA,
# the image a Kubeflow Trainer TrainJob runs (manifests/trainer/: the jax-distributed runtime sets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in each node's process), also
# `facenet-kfp train --processes N` on one machine. The facenet-kfp package with its [jax-cuda]
# extra: jax[cuda12] (JAX's CUDA plugin and NVIDIA's CUDA wheels: no CUDA in the base), Keras,
# matplotlib; batches come from NumPy (facenet_kfp/numpy_input.py), and there is NO TensorFlow.
# Build from the repository root: images/build.sh jax (or docker build -f images/trainer-jax.Dockerfile .).
#
# The base is the light image's (python:3.11-slim-bookworm; offline, the stand-in of
# images/standin-base.sh); Python lives in a venv at /opt/venv, first on PATH. Versions: those of
# requirements/lock.txt, and for the CUDA wheels the lock does not hold (the development venv has
# jax[cpu]), requirements/jax-cuda.txt (make jax-cuda-pins), both as constraints.
#
# Unlike the other two images, the dependencies are installed in the runtime stage itself, and
# only the project wheel comes from the builder: the CUDA wheels bring the venv to about 5.7 GB,
# and a venv copied from a builder stage would store it twice, and again after each code change.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: the project wheel, built with the pinned build backend.
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Build backend (pinned in images/build-requirements.txt) in a throwaway venv.
COPY images/build-requirements.txt images/
RUN python3 -m venv /opt/build \
    && /opt/build/bin/python -m pip install --no-cache-dir --requirement images/build-requirements.txt

COPY pyproject.toml README.md ./
COPY facenet_kfp/ facenet_kfp/
RUN /opt/build/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /wheels .

# ---- runtime: the base plus /opt/venv (dependencies, then the wheel); no build backend or pip caches.
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="facenet-kfp-trainer-jax" \
      org.opencontainers.image.description="FaceNet on Kubeflow Pipelines: multi-process training on JAX with CUDA (Kubeflow Trainer TrainJob; no TensorFlow)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/facenet-kfp/facenet-kfp" \
      org.opencontainers.image.licenses="Apache-2.0"

# KERAS_BACKEND=jax: the only backend here, and the one multi-process training needs. MPLCONFIGDIR:
# matplotlib (the training curves) needs a writable config folder even when a cluster runs the pod
# under another uid whose home does not exist.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KERAS_BACKEND=jax \
    MPLCONFIGDIR=/tmp/matplotlib

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify the image without a passwd lookup.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh facenet

# The pins and the scripts of the install stay in the image as the record of what it holds.
WORKDIR /opt/facenet-kfp

# The largest CUDA libraries first, in layers of about 2 GB each (cuDNN with cuBLAS, which it needs;
# the solver, sparse and communication libraries): committing a layer holds it two or three times
# on the build machine's disk, and registries pull layers in parallel. They and their dependencies
# are pinned in requirements/jax-cuda.txt alone, which they are copied with before the lock, so
# that a change of the lock (or of pyproject.toml) reuses these 3.8 GB.
COPY requirements/jax-cuda.txt requirements/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/jax-cuda.txt \
        nvidia-cudnn-cu12 nvidia-cublas-cu12
RUN /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/jax-cuda.txt \
        nvidia-cusolver-cu12 nvidia-cusparse-cu12 nvidia-nccl-cu12 nvidia-nvshmem-cu12

# The rest of the dependencies before the wheel, so that a code change reuses this layer. Both pin
# files are constraints: every dependency resolves to its pinned version.
COPY requirements/lock.txt requirements/
COPY pyproject.toml ./
COPY images/check_env.py images/pyproject_deps.py images/
RUN python3 images/pyproject_deps.py pyproject.toml --extra jax-cuda > /tmp/requirements.txt \
    && /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/lock.txt \
        --constraint requirements/jax-cuda.txt --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The wheel with its [jax-cuda] extra, dependencies already satisfied at their pins. setuptools
# (which venv adds on Python 3.11) is no runtime dependency and is removed. check_env.py then proves
# the result: every package in the venv at its pinned version, no TensorFlow installed or
# importable, Keras on the JAX backend, and the modules of multi-process training import (JAX with
# its CUDA plugin; on a machine without a GPU JAX runs on the CPU). The matplotlib cache the check
# leaves at MPLCONFIGDIR belongs to root and is removed, so that uid 1000 can make its own there.
COPY --from=builder /wheels /tmp/wheels
RUN set -- /tmp/wheels/facenet_kfp-*.whl \
    && /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/lock.txt \
        --constraint requirements/jax-cuda.txt "$1[jax-cuda]" \
    && rm -r /tmp/wheels \
    && /opt/venv/bin/python -m pip uninstall --yes setuptools \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python images/check_env.py --lock requirements/lock.txt --lock requirements/jax-cuda.txt \
        --absent tensorflow --no-import tensorflow --keras-backend jax \
        --import facenet_kfp.cli --import facenet_kfp.train --import facenet_kfp.multiprocess \
        --import facenet_kfp.numpy_input --import jax --import jax_plugins.xla_cuda12 \
        --import keras --import matplotlib.pyplot \
    && rm -rf /tmp/matplotlib

USER 1000:1000
WORKDIR /home/facenet

# A TrainJob gives the command (facenet-kfp train ...); by hand the image runs the CLI.
CMD ["facenet-kfp", "--help"]
