#!/usr/bin/env bash
# docs/results.md, "The pretrained proxy": does the proxy backbone (proxy:synthetic,
# freesine_jax/pretrain.py) help? Full fine-tuning, decoder-only and Free Sinewich on
# configs/synthetic.py, each from the proxy and from a randomly initialised backbone, seed 0.
# A finished run is skipped, an interrupted one resumes from its checkpoint; then the table
# (Δm against decoder-only on random features).
# Usage: scripts/pretraining_helps.sh [OUTDIR]   (default workdir/pretraining_helps)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-workdir/pretraining_helps}"
py=.venv/bin/python
mkdir -p "$out"
"$py" -m freesine_jax.tools.pretrain --config=configs/pretrain_proxy.py  # cached afterwards
# name|config arg|extra flag
runs=(
  "free_sinewich_proxy||"
  "free_sinewich_random||--config.model.backbone_weights="
  "decoder_only_proxy|:decoder_only|"
  "decoder_only_random|:decoder_only|--config.model.backbone_weights="
  "full_ft_proxy|:full_ft|"
  "full_ft_random|:full_ft|--config.model.backbone_weights="
)
for run in "${runs[@]}"; do
  IFS="|" read -r name arg extra <<< "$run"
  [ -f "$out/$name/results.json" ] && continue
  start=$(date +%s)
  # shellcheck disable=SC2086  # $extra is one flag or none
  "$py" -m freesine_jax.main --config="configs/synthetic.py$arg" --workdir="$out/$name" \
    --config.seed=0 $extra > "$out/$name.log" 2>&1 \
    || { echo "$name failed: $out/$name.log" >&2; exit 1; }
  echo "$name: done in $(( $(date +%s) - start )) s"
done
"$py" -m freesine_jax.tools.table --reference="decoder-only, random" --runs \
  "Free Sinewich, proxy=$out/free_sinewich_proxy" "Free Sinewich, random=$out/free_sinewich_random" \
  "decoder-only, proxy=$out/decoder_only_proxy" "decoder-only, random=$out/decoder_only_random" \
  "full FT, proxy=$out/full_ft_proxy" "full FT, random=$out/full_ft_random" | tee "$out/table.md"
