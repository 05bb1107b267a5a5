#!/usr/bin/env bash
# The main job on the embedded default: render the synthetic multi-task dataset, train Free
# Sinewich on it and evaluate (a few minutes on 2 CPU cores). Extra flags go to freesine_jax.main.
# Usage: scripts/demo.sh [--workdir=DIR] [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
workdir="workdir/synthetic"
args=()
for a in "$@"; do
  case "$a" in
    --workdir=*) workdir="${a#--workdir=}" ;;
    *) args+=("$a") ;;
  esac
done
exec .venv/bin/python -m freesine_jax.main --config=configs/synthetic.py --workdir="$workdir" \
  "${args[@]+"${args[@]}"}"
