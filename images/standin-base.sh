#!/usr/bin/env bash
# Build local stand-ins for the two base images, for machines that reach package mirrors but no
# container registry (python:3.11-slim-bookworm and tensorflow/tensorflow:2.21.0-gpu cannot be
# pulled there). Needs root, debootstrap and buildah; cached: an existing image is kept unless
# FORCE=1.
#
#   images/standin-base.sh [all|light|trainer]   (default: all; trainer builds light first)
#
# light:   Debian bookworm minbase + python3 (3.11, like python:3.11-slim-bookworm), python3-venv,
#          python3-pip, ca-certificates, passwd (useradd), committed from scratch as
#          localhost/facenet-kfp-base:python3.11-bookworm (env LIGHT_STANDIN to rename).
# trainer: the light stand-in plus 'pip install tensorflow==<lock pin>' into the system Python,
#          as the TensorFlow images have it; CPU only (no CUDA libraries), committed as
#          localhost/facenet-kfp-trainer-base:tf2.21-cpu (env TRAINER_STANDIN to rename).
#          The 'tensorflow' distribution itself, not 'tensorflow-cpu': the trainer Dockerfile
#          relies on the base's tensorflow satisfying the lock's tensorflow pin.
# Then:    LIGHT_BASE_IMAGE=localhost/facenet-kfp-base:python3.11-bookworm \
#          TRAINER_BASE_IMAGE=localhost/facenet-kfp-trainer-base:tf2.21-cpu images/build.sh
#
# DEBIAN_MIRROR overrides the mirror (default: the first bookworm URIs of
# /etc/apt/sources.list.d/debian.sources, else http://deb.debian.org/debian).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LIGHT_STANDIN="${LIGHT_STANDIN:-localhost/facenet-kfp-base:python3.11-bookworm}"
TRAINER_STANDIN="${TRAINER_STANDIN:-localhost/facenet-kfp-trainer-base:tf2.21-cpu}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,passwd
FORCE="${FORCE:-0}"

target="${1:-all}"
case "$target" in
    all|light|trainer) ;;
    *) die "unknown target '$target': use all, light or trainer" ;;
esac

# The Debian mirror this machine's apt uses: it is the one known to be reachable.
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$DEBIAN_MIRROR"
        return
    fi
    local sources=/etc/apt/sources.list.d/debian.sources uri
    if [[ -r "$sources" ]]; then
        # deb822 stanzas: the URIs of the first stanza whose Suites include bookworm itself.
        uri="$(awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u = ""; s = 0; next }
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
            END { if (u != "" && s) print u }' "$sources" | head -n 1)"
        if [[ -n "$uri" ]]; then
            printf '%s\n' "$uri"
            return
        fi
    fi
    printf 'http://deb.debian.org/debian\n'
}

# Version of NAME pinned in requirements/lock.txt.
lock_pin() {
    local name="$1" version
    version="$(sed -n "s/^${name}==\([^[:space:]]*\).*/\1/p" "$REPO_ROOT/requirements/lock.txt")"
    [[ -n "$version" ]] || die "$name is not pinned in $REPO_ROOT/requirements/lock.txt"
    printf '%s\n' "$version"
}

cached() {
    local ref="$1"
    local size
    if [[ "$FORCE" != 1 ]] && image_exists buildah "$ref"; then
        size="$(image_size_mb buildah "$ref")"
        log "$ref exists ($size MB); skipped (FORCE=1 rebuilds)"
        return 0
    fi
    return 1
}

build_light() {
    cached "$LIGHT_STANDIN" && return 0
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (Debian: apt-get install debootstrap)"
    local mirror rootfs ctr mnt size start=$SECONDS
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d /var/tmp/facenet-standin.XXXXXX)"
    ROOTFS_TO_REMOVE="$rootfs"
    log "debootstrap $SUITE minbase with $PACKAGES from $mirror"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >&2
    # Package caches and indexes are not needed in an image (as in the Debian slim images).
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

    ctr="$(bah from scratch)"
    CONTAINER_TO_REMOVE="$ctr"
    mnt="$(bah mount "$ctr")"
    # tar with numeric owners: 'buildah copy' would reset group ownership of the tree.
    tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    bah umount "$ctr" >/dev/null
    bah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 \
        --cmd /bin/bash \
        --label org.opencontainers.image.description="facenet-kfp offline stand-in for python:3.11-slim-bookworm (debootstrap $SUITE minbase)" \
        "$ctr"
    bah commit --rm "$ctr" "$LIGHT_STANDIN" >/dev/null
    CONTAINER_TO_REMOVE=""
    rm -rf "$rootfs"
    ROOTFS_TO_REMOVE=""
    size="$(image_size_mb buildah "$LIGHT_STANDIN")"
    log "committed $LIGHT_STANDIN in $((SECONDS - start)) s ($size MB)"
}

build_trainer() {
    cached "$TRAINER_STANDIN" && return 0
    local tf ctr size start=$SECONDS
    tf="$(lock_pin tensorflow)"
    ctr="$(bah from "$LIGHT_STANDIN")"
    CONTAINER_TO_REMOVE="$ctr"
    log "installing tensorflow==$tf into the system Python of $LIGHT_STANDIN"
    # System-wide like the TensorFlow images; --break-system-packages because Debian marks its
    # Python externally managed (PEP 668).
    bah run --isolation "$BAH_ISOLATION" "${BAH_VOLUMES[@]}" "$ctr" -- \
        python3 -m pip install --no-cache-dir --no-input --break-system-packages "tensorflow==$tf" >&2
    bah config \
        --label org.opencontainers.image.description="facenet-kfp offline stand-in for tensorflow/tensorflow:$tf-gpu (CPU only)" \
        "$ctr"
    bah commit --rm "$ctr" "$TRAINER_STANDIN" >/dev/null
    CONTAINER_TO_REMOVE=""
    size="$(image_size_mb buildah "$TRAINER_STANDIN")"
    log "committed $TRAINER_STANDIN in $((SECONDS - start)) s ($size MB)"
}

# The debootstrap tree and the working container are temporary, also when a step fails.
ROOTFS_TO_REMOVE=""
CONTAINER_TO_REMOVE=""
cleanup() {
    if [[ -n "$CONTAINER_TO_REMOVE" ]]; then
        bah rm "$CONTAINER_TO_REMOVE" >/dev/null || log "could not remove working container $CONTAINER_TO_REMOVE"
    fi
    if [[ -n "$ROOTFS_TO_REMOVE" ]]; then
        rm -rf "$ROOTFS_TO_REMOVE"
    fi
}
trap cleanup EXIT

init_buildah
build_light
if [[ "$target" == all || "$target" == trainer ]]; then
    build_trainer
fi
