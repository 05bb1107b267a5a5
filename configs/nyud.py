"""Free Sinewich on NYUDv2 (semseg, normals, depth: the paper's 3 tasks), Swin-T, 448x448.

  python -m freesine_jax.main --config=configs/nyud.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations (see configs/_paper.py). The dataset also stores edges
(MTLoRA's 4-task NYUD setup): add them with --config.tasks=semseg,normals,depth,edge (the loss
weight is set). Augmentation: flip and discrete scales {1, 1.2, 1.5}.
"""
import ml_collections

from configs import _paper
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "normals", "depth")
  config.num_classes = {"semseg": 40}
  config.loss_weights = {"semseg": 1.0, "normals": 10.0, "depth": 1.0, "edge": 50.0}

  config.dataset = _paper.dataset(
      "nyud", (448, 448), dict(flip=True, rotate_degrees=0.0, scale_range=None,
                              scales=(1.0, 1.2, 1.5)))
  config.input = _paper.input_pipeline(32)

  config.model = _paper.model(arg)

  common.add_training_defaults(config)
  # No single-task reference row is given for NYUDv2 in docs/design.md: set one to get Δm.
  return config
