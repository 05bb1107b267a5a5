"""Free Sinewich on Cityscapes (semseg 19 classes + depth from disparity), Swin-T.

  python -m freesine_jax.main --config=configs/cityscapes.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations (see configs/_paper.py). Image size [choice]: 448x896 keeps
the 1:2 aspect ratio and every Swin-T stage grid (112x224 ... 14x28) a multiple of the 7x7 window.
Augmentation as PASCAL's (flip, rotate, scale). No single-task reference row is given in
DESIGN.md: set config.eval.reference to get Δm.
"""
import os

import ml_collections

from configs import _paper
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "depth")
  config.num_classes = {"semseg": 19}
  config.loss_weights = {"semseg": 1.0, "depth": 1.0}

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cityscapes"
  config.dataset.builder_config = ""
  config.dataset.data_dir = os.environ.get(
      "FREESINE_DATA_DIR", os.path.expanduser("~/.cache/freesine_jax/tensorflow_datasets"))
  config.dataset.manual_dir = ""
  config.dataset.train_split = "train"
  config.dataset.eval_split = "val"
  config.dataset.image_size = (448, 896)
  config.dataset.augment = dict(flip=True, rotate_degrees=20.0, scale_range=(0.75, 1.25),
                                scales=None)

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 16
  config.input.eval_batch_size = 16
  config.input.num_workers = 4

  config.model = _paper.model(arg)

  common.add_training_defaults(config)
  return config
