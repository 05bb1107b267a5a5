#!/usr/bin/env bash
# The prepared accelerator check (benchmarks/device_check.py): backend and devices, the
# accelerator-marked tests on the device, the paper config's speed and memory; JSON + Markdown in
# benchmarks/results/device_check/. Finishes in about 8 minutes on one H100 (3 cases x 2 dtypes).
#
#   benchmarks/device_check.sh [--dry-run] [device_check.py flags]
#   benchmarks/device_check.sh --fetch-wheels   # here, with network: the wheels a bare GPU image
#                                               # lacks, into benchmarks/wheels/ (carried along)
#
# On the device it uses the python that has jax with a CUDA plugin (a bare GPU image: $PYTHON,
# else python3), installs the missing pure dependencies from benchmarks/wheels/ (no network
# there) and this checkout without dependencies, then runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
NEEDED="ml_collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5 hypothesis==6.170.15 pytest==9.2.0"
py="${PYTHON:-python3}"
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$py" -m pip download --quiet --dest "$WHEELS" --python-version 3.11 --only-binary=:all: $NEEDED
  ls "$WHEELS"
  exit 0
fi
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then
  py=.venv/bin/python  # a checkout set up with scripts/setup.sh (the CPU dry run here)
fi
if ! "$py" -c "import ml_collections, grain, tensorflow_datasets, tensorboardX, pytest, hypothesis" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet --no-index --find-links "$WHEELS" $NEEDED
  "$py" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
exec "$py" -m benchmarks.device_check "$@"
