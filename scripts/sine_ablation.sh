#!/usr/bin/env bash
# Regenerates the sine ablation of docs/results.md on the synthetic default: Free Sinewich, its
# "w/o sine" ablation and "w/o Clock Net", 3 seeds each, the same steps; then tools.analyze on
# every run and tools.table over all of them (Δm against "w/o sine").
# Usage: scripts/sine_ablation.sh [OUTDIR] (default workdir/sine_ablation; reruns resume).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-workdir/sine_ablation}"
py=.venv/bin/python
for variant in full no_sine no_lcn; do
  for seed in 0 1 2; do
    dir="$out/$variant/seed$seed"
    arg=""
    [ "$variant" = full ] || arg=":$variant"
    "$py" -m freesine_jax.main --config="configs/synthetic.py$arg" --workdir="$dir" \
      --config.seed="$seed"
    "$py" -m freesine_jax.tools.analyze --workdir="$dir" > "$dir/analysis.txt"
  done
done
runs() { echo "$out/$1/seed0,$out/$1/seed1,$out/$1/seed2"; }
"$py" -m freesine_jax.tools.table --reference="w/o sine" \
  --runs "Free Sinewich=$(runs full)" "w/o sine=$(runs no_sine)" "w/o Clock Net=$(runs no_lcn)" \
  | tee "$out/table.md"
