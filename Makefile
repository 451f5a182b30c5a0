# facenet-kfp: build, test and run the FaceNet Kubeflow pipeline.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
LOCK          := requirements/lock.txt
STAMP         := $(VENV)/.installed
# The oldest Python the lock's pins install on (pyproject.toml's requires-python says the same).
REQUIRED_PYTHON := 3.11
# The interpreter .venv is made of, and its version when it is older than REQUIRED_PYTHON (or
# "missing or cannot run"); evaluated only when the venv is (re)built.
VENV_PYTHON    = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
OLD_PYTHON     = $(shell $(VENV_PYTHON) -c 'import sys; print("" if sys.version_info[:2] >= \
                   tuple(map(int, "$(REQUIRED_PYTHON)".split("."))) else "Python " + sys.version.split()[0])' \
                   2>/dev/null || echo "missing or cannot run")

# Container images: `make compile` writes exactly these references into the pipeline YAML.
IMAGE_REGISTRY ?= ghcr.io/facenet-kfp
IMAGE_TAG      ?= 0.1.0
LIGHT_IMAGE    := $(IMAGE_REGISTRY)/facenet-kfp:$(IMAGE_TAG)
TRAINER_IMAGE  := $(IMAGE_REGISTRY)/facenet-kfp-trainer:$(IMAGE_TAG)
# The JAX (CUDA) trainer image of multi-process training (a Kubeflow Trainer TrainJob runs it).
TRAINER_JAX_IMAGE := $(IMAGE_REGISTRY)/facenet-kfp-trainer-jax:$(IMAGE_TAG)
# The default registry's images are references a cluster may not find: `make compile` warns and
# `make submit` refuses them, unless IMAGES_EXIST=1 or IMAGE_REGISTRY is given explicitly.
IMAGES_EXIST   ?=
IMAGES_CONFIRMED = $(if $(or $(IMAGES_EXIST),$(filter command line environment,$(origin IMAGE_REGISTRY))),--images-exist)

# `make run` settings. RUNNER=docker runs each step in its image (see images/README.md);
# its runs get their own pipeline root, because kfp's cache key does not include the runner: in
# local_outputs a docker run would be served entirely from the subprocess runs' cache.
RUNNER        ?= subprocess
PIPELINE_ROOT ?= $(if $(filter docker,$(RUNNER)),local_outputs/docker,local_outputs)
CONFIG        ?= configs/demo.yaml
COMPILE_CONFIG ?= configs/lfw.yaml
DEMO_DIR      ?= data/demo
SOURCE        ?=
SHA256        ?=
PAIRS         ?=
PAIRS_SHA256  ?=
EVAL_SOURCE   ?=
EVAL_SHA256   ?=
# `make bench-scale`: the fraction of CASIA-WebFace's 10,575 identities to generate.
FRACTION      ?= 1
WORK          ?=
PYTEST_ARGS   ?=

# `make submit` settings (KFP_TOKEN is read from the environment, so the echoed command does not show it).
HOST          ?=
EXPERIMENT    ?=
RUN_NAME      ?=
NAMESPACE     ?=
PARAMS        ?=
NO_CACHE      ?=
# `make test-containers` settings: stand-in bases for machines that reach package mirrors but no
# container registry (images/standin-base.sh); set LIGHT_BASE_IMAGE and TRAINER_BASE_IMAGE to
# build on other bases instead (the JAX trainer image is built on the light base).
STANDIN_LIGHT_BASE   := localhost/facenet-kfp-base:python3.11-bookworm
STANDIN_TRAINER_BASE := localhost/facenet-kfp-trainer-base:tf2.21-cpu
CONTAINER_PACKAGES   := buildah podman runc debootstrap
# With RUNNER=docker, `make run` goes through images/podman.sh exec: DOCKER_HOST or a Docker daemon
# when there is one, else podman's Docker-compatible service, started for the run and stopped after it.
RUN_WITH      = $(if $(filter docker,$(RUNNER)),images/podman.sh exec)
# What `make run` and `make rerun` both pass.
RUN_ARGS      = --runner $(RUNNER) --light-image $(LIGHT_IMAGE) --trainer-image $(TRAINER_IMAGE) \
                $(foreach s,$(SET),--set '$(s)') $(if $(NO_CACHE),--no-cache) $(if $(VERBOSE),--verbose)
