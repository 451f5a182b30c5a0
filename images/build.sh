#!/usr/bin/env bash
# Build the three images: the light image of the data steps, the trainer image and the JAX
# trainer image of multi-process training.
#
#   images/build.sh [all|light|trainer|jax]    (default: all)
#
# Uses 'docker build' when a Docker daemon answers 'docker info', else 'buildah bud' (daemonless).
# Environment (besides the settings listed in images/lib.sh):
#   IMAGE_REGISTRY, IMAGE_TAG   tags $IMAGE_REGISTRY/facenet-kfp:$IMAGE_TAG,
#                               $IMAGE_REGISTRY/facenet-kfp-trainer:$IMAGE_TAG and
#                               $IMAGE_REGISTRY/facenet-kfp-trainer-jax:$IMAGE_TAG ('latest' is refused)
#   LIGHT_BASE_IMAGE            base of the light image   (Dockerfile default: python:3.11-slim-bookworm)
#   TRAINER_BASE_IMAGE          base of the trainer image (Dockerfile default: tensorflow/tensorflow:2.21.0-gpu)
#   TRAINER_JAX_BASE_IMAGE      base of the JAX trainer image (default: LIGHT_BASE_IMAGE, else the
#                               Dockerfile's default python:3.11-slim-bookworm)
#   VERSION                     org.opencontainers.image.version label (default: pyproject version)
#   LIGHT_MAX_MB                warn when the light image is larger (default 400)
# Offline (no registry): build stand-in bases with images/standin-base.sh and point the
# *_BASE_IMAGE variables at them (see images/README.md).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

target="${1:-all}"
case "$target" in
    all|light|trainer|jax) ;;
    *) die "unknown target '$target': use all, light, trainer or jax" ;;
esac
check_tag "$IMAGE_TAG"
VERSION="${VERSION:-$(project_version)}"
LIGHT_MAX_MB="${LIGHT_MAX_MB:-400}"

tool="$(container_tool)"
if [[ "$tool" == buildah ]]; then
    init_buildah
fi

built=()

# build_one NAME DOCKERFILE REF BASE_IMAGE(empty = the Dockerfile's default)
build_one() {
    local name="$1" dockerfile="$2" ref="$3" base="$4"
    local args=(--file "$IMAGES_DIR/$dockerfile" --tag "$ref" --build-arg "VERSION=$VERSION")
    if [[ -n "$base" ]]; then
        args+=(--build-arg "BASE_IMAGE=$base")
    fi
    log "building $name image $ref (${base:-default base}) with $tool"
    local start=$SECONDS
    if [[ "$tool" == docker ]]; then
        docker build "${args[@]}" "$REPO_ROOT"
    else
        # --layers keeps intermediate layers, so a rebuild after a code change reuses the
        # dependency layers.
        bah bud --layers --isolation "$BAH_ISOLATION" "${BAH_VOLUMES[@]}" "${args[@]}" "$REPO_ROOT"
    fi
    log "built $ref in $((SECONDS - start)) s"
    built+=("$ref")
}

if [[ "$target" == all || "$target" == light ]]; then
    build_one light Dockerfile "$(light_ref)" "${LIGHT_BASE_IMAGE:-}"
fi
if [[ "$target" == all || "$target" == trainer ]]; then
    build_one trainer trainer.Dockerfile "$(trainer_ref)" "${TRAINER_BASE_IMAGE:-}"
fi
if [[ "$target" == all || "$target" == jax ]]; then
    build_one "JAX trainer" trainer-jax.Dockerfile "$(trainer_jax_ref)" \
        "${TRAINER_JAX_BASE_IMAGE:-${LIGHT_BASE_IMAGE:-}}"
fi

for ref in "${built[@]}"; do
    size="$(image_size_mb "$tool" "$ref")"
    printf '%-70s %6s MB\n' "$ref" "$size"
    if [[ "$ref" == "$(light_ref)" && "$size" -gt "$LIGHT_MAX_MB" ]]; then
        log "warning: the light image is $size MB, over the $LIGHT_MAX_MB MB target"
    fi
done
