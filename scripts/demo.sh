#!/usr/bin/env bash
# The main job on the embedded default: render the synthetic multi-task dataset and pretrain the
# proxy backbone (first use only, then cached), adapt the frozen proxy with Free Sinewich and
# evaluate (8.5 min from a fresh clone on 2 CPU cores). Extra flags go to freesine_jax.main.
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