# `make rerun` settings.
STEP          ?= train
FROM          ?= $(PIPELINE_ROOT)
SET           ?=
EVALUATE      ?=
# VERBOSE=1: `make run` / `make rerun` print every task's whole output (the task logs in
# $(PIPELINE_ROOT)/logs hold it either way).
VERBOSE       ?=
# The arguments of `make run` and `make rerun` (in variables, so that make echoes each command as one line).
WHOLE_RUN_ARGS = --config $(CONFIG) --pipeline-root $(PIPELINE_ROOT) --demo-dir $(DEMO_DIR) $(RUN_ARGS) \
                 $(if $(SOURCE),--source '$(SOURCE)') $(if $(SHA256),--sha256 '$(SHA256)') \
                 $(if $(PAIRS),--pairs '$(PAIRS)') $(if $(PAIRS_SHA256),--pairs-sha256 '$(PAIRS_SHA256)') \
                 $(if $(EVAL_SOURCE),--eval-source '$(EVAL_SOURCE)') $(if $(EVAL_SHA256),--eval-sha256 '$(EVAL_SHA256)')
RERUN_ARGS     = --rerun $(STEP) $(foreach f,$(FROM),--from '$(f)') --config $(CONFIG) \
                 --pipeline-root $(PIPELINE_ROOT) $(RUN_ARGS) $(if $(EVALUATE),--with-evaluate)

.PHONY: help install test run compile lock clean golden submit rerun images push lint standin-bases bench-preprocess bench-scale bench-train bench-quality bench-recipe bench-serve gpu-wheels jax-cuda-pins bench-gpu-dry-run container-tools test-containers

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	$(if $(OLD_PYTHON),$(error facenet-kfp needs Python $(REQUIRED_PYTHON) or newer, but $(VENV_PYTHON) is $(OLD_PYTHON); \
	  run make install PYTHON=python$(REQUIRED_PYTHON) (or remove an old $(VENV)/)))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(LOCK) -e '.[train,dev]'
	touch $@

install: $(STAMP) ## create .venv with the pinned dependencies (Python 3.11+, PYTHON=...; quick when done)

test: install ## run the whole test suite
	$(VENV)/bin/pytest -n 2 $(PYTEST_ARGS)

run: install ## run the pipeline locally (SOURCE, else CONFIG's source_uri, else demo data; SHA256, EVAL_SOURCE, EVAL_SHA256, PAIRS, PAIRS_SHA256, SET, PIPELINE_ROOT, RUNNER=docker, NO_CACHE=1, VERBOSE=1)
	$(if $(VERBOSE),,@)$(RUN_WITH) $(PY) -m pipelines.run_local $(WHOLE_RUN_ARGS)

compile: install ## write build/facenet_pipeline.yaml (defaults from COMPILE_CONFIG and SET, images from IMAGE_REGISTRY/IMAGE_TAG)
	$(PY) -m pipelines.compile --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),$(COMPILE_CONFIG)) \
	  --out build/facenet_pipeline.yaml --light-image $(LIGHT_IMAGE) --trainer-image $(TRAINER_IMAGE) \
	  --trainer-jax-image $(TRAINER_JAX_IMAGE) $(foreach s,$(SET),--set '$(s)') $(IMAGES_CONFIRMED)

