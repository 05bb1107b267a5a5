#!/usr/bin/env bash
# Regenerates the baseline comparison of docs/results.md on the synthetic default: Free Sinewich,
# MTLoRA, TADFormer, LoRA and decoder-only at the synthetic default's rank (r = 8), one seed, the
# same steps; then tools.table over the runs (Δm against decoder-only).
# Usage: scripts/baseline_comparison.sh [OUTDIR] [SEED] (default workdir/baselines, seed 0;
# reruns resume).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-workdir/baselines}"
seed="${2:-0}"
py=.venv/bin/python
for method in free_sinewich mtlora tadformer lora decoder_only; do
  arg=""
  [ "$method" = free_sinewich ] || arg=":$method"
  "$py" -m freesine_jax.main --config="configs/synthetic.py$arg" --workdir="$out/$method" \
    --config.seed="$seed"
done
"$py" -m freesine_jax.tools.table --reference=decoder-only \
  --runs "Free Sinewich=$out/free_sinewich" "MTLoRA=$out/mtlora" "TADFormer=$out/tadformer" \
         "LoRA=$out/lora" "decoder-only=$out/decoder_only" \
  | tee "$out/table.md"
