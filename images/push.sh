#!/usr/bin/env bash
# Push the three images built by images/build.sh to $IMAGE_REGISTRY (log in first: docker login /
# buildah login). Same settings as build.sh; a 'latest' tag is refused.
#
#   images/push.sh [all|light|trainer|jax]      (default: all)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

target="${1:-all}"
case "$target" in
    all) refs=("$(light_ref)" "$(trainer_ref)" "$(trainer_jax_ref)") ;;
    light) refs=("$(light_ref)") ;;
    trainer) refs=("$(trainer_ref)") ;;
    jax) refs=("$(trainer_jax_ref)") ;;
    *) die "unknown target '$target': use all, light, trainer or jax" ;;
esac
check_tag "$IMAGE_TAG"

tool="$(container_tool)"
if [[ "$tool" == buildah ]]; then
    init_buildah
fi

for ref in "${refs[@]}"; do
    image_exists "$tool" "$ref" || die "$ref is not in the local $tool store; run images/build.sh first"
done
for ref in "${refs[@]}"; do
    log "pushing $ref with $tool"
    if [[ "$tool" == docker ]]; then
        docker push "$ref"
    else
        bah push "$ref" "docker://$ref"
    fi
done
