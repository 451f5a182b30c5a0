# Shared helpers of images/build.sh, push.sh and standin-base.sh (sourced, not run).
#
# Settings (environment):
#   IMAGE_REGISTRY   registry and namespace of the three images (default ghcr.io/facenet-kfp)
#   IMAGE_TAG        tag of the three images; never 'latest'    (default: version in pyproject.toml)
#   CONTAINER_TOOL   docker or buildah; default docker when 'docker info' reaches a daemon, else buildah
#   STORAGE_DRIVER   buildah storage driver; default what containers-storage picks
#                    (overlay where the kernel supports it, else vfs)
#   BUILDAH_ISOLATION  buildah RUN isolation (default chroot: works without a daemon or user namespaces)
#   BUILD_CA_CERTS   host folder mounted read-only at /etc/ssl/certs during buildah RUN steps, so pip
#                    trusts a TLS-intercepting proxy (default /etc/ssl/certs when it exists; '' = none)

set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$IMAGES_DIR/.." && pwd)"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

# The project version from pyproject.toml ([project] version = "X").
project_version() {
    local version
    version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$REPO_ROOT/pyproject.toml" | head -n 1)"
    [[ -n "$version" ]] || die "no 'version = \"...\"' line in $REPO_ROOT/pyproject.toml"
    printf '%s\n' "$version"
}

IMAGE_REGISTRY="${IMAGE_REGISTRY:-ghcr.io/facenet-kfp}"
IMAGE_TAG="${IMAGE_TAG:-$(project_version)}"

# Refuse tags that do not pin a version: 'latest' moves, and KFP's cache keys on the image string.
check_tag() {
    local tag="$1"
    [[ -n "$tag" ]] || die "IMAGE_TAG is empty; pin a version (e.g. IMAGE_TAG=$(project_version))"
    [[ "$tag" != "latest" ]] || die "IMAGE_TAG=latest refused: pin a version (e.g. IMAGE_TAG=$(project_version)) so pipelines reference an immutable image"
    # Docker's tag grammar: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "IMAGE_TAG=$tag is not a valid image tag"
}

light_ref() { printf '%s/facenet-kfp:%s\n' "$IMAGE_REGISTRY" "$IMAGE_TAG"; }
trainer_ref() { printf '%s/facenet-kfp-trainer:%s\n' "$IMAGE_REGISTRY" "$IMAGE_TAG"; }
trainer_jax_ref() { printf '%s/facenet-kfp-trainer-jax:%s\n' "$IMAGE_REGISTRY" "$IMAGE_TAG"; }

container_tool() {
    if [[ -n "${CONTAINER_TOOL:-}" ]]; then
        case "$CONTAINER_TOOL" in
            docker|buildah) printf '%s\n' "$CONTAINER_TOOL" ;;
            *) die "CONTAINER_TOOL=$CONTAINER_TOOL: use docker or buildah" ;;
        esac
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        printf 'docker\n'
    elif command -v buildah >/dev/null 2>&1; then
        printf 'buildah\n'
    else
        die "no Docker daemon reachable ('docker info' failed) and no buildah on PATH; install one (Debian: apt-get install buildah)"
    fi
}

# buildah with the storage driver fixed for the whole run, so the build, the stand-in bases and the
# push all use one image store (images in an overlay store are invisible to a vfs one).
storage_driver() {
    if [[ -n "${STORAGE_DRIVER:-}" ]]; then
        printf '%s\n' "$STORAGE_DRIVER"
        return
    fi
    local driver
    # containers-storage picks overlay where the kernel supports it (and the store is not itself on
    # overlayfs), else vfs; an existing store keeps the driver it was created with.
    driver="$(buildah info --format '{{.store.GraphDriverName}}')" || die "'buildah info' failed"
    [[ -n "$driver" ]] || die "'buildah info' reported no storage driver; set STORAGE_DRIVER=vfs or overlay"
    printf '%s\n' "$driver"
}

bah() { buildah --storage-driver "$BAH_DRIVER" "$@"; }

init_buildah() {
    BAH_DRIVER="$(storage_driver)"
    BAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
    BAH_VOLUMES=()
    local certs="${BUILD_CA_CERTS-/etc/ssl/certs}"
    if [[ -n "$certs" && -d "$certs" ]]; then
        BAH_VOLUMES=(--volume "$certs:/etc/ssl/certs:ro")
    fi
    log "buildah $(buildah --version | awk '{print $3}'), storage driver $BAH_DRIVER, isolation $BAH_ISOLATION${BAH_VOLUMES[*]:+, CA certificates from $certs}"
}

# True when the local store (docker or buildah) already holds the image reference.
image_exists() {
    local tool="$1" ref="$2"
    if [[ "$tool" == docker ]]; then
        docker image inspect "$ref" >/dev/null 2>&1
    else
        bah inspect --type image "$ref" >/dev/null 2>&1
    fi
}

# Uncompressed image size in MB (decimal), as the local store reports it.
image_size_mb() {
    local tool="$1" ref="$2" size
    if [[ "$tool" == docker ]]; then
        size="$(docker image inspect --format '{{.Size}}' "$ref")"
        [[ "$size" =~ ^[0-9]+$ ]] || die "could not read the size of $ref"
        awk -v b="$size" 'BEGIN { printf "%.0f\n", b / 1e6 }'
        return
    fi
    # buildah lists sizes as decimal human units ("199 MB", "1.42 GB").
    size="$(bah images --json "$ref" | sed -n 's/^ *"size": *"\([^"]*\)".*/\1/p' | head -n 1)"
    [[ "$size" =~ ^[0-9.]+\ ?(B|kB|MB|GB|TB)$ ]] || die "could not read the size of $ref (got '$size')"
    awk -v s="$size" 'BEGIN {
        n = s + 0; u = s; sub(/^[0-9.]+ ?/, "", u)
        f["B"] = 1e-6; f["kB"] = 1e-3; f["MB"] = 1; f["GB"] = 1e3; f["TB"] = 1e6
        printf "%.0f\n", n * f[u] }'
}