submit: install ## compile and start a run on Kubeflow Pipelines (IMAGE_REGISTRY/IMAGE_TAG or IMAGES_EXIST=1, HOST, EXPERIMENT, RUN_NAME, PARAMS, NAMESPACE, KFP_TOKEN, NO_CACHE=1)
	$(PY) -m pipelines.submit $(if $(HOST),--host '$(HOST)') \
	  --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),$(COMPILE_CONFIG)) \
	  --package build/facenet_pipeline.yaml --light-image $(LIGHT_IMAGE) --trainer-image $(TRAINER_IMAGE) \
	  --trainer-jax-image $(TRAINER_JAX_IMAGE) $(if $(EXPERIMENT),--experiment '$(EXPERIMENT)') $(if $(RUN_NAME),--run-name '$(RUN_NAME)') \
	  $(if $(NAMESPACE),--namespace '$(NAMESPACE)') $(if $(KFP_TOKEN),--existing-token "$$KFP_TOKEN") \
	  $(foreach p,$(PARAMS),--param '$(p)') $(if $(NO_CACHE),--no-cache) $(IMAGES_CONFIRMED)

rerun: install ## rerun one step locally on earlier outputs (STEP=train|evaluate|complete|splits|labels|align, FROM, SET, EVALUATE=1, RUNNER, NO_CACHE=1, VERBOSE=1)
	$(if $(VERBOSE),,@)$(RUN_WITH) $(PY) -m pipelines.run_local $(RERUN_ARGS)

bench-preprocess: install ## time the five data steps on an LFW-scale demo archive
	$(PY) -m benchmarks.preprocess

bench-scale: install ## the data steps and the input pipeline at CASIA-WebFace scale: peak RSS, throughput ratios, artifact files (FRACTION=1, WORK; ~16 min to generate the archive once, then ~8 min on 2 cores)
	$(PY) -m benchmarks.scale --fraction $(FRACTION) $(if $(WORK),--work '$(WORK)')

bench-train: install ## training throughput, mining share and input pipeline headroom on this machine
	$(PY) -m benchmarks.train

bench-recipe: install ## triplet recipe vs ArcFace, CosFace (and configs/seed.yaml's) at one budget of training images, on the LFW-scale demo archive and on a CASIA-layout archive evaluated on that LFW archive's pairs.txt (about 70 min on 2 cores; IDENTITIES=60 BUDGET=512: a check in ~15 min)
	$(PY) -m benchmarks.recipe $(if $(IDENTITIES),--identities $(IDENTITIES)) $(if $(BUDGET),--budget-images $(BUDGET))

bench-quality: install ## seed recipe vs recommended recipe on the demo data, side by side
	$(PY) -m benchmarks.quality --pipeline

bench-serve: install ## facenet-kfp serve over HTTP: embed requests/s and p50/p99 latency at concurrency 1 and 8, verify at 1 (PIPELINE_ROOT's model, else an untrained stand-in; about 2 min)
	$(PY) -m benchmarks.serve --run $(PIPELINE_ROOT)

# `make gpu-wheels`: Keras and what it and the trainer need beyond JAX, Pillow, NumPy, PyYAML, h5py,
# ml-dtypes, absl-py and rich, as wheels for benchmarks/gpu.sh on an offline GPU machine (Python 3.12),
# at the lock's versions.
GPU_WHEEL_DIR     := .whl
GPU_PYTHON        := 3.12
GPU_PLATFORMS     := manylinux2014_x86_64 manylinux_2_28_x86_64
GPU_WHEELS        := keras namex optree typing_extensions packaging matplotlib contourpy cycler fonttools \
                     kiwisolver pyparsing python-dateutil six tzdata

