#!/usr/bin/env bash
# Run benchmarks/gpu.py (with benchmarks/harness.py, which it imports; both travel with the working tree)
# on a GPU machine that has JAX with CUDA, Pillow, NumPy and PyYAML but no Keras, no TensorFlow and no
# network: Keras, matplotlib and their missing dependencies come as
# wheels in .whl/ (made by `make gpu-wheels` where there is network; they travel with the working
# tree), installed offline into a temporary folder put on PYTHONPATH. Everything the run writes
# (archive, prepared data, model) lives in that temporary folder and is removed at the end; the
# result table goes to stdout and, when $OUT is set, to $OUT/gpu-benchmark.json.
#
#   benchmarks/gpu.sh [benchmarks.gpu options, e.g. --dry-run or --sweep 16,64]
#
# Settings: PYTHON (default python3), GPU_WHEELS (default .whl, relative to the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
keras_wheels=("$WHEELS"/keras-*.whl)
if [ ${#keras_wheels[@]} -eq 0 ]; then
  echo "benchmarks/gpu.sh: no Keras wheel in $WHEELS/ (folder $([ -d "$WHEELS" ] && echo "has no keras-*.whl" || echo "missing")):" \
       "run 'make gpu-wheels' on a machine with network and bring $WHEELS/ along with the working tree" >&2
  exit 2
fi
command -v "$PYTHON" >/dev/null || { echo "benchmarks/gpu.sh: $PYTHON not found; set PYTHON" >&2; exit 2; }
wheel_python=""     # the CPython version of the first compiled wheel
for wheel in "${wheels[@]}"; do
  case $(basename "$wheel") in *-cp3*) wheel_python=$(basename "$wheel" | sed -E 's/.*-cp3([0-9]+)-.*/3.\1/'); break;; esac
done
python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "$wheel_python" ] && [ "$wheel_python" != "$python_version" ]; then
  echo "benchmarks/gpu.sh: the wheels in $WHEELS/ are for Python $wheel_python, $PYTHON is $python_version:" \
       "run 'make gpu-wheels GPU_PYTHON=$python_version' and bring the new $WHEELS/ along" >&2
  exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/facenet-gpu.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "installing ${#wheels[@]} wheels from $WHEELS/ into $tmp/site (offline)"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$tmp/site" "${wheels[@]}"
else
  # What pip --target does for these wheels (no scripts are needed): unpack each into the folder.
  echo "pip is not installed for $PYTHON: unpacking the wheels with zipfile instead"
  "$PYTHON" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$tmp/site" "${wheels[@]}"
fi
export PYTHONPATH="$tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax
# The machine as the result will name it (benchmarks/harness.py, which needs neither TensorFlow nor kfp).
"$PYTHON" -c 'import jax, matplotlib, yaml
from benchmarks.harness import machine_info, machine_lines
print(*machine_lines(machine_info("jax")), sep="\n")
print("  jax default backend", jax.default_backend(), "matplotlib", matplotlib.__version__)'
"$PYTHON" -m benchmarks.gpu --work "$tmp/work" "$@"
