"""Default job: Free Sinewich on the embedded synthetic multi-task dataset (CPU, minutes).

  python -m freesine_jax.main --config=configs/synthetic.py --workdir=/tmp/freesine_synthetic

A small Swin (random init: no pretrained weights ship with the project) with all six tasks at
64x64. Everything else (adapters, Clock Net, shared decoder group, losses) is the paper's setup.
The arg is a comma-separated list: 'tiny' shrinks it further for tests (32x32 images, 24 training
examples) and the paper's ablation names switch ablations on (configs/_paper.py), e.g.
--config=configs/synthetic.py:no_sine or :tiny,no_lcn.
"""
import ml_collections

from configs import _paper
from configs import common
from freesine_jax import models
from freesine_jax.data import synthetic


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  tiny = "tiny" in tokens
  ablations = tuple(t for t in tokens if t != "tiny")
  unknown = [t for t in ablations if t not in _paper.ABLATIONS]
  if unknown:
    raise ValueError(f"configs/synthetic.py arg {unknown[0]!r}: expected 'tiny' or one of "
                     f"{_paper.ABLATIONS}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
  config.num_classes = {"semseg": synthetic.NUM_SEMSEG_CLASSES,
                        "human_parts": synthetic.NUM_HUMAN_PARTS_CLASSES}
  config.loss_weights = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0,
                         "edge": 50.0, "depth": 1.0}

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "synthetic"
  config.dataset.builder_config = "tiny" if tiny else "default"
  config.dataset.data_dir = _paper.DATA_DIR
  config.dataset.manual_dir = ""
  config.dataset.train_split = "train"
  config.dataset.eval_split = "val"
  config.dataset.image_size = (32, 32) if tiny else (64, 64)
  config.dataset.augment = dict(flip=True, rotate_degrees=20.0, scale_range=(0.75, 1.25),
                                scales=None)

  config.input = ml_collections.ConfigDict()
  config.input.batch_size = 8
  config.input.eval_batch_size = 8 if tiny else 32
  config.input.num_workers = 0

  config.model = models.model_config(rank=4 if tiny else 8, variant="custom")
  config.model.embed_dim = 16
  config.model.depths = (2, 2, 2, 2)
  config.model.num_heads = (1, 2, 2, 4)
  config.model.window_size = 4
  config.model.patch_size = 2 if tiny else 4
  config.model.drop_path_rate = 0.1
  config.model.decoder.head_channels = 32 if tiny else 64
  _paper.apply_ablations(config.model, ablations)

  common.add_training_defaults(config)
  config.optim.lr_base = 2e-3 * 512 / config.input.batch_size  # peak lr 2e-3 at this batch
  config.optim.warmup_lr_base = 0.0
  config.optim.min_lr_base = 2e-5 * 512 / config.input.batch_size
  config.train.num_epochs = 2 if tiny else 6
  config.train.warmup_epochs = 0 if tiny else 1
  config.train.log_every_steps = 2 if tiny else 20
  config.train.checkpoint_every_steps = 3 if tiny else 100
  return config
