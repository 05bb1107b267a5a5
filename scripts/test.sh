#!/usr/bin/env bash
# The whole test suite, including the torch parity tests (installs the pinned deps + extras).
# Extra arguments go to pytest. pytest's exit code 5 ("no tests collected") counts as a failure.
# Two pytest-xdist workers (XLA compiles mostly on one core; the machine of record has two), each
# test file on one worker so its module fixtures are made once (tests/conftest.py shares the
# session fixtures and the compilation cache between the workers), the longest files first
# (--no-loadscope-reorder keeps tests/conftest.py's order). `-n 0` runs in one process.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
scripts/setup.sh test,torch || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$code"
