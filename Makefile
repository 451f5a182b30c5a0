# facenet-kfp: build, test and run the FaceNet Kubeflow pipeline.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
LOCK          := requirements/lock.txt
STAMP         := $(VENV)/.installed

IMAGE_REGISTRY ?= ghcr.io/facenet-kfp
IMAGE_TAG      ?= 0.1.0
LIGHT_IMAGE    := $(IMAGE_REGISTRY)/facenet-kfp:$(IMAGE_TAG)
TRAINER_IMAGE  := $(IMAGE_REGISTRY)/facenet-kfp-trainer:$(IMAGE_TAG)

PIPELINE_ROOT ?= local_outputs
CONFIG        ?= configs/demo.yaml
DEMO_DIR      ?= data/demo
SOURCE        ?=
SHA256        ?=
PAIRS         ?=
PYTEST_ARGS   ?=

.PHONY: help install test run compile lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(LOCK) -e '.[train,dev]'
	touch $@

install: $(STAMP) ## create .venv with the pinned dependencies (quick when done)

test: install ## run the whole test suite
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lock: install ## re-pin requirements/lock.txt from the current venv
	{ head -2 $(LOCK); $(PIP) freeze --exclude-editable | grep -v '^facenet-kfp'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean: ## remove build outputs and local pipeline outputs
	rm -rf build $(PIPELINE_ROOT)
