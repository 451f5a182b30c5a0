# Trainer image of the align, train, evaluate and deploy steps and of the model server (facenet-kfp serve,
# which KServe's InferenceService runs): TensorFlow with GPU support from the base image,
# plus the facenet-kfp package with its [train] extra at the versions of requirements/lock.txt.
# Build from the repository root: images/build.sh (or docker build -f images/trainer.Dockerfile .).
#
# The base tag matches the lock (tensorflow==2.21.0). The package goes into a venv at /opt/venv
# created with --system-site-packages: the base's TensorFlow (and its CUDA libraries) satisfies the
# tensorflow pin, so pip keeps it instead of downloading another copy; dependencies whose base
# version differs from the lock are installed into the venv at the locked version and shadow the
# base's. The venv is made --without-pip and driven by the base's own pip, so the base needs no
# python3-venv/ensurepip.
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu

# ---- builder: build the project wheel, install it with the locked dependencies into /opt/venv.
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Build backend (pinned in images/build-requirements.txt) in a throwaway venv.
COPY images/build-requirements.txt images/check_env.py images/pyproject_deps.py images/
RUN python3 -m venv --without-pip --system-site-packages /opt/build \
    && /opt/build/bin/python -m pip install --no-cache-dir --requirement images/build-requirements.txt

# Dependencies before the source, so that a code change reuses this layer. The lock is the
# constraints file; the base's tensorflow satisfies its pin and stays where it is.
COPY requirements/lock.txt requirements/lock.txt
COPY pyproject.toml ./
RUN python3 images/pyproject_deps.py pyproject.toml --extra train > /tmp/requirements.txt \
    && python3 -m venv --without-pip --system-site-packages /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/lock.txt \
        --requirement /tmp/requirements.txt

COPY README.md ./
COPY facenet_kfp/ facenet_kfp/
RUN /opt/build/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /wheels .

# The wheel with its [train] extra, dependencies already satisfied at their pins. check_env.py
# then proves the result: every package pip put in the venv at its locked version, TensorFlow
# taken from the base (not reinstalled) at the locked version, and the modules of the align, train,
# evaluate and deploy steps and of the model server import (mtcnn with its weights, which ship inside
# the wheel; kserve; onnxruntime for model.onnx; the Trainer SDK that launches a TrainJob).
RUN set -- /wheels/facenet_kfp-*.whl \
    && /opt/venv/bin/python -m pip install --no-cache-dir --constraint requirements/lock.txt \
        "$1[train]" \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python images/check_env.py --lock requirements/lock.txt \
        --from-base tensorflow \
        --import facenet_kfp.cli --import kfp.dsl.executor_main --import kfp.kubernetes \
        --import tensorflow --import keras --import matplotlib.pyplot \
        --import facenet_kfp.train --import facenet_kfp.evaluate --import facenet_kfp.align --import mtcnn \
        --import facenet_kfp.serve_protocol --import facenet_kfp.deploy --import kserve --import onnxruntime \
        --import tf2onnx --import facenet_kfp.trainjob --import kubeflow.trainer

# ---- runtime: the base plus /opt/venv; no wheels, build backend or pip caches.
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="facenet-kfp-trainer" \
      org.opencontainers.image.description="FaceNet on Kubeflow Pipelines: align, train, evaluate and deploy steps and the model server (TensorFlow, GPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/facenet-kfp/facenet-kfp" \
      org.opencontainers.image.licenses="Apache-2.0"

# MPLCONFIGDIR: matplotlib needs a writable config folder even when a cluster runs the pod under
# another uid whose home does not exist.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify the image without a passwd lookup.
# Ubuntu 24.04 based images ship a user 'ubuntu' with uid 1000: it is removed so that the uid is
# facenet's (the trainer's files must not belong to an unrelated account).
RUN existing="$(getent passwd 1000 || true)" \
    && existing="${existing%%:*}" \
    && if [ -n "$existing" ]; then userdel --remove "$existing"; fi \
    && useradd --uid 1000 --user-group --create-home --shell /bin/sh facenet

COPY --from=builder /opt/venv /opt/venv

USER 1000:1000
WORKDIR /home/facenet

# facenet-kfp serve listens on 8080, KServe's container port.
EXPOSE 8080

# KFP replaces the command (python3 -m kfp.dsl.executor_main ...); by hand the image runs the CLI.
CMD ["facenet-kfp", "--help"]
