#!/usr/bin/env bash
# The whole test suite, including the torch parity tests (installs the pinned deps + extras).
# Extra arguments go to pytest. pytest's exit code 5 ("no tests collected") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
scripts/setup.sh test,torch || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$code"
