"""Free Sinewich on Cityscapes (semseg 19 classes + depth from disparity), Swin-T.

  python -m freesine_jax.main --config=configs/cityscapes.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations or one baseline (configs/common.py). Image size [choice]: 448x896 keeps
the 1:2 aspect ratio and every Swin-T stage grid (112x224 ... 14x28) a multiple of the 7x7 window.
Augmentation as PASCAL's (flip, rotate, scale). No single-task reference row is given in
docs/design.md: set config.eval.reference in a config file to get Δm.
"""
import ml_collections

from configs import base
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  tokens = common.parse_arg(arg, ranks=True)
  config = base.get_config()
  config.tasks = ("semseg", "depth")
  config.num_classes.semseg = 19
  config.dataset.name = "cityscapes"
  config.dataset.image_size = (448, 896)
  config.input.batch_size = 16
  config.input.eval_batch_size = 16
  config.model.lora.rank = common.rank_of(tokens)
  common.apply_ablations(config, tokens)
  common.apply_baseline(config, tokens)
  common.apply_lean_compute(config, tokens)
  return config
