#!/usr/bin/env bash
# Creates ./.venv (if needed) and installs freesine_jax with the pinned versions of pyproject.toml.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test,torch
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
# torch is optional (weight conversion and parity tests); `torch==2.13.0` is the CPU wheel.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
