"""Free Sinewich on NYUDv2 (semseg, normals, depth: the paper's 3 tasks), Swin-T, 448x448.

  python -m freesine_jax.main --config=configs/nyud.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations or one baseline (configs/common.py). The dataset also stores edges
(MTLoRA's 4-task NYUD setup): add them with --config.tasks="('semseg','normals','depth','edge')".
Augmentation: flip and discrete scales {1, 1.2, 1.5}. No single-task reference row is given for
NYUDv2 in docs/design.md: set config.eval.reference in a config file to get Δm.
"""
import ml_collections

from configs import base
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  tokens = common.parse_arg(arg, ranks=True)
  config = base.get_config()
  config.tasks = ("semseg", "normals", "depth")
  config.num_classes.semseg = 40
  config.dataset.name = "nyud"
  config.dataset.augment.rotate_degrees = 0.0
  config.dataset.augment.scale_range = None
  config.dataset.augment.scales = (1.0, 1.2, 1.5)
  config.model.lora.rank = common.rank_of(tokens)
  common.apply_ablations(config, tokens)
  common.apply_baseline(config, tokens)
  common.apply_lean_compute(config, tokens)
  return config
