"""Free Sinewich on NYUDv2 (semseg, normals, depth, edge), Swin-T, 448x448.

  python -m freesine_jax.main --config=configs/nyud.py:r64 --workdir=...

Arg: r16 | r32 | r64 plus ablations (see configs/_paper.py). The paper reports the 3-task
setting (semseg, normals, depth); edge is kept as in MTLoRA's NYUD setup and can be dropped with
--config.tasks=semseg,normals,depth. Augmentation: flip and discrete scales {1, 1.2, 1.5}.
"""
import os

import ml_collections

from configs import _paper
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "normals", "depth")
  config.num_classes = {"semseg": 40}
  config.loss_weights = {"semseg": 1.0, "normals": 10.0, "depth": 1.0, "edge": 50.0}

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "nyud"
  config.dataset.builder_config = ""
  config.dataset.data_dir = os.environ.get(
      "FREESINE_DATA_DIR", os.path.expanduser("~/.cache/freesine_jax/tensorflow_datasets"))
  config.dataset.manual_dir = ""
  config.dataset.train_split = "train"
  config.dataset.eval_split = "val"
  config.dataset.image_size = (448, 448)
  config.dataset.augment = dict(flip=True, rotate_degrees=0.0, scale_range=None,
                                scales=(1.0, 1.2, 1.5))

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 32
  config.input.eval_batch_size = 32
  config.input.num_workers = 4

  config.model = _paper.model(arg)

  common.add_training_defaults(config)
  # No single-task reference row is given for NYUDv2 in DESIGN.md: set one to get Δm.
  return config
