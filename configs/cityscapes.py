"""Free Sinewich on Cityscapes (semseg 19 classes + depth from disparity), Swin-T.

  python -m freesine_jax.main --config=configs/cityscapes.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations (see configs/_paper.py). Image size [choice]: 448x896 keeps
the 1:2 aspect ratio and every Swin-T stage grid (112x224 ... 14x28) a multiple of the 7x7 window.
Augmentation as PASCAL's (flip, rotate, scale). No single-task reference row is given in
docs/design.md: set config.eval.reference to get Δm.
"""
import ml_collections

from configs import _paper
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "depth")
  config.num_classes = {"semseg": 19}
  config.loss_weights = {"semseg": 1.0, "depth": 1.0}

  config.dataset = _paper.dataset("cityscapes", (448, 896))
  config.input = _paper.input_pipeline(16)

  config.model = _paper.model(arg)

  common.add_training_defaults(config)
  return config