gpu-wheels: install ## download the wheels benchmarks/gpu.sh installs offline into .whl/ (Keras, matplotlib and their dependencies)
	@pins=""; for name in $(GPU_WHEELS); do \
	  pin=$$(grep -i "^$$name==" $(LOCK)) || { echo "gpu-wheels: $$name is not pinned in $(LOCK); add it (make lock) or drop it from GPU_WHEELS" >&2; exit 1; }; \
	  pins="$$pins $$pin"; done; \
	rm -rf $(GPU_WHEEL_DIR).new && mkdir $(GPU_WHEEL_DIR).new && \
	$(PIP) download --quiet --only-binary=:all: --no-deps --python-version $(GPU_PYTHON) \
	  $(foreach p,$(GPU_PLATFORMS),--platform $(p)) --dest $(GPU_WHEEL_DIR).new $$pins && \
	rm -rf $(GPU_WHEEL_DIR) && mv $(GPU_WHEEL_DIR).new $(GPU_WHEEL_DIR) && \
	ls $(GPU_WHEEL_DIR) && du -sh $(GPU_WHEEL_DIR)

bench-gpu-dry-run: install ## benchmarks/gpu.py on a tiny budget on this machine, TensorFlow unused (about a minute)
	work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && KERAS_BACKEND=jax $(PY) -m benchmarks.gpu --dry-run --work "$$work/work"

images: ## build the three container images: light, trainer, JAX trainer (docker if a daemon answers, else buildah); LIGHT_BASE_IMAGE / TRAINER_BASE_IMAGE / TRAINER_JAX_BASE_IMAGE override the bases
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) images/build.sh

push: ## push the three images to IMAGE_REGISTRY (build first; docker/buildah login first)
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) images/push.sh

jax-cuda-pins: install ## re-pin requirements/jax-cuda.txt: the JAX trainer image's CUDA wheels beyond the lock (asks the package index)
	$(PY) images/jax_cuda_pins.py --lock $(LOCK) --out requirements/jax-cuda.txt

lint: install ## hadolint the three Dockerfiles (any finding fails; also part of make test)
	images/lint.sh

container-tools: ## install buildah, podman, runc, debootstrap with apt-get when missing (root; skipped when a Docker daemon answers)
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then exit 0; fi; \
	missing=""; for tool in $(CONTAINER_PACKAGES); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq $(CONTAINER_PACKAGES); fi

test-containers: install container-tools ## build the three images, run the pipeline in them (podman's API unless DOCKER_HOST / Docker), compare with the venv run; a 2-process JAX training in the JAX image
	$(if $(LIGHT_BASE_IMAGE)$(TRAINER_BASE_IMAGE),,images/standin-base.sh)
	LIGHT_BASE_IMAGE=$(or $(LIGHT_BASE_IMAGE),$(STANDIN_LIGHT_BASE)) \
	  TRAINER_BASE_IMAGE=$(or $(TRAINER_BASE_IMAGE),$(STANDIN_TRAINER_BASE)) \
	  IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) images/build.sh
	FACENET_LIGHT_IMAGE=$(LIGHT_IMAGE) FACENET_TRAINER_IMAGE=$(TRAINER_IMAGE) FACENET_TRAINER_JAX_IMAGE=$(TRAINER_JAX_IMAGE) \
	  images/podman.sh exec $(VENV)/bin/pytest tests/containers $(PYTEST_ARGS)

standin-bases: ## offline: local stand-ins for the two base images (root, debootstrap, buildah)
	images/standin-base.sh

lock: install ## re-pin requirements/lock.txt from the current venv (setuptools too: grpcio-tools, a kserve dependency, needs it at run time)
	{ head -2 $(LOCK); $(PIP) freeze --all --exclude-editable | grep -v -E '^(facenet-kfp|pip|wheel)=='; } > $(LOCK).new \
	  && mv $(LOCK).new $(LOCK)

clean: ## remove build outputs and local pipeline outputs
	rm -rf build $(PIPELINE_ROOT)

golden: install ## regenerate tests/golden/facenet_pipeline.yaml after a deliberate DAG change
	$(PY) -m pipelines.compile --config configs/lfw.yaml --out tests/golden/facenet_pipeline.yaml \
	  --light-image registry.example/facenet-kfp:golden --trainer-image registry.example/facenet-kfp-trainer:golden
